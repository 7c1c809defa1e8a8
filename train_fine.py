"""Fine-grained training of FIBER: phrase grounding, referring expressions and detection.

    python train_fine.py                     # tiny detector on the embedded synthetic world
                                             # (~15 min on 2 CPU cores), then held-out AP50 and
                                             # REC accuracy before and after
    python train_fine.py --resume auto       # continue the run saved in --out
    torchrun --nproc_per_node 8 train_fine.py --config base --init fiber_coarse_init \\
        --data instances_train2017.json --image-root train2017 --batch-size 2 --amp bf16
    python train_fine.py --config base --data flickr.json --data refs.json:refexp ...

The loop is training.train_loop, shared with train_coarse.py (distributed set-up, resumable
sampler, atomic checkpoints, warm-up + multi-step schedule, AMP, accumulation, NaN guard,
graceful stop). Two things the shared parts do not have live here: an EMA of the weights (the
original's ModelEma, decay 0.999, kept in every checkpoint) and the original's optimiser groups
(text backbone at its own learning rate, biases at 2x with no weight decay;
FiberDetector.parameter_groups).

A stopped run resumes bit-exactly (model, EMA, optimiser, schedule, data position, RNG).
"""
import argparse
import copy
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

import training as T
from data import AnnotationError, load_tokenizer
from data_fine import FineCollator, build_fine_dataset
from detector import FiberDetector, FiberDetectorConfig, detector_kind, pick_weights
from eval_fine import synthetic_metrics
from scratch import warm_up_unless_initialised
from synthetic import SyntheticWorld, WorldConfig

# Defaults that depend on the model size; every one can be overridden by its flag.
PRESETS = {
    # From scratch, with the Swin warmed up first (scratch.py: a stand-in for ImageNet); about
    # 9 minutes on 2 CPU cores. At 600 steps REC was 44% (chance 38%), at 1500 it is 68%.
    "tiny": dict(batch_size=8, steps=1500, lr=1e-3, lang_lr=None, weight_decay=0.01,
                 warmup=40, grad_clip=1.0, save_every=250, log_every=10,
                 image_warmup_steps=300),
    # COCO fine-tuning of the released model: lr 1e-5 for both parts, wd 1e-4, no clipping,
    # 24 epochs of 32 images (e.g. 8 GPUs x 2 x 2 accumulation).
    "base": dict(batch_size=2, steps=90_000, lr=1e-5, lang_lr=1e-5, weight_decay=1e-4,
                 warmup=500, grad_clip=0.0, save_every=2500, log_every=20,
                 image_warmup_steps=0),
}
# Flags that may change when a run is resumed; any other difference is refused.
RESUME_MAY_CHANGE = {"out", "resume", "init", "num_workers", "save_every", "eval_every",
                     "no_eval", "log_every", "dist_timeout", "max_skip_fraction",
                     "max_nonfinite_steps", "eval_scenes", "grad_checkpointing",
                     "compact_heap"}
