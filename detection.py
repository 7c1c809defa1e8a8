"""Detection / grounding head of FIBER's fine-grained stage: FPN, VL DyHead, anchors, inference.

What sits on top of the fused backbone:

    C3, C4, C5 (strides 8, 16, 32) ── FPN ──> P3..P7 (strides 8..128, `channels` wide)
    P3..P7 ── 6 x DyConv block (deformable 3x3 over neighbouring levels, scale-aware attention,
              DyReLU) ──> tower features T_l
    T_l ── 1x1 convs ──> box deltas, centerness logit         (per anchor, one anchor per place)
    T_l · text tokens ──> dot-product logits (B, H*W, Lt)     (how well each place matches a token)

A category or phrase is a set of tokens (the "positive map"); its score at a place is the mean
sigmoid over its tokens. Training (ATSS assignment, focal/GIoU/centerness losses) lives in
detection_loss.py; the deformable convolution, NMS, box coder and anchors in detection_ops.py.

Parameter names follow the original checkpoint so weights load by name: `FPN` matches the keys
under `fusion_backbone.backbone.fpn.`, `DetectionHead` those under `rpn.` (see
`split_original_detection_state_dict`). Hence a few capitalised attribute names (`DyConv`,
`AttnConv`) that the checkpoint dictates.

Shape letters: B batch, C channels, L levels, Lt text tokens, D text width, N boxes.
"""
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from detection_loss import detection_losses
from detection_ops import (BoxCoder, batched_nms, cell_anchors, clip_boxes, grid_anchors,
                           modulated_deform_conv2d)


@dataclass
class DetectionHeadConfig:
    """Sizes and settings of the FPN + VL DyHead (defaults: the released Swin-B checkpoints)."""
    in_channels: tuple = (256, 512, 1024)  # widths of C3, C4, C5 from the fused Swin-B
    channels: int = 256          # FPN and tower width
    num_convs: int = 6           # DyConv blocks in the tower
    gn_groups: int = 16          # GroupNorm groups after each deformable conv
    lang_dim: int = 768          # width of the text hidden states (RoBERTa-base)
    num_cls_channels: int = 80   # unused class conv kept for the checkpoint; sets the label count
    anchor_sizes: tuple = (64, 128, 256, 512, 1024)  # one square anchor per place, 8x the stride
    anchor_strides: tuple = (8, 16, 32, 64, 128)     # P3..P7
    prior_prob: float = 0.01     # initial foreground probability (bias of the token logits)
    log_scale: float = 0.0       # dot-product logits are divided by exp(log_scale)
    dot_product_clamp: float = 50000.0  # logits are clamped to +-this (guards fp16 overflow)
    fpn_drop_prob: float = 0.3   # DropBlock on the FPN's top-down sums, training only
    fpn_drop_size: int = 3
    topk: int = 9                # ATSS: candidate anchors per level and box
    focal_alpha: float = 0.25    # token sigmoid focal loss
    focal_gamma: float = 2.0
    reg_loss_weight: float = 2.0  # weight of the GIoU loss
    inference_threshold: float = 0.05  # class score (before centerness) to become a candidate
    pre_nms_top_n: int = 1000    # candidates kept per level and image before NMS
    nms_threshold: float = 0.6   # class-aware NMS IoU threshold (+1 convention)
    detections_per_image: int = 100
    checkpoint_tower: bool = False  # recompute each tower block in backward: less memory, slower

    @classmethod
    def refexp(cls, **overrides):
        """Settings of the RefCOCO/+/g checkpoints: every box is a candidate, more kept."""
        return cls(**{"inference_threshold": 0.0, "pre_nms_top_n": 3000, **overrides})

    @classmethod
    def tiny(cls, **overrides):
        """A small head for CPU training and tests (pass the tiny backbone's widths)."""
        small = dict(in_channels=(32, 64, 128), channels=32, num_convs=2, gn_groups=8,
                     lang_dim=64, num_cls_channels=8)
        return cls(**{**small, **overrides})


# ------------------------------------------------------------------------------------------------
# FPN
# ------------------------------------------------------------------------------------------------

