"""Unit tests of detection_ops: deformable conv, IoU/NMS, box coder, anchors."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import load_golden
from detection_ops import (BoxCoder, batched_nms, box_iou, cell_anchors, clip_boxes, grid_anchors,
                           modulated_deform_conv2d, nms)


# ------------------------------------------------------------------------------------------------
# A literal, loop-based reading of the CUDA im2col kernel (slow; tiny inputs only)
# ------------------------------------------------------------------------------------------------

def _bilinear_ref(img, y, x):
    """Zero unless -1 < y < H and -1 < x < W; each corner outside the image counts as 0."""
    H, W = len(img), len(img[0])
    if not (-1 < y < H and -1 < x < W):
        return 0.0
    y0, x0 = math.floor(y), math.floor(x)
    ly, lx = y - y0, x - x0
    val = 0.0
    for yy, xx, w in ((y0, x0, (1 - ly) * (1 - lx)), (y0, x0 + 1, (1 - ly) * lx),
                      (y0 + 1, x0, ly * (1 - lx)), (y0 + 1, x0 + 1, ly * lx)):
        if 0 <= yy < H and 0 <= xx < W:
            val += w * img[yy][xx]
    return val


def _dcn_ref(x, offset, mask, weight, bias, stride, pad):
    """Per sample, offsets/mask are read from flat memory with the output's shape (the quirk)."""
    B, C, H, W = x.shape
    O, _, kh, kw = weight.shape
    Ho, Wo = (H + 2 * pad - kh) // stride + 1, (W + 2 * pad - kw) // stride + 1
    out = torch.zeros(B, O, Ho, Wo, dtype=torch.float64)
    for b in range(B):
        off, msk = offset[b].reshape(-1).tolist(), mask[b].reshape(-1).tolist()
        img = x[b].tolist()
        for h in range(Ho):
            for w in range(Wo):
                cols = []
                for c in range(C):
                    for i in range(kh):
                        for j in range(kw):
                            k = i * kw + j
                            dy = off[((2 * k) * Ho + h) * Wo + w]
                            dx = off[((2 * k + 1) * Ho + h) * Wo + w]
                            m = msk[(k * Ho + h) * Wo + w]
                            y, xx = h * stride - pad + i + dy, w * stride - pad + j + dx
                            cols.append(_bilinear_ref(img[c], y, xx) * m)
                col = torch.tensor(cols, dtype=torch.float64)
                out[b, :, h, w] = weight.reshape(O, -1).double() @ col + bias.double()
    return out


def _random_dcn_inputs(seed, B=2, C=3, H=5, W=6, O=4, off_hw=None, stride=1):
    g = torch.Generator().manual_seed(seed)
    Ho, Wo = (H - 1) // stride + 1, (W - 1) // stride + 1
    oh, ow = off_hw or (Ho, Wo)
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    offset = 2.5 * torch.randn(B, 18, oh, ow, generator=g, dtype=torch.float64)  # some far out
    mask = torch.rand(B, 9, oh, ow, generator=g, dtype=torch.float64)
    weight = torch.randn(O, C, 3, 3, generator=g, dtype=torch.float64)
    bias = torch.randn(O, generator=g, dtype=torch.float64)
    return x, offset, mask, weight, bias


# ------------------------------------------------------------------------------------------------
# Deformable convolution
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stride", [1, 2])
def test_dcn_zero_offsets_equal_plain_conv(stride):
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 8, 7, 9), torch.randn(5, 8, 3, 3), torch.randn(5)
    Ho, Wo = (7 - 1) // stride + 1, (9 - 1) // stride + 1
    out = modulated_deform_conv2d(x, torch.zeros(2, 18, Ho, Wo), torch.ones(2, 9, Ho, Wo), w, b,
                                  stride=stride)
    # 72-term fp32 dot products of N(0,1) values (|out| ~ 10): summation order differs by ~1e-5
    torch.testing.assert_close(out, F.conv2d(x, w, b, stride=stride, padding=1),
                               atol=5e-5, rtol=1e-5)


