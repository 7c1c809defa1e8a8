"""Datasets, collators and builders of the coarse downstream tasks (VQA, NLVR2, retrieval,
captioning), on the records of data_tasks.py.

    vocab = vqa_vocab_for("synthetic")
    train = build_vqa("synthetic", "train", vocab=vocab, image_size=64, train=True)
    collate = TaskCollator("vqa", load_tokenizer(), max_len=50)
    batch = collate([train[0], train[1]])  # images, text_ids, text_mask, targets, ...

As in data.py, every random choice of an item comes from a generator seeded by (seed, epoch,
index), and unreadable images become None items that the collator counts and drops.
"""
from functools import partial

import torch

from data import CaptionDataset, SkipBadSamples
from images import AUGMENT_STREAM, ImageTransform, load_image, sample_generator
from data_tasks import (AnswerVocab, check_unique, load_caption_corpus, load_nlvr2, load_vqa,
                        parse_source, report_vocab_coverage, synthetic_corpus, synthetic_nlvr2,
                        synthetic_vqa, target_tensor, vqa_target)
from synthetic import ANSWERS, SyntheticWorld

SECOND_IMAGE_STREAM = 2  # NLVR2's second image draws its augmentation from its own stream


# ----------------------------------------------------------------------------- datasets

class SceneImages:
    """read_image for the synthetic world: a scene index -> its PIL rendering at `size`."""

    def __init__(self, world, size):
        self.world, self.size = world, size

    def __call__(self, index):
        return self.world.scene(int(index)).render(self.size)


def trim(ids, mask):
    """Drop the all-padding columns on the right of a batch (B, L) -> (B, L')."""
    width = max(int(mask.sum(1).max()), 2) if len(mask) else ids.shape[1]
    return ids[:, :width], mask[:, :width]



class VQADataset(torch.utils.data.Dataset):
    """Item: image (3,S,S), question, target (A,) soft scores, answers, question_id, index.

    A horizontal flip mirrors left/right in the question and in the answers alike (a flipped
    "which side is the dog on?" has the other side as its answer).
    """

    def __init__(self, records, vocab, *, transform, read_image=load_image, seed=0):
        self.records, self.vocab = list(records), vocab
        self.transform, self.read_image, self.seed, self.epoch = transform, read_image, seed, 0

    def __len__(self):
        return len(self.records)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __getitem__(self, index):
        r = self.records[index]
        g = sample_generator(self.seed, self.epoch, index, AUGMENT_STREAM)
        # question and answers travel through the transform as one text, one line each, so
        # that a flip swaps left/right in all of them together
        text = "\n".join(t.replace("\n", " ") for t in (r.question, *r.answers))
        image, text = self.transform(self.read_image(r.image), text, g)
        question, *answers = text.split("\n")
        labels, scores, _ = vqa_target(answers, self.vocab)
        return {"image": image, "question": question, "answers": answers,
                "target": target_tensor(labels, scores, len(self.vocab)),
                "question_id": r.question_id, "index": index, "epoch": self.epoch}



class NLVR2Dataset(torch.utils.data.Dataset):
    """Item: image_left, image_right (3,S,S), sentence, label (0/1), identifier, index.

    Each image gets its own augmentation draw. Train transforms should not flip: the statement
    speaks of the left and right image, which a word swap cannot keep true (build_nlvr2 turns
    flipping off)."""

    def __init__(self, records, *, transform, read_image=load_image, seed=0):
        self.records, self.transform, self.read_image = list(records), transform, read_image
        self.seed, self.epoch = seed, 0

    def __len__(self):
        return len(self.records)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __getitem__(self, index):
        r = self.records[index]
        images = []
        for image, stream in ((r.left, AUGMENT_STREAM), (r.right, SECOND_IMAGE_STREAM)):
            g = sample_generator(self.seed, self.epoch, index, stream)
            images.append(self.transform(self.read_image(image), "", g)[0])
        return {"image_left": images[0], "image_right": images[1], "sentence": r.sentence,
                "label": int(r.label), "identifier": r.identifier, "index": index,
                "epoch": self.epoch}