class DropBlock2D(nn.Module):
    """DropBlock: zero random square blocks of a feature map (all channels), training only."""

    def __init__(self, drop_prob, block_size):
        super().__init__()
        self.drop_prob = drop_prob
        self.block_size = block_size

    def forward(self, x):
        if not self.training or self.drop_prob == 0.0:
            return x
        gamma = self.drop_prob / self.block_size ** 2  # seed rate so blocks cover ~drop_prob
        seeds = (torch.rand(x.shape[0], 1, *x.shape[2:], device=x.device) < gamma).to(x.dtype)
        block = F.max_pool2d(seeds, self.block_size, stride=1, padding=self.block_size // 2)
        if self.block_size % 2 == 0:
            block = block[:, :, :-1, :-1]
        keep = 1 - block                                                      # (B, 1, H, W)
        return x * keep * (keep.numel() / keep.sum())


def _fpn_conv(in_channels, out_channels, kernel_size, stride=1):
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=(kernel_size - 1) // 2)
    nn.init.kaiming_uniform_(conv.weight, a=1)  # the original's "Caffe2 Xavier" init
    nn.init.zeros_(conv.bias)
    return conv


class LastLevelP6P7(nn.Module):
    """P6 = conv3x3/2(P5), P7 = conv3x3/2(ReLU(P6)) (from P5, as input and output widths match)."""

    def __init__(self, channels):
        super().__init__()
        self.p6 = _fpn_conv(channels, channels, 3, stride=2)
        self.p7 = _fpn_conv(channels, channels, 3, stride=2)

    def forward(self, p5):
        # The two smallest maps (well under 1% of the work) run in fp32 even under autocast: on
        # CPUs with native bf16, torch's bf16 weight gradient of a stride-2 convolution of a
        # 1x1 map is at times inf/NaN (measured with 64 channels: 185 of 300 draws), and small
        # inputs (the tiny preset's 64-128 px) make P6 exactly that.
        with torch.autocast(p5.device.type, enabled=False):
            p6 = self.p6(p5.float())
            return [p6, self.p7(F.relu(p6))]


class FPN(nn.Module):
    """Feature pyramid: C3..C5 -> P3..P7, all `channels` wide.

    Module names are those of the original (`fpn_inner2..4`, `fpn_layer2..4`, `top_blocks`):
    level index 2, 3, 4 = C3, C4, C5 because the original counts C2 (unused) as level 1.
    """

    def __init__(self, config):
        super().__init__()
        C = config.channels
        for level, width in enumerate(config.in_channels, start=2):
            self.add_module(f"fpn_inner{level}", _fpn_conv(width, C, 1))
            self.add_module(f"fpn_layer{level}", _fpn_conv(C, C, 3))
        self.levels = list(range(2, 2 + len(config.in_channels)))
        self.top_blocks = LastLevelP6P7(C)
        self.drop_block = DropBlock2D(config.fpn_drop_prob, config.fpn_drop_size)

    def forward(self, features):
        """features: [C3, C4, C5] (B, C_i, H_i, W_i) -> [P3, P4, P5, P6, P7] (B, C, h, w)."""
        if len(features) != len(self.levels):
            raise ValueError(f"FPN: expected {len(self.levels)} maps (C3..C5), got {len(features)}")
        top = self.levels[-1]
        inner = getattr(self, f"fpn_inner{top}")(features[-1])
        results = [getattr(self, f"fpn_layer{top}")(inner)]
        for feature, level in zip(features[-2::-1], self.levels[-2::-1]):
            lateral = getattr(self, f"fpn_inner{level}")(feature)
            inner = lateral + F.interpolate(inner, size=lateral.shape[-2:], mode="nearest")
            # the original regularises only these top-down sums (not the top level)
            results.insert(0, getattr(self, f"fpn_layer{level}")(self.drop_block(inner)))
        return results + self.top_blocks(results[-1])


# ------------------------------------------------------------------------------------------------
# DyHead tower
# ------------------------------------------------------------------------------------------------

def h_sigmoid(x):
    """Hard sigmoid relu6(x + 3) / 6."""
    return F.relu6(x + 3) / 6


class DeformConv3x3(nn.Module):
    """Modulated deformable 3x3 conv with bias; offsets and mask come from the caller."""

    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        self.stride = stride
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 3, 3))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        bound = 1.0 / math.sqrt(in_channels * 9)
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x, offset, mask):
        # fp32 even under autocast, as the original forces for its DCN kernel
        with torch.autocast(device_type=x.device.type, enabled=False):
            return modulated_deform_conv2d(x.float(), offset.float(), mask.float(), self.weight,
                                           self.bias, stride=self.stride, padding=1)


