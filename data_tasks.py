"""Annotation readers of the coarse downstream tasks: VQA v2, NLVR2, retrieval, captioning.

Each reader turns a benchmark's files into small records (file paths, texts, labels) and knows
no tensors; task_datasets.py turns records into items and batches. Every task also has a
synthetic version drawn from the embedded shapes world (synthetic.py), so each one trains and
evaluates with no download.

    questions = load_vqa("v2_OpenEnded_mscoco_val2014_questions.json",
                         "v2_mscoco_val2014_annotations.json", image_root="coco/val2014")
    vocab = AnswerVocab.from_vqa_annotations(["v2_mscoco_train2014_annotations.json",
                                              "v2_mscoco_val2014_annotations.json"])
    labels, scores, dropped = vqa_target(questions[0].answers, vocab)

Sources are named by one string (`parse_source`): "synthetic", or for VQA
"QUESTIONS.json+ANNOTATIONS.json[,QUESTIONS2.json+ANNOTATIONS2.json]", for NLVR2 a JSONL file,
for retrieval/captioning a Karpathy-split JSON with its split ("dataset_coco.json:test") or
a COCO-caption JSON. Bad annotations raise data.AnnotationError naming the file and the entry
(JSON) or the line (JSONL); what is better skipped (answers outside the vocabulary, images
without captions) is counted in a warning.
"""
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from data import AnnotationError, Pair, read_json, resolve_image_path
from metrics import normalize_vqa_answer, vqa_soft_score

log = logging.getLogger("fiber.data_tasks")

ANSWERS_FILE = "answers.json"  # the VQA answer vocabulary, saved beside a task's checkpoints


# ----------------------------------------------------------------------------- small helpers

def need(entry, name, types, where):
    """entry[name], checked to be one of `types`, or an AnnotationError saying what is wrong."""
    if not isinstance(entry, dict):
        raise AnnotationError(f"{where}: expected an object, got {type(entry).__name__}")
    if name not in entry:
        raise AnnotationError(f"{where}: missing field '{name}'")
    value = entry[name]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        wanted = " or ".join(t.__name__ for t in types)
        raise AnnotationError(f"{where}: field '{name}' must be {wanted}, got "
                              f"{type(value).__name__} {value!r:.40}")
    return value


def need_list(data, key, path, what):
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise AnnotationError(f"{path}: top level must be an object with a list '{key}' ({what})")
    return data[key]