class ImageListDataset(torch.utils.data.Dataset):
    """Item: {"image": (3,S,S), "index"} for a list of images (evaluation, eval transform)."""

    def __init__(self, images, *, transform, read_image=load_image):
        self.images, self.transform, self.read_image = list(images), transform, read_image

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return {"image": self.transform(self.read_image(self.images[index]))[0],
                "index": index}


# ----------------------------------------------------------------------------- collators

class TaskCollator:
    """Items (None for skipped bad samples) -> a batch for one task.

    Every batch has num_samples / num_skipped, and images + text_ids / text_mask (B, L) long,
    trimmed to the longest text; plus per task: targets (B, A) and question_ids / answers
    (vqa); images_right and labels (B,) (nlvr2); index, captions and, when `references` is
    given, references (lists of captions of each item's image) (retrieval, caption).
    """

    def __init__(self, task, tokenizer, max_len=50, references=None):
        if task not in ("vqa", "nlvr2", "irtr", "caption", "images"):
            raise ValueError(f"TaskCollator: unknown task {task!r}")
        self.task, self.tokenizer, self.max_len = task, tokenizer, max_len
        self.references = references  # callable: dataset index -> list of captions

    def texts(self, items):
        key = {"vqa": "question", "nlvr2": "sentence"}.get(self.task, "caption")
        return [item[key] for item in items]

    def __call__(self, items):
        good = [item for item in items if item is not None]
        batch = {"num_samples": len(items), "num_skipped": len(items) - len(good)}
        if not good:
            return batch
        first = "image_left" if self.task == "nlvr2" else "image"
        batch["images"] = torch.stack([item[first] for item in good]).float()
        batch["index"] = torch.tensor([item["index"] for item in good], dtype=torch.long)
        if self.task == "images":
            return batch
        texts = self.texts(good)
        batch["text_ids"], batch["text_mask"] = trim(*self.tokenizer.encode(texts, self.max_len))
        getattr(self, f"add_{self.task}")(batch, good, texts)
        return batch

    def add_vqa(self, batch, items, texts):
        batch.update(targets=torch.stack([item["target"] for item in items]), questions=texts,
                     question_ids=[item["question_id"] for item in items],
                     answers=[item["answers"] for item in items])

    def add_nlvr2(self, batch, items, texts):
        batch.update(images_right=torch.stack([item["image_right"] for item in items]).float(),
                     labels=torch.tensor([item["label"] for item in items], dtype=torch.long),
                     identifiers=[item["identifier"] for item in items], sentences=texts)

    def add_irtr(self, batch, items, texts):
        batch["captions"] = texts

    def add_caption(self, batch, items, texts):
        batch["captions"] = texts
        if self.references is not None:
            batch["references"] = [self.references(item["index"]) for item in items]


# ----------------------------------------------------------------------------- builders

def make_transform(image_size, train, augment):
    """ImageTransform for a task: eval (squash-resize), or train with an augmentation preset:
    "full" (crop 0.5-1, flip, RandAugment), "noflip" (crop, RandAugment), "none"."""
    presets = {"full": {}, "noflip": {"flip_prob": 0.0},
               "none": {"crop_scale": None, "randaug_ops": 0, "flip_prob": 0.0}}
    if augment not in presets:
        raise ValueError(f"augment={augment!r}: choose one of {sorted(presets)}")
    return ImageTransform(size=image_size, train=train, **(presets[augment] if train else {}))


def image_reader(source, world, image_size):
    return SceneImages(world, image_size) if source == "synthetic" else load_image


