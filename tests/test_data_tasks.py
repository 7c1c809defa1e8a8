"""Readers, targets, datasets and collators of the downstream tasks (data_tasks.py and
task_datasets.py): VQA soft targets and vocabulary, NLVR2 and caption readers, bad input, the
synthetic versions, and the real samples in ../shared/data."""
import json
import logging

import pytest
import torch

from conftest import DATA, need_shared
from data import AnnotationError, load_tokenizer
from images import ImageTransform
from data_tasks import (AnswerVocab, load_caption_corpus, load_coco_caption_corpus,
                        load_karpathy, load_nlvr2, load_vqa, parse_source, synthetic_corpus,
                        synthetic_nlvr2, synthetic_vqa, vqa_target)
from synthetic import ANSWERS, SyntheticWorld, WorldConfig
from task_datasets import (NLVR2Dataset, TaskCollator, VQADataset, build_caption_pairs,
                           build_corpus, build_nlvr2, build_vqa, references_by_index, trim,
                           vqa_vocab_for)

ANN = DATA / "annotations"
IMAGES = DATA / "images"
SMALL_WORLD = SyntheticWorld(seed=0, config=WorldConfig(num_train=40, num_val=12, num_test=12))


def write(path, obj):
    path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)
    return path


# ----------------------------------------------------------------------------- VQA targets

def test_soft_scores_for_one_to_four_matching_humans():
    vocab = AnswerVocab(["a1", "b2", "c3", "d4", "e5"])
    answers = ["a1"] + ["b2"] * 2 + ["c3"] * 3 + ["d4"] * 4
    labels, scores, dropped = vqa_target(answers, vocab)
    assert dict(zip(labels, scores)) == {0: 0.3, 1: 0.6, 2: 0.9, 3: 1.0} and dropped == 0
    _, scores, _ = vqa_target(["e5"] * 10, vocab)
    assert scores == [1.0]


def test_answers_merge_as_the_official_normalisation_does():
    # case, punctuation, articles and number words: "Two." "two" "2" "the 2" are one answer
    vocab = AnswerVocab(["2", "red ball", "yes"])
    labels, scores, _ = vqa_target(["Two.", "two", "2", "the 2", "A red ball", "red ball!",
                                    "Yes", "yes!", "YES", "no"], vocab)
    assert dict(zip(labels, scores)) == {0: 1.0, 1: 0.6, 2: 0.9}
    assert vocab.index("The Two!") == 0 and vocab.index("red") is None


def test_answers_outside_the_vocabulary_are_dropped_and_counted():
    vocab = AnswerVocab(["cat"])
    labels, scores, dropped = vqa_target(["cat"] * 7 + ["kitten"] * 3, vocab)
    assert (labels, scores, dropped) == ([0], [1.0], 3)
    labels, scores, dropped = vqa_target(["dog"] * 10, vocab)
    assert (labels, scores, dropped) == ([], [], 10)


def test_vocab_keeps_frequent_answers_in_order_of_first_appearance(tmp_path):
    majors = ["yes", "No", "2", "yes", "two", "no", "no", "red", "yes"]
    vocab = AnswerVocab.from_answers(majors, min_count=2)
    assert vocab.answers == ["yes", "no", "2"]  # "two" counts as "2"; "red" is too rare
    top = AnswerVocab.from_answers(majors, min_count=1, max_answers=2)
    assert top.answers == ["yes", "no"]
    assert AnswerVocab.load(vocab.save(tmp_path / "answers.json")).answers == vocab.answers
    with pytest.raises(ValueError, match="min_count"):
        AnswerVocab.from_answers(["a"], min_count=2)


# ----------------------------------------------------------------------------- VQA files

def vqa_files(tmp_path, questions, annotations, subtype="val2014"):
    q = write(tmp_path / "q.json", {"data_subtype": subtype, "questions": questions})
    a = write(tmp_path / "a.json", {"annotations": annotations})
    return q, a


def question(qid, image_id=5, text="what?"):
    return {"question_id": qid, "image_id": image_id, "question": text}


def annotation(qid, answers, major=None):
    return {"question_id": qid, "multiple_choice_answer": major or (answers + ["x"])[0],
            "answers": [{"answer": x} for x in answers]}


def test_vqa_reader_names_coco_images_and_keeps_the_answers(tmp_path):
    q, a = vqa_files(tmp_path, [question(1, 42)], [annotation(1, ["yes"] * 10)])
    (record,) = load_vqa(q, a, image_root=tmp_path / "val2014")
    assert record.image.endswith("val2014/COCO_val2014_000000000042.jpg")
    assert record.answers == ("yes",) * 10
    (test_record,) = load_vqa(q, None, image_root=tmp_path)  # a test split: no answers
    assert test_record.answers == ()


