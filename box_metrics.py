"""Box metrics: IoU, referring-expression accuracy, grounding recall@k, COCO box AP.

`coco_box_ap` re-implements pycocotools' COCOeval for boxes in numpy (IoU thresholds
.5:.05:.95, 101 recall points, area ranges, maxDets 1/10/100, crowd regions), including its
quirks, so the 12 figures equal the official ones. metrics.py re-exports everything here.
"""
import json
from pathlib import Path

import numpy as np
import torch

# ----------------------------------------------------------------------------------------------
# Referring expressions and phrase grounding (boxes x1, y1, x2, y2)

def _boxes(boxes, name):
    if isinstance(boxes, torch.Tensor):
        boxes = boxes.detach().cpu().double().numpy()
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) if len(boxes) else np.zeros((0, 4))
    if np.any(boxes[:, 2:] < boxes[:, :2]):
        raise ValueError(f"{name}: boxes must be (x1, y1, x2, y2) with x2 >= x1 and y2 >= y1")
    return boxes


def box_iou(boxes1, boxes2, generalized=False):
    """Pairwise (generalised) IoU of two sets of xyxy boxes -> (N, M) array (continuous
    coordinates, no +1). A pair whose union is empty has IoU 0."""
    a, b = _boxes(boxes1, "boxes1"), _boxes(boxes2, "boxes2")
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    wh = np.clip(np.minimum(a[:, None, 2:], b[None, :, 2:])
                 - np.maximum(a[:, None, :2], b[None, :, :2]), 0, None)    # (N, M, 2)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    if not generalized:
        return iou
    # GIoU subtracts the share of the enclosing box not covered by the union.
    hull_wh = (np.maximum(a[:, None, 2:], b[None, :, 2:])
               - np.minimum(a[:, None, :2], b[None, :, :2]))
    hull = hull_wh[..., 0] * hull_wh[..., 1]
    return iou - np.divide(hull - union, hull, out=np.zeros_like(hull), where=hull > 0)


def rec_accuracy(pred_boxes, gt_boxes, iou=0.5, generalized=False):
    """Referring-expression accuracy: share of expressions whose top-1 predicted box overlaps
    the ground-truth box with IoU >= `iou`. pred_boxes, gt_boxes: (N, 4) xyxy, row i = expression
    i. generalized=True thresholds the generalised IoU instead, as the MDETR/GLIP/FIBER
    RefCOCO evaluator does (GIoU <= IoU, so that is slightly stricter)."""
    pred, gt = _boxes(pred_boxes, "pred_boxes"), _boxes(gt_boxes, "gt_boxes")
    if len(pred) != len(gt) or len(pred) == 0:
        raise ValueError(f"rec_accuracy: need one predicted box per expression, got {len(pred)} "
                         f"predictions for {len(gt)} ground-truth boxes")
    overlap = np.array([box_iou(p, g, generalized)[0, 0] for p, g in zip(pred, gt)])
    return float(np.mean(overlap >= iou))


def grounding_recall(pred_boxes_ranked, gt_boxes, ks=(1, 5, 10), iou=0.5):
    """Phrase-grounding recall@k, Flickr30k Entities "any box" protocol (MDETR/GLIP/FIBER's
    default; the merged-box variant that unions a phrase's ground-truth boxes is not used).

    pred_boxes_ranked[i]: (n_i, 4) xyxy boxes for phrase i, best first; gt_boxes[i]: (m_i, 4)
    its ground-truth boxes. Phrase i is correct at k if any of its first k boxes has IoU >= `iou`
    with any of its ground-truth boxes (a phrase with no predicted box is a miss). Returns
    {"r1": ..., "r5": ..., "r10": ...} as fractions.
    """
    if len(pred_boxes_ranked) != len(gt_boxes) or len(gt_boxes) == 0:
        raise ValueError("grounding_recall: need one list of ranked boxes per phrase, got "
                         f"{len(pred_boxes_ranked)} for {len(gt_boxes)} phrases")
    hits = {k: 0 for k in ks}
    for i, (pred, gt) in enumerate(zip(pred_boxes_ranked, gt_boxes)):
        gt = _boxes(gt, f"gt_boxes[{i}]")
        if len(gt) == 0:
            raise ValueError(f"gt_boxes[{i}] is empty: a phrase without boxes cannot be scored")
        best = box_iou(_boxes(pred, f"pred_boxes_ranked[{i}]"), gt).max(axis=1)  # (n_i,)
        for k in ks:
            hits[k] += bool(len(best)) and bool(best[:k].max() >= iou)
    return {f"r{k}": hits[k] / len(gt_boxes) for k in ks}