class Conv3x3Norm(nn.Module):
    """Deformable 3x3 conv followed by GroupNorm (keys `conv.*`, `bn.*`)."""

    def __init__(self, in_channels, out_channels, stride, gn_groups):
        super().__init__()
        self.conv = DeformConv3x3(in_channels, out_channels, stride)
        self.bn = nn.GroupNorm(gn_groups, out_channels)

    def forward(self, x, offset, mask):
        return self.bn(self.conv(x, offset, mask))


class DyReLU(nn.Module):
    """Dynamic ReLU (K=2, with bias): max(x*a1 + b1, x*a2 + b2), coefficients per channel.

    The four coefficient vectors come from the globally pooled input through a small MLP and a
    hard sigmoid, then are centred so that a fresh layer starts near a plain ReLU (a1 ~ 1,
    a2 ~ 0, b ~ 0).
    """

    def __init__(self, channels, reduction=4):
        super().__init__()
        self.channels = channels
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Linear(channels, channels // reduction), nn.ReLU(),
                                nn.Linear(channels // reduction, 4 * channels))

    def forward(self, x):
        B, C = x.shape[:2]
        y = h_sigmoid(self.fc(self.avg_pool(x).view(B, C))).view(B, 4 * C, 1, 1)
        a1, b1, a2, b2 = torch.split(y, C, dim=1)                             # (B, C, 1, 1) each
        a1 = (a1 - 0.5) * 2.0 + 1.0
        a2 = (a2 - 0.5) * 2.0
        b1 = b1 - 0.5
        b2 = b2 - 0.5
        return torch.max(x * a1 + b1, x * a2 + b2)


class DyConv(nn.Module):
    """One tower block: each level mixes itself, its finer and its coarser neighbour.

    For level l, one offset/mask prediction (from level l) drives three deformable convs: the
    same level (`DyConv.1`), the finer level l-1 with stride 2 (`DyConv.2`) and the coarser
    level l+1 (`DyConv.0`, then bilinearly upsampled with align_corners=True). Each term gets a
    scalar scale-aware attention h_sigmoid(ReLU(conv1x1(avgpool))); their mean goes through
    DyReLU.

    Original quirk kept on purpose: the coarser level's conv receives the offsets/mask of level
    l, which are larger than its output; the original CUDA op reads their memory as if they had
    the smaller shape (see detection_ops._as_output_grid). Released weights were trained so.
    """

    def __init__(self, channels, gn_groups):
        super().__init__()
        self.DyConv = nn.ModuleList([Conv3x3Norm(channels, channels, 1, gn_groups),
                                     Conv3x3Norm(channels, channels, 1, gn_groups),
                                     Conv3x3Norm(channels, channels, 2, gn_groups)])
        self.AttnConv = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, 1, 1), nn.ReLU())
        nn.init.normal_(self.AttnConv[1].weight, std=0.01)
        nn.init.zeros_(self.AttnConv[1].bias)
        self.relu = DyReLU(channels)
        self.offset = nn.Conv2d(channels, 27, 3, padding=1)  # 18 offsets (dy, dx) + 9 mask logits

    def forward(self, features):
        """features: list of L maps (B, C, H_l, W_l) -> list of L maps of the same shapes."""
        out = []
        for level, feature in enumerate(features):
            offset_mask = self.offset(feature)                                # (B, 27, H, W)
            offset, mask = offset_mask[:, :18], offset_mask[:, 18:].sigmoid()
            terms = [self.DyConv[1](feature, offset, mask)]
            if level > 0:
                terms.append(self.DyConv[2](features[level - 1], offset, mask))
            if level < len(features) - 1:
                coarse = self.DyConv[0](features[level + 1], offset, mask)
                terms.append(F.interpolate(coarse, size=feature.shape[-2:], mode="bilinear",
                                           align_corners=True))
            attn = torch.stack([h_sigmoid(self.AttnConv(t)) for t in terms])  # (n, B, 1, 1, 1)
            out.append(self.relu(torch.mean(torch.stack(terms) * attn, dim=0)))
        return out


class Scale(nn.Module):
    """A learned scalar multiplier (one per level on the box deltas)."""

    def __init__(self, init_value=1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([init_value]))

    def forward(self, x):
        return x * self.scale


# ------------------------------------------------------------------------------------------------
# VL DyHead and the detection module
# ------------------------------------------------------------------------------------------------

