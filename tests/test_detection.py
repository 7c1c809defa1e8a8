"""Detection head: golden parity, checkpoint names, ATSS, losses, bad targets, post-processing."""
import json
import math

import pytest
import torch

from conftest import FIXTURES, load_golden, need_shared
from detection import (FPN, DetectionHead, DetectionHeadConfig, class_scores, label_to_token_map,
                       load_original_detection_weights, split_original_detection_state_dict,
                       _cap_detections)
from detection_loss import (atss_assign, centerness_targets, giou_loss, sanitize_targets,
                            token_sigmoid_focal_loss)
from detection_ops import BoxCoder, box_iou

PREFIXES = ("fusion_backbone.backbone.fpn.", "rpn.")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # these tests run many small ops: a second thread costs more in hand-offs than it saves,
    # and stalls badly when the cores are shared; restored for the other test modules
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _head_keys(version):
    """[name, shape, dtype] of the original's FPN and rpn entries."""
    need_shared()
    entries = json.load(open(FIXTURES / f"keys_fine_{version}.json"))
    return [e for e in entries if e[0].startswith(PREFIXES)]


# ------------------------------------------------------------------------------------------------
# Golden parity: recipe weights, the golden C3..C5 and text states in, every head output compared
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["v2", "v3"])
def parity(request):
    import make_weights_fine
    golden = load_golden(f"fine_{request.param}")
    config = DetectionHeadConfig()
    fpn, rpn = FPN(config).eval(), DetectionHead(config).eval()
    # the recipe skips the anchor buffers: the modules keep their own geometry
    load_original_detection_weights(fpn, rpn, make_weights_fine.recipe_state_dict(
        _head_keys(request.param)))
    out = golden["outputs"]
    with torch.no_grad():
        pyramid = fpn([out["C3"], out["C4"], out["C5"]])
        result = rpn(pyramid, out["text_hidden"], out["text_masks"])
    result["P"] = pyramid
    meta, inputs = golden["meta"], golden["inputs"]
    result["detections"] = rpn.postprocess(
        result, inputs["positive_map_label_to_token"], [tuple(inputs["image_sizes"][0])],
        num_classes=meta["num_cls_channels"], threshold=meta["inference_th"],
        pre_nms_top_n=meta["pre_nms_top_n"], nms_threshold=meta["nms_th"],
        detections_per_image=meta["detections_per_img"])[0]
    return golden, result


# fp32 here vs the original's fp32 with another op order: measured <= 2.2e-5 on maps (values up
# to ~5) and <= 4.7e-5 on dot logits (up to ~7); the README puts fp32-vs-fp64 at 4e-6 / 3e-5.
# 1e-4 leaves room for BLAS differences between machines and still catches any wrong formula.
@pytest.mark.parametrize("name", ["P", "tower", "bbox_reg", "centerness", "dot_product_logits"])
def test_head_outputs_match_golden(parity, name):
    golden, result = parity
    assert len(result[name]) == len(golden["outputs"][name]) == 5
    for mine, ref in zip(result[name], golden["outputs"][name]):
        assert mine.shape == ref.shape
        torch.testing.assert_close(mine, ref, atol=1e-4, rtol=0)


def test_anchors_match_golden_exactly(parity):
    golden, result = parity
    for mine, ref in zip(result["anchors"], golden["outputs"]["anchors"]):
        assert torch.equal(mine, ref)


def test_detections_match_golden(parity):
    golden, result = parity
    out, det = golden["outputs"], result["detections"]
    assert len(det["scores"]) == len(out["det_scores"]) == 100
    same_label = det["labels"][:, None] == out["det_labels"][None, :]
    best, match = (box_iou(det["boxes"], out["det_boxes"]) * same_label).max(dim=1)
    found = best > 0.99
    # the last of the 100 may sit on a near-tie with the 101st (gaps down to 9e-7 in v3)
    assert int((~found).sum()) <= 1
    if not found.all():
        assert det["scores"][~found].item() == pytest.approx(out["det_scores"][-1].item(), abs=1e-5)
    assert len(set(match[found].tolist())) == int(found.sum())       # one-to-one
    # scores are sqrt(p * centerness) of fp32 logits that agree to ~5e-5: measured <= 5e-6
    torch.testing.assert_close(det["scores"][found], out["det_scores"][match[found]],
                               atol=2e-5, rtol=0)
    assert (det["scores"][1:] <= det["scores"][:-1]).all()


# ------------------------------------------------------------------------------------------------
# Checkpoint names
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", ["v2", "v3"])
def test_parameter_names_match_original_keys(version):
    config = DetectionHeadConfig()
    ours = {PREFIXES[0] + k: tuple(v.shape) for k, v in FPN(config).state_dict().items()}
    ours.update({PREFIXES[1] + k: tuple(v.shape)
                 for k, v in DetectionHead(config).state_dict().items()})
    original = {name: tuple(shape) for name, shape, _ in _head_keys(version)}
    assert ours == original


