"""train_fine.py end to end on the tiny detector (CPU): exact resume, accumulation, EMA, the
optimiser schedule, and training through bad annotations. Runs use 64 px images, micro-batches
of 2 and a 16-scene synthetic world, so each takes seconds."""
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import train_fine as tf
import training as T
from conftest import REPO, assert_same_training_state

SMALL = ["--batch-size", "2", "--train-sizes", "64", "--min-size", "64", "--max-size", "64",
         "--synthetic-scenes", "16", "--log-every", "1", "--no-eval", "--ema", "0.9",
         "--warmup", "2", "--image-warmup-steps", "0"]


# One torch thread, as the subprocesses get (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def run_main(tmp_path, name, *flags):
    out = tmp_path / name
    return tf.main([*SMALL, "--out", str(out), *flags]), out


def same_training_state(a, b):
    """Model, EMA, optimizer moments, schedule and data position are bit-identical."""
    assert_same_training_state(a, b, ("model", "ema"))


def test_help_explains_every_flag():
    flags = [a for a in tf.build_parser()._actions if a.option_strings and a.dest != "help"]
    assert len(flags) >= 30
    assert all(a.help and len(a.help) > 10 for a in flags), [a.dest for a in flags if not a.help]


def test_presets_fill_unset_flags_only():
    args = tf.parse_args(["--config", "base", "--lr", "2e-5"])
    assert (args.lr, args.lang_lr, args.weight_decay, args.grad_clip) == (2e-5, 1e-5, 1e-4, 0.0)
    assert tf.parse_args([]).data == ["synthetic"]


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_run_is_bit_identical(tmp_path, workers):
    # straight: 4 steps, saving step 2 on the way; resumed: continues from that checkpoint
    rc, straight = run_main(tmp_path, "straight", "--steps", "4", "--save-every", "2")
    assert rc == 0
    torch.manual_seed(12345)  # whatever the RNG was, the checkpoint's state must win
    rc, resumed = run_main(tmp_path, "resumed", "--steps", "4", "--num-workers", str(workers),
                           "--resume", str(straight / "step_0000002.pt"))
    assert rc == 0
    same_training_state(torch.load(straight / "last.pt", weights_only=True),
                        torch.load(resumed / "last.pt", weights_only=True))


def test_resume_with_other_settings_is_refused(tmp_path, capsys):
    rc, first = run_main(tmp_path, "a", "--steps", "1")
    assert rc == 0
    rc, _ = run_main(tmp_path, "b", "--steps", "1", "--version", "v3", "--lr", "3e-3",
                     "--resume", str(first / "last.pt"))
    err = capsys.readouterr().err
    assert rc == 1
    assert "config.version: checkpoint 'v2' vs now 'v3'" in err
    assert "--lr: checkpoint 0.001 vs now 0.003" in err and "--out:" not in err


def test_accumulation_consumes_the_same_samples_and_averages_gradients(tmp_path):
    args = tf.parse_args([*SMALL, "--batch-size", "2", "--accum-steps", "2"])
    env = T.setup_distributed()
    config = tf.model_config(args)
    torch.manual_seed(0)
    model = tf.FiberDetector(config).eval()  # eval: no drop path / DropBlock randomness
    _, stream = tf.build_data(args, config, env, tf.load_tokenizer())
    micro = [next(stream) for _ in range(2)]
    # the two micro-batches are the first four samples of the epoch's order, as one batch of 4
    args4 = tf.parse_args([*SMALL, "--batch-size", "4"])
    _, stream4 = tf.build_data(args4, config, env, tf.load_tokenizer())
    assert torch.cat([b["index"] for b in micro]).tolist() == next(stream4)["index"].tolist()

    objective = tf.DetectionObjective(model, env)
    grads = []
    for b in micro:
        model.zero_grad()
        tf.loss_fn(objective, b)["loss"].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()
                      if p.grad is not None})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sgd = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(sgd, lambda s: 1.0)
    T.train_step(objective, micro, tf.loss_fn, optimizer=sgd, scheduler=sched,
                 scaler=T.make_grad_scaler(env.device, "none"), env=env)
    for n, p in model.named_parameters():
        if n in grads[0]:
            expected = before[n] - (grads[0][n] + grads[1][n]) / 2
            torch.testing.assert_close(p.detach(), expected, atol=1e-6, rtol=1e-5)


