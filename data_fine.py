"""Data of the fine-grained stage: boxes paired with text.

Three annotation formats and the synthetic world become one kind of sample, an image with
boxes where every box belongs to a *label*, and every label to a set of text tokens:

| source                                 | text                              | label of a box |
|----------------------------------------|-----------------------------------|----------------|
| COCO instances JSON (detection)        | category names joined by ". "     | its category   |
| MDETR-style grounding JSON (Flickr30k) | the image's caption               | its phrase     |
| RefCOCO-like refs JSON                 | one referring expression          | 1              |
| the synthetic world (default)          | all three of the above, per scene |                |

How a label's character spans become tokens (the positive map) is in prompts.py. The detection
transform is the original's: shorter side `min_size` (one of several at train time), longer
side at most `max_size`, BGR 0-255 pixels normalised by the detectron mean/std, batches
zero-padded bottom/right to a multiple of 32 by the collator.

Every random choice (train size, flip, prompt order and negatives) comes from a generator
seeded by (seed, epoch, index), so a resumed run sees the same samples.
"""
import logging
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data import AnnotationError, SkipBadSamples, _field, read_json, resolve_image_path
from images import load_image, sample_generator
from prompts import clean_name, detection_text, encode_with_spans, fit_prompt, positive_map
from synthetic import SHAPES, SyntheticWorld

log = logging.getLogger("fiber.data_fine")

PIXEL_MEAN = (103.530, 116.280, 123.675)  # BGR, 0-255 (detectron / GLIP convention)
PIXEL_STD = (57.375, 57.120, 58.395)
FINE_STREAM = 2  # generator stream of fine-grained augmentation (data.py uses 0 and 1)


# ----------------------------------------------------------------------------- images

def resized_size(width, height, min_size, max_size):
    """(height, width) after resizing the shorter side to min_size, the longer to <= max_size.

    The original's rule, including its rounding: the size is lowered so the longer side fits,
    and the longer output side is truncated (int), not rounded.
    """
    size = min_size
    if max_size is not None:
        short, long = float(min(width, height)), float(max(width, height))
        if long / short * size > max_size:
            size = int(round(max_size * short / long))
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


def to_detection_tensor(image):
    """PIL RGB -> (3, H, W) float32: BGR, 0-255 scale, minus PIXEL_MEAN, over PIXEL_STD."""
    x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div(255)
    x = x[[2, 1, 0]] * 255  # the original's ToTensor, then BGR and x255, in that order
    mean = torch.tensor(PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(3, 1, 1)
    return (x - mean) / std


def flip_boxes(boxes, width):
    """Mirror xyxy boxes in an image `width` pixels wide (inclusive-pixel convention)."""
    boxes = boxes.clone()
    boxes[:, 0], boxes[:, 2] = width - boxes[:, 2] - 1, width - boxes[:, 0] - 1
    return boxes


def scale_boxes(boxes, from_size, to_size):
    """Boxes of a (height, width) image -> the same boxes in a resized (height, width) image."""
    ry, rx = to_size[0] / from_size[0], to_size[1] / from_size[1]
    return boxes * torch.tensor([rx, ry, rx, ry], dtype=boxes.dtype)


def mentions_side(text):
    return re.search(r"\b(left|right)", text, flags=re.IGNORECASE) is not None


@dataclass
class DetectionTransform:
    """Resize (multi-scale at train time), optional flip, BGR normalisation."""
    min_sizes: tuple = (800,)  # shorter side; train picks one at random, eval uses the first
    max_size: int = 1333
    train: bool = False
    flip_prob: float = 0.0  # never flips a sample whose text says left or right

    def pick_min_size(self, generator=None):
        """The shorter side to resize to: random among min_sizes at train time."""
        if self.train and len(self.min_sizes) > 1:
            return self.min_sizes[int(torch.randint(len(self.min_sizes), (), generator=generator))]
        return self.min_sizes[0]

    def __call__(self, image, boxes, text="", generator=None, min_size=None):
        """PIL RGB, (G, 4) xyxy boxes -> (3, h, w) tensor, boxes in the resized image."""
        min_size = self.pick_min_size(generator) if min_size is None else min_size
        h, w = resized_size(*image.size, min_size, self.max_size)
        if (w, h) != image.size:
            boxes = scale_boxes(boxes, (image.size[1], image.size[0]), (h, w))
            image = image.resize((w, h), Image.BILINEAR)
        if self.train and self.flip_prob > 0 and not mentions_side(text):
            if torch.rand((), generator=generator).item() < self.flip_prob:
                image, boxes = image.transpose(Image.FLIP_LEFT_RIGHT), flip_boxes(boxes, w)
        return to_detection_tensor(image), boxes


def detection_transform(config, train):
    """The transform of a FiberDetectorConfig (min/max sizes); flips only at train time."""
    sizes = config.train_min_sizes if train else (config.min_size,)
    return DetectionTransform(min_sizes=tuple(sizes), max_size=config.max_size, train=train,
                              flip_prob=0.5 if train else 0.0)


# ----------------------------------------------------------------------------- samples

@dataclass
class FineSample:
    """One image with boxes and the text they are grounded in.

    boxes: (G, 4) xyxy in the original image's pixels; labels: (G,) label of each box (>= 1).
    Detection samples build their text from `names` ({label: category name}); grounding and
    refexp samples carry `caption` and `phrases` ({label: [(start, end)] char spans}).
    """
    image: object  # file path (str) or synthetic scene index (int)
    image_id: object
    boxes: torch.Tensor
    labels: torch.Tensor
    task: str  # "detection", "grounding" or "refexp"
    caption: str = ""
    phrases: dict = None
    names: dict = None


def clean_boxes(boxes, width, height, where):
    """Clip (G, 4) xyxy boxes into the image and report which keep a positive area."""
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    if width is not None and height is not None:
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width - 1)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height - 1)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    if not keep.all():
        log.warning(f"{where}: dropped {int((~keep).sum())} box(es) of zero area after clipping "
                    "to the image")
    return boxes, keep