def read_jsonl(path):
    """[(line number, object)] of a JSON-lines file; blank lines are ignored."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (FileNotFoundError, IsADirectoryError):
        raise AnnotationError(f"{path}: annotation file not found")
    except UnicodeDecodeError as e:
        raise AnnotationError(f"{path}: not UTF-8 text ({e})")
    rows = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as e:
                raise AnnotationError(f"{path}: invalid JSON at line {number}, column "
                                      f"{e.colno}: {e.msg}")
    return rows


def check_unique(keys_and_places, what):
    """Raise on the first key seen twice, naming both places."""
    first = {}
    for key, where in keys_and_places:
        if key in first:
            raise AnnotationError(f"{where}: duplicate {what} {key!r}, first at {first[key]}; "
                                  f"every {what} must be unique")
        first[key] = where


def not_empty(records, path, what):
    if not records:
        raise AnnotationError(f"{path}: no {what} found (an empty split?); check the file and "
                              f"the split name")
    return records


def parse_source(text):
    """'synthetic', 'A+B,C+D' (VQA pairs), 'file.json:split' (Karpathy) or a plain path."""
    if text == "synthetic":
        return "synthetic", None
    if "+" in text:
        pairs = [part.split("+") for part in text.split(",")]
        bad = [p for p in pairs if len(p) != 2]
        if bad:
            raise ValueError(f"VQA source {text!r}: write QUESTIONS.json+ANNOTATIONS.json, "
                             f"several joined by ','")
        return "vqa", [tuple(p) for p in pairs]
    path, _, split = text.partition(":") if not Path(text).exists() else (text, "", "")
    return "file", (path, split or None)


# ----------------------------------------------------------------------------- VQA

@dataclass(frozen=True)
class VQAQuestion:
    question_id: int | str
    image_id: int | str
    image: str | int  # a file path, or a scene index of the synthetic world
    question: str
    answers: tuple = ()  # the human answers as written (10 in VQA v2); () for test questions


class AnswerVocab:
    """The classifier's answers: index i of the VQA logits means `vocab[i]`.

    Built as the original does (write_vqa.py): the normalised `multiple_choice_answer` of every
    annotation is counted, answers seen at least `min_count` times are kept, in order of first
    appearance (VQAv2 train+val with min_count 9 gives the 3,129 answers of the released
    checkpoints, in their order). `max_answers` keeps only the N most frequent of those.
    """

    def __init__(self, answers):
        self.answers = list(answers)
        self.ids = {a: i for i, a in enumerate(self.answers)}
        if len(self.ids) != len(self.answers):
            raise ValueError("AnswerVocab: answers must be unique")

    def __len__(self):
        return len(self.answers)

    def __getitem__(self, i):
        return self.answers[i]

    def index(self, answer):
        """Label id of an answer (normalised first), or None when it is not in the vocab."""
        return self.ids.get(normalize_vqa_answer(answer))

    @classmethod
    def from_answers(cls, major_answers, min_count=9, max_answers=None):
        counts = Counter(normalize_vqa_answer(a) for a in major_answers)  # first-seen order
        kept = [a for a, n in counts.items() if n >= min_count and a]
        if max_answers is not None and len(kept) > max_answers:
            rank = sorted(kept, key=lambda a: -counts[a])  # stable: ties by first appearance
            chosen = set(rank[:max_answers])
            kept = [a for a in kept if a in chosen]
        if not kept:
            raise ValueError(f"no answer was given at least {min_count} times: lower min_count")
        return cls(kept)

    @classmethod
    def from_vqa_annotations(cls, paths, min_count=9, max_answers=None):
        majors = []
        for path in paths:
            for k, entry in enumerate(need_list(read_json(path), "annotations", path, "VQA")):
                majors.append(need(entry, "multiple_choice_answer", (str,),
                                   f"{path}: annotations[{k}]"))
        return cls.from_answers(majors, min_count, max_answers)

    def save(self, path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({"answers": self.answers}, indent=0))
        return Path(path)

    @classmethod
    def load(cls, path):
        data = read_json(path)
        answers = need_list(data, "answers", path, "a saved answer vocabulary")
        return cls(answers)


def vqa_target(answers, vocab):
    """Soft target of one question -> (labels, scores, number of answers outside the vocab).

    Each distinct normalised answer given by n humans scores vqa_soft_score(n) (0.3, 0.6, 0.9,
    1.0 for 1, 2, 3, 4+); answers outside the vocabulary are dropped, as in the original.
    """
    counts = Counter(normalize_vqa_answer(a) for a in answers)
    labels, scores, dropped = [], [], 0
    for answer, n in counts.items():
        label = vocab.ids.get(answer)
        if label is None:
            dropped += n
            continue
        labels.append(label)
        scores.append(vqa_soft_score(n))
    return labels, scores, dropped


def target_tensor(labels, scores, size):
    target = torch.zeros(size)  # (A,)
    if labels:
        target[torch.tensor(labels)] = torch.tensor(scores, dtype=torch.float)
    return target


def _vqa_image_names(questions_data, image_names, where):
    """image_id -> file name: a COCO-style JSON's 'images', or VQA v2's COCO naming."""
    if image_names is not None:
        images = need_list(read_json(image_names), "images", image_names, "COCO images")
        return {need(e, "id", (int, str), f"{image_names}: images[{k}]"):
                need(e, "file_name", (str,), f"{image_names}: images[{k}]")
                for k, e in enumerate(images)}
    subtype = questions_data.get("data_subtype")
    if not isinstance(subtype, str):
        raise AnnotationError(f"{where}: no 'data_subtype' to name the COCO images by; pass "
                              f"image_names (a JSON with images[].id/file_name)")
    return lambda image_id: f"COCO_{subtype}_{int(image_id):012d}.jpg"


def _read_vqa_answers(path):
    """question_id -> (answers tuple, where) from a VQA annotations file."""
    found = {}
    for k, entry in enumerate(need_list(read_json(path), "annotations", path, "VQA")):
        where = f"{path}: annotations[{k}]"
        qid = need(entry, "question_id", (int, str), where)
        raw = need(entry, "answers", (list,), where)
        answers = tuple(need(a, "answer", (str,), f"{where}.answers[{j}]")
                        for j, a in enumerate(raw))
        if not answers:
            raise AnnotationError(f"{where}: 'answers' is empty; a scored question needs its "
                                  f"human answers")
        if qid in found:
            raise AnnotationError(f"{where}: duplicate question_id {qid!r}, first at "
                                  f"{found[qid][1]}")
        found[qid] = (answers, where)
    return found


def load_vqa(questions_path, annotations_path=None, *, image_root=None, image_names=None,
             allow_outside_root=False):
    """VQA v2 questions (+ annotations, absent for test splits) -> list of VQAQuestion.

    Images are image_root / "COCO_<data_subtype>_<image_id:012d>.jpg" (VQA v2 on COCO), or
    the file names that `image_names` (a COCO-style JSON) gives each image id. A question
    without an annotation, an annotation without a question, duplicate question ids and an
    empty file are errors naming the file and the entry.
    """
    data = read_json(questions_path)
    entries = not_empty(need_list(data, "questions", questions_path, "VQA questions"),
                        questions_path, "questions")
    root = Path(image_root) if image_root is not None else Path(questions_path).parent
    names = _vqa_image_names(data, image_names, questions_path)
    answers = _read_vqa_answers(annotations_path) if annotations_path else None
    records, seen = [], {}
    for k, entry in enumerate(entries):
        where = f"{questions_path}: questions[{k}]"
        qid = need(entry, "question_id", (int, str), where)
        image_id = need(entry, "image_id", (int, str), where)
        if qid in seen:
            raise AnnotationError(f"{where}: duplicate question_id {qid!r}, first at {seen[qid]}")
        seen[qid] = where
        name = names(image_id) if callable(names) else names.get(image_id)
        if name is None:
            raise AnnotationError(f"{where}: image_id {image_id!r} is not listed in {image_names}")
        given = ()
        if answers is not None:
            if qid not in answers:
                raise AnnotationError(f"{where}: question_id {qid!r} has no annotation in "
                                      f"{annotations_path}; are the two files of one split?")
            given = answers[qid][0]
        image = resolve_image_path(root, name, where, allow_outside_root=allow_outside_root)
        records.append(VQAQuestion(qid, image_id, image, need(entry, "question", (str,), where),
                                   given))
    if answers is not None:
        extra = [w for q, (_, w) in answers.items() if q not in seen]
        if extra:
            raise AnnotationError(f"{extra[0]}: an annotation whose question_id is not in "
                                  f"{questions_path} ({len(extra)} such); files of two splits?")
    return records


def synthetic_vqa(world, split):
    """Questions about the synthetic scenes; each has 10 identical 'human' answers."""
    records = []
    for scene_index in world.split_range(split):
        for k, q in enumerate(world.scene(scene_index).questions):
            records.append(VQAQuestion(scene_index * 100 + k, scene_index, scene_index,
                                       q.question, (q.answer,) * 10))
    return records


def report_vocab_coverage(records, vocab, name):
    """Log how many answers fall outside the vocabulary (they are dropped from the targets)."""
    dropped = total = empty = 0
    for r in records:
        labels, _, n = vqa_target(r.answers, vocab)
        dropped, total = dropped + n, total + len(r.answers)
        empty += bool(r.answers) and not labels
    if dropped:
        log.warning(f"{name}: {dropped} of {total} human answers are outside the "
                    f"{len(vocab)}-answer vocabulary and were dropped from the targets; "
                    f"{empty} of {len(records)} questions have no answer left (all-zero target)")
    return dict(dropped_answers=dropped, total_answers=total, empty_targets=empty)


# ----------------------------------------------------------------------------- NLVR2

@dataclass(frozen=True)
class NLVR2Example:
    identifier: str
    left: str | int  # image path or synthetic scene index
    right: str | int
    sentence: str
    label: bool


def _nlvr2_images(entry, root, where, allow_outside_root):
    """Explicit left_image/right_image, else the original's naming from the identifier:
    "dev-850-0-3" -> "dev-850-0-img0.png" / "-img1.png" (train: under its 'directory')."""
    if "left_image" in entry or "right_image" in entry:
        names = [need(entry, key, (str,), where) for key in ("left_image", "right_image")]
    else:
        identifier = need(entry, "identifier", (str,), where)
        if identifier.count("-") < 3:
            raise AnnotationError(f"{where}: no left_image/right_image fields, and identifier "
                                  f"{identifier!r} is not of the form split-set-pair-sentence "
                                  f"to derive the image names from")
        stem = identifier.rsplit("-", 1)[0]
        folder = str(entry["directory"]) + "/" if "directory" in entry else ""
        names = [f"{folder}{stem}-img{k}.png" for k in (0, 1)]
    return [resolve_image_path(root, n, where, allow_outside_root=allow_outside_root)
            for n in names]


def parse_label(value, where):
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise AnnotationError(f"{where}: field 'label' must be \"True\" or \"False\", got "
                          f"{value!r:.40}")


def load_nlvr2(path, image_root=None, *, allow_outside_root=False):
    """NLVR2 JSON lines (identifier, sentence, label, images) -> list of NLVR2Example."""
    root = Path(image_root) if image_root is not None else Path(path).parent
    records, places = [], []
    for number, entry in read_jsonl(path):
        where = f"{path}: line {number}"
        identifier = need(entry, "identifier", (str,), where)
        left, right = _nlvr2_images(entry, root, where, allow_outside_root)
        if "label" not in entry:
            raise AnnotationError(f"{where}: missing field 'label' (\"True\"/\"False\")")
        records.append(NLVR2Example(identifier, left, right, need(entry, "sentence", (str,), where),
                                    parse_label(entry["label"], where)))
        places.append((identifier, where))
    check_unique(places, "identifier")
    return not_empty(records, path, "examples")


def synthetic_nlvr2(world, split, count=None):
    """Statements about two synthetic scenes, true and false alternating (balanced)."""
    count = len(world.split_range(split)) if count is None else count
    out = []
    for k in range(count):
        ex = world.nlvr2(k, split)
        out.append(NLVR2Example(f"synthetic-{split}-{k}", ex.first, ex.second, ex.statement,
                                ex.label))
    return out


# ----------------------------------------------------------------------------- captions

@dataclass
class CaptionCorpus:
    """Images and the captions describing them (retrieval and captioning share it).

    images[i] is a path or scene index, image_ids[i] its benchmark id; texts[j] is described
    image text_image[j]. COCO/Flickr30k test splits have 5 captions per image."""
    images: list
    image_ids: list
    texts: list
    text_image: list

    def pairs(self):
        """One data.Pair per caption (for data.CaptionDataset)."""
        return [Pair(self.images[i], t) for t, i in zip(self.texts, self.text_image)]

    def references(self):
        """image_ids[i] -> [its captions]."""
        refs = {image_id: [] for image_id in self.image_ids}
        for t, i in zip(self.texts, self.text_image):
            refs[self.image_ids[i]].append(t)
        return refs

    def image_keys(self):
        """images[i] -> image_ids[i], to find an item's references from its image."""
        return dict(zip(self.images, self.image_ids))


