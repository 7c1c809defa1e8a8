"""Training targets and losses of the detection / grounding head.

ATSS (adaptive training sample selection) decides which anchors are positives for which ground
truth box; each positive anchor must then predict the box's tokens (sigmoid focal loss on the
dot-product logits), the box itself (GIoU on decoded boxes, weighted by centerness) and its
centerness (BCE). Formulas follow the original `ATSSLossComputation` with its constants.

Shape letters: B batch, A anchors of all levels, G ground-truth boxes, Lt text tokens.
"""
import warnings

import torch
import torch.nn.functional as F

from detection_ops import box_iou, clip_boxes

INF = 1e8  # stands for "not a positive pair" in the IoU table


def sanitize_targets(boxes, positive_map, image_size, image_index=0):
    """Clip boxes into the image; drop (with a warning) those left with zero area.

    Args:
        boxes: (G, 4) xyxy in input pixels; positive_map: (G, Lt) tokens of each box's phrase.
        image_size: (height, width) of the valid image.
    Returns:
        (boxes (G', 4) float32, positive_map (G', Lt) float32).
    """
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    positive_map = torch.as_tensor(positive_map).float()
    if positive_map.dim() != 2 or positive_map.shape[0] != boxes.shape[0]:
        raise ValueError(f"detection targets, image {image_index}: 'positive_map' needs one row "
                         f"per box ({boxes.shape[0]}), got shape {tuple(positive_map.shape)}")
    if not torch.isfinite(boxes).all():
        raise ValueError(f"detection targets, image {image_index}: 'boxes' holds NaN or inf; "
                         "fix the annotation")
    boxes = clip_boxes(boxes, image_size)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    if not keep.all():
        warnings.warn(f"detection targets, image {image_index}: dropped {int((~keep).sum())} "
                      "box(es) of zero area after clipping to the image (field 'boxes')")
    return boxes[keep], positive_map[keep]


def box_centres(boxes):
    """(N, 2) centres (x, y) of xyxy boxes."""
    return torch.stack(((boxes[:, 2] + boxes[:, 0]) / 2.0, (boxes[:, 3] + boxes[:, 1]) / 2.0), 1)


def _candidates_per_level(distances, level_sizes, topk):
    """Per level the `topk` anchors closest to each box centre: (sum_l min(topk, A_l), G)."""
    chosen, start = [], 0
    for size in level_sizes:
        k = min(topk, size)
        _, idx = distances[start:start + size].topk(k, dim=0, largest=False)
        chosen.append(idx + start)
        start += size
    return torch.cat(chosen)


def atss_assign(anchors_per_level, gt_boxes, topk=9):
    """ATSS: index of the matched box for every anchor, -1 for negatives; (A,) long.

    Candidates are the `topk` anchors per level nearest (centre distance) to a box; a candidate
    is positive when its IoU (+1 convention) reaches mean + std of its box's candidate IoUs and
    its centre lies inside the box (by more than 0.01 px). An anchor claimed by several boxes
    goes to the one with the highest IoU.
    """
    anchors = torch.cat(anchors_per_level)
    A, G = anchors.shape[0], gt_boxes.shape[0]
    if G == 0:
        return torch.full((A,), -1, dtype=torch.long, device=anchors.device)
    ious = box_iou(anchors, gt_boxes)                                         # (A, G)
    anchor_ctr = box_centres(anchors)
    distances = (anchor_ctr[:, None, :] - box_centres(gt_boxes)[None]).pow(2).sum(-1).sqrt()
    cand = _candidates_per_level(distances, [len(a) for a in anchors_per_level], topk)  # (K, G)

    cand_ious = ious.gather(0, cand)                                          # (K, G)
    is_pos = cand_ious >= (cand_ious.mean(0) + cand_ious.std(0))[None, :]
    cx, cy = anchor_ctr[cand, 0], anchor_ctr[cand, 1]                         # (K, G)
    inside = torch.stack([cx - gt_boxes[:, 0], cy - gt_boxes[:, 1],
                          gt_boxes[:, 2] - cx, gt_boxes[:, 3] - cy]).min(0).values > 0.01
    is_pos &= inside

    gt_index = torch.arange(G, device=anchors.device).expand_as(cand)
    pos_anchor, pos_gt = cand[is_pos], gt_index[is_pos]
    table = torch.full_like(ious, -INF)
    table[pos_anchor, pos_gt] = ious[pos_anchor, pos_gt]
    best, matched = table.max(dim=1)
    matched[best == -INF] = -1
    return matched


def image_targets(anchors_per_level, gt_boxes, positive_map, num_tokens, topk, box_coder):
    """Targets of one image: token targets (A, Lt), box deltas (A, 4), positive mask (A,).

    Unmatched anchors target a one-hot on the last token (the original's "no object" slot,
    normally a pad position that the text mask removes from the loss).
    """
    anchors = torch.cat(anchors_per_level)
    if positive_map.shape[1] > num_tokens:
        raise ValueError(f"detection targets: positive_map has {positive_map.shape[1]} token "
                         f"columns, the text has only {num_tokens}")
    positive_map = F.pad(positive_map, (0, num_tokens - positive_map.shape[1]))
    matched = atss_assign(anchors_per_level, gt_boxes, topk)
    pos = matched >= 0
    tokens = anchors.new_zeros(anchors.shape[0], num_tokens)
    tokens[~pos, -1] = 1.0
    tokens[pos] = (positive_map[matched[pos]] > 0).to(tokens.dtype)  # binarised, as the collator
    deltas = anchors.new_zeros(anchors.shape[0], 4)
    deltas[pos] = box_coder.encode(gt_boxes[matched[pos]], anchors[pos])
    return tokens, deltas, pos


