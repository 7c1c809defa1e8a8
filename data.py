"""Data layer of the coarse stage: tokenizer, MLM masking, image-caption datasets (COCO-caption
JSON, JSONL, the synthetic world), skipping of unreadable samples and the collator. Reading
images and their transforms are images.py.

Every random choice (crop, flip, RandAugment, MLM masking) comes from a torch.Generator seeded
from (seed, epoch, sample index), never from global RNG state: a resumed run, or the same run
with a different number of DataLoader workers, sees bit-identical batches.
"""
import json
import logging
import posixpath
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from tokenizers import Tokenizer as BPETokenizer
from tokenizers import decoders, models, pre_tokenizers, processors

from images import (AUGMENT_STREAM, MLM_STREAM, STAND_IN_STREAM, BadSample, ImageTransform,
                    load_image, sample_generator)
from synthetic import SyntheticWorld

log = logging.getLogger("fiber.data")

ROBERTA_DIR = Path(__file__).resolve().parent / "assets" / "roberta"


class AnnotationError(ValueError):
    """An annotation file is malformed: the message names the file, the entry and the field."""


# ----------------------------------------------------------------------------- tokenizer

class Tokenizer:
    """RoBERTa byte-level BPE: captions -> padded id tensors, char offsets, ids -> text."""

    bos_id, pad_id, eos_id, unk_id, mask_id = 0, 1, 2, 3, 50264
    word_ids = (4, 50261)  # [low, high): ordinary BPE words, no specials or filler entries

    def __init__(self, bpe: BPETokenizer):
        self.bpe = bpe
        self.vocab_size = bpe.get_vocab_size()  # 50265 for roberta-base

    def _encode_raw(self, texts):
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"text {i} is a {type(text).__name__}, expected str: {text!r:.60}")
        return self.bpe.encode_batch(list(texts))

    def _cut(self, seq, max_len):
        # Truncate the body but keep <s> first and </s> last, as RoBERTa's truncation does.
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2 to hold <s> and </s>, got {max_len}")
        return seq if len(seq) <= max_len else seq[: max_len - 1] + seq[-1:]

    def encode(self, texts, max_len=40):
        """texts (str or list of str) -> ids (B,L), mask (B,L), long, padded with 1 to max_len."""
        texts = [texts] if isinstance(texts, str) else texts
        ids = torch.full((len(texts), max_len), self.pad_id, dtype=torch.long)  # (B, L)
        mask = torch.zeros((len(texts), max_len), dtype=torch.long)  # (B, L)
        for row, enc in enumerate(self._encode_raw(texts)):
            seq = self._cut(enc.ids, max_len)
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        return ids, mask

    def encode_with_offsets(self, text, max_len=256):
        """One text -> (ids list, offsets list of (start, end) char spans; (0, 0) for specials).

        Offsets exclude the leading space a BPE word carries, so a phrase span [start, end) of
        the text maps to the tokens whose offsets overlap it.
        """
        enc = self._encode_raw([text])[0]
        return self._cut(enc.ids, max_len), self._cut(enc.offsets, max_len)

    def decode(self, ids):
        """Ids (list or 1-D tensor) -> text, without <s>, </s> and padding."""
        ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
        return self.bpe.decode(ids, skip_special_tokens=True)


def load_tokenizer(path=None):
    """Build the RoBERTa tokenizer from vocab.json + merges.txt (default: assets/roberta)."""
    folder = Path(path) if path is not None else ROBERTA_DIR
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    for f in (vocab, merges):
        if not f.is_file():
            raise FileNotFoundError(f"{f} is missing: the tokenizer needs vocab.json and "
                                    f"merges.txt of RoBERTa (shipped in assets/roberta)")
    bpe = BPETokenizer(models.BPE.from_file(str(vocab), str(merges)))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), trim_offsets=True)
    bpe.add_special_tokens(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])  # already in the vocab
    bpe.encode_special_tokens = True  # a caption saying "<mask>" is text, not a control token
    return Tokenizer(bpe)


