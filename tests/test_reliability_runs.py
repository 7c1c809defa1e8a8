"""Fault injection, run side: kills, signals, full disks, diverging losses and dead ranks
against train_coarse.py and its checkpoints, on the tiny model (CPU).

What must hold: a run never loses more than the work since its last checkpoint, never leaves a
checkpoint that does not load, resumes bit-exactly, and every failure ends with a message that
says what happened and what to do. Runs use 32 px images, 4 samples per step and a data set of
eight noise images, one of them unreadable (so every run also skips a sample).
"""
import json
import os
import queue
import random
import re
import resource
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoints as ck
import data
import train_coarse as tc
import training as T
from conftest import REPO, assert_same_training_state
from heads import PretrainObjective

RUN = ["--image-size", "32", "--batch-size", "4", "--max-text-len", "16", "--queue-size", "8",
       "--log-every", "1", "--no-eval", "--max-skip-fraction", "0.25",  # 1 of 8 images is bad
       "--image-warmup-steps", "0"]


# One torch thread, as the subprocesses get (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def write_pairs(folder, name, images):
    path = folder / name
    path.write_text("".join(f'{{"image": "{image}", "caption": "noise picture {k}"}}\n'
                            for k, image in enumerate(images)))
    return path


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """pairs.jsonl: eight noise images with captions; image 5 is an empty file."""
    folder = tmp_path_factory.mktemp("pairs")
    for k in range(9):
        pixels = np.random.RandomState(k).randint(0, 256, (24, 24, 3), np.uint8)
        Image.fromarray(pixels).save(folder / f"g{k}.png")
    (folder / "g5.png").write_bytes(b"")
    return write_pairs(folder, "pairs.jsonl", [f"g{k}.png" for k in range(8)])


@pytest.fixture(scope="module")
def clean_pairs(pairs):
    """The same without the bad image (g8.png in its place)."""
    return write_pairs(pairs.parent, "clean.jsonl", [f"g{k if k != 5 else 8}.png"
                                                     for k in range(8)])


def flags(pairs, out, *extra):
    return [*RUN, "--data", str(pairs), "--out", str(out), *extra]


def drop_checkpoints(folder):
    """Each tiny checkpoint is 200 MB (the 50k-word embedding and its Adam moments): delete
    them when a test is done with them, the disk is shared."""
    for path in Path(folder).rglob("*.pt"):
        path.unlink()


@pytest.fixture(autouse=True)
def no_checkpoints_left(tmp_path):
    yield
    drop_checkpoints(tmp_path)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def same_training_state(a, b):
    """Model, ITC queue, optimizer moments, schedule and data position are bit-identical."""
    assert_same_training_state(a, b, ("model", "objective"))


def same_model(a, b):
    return all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.fixture(scope="module")
