"""The plain PyTorch training loop that train_coarse.py and train_fine.py share, and its parts.

Nothing here knows about FIBER: a resumable sampler and data stream, learning-rate schedules,
mixed precision, one optimisation step with gradient accumulation, guards against diverging
runs and unreadable data, graceful stop on SIGINT/SIGTERM, throughput/memory meters, and the
loop itself (`train_loop`) with the `run_main` wrapper that turns failures into messages.
Distributed set-up is distributed.py and exact-resume state is resume.py; their functions are
re-exported here, so a script reaches the whole toolbox as `training.<name>`.

Exact resume contract: a run stopped after step k and resumed from its checkpoint reaches the
same parameters, bit for bit, as a run that never stopped. That holds because
  - the sample order is a pure function of (seed, epoch) and can start at any batch offset,
  - data-side randomness (augmentation, MLM masking) is derived from (seed, epoch, index) by
    the datasets, so the number of loader workers does not matter,
  - every global RNG (python, numpy, torch CPU/CUDA) of every rank is saved and restored, and
  - the DataLoader draws its worker seeds from a private generator, not the global one.
"""
import ctypes
import math
import resource
import signal
import sys
import time
import warnings
from bisect import bisect_right
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from tqdm import tqdm

from distributed import (DistEnv, all_reduce_mean, any_rank, cleanup_distributed,  # noqa: F401
                         explain_dist_failure, is_dist_failure, is_main_process, log,
                         ranks_agree, setup_distributed, warn)
from resume import (TRAINING_KEYS, CheckpointError, capture_rng_state,  # noqa: F401
                    check_resume_compatible, checkpoint_paths, config_differences,
                    gather_rng_states, load_checkpoint, restore_rank_rng_state,
                    restore_rng_state, restore_run, resume, resume_path, run_state,
                    save_checkpoint, save_run, save_training_checkpoint, seed_everything)


# ---------------------------------------------------------------------------------------------
# Sample order and data position


class ResumableBatchSampler(torch.utils.data.Sampler):
    """Micro-batches of dataset indices for one rank, a pure function of (seed, epoch).

    Each epoch is one permutation of the dataset. Global micro-batch j is the slice
    perm[j*W*b:(j+1)*W*b] (W ranks, micro-batch b) and rank r takes its r-th b-sized part, so
    the samples of an optimisation step do not depend on how they are split over ranks and
    accumulation steps. The tail that does not fill a global micro-batch is dropped, so every
    rank runs the same number of steps (DDP needs that). `set_epoch(epoch, start_batch)` starts
    mid-epoch, which is what an exact resume needs.
    """

    def __init__(self, num_samples, batch_size, *, rank=0, world_size=1, seed=0, shuffle=True):
        global_batch = batch_size * world_size
        if num_samples < global_batch:
            raise ValueError(
                f"the dataset has {num_samples} samples, fewer than one global micro-batch "
                f"({batch_size} per rank x {world_size} ranks): lower --batch-size"
            )
        self.num_samples, self.batch_size = num_samples, batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.start_batch = 0, 0

    def batches_per_epoch(self):
        return self.num_samples // (self.batch_size * self.world_size)

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self):
        return self.batches_per_epoch() - self.start_batch

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        global_batch = self.batch_size * self.world_size
        for j in range(self.start_batch, self.batches_per_epoch()):
            first = j * global_batch + self.rank * self.batch_size
            yield order[first:first + self.batch_size]


def _ignore_sigint(_worker_id):
    # Ctrl-C reaches the whole process group; the main process handles it (finishing the step
    # and checkpointing), so loader workers must not die underneath it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(dataset, sampler, *, collate_fn=None, num_workers=0, device=None):
    """A DataLoader over `sampler` that never touches the global RNG.

    The DataLoader draws a base seed for its workers each time an iterator is created; with its
    own generator that draw no longer shifts the global torch RNG, which keeps dropout and
    hard-negative sampling identical between a resumed and an uninterrupted run.
    """
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_fn,
        num_workers=num_workers,
        pin_memory=device is not None and device.type == "cuda",
        worker_init_fn=_ignore_sigint if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(sampler.seed),
    )