def test_split_strips_ddp_and_prefixes():
    fpn, rpn = split_original_detection_state_dict({
        "module.rpn.head.bias0": torch.zeros(1),
        "module.fusion_backbone.backbone.fpn.top_blocks.p6.bias": torch.zeros(2),
        "module.fusion_backbone.backbone.body.norm1.weight": torch.zeros(3)})
    assert list(fpn) == ["top_blocks.p6.bias"] and list(rpn) == ["head.bias0"]


def test_loader_names_mismatched_keys():
    config = DetectionHeadConfig.tiny()
    fpn, rpn = FPN(config), DetectionHead(config)
    sd = {**{"rpn." + k: v for k, v in rpn.state_dict().items()},
          **{"fusion_backbone.backbone.fpn." + k: v for k, v in fpn.state_dict().items()}}
    load_original_detection_weights(fpn, rpn, sd)                    # round trip works
    sd["rpn.head.cls_logits.weight"] = torch.zeros(3, config.channels, 1, 1)
    with pytest.raises(ValueError, match="cls_logits"):
        load_original_detection_weights(fpn, rpn, sd)
    del sd["rpn.head.cls_logits.weight"]
    with pytest.raises(ValueError, match="missing"):
        load_original_detection_weights(fpn, rpn, sd)


# ------------------------------------------------------------------------------------------------
# ATSS and the loss formulas
# ------------------------------------------------------------------------------------------------

def test_atss_hand_made_case():
    level0 = torch.tensor([[0.0, 0, 9, 9], [10, 0, 19, 9], [60, 60, 69, 69]])
    level1 = torch.tensor([[0.0, 0, 29, 29], [100, 100, 119, 119], [200, 200, 219, 219]])
    gts = torch.tensor([[0.0, 0, 19, 9], [10, 0, 24, 9]])
    # topk 3 takes all three anchors of each level as candidates. IoUs (+1 convention):
    #   box 0 (20x10): a0 0.5, a1 0.5, a2 0 | b0 200/900, b1 0, b2 0
    #     mean 0.2037, unbiased std 0.2451 -> threshold 0.449: a0, a1 pass (centres inside)
    #   box 1 (15x10): a0 0, a1 100/150, a2 0 | b0 150/900, b1 0, b2 0
    #     mean 0.1389, std 0.2670 -> threshold 0.406: a1 passes
    #   a1 is claimed by both and goes to the higher IoU (box 1: 0.667 > 0.5)
    matched = atss_assign([level0, level1], gts, topk=3)
    assert matched.tolist() == [0, 1, -1, -1, -1, -1]


def test_atss_centre_must_lie_inside_box():
    # the lone high-IoU candidate has its centre (4.5, 4.5) outside the thin box
    anchors = [torch.tensor([[0.0, 0, 9, 9], [40, 40, 49, 49], [80, 80, 89, 89]])]
    gts = torch.tensor([[5.0, 0, 30, 9]])
    assert atss_assign(anchors, gts, topk=3).tolist() == [-1, -1, -1]


def test_token_focal_loss_matches_direct_formula():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(2, 7, 5, generator=g, dtype=torch.float64)
    targets = (torch.rand(2, 7, 5, generator=g) > 0.7).double()
    text_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    p = logits.sigmoid()
    a, gamma = 0.25, 2.0
    direct = (-a * targets * (1 - p) ** gamma * torch.log(p)
              - (1 - a) * (1 - targets) * p ** gamma * torch.log(1 - p))
    expected = (direct * text_mask[:, None, :]).sum()
    got = token_sigmoid_focal_loss(logits, targets, text_mask, a, gamma)
    assert got.item() == pytest.approx(expected.item(), rel=1e-10)


def test_giou_loss_known_boxes():
    pred = torch.tensor([[0.0, 0, 1, 1], [0, 0, 2, 2], [0, 0, 4, 2]])
    target = torch.tensor([[2.0, 0, 3, 1], [0, 0, 1, 1], [0, 0, 4, 2]])
    # disjoint: IoU 0, union 2, hull 3 -> GIoU -1/3; nested: 1/4; identical: 1
    expected = [1 + 1 / 3, 0.75, 0.0]
    for i, value in enumerate(expected):
        assert giou_loss(pred[i:i + 1], target[i:i + 1]).item() == pytest.approx(value, abs=1e-6)
    weights = torch.tensor([1.0, 2.0, 3.0])
    assert giou_loss(pred, target, weights).item() == pytest.approx(4 / 3 + 1.5, abs=1e-6)
    # an all-zero weight falls back to the plain sum, as the original does
    assert giou_loss(pred, target, torch.zeros(3)).item() == pytest.approx(4 / 3 + 0.75, abs=1e-6)


