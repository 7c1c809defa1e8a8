"""Shared pieces of the plain PyTorch training loops (train_coarse.py, train_fine.py).

Nothing here knows about FIBER: it is distributed set-up, a resumable sampler, reproducible
RNG and data positions, atomic checkpoints, learning-rate schedules, mixed precision, one
optimisation step with gradient accumulation, a guard against diverging runs, graceful stop
on SIGINT/SIGTERM, and throughput/memory meters. Each training script composes them into its
own short loop, so the loop itself stays readable in one place.

Exact resume contract: a run stopped after step k and resumed from its checkpoint reaches the
same parameters, bit for bit, as a run that never stopped. That holds because
  - the sample order is a pure function of (seed, epoch) and can start at any batch offset,
  - data-side randomness (augmentation, MLM masking) is derived from (seed, epoch, index) by
    the datasets, so the number of loader workers does not matter,
  - every global RNG (python, numpy, torch CPU/CUDA) of every rank is saved and restored, and
  - the DataLoader draws its worker seeds from a private generator, not the global one.
"""
import hashlib
import math
import os
import pickle
import random
import resource
import shutil
import signal
import sys
import time
import warnings
from bisect import bisect_right
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoints

# ---------------------------------------------------------------------------------------------
# Distributed set-up


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in a (possibly single-process) run."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    timeout_s: float = 600.0

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1


def setup_distributed(*, timeout_s=600.0, device="auto"):
    """Read torchrun's RANK/WORLD_SIZE/LOCAL_RANK and join the process group.

    NCCL on GPU, gloo on CPU. The finite `timeout_s` bounds every collective: if one rank dies
    the others fail after at most that long instead of hanging forever (torchrun usually
    tears them down sooner). Without torchrun this returns a single-process DistEnv.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=timedelta(seconds=timeout_s),
            rank=rank,
            world_size=world_size,
        )
    return DistEnv(rank, world_size, local_rank, dev, timeout_s)


def cleanup_distributed():
    """Leave the process group (safe to call when none was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def explain_dist_failure(env, err):
    """A message for a collective that failed: usually another rank crashed or was killed."""
    return (
        f"rank {env.rank}/{env.world_size}: a collective operation failed or timed out "
        f"(timeout {env.timeout_s:.0f} s, --dist-timeout): another rank probably crashed or "
        f"was killed; its own log says why. Original error: {str(err).splitlines()[0]}\n"
        "Fix the cause, then restart with --resume auto to continue from the last checkpoint."
    )


def is_dist_failure(err):
    """Whether an exception comes from a failed collective (a dead peer, a timeout)."""
    if isinstance(err, dist.DistError):
        return True
    text = str(err).lower()
    return any(s in text for s in ("gloo", "nccl", "timed out", "connection", "peer"))


def is_main_process():
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def log(msg):
    """Print on rank 0 only, without breaking a running tqdm bar."""
    if is_main_process():
        tqdm.write(str(msg), file=sys.stdout)
        sys.stdout.flush()


def warn(msg):
    """Print a warning on every rank (a rank-specific problem must not be hidden)."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    print(f"[rank {rank}] WARNING: {msg}", file=sys.stderr, flush=True)


def all_reduce_mean(values, env):
    """Average a dict of floats (or a tensor) over ranks; identity on a single process."""
    as_dict = isinstance(values, dict)
    keys = sorted(values) if as_dict else None
    t = torch.tensor([float(values[k]) for k in keys]) if as_dict else values.detach().clone()
    if env.distributed:
        t = t.to(env.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t = t / env.world_size
    return {k: v.item() for k, v in zip(keys, t.cpu())} if as_dict else t


def any_rank(flags, env):
    """For each boolean, True when it is True on at least one rank (one small all-reduce)."""
    t = torch.tensor([float(f) for f in flags])
    if env.distributed:
        t = t.to(env.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.cpu().tolist()]


def ranks_agree(module, env):
    """True when every rank holds bit-identical parameters (a collective; a DDP sanity check)."""
    digest = hashlib.sha256()
    for p in module.parameters():
        digest.update(p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    if not env.distributed:
        return True
    digests = [None] * env.world_size
    dist.all_gather_object(digests, digest.hexdigest())
    return len(set(digests)) == 1


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
# Reproducibility


def seed_everything(seed):
    """Seed python, numpy and torch (CPU and every GPU)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state():
    """All global RNG states of this process, as tensors/ints only (safe to unpickle)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state):
    """Inverse of capture_rng_state."""
    random.setstate(state["python"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states(env):
    """The RNG state of every rank, as a list indexed by rank (a collective call)."""
    state = capture_rng_state()
    if not env.distributed:
        return [state]
    states = [None] * env.world_size
    dist.all_gather_object(states, state)
    return states


def restore_rank_rng_state(states, env):
    """Restore this rank's RNG state; with another number of ranks the run is not bit-exact."""
    if len(states) != env.world_size:
        warn(f"the checkpoint was written by {len(states)} rank(s) and this run has "
             f"{env.world_size}: training continues, but not bit-identically")
        return
    restore_rng_state(states[env.rank])


# ---------------------------------------------------------------------------------------------
# Checkpoints


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or does not fit the current run."""


def save_checkpoint(path, state):
    """Atomically write `state` to `path`: either the new file or the previous one, never half.

    On an OSError (a full disk, a vanished directory) the temp file is removed, the previous
    checkpoint at `path` is kept, and a CheckpointError says so.
    """
    try:
        # temp file in the same folder, flush + fsync, os.replace, fsync of the folder
        checkpoints.atomic_save(state, path)
    except OSError as err:
        raise CheckpointError(
            f"could not write checkpoint {path}: {err}. Free disk space or choose another "
            "--out, then resume from the last checkpoint."
        ) from err


TRAINING_KEYS = ("step", "model", "optimizer", "scheduler", "data", "rng", "config", "args")


def load_checkpoint(path, *, map_location="cpu", require=()):
    """Load a checkpoint written by save_checkpoint (tensors and plain Python types only).

    A damaged file (truncated by a crash, a copy cut short) or a file lacking any of the
    `require`d entries (e.g. a weights-only export passed to --resume) is a CheckpointError
    that names the file and the way out.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist: check --resume")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as err:
        raise CheckpointError(
            f"checkpoint {path} is damaged or not a torch checkpoint ({str(err).splitlines()[0]}"
            "). Resume from one of the periodic copies beside it (step_*.pt) instead."
        ) from err
    missing = [k for k in require if not (isinstance(state, dict) and k in state)]
    if missing:
        raise CheckpointError(
            f"{path} is not a training checkpoint (it lacks {', '.join(missing)}): it cannot be "
            "resumed. To start a new run from its weights, use --init."
        )
    return state


def config_differences(saved, current, prefix=""):
    """Fields whose values differ between two dicts, as 'name: checkpoint A vs now B' lines.

    Nested dicts (a model config's sub-configs) are compared field by field, named a.b.
    """
    missing = object()
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, missing), current.get(key, missing)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_differences(a, b, prefix=f"{prefix}{key}.")
        elif _normalise(a) != _normalise(b):
            a = "(absent)" if a is missing else repr(a)
            b = "(absent)" if b is missing else repr(b)
            diffs.append(f"{prefix}{key}: checkpoint {a} vs now {b}")
    return diffs