class VLDyHead(nn.Module):
    """Tower + predictors: box deltas, centerness and image-to-token dot-product logits."""

    def __init__(self, config):
        super().__init__()
        C = config.channels
        self.config = config
        self.dyhead_tower = nn.ModuleList(DyConv(C, config.gn_groups)
                                          for _ in range(config.num_convs))
        bias_value = -math.log((1 - config.prior_prob) / config.prior_prob)
        self.cls_logits = nn.Conv2d(C, config.num_cls_channels, 1)
        self.bbox_pred = nn.Conv2d(C, 4, 1)
        self.centerness = nn.Conv2d(C, 1, 1)
        for conv in (self.cls_logits, self.bbox_pred, self.centerness):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        nn.init.constant_(self.cls_logits.bias, bias_value)
        self.dot_product_projection_text = nn.Linear(config.lang_dim, C)
        self.log_scale = nn.Parameter(torch.tensor([config.log_scale]))
        self.bias_lang = nn.Parameter(torch.zeros(config.lang_dim))
        self.bias0 = nn.Parameter(torch.tensor([bias_value]))  # starts every token at prior_prob
        self.scales = nn.ModuleList(Scale(1.0) for _ in config.anchor_strides)

    def text_tokens(self, text_hidden, text_mask):
        """Projected tokens (B, Lt, C) and per-token bias (B, Lt) from the text hidden states."""
        embedded = text_hidden * text_mask.unsqueeze(-1).float()              # pads zeroed
        embedded = F.normalize(embedded, p=2, dim=-1)                         # zero rows stay 0
        tokens = self.dot_product_projection_text(embedded / 2.0)             # (B, Lt, C)
        token_bias = torch.matmul(embedded, self.bias_lang) + self.bias0      # (B, Lt)
        return tokens, token_bias

    def forward(self, features, text_hidden, text_mask):
        """features: P3..P7 (B, C, H_l, W_l); text_hidden (B, Lt, D); text_mask (B, Lt).

        Returns a dict of per-level lists: tower (B, C, H, W), bbox_reg (B, 4, H, W),
        centerness (B, 1, H, W), cls_logits (B, num_cls_channels, H, W) and
        dot_product_logits (B, H*W, Lt). Pad tokens get finite logits (their bias); losses and
        post-processing ignore them through the mask and the positive map.
        """
        if len(features) != len(self.scales):
            raise ValueError(f"VLDyHead: expected {len(self.scales)} levels, got {len(features)}")
        tower = list(features)
        recompute = self.config.checkpoint_tower and self.training and torch.is_grad_enabled()
        for block in self.dyhead_tower:
            # each deformable conv keeps ~6 tensors of K*C values per location for backward
            tower = checkpoint(block, tower, use_reentrant=False) if recompute else block(tower)
        tokens, token_bias = self.text_tokens(text_hidden, text_mask)
        out = {"tower": tower, "bbox_reg": [], "centerness": [], "cls_logits": [],
               "dot_product_logits": []}
        for level, t in enumerate(tower):
            B, C, H, W = t.shape
            out["bbox_reg"].append(self.scales[level](self.bbox_pred(t)))
            out["centerness"].append(self.centerness(t))
            out["cls_logits"].append(self.cls_logits(t))
            queries = t.permute(0, 2, 3, 1).reshape(B, H * W, C)              # (B, H*W, C)
            logits = torch.matmul(queries, tokens.transpose(-1, -2)) / self.log_scale.exp()
            logits = logits + token_bias[:, None, :]                          # (B, H*W, Lt)
            clamp = self.config.dot_product_clamp
            out["dot_product_logits"].append(logits.clamp(min=-clamp, max=clamp))
        return out


class BufferList(nn.Module):
    """Holds tensors as buffers named "0", "1", ... (the original's `cell_anchors` keys)."""

    def __init__(self, tensors):
        super().__init__()
        for i, t in enumerate(tensors):
            self.register_buffer(str(i), t)

    def __len__(self):
        return len(self._buffers)

    def __iter__(self):
        return iter(self._buffers.values())


class AnchorGenerator(nn.Module):
    """One square anchor per location and level; cell anchors are buffers as in the original."""

    def __init__(self, config):
        super().__init__()
        if len(config.anchor_sizes) != len(config.anchor_strides):
            raise ValueError("DetectionHeadConfig: anchor_sizes and anchor_strides need one entry "
                             f"per level, got {config.anchor_sizes} and {config.anchor_strides}")
        self.strides = tuple(config.anchor_strides)
        self.cell_anchors = BufferList(cell_anchors(stride, (size,))
                                       for stride, size in zip(self.strides, config.anchor_sizes))

    def forward(self, grid_sizes):
        """grid_sizes: [(H_l, W_l)] -> list of (H_l*W_l, 4) xyxy anchors, row-major."""
        return [grid_anchors(base, size, stride)
                for base, size, stride in zip(self.cell_anchors, grid_sizes, self.strides)]


