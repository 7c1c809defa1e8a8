"""Plain-torch box and convolution operations for the fine-grained (detection) stage.

The original detector relies on compiled CUDA kernels for two of these: the modulated deformable
convolution (DCNv2) of the DyHead tower and the class-aware NMS of post-processing. Both are
rewritten here with ordinary torch ops so they run on CPU, reproduce the kernels' numbers and
keep autograd. The rest are the small geometric helpers of an anchor-based detector: box IoU,
the box coder and the anchor generator.

Box convention (inherited from the original): boxes are (x1, y1, x2, y2) in pixels and a box
covers the pixels x1..x2 inclusive, so widths, heights and areas carry a "+1".

Shape letters: B batch, C channels, O output channels, K kernel taps (9 for 3x3), H/W input
height/width, Ho/Wo output height/width, N/M numbers of boxes.
"""
import math

import torch


# ------------------------------------------------------------------------------------------------
# Modulated deformable convolution (DCNv2)
# ------------------------------------------------------------------------------------------------

def _as_output_grid(t, channels, Ho, Wo, name):
    """Read a per-sample offset/mask tensor as (B, channels, Ho, Wo), like the CUDA kernel does.

    The original kernel never checks the spatial size of `offset` and `mask`: it reads the first
    channels*Ho*Wo values of each sample's memory as if they had the output's shape. The DyHead
    relies on this by accident (its coarser-level branch passes offsets computed on the finer
    level), so the reinterpretation is reproduced, not rejected.
    """
    if t.dim() != 4 or t.shape[1] != channels:
        raise ValueError(f"modulated_deform_conv2d: `{name}` must be (B, {channels}, h, w), "
                         f"got shape {tuple(t.shape)}")
    if t.shape[2:] == (Ho, Wo):
        return t
    B, per_sample, need = t.shape[0], t[0].numel(), channels * Ho * Wo
    if per_sample < need:
        raise ValueError(f"modulated_deform_conv2d: `{name}` of shape {tuple(t.shape)} holds fewer "
                         f"than the {need} values per sample that an output of {Ho}x{Wo} reads")
    # reshape keeps each sample's logical (= memory) order, then the prefix is viewed as the output
    return t.reshape(B, -1)[:, :need].reshape(B, channels, Ho, Wo)


def _bilinear_corners(y, x, H, W):
    """Corner indices and weights of bilinear sampling at (y, x), zero outside the image.

    Matches the kernel's rules: a sample is zero unless -1 < y < H and -1 < x < W; inside that
    band each of the four corners that falls outside the image contributes zero.
    Returns a list of four (flat index (…), weight (…)) pairs in the kernel's summation order.
    """
    inside = (y > -1) & (x > -1) & (y < H) & (x < W)
    y0 = torch.floor(y)
    x0 = torch.floor(x)
    ly, lx = y - y0, x - x0
    hy, hx = 1 - ly, 1 - lx
    corners = []
    for cy, cx, w in ((y0, x0, hy * hx), (y0, x0 + 1, hy * lx),
                      (y0 + 1, x0, ly * hx), (y0 + 1, x0 + 1, ly * lx)):
        valid = inside & (cy >= 0) & (cy <= H - 1) & (cx >= 0) & (cx <= W - 1)
        index = (cy.clamp(0, H - 1) * W + cx.clamp(0, W - 1)).long()
        corners.append((index, torch.where(valid, w, torch.zeros_like(w))))
    return corners