class BatchStream:
    """An endless stream of micro-batches across epochs that knows where it is.

    `state_dict()` is the data position (epoch, micro-batches consumed in that epoch); after
    `load_state_dict` the stream continues with exactly the batch that would have come next.
    Datasets with a `set_epoch(epoch)` method are told the epoch (their augmentation and
    masking depend on it).
    """

    def __init__(self, loader):
        self.loader, self.sampler = loader, loader.batch_sampler
        self.epoch, self.batch_in_epoch = 0, 0
        self._it = None

    def __iter__(self):
        return self

    def __next__(self):
        if self._it is None:
            self._start_epoch()
        try:
            batch = next(self._it)
        except StopIteration:
            self.epoch, self.batch_in_epoch, self._it = self.epoch + 1, 0, None
            return next(self)
        self.batch_in_epoch += 1
        return batch

    def _start_epoch(self):
        self.sampler.set_epoch(self.epoch, self.batch_in_epoch)
        if hasattr(self.loader.dataset, "set_epoch"):
            self.loader.dataset.set_epoch(self.epoch)
        self._it = iter(self.loader)

    def state_dict(self):
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def load_state_dict(self, state):
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])
        self._it = None


# ---------------------------------------------------------------------------------------------
# Learning-rate schedules (multipliers of each group's base lr, for torch's LambdaLR)


def warmup_steps_from(warmup, total_steps):
    """--warmup below 1 is a fraction of the total steps (as the original), else a count."""
    return int(total_steps * warmup) if warmup < 1 else int(warmup)


def linear_warmup_decay(total_steps, warmup_steps):
    """Linear warm-up from 0 to 1 over `warmup_steps`, then linear decay to 0 at `total_steps`.

    The multiplier for step s (optimizer steps done so far) is s/warmup during warm-up and
    (total - s)/(total - warmup) after it. As in the original coarse-stage schedule, the very
    first step (s = 0) therefore runs with lr 0 when there is a warm-up.
    """
    def multiplier(step):
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        if step >= total_steps:
            return 0.0
        return (total_steps - step) / max(1, total_steps - warmup_steps)
    return multiplier


def warmup_multistep(milestones, *, gamma=0.1, warmup_steps=500, warmup_factor=0.001):
    """Fine-stage schedule: linear warm-up from `warmup_factor` to 1, then x`gamma` at each
    milestone (step counts, increasing)."""
    milestones = list(milestones)
    if milestones != sorted(milestones):
        raise ValueError(f"LR milestones must increase, got {milestones}")

    def multiplier(step):
        warm = 1.0
        if step < warmup_steps:
            alpha = step / warmup_steps
            warm = warmup_factor * (1 - alpha) + alpha
        return warm * gamma ** bisect_right(milestones, step)
    return multiplier


# ---------------------------------------------------------------------------------------------
# Mixed precision and one optimisation step


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


def autocast(device, amp):
    """The autocast context for --amp on `device` (a no-op for 'none')."""
    if AMP_DTYPES[amp] is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])


def adamw(groups, **options):
    """torch's fused AdamW (one kernel for all parameters: faster, and fewer temporaries than
    the default for-each version) where this build supports it, else the default one."""
    try:
        return torch.optim.AdamW(groups, fused=True, **options)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, **options)


def make_grad_scaler(device, amp):
    """A GradScaler, enabled only for fp16 (bf16 has fp32's range and needs no scaling)."""
    return torch.amp.GradScaler(device.type, enabled=amp == "fp16")


@dataclass
class StepResult:
    losses: dict             # mean over the micro-batches of this rank, as floats
    nonfinite: bool = False  # a NaN/inf loss on some rank, or gradient: the update was dropped
    overflow: bool = False   # fp16 gradients overflowed: the scaler dropped the update
    grad_norm: float = math.nan


def train_step(model, micro_batches, loss_fn, *, optimizer, scheduler, scaler, env,
               amp="none", grad_clip=0.0):
    """One optimizer step over `micro_batches` (gradient accumulation), on every rank.

    `loss_fn(model, batch)` returns a dict of scalar losses with the total under "loss". Each
    micro-batch's loss is divided by the number of micro-batches, so accumulating k batches
    of size b gives the gradient of one batch of size k*b (for per-sample-mean losses). DDP
    only all-reduces gradients on the last micro-batch (`no_sync` before it). A NaN/inf loss
    on any rank drops the whole update on every rank; the schedule still advances, so step
    numbers keep matching the data consumed.
    """
    optimizer.zero_grad(set_to_none=True)
    n = len(micro_batches)
    sums, finite = {}, True
    for i, batch in enumerate(micro_batches):
        sync_now = i == n - 1 or not hasattr(model, "no_sync")
        with (nullcontext() if sync_now else model.no_sync()), autocast(env.device, amp):
            out = loss_fn(model, batch)
        scaler.scale(out["loss"].float() / n).backward()
        for k, v in out.items():
            if torch.is_tensor(v) and v.numel() == 1:
                sums[k] = sums.get(k, 0.0) + v.detach().float().item() / n
        finite = finite and math.isfinite(sums["loss"])
    (nonfinite,) = any_rank([not finite], env)
    if nonfinite:
        optimizer.zero_grad(set_to_none=True)
        _step_scheduler(scheduler)
        return StepResult(sums, nonfinite=True)
    return _apply_update(model, sums, optimizer, scheduler, scaler, grad_clip)