@pytest.mark.parametrize("dy,dx", [(1, -2), (-3, 0), (2, 2)])
def test_dcn_integer_offsets_equal_shifted_conv(dy, dx):
    torch.manual_seed(1)
    x = torch.randn(1, 4, 6, 7, dtype=torch.float64)
    w, b = torch.randn(3, 4, 3, 3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    offset = torch.zeros(1, 18, 6, 7, dtype=torch.float64)
    offset[:, 0::2], offset[:, 1::2] = dy, dx
    out = modulated_deform_conv2d(x, offset, torch.ones(1, 9, 6, 7, dtype=torch.float64), w, b)
    # every tap reads (h - 1 + i + dy, w - 1 + j + dx): a plain conv over a zero canvas, shifted
    canvas = F.pad(x, (4, 4, 4, 4))
    window = canvas[:, :, 3 + dy:3 + dy + 6 + 2, 3 + dx:3 + dx + 7 + 2]
    torch.testing.assert_close(out, F.conv2d(window, w, b), atol=1e-12, rtol=0)


def test_dcn_fractional_offsets_hand_computed():
    # one channel holding 0..11 on a 3x4 grid; only the centre tap has weight 1, so each output
    # is the bilinear sample at (ho + dy, wo + dx) times its mask (0.5)
    x = torch.arange(12, dtype=torch.float64).view(1, 1, 3, 4)
    weight = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
    weight[0, 0, 1, 1] = 1.0
    offset = torch.zeros(1, 18, 3, 4, dtype=torch.float64)
    mask = torch.full((1, 9, 3, 4), 0.5, dtype=torch.float64)
    cases = {  # output pixel: (sample y, sample x, value by hand)
        (0, 0): (-0.5, 1.25, 0.5 * (0.75 * 1 + 0.25 * 2)),  # row -1 corners are zero
        (0, 1): (2.5, 3.5, 0.25 * 11),                      # only corner (2, 3) is inside
        (0, 2): (-1.0, 0.0, 0.0),                           # y = -1 is outside the band
        (0, 3): (1.5, -0.75, 0.25 * (0.5 * 4 + 0.5 * 8)),   # column -1 corners are zero
        (1, 0): (3.0, 0.0, 0.0),                            # y = H is outside the band
        (1, 1): (0.25, 2.0, 0.75 * 2 + 0.25 * 6),           # ordinary interior sample
    }
    for (h, w), (y, xx, _) in cases.items():
        offset[0, 8, h, w], offset[0, 9, h, w] = y - h, xx - w  # tap 4: channels 8 (dy), 9 (dx)
    out = modulated_deform_conv2d(x, offset, mask, weight, None)
    for (h, w), (y, xx, value) in cases.items():
        assert out[0, 0, h, w].item() == pytest.approx(0.5 * value, abs=1e-12), (y, xx)


@pytest.mark.parametrize("seed,stride", [(0, 1), (1, 2), (2, 1)])
def test_dcn_matches_literal_kernel(seed, stride):
    x, offset, mask, weight, bias = _random_dcn_inputs(seed, stride=stride)
    out = modulated_deform_conv2d(x, offset, mask, weight, bias, stride=stride)
    torch.testing.assert_close(out, _dcn_ref(x, offset, mask, weight, bias, stride, 1),
                               atol=1e-12, rtol=0)


def test_dcn_cross_level_offsets_read_as_smaller_shape():
    # DyHead's coarser-level branch: offsets of a 5x6 level drive a conv whose output is 3x3
    x, offset, mask, weight, bias = _random_dcn_inputs(3, H=3, W=3, off_hw=(5, 6))
    out = modulated_deform_conv2d(x, offset, mask, weight, bias)
    torch.testing.assert_close(out, _dcn_ref(x, offset, mask, weight, bias, 1, 1),
                               atol=1e-12, rtol=0)
    # the same as handing over each sample's leading memory explicitly
    lead_off = torch.stack([o.reshape(-1)[:18 * 9].view(18, 3, 3) for o in offset])
    lead_mask = torch.stack([m.reshape(-1)[:9 * 9].view(9, 3, 3) for m in mask])
    torch.testing.assert_close(out, modulated_deform_conv2d(x, lead_off, lead_mask, weight, bias))
    # a non-contiguous slice (as DyHead passes offset_mask[:, :18]) reads the same values
    both = torch.cat([offset, torch.randn(2, 9, 5, 6, dtype=torch.float64)], dim=1)
    torch.testing.assert_close(modulated_deform_conv2d(x, both[:, :18], mask, weight, bias), out)


def test_dcn_rejects_offsets_smaller_than_output():
    x, offset, mask, weight, bias = _random_dcn_inputs(4, H=5, W=6, off_hw=(2, 2))
    with pytest.raises(ValueError, match="offset"):
        modulated_deform_conv2d(x, offset, mask, weight, bias)


def test_dcn_gradients():
    # fractional offsets away from integer grid lines, where bilinear sampling is smooth
    x, offset, mask, weight, bias = _random_dcn_inputs(5, B=1, C=2, H=3, W=4, O=2)
    offset = (offset.round() + 0.3 + 0.4 * torch.rand_like(offset)).requires_grad_()
    args = (x.requires_grad_(), offset, mask.requires_grad_(), weight.requires_grad_(),
            bias.requires_grad_())
    assert torch.autograd.gradcheck(modulated_deform_conv2d, args, eps=1e-6, atol=1e-6,
                                    fast_mode=True)


# ------------------------------------------------------------------------------------------------
# IoU and NMS
# ------------------------------------------------------------------------------------------------

def test_box_iou_plus_one_convention():
    a = torch.tensor([[0.0, 0.0, 9.0, 9.0]])                    # 10 x 10 pixels
    b = torch.tensor([[5.0, 5.0, 14.0, 14.0], [20.0, 20.0, 29.0, 29.0], [0.0, 0.0, 9.0, 9.0]])
    torch.testing.assert_close(box_iou(a, b), torch.tensor([[25 / 175, 0.0, 1.0]]))


def _iou_py(a, b):
    w = max(min(a[2], b[2]) - max(a[0], b[0]) + 1, 0.0)
    h = max(min(a[3], b[3]) - max(a[1], b[1]) + 1, 0.0)
    inter = w * h
    area_a = (a[2] - a[0] + 1) * (a[3] - a[1] + 1)
    area_b = (b[2] - b[0] + 1) * (b[3] - b[1] + 1)
    return inter / (area_a + area_b - inter)


def _nms_ref(boxes, scores, labels, thr):
    """Brute force: visit by descending score (stable), keep unless a kept box of the same label
    overlaps by more than thr."""
    boxes, scores, labels = boxes.tolist(), scores.tolist(), labels.tolist()
    keep = []
    for i in sorted(range(len(scores)), key=lambda i: -scores[i]):
        if all(labels[k] != labels[i] or _iou_py(boxes[i], boxes[k]) <= thr for k in keep):
            keep.append(i)
    return keep


def _random_boxes(seed, n=60):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * 50
    wh = 1 + torch.rand(n, 2, generator=g, dtype=torch.float64) * 30
    boxes = torch.cat([xy, xy + wh], dim=1)
    boxes[n // 2] = boxes[0]                                        # an exact duplicate
    scores = torch.round(torch.rand(n, generator=g, dtype=torch.float64) * 6) / 6  # many ties
    labels = torch.randint(1, 4, (n,), generator=g)
    return boxes, scores, labels


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("thr", [0.3, 0.6])
def test_nms_matches_brute_force(seed, thr):
    boxes, scores, _ = _random_boxes(seed)
    ones = torch.ones(len(scores), dtype=torch.long)
    assert nms(boxes, scores, thr).tolist() == _nms_ref(boxes, scores, ones, thr)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_batched_nms_matches_brute_force(seed):
    boxes, scores, labels = _random_boxes(seed)
    keep = batched_nms(boxes, scores, labels, 0.6)
    assert sorted(keep.tolist()) == sorted(_nms_ref(boxes, scores, labels, 0.6))
    assert (scores[keep][1:] <= scores[keep][:-1]).all()           # highest score first


def test_batched_nms_labels_never_suppress_each_other():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 3)
    keep = batched_nms(boxes, torch.tensor([0.9, 0.8, 0.7]), torch.tensor([1, 2, 1]), 0.5)
    assert keep.tolist() == [0, 1]


def test_nms_empty():
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.5).numel() == 0
    assert batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long),
                       0.5).numel() == 0