LOSS_NAMES = ("loss_dot_product_token", "loss_reg", "loss_centerness")


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser():
    p = argparse.ArgumentParser(
        description="Train fine-grained FIBER (grounding, referring expressions, detection).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = p.add_argument
    add("--config", default="tiny", choices=sorted(PRESETS),
        help="model size: tiny (CPU) or base (Swin-B + RoBERTa-base + DyHead, as released)")
    add("--version", default="v2", choices=("v2", "v3"),
        help="fusion version: v3 adds a LayerNorm on the image query (the RefCOCO models)")
    add("--data", action="append",
        help="'synthetic' (default) or an annotation file; repeat to mix several. Append "
             ":detection, :grounding or :refexp when the kind is not recognised")
    add("--synthetic-scenes", type=int, default=5000,
        help="training scenes of the synthetic world (each gives ~4.5 samples; at most 5000)")
    add("--image-root", help="folder the image paths of --data are relative to")
    add("--instances", help="COCO instances JSON naming the image files of a refs --data")
    add("--min-size", type=int, help="shorter image side at test time (tiny 128, base 800)")
    add("--max-size", type=int, help="longest image side (tiny 213, base 1333)")
    add("--train-sizes", type=int, nargs="+",
        help="shorter sides to pick from at train time (base: 480 560 640 720 800)")
    add("--batch-size", type=int, help="micro-batch per rank (preset: tiny 8, base 2)")
    add("--accum-steps", type=int, default=1, help="micro-batches per optimizer step")
    add("--steps", type=int, help="optimizer steps (preset: tiny 1500, base 90000)")
    add("--lr", type=float, help="learning rate of everything but the text backbone")
    add("--lang-lr", type=float, help="learning rate of the text backbone (default: --lr)")
    add("--weight-decay", type=float, help="AdamW weight decay (biases: none)")
    add("--warmup", type=int, help="linear warm-up steps, from 0.001 x lr")
    add("--milestones", type=float, nargs="+", default=[0.67, 0.89],
        help="lr x gamma at these fractions of --steps (the original's schedule)")
    add("--gamma", type=float, default=0.1, help="lr factor at each milestone")
    add("--ema", type=float, default=0.999, help="EMA decay of the weights; 0 disables it")
    add("--eval-ema", action="store_true", help="evaluate the EMA weights instead of the raw")
    add("--amp", default="none", choices=sorted(T.AMP_DTYPES), help="mixed precision")
    add("--grad-clip", type=float, help="clip the gradient norm to this; 0 = off")
    add("--grad-checkpointing", action="store_true",
        help="recompute backbone blocks and tower in backward (less memory, slower)")
    add("--num-workers", type=int, default=0, help="DataLoader worker processes per rank")
    add("--seed", type=int, default=0, help="seed of the init, data order and augmentation")
    add("--out", default="runs/fine", help="folder for checkpoints (last.pt, step_*.pt)")
    add("--save-every", type=int, help="checkpoint every N steps")
    add("--resume", help="'auto' (out/last.pt when it exists) or a checkpoint path")
    add("--image-warmup-steps", type=int,
        help="before training from scratch, re-draw the Swin's linear weights at fan-in scale "
             "and train it this many steps to classify synthetic scenes (colours, shapes, "
             "sizes, background, count), a stand-in for ImageNet pre-training; skipped with "
             "--init and on resume (preset: tiny 300, base 0)")
    add("--init", help="start from weights: a coarse FIBER checkpoint (original or this "
                       "project's names, fiber_coarse_init), a fine-grained release or one of "
                       "our fine checkpoints")
    add("--eval-every", type=int, default=0, help="held-out evaluation every N steps")
    add("--eval-scenes", type=int, default=100, help="held-out synthetic scenes to evaluate")
    add("--no-eval", action="store_true", help="skip every evaluation")
    add("--log-every", type=int, help="log a line every N steps")
    T.add_guard_flags(p)
    T.add_compact_heap_flag(p)
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    for name, value in PRESETS[args.config].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.data = args.data or ["synthetic"]
    if args.accum_steps < 1 or args.batch_size < 1:
        parser.error("--batch-size and --accum-steps must be >= 1")
    if not 1 <= args.synthetic_scenes <= WorldConfig().num_train:
        # the held-out evaluation uses the scenes after the default training range
        parser.error(f"--synthetic-scenes must be in 1..{WorldConfig().num_train}")
    for spec in args.data:
        path = spec.rsplit(":", 1)[0] if spec.endswith((":detection", ":grounding", ":refexp")) \
            else spec
        if path != "synthetic" and not Path(path).is_file():
            parser.error(f"--data {path}: no such file (or use 'synthetic')")
    return args


# ---------------------------------------------------------------------------------------------
# Model, data, optimiser


def model_config(args):
    make = FiberDetectorConfig.tiny if args.config == "tiny" else FiberDetectorConfig.base
    config = make(args.version)
    for flag, name in (("min_size", "min_size"), ("max_size", "max_size"),
                       ("train_sizes", "train_min_sizes")):
        if getattr(args, flag) is not None:
            value = getattr(args, flag)
            setattr(config, name, tuple(value) if isinstance(value, list) else value)
    if args.grad_checkpointing:
        config.swin.grad_checkpointing = config.text.grad_checkpointing = True
        config.head.checkpoint_tower = True
    return config


def init_weights(model, spec):
    """--init: a coarse checkpoint (backbone only), or fine-grained weights (everything)."""
    import releases
    state = releases.load_weights(spec)
    sd = pick_weights(state, ema=False)
    kind = detector_kind(sd)
    if kind == "fiber-fine" and not any(k.startswith("rpn.") for k in sd):
        kind = "backbone-only fine-grained"  # coarse weights already renamed: no head yet
    if kind == "fiber-fine":
        model.load_original_state_dict(sd, str(state.path))
    elif kind == "fiber-detector":
        model.load_own_state_dict(sd, str(state.path))
    else:
        new = model.init_from_coarse(sd, str(state.path))
        T.log(f"--init {spec}: backbone from a {kind} checkpoint; {len(new)} new tensors "
              "(per-stage norms, FPN, head) start from their initialisation")
        return
    T.log(f"--init {spec}: every weight loaded ({kind})")


def build_data(args, config, env, tokenizer):
    """The mixed training set and an endless, resumable stream of its micro-batches."""
    parts = []
    for spec in args.data:
        source, kind = spec, None
        if spec.endswith((":detection", ":grounding", ":refexp")):
            source, kind = spec.rsplit(":", 1)
        world = SyntheticWorld(seed=0, config=WorldConfig(num_train=args.synthetic_scenes))
        dataset, _ = build_fine_dataset(source, config=config, tokenizer=tokenizer, train=True,
                                        kind=kind, image_root=args.image_root,
                                        instances=args.instances, seed=args.seed, world=world)
        parts.append(dataset)
    dataset = parts[0] if len(parts) == 1 else ConcatWithEpoch(parts)
    sampler = T.ResumableBatchSampler(len(dataset), args.batch_size, rank=env.rank,
                                      world_size=env.world_size, seed=args.seed)
    loader = T.make_loader(dataset, sampler, collate_fn=FineCollator(config.size_divisibility),
                           num_workers=args.num_workers, device=env.device)
    return dataset, T.BatchStream(loader)


class ConcatWithEpoch(torch.utils.data.ConcatDataset):
    """ConcatDataset that passes set_epoch on to its parts (their augmentation needs it)."""

    def set_epoch(self, epoch):
        for d in self.datasets:
            d.set_epoch(epoch)


def build_optimizer(model, args):
    groups = model.parameter_groups(args.lr, lang_lr=args.lang_lr, weight_decay=args.weight_decay)
    for g in groups:
        g.pop("names")  # for reading only; the optimizer's state_dict stays plain
    optimizer = T.adamw(groups, lr=args.lr)
    milestones = [round(f * args.steps) for f in args.milestones]
    schedule = T.warmup_multistep(milestones, gamma=args.gamma, warmup_steps=args.warmup,
                                  warmup_factor=0.001)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


class ModelEma:
    """Exponential moving average of a model's state (the original's utils/ema.py).

    Floating tensors (parameters and buffers) follow ema = d * ema + (1 - d) * current after
    every optimizer step; integer buffers are copied.
    """

    def __init__(self, model, decay):
        self.decay = decay
        self.ema = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model):
        current = model.state_dict()
        for key, value in self.ema.state_dict().items():
            if value.is_floating_point():
                value.mul_(self.decay).add_(current[key].detach(), alpha=1 - self.decay)
            else:
                value.copy_(current[key])

    def state_dict(self):
        return self.ema.state_dict()

    def load_state_dict(self, state):
        self.ema.load_state_dict(state)