def _bbox(entry, where):
    box = _field(entry, "bbox", (list,), where)
    if len(box) != 4 or not all(isinstance(v, (int, float)) for v in box):
        raise AnnotationError(f"{where}: field 'bbox' must be [x, y, width, height], "
                              f"got {box!r:.60}")
    return [float(v) for v in box]


def _images_by_id(data, path, root, allow_outside_root):
    images = {}
    for k, entry in enumerate(data.get("images", [])):
        where = f"{path}: images[{k}]"
        file = resolve_image_path(root, _field(entry, "file_name", (str,), where), where,
                                  allow_outside_root=allow_outside_root)
        images[_field(entry, "id", (int, str), where)] = (file, entry.get("width"),
                                                          entry.get("height"), entry)
    return images


def _top_level(data, path, keys):
    for key in keys:
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise AnnotationError(f"{path}: top level must be an object with a list '{key}'")


def coco_categories(data, path):
    """[(label, json id, name)] without background entries; labels 1.. in file order."""
    cats = []
    for k, entry in enumerate(data["categories"]):
        where = f"{path}: categories[{k}]"
        cid, name = _field(entry, "id", (int,), where), _field(entry, "name", (str,), where)
        if name == "__background__" or cid == 0:
            continue  # a background class is no phrase to ground
        cats.append((len(cats) + 1, cid, name))
    if not cats:
        raise AnnotationError(f"{path}: no categories (besides background)")
    return cats


def load_coco_detection(path, image_root=None, *, allow_outside_root=False):
    """COCO instances JSON -> (samples, categories [(label, json id, name)]).

    Crowd boxes are left out (as the original trains); boxes are xywh with the inclusive-pixel
    convention (x2 = x + w - 1), clipped to the image; zero-area boxes are dropped with a
    warning; images without boxes stay as negatives.
    """
    data = read_json(path)
    _top_level(data, path, ("images", "annotations", "categories"))
    root = Path(image_root) if image_root is not None else Path(path).parent
    cats = coco_categories(data, path)
    label_of = {cid: label for label, cid, _ in cats}
    names = {label: clean_name(name) for label, _, name in cats}
    images = _images_by_id(data, path, root, allow_outside_root)
    per_image = {image_id: ([], []) for image_id in images}
    for k, entry in enumerate(data["annotations"]):
        where = f"{path}: annotations[{k}]"
        image_id = _field(entry, "image_id", (int, str), where)
        cid = _field(entry, "category_id", (int,), where)
        if image_id not in images:
            raise AnnotationError(f"{where}: image_id {image_id!r} is not listed in 'images'")
        if cid not in label_of:
            raise AnnotationError(f"{where}: category_id {cid} is not a (non-background) entry "
                                  "of 'categories'")
        if entry.get("iscrowd", 0):
            continue
        x, y, w, h = _bbox(entry, where)
        per_image[image_id][0].append([x, y, x + max(w - 1, 0), y + max(h - 1, 0)])
        per_image[image_id][1].append(label_of[cid])
    samples = []
    for image_id, (file, width, height, _) in images.items():
        boxes, labels = per_image[image_id]
        boxes, keep = clean_boxes(boxes, width, height, f"{path}: image {image_id}")
        samples.append(FineSample(file, image_id, boxes[keep],
                                  torch.tensor(labels, dtype=torch.long)[keep], "detection",
                                  names=names))
    return samples, cats


