"""Shared test helpers: where the golden fixtures and sample data live, and torch settings.

Only tests read `../shared` (the fixtures and sample data beside the repository); the product
itself never does.
"""
import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FIBER_SHARED", REPO.parent / "shared"))
FIXTURES = SHARED / "fixtures"
DATA = SHARED / "data"

sys.path.insert(0, str(REPO))
sys.path.insert(0, str(FIXTURES))  # make_weights.py / make_weights_fine.py: the weight recipe

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def one_thread():
    """Run in-process training with one torch thread, as the scripts started as subprocesses
    run (OMP_NUM_THREADS=1): bit-exact comparisons need the same thread count, since a sum
    split over two threads rounds differently; and on a busy 2-core machine one thread per run
    is faster than two fighting for the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def assert_same_training_state(a, b, tensor_dicts):
    """Two training checkpoints hold bit-identical tensors in each of `tensor_dicts`, optimizer
    moments and step counts, and the same scheduler state, data position and step."""
    for key in tensor_dicts:
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), f"{key}.{k} differs"
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(pa[name], pb[name]), f"optimizer {name} differs"
    assert a["scheduler"] == b["scheduler"] and a["data"] == b["data"] and a["step"] == b["step"]


def need_shared():
    """Skip a test that needs the fixtures when `../shared` is absent (users' clones)."""
    if not FIXTURES.is_dir():
        pytest.skip(f"golden fixtures not found at {FIXTURES}")


def load_golden(name):
    need_shared()
    return torch.load(FIXTURES / f"golden_{name}.pt", weights_only=True)
