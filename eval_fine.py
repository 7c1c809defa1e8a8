"""Evaluation of the fine-grained model, each protocol as FIBER reports it, and a demo.

    python eval_fine.py ground --image photo.jpg --text "two cats. a remote" --out boxes.png
    python eval_fine.py coco --data instances_val2017.json --image-root val2017 \\
        --checkpoint fiber_coco --results detections.json
    python eval_fine.py refexp --data refs.json --instances instances.json \\
        --checkpoint fiber_refcoco
    python eval_fine.py flickr --data final_flickr_separateGT_test.json --checkpoint ...
    python eval_fine.py synthetic --checkpoint runs/fine/last.pt   # the held-out synthetic world

- COCO detection, box AP (the 12 COCO figures): all category names in one prompt (in chunks
  when they do not fit), boxes back in original pixels, results as xywh with w = x2 - x1 + 1,
  scored by metrics.coco_box_ap.
- RefCOCO/+/g, P@1 (the accuracy), P@5, P@10: boxes sorted by score, a hit when the
  *generalised* IoU with the ground-truth box is >= 0.5.
- Flickr30k Entities, R@1/5/10: per phrase its boxes by score, a hit when one of the top k has
  IoU >= 0.5 with any ground-truth box of the phrase.

Shape letters: N boxes.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import ImageDraw

import metrics
from data import load_tokenizer
from images import load_image
from data_fine import (SYNTHETIC_NAMES, FineCollator, FineDataset, build_fine_dataset,
                       detection_transform, scale_boxes, synthetic_samples)
from detector import FiberDetector, FiberDetectorConfig
from prompts import build_prompt, encode_with_spans
from synthetic import SyntheticWorld

# Post-processing for grounding-style evaluation: every box is a candidate (refexp yamls).
GROUNDING_SETTINGS = dict(threshold=0.0, pre_nms_top_n=3000, detections_per_image=100)


# ------------------------------------------------------------------------------------------------
# Predictions
# ------------------------------------------------------------------------------------------------

def _to_device(batch, device):
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def predict_dataset(model, dataset, *, batch_size=4, device="cpu", limit=None, **settings):
    """Run the model over a FineDataset: per item (item meta, detections in original pixels).

    Each item is scored against its own text and labels. Unreadable items are skipped.
    """
    model.eval()
    collate = FineCollator(model.config.size_divisibility)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    out = []
    for start in range(0, n, batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, n))])
        if "images" not in batch:
            continue
        b = _to_device(batch, device)
        dets = model.predict(b["images"], b["image_sizes"], b["text_ids"], b["text_mask"],
                             batch["label_to_tokens"], **settings)
        for i, det in enumerate(dets):
            boxes = scale_boxes(det["boxes"].cpu(), batch["image_sizes"][i], batch["orig_sizes"][i])
            meta = {k: batch[k][i] for k in ("image_ids", "orig_sizes", "captions", "gt_boxes",
                                              "tasks")}
            meta["labels"] = batch["targets"][i]["labels"]
            out.append((meta, {"boxes": boxes, "scores": det["scores"].cpu(),
                               "labels": det["labels"].cpu()}))
    return out


def xyxy_to_xywh(box):
    """The original's conversion for COCO results: w = x2 - x1 + 1 (inclusive pixels)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return [x1, y1, x2 - x1 + 1, y2 - y1 + 1]


# ------------------------------------------------------------------------------------------------
# Detection (COCO box AP)
# ------------------------------------------------------------------------------------------------

def coco_results(predictions, categories):
    """Detections -> the standard COCO results list [{image_id, category_id, bbox, score}]."""
    json_id = {label: cid for label, cid, _ in categories}
    results = []
    for meta, det in predictions:
        for box, score, label in zip(det["boxes"], det["scores"], det["labels"]):
            if int(label) in json_id:
                results.append({"image_id": meta["image_ids"], "bbox": xyxy_to_xywh(box),
                                "category_id": json_id[int(label)], "score": float(score)})
    return results