def load_mdetr_grounding(path, image_root=None, *, allow_outside_root=False):
    """MDETR-style grounding JSON (Flickr30k Entities / mixed): per image a 'caption'; per box
    'tokens_positive' char spans. Boxes sharing spans form one phrase (label), ordered as
    'tokens_positive_eval' when present. Boxes: x2 = x + w (as the original), clipped."""
    data = read_json(path)
    _top_level(data, path, ("images", "annotations"))
    root = Path(image_root) if image_root is not None else Path(path).parent
    images = _images_by_id(data, path, root, allow_outside_root)
    per_image = {image_id: [] for image_id in images}
    for k, entry in enumerate(data["annotations"]):
        where = f"{path}: annotations[{k}]"
        image_id = _field(entry, "image_id", (int, str), where)
        if image_id not in images:
            raise AnnotationError(f"{where}: image_id {image_id!r} is not listed in 'images'")
        spans = _spans(_field(entry, "tokens_positive", (list,), where), where)
        per_image[image_id].append((_bbox(entry, where), spans))
    return [_grounding_sample(path, image_id, images[image_id], anns)
            for image_id, anns in per_image.items()]


def _spans(value, where):
    try:
        spans = tuple((int(s), int(e)) for s, e in value)
    except (TypeError, ValueError):
        raise AnnotationError(f"{where}: 'tokens_positive' must be a list of [start, end] pairs")
    return spans


def _grounding_sample(path, image_id, image, anns):
    file, width, height, entry = image
    where = f"{path}: image {image_id}"
    caption = _field(entry, "caption", (str,), where)
    order = [_spans(s, where) for s in entry.get("tokens_positive_eval", [])]
    for _, spans in anns:
        if spans not in order:
            order.append(spans)
    for spans in order:
        for s, e in spans:
            if not 0 <= s < e <= len(caption):
                raise AnnotationError(f"{where}: span [{s}, {e}) lies outside the caption of "
                                      f"{len(caption)} characters")
    boxes = [[x, y, x + w, y + h] for (x, y, w, h), _ in anns]
    labels = torch.tensor([order.index(spans) + 1 for _, spans in anns], dtype=torch.long)
    boxes, keep = clean_boxes(boxes, width, height, where)
    phrases = {i + 1: list(spans) for i, spans in enumerate(order)}
    return FineSample(file, image_id, boxes[keep], labels[keep], "grounding", caption, phrases)


def load_refexp(path, image_root=None, *, instances=None, split=None, allow_outside_root=False):
    """RefCOCO-like refs JSON (list of {image_id, bbox, sentences: [{sent}], split}) -> one
    sample per sentence, with the whole sentence as its phrase. Image files come from the
    ref's 'file_name' or from the 'images' of the COCO `instances` JSON; `split` keeps one
    split ("val", "testA", ...)."""
    refs = read_json(path)
    if not isinstance(refs, list):
        raise AnnotationError(f"{path}: expected a list of refs (RefCOCO refs format)")
    root = Path(image_root) if image_root is not None else Path(path).parent
    images = {}
    if instances is not None:
        images = _images_by_id(read_json(instances), instances, root, allow_outside_root)
    samples = []
    for k, ref in enumerate(refs):
        where = f"{path}: refs[{k}]"
        if split is not None and ref.get("split") != split:
            continue
        image = _ref_image(ref, images, root, where, allow_outside_root)
        x, y, w, h = _bbox(ref, where)
        boxes, keep = clean_boxes([[x, y, x + w, y + h]], image[1], image[2], where)
        if not keep.all():
            continue
        for j, sentence in enumerate(_field(ref, "sentences", (list,), where)):
            text = _field(sentence, "sent", (str,), f"{where}.sentences[{j}]")
            samples.append(FineSample(image[0], ref.get("image_id"), boxes,
                                      torch.ones(1, dtype=torch.long), "refexp", text,
                                      {1: [(0, len(text))]}))
    return samples


def _ref_image(ref, images, root, where, allow_outside_root):
    if "file_name" in ref:
        name = resolve_image_path(root, ref["file_name"], where,
                                  allow_outside_root=allow_outside_root)
        return name, None, None
    image_id = _field(ref, "image_id", (int, str), where)
    if image_id not in images:
        raise AnnotationError(f"{where}: image_id {image_id!r} has no 'file_name'; pass the COCO "
                              "instances JSON that lists it (instances=...)")
    return images[image_id][:3]