@pytest.mark.parametrize("questions, annotations, message", [
    ([question(1), question(2)], [annotation(1, ["a"])], r"q.json: questions\[1\].*question_id 2 "
                                                         r"has no annotation"),
    ([question(1), question(1)], [annotation(1, ["a"])],
     r"questions\[1\]: duplicate question_id 1, first at .*questions\[0\]"),
    ([question(1)], [annotation(1, ["a"]), annotation(1, ["b"])], r"a.json: annotations\[1\]: "
                                                                  r"duplicate question_id 1"),
    ([question(1)], [annotation(1, ["a"]), annotation(9, ["b"])], r"annotations\[1\]: an "
                                                                  r"annotation whose question_id"),
    ([], [], r"q.json: no questions found"),
    ([{"question_id": 1, "image_id": 5}], [annotation(1, ["a"])], r"questions\[0\]: missing "
                                                                  r"field 'question'"),
    ([question(1)], [annotation(1, [])], r"annotations\[0\]: 'answers' is empty"),
])
def test_vqa_bad_input_names_file_and_entry(tmp_path, questions, annotations, message):
    q, a = vqa_files(tmp_path, questions, annotations)
    with pytest.raises(AnnotationError, match=message):
        load_vqa(q, a)


def test_vqa_duplicate_ids_across_files_and_vocab_coverage_is_logged(tmp_path, caplog):
    (tmp_path / "x").mkdir()
    q1, a1 = vqa_files(tmp_path, [question(1)], [annotation(1, ["cat"] * 6 + ["dog"] * 4)])
    q2, a2 = vqa_files(tmp_path / "x", [question(2)], [annotation(2, ["fish"] * 10)])
    vocab = AnswerVocab(["cat"])
    with caplog.at_level(logging.WARNING, logger="fiber.data_tasks"):
        dataset = build_vqa(f"{q1}+{a1},{q2}+{a2}", "train", vocab=vocab, image_size=32,
                            train=False, image_root=tmp_path)
    assert "14 of 20 human answers are outside the 1-answer vocabulary" in caplog.text
    assert "1 of 2 questions have no answer left" in caplog.text
    assert len(dataset) == 2
    with pytest.raises(AnnotationError, match="duplicate question_id 1"):
        build_vqa(f"{q1}+{a1},{q1}+{a1}", "train", vocab=vocab, image_size=32, train=False)


def test_vqa_tiny_samples_give_the_expected_targets():
    need_shared()
    records = load_vqa(ANN / "vqa_tiny_questions.json", ANN / "vqa_tiny_annotations.json",
                       image_root=IMAGES, image_names=ANN / "captions_tiny.json")
    assert len(records) == 10 and records[0].image.endswith("coco_000000039769.jpg")
    vocab = AnswerVocab.from_vqa_annotations([ANN / "vqa_tiny_annotations.json"], min_count=1)
    assert len(vocab) == 10
    daytime = next(r for r in records if r.question == "Is it daytime?")  # 8 no, 2 yes
    labels, scores, _ = vqa_target(daytime.answers, vocab)
    assert {vocab[i]: s for i, s in zip(labels, scores)} == {"no": 1.0, "yes": 0.6}


# ----------------------------------------------------------------------------- NLVR2

def jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def nlvr2_row(identifier="dev-1-0-0", label="True", **extra):
    row = {"identifier": identifier, "sentence": "two dogs", "label": label}
    row.update(extra)
    return row


def test_nlvr2_original_image_naming(tmp_path):
    path = jsonl(tmp_path / "dev.json", [nlvr2_row("dev-850-0-3", "False"),
                                          nlvr2_row("train-7-1-0", directory=12)])
    a, b = load_nlvr2(path, tmp_path / "imgs")
    assert a.left.endswith("imgs/dev-850-0-img0.png") and a.right.endswith("dev-850-0-img1.png")
    assert a.label is False and b.label is True
    assert b.left.endswith("imgs/12/train-7-1-img0.png")


@pytest.mark.parametrize("row, message", [
    (nlvr2_row(left_image="a.png"), r"line 2: missing field 'right_image'"),
    (nlvr2_row("weird", left_image=None), r"line 2: field 'left_image' must be str"),
    ({"identifier": "nohyphens", "sentence": "x", "label": "True"}, r"line 2: no left_image/"
                                                                   r"right_image fields"),
    (nlvr2_row(label="maybe"), r"line 2: field 'label' must be \"True\" or \"False\""),
    (nlvr2_row("dev-1-0-0"), r"line 2: duplicate identifier 'dev-1-0-0', first at .*line 1"),
    ("{not json", r"invalid JSON at line 2"),
])
def test_nlvr2_bad_lines_are_named(tmp_path, row, message):
    path = jsonl(tmp_path / "n.jsonl", [nlvr2_row(), row])
    with pytest.raises(AnnotationError, match=message):
        load_nlvr2(path)


