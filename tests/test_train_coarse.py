"""End-to-end tests of train_coarse.py on the tiny model and the synthetic world (CPU).

Runs are kept small (micro-batch 4, 24-token captions, a 16-entry queue, a few steps) so each
takes seconds; the multi-process and signal tests run the script as a subprocess.
"""
import os
import platform
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import train_coarse as tc
from conftest import REPO, assert_same_training_state
from loading import ours_to_original
from model import Fiber, FiberConfig

SMALL = ["--batch-size", "4", "--max-text-len", "24", "--queue-size", "16", "--log-every", "1",
         "--no-eval", "--image-warmup-steps", "0"]


# One torch thread, as the subprocesses get (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def run_main(tmp_path, name, *flags):
    out = tmp_path / name
    rc = tc.main([*SMALL, "--out", str(out), *flags])
    return rc, out


def same_training_state(a, b):
    """Model, optimizer moments, ITC queue, schedule and data position are bit-identical."""
    assert_same_training_state(a, b, ("model", "objective"))


def test_help_explains_every_flag():
    flags = [a for a in tc.build_parser()._actions if a.option_strings and a.dest != "help"]
    assert len(flags) >= 25
    assert all(a.help and len(a.help) > 10 for a in flags), [a.dest for a in flags if not a.help]


def test_presets_fill_unset_flags_only():
    args = tc.parse_args(["--config", "base", "--lr", "2e-5"])
    assert (args.lr, args.image_size, args.steps) == (2e-5, 384, 100_000)
    assert tc.parse_args(["--epochs", "2"]).steps is None


def test_epochs_count_optimizer_steps():
    args = tc.parse_args(["--epochs", "1.5", "--batch-size", "4", "--accum-steps", "2"])
    sampler = tc.T.ResumableBatchSampler(100, 4, world_size=2)  # 12 micro-batches per epoch
    stream = tc.T.BatchStream(tc.T.make_loader(list(range(100)), sampler))
    assert tc.total_steps(args, stream) == 9  # 12 micro-batches / 2 accumulated = 6 a epoch