def ground_truth_from(predictions, categories):
    """A COCO instances dict from the items' own boxes (for data without a JSON, e.g. the
    synthetic world); boxes use the same inclusive-pixel xywh as the results."""
    images, annotations = {}, []
    for meta, _ in predictions:
        h, w = meta["orig_sizes"]
        images[meta["image_ids"]] = {"id": meta["image_ids"], "width": w, "height": h}
        json_id = {label: cid for label, cid, _ in categories}
        for box, label in zip(meta["gt_boxes"], meta["labels"]):
            xywh = xyxy_to_xywh(box)
            annotations.append({"id": len(annotations) + 1, "image_id": meta["image_ids"],
                                "category_id": json_id[int(label)], "bbox": xywh,
                                "area": xywh[2] * xywh[3], "iscrowd": 0})
    cats = [{"id": cid, "name": name} for _, cid, name in categories]
    return {"images": list(images.values()), "annotations": annotations, "categories": cats}


def evaluate_detection(model, dataset, categories, *, ground_truth=None, results_path=None,
                       **options):
    """COCO box AP of a detection FineDataset. ground_truth: the instances JSON (path or
    dict); None builds it from the dataset's boxes. Writes the results JSON when asked."""
    predictions = predict_dataset(model, dataset, **options)
    results = coco_results(predictions, categories)
    if results_path is not None:
        Path(results_path).write_text(json.dumps(results))
    gt = ground_truth if ground_truth is not None else ground_truth_from(predictions, categories)
    return metrics.coco_box_ap(gt, results)


# ------------------------------------------------------------------------------------------------
# Referring expressions and phrase grounding
# ------------------------------------------------------------------------------------------------

def ranked_boxes(det):
    """Boxes (N, 4) sorted by descending score (labels ignored), as numpy."""
    order = torch.argsort(det["scores"], descending=True, stable=True)
    return det["boxes"][order].double().numpy()


def evaluate_refexp(model, dataset, ks=(1, 5, 10), **options):
    """P@k of a refexp FineDataset (see refexp_scores)."""
    return refexp_scores(predict_dataset(model, dataset, **{**GROUNDING_SETTINGS, **options}), ks)


def refexp_scores(predictions, ks=(1, 5, 10)):
    """P@k: a hit when one of the k best boxes (labels ignored) has a *generalised* IoU >= 0.5
    with the ground-truth box (FIBER's RefExpEvaluator). P@1 is the reported accuracy; it
    equals metrics.rec_accuracy(top-1 boxes, gt, generalized=True)."""
    hits = {k: 0 for k in ks}
    top1, gts = [], []
    for meta, det in predictions:
        boxes, gt = ranked_boxes(det), meta["gt_boxes"][:1].double().numpy()
        if len(boxes) == 0:
            boxes = np.zeros((1, 4))  # no prediction: a miss
        giou = metrics.box_iou(boxes, gt, generalized=True)[:, 0]
        for k in ks:
            hits[k] += bool(giou[:k].max() >= 0.5)
        top1.append(boxes[0]), gts.append(gt[0])
    n = max(1, len(predictions))
    out = {f"P@{k}": hits[k] / n for k in ks}
    out["accuracy"] = (metrics.rec_accuracy(np.stack(top1), np.stack(gts), generalized=True)
                       if predictions else 0.0)
    return out


def evaluate_grounding(model, dataset, ks=(1, 5, 10), **options):
    """Flickr30k Entities R@k of a grounding FineDataset (see grounding_scores)."""
    predictions = predict_dataset(model, dataset, **{**GROUNDING_SETTINGS, **options})
    return grounding_scores(predictions, ks)


def grounding_scores(predictions, ks=(1, 5, 10)):
    """R@k over every phrase ("any box" protocol: a phrase's ground truth is each of its
    boxes, never their union); a phrase's candidates are its own boxes, best first."""
    ranked, gts = [], []
    for meta, det in predictions:
        order = torch.argsort(det["scores"], descending=True, stable=True)
        for label in sorted(set(meta["labels"].tolist())):
            mine = order[det["labels"][order] == label]
            ranked.append(det["boxes"][mine].double().numpy())
            gts.append(meta["gt_boxes"][meta["labels"] == label].double().numpy())
    if not gts:
        return {f"R@{k}": 0.0 for k in ks}
    recall = metrics.grounding_recall(ranked, gts, ks=ks)
    return {f"R@{k}": recall[f"r{k}"] for k in ks}


# ------------------------------------------------------------------------------------------------
# The held-out synthetic world
# ------------------------------------------------------------------------------------------------