def test_nlvr2_empty_file_and_tiny_samples(tmp_path):
    with pytest.raises(AnnotationError, match="no examples found"):
        load_nlvr2(jsonl(tmp_path / "e.jsonl", ["", " "]))
    need_shared()
    records = load_nlvr2(ANN / "nlvr2_tiny.jsonl", IMAGES)
    assert [r.label for r in records] == [True, False, True, False]
    assert records[0].left.endswith("chelsea.jpg")


# ----------------------------------------------------------------------------- captions

def karpathy(tmp_path, images):
    return write(tmp_path / "dataset_coco.json", {"images": images})


def kimage(cocoid, split, *sentences, filepath="val2014"):
    return {"filename": f"COCO_{cocoid}.jpg", "filepath": filepath, "split": split,
            "cocoid": cocoid, "sentences": [{"raw": s} for s in sentences]}


def test_karpathy_splits_and_train_includes_restval(tmp_path):
    path = karpathy(tmp_path, [kimage(1, "train", "a", "b"), kimage(2, "restval", "c"),
                               kimage(3, "test", "d", "e", "f"), kimage(4, "val", "g")])
    train = load_karpathy(path, "train", tmp_path)
    assert train.image_ids == [1, 2] and train.text_image == [0, 0, 1]
    test = load_karpathy(path, "test", tmp_path)
    assert test.images[0].endswith("val2014/COCO_3.jpg") and test.texts == ["d", "e", "f"]
    assert load_caption_corpus(path, tmp_path, split="val").references() == {4: ["g"]}
    with pytest.raises(ValueError, match="name the split"):
        load_caption_corpus(path)


def test_karpathy_bad_input(tmp_path, caplog):
    path = karpathy(tmp_path, [kimage(1, "test", "a"), kimage(1, "test", "b")])
    with pytest.raises(AnnotationError, match=r"images\[1\]: duplicate image id 1"):
        load_karpathy(path, "test")
    path = karpathy(tmp_path, [kimage(1, "train", "a")])
    with pytest.raises(AnnotationError, match="no images of split 'test' found"):
        load_karpathy(path, "test")
    path = karpathy(tmp_path, [kimage(1, "test", "a"), kimage(2, "test", " ")])
    with caplog.at_level(logging.WARNING, logger="fiber.data_tasks"):
        corpus = load_karpathy(path, "test")
    assert corpus.image_ids == [1] and "skipped 1 image(s) without any caption" in caplog.text


def test_coco_caption_corpus_groups_captions_by_image(tmp_path):
    path = write(tmp_path / "c.json", {
        "images": [{"id": 7, "file_name": "x.jpg"}, {"id": 8, "file_name": "y.jpg"}],
        "annotations": [{"image_id": 8, "caption": "b"}, {"image_id": 7, "caption": "a"},
                        {"image_id": 8, "caption": "c"}]})
    corpus = load_coco_caption_corpus(path)
    assert corpus.references() == {7: ["a"], 8: ["b", "c"]}
    bad = write(tmp_path / "d.json", {"images": [{"id": 7, "file_name": "x.jpg"}],
                                      "annotations": [{"image_id": 9, "caption": "a"}]})
    with pytest.raises(AnnotationError, match=r"annotations\[0\]: image_id 9 is not listed"):
        load_coco_caption_corpus(bad)
    need_shared()
    tiny = load_coco_caption_corpus(ANN / "captions_tiny.json", IMAGES)
    assert len(tiny.images) == 10 and len(tiny.texts) == 25


def test_parse_source():
    assert parse_source("synthetic") == ("synthetic", None)
    assert parse_source("q.json+a.json,q2.json+a2.json") == (
        "vqa", [("q.json", "a.json"), ("q2.json", "a2.json")])
    assert parse_source("dataset_coco.json:test") == ("file", ("dataset_coco.json", "test"))
    with pytest.raises(ValueError, match="QUESTIONS.json"):
        parse_source("q.json+a.json+b.json")


# ----------------------------------------------------------------------------- synthetic

