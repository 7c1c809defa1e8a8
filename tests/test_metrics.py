"""Tests of metrics.py: hand-checked cases for every metric, and agreement with the official
scorers (pycocoevalcap BLEU / CIDEr, pycocotools COCOeval, and Stanford PTBTokenizer when Java is
available) on fixed and randomised inputs."""
import contextlib
import copy
import io
import json
import shutil
from collections import defaultdict

import numpy as np
import pytest
import torch

import metrics as M
from conftest import DATA, need_shared

# The re-implementations run the same float64 formulas as the oracles, in the same order where
# it matters, so they agree to round-off; 1e-9 leaves room for summation-order noise only.
TOL = 1e-9


# ---------------------------------------------------------------------------------------------
# VQA


@pytest.mark.parametrize("text, expected", [
    ("Two", "2"),
    ("two.", "2"),
    ("the dog", "dog"),
    ("yes!", "yes"),
    ("ten", "10"),
    ("none", "0"),
    ("dont", "don't"),
    ("isnt", "isn't"),
    ("couldnt've", "couldn't've"),
    ("Yes, it is.", "yes it is"),
    ("a, b", "b"),              # ", " touches a space: deleted; then the article goes
    ("left/right", "left right"),  # "/" touches no space: becomes one
    ("3.5", "3.5"),             # a period before a digit stays
    ("1,000", "1000"),          # digit,digit comma: every mark is deleted, not spaced
    ("\tA Dog's toy\n", "dog's toy"),
])
def test_normalize_vqa_answer(text, expected):
    assert M.normalize_vqa_answer(text) == expected


def test_normalize_vqa_answer_removes_at_most_32_periods():
    # The official script passes re.UNICODE (32) as re.sub's `count`.
    assert M.normalize_vqa_answer("." * 40 + "x") == "." * 8 + "x"


