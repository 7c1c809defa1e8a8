"""Coarse-stage training of FIBER: image-text pre-training with ITC + ITM + MLM.

    python train_coarse.py                    # tiny model on the embedded synthetic world:
                                              # ~10 min on 2 CPU cores, then retrieval R@1/R@5
    python train_coarse.py --resume auto      # continue the run saved in --out
    torchrun --nproc_per_node 8 train_coarse.py --config base --data coco_train.json \\
        --image-root /data/coco --batch-size 32 --accum-steps 16 --amp bf16

A plain loop: training.train_loop (accumulation, mixed precision, NaN and bad-data guards,
graceful stop) over pieces that live in training.py, distributed.py and resume.py. What is
FIBER's is here: the model, the objective, the data, the evaluation. A stopped run resumes
bit-exactly: see resume.py for what that takes.

Tasks: `--task pretrain` is the coarse pre-training of the paper. A task is an entry of TASKS
(the heads it needs, its objective, its data, its evaluation), so fine-tuning tasks (VQA,
NLVR2, retrieval, captioning) plug into the same loop.
"""
import argparse
import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.nn.parallel import DistributedDataParallel

import releases
import training as T
from data import AnnotationError, PretrainCollator, build_pretrain_dataset, load_tokenizer
from heads import PretrainObjective
from loading import detect_kind, load_strict
from metrics import retrieval_recall
from model import Fiber, FiberConfig
from scratch import fan_in_init, warm_up_unless_initialised
from tasks import TASK_HEADS, build_task, save_task_files
from tasks import TASKS as FINETUNE_TASKS
from task_datasets import vqa_vocab_for