class DetectionHead(nn.Module):
    """The `rpn` module of the original: VL DyHead, anchors, losses and post-processing."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.head = VLDyHead(config)
        self.anchor_generator = AnchorGenerator(config)
        self.box_coder = BoxCoder()

    def forward(self, features, text_hidden, text_mask):
        """P3..P7 and text states -> the head's outputs (see VLDyHead.forward) plus `anchors`."""
        out = self.head(features, text_hidden, text_mask)
        out["anchors"] = self.anchor_generator([f.shape[-2:] for f in features])
        return out

    def loss(self, outputs, targets, text_mask, image_sizes, reduce_mean=None):
        """Training losses; targets: per image {"boxes": (G, 4) xyxy, "positive_map": (G, Lt)}.

        Returns dict loss_dot_product_token, loss_reg, loss_centerness, loss_cls (always 0,
        kept so the unused class conv still takes part in the graph) and num_pos.
        `reduce_mean` averages a tensor over processes (distributed training); None = one process.
        """
        losses = detection_losses(outputs, targets, text_mask, image_sizes, self.config,
                                  self.box_coder, reduce_mean=reduce_mean)
        losses["loss_cls"] = 0.0 * sum(c.sum() for c in outputs["cls_logits"])
        return losses

    @torch.no_grad()
    def postprocess(self, outputs, label_to_tokens, image_sizes, *, num_classes=None,
                    threshold=None, pre_nms_top_n=None, nms_threshold=None,
                    detections_per_image=None):
        """Boxes per image from the head's outputs; settings default to the config."""
        cfg = self.config
        return postprocess_detections(
            outputs, label_to_tokens, image_sizes, self.box_coder,
            num_classes=num_classes or cfg.num_cls_channels,
            threshold=cfg.inference_threshold if threshold is None else threshold,
            pre_nms_top_n=pre_nms_top_n or cfg.pre_nms_top_n,
            nms_threshold=cfg.nms_threshold if nms_threshold is None else nms_threshold,
            detections_per_image=detections_per_image or cfg.detections_per_image)


# ------------------------------------------------------------------------------------------------
# Post-processing
# ------------------------------------------------------------------------------------------------

def label_to_token_map(positive_map, plus=1):
    """{label: [token indices]} of a (num_phrases, Lt) positive map; phrase i is label i+plus."""
    return {i + plus: row.nonzero().view(-1).tolist() for i, row in enumerate(positive_map)}


def class_scores(token_probs, label_to_tokens, num_classes):
    """(B, N, Lt) token probabilities -> (B, N, num_classes): mean over each label's tokens.

    Labels start at 1 (column label-1); labels absent from the map score 0.
    """
    B, N, _ = token_probs.shape
    scores = token_probs.new_zeros(B, N, num_classes)
    for label, tokens in label_to_tokens.items():
        if not 1 <= int(label) <= num_classes:
            raise ValueError(f"positive map: label {label} outside 1..{num_classes}; raise "
                             "num_classes (DetectionHeadConfig.num_cls_channels)")
        if len(tokens) > 0:
            scores[:, :, int(label) - 1] = token_probs[:, :, list(tokens)].mean(-1)
    return scores


def _level_candidates(bbox_reg, centerness, dot_logits, anchors, label_to_tokens, image_sizes,
                      box_coder, num_classes, threshold, pre_nms_top_n):
    """Per image (boxes (n, 4), scores (n,), labels (n,)) of one level's best candidates."""
    B = bbox_reg.shape[0]
    scores = class_scores(dot_logits.sigmoid(), label_to_tokens, num_classes)  # (B, HW, K)
    candidates = scores > threshold  # decided before centerness, as in the original
    n_keep = candidates.view(B, -1).sum(1).clamp(max=pre_nms_top_n)
    ctr = centerness.permute(0, 2, 3, 1).reshape(B, -1).sigmoid()             # (B, HW)
    scores = scores * ctr[:, :, None]
    deltas = bbox_reg.permute(0, 2, 3, 1).reshape(B, -1, 4)                   # (B, HW, 4)
    results = []
    for b in range(B):
        top_scores, top = scores[b][candidates[b]].topk(int(n_keep[b]), sorted=False)
        where = candidates[b].nonzero()[top]                                  # (n, 2) place, class
        boxes = box_coder.decode(deltas[b][where[:, 0]], anchors[where[:, 0]])
        results.append((clip_boxes(boxes, image_sizes[b]), torch.sqrt(top_scores), where[:, 1] + 1))
    return results


