"""Behaviour of the model on the tiny preset: shapes, fusion gates, loading, the objective."""
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import FIXTURES, need_shared
from heads import PretrainObjective, mlm_loss, naive_pretrain_losses
from loading import CheckpointMismatch, dropped_reason, original_to_ours, ours_to_original
from model import Fiber, FiberConfig


def tiny_batch(config, B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    S, L = config.image_size, 12
    ids = torch.randint(3, 1000, (B, L), generator=g)
    ids[:, 0], ids[:, -1] = 0, 2
    mask = torch.ones(B, L, dtype=torch.long)
    ids[1, 8:], mask[1, 8:] = 1, 0  # one padded caption
    ids[1, 7] = 2
    labels = torch.full((B, L), -100)
    mlm_ids = ids.clone()
    mlm_ids[:, 3], labels[:, 3] = 50264, ids[:, 3]
    return dict(images=torch.randn(B, 3, S, S, generator=g), text_ids=ids, text_mask=mask,
                mlm_ids=mlm_ids, mlm_labels=labels, index=torch.arange(B))


def test_shapes_tiny():
    config = FiberConfig.tiny()
    model = Fiber(config).eval()
    batch = tiny_batch(config)
    out = model(batch["images"], batch["text_ids"], batch["text_mask"])
    grid = config.image_size // 32
    assert out["text_feats"].shape == (3, 12, config.hidden_size)
    assert out["image_feats"].shape == (3, grid * grid, config.hidden_size)
    assert out["cls_feats"].shape == (3, 2 * config.hidden_size)
    feats = model.encode_image(batch["images"])
    assert feats.shape == (3, config.hidden_size)
    assert torch.allclose(feats.norm(dim=-1), torch.ones(3), atol=1e-5)


@torch.no_grad()
def test_zero_gates_equal_unimodal_backbones():
    """Gates start at zero: the fused model is then exactly Swin and RoBERTa side by side."""
    config = FiberConfig.tiny()
    model = Fiber(config).eval()
    batch = tiny_batch(config)
    fb = model.backbone
    assert all(g.item() == 0.0 for g in [m.gate for m in fb.modules() if hasattr(m, "gate")])
    x, h, _ = fb.fuse(fb.image_lower(batch["images"]),
                      fb.text_lower(batch["text_ids"], batch["text_mask"]))
    image_only = fb.swin(batch["images"], final_norm=False)
    assert torch.equal(x, image_only) or (x - image_only).abs().max() < 1e-6

    # text alone, with the fused path's one quirk: the top layer skips its output LayerNorm
    text = fb.text
    from roberta import additive_mask
    t = text.embeddings(batch["text_ids"])
    ext = additive_mask(batch["text_mask"], t.dtype)
    n = config.text.num_layers
    for i in range(n):
        t = text.encoder.layer[i](t, ext, last_norm=i < n - 1)
    assert (h - t).abs().max() < 1e-6

    # and a non-zero gate changes both streams
    for m in fb.modules():
        if hasattr(m, "gate"):
            m.gate.fill_(0.5)
    x2, h2, _ = fb.fuse(fb.image_lower(batch["images"]),
                        fb.text_lower(batch["text_ids"], batch["text_mask"]))
    assert (x2 - x).abs().max() > 1e-3 and (h2 - h).abs().max() > 1e-3


def original_state_dict(model):
    return {ours_to_original(k): v.clone() for k, v in model.state_dict().items()}


def test_key_mapping_round_trips_on_released_names():
    need_shared()
    keys = [k for k, _, _ in json.load(open(FIXTURES / "keys_pretrain384.json"))]
    for key in keys:
        if dropped_reason(key) is None:
            assert ours_to_original(original_to_ours(key)) == key


def test_load_original_names_and_report_problems():
    config = FiberConfig.tiny()
    source = Fiber(config)
    for m in source.modules():
        if hasattr(m, "gate"):
            m.gate.data.fill_(0.3)
    sd = original_state_dict(source)
    sd["image_queue"] = torch.zeros(4, 4)  # dropped on purpose, not an error
    target = Fiber(config).load_original_state_dict(sd)
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a, b), name

    broken = dict(sd)
    del broken["text_transformer.embeddings.word_embeddings.weight"]
    broken["surprise.weight"] = torch.zeros(1)
    broken["itm_score.fc.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointMismatch) as err:
        Fiber(config).load_original_state_dict(broken, source="broken.ckpt")
    text = str(err.value)
    assert "broken.ckpt" in text
    assert "backbone.text.embeddings.word_embeddings.weight" in text  # missing
    assert "surprise.weight" in text  # unexpected
    assert "itm_score.fc.weight: file (3, 3)" in text  # mis-shaped


def test_rank_output_is_folded_into_itm_row_one():
    config = FiberConfig.tiny()
    source = Fiber(config)
    sd = original_state_dict(source)
    D2 = 2 * config.hidden_size
    sd["rank_output.weight"] = torch.full((1, D2), 0.25)
    sd["rank_output.bias"] = torch.full((1,), -1.0)
    model = Fiber(config).load_original_state_dict(sd)
    assert torch.equal(model.itm_score.fc.weight[1], torch.full((D2,), 0.25))
    assert torch.equal(model.itm_score.fc.weight[0], sd["itm_score.fc.weight"][0])
    cls = torch.randn(2, D2)
    assert torch.allclose(model.itm_score.rank_score(cls), model.itm_score(cls)[:, 1], atol=1e-6)


def test_parameter_groups_follow_the_original_rules():
    model = Fiber(FiberConfig.tiny())
    groups = model.parameter_groups(lr=1e-4, weight_decay=0.01, lr_mult_head=5, lr_mult_cross=5)
    where = {n: g for g in groups for n in g["names"]}
    assert len(where) == sum(1 for _ in model.parameters())
    assert where["itm_score.fc.weight"]["lr"] == pytest.approx(5e-4)
    assert where["itm_score.fc.bias"]["weight_decay"] == 0.0
    assert where["cross_modal_text_transform.weight"]["lr"] == pytest.approx(5e-4)
    assert where["backbone.swin.patch_embed.proj.weight"]["lr"] == pytest.approx(1e-4)
    assert where["backbone.swin.layers.0.blocks.0.norm1.weight"]["weight_decay"] == 0.0
    assert where["backbone.text.embeddings.LayerNorm.weight"]["weight_decay"] == 0.0
    fused = "backbone.swin.layers.3.blocks.0.i2t"
    assert where[f"{fused}.query.weight"]["lr"] == pytest.approx(5e-4)
    # the original matches "norm." and friends as substrings: its i2t query norm is named
    # norm_i2t_i, so that LayerNorm's weight *is* decayed there, and here too
    assert where[f"{fused}.norm.weight"]["weight_decay"] == 0.01
    assert where["temp"]["weight_decay"] == 0.01


def test_shared_lower_backbone_equals_naive_path():
    """Computing each image's and caption's lower backbone once gives the same losses and
    gradients as recomputing it for every pass and pair (same negative draws)."""
    torch.manual_seed(0)
    config = FiberConfig.tiny()
    model = Fiber(config).eval()  # eval: no dropout, so both paths see the same function
    for m in model.modules():
        if hasattr(m, "gate"):
            m.gate.data.fill_(0.5)
    objective = PretrainObjective(model, queue_size=8).eval()
    batch = tiny_batch(config, B=4)
    out = objective(batch, load_images=None, generator=torch.Generator().manual_seed(3))
    fast = [p.grad for p in model.parameters()]
    out["loss"].backward()
    fast = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    g = torch.Generator().manual_seed(3)  # replay the objective's draws
    with torch.no_grad():
        i_f, t_f = model.encode_image(batch["images"]), model.encode_text(
            batch["text_ids"], batch["text_mask"])
        w_i2t = F.softmax(i_f @ t_f.t() / model.temp, 1).fill_diagonal_(0)
        w_t2i = F.softmax(t_f @ i_f.t() / model.temp, 1).fill_diagonal_(0)
        neg_img = torch.multinomial(w_t2i + 1e-9, 1, generator=g)[:, 0]
        neg_txt = torch.multinomial(w_i2t + 1e-9, 1, generator=g)[:, 0]
    loss, (itc, itm, mlm) = naive_pretrain_losses(model, batch, neg_img, neg_txt)
    loss.backward()
    assert abs(out["itc_loss"] - itc.item()) < 1e-4
    assert abs(out["itm_loss"] - itm.item()) < 1e-4
    assert abs(out["mlm_loss"] - mlm.item()) < 1e-4
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert (fast[name] - p.grad).abs().max() < 1e-4, name


def test_objective_uses_the_queue_and_rereads_negatives():
    torch.manual_seed(0)
    config = FiberConfig.tiny()
    model = Fiber(config)
    objective = PretrainObjective(model, queue_size=6).train()
    store = {i: torch.randn(3, config.image_size, config.image_size) for i in range(100)}
    asked = []

    def load_images(indices):
        asked.extend(indices)
        return torch.stack([store[i] for i in indices])

    for step in range(4):
        batch = tiny_batch(config, B=2, seed=step)
        batch["index"] = torch.tensor([2 * step, 2 * step + 1])
        batch["images"] = torch.stack([store[int(i)] for i in batch["index"]])
        out = objective(batch, load_images, generator=torch.Generator().manual_seed(step))
        out["loss"].backward()
        assert torch.isfinite(out["loss"])
    assert objective.queue.valid() == 6
    assert sorted(objective.queue.image_index.tolist()) == [2, 3, 4, 5, 6, 7]
    assert all(0 <= i < 8 for i in asked)  # every re-read index came from the queue


def test_mlm_loss_without_masked_tokens_is_zero_not_nan():
    logits = torch.randn(2, 5, 11)
    assert mlm_loss(logits, torch.full((2, 5), -100)).item() == 0.0


def test_window_attention_matches_per_window_reference():
    """Windows folded into the head axis must still pair each window with its own mask."""
    from swin import WindowAttention, shifted_window_mask, window_partition

    torch.manual_seed(0)
    B, grid, ws, C, nH = 3, 8, 4, 16, 2
    attn = WindowAttention(dim=C, num_heads=nH, window_size=ws).eval()
    mask = shifted_window_mask(grid, grid, ws, ws // 2)  # (nW, N, N), differs per window
    windows = window_partition(torch.randn(B, grid, grid, C), ws)  # (B*nW, N, C)
    nW, N, hd = mask.shape[0], ws * ws, C // nH

    q, k, v = attn.qkv(windows).view(B * nW, N, 3, nH, hd).permute(2, 0, 3, 1, 4)
    bias = attn.position_bias()  # (nH, N, N)
    expected = torch.empty(B * nW, nH, N, hd)
    for i in range(B * nW):  # image-major: window i belongs to image i // nW
        for h in range(nH):
            scores = q[i, h] @ k[i, h].T / hd**0.5 + bias[h] + mask[i % nW]
            expected[i, h] = scores.softmax(-1) @ v[i, h]
    expected = attn.proj(expected.transpose(1, 2).reshape(B * nW, N, C))

    torch.testing.assert_close(attn(windows, mask), expected, atol=1e-5, rtol=1e-5)


def test_chunked_mlp_equals_whole_mlp():
    """Inference runs the MLP in row chunks (less memory); the numbers must not change."""
    from swin import Mlp

    torch.manual_seed(0)
    mlp = Mlp(dim=8, hidden=32)
    mlp.chunk_rows = 7  # 2 x 20 rows: 6 chunks, the last one short
    x = torch.randn(2, 20, 8)
    whole = mlp(x)  # autograd on: one pass
    with torch.no_grad():
        chunked = mlp(x)
    assert chunked.shape == whole.shape
    torch.testing.assert_close(chunked, whole.detach(), atol=1e-6, rtol=1e-6)