@pytest.mark.parametrize("n_match, expected", [
    (0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (5, 1.0), (6, 1.0), (7, 1.0), (8, 1.0),
    (9, 1.0), (10, 1.0),
])
def test_vqa_score_by_number_of_matches(n_match, expected):
    answers = ["2"] * n_match + ["cat"] * (10 - n_match)
    assert M.vqa_score("Two.", answers) == pytest.approx(expected, abs=1e-12)
    assert M.vqa_soft_score(n_match) == pytest.approx(expected, abs=1e-12)


def test_vqa_score_leave_one_out_with_three_answers():
    # Each of the 3 answers leaves 2 matching others: min(2/3, 1) on average.
    assert M.vqa_score("red", ["Red", "red.", "red"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        M.vqa_score("red", [])


def test_vqa_score_on_sample_annotations():
    need_shared()
    data = json.loads((DATA / "annotations" / "vqa_tiny_annotations.json").read_text())
    for ann in data["annotations"]:
        answers = [a["answer"] for a in ann["answers"]]
        counts = defaultdict(int)
        for a in answers:
            counts[M.normalize_vqa_answer(a)] += 1
        for answer, n in counts.items():
            assert M.vqa_score(answer, answers) == pytest.approx(M.vqa_soft_score(n), abs=1e-12)


# ---------------------------------------------------------------------------------------------
# Caption tokenisation


@pytest.mark.parametrize("text, expected", [
    ("A man riding a wave on top of a surfboard.",
     "a man riding a wave on top of a surfboard"),
    ("The dog's toy, isn't it?", "the dog 's toy is n't it"),
    ('A sign reading "STOP" (red).', "a sign reading stop -lrb- red -rrb-"),  # brackets kept
    ("Mr. Smith at 10:30 a.m. on Main St.", "mr. smith at 10:30 a.m. on main st."),
    ("It costs $5 -- cheap...", "it costs $ 5 cheap"),
    ("3,000 people; wow!!", "3,000 people wow !!"),           # "!!" is not in the drop list
    ("two dogs' bowls\nand a cannot", "two dogs bowls and a can not"),
    ("", ""),
])
def test_coco_caption_tokenize(text, expected):
    assert M.coco_caption_tokenize(text) == expected.split()


# Caption-like sentences with the punctuation, clitics, numbers and abbreviations that COCO
# captions contain; also the 20 candidate/reference sets of the BLEU/CIDEr tests use them.
CAPTIONS = [
    "A man riding a wave on top of a surfboard.",
    "A group of people standing around a table with food.",
    "Two giraffes standing next to each other in a field",
    "A cat laying on a bed next to a laptop computer .",
    "a bathroom with a toilet, sink, and shower.",
    "A man in a red shirt and a woman's hat walking down the street.",
    'A street sign that reads "Main St." on a pole.',
    "An old-fashioned clock tower in the middle of a city.",
    "People are watching a baseball game at the stadium; the batter is up.",
    "Two dogs' toys are lying on the floor.",
    "There's a pizza with pepperoni, cheese and olives on it!",
    "A woman holding an umbrella in the rain...",
    "A T.V. sitting on top of a wooden entertainment center.",
    "A skateboarder does a trick at 3 p.m. at the park.",
    "The clock reads 10:30 on the building's face.",
    "A plate of food: rice, beans, and a salad.",
    "A box of doughnuts (a dozen) on a table.",
    "Mr. and Mrs. Smith cut their wedding cake.",
    "A teddy bear sitting in a chair -- looking sad.",
    "The cat isn't sleeping; it's watching the birds.",
    "A picture of a dog that can't stop barking!!",
    "people walking in the snow w/ skis",
    "A man in a suit & tie talks on his cell phone.",
    "A woman is cutting a cake that says 'happy birthday'.",
    "A laptop sitting on a desk next to a mouse, keyboard, etc.",
    "A girl, about 6, holding an ice-cream cone.",
    "a man is standing next to a cow in a field .",
    "Dr. Jones's office has a big desk.",
    "A U.S.A. flag flies over the building.",
    "A man in his 20's rides a bike.",
    "A truck at 5th Ave. and Broadway.",
    "Vitamin C. The bottle is on a shelf.",
    "",
]


def test_coco_caption_tokenize_matches_stanford_ptb():
    """Same tokens as pycocoevalcap's PTBTokenizer (Java) on caption-like sentences."""
    if shutil.which("java") is None:
        pytest.skip("java not installed: the PTBTokenizer oracle cannot run")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    need_shared()
    tiny = json.loads((DATA / "annotations" / "captions_tiny.json").read_text())
    sentences = CAPTIONS + [a["caption"] for a in tiny["annotations"]]
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            oracle = PTBTokenizer().tokenize({i: [{"caption": s}] for i, s in enumerate(sentences)})
    except OSError as err:  # it writes a temporary file next to its jar
        pytest.skip(f"PTBTokenizer could not run: {err}")
    for i, sentence in enumerate(sentences):
        assert M.coco_caption_tokenize(sentence) == oracle[i][0].split(), sentence


# ---------------------------------------------------------------------------------------------
# BLEU and CIDEr-D


def _oracle_caption_scores(candidates, references):
    """pycocoevalcap Bleu(4) and Cider fed the tokens of coco_caption_tokenize."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    def join(caption):
        return " ".join(M.coco_caption_tokenize(caption))

    gts = {k: [join(r) for r in refs] for k, refs in references.items()}
    res = {k: [join(candidates[k])] for k in references}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, per_item = Cider().compute_score(gts, res)
    return bleu, cider, dict(zip(gts, per_item))


def _fixed_caption_sets():
    """20 images: candidate i is CAPTIONS[i], references are 1-4 other captions, one of them
    close to the candidate (its first words) so that n-grams of every order match."""
    rng = np.random.default_rng(0)
    candidates, references = {}, {}
    for i in range(20):
        others = [c for j, c in enumerate(CAPTIONS) if j != i]
        refs = [others[j] for j in rng.choice(len(others), rng.integers(1, 4), replace=False)]
        words = CAPTIONS[i].split()
        refs.append(" ".join(words[: max(1, len(words) - 2)]) + " today")
        candidates[f"img{i}"], references[f"img{i}"] = CAPTIONS[i], refs
    candidates["img3"] = references["img3"][0]    # a candidate equal to a reference
    candidates["img7"] = ""                         # an empty candidate
    return candidates, references


def _tiny_caption_sets():
    need_shared()
    tiny = json.loads((DATA / "annotations" / "captions_tiny.json").read_text())
    by_image = defaultdict(list)
    for ann in tiny["annotations"]:
        by_image[ann["image_id"]].append(ann["caption"])
    assert all(len(c) >= 2 for c in by_image.values())
    return ({k: c[0] for k, c in by_image.items()}, {k: c[1:] for k, c in by_image.items()})


@pytest.mark.parametrize("make_sets", [_fixed_caption_sets, _tiny_caption_sets])
def test_bleu_and_cider_match_pycocoevalcap(make_sets):
    candidates, references = make_sets()
    bleu_ref, cider_ref, per_item_ref = _oracle_caption_scores(candidates, references)
    bleu = M.bleu(candidates, references)
    cider, per_item = M.cider_d(candidates, references)
    assert len(bleu) == 4 and max(abs(a - b) for a, b in zip(bleu, bleu_ref)) < TOL
    assert abs(cider - cider_ref) < TOL
    assert max(abs(per_item[k] - per_item_ref[k]) for k in references) < TOL
    assert 0.05 < bleu[3] < bleu[0] < 1 and cider > 0.1    # the sets are not degenerate


def test_bleu_by_hand():
    # Identical caption: every precision is 1 and there is no brevity penalty.
    assert M.bleu({1: "a cat on a mat"}, {1: ["A cat on a mat."]}) == pytest.approx([1.0] * 4)
    # "a cat" against a 6-word reference: unigram and bigram precision 1, penalty exp(1 - 6/2);
    # no trigram exists, so BLEU-3 is (1e-15 / 1e-9) ** (1/3) times that (no smoothing).
    got = M.bleu({1: "a cat"}, {1: ["a cat sat on the mat", "a cat"]})
    assert got[:2] == pytest.approx([1.0, 1.0])           # closest reference length is 2
    got = M.bleu({1: "a cat"}, {1: ["a cat sat on the mat"]})
    penalty = np.exp(1 - 6 / 2)
    assert got[0] == pytest.approx(penalty) and got[1] == pytest.approx(penalty)
    assert got[2] == pytest.approx(penalty * (1e-15 / 1e-9) ** (1 / 3))


def test_cider_by_hand():
    # Two images. idf(w) = log 2 - log df(w): "a" is in both images' references, so it weighs 0;
    # "cat" and "a cat" weigh log 2. Image 1 matches its reference on unigrams and bigrams
    # (cosine 1), has no 3/4-grams (0): (1 + 1 + 0 + 0) / 4 * 10 = 5. Image 2 shares only "a".
    corpus, per_item = M.cider_d({1: "a cat", 2: "a cat"}, {1: ["a cat"], 2: ["a dog"]})
    assert per_item == pytest.approx({1: 5.0, 2: 0.0}) and corpus == pytest.approx(2.5)
    # With one image every idf is log 1 - log 1 = 0: CIDEr is 0 whatever the caption.
    assert M.cider_d({1: "a cat"}, {1: ["a cat"]})[0] == 0.0


def test_caption_metrics_reject_mismatched_ids():
    with pytest.raises(ValueError, match="same ids"):
        M.bleu({1: "a cat"}, {2: ["a cat"]})
    with pytest.raises(ValueError, match="non-empty"):
        M.cider_d({1: "a cat"}, {1: []})


# ---------------------------------------------------------------------------------------------
# Retrieval


def test_retrieval_recall_by_hand():
    scores = torch.tensor([[0.2, 0.9, 0.1, 0.3],      # image 0, own text 0: 2 texts above
                           [0.5, 0.4, 0.6, 0.1],      # image 1, own text 1: 2 texts above
                           [0.1, 0.2, 0.3, 0.8]])     # image 2, own texts 2 and 3: best first
    got = M.retrieval_recall(scores, [0, 1, 2, 2], ks=(1, 2, 3))
    # texts 0, 1, 2 each have one image above their own; text 3 ranks its image first
    expected = {"i2t_r1": 1 / 3, "i2t_r2": 1 / 3, "i2t_r3": 1.0,
                "t2i_r1": 1 / 4, "t2i_r2": 1.0, "t2i_r3": 1.0}
    assert got == pytest.approx(expected)


def test_retrieval_recall_matches_topk_definition():
    g = torch.Generator().manual_seed(0)
    n_images, per_image = 30, 5
    owner = torch.arange(n_images).repeat_interleave(per_image)
    scores = torch.randn(n_images, n_images * per_image, generator=g)
    scores[owner, torch.arange(len(owner))] += 1.5                 # make recall non-trivial
    got = M.retrieval_recall(scores.numpy(), owner.tolist())
    for k in (1, 5, 10):
        top_texts = scores.topk(k, dim=1).indices                  # (Ni, k)
        i2t = (owner[top_texts] == torch.arange(n_images)[:, None]).any(dim=1).float().mean()
        top_images = scores.topk(k, dim=0).indices                 # (k, Nt)
        t2i = (top_images == owner[None, :]).any(dim=0).float().mean()
        assert got[f"i2t_r{k}"] == pytest.approx(i2t.item())
        assert got[f"t2i_r{k}"] == pytest.approx(t2i.item())
    assert 0.1 < got["t2i_r1"] < got["t2i_r10"] < 1


def test_retrieval_recall_counts_ties_against_the_right_answer():
    # Collapsed features (every score equal) must not look like perfect retrieval.
    assert set(M.retrieval_recall(torch.zeros(4, 4), [0, 1, 2, 3], ks=(1,)).values()) == {0.0}
    scores = torch.tensor([[1.0, 1.0, 0.0],      # image 0: own text 0 tied with text 1
                           [0.0, 1.0, 0.5]])     # image 1: own texts 1 and 2, best one first
    got = M.retrieval_recall(scores, [0, 1, 1], ks=(1, 2))
    assert got == pytest.approx({"i2t_r1": 0.5, "i2t_r2": 1.0,
                                 "t2i_r1": 2 / 3, "t2i_r2": 1.0})


def test_retrieval_recall_rejects_bad_index():
    with pytest.raises(ValueError):
        M.retrieval_recall(torch.zeros(2, 3), [0, 0, 2])
    with pytest.raises(ValueError):
        M.retrieval_recall(torch.zeros(2, 3), [0, 0, 0])          # image 1 has no text


# ---------------------------------------------------------------------------------------------
# Referring expressions and phrase grounding


def test_box_iou_and_giou_by_hand():
    iou = M.box_iou([[0, 0, 2, 2]], [[1, 1, 3, 3], [0, 0, 2, 2], [5, 5, 6, 6]])
    assert iou == pytest.approx(np.array([[1 / 7, 1.0, 0.0]]))
    # GIoU subtracts (hull - union) / hull: hull of the first pair is 3x3 = 9, union 7.
    giou = M.box_iou([[0, 0, 2, 2]], [[1, 1, 3, 3]], generalized=True)
    assert giou[0, 0] == pytest.approx(1 / 7 - 2 / 9)


def test_rec_accuracy_by_hand():
    pred = torch.tensor([[0.0, 0, 10, 10]] * 4)
    gt = [[0, 0, 10, 10],      # IoU 1
          [0, 0, 10, 20],      # IoU 0.5 exactly: counts (>=)
          [5, 5, 15, 15],      # IoU 25 / 175: miss
          [2, 2, 12, 11]]      # IoU 64 / 126 = 0.508, GIoU 0.508 - 6 / 132 = 0.462
    assert M.rec_accuracy(pred, gt) == pytest.approx(3 / 4)
    assert M.rec_accuracy(pred, gt, generalized=True) == pytest.approx(2 / 4)
    with pytest.raises(ValueError):
        M.rec_accuracy(pred, gt[:2])


def test_grounding_recall_by_hand():
    ranked = [[[50, 50, 60, 60], [0, 0, 10, 10]],   # right box second
              [[100, 100, 110, 110]],               # right box first
              []]                                   # no prediction: a miss
    gt = [[[0, 0, 10, 10], [100, 100, 110, 110]],   # any of the two boxes counts (no merging)
          [[100, 100, 110, 110]],
          [[0, 0, 5, 5]]]
    assert M.grounding_recall(ranked, gt, ks=(1, 2)) == pytest.approx({"r1": 1 / 3, "r2": 2 / 3})


# ---------------------------------------------------------------------------------------------
# COCO box AP

NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]


def _cocoeval(ground_truth, detections):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = copy.deepcopy(ground_truth)
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes(copy.deepcopy(detections)), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return dict(zip(NAMES, evaluator.stats.tolist()))


def _jittered_detections(ground_truth, seed, n_false=10):
    """Ground-truth boxes jittered (some dropped, some doubled, some with a wrong class) with
    random scores, plus random false positives; some scores rounded so that ties occur."""
    rng = np.random.default_rng(seed)
    cats = [c["id"] for c in ground_truth["categories"]]
    images = [img["id"] for img in ground_truth["images"]]
    dets = []
    for ann in ground_truth["annotations"]:
        for _ in range((rng.random() > 0.2) * (1 + (rng.random() < 0.2))):
            x, y, w, h = ann["bbox"]
            j = rng.normal(0, 0.15, 4)
            cat = ann["category_id"] if rng.random() > 0.1 else int(rng.choice(cats))
            box = [x + j[0] * w, y + j[1] * h, w * np.exp(j[2]), h * np.exp(j[3])]
            dets.append({"image_id": ann["image_id"], "category_id": cat, "bbox": box,
                         "score": float(rng.random())})
    for _ in range(n_false):
        w, h = rng.uniform(3, 300, 2)
        dets.append({"image_id": int(rng.choice(images)), "category_id": int(rng.choice(cats)),
                     "bbox": [*rng.uniform(0, 300, 2).tolist(), w, h],
                     "score": float(rng.random())})
    for det in dets[::3]:
        det["score"] = round(det["score"], 1)
    return dets


def _random_ground_truth(seed, n_images=5, n_cats=3):
    """Boxes of every size (so APs/APm/APl all exist), some crowd regions, and a category with
    no annotation (COCOeval leaves it at -1 and out of the means)."""
    rng = np.random.default_rng(seed)
    anns = []
    for img in range(1, n_images + 1):
        for _ in range(rng.integers(1, 10)):
            w, h = np.exp(rng.uniform(np.log(4), np.log(300), 2))
            anns.append({"id": len(anns) + 1, "image_id": img,
                         "category_id": int(rng.integers(1, n_cats + 1)),
                         "bbox": [*rng.uniform(0, 300, 2).tolist(), w, h],
                         "area": float(w * h * rng.uniform(0.5, 1.0)),
                         "iscrowd": int(rng.random() < 0.1)})
    return {"images": [{"id": i} for i in range(1, n_images + 1)], "annotations": anns,
            "categories": [{"id": c} for c in range(1, n_cats + 2)]}


def test_coco_box_ap_one_box_by_hand():
    gt = {"images": [{"id": 1}], "categories": [{"id": 1}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 100, 100],
                           "area": 10000.0, "iscrowd": 0}]}
    perfect = M.coco_box_ap(gt, [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 100, 100],
                                  "score": 0.9}])
    for name in NAMES:   # no small or medium object exists: those figures are -1
        expected = -1.0 if name in ("APs", "APm", "ARs", "ARm") else 1.0
        assert perfect[name] == pytest.approx(expected), name   # precision is tp / (tp + eps)
    # IoU 0.62 matches at thresholds 0.50, 0.55, 0.60 only: 3 of the 10 thresholds.
    partial = M.coco_box_ap(gt, [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 100, 62],
                                  "score": 0.9}])
    assert partial["AP"] == pytest.approx(0.3) and partial["AR100"] == pytest.approx(0.3)
    assert partial["AP50"] == pytest.approx(1.0) and partial["AP75"] == 0.0
    # A higher-scored false positive first: precision 1/2 at every recall point.
    two = M.coco_box_ap(gt, [{"image_id": 1, "category_id": 1, "bbox": [200, 200, 50, 50],
                              "score": 0.95},
                             {"image_id": 1, "category_id": 1, "bbox": [0, 0, 100, 100],
                              "score": 0.9}])
    assert two["AP50"] == pytest.approx(0.5) and two["AR1"] == 0.0 and two["AR10"] == 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coco_box_ap_matches_pycocotools_on_sample_data(seed):
    need_shared()
    gt = json.loads((DATA / "annotations" / "instances_tiny.json").read_text())
    dets = _jittered_detections(gt, seed)
    ours, oracle = M.coco_box_ap(gt, dets), _cocoeval(gt, dets)
    assert max(abs(ours[k] - oracle[k]) for k in NAMES) < TOL, (ours, oracle)
    assert 0 < ours["AP"] < 1


@pytest.mark.parametrize("seed", [0, 1])
def test_coco_box_ap_matches_pycocotools_with_crowd_and_small_boxes(seed):
    gt = _random_ground_truth(seed)
    dets = _jittered_detections(gt, seed, n_false=60)
    dets += [{"image_id": 1, "category_id": 1, "bbox": [float(v) for v in box], "score": 0.5}
             for box in np.random.default_rng(seed).uniform(1, 200, (110, 4))]  # > 100 on one
    ours, oracle = M.coco_box_ap(gt, dets), _cocoeval(gt, dets)
    assert max(abs(ours[k] - oracle[k]) for k in NAMES) < TOL, (ours, oracle)
    assert all(oracle[k] > -1 for k in NAMES)     # every area range was exercised


def test_coco_box_ap_reads_files_and_checks_image_ids(tmp_path):
    need_shared()
    path = DATA / "annotations" / "instances_tiny.json"
    gt = json.loads(path.read_text())
    dets = _jittered_detections(gt, 5)
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    assert M.coco_box_ap(str(path), tmp_path / "dets.json") == M.coco_box_ap(gt, dets)
    with pytest.raises(ValueError, match="image 12345"):
        M.coco_box_ap(gt, [{"image_id": 12345, "category_id": 1, "bbox": [0, 0, 1, 1],
                            "score": 1.0}])
    assert M.coco_box_ap(gt, [])["AP"] == 0.0
