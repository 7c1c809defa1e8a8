"""Tests of training.py with a toy model: schedules, sampler, accumulation, resume, checkpoints."""
import math
import os
import signal
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import training as T

ENV = T.DistEnv()


# ---------------------------------------------------------------------------------------------
# Toy pieces: a regression dataset whose "augmentation" depends on (seed, epoch, index), like
# the real datasets, and a model with dropout so the global RNG matters.


class ToyData(torch.utils.data.Dataset):
    def __init__(self, n=40, seed=0):
        g = torch.Generator().manual_seed(1234)
        self.x, self.y = torch.randn(n, 6, generator=g), torch.randn(n, 1, generator=g)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 10_007 + i)
        noise = 0.01 * torch.randn(6, generator=g)
        return {"x": self.x[i] + noise, "y": self.y[i]}


def toy_model(dropout=0.0):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Dropout(dropout), nn.Tanh(), nn.Linear(16, 1))


def mse(model, batch):
    loss = ((model(batch["x"]) - batch["y"]) ** 2).mean()
    return {"loss": loss, "mse": loss.detach()}


def make_run(batch_size, *, dropout=0.0, num_workers=0, total=8, warmup=2, lr=0.05):
    model = toy_model(dropout)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, T.linear_warmup_decay(total, warmup))
    data = ToyData()
    sampler = T.ResumableBatchSampler(len(data), batch_size, seed=7)
    stream = T.BatchStream(T.make_loader(data, sampler, num_workers=num_workers))
    scaler = T.make_grad_scaler(ENV.device, "none")
    return dict(model=model, opt=opt, sched=sched, stream=stream, scaler=scaler)


def run_steps(run, steps, accum=1):
    lrs = []
    for _ in range(steps):
        lrs.append(run["opt"].param_groups[0]["lr"])
        batches = [next(run["stream"]) for _ in range(accum)]
        T.train_step(run["model"], batches, mse, optimizer=run["opt"], scheduler=run["sched"],
                     scaler=run["scaler"], env=ENV)
    return lrs


def training_state(run):
    return {
        "model": run["model"].state_dict(), "optimizer": run["opt"].state_dict(),
        "scheduler": run["sched"].state_dict(), "scaler": run["scaler"].state_dict(),
        "data": run["stream"].state_dict(), "rng": T.gather_rng_states(ENV),
    }


def restore(run, state):
    run["model"].load_state_dict(state["model"])
    run["opt"].load_state_dict(state["optimizer"])
    run["sched"].load_state_dict(state["scheduler"])
    run["scaler"].load_state_dict(state["scaler"])
    run["stream"].load_state_dict(state["data"])
    T.restore_rank_rng_state(state["rng"], ENV)


# ---------------------------------------------------------------------------------------------
# Learning-rate schedules: exact traces


def lr_trace(multiplier, steps, base_lr=1.0):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, multiplier)
    trace = []
    for _ in range(steps):
        trace.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return trace


def test_linear_warmup_decay_trace():
    # total 10, warm-up 2: 0, 1/2, then (10 - s) / 8 down to 0 at s = 10 and after.
    expected = [0.0, 0.5, 1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8, 0.0, 0.0]
    assert lr_trace(T.linear_warmup_decay(10, 2), 12) == pytest.approx(expected, abs=1e-12)
    assert T.warmup_steps_from(0.1, 1000) == 100 and T.warmup_steps_from(50, 1000) == 50


def test_linear_decay_without_warmup_starts_at_full_lr():
    assert lr_trace(T.linear_warmup_decay(4, 0), 5, 2.0) == pytest.approx([2, 1.5, 1, 0.5, 0])


def test_warmup_multistep_trace():
    f = T.warmup_multistep([4, 6], gamma=0.1, warmup_steps=2, warmup_factor=0.001)
    expected = [0.001, 0.001 * 0.5 + 0.5, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01]
    assert lr_trace(f, 8) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="increase"):
        T.warmup_multistep([6, 4])


# ---------------------------------------------------------------------------------------------
# Sampler and data position


def test_sampler_is_deterministic_and_starts_mid_epoch():
    s = T.ResumableBatchSampler(23, 4, seed=3)
    s.set_epoch(2)
    full = list(s)
    assert len(full) == 5 and full == list(s)  # 23 // 4 batches, same order every time
    s.set_epoch(2, start_batch=3)
    assert list(s) == full[3:] and len(s) == 2
    s.set_epoch(3)
    assert list(s) != full


def test_sampler_split_over_ranks_covers_the_same_global_batches():
    one = T.ResumableBatchSampler(40, 4, seed=1)
    ranks = [T.ResumableBatchSampler(40, 2, rank=r, world_size=2, seed=1) for r in range(2)]
    for s in [one, *ranks]:
        s.set_epoch(5)
    for j, (a, b) in enumerate(zip(*ranks)):
        assert a + b == list(one)[j] and not set(a) & set(b)
    with pytest.raises(ValueError, match="--batch-size"):
        T.ResumableBatchSampler(3, 2, world_size=2)