# Defaults that depend on the model size; every one can be overridden by its flag.
PRESETS = {
    # From scratch on the synthetic world: ~10 min on 2 CPU cores. No ITC queue: FIBER's queue
    # holds features of earlier weights (there is no momentum encoder), and from scratch the
    # weights move so fast that the cheapest way to beat those stale negatives is to push
    # every new feature the same way; with a 64-entry queue ITC collapsed (all features
    # equal, loss ln(80)) within 200 steps at every lr tried, without it it learns.
    # Its towers start from fan-in initialisation and a short image warm-up (scratch.py), the
    # stand-ins for the pre-trained Swin and RoBERTa that FIBER starts from.
    "tiny": dict(image_size=64, batch_size=16, steps=600, lr=3e-4, queue_size=0,
                 save_every=200, log_every=20, scratch_init="fan_in", image_warmup_steps=300),
    # The paper's pre-training: lr 1e-5, 100k steps of 4096 samples (e.g. 8 GPUs x 32 x 16).
    "base": dict(image_size=384, batch_size=32, steps=100_000, lr=1e-5, queue_size=4096,
                 save_every=2000, log_every=50, scratch_init="original",
                 image_warmup_steps=0),
}
# Flags that may change when a run is resumed; any other difference is refused.
RESUME_MAY_CHANGE = {"out", "resume", "init", "num_workers", "save_every", "eval_every", "no_eval",
                     "log_every", "dist_timeout", "max_skip_fraction", "max_nonfinite_steps",
                     "grad_checkpointing", "compact_heap"}


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser():
    p = argparse.ArgumentParser(
        description="Train coarse FIBER: pre-training (ITC + ITM with hard negatives + MLM) "
                    "or fine-tuning on VQA, NLVR2, retrieval (irtr) or captioning.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = p.add_argument
    add("--task", default="pretrain", choices=sorted(TASKS), help="what to train")
    add("--config", default="tiny", choices=sorted(PRESETS),
        help="model size: tiny (CPU, a few million parameters) or base (FIBER-B, Swin-B + "
             "RoBERTa-base); also picks the defaults of the flags marked 'preset'")
    add("--image-size", type=int, help="image side in pixels (preset: tiny 64, base 384)")
    add("--data", default="synthetic",
        help="'synthetic' (the embedded shapes world), a COCO-captions .json or a .jsonl file "
             "of {image, caption} lines")
    add("--image-root", help="folder the image paths in --data are relative to")
    add("--allow-outside-root", action="store_true",
        help="accept image paths that leave --image-root (absolute or through ..)")
    add("--eval-data", help="evaluation data of a fine-tuning task, in --data's format "
        "(default: the synthetic validation split, or --data itself for files)")
    add("--eval-limit", type=int, help="evaluate on at most this many items")
    add("--max-text-len", type=int, default=40, help="caption length in tokens (<s>, </s) incl.)")
    add("--batch-size", type=int, help="micro-batch per rank (preset: tiny 16, base 32)")
    add("--accum-steps", type=int, default=1,
        help="micro-batches accumulated per optimizer step; the effective batch is "
             "batch-size x accum-steps x ranks")
    add("--steps", type=int, help="optimizer steps (preset: tiny 600, base 100000)")
    add("--epochs", type=float, help="train for this many epochs instead of --steps")
    add("--lr", type=float, help="base learning rate (preset: tiny 3e-4, base 1e-5)")
    add("--lr-mult-head", type=float, default=5.0, help="lr multiplier of the task heads")
    add("--lr-mult-cross", type=float, default=5.0,
        help="lr multiplier of the cross-modal parameters (fusion, cross_modal_*)")
    add("--weight-decay", type=float, default=0.01, help="AdamW weight decay (not on norms/biases)")
    add("--warmup", type=float, default=0.1,
        help="linear warm-up: a fraction of the steps if < 1, else a number of steps")
    add("--amp", default="none", choices=sorted(T.AMP_DTYPES),
        help="mixed precision: bf16 (no scaling needed), fp16 (with a gradient scaler) or none")
    add("--grad-clip", type=float, default=0.0, help="clip the gradient norm to this; 0 = off")
    add("--grad-checkpointing", action="store_true",
        help="recompute each backbone block in the backward pass: far less activation memory, "
             "about 20%% more compute")
    add("--queue-size", type=int, help="ITC queue length, 0 for none (preset: tiny 0, base 4096)")
    add("--num-workers", type=int, default=0, help="DataLoader worker processes per rank")
    add("--seed", type=int, default=0, help="seed of the model init, data order and masking")
    add("--out", default="runs/coarse", help="folder for checkpoints (last.pt, step_*.pt)")
    add("--save-every", type=int, help="checkpoint every N steps (preset: tiny 200, base 2000)")
    add("--resume", help="'auto' (out/last.pt when it exists) or a checkpoint path")
    add("--scratch-init", choices=("original", "fan_in"),
        help="how the linear weights of the towers and cross-modal maps are drawn: as the "
             "original (normal(0, 0.02), made for loading pre-trained backbones) or "
             "normal(0, 1/sqrt(fan_in)), which a small model trained from nothing needs to "
             "learn ITC at all (preset: tiny fan_in, base original); --init overwrites them")
    add("--image-warmup-steps", type=int,
        help="before training from scratch, train the Swin this many steps to classify "
             "synthetic scenes (colours, shapes, sizes, background, count): the tiny preset's "
             "stand-in for ImageNet pre-training, without which alignment stalls; skipped with "
             "--init and on resume (preset: tiny 300, base 0)")
    add("--init", nargs="+", metavar="PATH",
        help="start from weights: a FIBER checkpoint (original key names, e.g. a released "
             ".ckpt, or one of this project's: an export or a run's last.pt), or Swin and/or "
             "RoBERTa releases to initialise the backbones; ignored when resuming")
    add("--eval-every", type=int, default=0,
        help="held-out retrieval evaluation every N steps (0: only before and after training)")
    add("--no-eval", action="store_true", help="skip every evaluation (quick runs, tests)")
    add("--log-every", type=int, help="log a line every N steps (preset: tiny 20, base 50)")
    T.add_guard_flags(p)
    T.add_compact_heap_flag(p)
    return p


def parse_args(argv=None):
    parser = build_parser()
    return resolve_presets(parser.parse_args(argv), parser)


def resolve_presets(args, parser):
    """Fill the flags left unset from the --config preset and check the combination."""
    for name, value in PRESETS[args.config].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.epochs is not None:
        args.steps = None  # --epochs wins; the step count follows from the data size
    if args.accum_steps < 1 or args.batch_size < 1:
        parser.error("--batch-size and --accum-steps must be >= 1")
    if args.task == "pretrain" and args.data != "synthetic" and not Path(args.data).is_file():
        parser.error(f"--data {args.data}: no such file (or use 'synthetic')")
    return args


# ---------------------------------------------------------------------------------------------
# Tasks


@dataclass
class Task:
    heads: tuple  # model heads the task trains
    objective: Callable  # (model, args) -> module whose forward(batch, load_images) -> losses
    loss_names: tuple  # losses logged besides the total
    evaluate: Callable  # (model, args, tokenizer, env) -> dict of metrics (or empty)


def pretrain_objective(model, args):
    return PretrainObjective(model, queue_size=args.queue_size)


def synthetic_retrieval_set(args, n=100):
    """n held-out (validation) scenes with distinct captions, one each: images (n,3,S,S) and
    captions. Distinct, so that text j belongs to image j alone and chance R@1 is 1/n."""
    val = build_pretrain_dataset("synthetic", split="val", image_size=args.image_size,
                                 train=False, seed=args.seed, skip_bad=False)
    picked, scenes, captions = [], set(), set()
    for i, pair in enumerate(val.pairs):
        if pair.image not in scenes and pair.caption not in captions and len(picked) < n:
            scenes.add(pair.image)
            captions.add(pair.caption)
            picked.append(i)
    return val.load_images(picked), [val.pairs[i].caption for i in picked]


@torch.no_grad()
def evaluate_pretrain(model, args, tokenizer, env):
    """ITC retrieval R@1/R@5 (%) on 100 held-out synthetic scenes (chance R@1 = 1%)."""
    if args.data != "synthetic" or args.no_eval or not env.is_main:
        return {}
    images, captions = synthetic_retrieval_set(args)
    ids, mask = tokenizer.encode(captions, args.max_text_len)
    was_training = model.training
    model.eval()
    dev = env.device
    img = torch.cat([model.encode_image(x.to(dev)) for x in images.split(50)])  # (N, D)
    txt = torch.cat([model.encode_text(i.to(dev), m.to(dev))
                     for i, m in zip(ids.split(50), mask.split(50))])  # (N, D)
    model.train(was_training)
    sim = (img @ txt.t()).float().cpu()  # (N images, N texts)
    if sim.max() - sim.min() < 1e-4:
        # metrics.retrieval_recall counts ties in favour of the right answer
        T.warn("the ITC features have collapsed (all similarities equal): the retrieval "
               "numbers below mean nothing")
    recall = retrieval_recall(sim, torch.arange(len(captions)), ks=(1, 5))
    return {k.replace("_r", "_R@"): 100 * v for k, v in recall.items()}


TASKS = {
    "pretrain": Task(heads=("itc", "itm", "mlm"), objective=pretrain_objective,
                     loss_names=("itc_loss", "itm_loss", "mlm_loss"),
                     evaluate=evaluate_pretrain),
}
# Fine-tuning tasks: tasks.build_task supplies each one's objective, data and evaluation; the
# loop below treats them like pre-training. Their DDP wrapper must allow unused parameters
# (VQA never runs the ITC maps, captioning never runs the Swin cross-attention).
FINETUNE_LOSSES = {"vqa": ("vqa_score",), "nlvr2": ("nlvr2_acc",),
                   "irtr": ("itc_loss", "itm_loss"), "caption": ()}
for _name in FINETUNE_TASKS:
    TASKS[_name] = Task(heads=TASK_HEADS[_name], objective=None,
                        loss_names=FINETUNE_LOSSES.get(_name, ()), evaluate=None)


def finetune_parts(model, args, tokenizer):
    """Objective, datasets, collator and evaluation of a fine-tuning task (tasks.py)."""
    eval_data = args.eval_data or args.data
    return build_task(args.task, model, tokenizer=tokenizer, train_data=args.data,
                      eval_data=eval_data, image_root=args.image_root,
                      image_size=args.image_size, max_text_len=args.max_text_len,
                      seed=args.seed)


def finetune_evaluate(parts, args):
    def evaluate(model, _args, _tokenizer, env):
        if args.no_eval or not env.is_main:
            return {}
        return parts.evaluate(model, device=env.device, out_dir=args.out,
                              limit=args.eval_limit, progress=False)
    return evaluate


# ---------------------------------------------------------------------------------------------
# Building blocks of a run


def build_model(args):
    make = FiberConfig.tiny if args.config == "tiny" else FiberConfig.base
    extra = {}
    if args.task == "vqa":  # the classifier has one output per answer of the vocabulary
        extra["vqa_answers"] = len(vqa_vocab_for(args.data))
    config = make(image_size=args.image_size, max_text_len=args.max_text_len,
                  heads=TASKS[args.task].heads, **extra)
    config.swin.grad_checkpointing = config.text.grad_checkpointing = args.grad_checkpointing
    model = Fiber(config)
    if args.scratch_init == "fan_in":
        scratch_init(model)
    if args.init:
        init_weights(model, args.init)
    return model, config


def scratch_init(model):
    """--scratch-init fan_in (see scratch.py): both towers with their cross-attention, and the
    cross-modal maps and poolers; the task heads keep their own initialisation."""
    fan_in_init(model.backbone, *(module for name, module in model.named_children()
                                  if name.startswith("cross_modal_")))


def init_weights(model, sources):
    """--init: weights from files (or release names), each applied by what it holds.

    FIBER checkpoints under the original names (`vit_model.*`, ...) and this project's own
    (`backbone.*`: exports, a run's last.pt) load strictly; a Swin or RoBERTa release only
    fills its backbone (new pre-training starts so, as in the paper).
    """
    for source in sources:
        state = releases.load_weights(source)  # safe unpickling, .ckpt/.pth/safetensors
        kind = detect_kind(state.tensors)
        if kind == "fiber":
            model.load_original_state_dict(state.tensors, source=str(source))
        elif kind == "fiber-export":
            load_strict(model, state.tensors, str(source), kind)
        elif kind in ("swin", "roberta"):
            model.load_backbones(**{f"{kind}_state": state.tensors}, source=str(source))
        else:
            raise ValueError(f"--init {source}: not a coarse FIBER, Swin or RoBERTa checkpoint "
                             f"(its keys look like: {kind})")
        T.log(f"initialised the model from {source} ({kind})")


def build_data(args, env, tokenizer, dataset=None, collate=None):
    """The training set and an endless, resumable stream of its micro-batches (pre-training
    data unless a fine-tuning task passes its own dataset and collator)."""
    if dataset is None:
        # An unreadable sample is replaced by a stand-in (drawn from seed, epoch and index and
        # counted as skipped): every micro-batch keeps its size, which DDP's gathers need.
        dataset = build_pretrain_dataset(args.data, split="train", image_size=args.image_size,
                                         train=True, seed=args.seed, image_root=args.image_root,
                                         allow_outside_root=args.allow_outside_root,
                                         replace_bad=True)
        collate = PretrainCollator(tokenizer, max_len=args.max_text_len, seed=args.seed)
    sampler = T.ResumableBatchSampler(len(dataset), args.batch_size, rank=env.rank,
                                      world_size=env.world_size, seed=args.seed)
    loader = T.make_loader(dataset, sampler, collate_fn=collate, num_workers=args.num_workers,
                           device=env.device)
    return dataset, T.BatchStream(loader)


def total_steps(args, stream):
    if args.steps is not None:
        return args.steps
    per_epoch = stream.sampler.batches_per_epoch() // args.accum_steps
    return max(1, math.ceil(args.epochs * per_epoch))


def build_optimizer(model, args, steps):
    groups = model.parameter_groups(args.lr, weight_decay=args.weight_decay,
                                    lr_mult_head=args.lr_mult_head,
                                    lr_mult_cross=args.lr_mult_cross)
    for g in groups:
        g.pop("names", None)  # names are for reading, not for the optimizer's state_dict
    optimizer = T.adamw(groups, lr=args.lr, betas=(0.9, 0.98), eps=1e-8)
    warmup = T.warmup_steps_from(args.warmup, steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, T.linear_warmup_decay(steps, warmup))
    return optimizer, scheduler


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------
# Checkpoints: everything a bit-exact resume needs


@dataclass
class Run:
    """The mutable state of one training run (what a checkpoint holds)."""
    args: argparse.Namespace
    config: FiberConfig
    model: torch.nn.Module
    objective: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: object
    stream: T.BatchStream
    tokenizer: object
    step: int = 0
    first_losses: dict = None  # mean losses of the first logging window, for the summary
    last_losses: dict = None  # ... and of the latest one


def objective_buffers(objective):
    """The objective's own state (the ITC queue), without the model it wraps."""
    return {k: v for k, v in objective.state_dict().items() if not k.startswith("model.")}


def load_objective_buffers(objective, buffers, path):
    missing, unexpected = objective.load_state_dict(buffers, strict=False)
    missing = [k for k in missing if not k.startswith("model.")]  # the model is loaded apart
    if missing or unexpected:
        raise T.CheckpointError(f"{path}: objective state does not fit this task: missing "
                                f"{missing}, unexpected {unexpected}")


def checkpoint_state(run, env):
    return {**T.run_state(run, env), "objective": objective_buffers(run.objective),
            "task": run.args.task}


def save(run, env, *, keep_copy):
    return T.save_run(run, env, checkpoint_state(run, env), keep_copy=keep_copy)


def maybe_resume(run, env):
    """Load --resume into the run (model, optimiser, data position, RNG, ITC queue)."""
    def restore_queue(state, path):
        load_objective_buffers(run.objective, state["objective"], path)
    return T.resume(run, env, ignore_args=RESUME_MAY_CHANGE, restore_own=restore_queue)


# ---------------------------------------------------------------------------------------------
# The loop


def make_loss_fn(load_images):
    """The objective's call for train_step; a micro-batch with no readable sample adds 0."""
    def loss_fn(objective, batch):
        if "images" not in batch:
            return {"loss": torch.zeros((), requires_grad=True)}
        return objective(batch, load_images)
    return loss_fn


def format_losses(losses, names):
    return " ".join(f"{k.replace('_loss', '')} {losses[k]:.3f}" for k in ("loss", *names)
                    if k in losses)


def train(args, env):
    """Run (or resume) one training run; returns a summary dict (rank 0 has the metrics)."""
    task = TASKS[args.task]
    T.seed_everything(args.seed)  # same init on every rank (DDP also broadcasts it)
    model, config = build_model(args)
    model.to(env.device)
    tokenizer = load_tokenizer()
    if task.objective is None:  # a fine-tuning task
        parts = finetune_parts(model, args, tokenizer)
        task = dataclasses.replace(task, evaluate=finetune_evaluate(parts, args))
        objective = parts.objective.to(env.device)
        dataset, stream = build_data(args, env, tokenizer, parts.train_dataset, parts.collate)
        save_task_files(parts.objective, args.out)
    else:
        objective = task.objective(model, args).to(env.device)
        dataset, stream = build_data(args, env, tokenizer)
    steps = total_steps(args, stream)
    optimizer, scheduler = build_optimizer(model, args, steps)
    run = Run(args, config, model, objective, optimizer, scheduler,
              T.make_grad_scaler(env.device, args.amp), stream, tokenizer)
    T.log(describe(run, env, len(dataset), steps))

    before = {}
    if not maybe_resume(run, env):
        warm_up_from_scratch(model, args, env)
        T.seed_everything(args.seed + env.rank)  # dropout and negatives differ across ranks
        before = task.evaluate(model, args, tokenizer, env)
        if before:
            T.log(f"before training: {format_metrics(before)}")
    wrapped = objective
    if env.distributed:
        # The queue buffers are identical on every rank (they are filled with gathered
        # features), so they need no broadcast.
        wrapped = DistributedDataParallel(
            objective, device_ids=[env.local_rank] if env.device.type == "cuda" else None,
            broadcast_buffers=False, find_unused_parameters=args.task != "pretrain")
    objective.train()
    summary = loop(run, env, wrapped, task, steps, dataset)
    if env.distributed:
        same = T.ranks_agree(model, env)
        T.log(f"parameters bit-identical on all {env.world_size} ranks: {'yes' if same else 'NO'}")
    if summary["status"] == "done":
        after = task.evaluate(model, args, tokenizer, env)
        summary.update(before=before, after=after, task=args.task)
    return summary


def warm_up_from_scratch(model, args, env):
    """--image-warmup-steps: the Swin learns to see the synthetic scenes before alignment.
    Every rank computes the same weights (the warm-up draws from --seed only)."""
    warm_up_unless_initialised(model.backbone.swin, steps=args.image_warmup_steps,
                               initialised=bool(args.init), image_size=args.image_size,
                               batch_size=args.batch_size, seed=args.seed, device=env.device,
                               log=T.log)


def loop(run, env, wrapped, task, steps, dataset):
    loss_fn = make_loss_fn(getattr(dataset, "load_images", None))
    return T.train_loop(
        run, env, wrapped, steps=steps, loss_fn=loss_fn, to_device=to_device, save=save,
        script="train_coarse.py",
        after_step=lambda r, e, window, meter: after_step(r, e, task, window, meter, steps),
        format_losses=lambda losses: format_losses(losses, task.loss_names))


def after_step(run, env, task, window, meter, steps):
    """Periodic logging, checkpointing and evaluation (same steps on every rank)."""
    args = run.args
    if run.step % args.log_every == 0 or run.step == steps:
        losses = T.read_losses(run, env, window)
        sps, sec = meter.read()
        lr = run.optimizer.param_groups[0]["lr"]
        T.log(f"step {run.step}/{steps} | {format_losses(losses, task.loss_names)} | "
              f"lr {lr:.2e} | {sps:.1f} samples/s | {sec:.2f} s/step | "
              f"peak mem {T.peak_memory_mb(env.device):.0f} MB")
    if args.save_every and run.step % args.save_every == 0 and run.step < steps:
        path = save(run, env, keep_copy=True)
        T.log(f"step {run.step}: checkpoint {path}")
    if args.eval_every and run.step % args.eval_every == 0:
        metrics = task.evaluate(run.model, args, run.tokenizer, env)
        if metrics:
            T.log(f"step {run.step}: {format_metrics(metrics)}")


def describe(run, env, num_samples, steps):
    args = run.args
    n_params = sum(p.numel() for p in run.model.parameters())
    global_batch = args.batch_size * args.accum_steps * env.world_size
    return (f"task {args.task} | model {args.config} ({n_params / 1e6:.1f}M parameters, "
            f"{args.image_size}px) | data {args.data}: {num_samples} samples | {steps} steps "
            f"of {global_batch} ({args.batch_size} x {args.accum_steps} accum x "
            f"{env.world_size} ranks) | lr {args.lr:g} | amp {args.amp} | {env.device} | "
            f"out {args.out}")


def format_metrics(metrics):
    return " ".join(f"{k} {v:.1f}" for k, v in metrics.items())


def report(summary, task, seconds):
    """The end-of-run lines: losses first vs last, retrieval, where the checkpoint went."""
    T.log(f"finished {summary['step']} steps in {seconds / 60:.1f} min")
    first, last = summary.get("first"), summary.get("last")
    if first and last:
        for k in ("loss", *task.loss_names):
            if k in first and k in last:
                T.log(f"  {k:9s} {first[k]:.3f} -> {last[k]:.3f} (mean of the first / last "
                      f"logging window)")
    if summary.get("after"):
        what = ("retrieval on 100 held-out synthetic scenes (chance R@1 = 1%)"
                if summary.get("task", "pretrain") == "pretrain" else "held-out evaluation")
        T.log(f"  {what}: before {format_metrics(summary['before'])} | after "
              f"{format_metrics(summary['after'])}")
    T.log(f"  skipped: {summary['skipped_samples']} unreadable samples, "
          f"{summary['skipped_steps']} non-finite steps, {summary['overflow_steps']} fp16 "
          "overflow steps")
    T.log(f"checkpoint: {summary['checkpoint']}")


def main(argv=None):
    args = parse_args(argv)
    return T.run_main(args, train, lambda summary, seconds: report(summary, TASKS[args.task],
                                                                    seconds),
                      errors=(AnnotationError,))


if __name__ == "__main__":
    sys.exit(main())