def test_synthetic_tasks_are_answerable_and_balanced():
    records = synthetic_vqa(SMALL_WORLD, "val")
    vocab = vqa_vocab_for("synthetic")
    assert vocab.answers == list(ANSWERS)
    assert all(vqa_target(r.answers, vocab)[1] == [1.0] for r in records)
    assert len({r.question_id for r in records}) == len(records)
    nlvr2 = synthetic_nlvr2(SMALL_WORLD, "val")
    assert len(nlvr2) == 12 and sum(r.label for r in nlvr2) == 6
    corpus = synthetic_corpus(SMALL_WORLD, "test", count=5)
    assert corpus.image_ids == list(range(52, 57)) and len(corpus.texts) >= 5


# ----------------------------------------------------------------------------- datasets

class Flip(ImageTransform):
    """The train transform with a certain flip and nothing else."""

    def __init__(self):
        super().__init__(size=16, train=True, crop_scale=None, flip_prob=1.0, randaug_ops=0)


def test_vqa_flip_mirrors_question_and_answers():
    vocab = AnswerVocab(["left", "right"])
    record = synthetic_vqa(SMALL_WORLD, "train")[0]
    record = type(record)(1, 0, 0, "Is the dog on the left?", ("left",) * 4 + ("right",))
    item = VQADataset([record], vocab, transform=Flip(),
                      read_image=lambda i: SMALL_WORLD.scene(i).render(16))[0]
    assert item["question"] == "Is the dog on the right?"
    assert item["target"].tolist() == [pytest.approx(0.3), 1.0]


def test_datasets_are_deterministic_and_collate_to_the_documented_batch():
    tok = load_tokenizer()
    vocab = vqa_vocab_for("synthetic")
    vqa = build_vqa("synthetic", "val", vocab=vocab, image_size=32, train=True,
                    world=SMALL_WORLD, augment="full")
    assert torch.equal(vqa[3]["image"], vqa[3]["image"])
    batch = TaskCollator("vqa", tok)([vqa[0], None, vqa[1]])
    assert batch["num_samples"] == 3 and batch["num_skipped"] == 1
    assert batch["images"].shape == (2, 3, 32, 32) and batch["targets"].shape == (2, len(vocab))
    assert batch["text_ids"].shape == batch["text_mask"].shape
    assert batch["text_mask"][:, -1].any()  # trimmed: the last column holds a real token

    nlvr2 = build_nlvr2("synthetic", "val", image_size=32, train=True, world=SMALL_WORLD)
    batch = TaskCollator("nlvr2", tok)([nlvr2[0], nlvr2[1]])
    assert batch["images_right"].shape == (2, 3, 32, 32) and batch["labels"].tolist() == [1, 0]
    assert not torch.equal(batch["images"][0], batch["images_right"][0])

    corpus = build_corpus("synthetic", "val", world=SMALL_WORLD)
    pairs = build_caption_pairs(corpus, "synthetic", image_size=32, train=False,
                                world=SMALL_WORLD)
    collate = TaskCollator("caption", tok, references=references_by_index(corpus))
    batch = collate([pairs[0], pairs[len(pairs) - 1]])
    assert batch["references"][0] == corpus.references()[corpus.image_ids[0]]
    assert batch["captions"][0] in batch["references"][0]
    assert TaskCollator("vqa", tok)([None]) == {"num_samples": 1, "num_skipped": 1}


def test_nlvr2_tiny_samples_load_and_an_unreadable_image_is_skipped(tmp_path):
    need_shared()
    dataset = build_nlvr2(str(ANN / "nlvr2_tiny.jsonl"), "val", image_size=32, train=True,
                          image_root=IMAGES)
    assert len(dataset) == 4 and dataset[2]["label"] == 1
    broken = jsonl(tmp_path / "b.jsonl", [nlvr2_row(left_image="gone.png",
                                                    right_image="gone.png")])
    assert build_nlvr2(str(broken), "val", image_size=32, train=False)[0] is None


def test_trim_keeps_every_real_token():
    ids = torch.tensor([[0, 5, 2, 1, 1], [0, 2, 1, 1, 1]])
    mask = (ids != 1).long()
    short_ids, short_mask = trim(ids, mask)
    assert short_ids.tolist() == [[0, 5, 2], [0, 2, 1]] and short_mask.sum() == mask.sum()


def test_nlvr2_dataset_draws_each_image_separately():
    records = synthetic_nlvr2(SMALL_WORLD, "train", count=2)
    same = type(records[0])("s", 3, 3, "x", True)  # the same scene on both sides
    dataset = NLVR2Dataset([same], transform=ImageTransform(size=32, train=True),
                           read_image=lambda i: SMALL_WORLD.scene(i).render(32))
    item = dataset[0]
    assert not torch.equal(item["image_left"], item["image_right"])