FLAGS = [*SMALL, "--steps", "3"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 3-step run that keeps a checkpoint of every step."""
    out = tmp_path_factory.mktemp("straight")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert tc.main([*FLAGS, "--save-every", "1", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_run_is_bit_identical(tmp_path, straight, workers):
    # A new run continues from the straight run's step-1 checkpoint, with `workers` loader
    # processes, and must end exactly where the straight run ended.
    torch.manual_seed(12345)  # whatever the RNG was, the checkpoint's state must win
    rc, resumed = run_main(tmp_path, "resumed", "--steps", "3", "--num-workers", str(workers),
                           "--resume", str(straight / "step_0000001.pt"))
    assert rc == 0
    same_training_state(torch.load(straight / "last.pt", weights_only=True),
                        torch.load(resumed / "last.pt", weights_only=True))


def test_checkpointing_changes_memory_not_numbers(tmp_path, straight):
    # Switching activation checkpointing on for the rest of a run is allowed (it trades memory
    # for time), and the recomputed blocks (with dropout: the RNG is replayed) give the same
    # weights, moments and queue as the straight run without it.
    rc, resumed = run_main(tmp_path, "ckpt", "--steps", "3", "--grad-checkpointing",
                           "--resume", str(straight / "step_0000001.pt"))
    assert rc == 0
    same_training_state(torch.load(straight / "last.pt", weights_only=True),
                        torch.load(resumed / "last.pt", weights_only=True))


def test_compact_heap_takes_effect_on_glibc():
    # run in a child: the setting lasts for the life of a process
    code = "import training, sys; sys.exit(0 if training.compact_cpu_heap() else 3)"
    rc = subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode
    if rc == 3 and platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc: --compact-heap is a no-op here")
    assert rc == 0


def test_resume_with_other_settings_is_refused(tmp_path, capsys):
    rc, first = run_main(tmp_path, "a", "--steps", "1")
    assert rc == 0
    rc, _ = run_main(tmp_path, "b", "--steps", "1", "--image-size", "32", "--lr", "1e-3",
                     "--resume", str(first / "last.pt"))
    err = capsys.readouterr().err
    assert rc == 1
    assert "config.image_size: checkpoint 64 vs now 32" in err
    assert "--lr: checkpoint 0.0003 vs now 0.001" in err and "--out:" not in err


def test_resume_auto_without_checkpoint_starts_fresh(tmp_path, capsys):
    rc, out = run_main(tmp_path, "fresh", "--steps", "1", "--resume", "auto")
    assert rc == 0 and "starting fresh" in capsys.readouterr().out
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 1


def test_init_from_original_key_names_and_from_a_run(tmp_path):
    torch.manual_seed(3)
    donor = Fiber(FiberConfig.tiny(max_text_len=24))
    original = {ours_to_original(k): v for k, v in donor.state_dict().items()}
    torch.save({"state_dict": original}, tmp_path / "orig.ckpt")  # a Lightning-style file
    torch.save({"model": donor.state_dict(), "step": 3}, tmp_path / "last.pt")  # one of ours
    for name in ("orig.ckpt", "last.pt"):
        model, _ = tc.build_model(tc.parse_args([*SMALL, "--init", str(tmp_path / name)]))
        for k, v in donor.state_dict().items():
            assert torch.equal(model.state_dict()[k], v), (name, k)


def test_held_out_retrieval_set_is_100_distinct_scenes():
    args = tc.parse_args(SMALL)
    images, captions = tc.synthetic_retrieval_set(args)
    assert images.shape == (100, 3, 64, 64) and len(set(captions)) == 100


# ---------------------------------------------------------------------------------------------
# Subprocess runs: signals and torchrun


def script_env():
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
                PYTHONPATH=str(REPO))


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_continues_exactly(tmp_path, straight):
    out = tmp_path / "x"
    cmd = [sys.executable, str(REPO / "train_coarse.py"), *FLAGS, "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=script_env(), cwd=REPO)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 1/3"):
            proc.send_signal(signal.SIGTERM)  # arrives during step 2 (or between steps)
    rc = proc.wait(timeout=120)
    text = "".join(lines)
    assert rc == 0, text
    assert "SIGTERM received" in text and "--resume auto" in text
    stopped = torch.load(out / "last.pt", weights_only=True)
    assert 1 <= stopped["step"] < 3

    assert tc.main([*FLAGS, "--out", str(out), "--resume", "auto"]) == 0
    same_training_state(torch.load(out / "last.pt", weights_only=True),
                        torch.load(straight / "last.pt", weights_only=True))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_ranks_keep_identical_parameters(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(REPO / "train_coarse.py"), *SMALL, "--batch-size", "2", "--steps", "2",
           "--accum-steps", "2", "--out", str(tmp_path / "ddp"), "--dist-timeout", "60"]
    t0 = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True, env=script_env(), cwd=REPO,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "parameters bit-identical on all 2 ranks: yes" in done.stdout
    assert "2 steps of 8 (2 x 2 accum x 2 ranks)" in done.stdout
    assert torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)["step"] == 2
    assert time.time() - t0 < 300



def test_scratch_init_presets():
    def stds(flags):
        model, _ = tc.build_model(tc.parse_args([*SMALL, *flags]))
        text = model.backbone.text.encoder.layer[0].attention.self.query.weight
        swin = model.backbone.swin.layers[0].blocks[0].attn.qkv.weight  # 32 inputs
        return text.std().item(), swin.std().item()
    text, swin = stds([])  # tiny: normal(0, 1/sqrt(fan_in))
    assert text == pytest.approx(128 ** -0.5, rel=0.05)
    assert swin == pytest.approx(32 ** -0.5, rel=0.1)
    text, swin = stds(["--scratch-init", "original"])
    assert text == pytest.approx(0.02, rel=0.05) and swin == pytest.approx(0.02, rel=0.1)