def modulated_deform_conv2d(x, offset, mask, weight, bias=None, *, stride=1, padding=1, dilation=1):
    """Modulated deformable convolution (DCNv2), one deformable group, groups=1.

    Args:
        x: (B, C, H, W) input.
        offset: (B, 2K, h, w) sampling offsets; channel 2k is the row (y) shift of tap k and 2k+1
            the column (x) shift, taps in row-major order (k = i*kw + j). If (h, w) differs from
            the output size, each sample's memory is read as (2K, Ho, Wo) (original CUDA quirk).
        mask: (B, K, h, w) modulation (already passed through a sigmoid), same reading rule.
        weight: (O, C, kh, kw); bias: (O,) or None.
    Returns:
        (B, O, Ho, Wo). Tap k of output (ho, wo) samples x at (ho*stride - padding + i*dilation
        + dy, wo*stride - padding + j*dilation + dx) with zero-padded bilinear interpolation.
    """
    B, C, H, W = x.shape
    O, Cw, kh, kw = weight.shape
    if Cw != C:
        raise ValueError(f"modulated_deform_conv2d: weight expects {Cw} input channels, x has {C}")
    K = kh * kw
    Ho = (H + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    Wo = (W + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    offset = _as_output_grid(offset, 2 * K, Ho, Wo, "offset")
    mask = _as_output_grid(mask, K, Ho, Wo, "mask")

    # integer part of each sampling position, exactly as the kernel forms it before the offset
    taps_y = torch.arange(kh, device=x.device).repeat_interleave(kw) * dilation   # (K,)
    taps_x = torch.arange(kw, device=x.device).repeat(kh) * dilation              # (K,)
    rows = torch.arange(Ho, device=x.device) * stride - padding                   # (Ho,)
    cols = torch.arange(Wo, device=x.device) * stride - padding                   # (Wo,)
    base_y = (rows[None, :, None] + taps_y[:, None, None]).to(x.dtype)            # (K, Ho, 1)
    base_x = (cols[None, None, :] + taps_x[:, None, None]).to(x.dtype)            # (K, 1, Wo)
    y = base_y + offset[:, 0::2]                                                  # (B, K, Ho, Wo)
    xx = base_x + offset[:, 1::2]                                                 # (B, K, Ho, Wo)

    # gather the four corners as rows of a (B*H*W, C) table: one fast index_select per corner
    table = x.permute(0, 2, 3, 1).reshape(B * H * W, C)
    sample_start = (torch.arange(B, device=x.device) * (H * W)).view(B, 1, 1, 1)
    val = None
    for index, w in _bilinear_corners(y, xx, H, W):
        v = table.index_select(0, (index + sample_start).reshape(-1))             # (B*K*Ho*Wo, C)
        v = v.view(B, K, Ho, Wo, C)
        val = w.unsqueeze(-1) * v if val is None else val.addcmul(w.unsqueeze(-1), v)
    val = val * mask.unsqueeze(-1)                                          # (B, K, Ho, Wo, C)

    # im2col matmul: columns ordered (tap, channel) to match the permuted weight
    columns = val.permute(0, 2, 3, 1, 4).reshape(B * Ho * Wo, K * C)
    w_mat = weight.permute(0, 2, 3, 1).reshape(O, K * C)
    out = (columns @ w_mat.t()).view(B, Ho, Wo, O).permute(0, 3, 1, 2)            # (B, O, Ho, Wo)
    if bias is not None:
        out = out + bias.view(1, O, 1, 1)
    return out.contiguous()


# ------------------------------------------------------------------------------------------------
# Box IoU and non-maximum suppression
# ------------------------------------------------------------------------------------------------

def box_area(boxes):
    """Areas of (N, 4) xyxy boxes with the inclusive-pixel (+1) convention."""
    return (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)


def box_iou(boxes1, boxes2):
    """(N, M) IoU of xyxy boxes, +1 convention (as the original's boxlist_iou and NMS kernels)."""
    area1, area2 = box_area(boxes1), box_area(boxes2)
    lt = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])                      # (N, M, 2)
    rb = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])                      # (N, M, 2)
    wh = (rb - lt + 1).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area1[:, None] + area2[None, :] - inter)


def nms(boxes, scores, iou_threshold):
    """Greedy NMS: indices of kept boxes, highest score first.

    A box is suppressed when its IoU (+1 convention) with an already kept, higher-scoring box is
    strictly greater than `iou_threshold`, as in the original CUDA kernel.
    """
    order = torch.argsort(scores, descending=True, stable=True)
    if order.numel() == 0:
        return order
    overlaps = box_iou(boxes[order], boxes[order]) > iou_threshold               # (N, N)
    removed = torch.zeros(order.numel(), dtype=torch.bool, device=boxes.device)
    keep = []
    # one Python step per box; each kept box removes all its overlaps at once
    for i in range(order.numel()):
        if removed[i]:
            continue
        keep.append(i)
        removed |= overlaps[i]
    return order[torch.tensor(keep, dtype=torch.long, device=boxes.device)]


def batched_nms(boxes, scores, labels, iou_threshold):
    """Class-aware NMS: boxes of different labels never suppress each other.

    Returns kept indices sorted by descending score over all labels (the order of the original's
    GPU `ml_nms`). NMS runs per label, which also keeps the (N, N) IoU matrices small.
    """
    kept = []
    for lab in torch.unique(labels):
        idx = (labels == lab).nonzero().view(-1)
        kept.append(idx[nms(boxes[idx], scores[idx], iou_threshold)])
    if not kept:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    kept = torch.cat(kept)
    return kept[torch.argsort(scores[kept], descending=True, stable=True)]


# ------------------------------------------------------------------------------------------------
# Box coder
# ------------------------------------------------------------------------------------------------