def _apply_update(model, sums, optimizer, scheduler, scaler, grad_clip):
    scaler.unscale_(optimizer)  # clip and check the true gradients, not the fp16-scaled ones
    params = [p for g in optimizer.param_groups for p in g["params"]]
    # max_norm=inf only measures. The norm is taken after DDP's all-reduce, so every rank
    # sees the same value and makes the same decision.
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or math.inf).item()
    if not math.isfinite(grad_norm) and not scaler.is_enabled():
        # A finite loss can still have an inf/NaN gradient (e.g. a bf16 overflow in the
        # backward pass); one such update would turn every weight into NaN. Drop it, as the
        # fp16 scaler does for its own overflows.
        optimizer.zero_grad(set_to_none=True)
        _step_scheduler(scheduler)
        return StepResult(sums, nonfinite=True, grad_norm=grad_norm)
    scale_before = scaler.get_scale() if scaler.is_enabled() else 1.0
    scaler.step(optimizer)
    scaler.update()
    overflow = scaler.is_enabled() and scaler.get_scale() < scale_before
    _step_scheduler(scheduler)
    return StepResult(sums, overflow=overflow, grad_norm=grad_norm)


def _step_scheduler(scheduler):
    with warnings.catch_warnings():
        # When the scaler or the NaN guard drops the very first update, torch warns that the
        # scheduler stepped before the optimizer; that order is intended here.
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
        scheduler.step()


class DivergenceError(RuntimeError):
    """Too many consecutive optimisation steps had a non-finite loss or gradient."""


class NonFiniteGuard:
    """Counts dropped steps; `max_consecutive` NaN/inf steps in a row stop the run."""

    def __init__(self, max_consecutive=10):
        self.max_consecutive = max_consecutive
        self.consecutive = self.total = self.overflows = 0

    def update(self, result, step):
        if result.overflow:
            self.overflows += 1
        if not result.nonfinite:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.total += 1
        finite_loss = all(map(math.isfinite, result.losses.values()))
        what = f"gradient (norm {result.grad_norm})" if finite_loss else "loss"
        log(f"step {step}: non-finite {what} ({result.losses}), update skipped "
            f"({self.consecutive}/{self.max_consecutive} in a row)")
        if self.consecutive >= self.max_consecutive:
            raise DivergenceError(
                f"{self.consecutive} consecutive steps with a NaN/inf loss or gradient up to "
                f"step {step}: the run diverged. The last good checkpoint is kept; lower --lr, "
                "enable --grad-clip, or try --amp bf16/none."
            )


# ---------------------------------------------------------------------------------------------
# Graceful stop