def synthetic_eval_sets(config, tokenizer, num_scenes=100, world=None):
    """Detection, grounding and refexp datasets of the first `num_scenes` validation scenes."""
    world = world if world is not None else SyntheticWorld(seed=0)
    samples = synthetic_samples(world, "val", limit=num_scenes)
    sets = {}
    for task in ("detection", "grounding", "refexp"):
        chosen = [s for s in samples if s.task == task]
        sets[task] = FineDataset(chosen, tokenizer=tokenizer,
                                 transform=detection_transform(config, train=False),
                                 max_query_len=config.max_query_len, name=f"synthetic val {task}",
                                 read_image=lambda index, side: world.scene(index).render(side))
    return sets, world


def rec_chance(dataset, world):
    """Accuracy of picking one object of the scene at random: mean of 1 / #objects."""
    counts = [len(world.scene(s.image).objects) for s in dataset.samples]
    return float(np.mean([1.0 / n for n in counts])) if counts else 0.0


def synthetic_metrics(model, tokenizer, *, num_scenes=100, device="cpu", batch_size=8):
    """Held-out synthetic figures: detection AP / AP50 over the five shapes (every box is a
    candidate, threshold 0, so that an untrained head is ranked fairly too), REC accuracy
    (GIoU >= 0.5) with its chance level, grounding R@1."""
    sets, world = synthetic_eval_sets(model.config, tokenizer, num_scenes)
    options = dict(device=device, batch_size=batch_size)
    categories = [(lb, lb, name) for lb, name in SYNTHETIC_NAMES.items()]
    ap = evaluate_detection(model, sets["detection"], categories, threshold=0.0, **options)
    rec = evaluate_refexp(model, sets["refexp"], **options)
    grounding = evaluate_grounding(model, sets["grounding"], **options)
    return {"AP": ap["AP"], "AP50": ap["AP50"], "REC_acc": rec["accuracy"],
            "REC_chance": rec_chance(sets["refexp"], world), "ground_R@1": grounding["R@1"]}


# ------------------------------------------------------------------------------------------------
# The demo: ground phrases in one image
# ------------------------------------------------------------------------------------------------

def phrases_of(text):
    """"two cats. a remote" -> the caption and one span per ". "-separated phrase."""
    parts = [p.strip() for p in text.split(".") if p.strip()]
    if len(parts) > 1:
        return build_prompt(parts)
    return text, [(0, len(text))]


@torch.no_grad()
def ground(model, tokenizer, image, text, *, spans=None, score_threshold=0.3, top_per_phrase=3):
    """Boxes for the phrases of `text` in a PIL image, in its own pixels.

    spans: char spans, one per phrase (default: the ". "-separated parts, or the whole text).
    Returns [(phrase, box (4,), score)], at most top_per_phrase per phrase above the threshold
    (the best box of each phrase is always kept).
    """
    model.eval()
    if spans is None:
        text, spans = phrases_of(text)
    cfg = model.config
    label_spans = {i + 1: [s] for i, s in enumerate(spans)}
    ids, mask, tokens = encode_with_spans(tokenizer, text, label_spans, cfg.max_query_len,
                                          "demo text")
    x, _ = detection_transform(cfg, train=False)(image, torch.zeros(0, 4))
    size = tuple(x.shape[-2:])
    batch = FineCollator(cfg.size_divisibility).pad([x])
    device = next(model.parameters()).device
    det = model.predict(batch.to(device), [size], ids[None].to(device), mask[None].to(device),
                        tokens, **GROUNDING_SETTINGS)[0]
    boxes = scale_boxes(det["boxes"].cpu(), size, (image.size[1], image.size[0]))
    found = []
    for label in sorted(tokens):
        mine = (det["labels"].cpu() == label).nonzero().view(-1)
        for rank, i in enumerate(mine[:top_per_phrase].tolist()):
            if rank == 0 or det["scores"][i] >= score_threshold:
                s, e = spans[label - 1]
                found.append((text[s:e], boxes[i], float(det["scores"][i])))
    return found


def draw_boxes(image, found, out_path):
    """Draw (phrase, box, score) triples on a copy of the image and save it."""
    canvas = image.copy()
    draw = ImageDraw.Draw(canvas)
    palette = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180)]
    phrases = sorted({p for p, _, _ in found})
    for phrase, box, score in found:
        color = palette[phrases.index(phrase) % len(palette)]
        draw.rectangle([float(v) for v in box], outline=color, width=3)
        draw.text((float(box[0]) + 3, float(box[1]) + 2), f"{phrase} {score:.2f}", fill=color)
    canvas.save(out_path)
    return out_path


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