# ----------------------------------------------------------------------------- MLM masking

def mask_tokens(ids, mask, generator, *, mlm_prob=0.15, mask_id=Tokenizer.mask_id,
                word_ids=Tokenizer.word_ids, special_ids=(0, 1, 2, 3, Tokenizer.mask_id)):
    """BERT/RoBERTa masking -> (mlm_ids, mlm_labels), same shape as ids.

    Each real token (not special, not padding) is chosen with probability `mlm_prob`; a chosen
    token becomes <mask> 80% of the time, a random word 10%, and stays itself 10%. Labels hold
    the original id at chosen positions and -100 (ignored by the loss) everywhere else.
    """
    special = torch.isin(ids, torch.tensor(special_ids)) | (mask == 0)
    probs = torch.full(ids.shape, mlm_prob).masked_fill(special, 0.0)
    chosen = torch.bernoulli(probs, generator=generator).bool()
    to_mask = torch.bernoulli(torch.full(ids.shape, 0.8), generator=generator).bool() & chosen
    to_random = torch.bernoulli(torch.full(ids.shape, 0.5), generator=generator).bool()
    to_random &= chosen & ~to_mask  # half of the remaining 20%: 10% of the chosen
    random_words = torch.randint(*word_ids, ids.shape, generator=generator)

    mlm_ids = ids.masked_fill(to_mask, mask_id)
    mlm_ids = torch.where(to_random, random_words, mlm_ids)
    mlm_labels = ids.masked_fill(~chosen, -100)
    return mlm_ids, mlm_labels


# ----------------------------------------------------------------------------- annotations

@dataclass(frozen=True)
class Pair:
    """One training pair: `image` is a file path, or a scene index of the synthetic world."""
    image: str | int
    caption: str