def reference(pairs, tmp_path_factory):
    """An uninterrupted 4-step run (checkpoints at steps 2 and 4): what resumed runs must hit."""
    out = tmp_path_factory.mktemp("reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert tc.main(flags(pairs, out, "--steps", "4", "--save-every", "2")) == 0
    finally:
        torch.set_num_threads(threads)
    yield out
    drop_checkpoints(out)


# ---------------------------------------------------------------------------------------------
# Running the script as a separate process


def script_env():
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


class Script:
    """A training process whose output lines are read in the background, so a test can wait
    for a line, send a signal at the right moment, and still see everything it printed."""

    def __init__(self, cmd, **popen):
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=script_env(), cwd=REPO, **popen)
        self.lines, self._queue = [], queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, pattern, timeout=120):
        """The first new line matching `pattern`; None once the process has ended."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=0.05)
            except queue.Empty:
                continue
            if line is None:
                return None
            self.lines.append(line)
            if re.search(pattern, line):
                return line
        raise TimeoutError(f"no line matching {pattern!r} in {timeout} s:\n{self.text}")

    def finish(self, timeout=120):
        rc = self.proc.wait(timeout=timeout)
        while self.wait_for(r"$^", timeout=10) is not None:  # drain what is left
            pass
        return rc

    @property
    def text(self):
        return "".join(self.lines)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


# ---------------------------------------------------------------------------------------------
# Checkpoints: SIGKILL at random moments, full disks, foreign and damaged files


def temp_files(folder):
    return sorted(folder.glob(".*.tmp"))


# Starts training processes without paying for `import torch` each time (many seconds on a busy
# machine): the server imports train_coarse once, then forks one child per request; each child
# is a separate process (its own process group, like a job started from a shell) that runs
# train_coarse.main(argv) with its output in a log file, optionally under a file size limit.
# The server also delivers the signals and reaps the child, so a signal can never reach a
# reaped child's pid that the system has given to someone else.
FORK_SERVER = r"""
import json, os, resource, signal, sys, traceback
import torch
import train_coarse
torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])  # torch's lazy imports, once
print("ready", flush=True)
for request in sys.stdin:
    run = json.loads(request)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setsid()
            if run["max_file_size"]:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (run["max_file_size"],) * 2)
            fd = os.open(run["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            code = train_coarse.main(run["argv"])
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print(pid, flush=True)
    for command in map(json.loads, sys.stdin):
        if "signal" not in command:
            break
        (os.killpg if command["group"] else os.kill)(pid, command["signal"])
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


class ForkServer:
    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", FORK_SERVER], text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=script_env(), cwd=REPO)
        assert self.proc.stdout.readline() == "ready\n"
        self.active = None

    def _send(self, message):
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()

    def start(self, log, argv, max_file_size=None):
        """Fork a training run logging to `log`; returns its pid (its process group too)."""
        assert self.active is None, "reap the previous run first"
        self._send({"log": str(log), "argv": argv, "max_file_size": max_file_size})
        self.active = int(self.proc.stdout.readline())
        return self.active

    def signal(self, sig, group=False):
        """Send `sig` to the running child (group: to its whole process group)."""
        self._send({"signal": int(sig), "group": group})

    def reap(self, timeout=240):
        """Wait for the child; its exit code (negative: killed by that signal)."""
        self._send({"wait": True})
        ready = select.select([self.proc.stdout], [], [], timeout)[0]
        if not ready:
            self.signal(signal.SIGKILL)
        code, self.active = int(self.proc.stdout.readline()), None
        assert ready, f"the run did not end within {timeout} s"
        return code

    def run(self, log, argv, **options):
        self.start(log, argv, **options)
        return self.reap()

    def abandon(self):
        """Kill and reap a run a failed test left behind."""
        if self.active is not None:
            self.signal(signal.SIGKILL)
            self.reap()

    def close(self):
        self.abandon()
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def fork_server():
    started = ForkServer()
    yield started
    started.close()


@pytest.fixture
def server(fork_server):
    yield fork_server
    fork_server.abandon()


def wait_in_log(log, pattern, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text() if log.exists() else ""
        match = re.search(pattern, text)
        if match:
            return match
        time.sleep(0.02)
    raise TimeoutError(f"no {pattern!r} in {log} after {timeout} s:\n{text}")


def kill_during_write(server, out, fraction, expected_size, timeout=60):
    """SIGKILL the run once a checkpoint being written has reached `fraction` of its size."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for tmp in temp_files(out):
            try:
                if tmp.stat().st_size >= fraction * expected_size:
                    server.signal(signal.SIGKILL)
                    return True
            except FileNotFoundError:  # renamed into place meanwhile
                pass
        time.sleep(0.002)
    server.signal(signal.SIGKILL)
    return False


@pytest.mark.slow
def test_sigkill_at_random_moments_never_loses_the_last_checkpoint(pairs, server, tmp_path):
    # Every run resumes from what the previous, killed one left, saving after every step. Once
    # a run has trained its first step, half the kills land while last.pt's temporary file is
    # being written (at a random fraction of it), half at a random moment of the step after a
    # complete save (training, saving, renaming, linking the periodic copy), which is also how
    # the chain makes progress. 12 kills take about a minute on two idle cores; the deadline
    # only guards against a hang.
    rng, out = random.Random(0), tmp_path / "run"
    argv = flags(pairs, out, "--steps", "10", "--save-every", "1", "--resume", "auto")
    kills, mid_write, torn, steps, size = 0, 0, 0, [0], 200e6
    deadline = time.monotonic() + 240
    while kills < 12 and time.monotonic() < deadline and steps[-1] < 9:
        expected = f"at step {steps[-1]} " if steps[-1] else "starting fresh"
        log = tmp_path / f"log{kills}.txt"
        server.start(log, argv)
        started = wait_in_log(log, r"resumed from .*|starting fresh")
        assert expected in started.group(0), log.read_text()
        if kills % 2 == 0:  # while the checkpoint of this run's first step is written
            wait_in_log(log, r"\nstep \d+/10")
            mid_write += kill_during_write(server, out, rng.random(), size)
        else:  # a random moment in the step after a complete save
            wait_in_log(log, r"step \d+: checkpoint")
            step_seconds = float(re.findall(r"([\d.]+) s/step", log.read_text())[-1])
            time.sleep(rng.uniform(0, 1.2 * step_seconds))
            server.signal(signal.SIGKILL)
        assert server.reap() == -signal.SIGKILL, log.read_text()
        kills += 1
        torn += bool(temp_files(out))  # a half-written temp file is left: a torn write
        if (out / "last.pt").exists():
            size = (out / "last.pt").stat().st_size
            assert ck.integrity_problem(out / "last.pt") is None  # every zip member's CRC
            steps.append(load(out / "last.pt")["step"])
            assert steps[-1] >= steps[-2]
        for copy in out.glob("step_*.pt"):
            copy.unlink()  # the periodic copies would fill the disk
    log = tmp_path / "log_final.txt"
    assert server.run(log, argv) == 0, log.read_text()
    assert f"resumed from {out / 'last.pt'} at step {steps[-1]} " in log.read_text()
    assert T.load_checkpoint(out / "last.pt")["step"] == 10
    assert kills >= 10 and mid_write >= 3, (kills, mid_write)
    assert temp_files(out) == []  # the killed writers' temp files were cleaned up
    print(f"{kills} SIGKILLs survived ({mid_write} aimed into a checkpoint write, {torn} left "
          f"a torn temp file); checkpoint step after each: {steps[1:]}")


def test_stale_temp_files_of_killed_writers_are_removed(tmp_path):
    target = tmp_path / "last.pt"
    ck.atomic_save({"step": 1}, target)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = os.getppid()  # a process that exists and is not this one
    host = socket.gethostname()
    stale = tmp_path / f".last.pt.{host}.{dead.pid}.0a1b2c3d.tmp"
    mine = tmp_path / f".last.pt.{host}.{os.getpid()}.99999999.tmp"  # an earlier life's pid
    copy = tmp_path / f".step_0000007.pt.{host}.{dead.pid}.0a1b2c3d.tmp"  # another target
    running = tmp_path / f".last.pt.{host}.{live}.0a1b2c3d.tmp"
    elsewhere = tmp_path / f".last.pt.other-host.{dead.pid}.0a1b2c3d.tmp"
    for f in (stale, mine, copy, running, elsewhere):
        f.write_bytes(b"half a checkpoint")
    ck.atomic_save({"step": 2}, target)
    assert not stale.exists() and not mine.exists() and not copy.exists()
    assert running.exists() and elsewhere.exists()  # maybe still being written: kept
    assert T.load_checkpoint(target)["step"] == 2


@pytest.fixture
def file_size_limit():
    """Make writes past `limit` bytes fail as on a full disk (EFBIG instead of ENOSPC): the
    kernel refuses the write, nothing in the code under test is patched."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the process is killed

    def limit(nbytes):
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    yield limit
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, previous)


def test_disk_full_inside_torch_save_is_a_named_write_error(tmp_path, file_size_limit):
    # torch.save itself turns a failed write into "RuntimeError: [enforce fail at
    # inline_container.cc] unexpected pos"; the cause must come back as the OSError it is.
    path = tmp_path / "last.pt"
    T.save_checkpoint(path, {"step": 1, "w": torch.ones(4)})
    file_size_limit(1_000_000)
    with pytest.raises(T.CheckpointError) as info:
        T.save_checkpoint(path, {"step": 2, "w": torch.zeros(1_000_000)})
    file_size_limit(resource.RLIM_INFINITY)
    message = str(info.value)
    assert f"could not write checkpoint {path}" in message and "File too large" in message
    assert "previous file" in message and "Free disk space" in message
    assert isinstance(info.value.__cause__, ck.CheckpointWriteError)
    assert T.load_checkpoint(path)["step"] == 1 and temp_files(tmp_path) == []


def test_disk_full_during_a_run_stops_it_and_keeps_the_checkpoint(pairs, reference, server,
                                                                  tmp_path):
    out, log = tmp_path / "run", tmp_path / "log.txt"
    out.mkdir()
    os.link(reference / "step_0000002.pt", out / "last.pt")  # a run stopped at step 2
    argv = flags(pairs, out, "--steps", "4", "--save-every", "2", "--resume", "auto")
    assert server.run(log, argv, max_file_size=50_000_000) == 1, log.read_text()
    text = log.read_text()
    assert re.search(r"error: could not write checkpoint \S+last\.pt: .*File too large.*the "
                     r"previous file at \S+last\.pt is kept unchanged.*Free disk space",
                     text), text[-2000:]
    assert "Traceback" not in text
    assert T.load_checkpoint(out / "last.pt")["step"] == 2 and temp_files(out) == []


def test_resume_with_another_config_names_the_fields(pairs, reference, tmp_path, capsys):
    rc = tc.main(flags(pairs, tmp_path / "other", "--steps", "4", "--max-text-len", "20",
                       "--queue-size", "4", "--resume", str(reference / "last.pt")))
    err = capsys.readouterr().err
    assert rc == 1
    assert f"cannot resume from {reference / 'last.pt'}" in err
    assert "config.max_text_len: checkpoint 16 vs now 20" in err
    assert "--queue-size: checkpoint 8 vs now 4" in err and "--out:" not in err


@pytest.mark.parametrize("damage", ["truncated", "weights only"])
def test_resume_from_a_damaged_or_foreign_file_says_what_it_is(pairs, reference, tmp_path,
                                                               capsys, damage):
    out = tmp_path / "run"
    out.mkdir()
    if damage == "truncated":
        with open(reference / "last.pt", "rb") as whole:
            (out / "last.pt").write_bytes(whole.read(10_000_000))
        expected = [f"{out / 'last.pt'}", "damaged", "step_"]
    else:
        torch.save({"model": load(reference / "last.pt")["model"]}, out / "last.pt")
        expected = [f"{out / 'last.pt'}", "not a training checkpoint", "--init"]
    rc = tc.main(flags(pairs, out, "--steps", "4", "--resume", "auto"))
    err = capsys.readouterr().err
    assert rc == 1 and all(words in err for words in expected), err


# ---------------------------------------------------------------------------------------------
# Numerics


@pytest.mark.slow
def test_nan_loss_skips_its_step_and_a_streak_stops_the_run(pairs, tmp_path, capsys,
                                                            monkeypatch):
    # The loss is made NaN at steps 2, 4, 5 and 6; three in a row stop the run.
    forward, calls = PretrainObjective.forward, []

    def sometimes_nan(self, batch, load_images, generator=None):
        out = forward(self, batch, load_images, generator)
        calls.append(None)
        if len(calls) in (2, 4, 5, 6):
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(PretrainObjective, "forward", sometimes_nan)
    out = tmp_path / "run"
    rc = tc.main(flags(pairs, out, "--steps", "8", "--save-every", "1",
                       "--max-nonfinite-steps", "3"))
    captured = capsys.readouterr()
    assert rc == 1 and len(calls) == 6
    assert re.search(r"step 2: non-finite loss .*update skipped \(1/3 in a row\)", captured.out)
    assert re.search(r"step 6: non-finite loss .*update skipped \(3/3 in a row\)", captured.out)
    assert "error: 3 consecutive steps with a NaN/inf loss or gradient up to step 6" in captured.err
    assert "last good checkpoint is kept" in captured.err

    saved = {s: load(out / f"step_{s:07d}.pt") for s in range(1, 6)}
    assert same_model(saved[2], saved[1])  # the NaN step changed nothing ...
    assert saved[2]["optimizer"]["state"][0]["exp_avg"].equal(
        saved[1]["optimizer"]["state"][0]["exp_avg"])  # ... not even Adam's moments
    assert not same_model(saved[3], saved[2])  # step 3 trained again
    last = load(out / "last.pt")
    assert last["step"] == 5 and same_model(last, saved[3])  # the last good weights
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


def test_nan_features_from_one_batch_skip_one_step(pairs, tmp_path, capsys, monkeypatch):
    # A sample whose image is NaN (what an fp16 overflow inside the backbone looks like to the
    # losses) must cost one skipped step, not the run nor the ITC queue.
    getitem = data.CaptionDataset.__getitem__

    def poisoned(self, index):
        item = getitem(self, index)
        if item["epoch"] == 0 and index == 3:
            item["image"] = torch.full_like(item["image"], float("nan"))
        return item

    monkeypatch.setattr(data.CaptionDataset, "__getitem__", poisoned)
    rc = tc.main(flags(pairs, tmp_path / "run", "--steps", "5", "--save-every", "0",
                       "--max-nonfinite-steps", "2"))
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-2000:]
    assert "1 non-finite steps" in captured.out


# ---------------------------------------------------------------------------------------------
# Interrupted runs


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_signal_checkpoints_and_resume_is_bit_identical(pairs, reference, server, tmp_path,
                                                        sig):
    # SIGINT goes to the whole process group, as Ctrl-C in a terminal does, loader worker
    # included; SIGTERM to the main process, as a scheduler's preemption notice does.
    out, log = tmp_path / "run", tmp_path / "log.txt"
    workers = "1" if sig == "SIGINT" else "0"
    argv = flags(pairs, out, "--steps", "4", "--save-every", "2", "--num-workers", workers)
    server.start(log, argv)
    wait_in_log(log, r"\nstep 1/4")
    server.signal(getattr(signal, sig), group=sig == "SIGINT")
    assert server.reap() == 0, log.read_text()
    text = log.read_text()
    stopped = re.search(rf"stopped by {sig} after step (\d)/4; checkpoint (\S+)\.", text)
    assert stopped and f"{sig} received" in text, text
    assert stopped.group(2) == str(out / "last.pt") and "Traceback" not in text
    assert T.load_checkpoint(out / "last.pt")["step"] == int(stopped.group(1))

    log = tmp_path / "log_resumed.txt"
    assert server.run(log, [*argv, "--resume", "auto"]) == 0, log.read_text()
    same_training_state(load(out / "last.pt"), load(reference / "last.pt"))


# ---------------------------------------------------------------------------------------------
# Distributed (two gloo ranks on CPU under torchrun)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
            str(REPO / "train_coarse.py"), *args]