# ------------------------------------------------------------------------------------------------
# Box coder, clipping, anchors
# ------------------------------------------------------------------------------------------------

def test_box_coder_round_trip():
    g = torch.Generator().manual_seed(0)
    anchors = torch.rand(50, 2, generator=g, dtype=torch.float64) * 100
    anchors = torch.cat([anchors, anchors + 8 + 60 * torch.rand(50, 2, generator=g,
                                                                dtype=torch.float64)], 1)
    boxes = anchors + 10 * torch.randn(50, 4, generator=g, dtype=torch.float64)
    boxes[:, 2:] = torch.max(boxes[:, 2:], boxes[:, :2] + 1)
    coder = BoxCoder()
    torch.testing.assert_close(coder.decode(coder.encode(boxes, anchors), anchors), boxes,
                               atol=1e-9, rtol=0)


def test_box_coder_known_values_and_clamp():
    coder = BoxCoder()
    anchor = torch.tensor([[0.0, 0.0, 9.0, 9.0]])              # 10 px wide, centre 4.5
    box = torch.tensor([[5.0, 0.0, 14.0, 19.0]])               # centre (9.5, 9.5), 10 x 20
    expected = torch.tensor([[10 * 5 / 10, 10 * 5 / 10, 5 * math.log(1.0), 5 * math.log(2.0)]])
    torch.testing.assert_close(coder.encode(box, anchor), expected)
    # dw is clamped at log(1000/16) before exp: width at most 62.5x the anchor's
    wide = coder.decode(torch.tensor([[0.0, 0.0, 100.0, 0.0]]), anchor)
    assert (wide[0, 2] - wide[0, 0] + 1).item() == pytest.approx(625.0, rel=1e-6)


