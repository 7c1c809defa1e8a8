"""Fine-grained data: transform parity with the original, prompts and positive maps, the three
annotation formats (and their bad inputs), the synthetic samples, the collator."""
import json
import logging

import pytest
import torch
from PIL import Image

from conftest import DATA, load_golden, need_shared
from data import AnnotationError, load_tokenizer
from data_fine import (DetectionTransform, FineCollator, SYNTHETIC_NAMES, build_fine_dataset,
                       flip_boxes, load_coco_detection, load_mdetr_grounding, load_refexp,
                       referred_span, resized_size, synthetic_samples)
from detector import FiberDetectorConfig
from prompts import (build_prompt, clean_name, detection_prompts, detection_text,
                     encode_with_spans, fit_prompt)
from synthetic import SyntheticWorld, WorldConfig

ANN = DATA / "annotations"
IMAGES = DATA / "images"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


# ------------------------------------------------------------------------------------------------
# Images: the original's resize rule, normalisation and padding
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("w, h, lo, hi, expected", [
    (640, 480, 320, 416, (312, 416)),   # the goldens: the long side caps the size
    (640, 480, 800, 1333, (800, 1066)),  # COCO test size; 1066.67 truncated
    (480, 640, 800, 1333, (1066, 800)),  # portrait
    (500, 500, 800, 1333, (800, 800)),
    (800, 600, 600, 1000, (600, 800)),   # already the right size: unchanged
])
def test_resized_size_follows_the_original_rule(w, h, lo, hi, expected):
    assert resized_size(w, h, lo, hi) == expected


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_transform_and_padding_reproduce_the_golden_input(version):
    # the goldens store the decoded pixels, the resized+normalised image and the padded batch
    golden = load_golden(f"fine_{version}")["inputs"]
    image = Image.fromarray(golden["raw_image"].numpy())
    x, _ = DetectionTransform(min_sizes=(320,), max_size=416)(image, torch.zeros(0, 4))
    assert torch.equal(x, golden["image_resized"])  # same PIL resize, same float op order
    assert torch.equal(FineCollator(32).pad([x]), golden["images"])


def test_flip_mirrors_boxes_and_respects_left_right_words():
    boxes = torch.tensor([[0.0, 5, 9, 20]])
    assert flip_boxes(boxes, 100).tolist() == [[90.0, 5, 99, 20]]  # inclusive pixels
    t = DetectionTransform(min_sizes=(32,), max_size=64, train=True, flip_prob=1.0)
    image = Image.new("RGB", (32, 32))
    image.putpixel((0, 0), (255, 255, 255))
    flipped, b = t(image, boxes.clone(), "a cat", torch.Generator().manual_seed(0))
    kept, b2 = t(image, boxes.clone(), "the cat on the left", torch.Generator().manual_seed(0))
    assert flipped[:, 0, -1].equal(kept[:, 0, 0]) and not torch.equal(flipped, kept)
    assert b2.tolist() == boxes.tolist() and b.tolist() != boxes.tolist()


def test_train_sizes_are_drawn_per_sample_and_reproducible():
    t = DetectionTransform(min_sizes=(96, 112, 128), max_size=400, train=True)
    draws = [t.pick_min_size(torch.Generator().manual_seed(s)) for s in range(20)]
    assert set(draws) == {96, 112, 128}
    assert draws == [t.pick_min_size(torch.Generator().manual_seed(s)) for s in range(20)]
    assert DetectionTransform(min_sizes=(96, 112), train=False).pick_min_size() == 96


# ------------------------------------------------------------------------------------------------
# Text: prompts, spans -> tokens, truncation
# ------------------------------------------------------------------------------------------------