def build_vqa(source, split, *, vocab, image_size, train, seed=0, image_root=None,
              image_names=None, augment=None, world=None):
    """VQA dataset from "synthetic" or "Q.json+A.json[,Q2+A2]"; logs vocabulary coverage."""
    world = world or SyntheticWorld(seed=0)
    kind, spec = parse_source(source)
    if kind == "synthetic":
        records = synthetic_vqa(world, split)
    elif kind == "vqa":
        records, places = [], []
        for questions, annotations in spec:
            part = load_vqa(questions, annotations, image_root=image_root, image_names=image_names)
            records += part
            places += [(r.question_id, f"{questions}") for r in part]
        check_unique(places, "question_id")  # across the files: each is checked on loading
    else:
        raise ValueError(f"VQA source {source!r}: 'synthetic' or QUESTIONS.json+ANNOTATIONS.json")
    if kind != "synthetic":  # synthetic answers are the vocabulary by construction
        report_vocab_coverage(records, vocab, source)
    augment = augment or ("none" if kind == "synthetic" else "full")
    transform = make_transform(image_size, train, augment)
    return SkipBadSamples(VQADataset(records, vocab, transform=transform, seed=seed,
                                     read_image=image_reader(kind, world, image_size)))


def vqa_vocab_for(source, world=None, min_count=9, max_answers=None):
    """The answer vocabulary of a training source (synthetic: every answer of the world)."""
    kind, spec = parse_source(source)
    if kind == "synthetic":
        return AnswerVocab(ANSWERS)
    if kind != "vqa":
        raise ValueError(f"VQA source {source!r}: 'synthetic' or QUESTIONS.json+ANNOTATIONS.json")
    return AnswerVocab.from_vqa_annotations([a for _, a in spec], min_count, max_answers)


def build_nlvr2(source, split, *, image_size, train, seed=0, image_root=None, augment=None,
                world=None, count=None):
    """NLVR2 dataset from "synthetic" or a JSONL file. Training never flips (see NLVR2Dataset)."""
    world = world or SyntheticWorld(seed=0)
    kind, _ = parse_source(source)
    records = (synthetic_nlvr2(world, split, count) if kind == "synthetic"
               else load_nlvr2(source, image_root))
    augment = augment or ("none" if kind == "synthetic" else "noflip")
    transform = make_transform(image_size, train, augment)
    return SkipBadSamples(NLVR2Dataset(records, transform=transform, seed=seed,
                                       read_image=image_reader(kind, world, image_size)))


def build_corpus(source, split, *, image_root=None, world=None, count=None):
    """CaptionCorpus from "synthetic" (split: train/val/test), "file.json:split" or a COCO file."""
    kind, spec = parse_source(source)
    if kind == "synthetic":
        return synthetic_corpus(world or SyntheticWorld(seed=0), split, count)
    path, file_split = spec
    return load_caption_corpus(path, image_root, split=file_split)


def build_caption_pairs(corpus, source, *, image_size, train, seed=0, augment=None, world=None):
    """A data.CaptionDataset of (image, caption) pairs of a corpus (retrieval, captioning)."""
    kind, _ = parse_source(source)
    augment = augment or ("none" if kind == "synthetic" else "full")
    dataset = CaptionDataset(corpus.pairs(), transform=make_transform(image_size, train, augment),
                             read_image=image_reader(kind, world or SyntheticWorld(seed=0),
                                                     image_size), seed=seed, name=source)
    return SkipBadSamples(dataset)


def references_by_index(corpus):
    """dataset index (one per caption of corpus.pairs()) -> all captions of that image."""
    refs = corpus.references()
    owners = [corpus.image_ids[i] for i in corpus.text_image]
    return partial(_lookup_references, refs, owners)


def _lookup_references(refs, owners, index):
    return refs[owners[index]]


def build_corpus_images(corpus, source, *, image_size, world=None):
    """The images of a corpus for evaluation (eval transform), with `.corpus` attached. Items
    are never None: an unreadable image stops the evaluation with its file name, since a
    benchmark scored on part of its images would not be comparable."""
    kind, _ = parse_source(source)
    images = ImageListDataset(corpus.images, transform=make_transform(image_size, False, "none"),
                              read_image=image_reader(kind, world or SyntheticWorld(seed=0),
                                                      image_size))
    images.corpus = corpus
    return images

