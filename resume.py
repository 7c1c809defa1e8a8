"""What an exact resume needs: every RNG state of every rank, atomic training checkpoints, and
a refusal to resume into a run with other settings.

A run stopped after step k and resumed from its checkpoint reaches the same parameters, bit
for bit, as a run that never stopped, because the checkpoint holds the model, optimiser,
scheduler, grad scaler, data position and the global RNG states (python, numpy, torch CPU and
CUDA) of each rank. `run_state` and `restore_run` handle the parts that both training scripts
share; each script adds its own (the ITC queue, the EMA weights).
"""
import os
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import checkpoints
from distributed import log, warn


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


# model config fields that trade memory for time and never change a number: a run may be
# resumed with activation checkpointing switched on or off
MEMORY_ONLY_FIELDS = frozenset({"grad_checkpointing", "checkpoint_tower"})


def config_differences(saved, current, prefix="", ignore=frozenset()):
    """Fields whose values differ between two dicts, as 'name: checkpoint A vs now B' lines.

    Nested dicts (a model config's sub-configs) are compared field by field, named a.b; field
    names in `ignore` are skipped at any depth.
    """
    missing = object()
    diffs = []
    for key in sorted((set(saved) | set(current)) - set(ignore)):
        a, b = saved.get(key, missing), current.get(key, missing)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_differences(a, b, prefix=f"{prefix}{key}.", ignore=ignore)
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
    diffs = ["config." + d for d in config_differences(state["config"], config,
                                                        ignore=MEMORY_ONLY_FIELDS)]
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
# The parts of a training run that both scripts save and restore


def run_state(run, env):
    """The checkpoint entries every run has: a collective (gathers each rank's RNG state)."""
    return {
        "step": run.step, "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(), "data": run.stream.state_dict(),
        "rng": gather_rng_states(env), "config": run.config.to_dict(), "args": vars(run.args),
        "first_losses": run.first_losses,
    }


def save_run(run, env, state, *, keep_copy):
    """Rank 0 writes `state` to last.pt (and a step copy); every rank gets the path back."""
    if env.is_main:
        return save_training_checkpoint(run.args.out, state, keep_copy=keep_copy)
    return checkpoint_paths(run.args.out, run.step)[0]


def resume_path(args):
    """The checkpoint --resume points at: a path, `auto` (last.pt in --out if any) or None."""
    if args.resume != "auto":
        return Path(args.resume) if args.resume else None
    last = Path(args.out) / "last.pt"
    if last.is_file():
        return last
    log(f"--resume auto: no checkpoint in {args.out} yet, starting fresh")
    return None


def resume(run, env, *, ignore_args, restore_own):
    """Load --resume into the run, if there is one; returns whether it did. The checkpoint
    must be a training one written with the same settings (flags in `ignore_args` may differ);
    `restore_own(state, path)` restores the script's own entries (ITC queue, EMA weights)."""
    path = resume_path(run.args)
    if path is None:
        return False
    state = load_checkpoint(path, require=TRAINING_KEYS)
    check_resume_compatible(state, path, config=run.config.to_dict(), args=vars(run.args),
                            ignore_args=ignore_args)
    restore_own(state, path)
    restore_run(run, state, env, path)
    return True


def restore_run(run, state, env, path):
    """Load the shared entries of `state` into the run; the RNG states come last."""
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    run.stream.load_state_dict(state["data"])
    run.step, run.first_losses = state["step"], state["first_losses"]
    restore_rank_rng_state(state["rng"], env)
    log(f"resumed from {path} at step {run.step} (epoch {state['data']['epoch']}, "
        f"micro-batch {state['data']['batch_in_epoch']})")