# ----------------------------------------------------------------------------------------------
# COCO box AP (pycocotools COCOeval, iouType "bbox")

# Built exactly as pycocotools builds them, so every threshold is the same float.
_COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)                   # T = 10
_COCO_RECALL_POINTS = np.linspace(0.0, 1.0, 101)                    # R = 101
_COCO_AREAS = [(0.0, 1e10), (0.0, 32.0 ** 2), (32.0 ** 2, 96.0 ** 2), (96.0 ** 2, 1e10)]
_COCO_MAX_DETS = (1, 10, 100)
# (name, AP or AR, IoU threshold index or None for the mean, area index, maxDets index)
_COCO_FIGURES = [("AP", True, None, 0, 2), ("AP50", True, 0, 0, 2), ("AP75", True, 5, 0, 2),
                 ("APs", True, None, 1, 2), ("APm", True, None, 2, 2), ("APl", True, None, 3, 2),
                 ("AR1", False, None, 0, 0), ("AR10", False, None, 0, 1),
                 ("AR100", False, None, 0, 2), ("ARs", False, None, 1, 2),
                 ("ARm", False, None, 2, 2), ("ARl", False, None, 3, 2)]


def _load_json(source, what):
    if isinstance(source, (str, Path)):
        with open(source) as f:
            return json.load(f), str(source)
    return source, f"<{what} given as a Python object>"


def _coco_ground_truth(ground_truth):
    """-> (sorted image ids, sorted category ids, {(image, category): [annotation, ...]})."""
    data, where = _load_json(ground_truth, "ground truth")
    for field in ("images", "annotations", "categories"):
        if field not in data:
            raise ValueError(f"{where}: missing '{field}'; expected a COCO instances file")
    by_key = {}
    for i, ann in enumerate(data["annotations"]):
        for field in ("image_id", "category_id", "bbox", "area", "id"):
            if field not in ann:
                raise ValueError(f"{where}: annotations[{i}] has no '{field}'")
        by_key.setdefault((ann["image_id"], ann["category_id"]), []).append(ann)
    image_ids = sorted({img["id"] for img in data["images"]})
    category_ids = sorted({cat["id"] for cat in data["categories"]})
    return image_ids, category_ids, by_key


def _coco_detections(detections, image_ids, category_ids):
    """Group result dicts by (image, category) in list order, as COCO.loadRes does. Categories
    absent from the ground truth are skipped (COCOeval never looks at them)."""
    dets, where = _load_json(detections, "detections")
    known_images, known_cats = set(image_ids), set(category_ids)
    by_key = {}
    for i, det in enumerate(dets):
        for field in ("image_id", "category_id", "bbox", "score"):
            if field not in det:
                raise ValueError(f"{where}: detection {i} has no '{field}'")
        if det["image_id"] not in known_images:
            raise ValueError(f"{where}: detection {i} is on image {det['image_id']}, which the "
                             "ground truth does not list")
        if det["category_id"] in known_cats:
            by_key.setdefault((det["image_id"], det["category_id"]), []).append(det)
    return by_key


def _coco_iou(dt_boxes, gt_boxes, gt_crowd):
    """pycocotools' box IoU on xywh boxes; against a crowd box the union is the detection's
    own area (so a detection inside a crowd region has IoU 1)."""
    dx, dy, dw, dh = (dt_boxes[:, None, i] for i in range(4))               # (D, 1) each
    gx, gy, gw, gh = (gt_boxes[None, :, i] for i in range(4))               # (1, G) each
    w = np.clip(np.minimum(dw + dx, gw + gx) - np.maximum(dx, gx), 0, None)
    h = np.clip(np.minimum(dh + dy, gh + gy) - np.maximum(dy, gy), 0, None)
    inter = w * h                                                           # (D, G)
    union = np.where(gt_crowd[None, :], dw * dh, dw * dh + gw * gh - inter)
    return np.divide(inter, union, out=np.zeros_like(inter), where=inter > 0)