def test_clean_name_as_the_original():
    assert clean_name("traffic_light") == "traffic light"
    assert clean_name("bow_(weapon)") == "bow "
    assert clean_name("a__b") == "a b"


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_prompt_ids_and_positive_map_match_the_golden(tok, version):
    golden = load_golden(f"fine_{version}")["inputs"]
    if version == "v2":
        text, spans = build_prompt(["cat", "couch", "bed", "remote"])
        labels = golden["positive_map_labels"]
        label_spans = {lb: [s] for lb, s in zip(labels, spans)}
    else:
        text, label_spans = golden["caption"], {1: [(4, 7)]}  # "cat", as the golden's map
    assert text == golden["caption"]
    ids, mask, tokens = encode_with_spans(tok, text, label_spans, 256)
    assert torch.equal(ids, golden["input_ids"][0])
    assert torch.equal(mask, golden["attention_mask"][0])
    expected = {int(k): list(v) for k, v in golden["positive_map_label_to_token"].items()}
    assert tokens == expected


def test_spans_off_token_boundaries_use_the_fallbacks(tok, caplog):
    text = "the cat on the left"
    # starts on the space before "cat" (+1 fallback), ends one past "cat" on a space (-2)
    _, _, tokens = encode_with_spans(tok, text, {1: [(3, 8)]}, 32)
    assert tokens == {1: [2]}
    with caplog.at_level(logging.WARNING, logger="fiber.data_fine"):
        _, _, tokens = encode_with_spans(tok, "a   b", {1: [(1, 4)]}, 32, "case")
    assert tokens == {} and "covers no token" in caplog.text and "case" in caplog.text


def test_long_prompt_is_truncated_with_a_warning(tok, caplog):
    names = [f"thing{i}" for i in range(40)]
    text, spans = build_prompt(names)
    with caplog.at_level(logging.WARNING, logger="fiber.data_fine"):
        ids, mask, tokens = encode_with_spans(tok, text, {i + 1: [s] for i, s in enumerate(spans)},
                                              16)
    assert ids.shape == (16,) and int(mask.sum()) == 16 and int(ids[-1]) == tok.eos_id
    assert "truncated to 16" in caplog.text and "no token within the first 16" in caplog.text
    assert 1 in tokens and 40 not in tokens
    assert all(t < 15 for ts in tokens.values() for t in ts)  # never the final </s>


def test_training_prompt_keeps_positives_and_fits(tok):
    names = {i + 1: f"class{i}" for i in range(30)}
    g = torch.Generator().manual_seed(0)
    text, spans = detection_text(names, {3, 7}, g, train=True)
    text, spans = fit_prompt(names, spans, text, tok, 24, {3, 7})
    assert 3 in spans and 7 in spans
    assert len(tok.encode_with_offsets(text, 10**9)[0]) <= 24
    for lb, [(s, e)] in spans.items():
        assert text[s:e] == names[lb]
    eval_text, eval_spans = detection_text(names, {3}, None, train=False)
    assert eval_text.startswith("class0. class1. ") and list(eval_spans) == list(range(1, 31))


def test_evaluation_prompts_are_chunked_when_too_long(tok):
    cats = [(i + 1, i + 1, f"name{i}") for i in range(30)]
    chunks = detection_prompts(cats, tok, 32)
    assert len(chunks) > 1
    covered = [lb for _, tokens in chunks for lb in tokens]
    assert sorted(covered) == list(range(1, 31))
    assert len(detection_prompts(cats[:4], tok, 256)) == 1


# ------------------------------------------------------------------------------------------------
# Annotation files
# ------------------------------------------------------------------------------------------------

def write(tmp_path, name, obj):
    path = tmp_path / name
    path.write_text(json.dumps(obj))
    return path


def odd_coco(tmp_path):
    """Non-contiguous ids, a background entry, boxes outside / of zero area, a crowd box, an
    image without boxes."""
    return write(tmp_path, "inst.json", {
        "images": [{"id": 7, "file_name": "a.jpg", "width": 100, "height": 50},
                   {"id": 9, "file_name": "b.jpg", "width": 100, "height": 50}],
        "categories": [{"id": 0, "name": "__background__"}, {"id": 5, "name": "traffic_light"},
                       {"id": 42, "name": "dog (animal)"}],
        "annotations": [
            {"image_id": 7, "category_id": 42, "bbox": [10, 10, 20, 10], "iscrowd": 0},
            {"image_id": 7, "category_id": 5, "bbox": [90, 40, 30, 30], "iscrowd": 0},
            {"image_id": 7, "category_id": 5, "bbox": [10, 10, 0, 5], "iscrowd": 0},
            {"image_id": 7, "category_id": 42, "bbox": [0, 0, 50, 50], "iscrowd": 1}]})