def _normalise(value):
    # A tuple saved by one run and a list built by the next are the same setting.
    return list(value) if isinstance(value, tuple) else value


def check_resume_compatible(state, path, *, config, args, ignore_args=()):
    """Refuse to resume into a run whose model config or training flags differ.

    `config` is the model configuration dict, `args` the training flags; flags in
    `ignore_args` (output paths, worker counts, logging intervals) may change across a resume.
    """
    flags = {k: v for k, v in args.items() if k not in ignore_args}
    saved_flags = {k: v for k, v in state["args"].items() if k not in ignore_args}
    diffs = ["config." + d for d in config_differences(state["config"], config)]
    for line in config_differences(saved_flags, flags):
        name, rest = line.split(":", 1)
        diffs.append(f"--{name.replace('_', '-')}:{rest}")
    if diffs:
        raise CheckpointError(
            f"cannot resume from {path}: it was written by a run with different settings:\n  "
            + "\n  ".join(diffs)
            + "\nResume with the original settings, or start a new run in another --out "
            "(use --init to start from its weights)."
        )


def checkpoint_paths(out_dir, step):
    """last.pt (always the newest) and the periodic copy kept for `step`."""
    out_dir = Path(out_dir)
    return out_dir / "last.pt", out_dir / f"step_{step:07d}.pt"


def save_training_checkpoint(out_dir, state, *, keep_copy):
    """Write last.pt and, when `keep_copy`, a permanent step_XXXXXXX.pt beside it."""
    last, copy = checkpoint_paths(out_dir, state["step"])
    save_checkpoint(last, state)
    if keep_copy:
        _keep_copy(last, copy)
    return last


def _keep_copy(last, copy):
    # A hard link costs no time and no disk: the next save replaces last.pt by a new file
    # (os.replace), and the link keeps this one. Where links are not supported, copy.
    copy.unlink(missing_ok=True)
    try:
        os.link(last, copy)
    except OSError:
        try:
            with open(last, "rb") as src:
                checkpoints.atomic_write(copy, lambda f: shutil.copyfileobj(src, f))
        except OSError as err:
            raise CheckpointError(f"could not copy {last} to {copy}: {err}") from err


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


def make_grad_scaler(device, amp):
    """A GradScaler, enabled only for fp16 (bf16 has fp32's range and needs no scaling)."""
    return torch.amp.GradScaler(device.type, enabled=amp == "fp16")


@dataclass
class StepResult:
    losses: dict             # mean over the micro-batches of this rank, as floats
    nonfinite: bool = False  # a loss was NaN/inf on some rank: the update was dropped
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
    grad_norm = math.nan
    if grad_clip > 0:
        scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
        params = [p for g in optimizer.param_groups for p in g["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip).item()
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
    """Too many consecutive optimisation steps had a non-finite loss."""


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
        log(f"step {step}: non-finite loss ({result.losses}), update skipped "
            f"({self.consecutive}/{self.max_consecutive} in a row)")
        if self.consecutive >= self.max_consecutive:
            raise DivergenceError(
                f"{self.consecutive} consecutive steps with a NaN/inf loss up to step {step}: "
                "the run diverged. The last good checkpoint is kept; lower --lr, enable "
                "--grad-clip, or try --amp bf16/none."
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
