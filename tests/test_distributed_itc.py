"""ITC across processes: 2 ranks x 4 pairs must equal 1 process x 8 pairs (loss and gradients).

Each rank contrasts its own images against every rank's texts (features gathered with their
gradient path kept), so the loss averaged over ranks, and the gradients averaged as DDP does,
are those of one big batch.
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from heads import gather_with_grad, itc_loss
from model import Fiber, FiberConfig

pytestmark = pytest.mark.slow


def pairs(n=8):
    config = FiberConfig.tiny()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 1000, (n, 10), generator=g)
    ids[:, 0], ids[:, -1] = 0, 2
    images = torch.randn(n, 3, config.image_size, config.image_size, generator=g)
    return config, images, ids, torch.ones(n, 10, dtype=torch.long)


def model_and_loss(images, ids, mask, rank=0):
    torch.manual_seed(0)
    config = pairs()[0]
    model = Fiber(config).eval()  # eval: no dropout, so both runs compute the same function
    image_feat = model.encode_image(images)
    text_feat = model.encode_text(ids, mask)
    B = image_feat.shape[0]
    loss, _, _ = itc_loss(image_feat, text_feat, model.temp, gather_with_grad(image_feat),
                          gather_with_grad(text_feat), offset=rank * B)
    loss.backward()
    return model, loss


def worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    _, images, ids, mask = pairs()
    part = slice(4 * rank, 4 * rank + 4)
    model, loss = model_and_loss(images[part], ids[part], mask[part], rank)
    grads = []
    for p in model.parameters():  # DDP's reduction: the mean of the ranks' gradients
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(g)
        grads.append(g / 2)
    total = loss.detach().clone()
    dist.all_reduce(total)
    if rank == 0:
        torch.save({"loss": total / 2, "grads": grads}, out)
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_equal_one_big_batch(tmp_path):
    out = tmp_path / "rank0.pt"
    mp.start_processes(worker, args=(free_port(), str(out)), nprocs=2, start_method="spawn")
    distributed = torch.load(out, weights_only=True)

    _, images, ids, mask = pairs()
    model, loss = model_and_loss(images, ids, mask)
    assert abs(distributed["loss"].item() - loss.item()) < 1e-5
    for p, g in zip(model.parameters(), distributed["grads"]):
        expected = p.grad if p.grad is not None else torch.zeros_like(p)
        assert (expected - g).abs().max() < 1e-5