def _coco_image(gts, dts):
    """Arrays for one image and category: detections sorted by score (stable) and cut to 100,
    their box areas (the area of a detection is w * h, as COCO.loadRes sets it), the ground
    truth's annotated areas, crowd flags and ids, and the (D, G) IoU matrix."""
    order = np.argsort([-d["score"] for d in dts], kind="mergesort")[:_COCO_MAX_DETS[-1]]
    dt_boxes = np.array([dts[i]["bbox"] for i in order], dtype=np.float64).reshape(-1, 4)
    gt_boxes = np.array([g["bbox"] for g in gts], dtype=np.float64).reshape(-1, 4)
    crowd = np.array([bool(g.get("iscrowd", 0)) for g in gts], dtype=bool)
    return {"scores": np.array([dts[i]["score"] for i in order], dtype=np.float64),
            "dt_area": dt_boxes[:, 2] * dt_boxes[:, 3],
            "gt_area": np.array([g["area"] for g in gts], dtype=np.float64),
            "crowd": crowd, "gt_ids": np.array([g["id"] for g in gts]),
            "ious": _coco_iou(dt_boxes, gt_boxes, crowd)}


def _coco_match(image, area):
    """Greedy matching of one image and category within one area range (COCOeval.evaluateImg).
    Returns (scores (D,), matched (T, D), dt_ignored (T, D), number of counted ground truths)."""
    lo, hi = area
    gt_ignored = image["crowd"] | (image["gt_area"] < lo) | (image["gt_area"] > hi)
    order = np.argsort(gt_ignored, kind="mergesort")        # counted ground truth first
    gt_ignored, crowd, ious = gt_ignored[order], image["crowd"][order], image["ious"][:, order]
    gt_ids = image["gt_ids"][order]
    n_thr, n_dt = len(_COCO_IOU_THRESHOLDS), len(image["scores"])
    matched_id = np.zeros((n_thr, n_dt))
    dt_ignored = np.zeros((n_thr, n_dt), dtype=bool)
    taken = np.zeros((n_thr, len(gt_ids)), dtype=bool)
    for d in range(n_dt if len(gt_ids) else 0):             # best-scored detection first
        m, found = _coco_best_gt(ious[d], ~taken | crowd, gt_ignored)        # (T,) each
        t = np.flatnonzero(found)
        matched_id[t, d], dt_ignored[t, d], taken[t, m[t]] = gt_ids[m[t]], gt_ignored[m[t]], True
    # COCOeval keeps the matched ground truth's *id* and tests it against 0, so a ground truth
    # with id 0 never counts as matched; mirrored by deriving `matched` from the ids.
    matched = matched_id != 0
    outside = (image["dt_area"] < lo) | (image["dt_area"] > hi)
    dt_ignored |= ~matched & outside[None, :]               # unmatched and out of range
    return image["scores"], matched, dt_ignored, int(np.count_nonzero(~gt_ignored))


def _coco_best_gt(iou, free, gt_ignored):
    """The ground truth one detection takes at each IoU threshold: (index (T,), found (T,)).

    iou: (G,) its IoU with each ground truth; free: (T, G) not yet taken (crowd regions stay
    free). As COCOeval's loop decides: counted ground truth wins over ignored ground truth;
    within the group the highest IoU >= the threshold wins, the last one on ties."""
    ok = free & (iou[None, :] >= _COCO_IOU_THRESHOLDS[:, None])              # (T, G)
    counted = ok & ~gt_ignored[None, :]
    ok = np.where(counted.any(axis=1, keepdims=True), counted, ok & gt_ignored[None, :])
    masked = np.where(ok, iou[None, :], -1.0)                                 # (T, G)
    is_best = ok & (masked == masked.max(axis=1, keepdims=True))
    last_best = iou.shape[0] - 1 - np.argmax(is_best[:, ::-1], axis=1)      # (T,)
    return last_best, ok.any(axis=1)