def worker_pid(launcher_pid, rank):
    """The pid of the torchrun worker running `rank` (read from /proc: Linux only)."""
    children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
    for pid in children:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(pid)
    raise LookupError(f"no worker of rank {rank} among {children}")


@pytest.mark.slow
def test_bad_sample_on_one_rank_keeps_ranks_in_step(pairs, tmp_path):
    # Sample 5 (unreadable) is in one rank's micro-batch of 2 during the first (only) epoch. A
    # dropped sample would leave that rank with a smaller batch than the other, and the ITC
    # all_gather aborts gloo ("Received data size doesn't match expected size"); a stand-in
    # keeps both at 2.
    cmd = torchrun_cmd(*flags(pairs, tmp_path / "ddp", "--batch-size", "2", "--steps", "2",
                              "--save-every", "0", "--dist-timeout", "30"))
    done = subprocess.run(cmd, capture_output=True, text=True, env=script_env(), cwd=REPO,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "g5.png: empty file" in done.stderr
    assert "parameters bit-identical on all 2 ranks: yes" in done.stdout
    assert "skipped: 1 unreadable samples" in done.stdout


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("fault", ["SIGKILL", "SIGSTOP"])
def test_dead_or_frozen_rank_ends_the_others_with_a_message(clean_pairs, tmp_path, fault):
    # SIGKILL: rank 1 dies, its sockets close. SIGSTOP: rank 1 hangs without closing anything,
    # so only --dist-timeout (10 s here) can free rank 0.
    timeout = 10
    script = Script(torchrun_cmd(*flags(clean_pairs, tmp_path / "ddp", "--batch-size", "2",
                                        "--steps", "200", "--save-every", "0",
                                        "--dist-timeout", str(timeout))))
    victim = None
    try:
        assert script.wait_for(r"^step 2/200") is not None, script.text
        victim = worker_pid(script.proc.pid, rank=1)
        os.kill(victim, getattr(signal, fault))
        t0 = time.monotonic()
        line = script.wait_for(r"rank 0/2: a collective operation failed", timeout=timeout + 30)
        seconds = time.monotonic() - t0
        assert line is not None, script.text
        assert f"(timeout {timeout} s, --dist-timeout): another rank probably crashed" in line
        assert script.wait_for(r"restart with --resume auto", timeout=10) is not None
        assert seconds < timeout + 10, seconds  # bounded by the timeout, not a hang
        if fault == "SIGSTOP":
            assert seconds >= timeout - 1  # it was the timeout that freed rank 0
            os.kill(victim, signal.SIGKILL)  # torchrun would wait 30 s for a stopped worker
        assert script.finish(timeout=60) != 0
    finally:
        if victim is not None and fault == "SIGSTOP":
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                pass
        script.kill()