# ----------------------------------------------------------------------------- synthetic

SYNTHETIC_NAMES = {i + 1: shape for i, shape in enumerate(SHAPES)}  # detection categories


def referred_span(text, shape):
    """The span of the referred object's words in "the [words] shape ...": after "the ", up
    to the first mention of the target's shape (its head noun)."""
    start = 4 if text.startswith("the ") else 0
    end = text.index(shape, start) + len(shape)
    return start, end


def synthetic_samples(world, split, tasks=("detection", "grounding", "refexp"), limit=None):
    """Per scene of the split: a detection sample (shape categories), a grounding sample (its
    listing caption with a span per object group) and one sample per referring expression.
    Boxes are in units of the image side (0..1); the dataset scales them to the rendering.
    limit: only the first `limit` scenes of the split."""
    samples = []
    label_of = {shape: label for label, shape in SYNTHETIC_NAMES.items()}
    for index in world.split_range(split)[:limit]:
        scene = world.scene(index)
        boxes = torch.tensor(scene.boxes(1), dtype=torch.float32)
        if "detection" in tasks:
            labels = torch.tensor([label_of[o.shape] for o in scene.objects])
            samples.append(FineSample(index, index, boxes, labels, "detection",
                                      names=SYNTHETIC_NAMES))
        if "grounding" in tasks:
            g = scene.grounding
            labels = torch.zeros(len(scene.objects), dtype=torch.long)
            for p, phrase in enumerate(g.phrases):
                labels[list(phrase.objects)] = p + 1
            phrases = {p + 1: [(ph.start, ph.end)] for p, ph in enumerate(g.phrases)}
            samples.append(FineSample(index, index, boxes, labels, "grounding", g.text, phrases))
        if "refexp" in tasks:
            for e in scene.expressions:
                span = referred_span(e.text, scene.objects[e.target].shape)
                samples.append(FineSample(index, index, boxes[e.target:e.target + 1],
                                          torch.ones(1, dtype=torch.long), "refexp", e.text,
                                          {1: [span]}))
    return samples


# ----------------------------------------------------------------------------- dataset

class FineDataset(torch.utils.data.Dataset):
    """FineSamples -> model-ready items (see __getitem__); one class for every source.

    read_image(sample.image, side) gives PIL RGB (side: the synthetic rendering size, None for
    files) or raises data.BadSample.
    """

    def __init__(self, samples, *, tokenizer, transform, max_query_len, read_image, seed=0,
                 name=""):
        self.samples, self.tokenizer, self.transform = list(samples), tokenizer, transform
        self.max_query_len, self.read_image = max_query_len, read_image
        self.seed, self.epoch, self.name = seed, 0, name

    def __len__(self):
        return len(self.samples)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def text_of(self, sample, generator):
        if sample.task != "detection":
            return sample.caption, sample.phrases
        positives = set(sample.labels.tolist())
        prompt, spans = detection_text(sample.names, positives, generator,
                                       train=self.transform.train)
        return fit_prompt(sample.names, spans, prompt, self.tokenizer, self.max_query_len,
                          positives)

    def image_of(self, sample, min_size):
        """PIL image and the sample's boxes in its pixels (synthetic scenes render at size)."""
        if isinstance(sample.image, int):
            return self.read_image(sample.image, min_size), sample.boxes * min_size
        return self.read_image(sample.image, None), sample.boxes.clone()

    def __getitem__(self, index):
        """dict: image (3, h, w), image_size (h, w), orig_size (H, W), text_ids / text_mask
        (Lt,), boxes (G, 4) in the resized image, labels (G,), positive_map (G, Lt),
        label_to_tokens {label: [tokens]}, caption, task, image_id, index, epoch, gt_boxes
        (G, 4) in original pixels."""
        sample = self.samples[index]
        g = sample_generator(self.seed, self.epoch, index, FINE_STREAM)
        text, spans = self.text_of(sample, g)
        min_size = self.transform.pick_min_size(g)
        pil, boxes = self.image_of(sample, min_size)
        orig_size = (pil.size[1], pil.size[0])
        where = f"{self.name} sample {index} (image {sample.image_id})"
        ids, mask, tokens = encode_with_spans(self.tokenizer, text, spans, self.max_query_len,
                                              where)
        keep = torch.tensor([int(lb) in tokens for lb in sample.labels], dtype=torch.bool)
        image, resized = self.transform(pil, boxes, text, g, min_size)
        labels = sample.labels[keep]
        return {"image": image, "image_size": tuple(image.shape[-2:]), "orig_size": orig_size,
                "text_ids": ids, "text_mask": mask, "boxes": resized[keep], "labels": labels,
                "positive_map": positive_map(tokens, labels, self.max_query_len),
                "label_to_tokens": tokens, "caption": text, "task": sample.task,
                "image_id": sample.image_id, "index": index, "epoch": self.epoch,
                "gt_boxes": boxes[keep]}