class StopSignal:
    """SIGINT/SIGTERM set a flag instead of killing the process.

    The loop checks `requested` after each step (all ranks agree through `any_rank`),
    writes a final checkpoint and exits. A second Ctrl-C interrupts immediately.
    """

    def __init__(self):
        self.requested, self.name, self._previous = False, None, {}

    def install(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, _frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested, self.name = True, signal.Signals(signum).name
        print(f"\n{self.name} received: finishing the current step, then saving a checkpoint "
              "(Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Process memory


M_MMAP_THRESHOLD = -3  # glibc's mallopt() parameter number (malloc.h)


def compact_cpu_heap(threshold_bytes: int = 4 << 20) -> bool:
    """Have glibc serve every CPU buffer of `threshold_bytes` or more with its own mmap, so that
    freeing it hands the memory back to the OS at once.

    By default glibc raises that threshold to 32 MiB as soon as large tensors are freed; a
    training step's many 1-32 MiB activations then fragment the heap, and the process holds far
    more than it uses (FIBER-B pre-training at 384 px with checkpointing: 6.5 GB of RSS for 5.0
    GB of live tensors). At 4 MiB the peak is 5.9 GB; at 1 MiB 5.0 GB, but every fresh page is
    zero-filled on first touch, and the step is ~20% (4 MiB) or ~50% (1 MiB) slower on a 2-core
    CPU. Returns False, changing nothing, off glibc."""
    try:
        return bool(ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, threshold_bytes))
    except (OSError, AttributeError):
        return False


def add_compact_heap_flag(parser):
    """--compact-heap, applied by run_main before anything large is allocated."""
    parser.add_argument(
        "--compact-heap", action="store_true",
        help="CPU, glibc: return every freed buffer of 4 MiB or more to the OS at once; lower "
             "peak memory (a base pre-training step with --grad-checkpointing: 6.5 -> 5.9 GB), "
             "about 20%% slower")


# ---------------------------------------------------------------------------------------------
# Meters


def peak_memory_mb(device):
    """Peak memory so far: allocated CUDA memory on GPU, the process's max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Throughput:
    """Samples/s and seconds per step over the steps since the last `read()`."""

    def __init__(self):
        self._t0, self._samples, self._steps = time.perf_counter(), 0, 0

    def update(self, samples):
        self._samples += samples
        self._steps += 1

    def read(self):
        """(samples per second, seconds per step) since the previous read; then resets."""
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        rates = self._samples / elapsed, elapsed / max(1, self._steps)
        self._t0, self._samples, self._steps = time.perf_counter(), 0, 0
        return rates


def progress_bar(total, initial, env, desc="train"):
    """A tqdm bar counting optimizer steps, on rank 0 and only in a terminal (in a log file
    the periodic log lines say the same without a screenful of carriage returns)."""
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=sys.stdout,
                disable=not (env.is_main and sys.stdout.isatty()))


# ---------------------------------------------------------------------------------------------
# Unreadable samples


class TooManyBadSamples(RuntimeError):
    """More samples were unreadable than the run allows."""


class SkipTracker:
    """Counts skipped samples per epoch from the batches and stops a run drowning in bad data.

    update(batch) returns whether the batch has anything to train on; it raises
    TooManyBadSamples once at least `min_samples` were seen and the skipped fraction is above
    `max_fraction`. end_epoch() checks the whole epoch, returns a summary line and resets.
    `reduce(seen, skipped) -> (seen, skipped)` sums the counts over ranks at the end of an
    epoch (an all-reduce), so that every rank reports and decides on the same numbers.
    """

    def __init__(self, max_fraction=0.05, min_samples=256, reduce=None):
        self.max_fraction, self.min_samples, self.reduce = max_fraction, min_samples, reduce
        self.seen = self.skipped = 0

    def _check(self):
        if self.seen and self.skipped > self.max_fraction * self.seen:
            raise TooManyBadSamples(
                f"{self.skipped} of {self.seen} samples ({self.skipped / self.seen:.1%}) could "
                f"not be read this epoch, above the allowed {self.max_fraction:.1%}; fix the "
                f"data (the warnings name each file) or raise --max-skip-fraction")

    def update(self, batch):
        self.seen += batch["num_samples"]
        self.skipped += batch["num_skipped"]
        if self.seen >= self.min_samples:
            self._check()
        return "images" in batch

    def end_epoch(self):
        if self.reduce is not None:
            self.seen, self.skipped = (int(n) for n in self.reduce(self.seen, self.skipped))
        self._check()
        line = f"skipped {self.skipped} of {self.seen} samples"
        self.seen = self.skipped = 0
        return line


def add_guard_flags(parser):
    """The flags of train_loop's guards, the same in both training scripts."""
    parser.add_argument(
        "--max-skip-fraction", type=float, default=0.05,
        help="stop when more than this fraction of an epoch's samples could not be read")
    parser.add_argument("--max-nonfinite-steps", type=int, default=10,
                        help="stop after this many consecutive steps with a NaN/inf loss")
    parser.add_argument(
        "--dist-timeout", type=float, default=600.0,
        help="seconds a rank waits for the others in a collective before giving up")


def sum_over_ranks(env):
    """A SkipTracker `reduce`: the (seen, skipped) counts summed over all ranks."""
    def reduce(seen, skipped):
        mean = all_reduce_mean({"seen": seen, "skipped": skipped}, env)
        return round(mean["seen"] * env.world_size), round(mean["skipped"] * env.world_size)
    return reduce


# ---------------------------------------------------------------------------------------------
# The loop


class LossWindow:
    """Mean losses over the steps since the last read (reduced over ranks when read)."""

    def __init__(self):
        self.sums, self.n = {}, 0

    def add(self, losses):
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.n += 1

    def read(self, env):
        means = all_reduce_mean({k: v / max(1, self.n) for k, v in self.sums.items()}, env)
        self.sums, self.n = {}, 0
        return means


def next_micro_batches(stream, count):
    """The next `count` micro-batches and the epochs that the last of them completed."""
    micro, ended = [], []
    for _ in range(count):
        epoch = stream.epoch
        micro.append(next(stream))
        if stream.batch_in_epoch == stream.sampler.batches_per_epoch():
            ended.append(epoch)
    return micro, ended


def train_loop(run, env, wrapped, *, steps, loss_fn, to_device, save, after_step,
               format_losses, script, after_update=None):
    """Optimise `wrapped` (the objective, DDP-wrapped under torchrun) until `steps`.

    `run` holds the state a checkpoint saves (args, model, optimizer, scheduler, scaler,
    stream, step, first/last losses). Each step accumulates --accum-steps micro-batches; a
    step whose loss is not finite is skipped (NonFiniteGuard). Hooks: `after_update(run)`
    after each applied update (the fine stage's EMA), `after_step(run, env, window, meter)`
    for logging, periodic checkpoints and evaluation, `save(run, env, keep_copy=...)`.
    Returns a summary dict; on SIGINT/SIGTERM it checkpoints and returns status "stopped".
    """
    args = run.args
    stop, guard = StopSignal().install(), NonFiniteGuard(args.max_nonfinite_steps)
    skips = SkipTracker(max_fraction=args.max_skip_fraction, reduce=sum_over_ranks(env))
    window, meter, skipped = LossWindow(), Throughput(), 0
    bar = progress_bar(steps, run.step, env)
    try:
        while run.step < steps:
            micro, epochs_ended = next_micro_batches(run.stream, args.accum_steps)
            for b in micro:
                skips.update(b)
                skipped += b["num_skipped"]
            micro = [to_device(b, env.device) for b in micro]
            result = train_step(wrapped, micro, loss_fn, optimizer=run.optimizer,
                                scheduler=run.scheduler, scaler=run.scaler, env=env,
                                amp=args.amp, grad_clip=args.grad_clip)
            run.step += 1
            guard.update(result, run.step)
            if not result.nonfinite:
                window.add(result.losses)
                if after_update is not None:
                    after_update(run)
            meter.update(sum(b["num_samples"] for b in micro) * env.world_size)
            bar.update(1)
            bar.set_postfix_str(format_losses(result.losses))
            after_step(run, env, window, meter)
            for epoch in epochs_ended:
                # every rank ends the same epochs (equal shards), so the all-reduce matches
                log(f"epoch {epoch}: {skips.end_epoch()}")
            (stop_now,) = any_rank([stop.requested], env)
            if stop_now:
                path = save(run, env, keep_copy=False)
                log(f"stopped by {stop.name or 'a signal on another rank'} after step "
                    f"{run.step}/{steps}; checkpoint {path}. Resume with: python {script} "
                    f"<same flags> --out {args.out} --resume auto")
                return {"status": "stopped", "step": run.step, "checkpoint": str(path)}
    finally:
        bar.close()
        stop.uninstall()
    path = save(run, env, keep_copy=True)
    last = window.read(env) if window.n else run.last_losses
    total_skipped = round(all_reduce_mean({"s": skipped}, env)["s"] * env.world_size)
    return {"status": "done", "step": run.step, "checkpoint": str(path),
            "first": run.first_losses, "last": last, "skipped_samples": total_skipped,
            "skipped_steps": guard.total, "overflow_steps": guard.overflows}


def read_losses(run, env, window):
    """The logging window's mean losses; the first window is kept for the end-of-run report."""
    losses = window.read(env)
    run.last_losses = losses
    if not run.first_losses:  # {} when every step of the first window was skipped
        run.first_losses = losses
    return losses


def run_main(args, train, report, *, errors=()):
    """Join the process group, train, report; a known failure becomes a one-line error and
    exit status 1 on every rank (never a hang, never a traceback for bad data)."""
    t0 = time.time()
    if args.compact_heap and not compact_cpu_heap():
        print("--compact-heap: this C library has no glibc mallopt(); running without",
              file=sys.stderr)
    env = setup_distributed(timeout_s=args.dist_timeout)
    try:
        summary = train(args, env)
        if summary["status"] == "done":
            report(summary, time.time() - t0)
        return 0
    except (DivergenceError, TooManyBadSamples, CheckpointError, *errors) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    except RuntimeError as err:
        if not (env.distributed and is_dist_failure(err)):
            raise
        print(explain_dist_failure(env, err), file=sys.stderr, flush=True)
        return 1
    finally:
        cleanup_distributed()