def test_batch_stream_crosses_epochs_and_resumes_exactly():
    data = ToyData(n=10)
    stream = T.BatchStream(T.make_loader(data, T.ResumableBatchSampler(10, 3, seed=0)))
    seen = [next(stream)["x"] for _ in range(7)]  # 3 batches per epoch: into the 3rd epoch
    assert stream.state_dict() == {"epoch": 2, "batch_in_epoch": 1}
    again = T.BatchStream(T.make_loader(data, T.ResumableBatchSampler(10, 3, seed=0)))
    again.load_state_dict({"epoch": 1, "batch_in_epoch": 2})
    assert torch.equal(next(again)["x"], seen[5]) and torch.equal(next(again)["x"], seen[6])


def test_loader_leaves_the_global_rng_alone():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    loader = T.make_loader(ToyData(), T.ResumableBatchSampler(40, 4))
    next(iter(loader))
    assert torch.equal(before, torch.get_rng_state())


# ---------------------------------------------------------------------------------------------
# Optimisation step


def test_accumulation_matches_a_larger_batch():
    small, big = make_run(2), make_run(4)
    lrs_small = run_steps(small, 5, accum=2)
    lrs_big = run_steps(big, 5, accum=1)
    assert lrs_small == lrs_big
    for a, b in zip(small["model"].parameters(), big["model"].parameters()):
        # Same gradient up to fp32 summation order (two halves vs one mean): ~1e-7 relative,
        # grown a little through five Adam steps.
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_nonfinite_loss_skips_the_update_and_stops_after_n():
    run = make_run(4)
    before = [p.detach().clone() for p in run["model"].parameters()]

    def nan_loss(model, batch):
        return {"loss": mse(model, batch)["loss"] * float("nan")}

    guard = T.NonFiniteGuard(max_consecutive=3)
    for step in range(2):
        r = T.train_step(run["model"], [next(run["stream"])], nan_loss, optimizer=run["opt"],
                         scheduler=run["sched"], scaler=run["scaler"], env=ENV)
        assert r.nonfinite
        guard.update(r, step)
    for a, b in zip(before, run["model"].parameters()):
        assert torch.equal(a, b)
    assert run["sched"].last_epoch == 2  # the schedule still follows the step count
    with pytest.raises(T.DivergenceError, match="3 consecutive"):
        guard.update(r, 2)