class DetectionObjective(nn.Module):
    """What DDP wraps: one call computes the detector's losses for a batch."""

    def __init__(self, detector, env):
        super().__init__()
        self.detector, self.env = detector, env

    def reduce_mean(self, t):
        # the original averages the positive counts over GPUs before normalising the losses
        if not self.env.distributed:
            return t
        t = t.detach().clone().to(self.env.device)
        dist.all_reduce(t)
        return t / self.env.world_size

    def forward(self, batch):
        return self.detector.loss(batch["images"], batch["image_sizes"], batch["text_ids"],
                                  batch["text_mask"], batch["targets"], self.reduce_mean)


def loss_fn(objective, batch):
    if "images" not in batch:  # every sample of this micro-batch was unreadable
        return {"loss": torch.zeros((), requires_grad=True)}
    return objective(batch)


def to_device(batch, device):
    moved = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
             for k, v in batch.items()}
    if "targets" in batch:
        moved["targets"] = [{k: v.to(device) for k, v in t.items()} for t in batch["targets"]]
    return moved


# ---------------------------------------------------------------------------------------------
# Checkpoints


@dataclass
class Run:
    """The mutable state of one training run (what a checkpoint holds)."""
    args: argparse.Namespace
    config: FiberDetectorConfig
    model: FiberDetector
    ema: ModelEma
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: object
    stream: T.BatchStream
    tokenizer: object
    step: int = 0
    first_losses: dict = None
    last_losses: dict = None