def _coco_accumulate(results, n_counted_gt, max_det):
    """Precision at the 101 recall points (T, R) and final recall (T,) of one category and area
    range over all images, keeping each image's `max_det` best detections (COCOeval.accumulate)."""
    scores = np.concatenate([r[0][:max_det] for r in results])
    order = np.argsort(-scores, kind="mergesort")           # stable: ties keep image order
    matched = np.concatenate([r[1][:, :max_det] for r in results], axis=1)[:, order]
    ignored = np.concatenate([r[2][:, :max_det] for r in results], axis=1)[:, order]
    tp = np.cumsum(matched & ~ignored, axis=1).astype(float)                   # (T, N)
    fp = np.cumsum(~matched & ~ignored, axis=1).astype(float)
    recall = tp / n_counted_gt
    precision = tp / (fp + tp + np.spacing(1))
    precision = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]    # envelope
    sampled = np.zeros((len(_COCO_IOU_THRESHOLDS), len(_COCO_RECALL_POINTS)))
    for t in range(len(_COCO_IOU_THRESHOLDS)):
        idx = np.searchsorted(recall[t], _COCO_RECALL_POINTS, side="left")
        reached = idx < recall.shape[1]                    # recall points never reached: 0
        sampled[t, reached] = precision[t, idx[reached]]
    final_recall = recall[:, -1] if recall.shape[1] else np.zeros(len(_COCO_IOU_THRESHOLDS))
    return sampled, final_recall


def coco_box_ap(ground_truth, detections):
    """The 12 COCO box figures, as pycocotools' COCOeval(iouType="bbox") summarises them.

    ground_truth: COCO instances JSON (path or dict); its images and categories define the
    evaluated set and each annotation's "area" field (not its box) picks its area range.
    detections: list (or JSON path) of {image_id, category_id, bbox [x, y, w, h], score}.
    IoU thresholds 0.50:0.05:0.95, 101 recall points, areas all/small/medium/large (32², 96²),
    up to 1/10/100 detections per image; crowd boxes are ignored regions. Returns
    {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"};
    a figure with no ground truth to score (e.g. no small objects) is -1, as in pycocotools.
    Unlike pycocotools, an empty detection list is accepted (every AP is then 0).
    """
    image_ids, category_ids, gt_by_key = _coco_ground_truth(ground_truth)
    dt_by_key = _coco_detections(detections, image_ids, category_ids)
    shape = (len(_COCO_IOU_THRESHOLDS), len(category_ids), len(_COCO_AREAS), len(_COCO_MAX_DETS))
    precision = -np.ones(shape[:1] + (len(_COCO_RECALL_POINTS),) + shape[1:])  # (T, R, K, A, M)
    recall = -np.ones(shape)                                                  # (T, K, A, M)
    for k, cat in enumerate(category_ids):
        per_area = [[] for _ in _COCO_AREAS]
        for img in image_ids:
            gts, dts = gt_by_key.get((img, cat), []), dt_by_key.get((img, cat), [])
            if not gts and not dts:
                continue
            image = _coco_image(gts, dts)
            for a, area in enumerate(_COCO_AREAS):
                per_area[a].append(_coco_match(image, area))
        for a, results in enumerate(per_area):
            n_counted = sum(r[3] for r in results)
            if n_counted == 0:                                # nothing to find: stays -1
                continue
            for m, max_det in enumerate(_COCO_MAX_DETS):
                precision[:, :, k, a, m], recall[:, k, a, m] = _coco_accumulate(
                    results, n_counted, max_det)
    return _coco_summary(precision, recall)


def _coco_summary(precision, recall):
    out = {}
    for name, is_ap, thr_index, a, m in _COCO_FIGURES:
        values = precision[:, :, :, a, m] if is_ap else recall[:, :, a, m]
        if thr_index is not None:
            values = values[thr_index:thr_index + 1]
        values = values[values > -1]
        out[name] = float(np.mean(values)) if values.size else -1.0
    return out