class InfGradient(torch.autograd.Function):
    """Identity forward, inf backward: a finite loss whose gradient is not (what a bf16
    overflow in the backward pass looks like)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


@pytest.mark.parametrize("grad_clip", [0.0, 1.0])
def test_nonfinite_gradient_of_a_finite_loss_skips_the_update(grad_clip, capsys):
    run = make_run(4)
    before = [p.detach().clone() for p in run["model"].parameters()]

    def inf_gradient_loss(model, batch):
        return {"loss": InfGradient.apply(mse(model, batch)["loss"])}

    r = T.train_step(run["model"], [next(run["stream"])], inf_gradient_loss,
                     optimizer=run["opt"], scheduler=run["sched"], scaler=run["scaler"],
                     env=ENV, grad_clip=grad_clip)
    assert r.nonfinite and math.isfinite(r.losses["loss"]) and not math.isfinite(r.grad_norm)
    for a, b in zip(before, run["model"].parameters()):
        assert torch.equal(a, b)  # one such update would have made every weight NaN
    T.NonFiniteGuard(max_consecutive=3).update(r, 5)
    assert "step 5: non-finite gradient (norm " in capsys.readouterr().out


def test_grad_clip_and_fp16_scaler_on_cpu():
    run = make_run(4)
    run["scaler"] = T.make_grad_scaler(ENV.device, "fp16")
    r = T.train_step(run["model"], [next(run["stream"])], mse, optimizer=run["opt"],
                     scheduler=run["sched"], scaler=run["scaler"], env=ENV, amp="fp16",
                     grad_clip=0.1)
    assert r.grad_norm > 0 and not r.nonfinite
    assert T.make_grad_scaler(ENV.device, "bf16").is_enabled() is False


# ---------------------------------------------------------------------------------------------
# Exact resume and checkpoints


@pytest.mark.parametrize("num_workers", [0, 2])
def test_exact_resume_is_bit_identical(tmp_path, num_workers):
    straight = make_run(4, dropout=0.3, num_workers=num_workers, total=12)
    run_steps(straight, 12)

    first = make_run(4, dropout=0.3, num_workers=num_workers, total=12)
    run_steps(first, 7)  # 10 batches per epoch: the resumed part crosses into epoch 1
    T.save_checkpoint(tmp_path / "last.pt", training_state(first))
    torch.manual_seed(999)  # the resumed process starts with other RNG states
    resumed = make_run(4, dropout=0.3, num_workers=num_workers, total=12)
    restore(resumed, T.load_checkpoint(tmp_path / "last.pt"))
    run_steps(resumed, 5)
    for a, b in zip(straight["model"].parameters(), resumed["model"].parameters()):
        assert torch.equal(a, b)


def test_rng_state_round_trip():
    state = T.capture_rng_state()
    a = (torch.rand(3), __import__("numpy").random.rand(), __import__("random").random())
    T.restore_rng_state(state)
    b = (torch.rand(3), __import__("numpy").random.rand(), __import__("random").random())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    T.save_checkpoint(path, {"step": 1, "w": torch.ones(3)})

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(T.CheckpointError, match="No space left.*previous file.*kept"):
        T.save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    assert T.load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temp file left


def test_periodic_copies_beside_last(tmp_path):
    T.save_training_checkpoint(tmp_path, {"step": 5}, keep_copy=True)
    last = T.save_training_checkpoint(tmp_path, {"step": 6}, keep_copy=False)
    T.save_training_checkpoint(tmp_path, {"step": 7}, keep_copy=True)  # last.pt replaced again
    assert last == tmp_path / "last.pt"
    assert T.load_checkpoint(tmp_path / "step_0000005.pt")["step"] == 5
    assert T.load_checkpoint(tmp_path / "step_0000007.pt")["step"] == 7
    assert T.load_checkpoint(last)["step"] == 7


def test_resume_with_other_settings_names_the_fields():
    state = {"config": {"swin": {"embed_dim": 32, "depths": (2, 2)}, "image_size": 64},
             "args": {"lr": 1e-4, "out": "a"}}
    same = {"swin": {"embed_dim": 32, "depths": [2, 2]}, "image_size": 64}
    T.check_resume_compatible(state, "x.pt", config=same, args={"lr": 1e-4, "out": "b"},
                              ignore_args={"out"})
    with pytest.raises(T.CheckpointError) as err:
        T.check_resume_compatible(state, "x.pt",
                                  config={"swin": {"embed_dim": 64, "depths": (2, 2)},
                                          "image_size": 64},
                                  args={"lr": 1e-3, "out": "a", "accum_steps": 2})
    msg = str(err.value)
    assert "config.swin.embed_dim: checkpoint 32 vs now 64" in msg
    assert "--lr: checkpoint 0.0001 vs now 0.001" in msg
    assert "--accum-steps: checkpoint (absent) vs now 2" in msg and "depths" not in msg


def test_damaged_or_foreign_checkpoint_says_what_to_do(tmp_path):
    whole = tmp_path / "whole.pt"
    T.save_checkpoint(whole, {"step": 1, "w": torch.ones(1000)})
    cut = tmp_path / "cut.pt"
    cut.write_bytes(whole.read_bytes()[:500])
    with pytest.raises(T.CheckpointError, match=r"cut\.pt is damaged.*step_\*\.pt"):
        T.load_checkpoint(cut)
    with pytest.raises(T.CheckpointError, match=r"not a training checkpoint .*optimizer.*--init"):
        T.load_checkpoint(whole, require=("step", "optimizer"))


def test_missing_checkpoint_says_which_flag(tmp_path):
    with pytest.raises(FileNotFoundError, match="--resume"):
        T.load_checkpoint(tmp_path / "nope.pt")


# ---------------------------------------------------------------------------------------------
# Signals and distributed failure


def test_sigterm_sets_the_stop_flag():
    stop = T.StopSignal().install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop.requested and stop.name == "SIGTERM"
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGTERM) is not stop._handle


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_that_dies(rank, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    env = T.setup_distributed(timeout_s=5, device="cpu")
    if rank == 1:
        os._exit(0)  # dies without taking part in the collective
    t0 = time.time()
    try:
        T.all_reduce_mean({"loss": 1.0}, env)
        results.put(("no error", time.time() - t0))
    except Exception as err:  # gloo raises RuntimeError/DistError depending on how it failed
        results.put((T.explain_dist_failure(env, err), time.time() - t0))


@pytest.mark.slow
def test_dead_rank_makes_the_other_exit_with_a_message():
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_that_dies, args=(r, port, results)) for r in range(2)]
    for p in procs:
        p.start()
    msg, seconds = results.get(timeout=60)
    for p in procs:
        p.join(timeout=30)
    assert "another rank probably crashed" in msg and "--resume auto" in msg
    assert seconds < 30  # bounded by the 5 s timeout (plus start-up), not a hang