def test_centerness_targets():
    coder = BoxCoder()
    anchors = torch.tensor([[0.0, 0, 9, 9], [0, 0, 9, 9]])          # centre (4.5, 4.5)
    boxes = torch.tensor([[0.0, 0, 9, 9], [0, 0, 29, 9]])           # l/r = 4.5/24.5, t/b = 1
    ctr = centerness_targets(coder.encode(boxes, anchors), anchors, coder)
    torch.testing.assert_close(ctr, torch.tensor([1.0, math.sqrt(4.5 / 24.5)]), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------
# Training path on the tiny head, and bad targets
# ------------------------------------------------------------------------------------------------

def _tiny_batch(config, B=2, Lt=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(B, c, 64 // s, 64 // s, generator=g)
             for c, s in zip(config.in_channels, (8, 16, 32))]
    hidden = torch.randn(B, Lt, config.lang_dim, generator=g)
    mask = torch.zeros(B, Lt, dtype=torch.long)
    mask[:, :7] = 1
    return feats, hidden, mask


def _targets(Lt=12):
    pmap = torch.zeros(2, Lt)
    pmap[0, 1], pmap[1, 3:5] = 1, 1
    return [{"boxes": torch.tensor([[4.0, 6, 40, 50], [30, 20, 60, 40]]), "positive_map": pmap},
            {"boxes": torch.zeros(0, 4), "positive_map": torch.zeros(0, Lt)}]


def _tiny_modules(seed=0):
    torch.manual_seed(seed)
    config = DetectionHeadConfig.tiny()
    return config, FPN(config), DetectionHead(config)


def test_tiny_training_step_gives_finite_losses_and_gradients():
    config, fpn, rpn = _tiny_modules()
    feats, hidden, mask = _tiny_batch(config)
    out = rpn(fpn(feats), hidden, mask)
    losses = rpn.loss(out, _targets(), mask, [(64, 64), (64, 64)])
    assert losses["num_pos"] > 0
    total = sum(v for k, v in losses.items() if k.startswith("loss_"))
    assert torch.isfinite(total)
    total.backward()
    tower = rpn.head.dyhead_tower[0]
    for p in (tower.offset.weight, tower.DyConv[0].conv.weight, tower.DyConv[2].conv.weight,
              rpn.head.dot_product_projection_text.weight, fpn.fpn_inner2.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_tower_checkpointing_gives_the_same_gradients():
    grads = []
    for recompute in (False, True):
        config, fpn, rpn = _tiny_modules()
        rpn.head.config = DetectionHeadConfig.tiny(checkpoint_tower=recompute)
        feats, hidden, mask = _tiny_batch(config)
        fpn.eval()
        losses = rpn.loss(rpn(fpn(feats), hidden, mask), _targets(), mask, [(64, 64)] * 2)
        (losses["loss_dot_product_token"] + losses["loss_reg"]).backward()
        grads.append([p.grad.clone() for p in rpn.head.dyhead_tower.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_tiny_head_fits_one_image():
    torch.manual_seed(1)
    config = DetectionHeadConfig.tiny(num_convs=1)  # one tower block keeps this cheap
    fpn, rpn = FPN(config).eval(), DetectionHead(config)  # eval: no DropBlock noise in the FPN
    feats, hidden, mask = _tiny_batch(config, B=1, seed=1)
    opt = torch.optim.Adam(list(fpn.parameters()) + list(rpn.parameters()), lr=3e-3)
    history = []
    for _ in range(10):
        losses = rpn.loss(rpn(fpn(feats), hidden, mask), _targets()[:1], mask, [(64, 64)])
        total = losses["loss_dot_product_token"] + losses["loss_reg"] + losses["loss_centerness"]
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append(total.item())
    assert history[-1] < 0.7 * history[0]


def test_image_without_boxes_is_all_negative_with_finite_loss():
    config, fpn, rpn = _tiny_modules()
    feats, hidden, mask = _tiny_batch(config, B=1)
    out = rpn(fpn(feats), hidden, mask)
    empty = [{"boxes": torch.zeros(0, 4), "positive_map": torch.zeros(0, 12)}]
    losses = rpn.loss(out, empty, mask, [(64, 64)])
    assert losses["num_pos"] == 0
    assert losses["loss_reg"].item() == 0 and losses["loss_centerness"].item() == 0
    assert torch.isfinite(losses["loss_dot_product_token"]) and losses["loss_dot_product_token"] > 0
    sum(v for k, v in losses.items() if k.startswith("loss_")).backward()  # graph stays valid
    anchors = torch.cat(out["anchors"])
    assert (atss_assign(out["anchors"], torch.zeros(0, 4)) == -1).all()
    assert anchors.shape[0] == sum(o.shape[1] for o in out["dot_product_logits"])


def test_targets_are_clipped_and_empty_boxes_dropped():
    pmap = torch.eye(3, 6)
    boxes = torch.tensor([[-10.0, 5, 30, 80], [10, 10, 10, 20], [50, 5, 70, 9]])
    with pytest.warns(UserWarning, match="zero area"):
        kept, kept_map = sanitize_targets(boxes, pmap, (40, 60), image_index=3)
    # box 0 clipped into 60x40; box 1 has zero width; box 2 keeps x1 = 50 < x2 = 59
    assert kept.tolist() == [[0.0, 5, 30, 39], [50, 5, 59, 9]]
    assert torch.equal(kept_map, pmap[[0, 2]])
    with pytest.raises(ValueError, match="positive_map"):
        sanitize_targets(boxes, pmap[:2], (40, 60))
    with pytest.raises(ValueError, match="NaN"):
        sanitize_targets(torch.tensor([[0.0, 0, float("nan"), 3]]), pmap[:1], (40, 60))


def test_box_entirely_outside_the_image_is_dropped_in_the_loss():
    config, fpn, rpn = _tiny_modules()
    feats, hidden, mask = _tiny_batch(config, B=1)
    out = rpn(fpn(feats), hidden, mask)
    pmap = torch.zeros(1, 12)
    pmap[0, 2] = 1
    outside = [{"boxes": torch.tensor([[100.0, 100, 150, 150]]), "positive_map": pmap}]
    with pytest.warns(UserWarning, match="zero area"):
        losses = rpn.loss(out, outside, mask, [(64, 64)])
    assert losses["num_pos"] == 0 and torch.isfinite(losses["loss_dot_product_token"])


def test_fpn_dropblock_only_in_training_and_only_on_top_down_levels():
    config, fpn, _ = _tiny_modules()
    feats, _, _ = _tiny_batch(config)
    with torch.no_grad():
        fpn.eval()
        ref = fpn(feats)
        assert all(torch.equal(a, b) for a, b in zip(ref, fpn(feats)))
        fpn.train()
        torch.manual_seed(0)
        noisy = fpn(feats)
    assert not torch.equal(noisy[0], ref[0])                       # P3 (a top-down sum)
    for level in (2, 3, 4):                                        # P5, P6, P7 are untouched
        assert torch.equal(noisy[level], ref[level])


# ------------------------------------------------------------------------------------------------
# Post-processing helpers
# ------------------------------------------------------------------------------------------------

def test_class_scores_average_tokens_of_each_label():
    probs = torch.tensor([[[0.2, 0.4, 0.9, 0.1]]])                  # (B=1, N=1, Lt=4)
    scores = class_scores(probs, {1: [0, 1], 3: [2]}, num_classes=3)
    torch.testing.assert_close(scores, torch.tensor([[[0.3, 0.0, 0.9]]]))
    with pytest.raises(ValueError, match="label 5"):
        class_scores(probs, {5: [0]}, num_classes=3)
    pmap = torch.tensor([[0.0, 1, 1, 0], [0, 0, 0, 1]])
    assert label_to_token_map(pmap) == {1: [1, 2], 2: [3]}


def test_detection_cap_keeps_ties_at_the_cut():
    scores = torch.tensor([5.0, 4.0, 3.0, 3.0, 1.0])
    assert _cap_detections(scores, 3).tolist() == [0, 1, 2, 3]
    assert _cap_detections(scores, 10).tolist() == [0, 1, 2, 3, 4]


def test_postprocess_without_candidates_returns_empty():
    config, fpn, rpn = _tiny_modules()
    feats, hidden, mask = _tiny_batch(config)
    rpn.eval()
    fpn.eval()
    with torch.no_grad():
        out = rpn(fpn(feats), hidden, mask)
    dets = rpn.postprocess(out, {1: [1], 2: [3, 4]}, [(64, 64), (60, 50)], threshold=1.0)
    assert [d["boxes"].shape for d in dets] == [(0, 4), (0, 4)]
    dets = rpn.postprocess(out, {1: [1], 2: [3, 4]}, [(64, 64), (60, 50)], threshold=0.0,
                           detections_per_image=5)
    assert len(dets[1]["scores"]) == 5
    assert (dets[1]["boxes"][:, 2] <= 49).all() and (dets[1]["boxes"][:, 3] <= 59).all()
    assert set(dets[0]["labels"].tolist()) <= {1, 2}