def token_sigmoid_focal_loss(logits, targets, text_mask, alpha=0.25, gamma=2.0):
    """Summed sigmoid focal loss over (anchor, token) pairs whose token is real text.

    logits, targets: (B, A, Lt); text_mask: (B, Lt), > 0 for real tokens.
    loss = BCE(x, t) * (1 - p_t)^gamma * alpha_t, alpha_t = alpha*t + (1-alpha)*(1-t).
    """
    keep = (text_mask > 0)[:, None, :].expand_as(logits)
    x, t = logits[keep], targets[keep]
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    alpha_t = alpha * t + (1 - alpha) * (1 - t)
    return (alpha_t * ce * (1 - p_t) ** gamma).sum()


def giou_loss(pred, target, weight=None):
    """Summed 1 - GIoU of (N, 4) xyxy boxes (areas without +1, eps 1e-7), optionally weighted.

    As in the original, an all-zero weight falls back to the unweighted sum.
    """
    x1, y1 = pred[:, 0], pred[:, 1]
    x2, y2 = torch.max(x1, pred[:, 2]), torch.max(y1, pred[:, 3])  # repair inverted predictions
    pred_area = (x2 - x1) * (y2 - y1)
    tx1, ty1, tx2, ty2 = target.unbind(1)
    target_area = (tx2 - tx1) * (ty2 - ty1)
    inter = ((torch.min(x2, tx2) - torch.max(x1, tx1)).clamp(min=0)
             * (torch.min(y2, ty2) - torch.max(y1, ty1)).clamp(min=0))
    enclosing = ((torch.max(x2, tx2) - torch.min(x1, tx1))
                 * (torch.max(y2, ty2) - torch.min(y1, ty1)) + 1e-7)
    union = pred_area + target_area - inter + 1e-7
    losses = 1 - (inter / union - (enclosing - union) / enclosing)
    if weight is not None and weight.sum() > 0:
        return (losses * weight).sum()
    return losses.sum()


def centerness_targets(deltas, anchors, box_coder):
    """sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b)) from anchor centres to their decoded boxes."""
    boxes = box_coder.decode(deltas, anchors)
    ctr = box_centres(anchors)
    left_right = torch.stack([ctr[:, 0] - boxes[:, 0], boxes[:, 2] - ctr[:, 0]], dim=1)
    top_bottom = torch.stack([ctr[:, 1] - boxes[:, 1], boxes[:, 3] - ctr[:, 1]], dim=1)
    return torch.sqrt(left_right.min(-1).values / left_right.max(-1).values
                      * top_bottom.min(-1).values / top_bottom.max(-1).values)


def _flatten_levels(maps, width):
    """Per-level (B, width, H, W) maps -> (B, A, width), row-major per level, levels in order."""
    return torch.cat([m.permute(0, 2, 3, 1).reshape(m.shape[0], -1, width) for m in maps], dim=1)


def detection_losses(outputs, targets, text_mask, image_sizes, config, box_coder,
                     reduce_mean=None):
    """Losses of the head's outputs (see DetectionHead.loss for the arguments).

    Normalisers follow the original: the token and centerness losses are divided by the number
    of positives (averaged over processes, at least 1); the GIoU loss by the summed centerness
    targets, then times `config.reg_loss_weight`.
    """
    reduce_mean = reduce_mean or (lambda t: t)
    anchors_per_level = outputs["anchors"]
    dot_logits = torch.cat(outputs["dot_product_logits"], dim=1).float()     # (B, A, Lt)
    B, A, Lt = dot_logits.shape
    if len(targets) != B or len(image_sizes) != B:
        raise ValueError(f"detection loss: {B} images but {len(targets)} targets and "
                         f"{len(image_sizes)} image sizes")
    tokens, deltas, pos = [], [], []
    for i, target in enumerate(targets):
        boxes, pmap = sanitize_targets(target["boxes"], target["positive_map"], image_sizes[i], i)
        t, d, p = image_targets(anchors_per_level, boxes.to(dot_logits.device),
                                pmap.to(dot_logits.device), Lt, config.topk, box_coder)
        tokens.append(t), deltas.append(d), pos.append(p)
    tokens, deltas, pos = torch.stack(tokens), torch.stack(deltas), torch.stack(pos)

    num_pos = pos.sum()
    num_pos_avg = max(reduce_mean(num_pos.float()).item(), 1.0)
    token_loss = token_sigmoid_focal_loss(dot_logits, tokens, text_mask, config.focal_alpha,
                                          config.focal_gamma) / num_pos_avg

    box_reg = _flatten_levels(outputs["bbox_reg"], 4).float()[pos]           # (P, 4)
    ctr_logits = _flatten_levels(outputs["centerness"], 1).float().squeeze(-1)[pos]  # (P,)
    if num_pos > 0:
        anchors = torch.cat(anchors_per_level).expand(B, A, 4)[pos]
        ctr_targets = centerness_targets(deltas[pos], anchors, box_coder)
        ctr_sum = reduce_mean(ctr_targets.sum()).item()
        reg_loss = giou_loss(box_coder.decode(box_reg, anchors),
                             box_coder.decode(deltas[pos], anchors), weight=ctr_targets) / ctr_sum
        ctr_loss = F.binary_cross_entropy_with_logits(ctr_logits, ctr_targets,
                                                      reduction="sum") / num_pos_avg
    else:
        reduce_mean(ctr_logits.new_zeros(()))  # keep collective calls in step across processes
        reg_loss, ctr_loss = box_reg.sum(), ctr_logits.sum()  # zero, but part of the graph
    return {"loss_dot_product_token": token_loss,
            "loss_reg": reg_loss * config.reg_loss_weight,
            "loss_centerness": ctr_loss,
            "num_pos": num_pos}
