"""eval.py: each evaluation path on hand-checked cases (stub models with known outputs), the
ITM re-ranking against brute force, the command line with its result files, the demo, and
(slow) sharding under torchrun giving the single-process results."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import eval as E
import metrics
from conftest import REPO
from data import load_tokenizer
from data_tasks import AnswerVocab, CaptionCorpus, NLVR2Example, VQAQuestion
from model import Fiber, FiberConfig
from synthetic import SyntheticWorld, WorldConfig
from task_datasets import (NLVR2Dataset, TaskCollator, VQADataset, build_corpus_images,
                           make_transform)

WORLD = SyntheticWorld(seed=0, config=WorldConfig(num_train=8, num_val=8, num_test=8))


def render(i):
    return WORLD.scene(int(i)).render(16)


class Scripted(nn.Module):
    """Answers in a fixed order, one row of logits per item, whatever the input."""

    def __init__(self, rows):
        super().__init__()
        self.rows, self.next, self.w = rows, 0, nn.Parameter(torch.zeros(()))
        self.config = SimpleNamespace(heads=())

    def take(self, n):
        out = torch.tensor(self.rows[self.next:self.next + n], dtype=torch.float)
        self.next += n
        return out

    def vqa_logits(self, images, ids, mask):
        return self.take(len(images))

    def nlvr2_logits(self, left, right, ids, mask):
        return self.take(len(left))


def test_metrics_are_re_exported():
    for name in ("vqa_score", "bleu", "cider_d", "retrieval_recall", "coco_box_ap",
                 "rec_accuracy", "grounding_recall"):
        assert getattr(E, name) is getattr(metrics, name)
    answers = ["yes"] * 3 + ["no"] * 7
    assert [E.vqa_score(p, a) for p, a in [("yes", ["yes"] + ["no"] * 9), ("yes", answers),
                                           ("No", answers), ("maybe", answers)]] == \
        [pytest.approx(0.3), pytest.approx(0.9), 1.0, 0.0]


def test_vqa_evaluation_by_hand(tmp_path):
    vocab = AnswerVocab(["yes", "no", "2", "red"])
    questions = [VQAQuestion(11, 0, 0, "q1", ("yes",) * 10),                # "yes": 1.0
                 VQAQuestion(12, 1, 1, "q2", ("2",) * 2 + ("3",) * 8),     # "2": 0.6
                 VQAQuestion(13, 2, 2, "q3", ("yes",) * 10),               # "no": 0
                 VQAQuestion(14, 3, 3, "q4", ("red",) * 3 + ("blue",) * 7)]  # "red": 0.9
    one_hot = [[5, 0, 0, 0], [0, 0, 5, 0], [0, 5, 0, 0], [0, 0, 0, 5]]
    dataset = VQADataset(questions, vocab, transform=make_transform(16, False, "none"),
                         read_image=render)
    result = E.evaluate_vqa(Scripted(one_hot), dataset=dataset, vocab=vocab, device="cpu",
                            collate=TaskCollator("vqa", load_tokenizer()), out_dir=tmp_path,
                            batch_size=3, progress=False)
    assert result["vqa_score"] == pytest.approx(100 * (1.0 + 0.6 + 0.0 + 0.9) / 4)
    submitted = json.loads((tmp_path / "vqa_submit.json").read_text())
    assert submitted == [{"question_id": 11, "answer": "yes"}, {"question_id": 12, "answer": "2"},
                         {"question_id": 13, "answer": "no"}, {"question_id": 14, "answer": "red"}]


def test_nlvr2_evaluation_by_hand(tmp_path):
    records = [NLVR2Example(f"id{k}", k, k + 1, "s", label)
               for k, label in enumerate([True, False, True, False, True])]
    dataset = NLVR2Dataset(records, transform=make_transform(16, False, "none"),
                           read_image=render)
    predictions = [[0, 1], [1, 0], [1, 0], [1, 0], [0, 1]]  # True False False False True
    result = E.evaluate_nlvr2(Scripted(predictions), dataset=dataset, device="cpu",
                              collate=TaskCollator("nlvr2", load_tokenizer()), out_dir=tmp_path,
                              batch_size=2, progress=False)
    assert result["accuracy"] == pytest.approx(80.0)
    written = json.loads((tmp_path / "nlvr2_predictions.json").read_text())
    assert [w["prediction"] for w in written] == ["True", "False", "False", "False", "True"]


def test_reranking_by_hand():
    sim = torch.tensor([[0.9, 0.8, 0.1], [0.7, 0.6, 0.5], [0.2, 0.3, 0.4]])
    owners = [0, 1, 2]
    itm = {(i, j): 5.0 if i == j else 1.0 for i in range(3) for j in range(3)}
    scores = [(i, j, s) for (i, j), s in itm.items()]
    itc = E.retrieval_recall(sim, owners, ks=(1,))
    assert (itc["i2t_r1"], itc["t2i_r1"]) == (pytest.approx(2 / 3), pytest.approx(1 / 3))
    # k=2 per image: every image's own text is among its two best -> ITM puts it first
    assert E.retrieval_recall(E.reranked(sim, scores, 2, dim=1), owners, ks=(1,))["i2t_r1"] == 1
    # k=1 per text: text 1's best image is image 0, and re-scoring one candidate changes nothing
    t2i = E.retrieval_recall(E.reranked(sim, scores, 1, dim=0), owners, ks=(1,))["t2i_r1"]
    assert t2i == pytest.approx(1 / 3)
    # candidates: each image's top-1 text, plus the texts whose top-1 image it is
    assert E.candidate_texts(sim, 1) == [[0, 1], [0, 2], [2]]
    assert E.candidate_texts(sim, 0) == [[0, 1, 2]] * 3


def test_retrieval_with_all_pairs_equals_brute_force_itm():
    torch.manual_seed(0)
    model = Fiber(FiberConfig.tiny(heads=("itc", "itm"), max_text_len=16)).eval()
    corpus = CaptionCorpus([0, 1, 2], [10, 11, 12], ["a red circle", "a star", "two crosses",
                                                     "a blue square"], [0, 1, 2, 2])
    images = build_corpus_images(corpus, "synthetic", image_size=64, world=WORLD)
    tok = load_tokenizer()
    result = E.evaluate_retrieval(model, images=images, tokenizer=tok, max_len=16, k=0,
                                  device="cpu", progress=False)
    pixels = torch.stack([images[i]["image"] for i in range(3)])
    ids, mask = tok.encode(corpus.texts, 16)
    with torch.no_grad():
        brute = torch.stack([model.itm_score.rank_score(model(
            pixels[i:i + 1].expand(4, -1, -1, -1), ids, mask)["cls_feats"]) for i in range(3)])
    expected = E.retrieval_recall(brute, corpus.text_image)
    for key in ("i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5"):
        assert result[key] == pytest.approx(100 * expected[key])
    assert (result["images"], result["texts"]) == (3, 4)


def test_caption_evaluation_scores_what_was_generated(tmp_path, monkeypatch):
    corpus = CaptionCorpus([0, 1], [7, 8], ["a big red circle here", "two small blue squares now",
                                            "one thing"], [0, 1, 1])
    images = build_corpus_images(corpus, "synthetic", image_size=16, world=WORLD)
    said = {0: "a big red circle here", 1: "two small blue squares now"}
    monkeypatch.setattr(E.generation, "generate_captions",  # one batch: images 0 and 1
                        lambda model, x, tok, **kw: [said[i] for i in range(len(x))])
    model = Scripted([])
    result = E.evaluate_caption(model, images=images, tokenizer=load_tokenizer(), device="cpu",
                                out_dir=tmp_path, batch_size=2, progress=False)
    # each caption equals one reference of its image and shares no word with the other image
    assert result["bleu4"] == pytest.approx(100.0)
    expected, _ = metrics.cider_d({7: said[0], 8: said[1]}, corpus.references())
    assert result["cider"] == pytest.approx(100 * expected)
    assert json.loads((tmp_path / "captions.json").read_text()) == [
        {"image_id": 7, "caption": said[0]}, {"image_id": 8, "caption": said[1]}]


# ----------------------------------------------------------------------------- command line

def save_tiny(tmp_path, heads, answers=None):
    torch.manual_seed(0)
    config = FiberConfig.tiny(heads=heads, max_text_len=16,
                              vqa_answers=len(answers) if answers else 3129)
    model = Fiber(config)
    path = tmp_path / "run" / "last.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "config": config.to_dict(), "step": 1}, path)
    if answers:
        AnswerVocab(answers).save(path.parent / "answers.json")
    return path


def test_cli_writes_the_standard_result_files(tmp_path, capsys):
    from synthetic import ANSWERS
    vqa = save_tiny(tmp_path, ("vqa",), list(ANSWERS))
    assert E.main(["vqa", "--checkpoint", str(vqa), "--limit", "5", "--out",
                   str(tmp_path / "vqa")]) == 0
    assert "vqa on synthetic: questions 5" in capsys.readouterr().out
    submitted = json.loads((tmp_path / "vqa" / "vqa_submit.json").read_text())
    assert len(submitted) == 5 and all(s["answer"] in ANSWERS for s in submitted)

    caption = save_tiny(tmp_path / "c", ("caption",))
    assert E.main(["caption", "--checkpoint", str(caption), "--limit", "2", "--beam-size", "2",
                   "--max-len", "5", "--out", str(tmp_path / "cap")]) == 0
    assert "cider" in capsys.readouterr().out
    captions = json.loads((tmp_path / "cap" / "captions.json").read_text())
    assert [set(c) for c in captions] == [{"image_id", "caption"}] * 2


def test_cli_refuses_a_vqa_checkpoint_without_its_answers(tmp_path):
    path = save_tiny(tmp_path, ("vqa",), ["a", "b"])
    os.remove(path.parent / "answers.json")
    with pytest.raises(SystemExit, match="no answers.json beside"):
        E.main(["vqa", "--checkpoint", str(path), "--data", "q.json+a.json"])


def test_demo_prints_what_each_head_says(tmp_path, capsys):
    from synthetic import ANSWERS
    path = save_tiny(tmp_path, ("itc", "itm", "vqa", "caption"), list(ANSWERS))
    image = tmp_path / "scene.png"
    WORLD.scene(3).render(64).save(image)
    E.main(["demo", "--checkpoint", str(path), "--image", str(image), "--text",
            "what color is the background?", "--max-len", "6", "--beam-size", "1"])
    out = capsys.readouterr().out
    for line in ("ITM: the text matches the image with probability", "ITC: cosine similarity",
                 "VQA: ", "caption: "):
        assert line in out
    vqa_line = next(l for l in out.splitlines() if l.startswith("VQA: "))
    assert len(vqa_line.split(", ")) == 5


@pytest.mark.slow
def test_torchrun_shards_and_gathers_like_one_process(tmp_path):
    from synthetic import ANSWERS
    path = save_tiny(tmp_path, ("itc", "itm", "vqa"), list(ANSWERS))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    runs = {}
    for procs in (1, 2):
        out = tmp_path / f"out{procs}"
        for task, extra in (("vqa", ["--limit", "7"]), ("irtr", ["--limit", "5", "--k", "3"])):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={procs}", "eval.py", task, "--checkpoint", str(path),
                   "--batch-size", "3", "--out", str(out / task), *extra]
            done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                                  timeout=300)
            assert done.returncode == 0, done.stderr[-2000:]
        runs[procs] = out
    one, two = runs[1], runs[2]
    submitted = [sorted(json.loads((o / "vqa" / "vqa_submit.json").read_text()),
                        key=lambda r: r["question_id"]) for o in (one, two)]
    assert submitted[0] == submitted[1] and len(submitted[0]) == 7
    recalls = [json.loads((o / "irtr" / "retrieval.json").read_text()) for o in (one, two)]
    assert recalls[0].keys() == recalls[1].keys()
    for key in recalls[0]:
        assert recalls[0][key] == pytest.approx(recalls[1][key], abs=1e-6)