def _corpus(groups, path, what):
    """groups: [(image, image_id, [captions])] -> a CaptionCorpus; images without any
    non-empty caption are skipped with a count in the log (nothing to retrieve or score)."""
    corpus, skipped = CaptionCorpus([], [], [], []), 0
    for image, image_id, captions in groups:
        captions = [c for c in captions if c.strip()]
        if not captions:
            skipped += 1
            continue
        corpus.images.append(image)
        corpus.image_ids.append(image_id)
        corpus.texts += captions
        corpus.text_image += [len(corpus.images) - 1] * len(captions)
    if skipped:
        log.warning(f"{path}: skipped {skipped} image(s) without any caption")
    not_empty(corpus.images, path, what)
    return corpus


KARPATHY_SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",),
                   "restval": ("restval",)}


def load_karpathy(path, split, image_root=None, *, allow_outside_root=False):
    """Karpathy-split JSON (dataset_coco.json, dataset_flickr30k.json) -> CaptionCorpus.

    Each image: filename, optional filepath (COCO: train2014/val2014), split, sentences[].raw;
    its id is cocoid, else imgid. "train" includes "restval", as the original trains on both.
    """
    if split not in KARPATHY_SPLITS:
        raise ValueError(f"{path}: split {split!r}; choose from {sorted(KARPATHY_SPLITS)}")
    root = Path(image_root) if image_root is not None else Path(path).parent
    groups, places = [], []
    for k, entry in enumerate(need_list(read_json(path), "images", path, "Karpathy split")):
        where = f"{path}: images[{k}]"
        if need(entry, "split", (str,), where) not in KARPATHY_SPLITS[split]:
            continue
        name = need(entry, "filename", (str,), where)
        if "filepath" in entry:
            name = f"{need(entry, 'filepath', (str,), where)}/{name}"
        image_id = entry.get("cocoid", entry.get("imgid", name))
        sentences = need(entry, "sentences", (list,), where)
        captions = [need(s, "raw", (str,), f"{where}.sentences[{j}]")
                    for j, s in enumerate(sentences)]
        places.append((image_id, where))
        groups.append((resolve_image_path(root, name, where,
                                          allow_outside_root=allow_outside_root),
                       image_id, captions))
    check_unique(places, "image id")
    return _corpus(groups, path, f"images of split {split!r}")