class BoxCoder:
    """Encodes boxes as deltas (dx, dy, dw, dh) relative to anchors, and decodes them back.

    Widths use the +1 convention; deltas are scaled by `weights` (10, 10, 5, 5 in the original)
    and dw/dh are clamped at log(1000/16) before exp so a wild prediction cannot overflow.
    """

    def __init__(self, weights=(10.0, 10.0, 5.0, 5.0), clamp=math.log(1000.0 / 16)):
        self.weights = weights
        self.clamp = clamp

    @staticmethod
    def _centre_size(boxes):
        widths = boxes[:, 2] - boxes[:, 0] + 1
        heights = boxes[:, 3] - boxes[:, 1] + 1
        ctr_x = (boxes[:, 2] + boxes[:, 0]) / 2
        ctr_y = (boxes[:, 3] + boxes[:, 1]) / 2
        return ctr_x, ctr_y, widths, heights

    def encode(self, boxes, anchors):
        """(N, 4) xyxy boxes and (N, 4) anchors -> (N, 4) deltas."""
        wx, wy, ww, wh = self.weights
        ax, ay, aw, ah = self._centre_size(anchors)
        gx, gy, gw, gh = self._centre_size(boxes)
        dx = wx * (gx - ax) / aw
        dy = wy * (gy - ay) / ah
        dw = ww * torch.log(gw / aw)
        dh = wh * torch.log(gh / ah)
        return torch.stack((dx, dy, dw, dh), dim=1)

    def decode(self, deltas, anchors):
        """(N, 4) deltas and (N, 4) anchors -> (N, 4) xyxy boxes."""
        wx, wy, ww, wh = self.weights
        anchors = anchors.to(deltas.dtype)
        ax, ay, aw, ah = self._centre_size(anchors)
        dx, dy = deltas[:, 0] / wx, deltas[:, 1] / wy
        dw = torch.clamp(deltas[:, 2] / ww, max=self.clamp)
        dh = torch.clamp(deltas[:, 3] / wh, max=self.clamp)
        ctr_x = dx * aw + ax
        ctr_y = dy * ah + ay
        w = torch.exp(dw) * aw
        h = torch.exp(dh) * ah
        return torch.stack((ctr_x - 0.5 * (w - 1), ctr_y - 0.5 * (h - 1),
                            ctr_x + 0.5 * (w - 1), ctr_y + 0.5 * (h - 1)), dim=1)


def clip_boxes(boxes, image_size):
    """Clamp xyxy boxes into an image of (height, width): x to [0, w-1], y to [0, h-1]."""
    h, w = image_size
    x1 = boxes[:, 0].clamp(min=0, max=w - 1)
    y1 = boxes[:, 1].clamp(min=0, max=h - 1)
    x2 = boxes[:, 2].clamp(min=0, max=w - 1)
    y2 = boxes[:, 3].clamp(min=0, max=h - 1)
    return torch.stack((x1, y1, x2, y2), dim=-1)


# ------------------------------------------------------------------------------------------------
# Anchors
# ------------------------------------------------------------------------------------------------

def _boxes_around(ws, hs, ctr_x, ctr_y):
    return torch.stack((ctr_x - 0.5 * (ws - 1), ctr_y - 0.5 * (hs - 1),
                        ctr_x + 0.5 * (ws - 1), ctr_y + 0.5 * (hs - 1)), dim=1)


def cell_anchors(stride, sizes, aspect_ratios=(1.0,)):
    """(A, 4) float32 anchors of one level around the first cell, A = len(ratios) * len(sizes).

    Start from the box (0, 0, stride-1, stride-1); for each aspect ratio (h/w) keep its area with
    rounded sides, then scale by size/stride, always about the cell centre (stride-1)/2.
    Computed in float64 like the original (numpy) and rounded half to even.
    """
    base = float(stride)
    ctr = 0.5 * (base - 1)
    ratios = torch.tensor(aspect_ratios, dtype=torch.float64)
    scales = torch.tensor(sizes, dtype=torch.float64) / stride
    ws = torch.round(torch.sqrt(base * base / ratios))
    hs = torch.round(ws * ratios)
    per_ratio = []
    for w, h in zip(ws, hs):
        per_ratio.append(_boxes_around(w * scales, h * scales, torch.full_like(scales, ctr),
                                       torch.full_like(scales, ctr)))
    return torch.cat(per_ratio).float()


def grid_anchors(base_anchors, grid_size, stride):
    """(H*W*A, 4) anchors of one level: the cell anchors shifted to every location, row-major."""
    H, W = grid_size
    device = base_anchors.device
    shifts_x = torch.arange(0, W * stride, step=stride, dtype=torch.float32, device=device)
    shifts_y = torch.arange(0, H * stride, step=stride, dtype=torch.float32, device=device)
    shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
    shifts = torch.stack((shift_x.reshape(-1), shift_y.reshape(-1),
                          shift_x.reshape(-1), shift_y.reshape(-1)), dim=1)       # (H*W, 4)
    return (shifts.view(-1, 1, 4) + base_anchors.view(1, -1, 4)).reshape(-1, 4)