def _cap_detections(scores, limit):
    """Indices of the `limit` best scores; ties at the cut are all kept, like the original."""
    if not scores.numel() > limit > 0:
        return torch.arange(scores.numel(), device=scores.device)
    cut, _ = torch.kthvalue(scores.cpu().float(), scores.numel() - limit + 1)
    return (scores >= cut.item()).nonzero().view(-1)


def postprocess_detections(outputs, label_to_tokens, image_sizes, box_coder, *, num_classes,
                           threshold, pre_nms_top_n, nms_threshold, detections_per_image):
    """Final detections per image, in the network input's pixel coordinates.

    Args:
        outputs: DetectionHead.forward output (bbox_reg, centerness, dot_product_logits, anchors).
        label_to_tokens: {label (>= 1): [token indices]}, shared by the batch.
        image_sizes: per image (height, width) of the valid (unpadded) image; boxes are clipped
            to it.
    Returns:
        list of dicts: boxes (n, 4) xyxy, scores (n,) = sqrt(class score * centerness),
        labels (n,) long; sorted by descending score.
    """
    per_level = [_level_candidates(r, c, d, a, label_to_tokens, image_sizes, box_coder,
                                   num_classes, threshold, pre_nms_top_n)
                 for r, c, d, a in zip(outputs["bbox_reg"], outputs["centerness"],
                                       outputs["dot_product_logits"], outputs["anchors"])]
    detections = []
    for b in range(len(image_sizes)):
        boxes, scores, labels = (torch.cat(parts) for parts in zip(*(lv[b] for lv in per_level)))
        keep = batched_nms(boxes, scores, labels, nms_threshold)
        keep = keep[_cap_detections(scores[keep], detections_per_image)]
        detections.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
    return detections


# ------------------------------------------------------------------------------------------------
# Original checkpoint keys
# ------------------------------------------------------------------------------------------------

FPN_PREFIX = "fusion_backbone.backbone.fpn."
RPN_PREFIX = "rpn."


def split_original_detection_state_dict(state_dict):
    """The FPN's and the `rpn` module's weights from an original fine-grained state_dict.

    Strips a DDP `module.` prefix, then the two prefixes; names below them are this file's
    parameter names unchanged (e.g. `rpn.head.dyhead_tower.0.DyConv.1.conv.weight` ->
    `head.dyhead_tower.0.DyConv.1.conv.weight`, `fusion_backbone.backbone.fpn.top_blocks.p6.weight`
    -> `top_blocks.p6.weight`). Other keys (backbone, text encoder) are ignored.
    """
    fpn, rpn = {}, {}
    for key, value in state_dict.items():
        key = key[len("module."):] if key.startswith("module.") else key
        if key.startswith(FPN_PREFIX):
            fpn[key[len(FPN_PREFIX):]] = value
        elif key.startswith(RPN_PREFIX):
            rpn[key[len(RPN_PREFIX):]] = value
    return fpn, rpn


def _load_strict(module, weights, what, optional=()):
    own = module.state_dict()
    missing = [k for k in own if k not in weights and not k.startswith(optional)]
    unexpected = [k for k in weights if k not in own]
    wrong = [f"{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(own[k].shape)}"
             for k in weights if k in own and weights[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{what}: checkpoint does not fit DetectionHeadConfig; missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}, shape mismatch {wrong[:5]}")
    module.load_state_dict({**own, **weights})


def load_original_detection_weights(fpn, rpn, state_dict):
    """Load an original state_dict's FPN and `rpn.*` weights into `fpn` and `rpn`, strictly.

    Anchor buffers are geometry: when the checkpoint lacks them the module keeps its own.
    Raises ValueError naming missing/unexpected/mis-shaped keys (e.g. a `cls_logits` width that
    differs from `num_cls_channels`).
    """
    fpn_sd, rpn_sd = split_original_detection_state_dict(state_dict)
    if not fpn_sd and not rpn_sd:
        warnings.warn("load_original_detection_weights: no FPN or rpn keys in the state_dict")
    _load_strict(fpn, fpn_sd, "FPN (fusion_backbone.backbone.fpn.*)")
    _load_strict(rpn, rpn_sd, "detection head (rpn.*)", optional=("anchor_generator.",))