def load_coco_caption_corpus(path, image_root=None, *, allow_outside_root=False):
    """COCO-caption JSON (images: id, file_name; annotations: image_id, caption) -> corpus."""
    data = read_json(path)
    root = Path(image_root) if image_root is not None else Path(path).parent
    images, order, places = {}, [], []
    for k, entry in enumerate(need_list(data, "images", path, "COCO captions")):
        where = f"{path}: images[{k}]"
        image_id = need(entry, "id", (int, str), where)
        places.append((image_id, where))
        images[image_id] = resolve_image_path(root, need(entry, "file_name", (str,), where),
                                              where, allow_outside_root=allow_outside_root)
        order.append(image_id)
    check_unique(places, "image id")
    captions = {i: [] for i in order}
    for k, entry in enumerate(need_list(data, "annotations", path, "COCO captions")):
        where = f"{path}: annotations[{k}]"
        image_id = need(entry, "image_id", (int, str), where)
        if image_id not in captions:
            raise AnnotationError(f"{where}: image_id {image_id!r} is not listed in 'images'")
        captions[image_id].append(need(entry, "caption", (str,), where))
    return _corpus([(images[i], i, captions[i]) for i in order], path, "captioned images")


def load_caption_corpus(source, image_root=None, *, split=None, allow_outside_root=False):
    """A Karpathy JSON (when `split` is given, or the file has 'images' with 'sentences') or a
    COCO-caption JSON."""
    data = read_json(source)
    karpathy = isinstance(data, dict) and "annotations" not in data
    if karpathy:
        if split is None:
            raise ValueError(f"{source} is a Karpathy-split file: name the split, e.g. "
                             f"{source}:test")
        return load_karpathy(source, split, image_root, allow_outside_root=allow_outside_root)
    return load_coco_caption_corpus(source, image_root, allow_outside_root=allow_outside_root)


def synthetic_corpus(world, split, count=None):
    """Synthetic scenes of a split (the first `count`) with their 1-3 captions each."""
    scenes = list(world.split_range(split))[:count]
    return _corpus([(i, i, list(world.captions(i))) for i in scenes], f"synthetic {split}",
                   "scenes")


