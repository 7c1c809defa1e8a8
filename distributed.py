"""Distributed set-up for the training scripts: torchrun's environment, the process group with
a finite timeout, rank-0 logging, and the few collectives the loops need.

Every function also works in a single process (no torchrun): collectives become identities,
so the scripts run the same code with or without DDP.
"""
import hashlib
import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from tqdm import tqdm


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