class FineCollator:
    """Items (None for unreadable samples) -> a batch: images zero-padded bottom/right to a
    common size divisible by `size_divisibility`, text stacked, per-image targets."""

    def __init__(self, size_divisibility=32):
        self.size_divisibility = size_divisibility

    def pad(self, images):
        d = self.size_divisibility
        H = max(im.shape[1] for im in images)
        W = max(im.shape[2] for im in images)
        H, W = -(-H // d) * d, -(-W // d) * d
        batch = images[0].new_zeros(len(images), 3, H, W)  # (B, 3, H, W)
        for b, im in enumerate(images):
            batch[b, :, :im.shape[1], :im.shape[2]] = im
        return batch

    def __call__(self, items):
        good = [item for item in items if item is not None]
        batch = {"num_samples": len(items), "num_skipped": len(items) - len(good)}
        if not good:
            return batch
        batch.update(
            images=self.pad([item["image"] for item in good]),
            image_sizes=[item["image_size"] for item in good],
            text_ids=torch.stack([item["text_ids"] for item in good]),
            text_mask=torch.stack([item["text_mask"] for item in good]),
            targets=[{"boxes": item["boxes"], "positive_map": item["positive_map"],
                      "labels": item["labels"]} for item in good],
            index=torch.tensor([item["index"] for item in good], dtype=torch.long))
        for key, name in (("orig_size", "orig_sizes"), ("label_to_tokens", "label_to_tokens"),
                          ("caption", "captions"), ("task", "tasks"), ("image_id", "image_ids"),
                          ("gt_boxes", "gt_boxes")):
            batch[name] = [item[key] for item in good]
        return batch


# ----------------------------------------------------------------------------- builders

def _render(world, index, side):
    return world.scene(index).render(side)


def _read_file(path, side):
    return load_image(path)


def build_fine_dataset(source="synthetic", *, config, tokenizer, train, split="train",
                       kind=None, image_root=None, instances=None, seed=0, world=None,
                       tasks=("detection", "grounding", "refexp"), skip_bad=True,
                       allow_outside_root=False):
    """A FineDataset for a FiberDetectorConfig (image sizes, max_query_len).

    source: "synthetic" or an annotation file; kind: "detection" (COCO instances),
    "grounding" (MDETR-style) or "refexp" (refs), guessed from the file when None. Returns
    (dataset, extra) where extra holds "categories" for detection files.
    """
    transform = detection_transform(config, train)
    extra = {}
    if source == "synthetic":
        world = world if world is not None else SyntheticWorld(seed=0)
        samples, read = synthetic_samples(world, split, tasks), partial(_render, world)
        transform.flip_prob = 0.0  # the world is already mirror-symmetric in distribution
        extra["categories"] = [(lb, lb, name) for lb, name in SYNTHETIC_NAMES.items()]
    else:
        kind = kind or guess_kind(source)
        options = dict(allow_outside_root=allow_outside_root)
        if kind == "detection":
            samples, extra["categories"] = load_coco_detection(source, image_root, **options)
        elif kind == "grounding":
            samples = load_mdetr_grounding(source, image_root, **options)
        elif kind == "refexp":
            samples = load_refexp(source, image_root, instances=instances, **options)
            transform.flip_prob = 0.0  # expressions say left and right (the original: 0 too)
        else:
            raise ValueError(f"kind={kind!r}: choose detection, grounding or refexp")
        read = _read_file
    dataset = FineDataset(samples, tokenizer=tokenizer, transform=transform,
                          max_query_len=config.max_query_len, read_image=read, seed=seed,
                          name=str(source))
    return (SkipBadSamples(dataset) if skip_bad else dataset), extra


def guess_kind(path):
    """detection / grounding / refexp from a file's structure (a list: refs)."""
    data = read_json(path)
    if isinstance(data, list):
        return "refexp"
    if isinstance(data, dict) and data.get("images") and "caption" in data["images"][0]:
        return "grounding"
    if isinstance(data, dict) and "categories" in data:
        return "detection"
    raise AnnotationError(f"{path}: not a COCO instances, MDETR grounding or refs file; pass "
                          "kind= explicitly")