def load_model(checkpoint, config="tiny", ema=False, device="cpu"):
    """A checkpoint (release name, original .pth, train_fine.py checkpoint) or, without one,
    an untrained model of the named size (useful only to try the pipeline)."""
    if checkpoint:
        model = FiberDetector.from_pretrained(checkpoint, ema=ema)
    else:
        print("no --checkpoint: using an untrained model (boxes will be meaningless)",
              file=sys.stderr)
        model = FiberDetector((FiberDetectorConfig.tiny if config == "tiny"
                               else FiberDetectorConfig.base)())
    return model.to(device).eval()


def build_parser():
    p = argparse.ArgumentParser(description="Evaluate a fine-grained FIBER model, or ground "
                                "phrases in an image.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_text in (("ground", "draw the boxes of phrases on an image"),
                            ("coco", "COCO box AP of a COCO instances JSON"),
                            ("refexp", "RefCOCO-style accuracy (P@1/5/10) of a refs JSON"),
                            ("flickr", "phrase grounding R@1/5/10 of an MDETR-style JSON"),
                            ("synthetic", "all three on the held-out synthetic world")):
        s = sub.add_parser(name, help=help_text)
        s.add_argument("--checkpoint", help="release name or checkpoint path")
        s.add_argument("--config", default="tiny", choices=("tiny", "base"),
                       help="model size when no checkpoint is given")
        s.add_argument("--ema", action="store_true", help="use the EMA weights of the file")
        s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        if name == "ground":
            s.add_argument("--image", required=True)
            s.add_argument("--text", required=True,
                           help='a caption, or phrases separated by ". " ("cat. remote")')
            s.add_argument("--out", default="boxes.png")
            s.add_argument("--threshold", type=float, default=0.3)
        elif name != "synthetic":
            s.add_argument("--data", required=True, help="annotation file")
            s.add_argument("--image-root", help="folder of the images (default: the file's)")
            s.add_argument("--batch-size", type=int, default=1)
            s.add_argument("--limit", type=int, help="evaluate only the first N items")
            s.add_argument("--threshold", type=float,
                           help="candidate score threshold (default: coco 0.05 from the model "
                                "config, refexp/flickr 0.0)")
            if name == "coco":
                s.add_argument("--results", help="write the COCO results JSON here")
            if name == "refexp":
                s.add_argument("--instances", help="COCO instances JSON naming the image files")
        else:
            s.add_argument("--num-scenes", type=int, default=100)
    return p


def run_ground(args, model):
    image = load_image(args.image)
    found = ground(model, load_tokenizer(), image, args.text, score_threshold=args.threshold)
    for phrase, box, score in found:
        print(f"{phrase!r}: [{', '.join(f'{v:.1f}' for v in box.tolist())}] score {score:.3f}")
    print(f"wrote {draw_boxes(image, found, args.out)}")


def run_file(args, model):
    tok = load_tokenizer()
    kind = {"coco": "detection", "refexp": "refexp", "flickr": "grounding"}[args.command]
    dataset, extra = build_fine_dataset(args.data, config=model.config, tokenizer=tok,
                                        train=False, kind=kind, image_root=args.image_root,
                                        instances=getattr(args, "instances", None))
    options = dict(batch_size=args.batch_size, device=args.device, limit=args.limit)
    if args.threshold is not None:
        options["threshold"] = args.threshold
    if kind == "detection":
        return evaluate_detection(model, dataset, extra["categories"], ground_truth=args.data,
                                  results_path=args.results, **options)
    if kind == "refexp":
        return evaluate_refexp(model, dataset, **options)
    return evaluate_grounding(model, dataset, **options)


def main(argv=None):
    args = build_parser().parse_args(argv)
    model = load_model(args.checkpoint, args.config, args.ema, args.device)
    if args.command == "ground":
        return run_ground(args, model)
    if args.command == "synthetic":
        found = synthetic_metrics(model, load_tokenizer(), num_scenes=args.num_scenes,
                                  device=args.device)
    else:
        found = run_file(args, model)
    print(" ".join(f"{k} {v:.4f}" for k, v in found.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
