"""eval_fine.py: the three protocols scored on hand-made predictions, the COCO results format,
the CLI on the sample files, and the grounding demo."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import eval_fine as ef
from conftest import DATA, need_shared
from data import load_tokenizer
from detector import FiberDetector, FiberDetectorConfig

ANN = DATA / "annotations"


def pred(boxes, scores, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32),
            "scores": torch.tensor(scores, dtype=torch.float32),
            "labels": torch.tensor(labels)}


def meta(image_id, gt, labels, size=(100, 100)):
    return {"image_ids": image_id, "orig_sizes": size, "captions": "", "tasks": "",
            "gt_boxes": torch.tensor(gt, dtype=torch.float32), "labels": torch.tensor(labels)}


def test_results_use_the_inclusive_pixel_width_and_json_ids():
    assert ef.xyxy_to_xywh([10, 20, 29, 49]) == [10.0, 20.0, 20.0, 30.0]
    cats = [(1, 17, "cat"), (2, 75, "remote")]
    results = ef.coco_results([(meta(7, [], []), pred([[0, 0, 9, 9]], [0.5], [2]))], cats)
    assert results == [{"image_id": 7, "bbox": [0.0, 0.0, 10.0, 10.0], "category_id": 75,
                        "score": 0.5}]


def test_detection_ap_of_perfect_and_shifted_predictions():
    from metrics import coco_box_ap
    cats = [(1, 1, "circle"), (2, 2, "square")]
    gt_boxes = [[10, 10, 39, 39], [50, 50, 89, 79]]
    perfect = [(meta(1, gt_boxes, [1, 2]), pred(gt_boxes, [0.9, 0.8], [1, 2]))]
    gt = ef.ground_truth_from(perfect, cats)
    assert coco_box_ap(gt, ef.coco_results(perfect, cats))["AP"] == pytest.approx(1.0)
    wrong_label = [(meta(1, gt_boxes, [1, 2]), pred(gt_boxes, [0.9, 0.8], [2, 1]))]
    assert coco_box_ap(gt, ef.coco_results(wrong_label, cats))["AP50"] == 0.0
    shifted = [(meta(1, gt_boxes, [1, 2]), pred([[20, 10, 49, 39], [50, 50, 89, 79]],
                                                [0.9, 0.8], [1, 2]))]
    ap = coco_box_ap(gt, ef.coco_results(shifted, cats))
    # the circle is off by a third of its width: IoU 20/40 = 0.5, a hit at 0.50 only
    assert ap["AP50"] == pytest.approx(1.0) and ap["AP"] == pytest.approx((1 + 0.1) / 2)


def test_refexp_thresholds_generalised_iou():
    from metrics import box_iou
    gt = [[0, 0, 10, 10]]
    near = [1.8, 1.8, 11.8, 11.8]  # IoU 0.507 but GIoU 0.460: a hit only under plain IoU
    assert box_iou(np.array([near]), np.array(gt))[0, 0] > 0.5
    predictions = [(meta(1, gt, [1]), pred([[0, 0, 10, 10]], [0.9], [1])),
                   (meta(2, gt, [1]), pred([near], [0.9], [1])),
                   (meta(3, gt, [1]), pred([[5, 0, 15, 10], [0, 0, 10, 10]], [0.9, 0.8], [1, 1])),
                   (meta(4, gt, [1]), pred([], [], []))]  # nothing predicted: a miss
    scores = ef.refexp_scores(predictions)
    assert scores["P@1"] == pytest.approx(1 / 4) and scores["P@5"] == pytest.approx(2 / 4)
    assert scores["accuracy"] == scores["P@1"]


def test_grounding_recall_uses_any_gt_box_and_own_phrase_boxes():
    gt = [[0, 0, 10, 10], [50, 50, 60, 60], [20, 20, 30, 30]]
    det = pred([[50, 50, 60, 60], [0, 0, 10, 10], [80, 80, 90, 90]], [0.9, 0.5, 0.8], [2, 1, 1])
    # phrase 1 owns boxes 0 and 1; its best box is [80..90] (miss), second [0..10] (hit)
    scores = ef.grounding_scores([(meta(1, gt, [1, 1, 2]), det)], ks=(1, 2))
    # phrase 2's only box [50..60] does not match its gt [20..30]
    assert scores == {"R@1": 0.0, "R@2": 0.5}


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = FiberDetector(FiberDetectorConfig.tiny())
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save({"model": model.state_dict(), "config": model.config.to_dict()}, path)
    return path


def test_coco_cli_writes_standard_results(tmp_path, tiny_checkpoint, capsys):
    need_shared()
    out = tmp_path / "results.json"
    assert ef.main(["coco", "--data", str(ANN / "instances_tiny.json"), "--image-root",
                    str(DATA / "images"), "--checkpoint", str(tiny_checkpoint), "--results",
                    str(out), "--limit", "2", "--batch-size", "2", "--threshold", "0"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("AP ") and "AP50" in line
    results = json.loads(out.read_text())
    assert results and set(results[0]) == {"image_id", "category_id", "bbox", "score"}
    assert {r["category_id"] for r in results} <= {1, 17, 19, 47, 50, 63, 65, 75, 85}
    assert {r["image_id"] for r in results} <= {1, 2}


@pytest.mark.parametrize("command, data, figure", [
    ("refexp", "refexp_tiny_refs.json", "P@1"), ("flickr", "grounding_tiny_mdetr_style.json",
                                                   "R@1")])
def test_grounding_clis_run_on_the_sample_files(tiny_checkpoint, capsys, command, data, figure):
    need_shared()
    flags = [command, "--data", str(ANN / data), "--image-root", str(DATA / "images"),
             "--checkpoint", str(tiny_checkpoint), "--limit", "2"]
    if command == "refexp":
        flags += ["--instances", str(ANN / "instances_tiny.json")]
    assert ef.main(flags) == 0
    assert figure in capsys.readouterr().out


def test_ground_demo_draws_phrases(tmp_path, tiny_checkpoint, capsys):
    need_shared()
    image = DATA / "images" / "coco_000000039769.jpg"
    out = tmp_path / "boxes.png"
    ef.main(["ground", "--image", str(image), "--text", "a cat. a remote",
             "--checkpoint", str(tiny_checkpoint), "--out", str(out)])
    text = capsys.readouterr().out
    assert "'a cat':" in text and "'a remote':" in text and str(out) in text
    drawn = Image.open(out)
    assert drawn.size == Image.open(image).size


def test_ground_returns_boxes_in_image_pixels(tiny_checkpoint):
    model = FiberDetector.from_pretrained(tiny_checkpoint)
    image = Image.new("RGB", (300, 200), (200, 40, 40))
    found = ef.ground(model, load_tokenizer(), image, "a red square", top_per_phrase=2)
    assert 1 <= len(found) <= 2 and all(p == "a red square" for p, _, _ in found)
    for _, box, score in found:
        assert 0 <= box[0] <= box[2] <= 299 and 0 <= box[1] <= box[3] <= 199
        assert 0 <= score <= 1
    assert ef.phrases_of("two cats. a remote") == ("two cats. a remote", [(0, 8), (10, 18)])
    assert ef.phrases_of("the cat on the left") == ("the cat on the left", [(0, 19)])


def test_synthetic_metrics_report_chance(tiny_checkpoint):
    model = FiberDetector.from_pretrained(tiny_checkpoint)
    found = ef.synthetic_metrics(model, load_tokenizer(), num_scenes=3)
    assert set(found) == {"AP", "AP50", "REC_acc", "REC_chance", "ground_R@1"}
    assert 0.25 <= found["REC_chance"] <= 1.0