def checkpoint_state(run, env):
    return {**T.run_state(run, env), "ema": run.ema.state_dict() if run.ema else None,
            "format": "fiber-detector"}


def save(run, env, *, keep_copy):
    return T.save_run(run, env, checkpoint_state(run, env), keep_copy=keep_copy)


def maybe_resume(run, env):
    """Load --resume into the run (model, EMA, optimiser, data position, RNG)."""
    def restore_ema(state, _path):
        if run.ema is not None:
            run.ema.load_state_dict(state["ema"])
    return T.resume(run, env, ignore_args=RESUME_MAY_CHANGE, restore_own=restore_ema)


# ---------------------------------------------------------------------------------------------
# Evaluation and logging


def evaluate(run, env):
    """Held-out synthetic metrics (only when training on the synthetic world)."""
    args = run.args
    if args.no_eval or not env.is_main or args.data != ["synthetic"]:
        return {}
    model = run.ema.ema if (args.eval_ema and run.ema) else run.model
    was_training = model.training
    found = synthetic_metrics(model, run.tokenizer, num_scenes=args.eval_scenes,
                              device=env.device)
    model.train(was_training)
    return found


def format_metrics(m):
    return (f"AP50 {100 * m['AP50']:.1f} | AP {100 * m['AP']:.1f} | REC accuracy "
            f"{100 * m['REC_acc']:.1f} (chance {100 * m['REC_chance']:.1f}) | grounding R@1 "
            f"{100 * m['ground_R@1']:.1f}")


def format_losses(losses):
    short = {"loss": "loss", "loss_dot_product_token": "token", "loss_reg": "giou",
             "loss_centerness": "ctr"}
    return " ".join(f"{short[k]} {losses[k]:.3f}" for k in short if k in losses)


# ---------------------------------------------------------------------------------------------
# The loop


def train(args, env):
    """Run (or resume) one training run; returns a summary dict (rank 0 has the metrics)."""
    T.seed_everything(args.seed)  # same init on every rank (DDP also broadcasts it)
    config = model_config(args)
    model = FiberDetector(config)
    if args.init:
        init_weights(model, args.init)
    model.to(env.device)
    tokenizer = load_tokenizer()
    dataset, stream = build_data(args, config, env, tokenizer)
    optimizer, scheduler = build_optimizer(model, args)
    ema = ModelEma(model, args.ema) if args.ema > 0 else None
    run = Run(args, config, model, ema, optimizer, scheduler,
              T.make_grad_scaler(env.device, args.amp), stream, tokenizer)
    T.log(describe(run, env, len(dataset)))

    before = {}
    if not maybe_resume(run, env):
        if warm_up_from_scratch(model, args, config, env) and ema is not None:
            run.ema = ModelEma(model, args.ema)  # the average starts from the warmed-up Swin
        T.seed_everything(args.seed + env.rank)  # drop path and DropBlock differ across ranks
        before = evaluate(run, env)
        if before:
            T.log(f"before training (untrained head): {format_metrics(before)}")
    objective = DetectionObjective(model, env)
    wrapped = objective
    if env.distributed:
        wrapped = DistributedDataParallel(
            objective, device_ids=[env.local_rank] if env.device.type == "cuda" else None)
    model.train()
    summary = loop(run, env, wrapped)
    if env.distributed:
        same = T.ranks_agree(model, env)
        T.log(f"parameters bit-identical on all {env.world_size} ranks: {'yes' if same else 'NO'}")
    if summary["status"] == "done":
        summary.update(before=before, after=evaluate(run, env))
    return summary