def read_annotation_text(path):
    """The text of an annotation file, or an AnnotationError naming it. A UTF-8 byte-order
    mark (which Windows editors write) is dropped: json.loads would call it invalid JSON."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except (FileNotFoundError, IsADirectoryError):
        raise AnnotationError(f"{path}: annotation file not found")
    except UnicodeDecodeError as e:
        raise AnnotationError(f"{path}: not UTF-8 text ({e}); re-save it as UTF-8")


def read_json(path):
    """Parse a JSON file; a syntax error names the file, line and column."""
    text = read_annotation_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: "
                              f"{e.msg}")


def _field(entry, name, types, where):
    """entry[name], checked to be one of `types`, or an AnnotationError saying what is wrong."""
    if not isinstance(entry, dict):
        raise AnnotationError(f"{where}: expected an object, got {type(entry).__name__}")
    if name not in entry:
        raise AnnotationError(f"{where}: missing field '{name}'")
    value = entry[name]
    if not isinstance(value, types) or isinstance(value, bool):
        wanted = " or ".join(t.__name__ for t in types)
        raise AnnotationError(f"{where}: field '{name}' must be {wanted}, "
                              f"got {type(value).__name__} {value!r:.40}")
    return value


def resolve_image_path(root, name, where, *, allow_outside_root=False):
    """root / name, refusing absolute names and names that climb out of root with '..'."""
    if not allow_outside_root:
        if Path(name).is_absolute():
            raise AnnotationError(f"{where}: absolute image path {name!r} refused; give paths "
                                  f"relative to {root} or pass allow_outside_root=True")
        if posixpath.normpath(name.replace("\\", "/")).split("/")[0] == "..":
            raise AnnotationError(f"{where}: image path {name!r} leaves the image root {root}; "
                                  f"refused (pass allow_outside_root=True to allow it)")
    return str(Path(root) / name)


def _caption_pair(image, caption, where, empty):
    """A Pair, or None (noted in `empty`) for a blank caption, which teaches nothing."""
    if not caption.strip():
        empty.append(where)
        return None
    return Pair(image, caption)


def _report_empty(path, empty):
    if empty:
        log.warning(f"{path}: skipped {len(empty)} empty caption(s), first at {empty[0]}")


def load_coco_captions(path, image_root=None, *, allow_outside_root=False):
    """COCO-caption JSON ('images': id, file_name; 'annotations': image_id, caption) -> pairs.
    Image files are looked up under `image_root` (default: the JSON file's folder)."""
    data = read_json(path)
    root = Path(image_root) if image_root is not None else Path(path).parent
    for key in ("images", "annotations"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise AnnotationError(f"{path}: top level must be an object with a list '{key}' "
                                  f"(COCO caption format)")
    files = {}
    for k, entry in enumerate(data["images"]):
        where = f"{path}: images[{k}]"
        name = _field(entry, "file_name", (str,), where)
        files[_field(entry, "id", (int, str), where)] = resolve_image_path(
            root, name, where, allow_outside_root=allow_outside_root)
    pairs, empty = [], []
    for k, entry in enumerate(data["annotations"]):
        where = f"{path}: annotations[{k}]"
        image_id = _field(entry, "image_id", (int, str), where)
        caption = _field(entry, "caption", (str,), where)
        if image_id not in files:
            raise AnnotationError(f"{where}: image_id {image_id!r} is not listed in 'images'")
        pairs.append(_caption_pair(files[image_id], caption, where, empty))
    _report_empty(path, empty)
    return [p for p in pairs if p is not None]


def load_jsonl_captions(path, image_root=None, *, allow_outside_root=False):
    """JSON lines {"image": path, "caption": text} -> pairs. Image paths are relative to
    `image_root` (default: the JSONL file's folder). Blank lines are ignored."""
    # Split on "\n" only: str.splitlines() also breaks at U+2028, U+0085 and other separators,
    # which web-scraped captions contain and JSON allows unescaped inside a string.
    lines = read_annotation_text(path).split("\n")
    root = Path(image_root) if image_root is not None else Path(path).parent
    pairs, empty = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise AnnotationError(f"{path}: invalid JSON at line {number}, column {e.colno}: "
                                  f"{e.msg}")
        where = f"{path}: line {number}"
        caption = _field(entry, "caption", (str,), where)
        image = resolve_image_path(root, _field(entry, "image", (str,), where), where,
                                   allow_outside_root=allow_outside_root)
        pairs.append(_caption_pair(image, caption, where, empty))
    _report_empty(path, empty)
    return [p for p in pairs if p is not None]


# ----------------------------------------------------------------------------- datasets

class CaptionDataset(torch.utils.data.Dataset):
    """One item per caption: {"image": (3,S,S) float, "caption": str, "index": int, "epoch"}.

    `read_image(pair.image)` gives a PIL RGB picture or raises BadSample. The train transform
    draws from a generator seeded by (seed, epoch, index): call set_epoch(e) before each
    epoch (DataLoader workers must not be persistent, so that they see the new epoch).
    """

    def __init__(self, pairs, *, transform, read_image=load_image, seed=0, name=""):
        self.pairs = list(pairs)
        self.transform, self.read_image = transform, read_image
        self.seed, self.epoch, self.name = seed, 0, name

    def __len__(self):
        return len(self.pairs)

    def set_epoch(self, epoch):
        self.epoch = epoch

    @property
    def captions(self):
        return [p.caption for p in self.pairs]

    @property
    def image_keys(self):
        """Per item, what identifies its image: items sharing a key show the same picture."""
        return [p.image for p in self.pairs]

    def _load(self, index, transform):
        pair = self.pairs[index]
        generator = sample_generator(self.seed, self.epoch, index, AUGMENT_STREAM)
        return transform(self.read_image(pair.image), pair.caption, generator)

    def __getitem__(self, index):
        index = range(len(self.pairs))[index]  # a plain int >= 0 (it seeds the augmentation)
        image, caption = self._load(index, self.transform)
        return {"image": image, "caption": caption, "index": index, "epoch": self.epoch}

    def load_image_tensor(self, index, train=None):
        """The image of item `index` as (3,S,S). train=None: this dataset's own transform (the
        same view __getitem__ gave this epoch); False: the eval transform; True: augmented."""
        index, transform = range(len(self.pairs))[index], self.transform
        if train is not None and train != transform.train:
            transform = ImageTransform(size=transform.size, train=train)
        return self._load(index, transform)[0]

    def load_images(self, indices):
        """Images of several items -> (n,3,S,S); the ITM queue re-reads hard negatives so."""
        return torch.stack([self.load_image_tensor(int(i)) for i in indices])


class SkipBadSamples(torch.utils.data.Dataset):
    """Wraps a dataset: an item that raises BadSample is skipped with a one-line warning.

    replace=False: the item becomes None (the collator drops it, the batch shrinks).
    replace=True: a stand-in item takes its place, drawn from (seed, epoch, index) so a resumed
    run draws the same one; it carries "replaced": the bad index, so it is still counted as
    a skip. Under DDP every rank must hold equally many samples (the ITC gathers and the
    gradient all-reduce need it), so distributed runs want replace=True.
    Every other attribute (set_epoch, captions, ...) is the wrapped dataset's.
    """

    def __init__(self, dataset, *, replace=False, max_tries=8):
        self.dataset, self.replace, self.max_tries = dataset, replace, max_tries

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        try:
            return self.dataset[index]
        except BadSample as e:
            bad = e
        if self.replace:
            for other in self._stand_ins(index):
                try:
                    item = self.dataset[other]
                except BadSample:
                    continue  # a bad file of its own, warned about when its turn comes
                log.warning(f"skipping sample {index}: {bad}; sample {other} takes its place")
                return dict(item, replaced=range(len(self))[index])
        log.warning(f"skipping sample {index}: {bad}")
        return None

    def _stand_ins(self, index):
        """Up to max_tries other indices, a pure function of (seed, epoch, index)."""
        seed, epoch = getattr(self.dataset, "seed", 0), getattr(self.dataset, "epoch", 0)
        index = range(len(self))[index]
        g = sample_generator(seed, epoch, index, STAND_IN_STREAM)
        draws = torch.randint(len(self), (self.max_tries,), generator=g).tolist()
        return [i for i in draws if i != index]

    def load_images(self, indices):
        """The wrapped dataset's images (n,3,S,S). A file that became unreadable since it was
        first loaded (deleted, a network file system hiccup) gets a stand-in's image with a
        warning, instead of ending a run in the middle of a step."""
        try:
            return self.dataset.load_images(indices)
        except BadSample:
            return torch.stack([self._image_or_stand_in(int(i)) for i in indices])

    def _image_or_stand_in(self, index):
        for other in [index, *self._stand_ins(index)]:
            try:
                return self.dataset.load_image_tensor(other)
            except BadSample as e:
                log.warning(f"re-reading sample {other} for the ITM queue failed: {e}")
        raise BadSample(f"sample {index} and its {self.max_tries} stand-ins are unreadable")

    def __getattr__(self, name):
        if name == "dataset":  # not set yet (e.g. while unpickling): avoid endless recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)


AUGMENTATIONS = {  # train-time augmentation presets, as ImageTransform overrides
    "full": {},  # random crop 0.5-1, flip with caption mirroring, RandAugment(2, 7)
    "flip": {"crop_scale": None, "randaug_ops": 0},  # flip only
    "none": {"crop_scale": None, "randaug_ops": 0, "flip_prob": 0.0},
}


def _render_scene(world, size, index):
    return world.scene(index).render(size)


def build_pretrain_dataset(source="synthetic", *, split="train", image_size=384, train=True,
                           seed=0, image_root=None, allow_outside_root=False, augment=None,
                           skip_bad=True, replace_bad=False, world=None):
    """Image-caption pairs for pre-training, from "synthetic" or a .json / .jsonl file.

    split: for "synthetic", the scene range (train/val/test); a file is one split by itself.
    augment: "full", "flip" or "none" when train=True. Default "full" for files and "flip"
    for the synthetic world, whose captions name every object and colour: a crop can cut an
    object out and colour ops can shift a named colour, which would make the caption false.
    skip_bad: wrap in SkipBadSamples, so unreadable images become None for the collator;
    replace_bad: ... or are replaced by a stand-in sample (what DDP needs; see SkipBadSamples).
    """
    augment = augment or ("flip" if source == "synthetic" else "full")
    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment={augment!r}: choose one of {sorted(AUGMENTATIONS)}")
    if source == "synthetic":
        world = world if world is not None else SyntheticWorld(seed=0)
        pairs = [Pair(i, c) for i in world.split_range(split) for c in world.captions(i)]
        read_image = partial(_render_scene, world, image_size)
    else:
        loaders = {".json": load_coco_captions, ".jsonl": load_jsonl_captions}
        if Path(source).suffix not in loaders:
            raise ValueError(f"source {source!r}: expected 'synthetic', a COCO-caption .json "
                             f"or a .jsonl file")
        pairs = loaders[Path(source).suffix](source, image_root,
                                             allow_outside_root=allow_outside_root)
        if not pairs:
            raise AnnotationError(f"{source}: no image-caption pairs in it (every caption empty, "
                                  f"or no entries at all)")
        read_image = load_image
    transform = ImageTransform(size=image_size, train=train, **AUGMENTATIONS[augment])
    dataset = CaptionDataset(pairs, transform=transform, read_image=read_image, seed=seed,
                             name=str(source))
    return SkipBadSamples(dataset, replace=replace_bad) if skip_bad else dataset


# ----------------------------------------------------------------------------- batching

def count_skipped(items):
    """Bad samples among a batch's items: None (dropped) or a stand-in ("replaced")."""
    return sum(item is None or "replaced" in item for item in items)


class PretrainCollator:
    """Items (None for skipped bad samples) -> the pre-training batch.

    Keys: images (B,3,S,S) float32, text_ids / text_mask / mlm_ids / mlm_labels (B,L) long,
    index (B,) long, captions (list of str), num_samples and num_skipped (ints; a stand-in
    for a bad sample counts as a skip). The MLM mask of an item depends only on (seed, epoch,
    index). If every item was bad, the batch holds only the two counts. `skipped` / `seen`
    count in this process only: with DataLoader workers, sum num_skipped from the batches
    instead (SkipTracker does).
    """

    def __init__(self, tokenizer, max_len=40, mlm_prob=0.15, seed=0):
        self.tokenizer, self.max_len, self.mlm_prob, self.seed = tokenizer, max_len, mlm_prob, seed
        self.seen = self.skipped = 0

    def _mask(self, ids, mask, items):
        mlm_ids, mlm_labels = ids.clone(), torch.full_like(ids, -100)  # (B, L)
        for row, item in enumerate(items):
            g = sample_generator(self.seed, item.get("epoch", 0), item["index"], MLM_STREAM)
            mlm_ids[row], mlm_labels[row] = mask_tokens(
                ids[row], mask[row], g, mlm_prob=self.mlm_prob, mask_id=self.tokenizer.mask_id,
                word_ids=self.tokenizer.word_ids)
        return mlm_ids, mlm_labels

    def __call__(self, items):
        good = [item for item in items if item is not None]
        batch = {"num_samples": len(items), "num_skipped": count_skipped(items)}
        self.seen, self.skipped = self.seen + len(items), self.skipped + batch["num_skipped"]
        if not good:
            return batch
        captions = [item["caption"] for item in good]
        ids, mask = self.tokenizer.encode(captions, self.max_len)  # (B, L) each
        mlm_ids, mlm_labels = self._mask(ids, mask, good)
        batch.update(images=torch.stack([item["image"] for item in good]).float(),
                     text_ids=ids, text_mask=mask, mlm_ids=mlm_ids, mlm_labels=mlm_labels,
                     index=torch.tensor([item["index"] for item in good], dtype=torch.long),
                     captions=captions)
        return batch