def test_coco_loader_handles_odd_categories_and_boxes(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="fiber.data_fine"):
        samples, cats = load_coco_detection(odd_coco(tmp_path))
    assert cats == [(1, 5, "traffic_light"), (2, 42, "dog (animal)")]  # background left out
    assert samples[0].names == {1: "traffic light", 2: "dog "}
    first, empty = samples
    assert first.labels.tolist() == [2, 1]  # the crowd box is left out, the zero-area dropped
    # x2 = x + w - 1; the second box is clipped to the 100 x 50 image
    assert first.boxes.tolist() == [[10, 10, 29, 19], [90, 40, 99, 49]]
    assert "dropped 1 box(es) of zero area" in caplog.text and "image 7" in caplog.text
    assert len(empty.boxes) == 0 and empty.image.endswith("b.jpg")  # kept as a negative


def test_coco_loader_errors_name_the_file_and_field(tmp_path):
    bad = json.loads(odd_coco(tmp_path).read_text())
    bad["annotations"][0]["category_id"] = 99
    with pytest.raises(AnnotationError, match=r"bad1.json: annotations\[0\].*category_id 99"):
        load_coco_detection(write(tmp_path, "bad1.json", bad))
    bad["annotations"][0].update(category_id=5, bbox=[1, 2, 3])
    with pytest.raises(AnnotationError, match=r"annotations\[0\]: field 'bbox'"):
        load_coco_detection(write(tmp_path, "bad2.json", bad))
    with pytest.raises(AnnotationError, match="no categories"):
        load_coco_detection(write(tmp_path, "bad3.json", {
            "images": [], "annotations": [], "categories": [{"id": 0, "name": "__background__"}]}))


def test_mdetr_grounding_loader_on_the_sample_file():
    need_shared()
    samples = load_mdetr_grounding(ANN / "grounding_tiny_mdetr_style.json", IMAGES)
    assert len(samples) == 6
    cats = samples[0]
    assert cats.caption.startswith("Two cats sleeping")
    assert cats.labels.tolist() == [1, 1, 2, 3, 3]  # phrases in tokens_positive_eval order
    assert cats.phrases == {1: [(0, 8)], 2: [(21, 35)], 3: [(44, 63)]}
    # MDETR boxes: x2 = x + w (no -1), clipped to the 640 x 480 image
    assert cats.boxes[0].tolist() == pytest.approx([17.5, 54.38, 318.75, 469.38])
    assert cats.boxes[2].tolist() == pytest.approx([1.07, 1.18, 639.0, 479.0])


def test_refexp_loader_needs_image_files(tmp_path):
    need_shared()
    samples = load_refexp(ANN / "refexp_tiny_refs.json", IMAGES,
                          instances=ANN / "instances_tiny.json")
    assert len(samples) == 10 and samples[0].caption == "the cat on the left"
    assert samples[0].phrases == {1: [(0, 19)]} and samples[0].image.endswith("39769.jpg")
    assert len(load_refexp(ANN / "refexp_tiny_refs.json", IMAGES,
                           instances=ANN / "instances_tiny.json", split="testA")) == 0
    with pytest.raises(AnnotationError, match="instances"):
        load_refexp(ANN / "refexp_tiny_refs.json", IMAGES)


@pytest.mark.parametrize("name, kind, n", [("instances_tiny.json", "detection", 7),
                                           ("grounding_tiny_mdetr_style.json", "grounding", 6),
                                           ("refexp_tiny_refs.json", "refexp", 10)])