def warm_up_from_scratch(model, args, config, env):
    """--image-warmup-steps on a fan-in Swin, at the test-time image size; True if it ran.
    Every rank computes the same weights (the warm-up draws from --seed only)."""
    return warm_up_unless_initialised(
        model.backbone.swin, steps=args.image_warmup_steps, initialised=bool(args.init),
        fan_in_first=True, image_size=config.min_size, batch_size=args.batch_size,
        seed=args.seed, device=env.device, log=T.log)


def loop(run, env, wrapped):
    def update_ema(run):
        if run.ema is not None:
            run.ema.update(run.model)
    return T.train_loop(run, env, wrapped, steps=run.args.steps, loss_fn=loss_fn,
                        to_device=to_device, save=save, after_step=after_step,
                        format_losses=format_losses, script="train_fine.py",
                        after_update=update_ema)


def after_step(run, env, window, meter):
    """Periodic logging, checkpointing and evaluation (same steps on every rank)."""
    args = run.args
    if run.step % args.log_every == 0 or run.step == args.steps:
        losses = T.read_losses(run, env, window)
        sps, sec = meter.read()
        lr = run.optimizer.param_groups[0]["lr"]
        T.log(f"step {run.step}/{args.steps} | {format_losses(losses)} | "
              f"pos {losses.get('num_pos', 0):.0f} | lr {lr:.2e} | {sps:.1f} img/s | "
              f"{sec:.2f} s/step | peak mem {T.peak_memory_mb(env.device):.0f} MB")
    if args.save_every and run.step % args.save_every == 0 and run.step < args.steps:
        path = save(run, env, keep_copy=True)
        T.log(f"step {run.step}: checkpoint {path}")
    if args.eval_every and run.step % args.eval_every == 0 and run.step < args.steps:
        found = evaluate(run, env)
        if found:
            T.log(f"step {run.step}: {format_metrics(found)}")


def describe(run, env, num_samples):
    args = run.args
    n_params = sum(p.numel() for p in run.model.parameters())
    global_batch = args.batch_size * args.accum_steps * env.world_size
    cfg = run.config
    return (f"model {args.config} {cfg.version} ({n_params / 1e6:.1f}M parameters, shorter "
            f"side {cfg.train_min_sizes} train / {cfg.min_size} test) | data "
            f"{', '.join(args.data)}: {num_samples} samples | {args.steps} steps of "
            f"{global_batch} ({args.batch_size} x {args.accum_steps} accum x {env.world_size} "
            f"ranks) | lr {args.lr:g} (text {args.lang_lr or args.lr:g}) | ema {args.ema:g} | "
            f"amp {args.amp} | {env.device} | out {args.out}")


def report(summary, seconds):
    """The end-of-run lines: losses first vs last, held-out metrics, the checkpoint."""
    T.log(f"finished {summary['step']} steps in {seconds / 60:.1f} min")
    first, last = summary.get("first"), summary.get("last")
    if first and last:
        for k in ("loss", *LOSS_NAMES):
            if k in first and k in last:
                T.log(f"  {k:23s} {first[k]:.3f} -> {last[k]:.3f} (first / last logging window)")
    if summary.get("after"):
        T.log(f"  held-out synthetic, untrained: {format_metrics(summary['before'])}")
        T.log(f"  held-out synthetic, trained:   {format_metrics(summary['after'])}")
    T.log(f"  skipped: {summary['skipped_samples']} unreadable samples, "
          f"{summary['skipped_steps']} non-finite steps, {summary['overflow_steps']} fp16 "
          "overflow steps")
    T.log(f"checkpoint: {summary['checkpoint']}")


def main(argv=None):
    args = parse_args(argv)
    # tiny gradients and optimiser moments decay into subnormal floats, which CPUs process
    # ~100x slower: a step grew from 7 to 35 CPU-seconds within five steps without this
    torch.set_flush_denormal(True)
    return T.run_main(args, train, report, errors=(AnnotationError,))


if __name__ == "__main__":
    sys.exit(main())