def test_schedule_groups_and_ema():
    args = tf.parse_args([*SMALL, "--steps", "100", "--warmup", "10", "--lr", "1e-3",
                          "--lang-lr", "1e-4"])
    model = tf.FiberDetector(tf.model_config(args))
    optimizer, scheduler = tf.build_optimizer(model, args)
    lrs = []
    for _ in range(100):
        lrs.append(max(g["lr"] for g in optimizer.param_groups))
        optimizer.step()
        scheduler.step()
    # warm-up from 0.001 x, then x0.1 at round(0.67 * 100) and round(0.89 * 100)
    assert lrs[0] == pytest.approx(2e-3 * 0.001) and lrs[10] == pytest.approx(2e-3)
    assert lrs[66] == pytest.approx(2e-3) and lrs[67] == pytest.approx(2e-4)
    assert lrs[89] == pytest.approx(2e-5)
    assert {(g["initial_lr"], g["weight_decay"]) for g in optimizer.param_groups} == {
        (1e-3, 0.01), (2e-3, 0.0), (1e-4, 0.01), (2e-4, 0.0)}

    ema = tf.ModelEma(model, 0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    name, p = next(iter(model.named_parameters()))
    torch.testing.assert_close(ema.state_dict()[name], p.detach() - 0.9)


# ---------------------------------------------------------------------------------------------
# Bad input: training goes on, the user is told


def bad_annotations(tmp_path):
    """Real little images and annotation files with every kind of trouble."""
    for name, size in (("a.png", (80, 60)), ("b.png", (64, 64))):
        Image.new("RGB", size, (120, 30, 200)).save(tmp_path / name)
    names = [{"id": 0, "name": "__background__"}, {"id": 3, "name": "traffic_light"}] + \
            [{"id": 10 + i, "name": f"long category name number {i}"} for i in range(12)]
    detection = {
        "images": [{"id": 1, "file_name": "a.png", "width": 80, "height": 60},
                   {"id": 2, "file_name": "b.png", "width": 64, "height": 64},
                   {"id": 3, "file_name": "missing.png", "width": 64, "height": 64}],
        "categories": names,
        "annotations": [
            {"image_id": 1, "category_id": 3, "bbox": [60, 40, 50, 50]},  # leaves the image
            {"image_id": 1, "category_id": 3, "bbox": [5, 5, 0, 0]},  # zero area
            {"image_id": 3, "category_id": 3, "bbox": [5, 5, 10, 10]}]
        # every long category is a positive of image 1: the prompt cannot hold them all
        + [{"image_id": 1, "category_id": 10 + i, "bbox": [2 + i, 2, 20, 20]} for i in range(12)]}
    caption = "a purple   square on a purple field"
    grounding = {
        "images": [{"id": 5, "file_name": "b.png", "width": 64, "height": 64,
                    "caption": caption, "tokens_positive_eval": [[[1, 10]], [[8, 11]]]}],
        "annotations": [
            {"image_id": 5, "bbox": [4, 4, 30, 30], "tokens_positive": [[1, 10]]},  # off-token
            {"image_id": 5, "bbox": [30, 30, 10, 10], "tokens_positive": [[8, 11]]}]}  # spaces
    det = tmp_path / "instances.json"
    det.write_text(json.dumps(detection))
    gr = tmp_path / "grounding.json"
    gr.write_text(json.dumps(grounding))
    return det, gr


def test_training_runs_through_bad_annotations(tmp_path, caplog):
    det, gr = bad_annotations(tmp_path)
    with caplog.at_level(logging.WARNING):
        rc, out = run_main(tmp_path, "bad", "--data", str(det), "--data", str(gr),
                           "--steps", "3", "--batch-size", "2", "--max-skip-fraction", "0.5")
    assert rc == 0
    text = caplog.text
    assert "dropped 1 box(es) of zero area" in text                # zero-area box
    assert "truncated to 64" in text                                # prompt over the limit
    assert "covers no token" in text                                # span of spaces only
    assert "missing.png" in text                                    # unreadable image skipped
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["step"] == 3
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_init_accepts_coarse_and_fine_checkpoints(tmp_path):
    from model import Fiber, FiberConfig
    from loading import ours_to_original
    torch.manual_seed(3)
    coarse = Fiber(FiberConfig.tiny())
    original = {ours_to_original(k): v for k, v in coarse.state_dict().items()}
    torch.save({"state_dict": original}, tmp_path / "coarse.ckpt")  # a Lightning-style file
    args = tf.parse_args([*SMALL, "--init", str(tmp_path / "coarse.ckpt")])
    model = tf.FiberDetector(tf.model_config(args))
    with pytest.warns(UserWarning, match="resized"):  # the 64 px coarse model clamps stage 3
        tf.init_weights(model, args.init)
    key = "backbone.text.encoder.layer.2.t2i.query.weight"
    assert torch.equal(model.state_dict()[key], coarse.state_dict()[key])

    rc, out = run_main(tmp_path, "fine", "--steps", "1")
    assert rc == 0
    fresh = tf.FiberDetector(tf.model_config(args))
    tf.init_weights(fresh, str(out / "last.pt"))
    saved = torch.load(out / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in saved.items())


def test_bf16_autocast_step_is_finite(tmp_path):
    rc, out = run_main(tmp_path, "amp", "--steps", "2", "--amp", "bf16")
    assert rc == 0
    state = torch.load(out / "last.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert all(v.dtype != torch.bfloat16 for v in state["model"].values())  # weights stay fp32


# ---------------------------------------------------------------------------------------------
# Subprocesses: signals and torchrun


def script_env():
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_continues_exactly(tmp_path):
    flags = [*SMALL, "--steps", "5"]
    cmd = [sys.executable, str(REPO / "train_fine.py"), *flags, "--out", str(tmp_path / "x")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=script_env(), cwd=REPO)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 2/5"):
            proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=300)
    text = "".join(lines)
    assert rc == 0, text
    assert "SIGTERM received" in text and "--resume auto" in text
    stopped = torch.load(tmp_path / "x" / "last.pt", weights_only=True)
    assert 2 <= stopped["step"] < 5

    assert tf.main([*flags, "--out", str(tmp_path / "x"), "--resume", "auto"]) == 0
    assert tf.main([*flags, "--out", str(tmp_path / "straight")]) == 0
    same_training_state(torch.load(tmp_path / "x" / "last.pt", weights_only=True),
                        torch.load(tmp_path / "straight" / "last.pt", weights_only=True))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_ranks_train_in_step(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(REPO / "train_fine.py"), *SMALL, "--batch-size", "1", "--steps", "2",
           "--accum-steps", "2", "--out", str(tmp_path / "ddp"), "--dist-timeout", "60"]
    t0 = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True, env=script_env(), cwd=REPO,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2 steps of 4 (1 x 2 accum x 2 ranks)" in done.stdout
    assert "parameters bit-identical on all 2 ranks: yes" in done.stdout
    assert time.time() - t0 < 600