def test_clip_boxes():
    boxes = torch.tensor([[-5.0, -1.0, 50.0, 30.0], [3.0, 4.0, 5.0, 6.0]])
    clipped = clip_boxes(boxes, (20, 40))                         # (height, width)
    assert clipped.tolist() == [[0.0, 0.0, 39.0, 19.0], [3.0, 4.0, 5.0, 6.0]]


def test_cell_anchors_published_values():
    # the widely printed Detectron table (stride 16, sizes 128/256/512, ratios 0.5/1/2) has its
    # centre at 8.5; with the base box (0, 0, 15, 15) used here the centre is 7.5: one px less
    printed = [
        [-83, -39, 100, 56], [-175, -87, 192, 104], [-359, -183, 376, 200],
        [-55, -55, 72, 72], [-119, -119, 136, 136], [-247, -247, 264, 264],
        [-35, -79, 52, 96], [-79, -167, 96, 184], [-167, -343, 184, 360]]
    anchors = cell_anchors(16, (128, 256, 512), (0.5, 1.0, 2.0))
    assert anchors.tolist() == [[v - 1 for v in row] for row in printed]
    assert cell_anchors(8, (64,)).tolist() == [[-28.0, -28.0, 35.0, 35.0]]


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_grid_anchors_equal_golden(version):
    golden = load_golden(f"fine_{version}")
    sizes = golden["meta"]["level_hw"]
    for level, (stride, size) in enumerate(zip((8, 16, 32, 64, 128), (64, 128, 256, 512, 1024))):
        anchors = grid_anchors(cell_anchors(stride, (size,)), sizes[level], stride)
        assert torch.equal(anchors, golden["outputs"]["anchors"][level])