def test_real_files_give_model_ready_items(tok, name, kind, n):
    need_shared()
    config = FiberDetectorConfig.base(min_size=160, max_size=224)
    dataset, extra = build_fine_dataset(ANN / name, config=config, tokenizer=tok, train=False,
                                        image_root=IMAGES, instances=ANN / "instances_tiny.json")
    assert len(dataset) == n and dataset.samples[0].task == kind
    item = dataset[0]
    h, w = item["image_size"]
    assert min(h, w) == 160 or max(h, w) == 224
    assert item["text_ids"].shape == (256,) and item["positive_map"].shape == (len(item["boxes"]),
                                                                                256)
    assert (item["boxes"][:, 2:] <= torch.tensor([w, h])).all()
    for row, label in zip(item["positive_map"], item["labels"]):
        assert row.nonzero().view(-1).tolist() == item["label_to_tokens"][int(label)]
    if kind == "detection":
        assert [c[2] for c in extra["categories"]][:2] == ["person", "cat"]


def test_unreadable_image_is_skipped_by_the_collator(tmp_path, tok):
    path = odd_coco(tmp_path)  # its images do not exist
    config = FiberDetectorConfig.tiny()
    dataset, _ = build_fine_dataset(path, config=config, tokenizer=tok, train=True)
    assert dataset[0] is None
    batch = FineCollator()([dataset[0], dataset[1]])
    assert batch == {"num_samples": 2, "num_skipped": 2}


# ------------------------------------------------------------------------------------------------
# Synthetic world and batching
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_world():
    return SyntheticWorld(seed=0, config=WorldConfig(num_train=12, num_val=4, num_test=4))


def test_synthetic_samples_cover_three_tasks(small_world):
    samples = synthetic_samples(small_world, "train")
    tasks = [s.task for s in samples]
    assert tasks.count("detection") == tasks.count("grounding") == 12
    assert tasks.count("refexp") == sum(len(small_world.scene(i).expressions) for i in range(12))
    for s in samples:
        scene = small_world.scene(s.image)
        if s.task == "refexp":
            (start, end), = s.phrases[1]
            assert s.caption[start:end].endswith(scene.objects[
                [e.text for e in scene.expressions].index(s.caption)].shape)
        if s.task == "detection":
            assert [SYNTHETIC_NAMES[int(lb)] for lb in s.labels] == [o.shape for o in scene.objects]
    assert referred_span("the leftmost small red circle", "circle") == (4, 29)


def test_items_are_a_function_of_seed_epoch_and_index(tok, small_world):
    config = FiberDetectorConfig.tiny()
    ds, _ = build_fine_dataset("synthetic", config=config, tokenizer=tok, train=True,
                               world=small_world, skip_bad=False)
    a, b = ds[0], ds[0]
    assert torch.equal(a["image"], b["image"]) and a["caption"] == b["caption"]
    # another epoch draws other sizes / prompt orders for at least some items
    first = [(ds[i]["image_size"], ds[i]["caption"]) for i in range(8)]
    ds.set_epoch(1)
    assert ds[0]["epoch"] == 1
    assert [(ds[i]["image_size"], ds[i]["caption"]) for i in range(8)] != first
    ds.set_epoch(0)
    item = ds[0]
    side = item["image_size"][0]
    assert side in config.train_min_sizes and item["image_size"] == (side, side)
    scene = small_world.scene(0)
    expected = torch.tensor(scene.boxes(side), dtype=torch.float32)
    assert torch.allclose(item["boxes"], expected, atol=1e-4)


def test_collator_pads_to_the_size_divisibility(tok, small_world):
    config = FiberDetectorConfig.tiny()
    ds, _ = build_fine_dataset("synthetic", config=config, tokenizer=tok, train=True,
                               world=small_world, skip_bad=False)
    items = [ds[i] for i in range(5)]
    batch = FineCollator(32)(items)
    B, _, H, W = batch["images"].shape
    assert B == 5 and H % 32 == 0 and W % 32 == 0
    assert H == -(-max(i["image_size"][0] for i in items) // 32) * 32
    for b, item in enumerate(items):
        h, w = item["image_size"]
        assert torch.equal(batch["images"][b, :, :h, :w], item["image"])
        assert batch["images"][b, :, h:].abs().sum() == 0
    assert batch["text_ids"].shape == (5, config.max_query_len)
    assert [t["boxes"].shape[0] for t in batch["targets"]] == [len(i["boxes"]) for i in items]
