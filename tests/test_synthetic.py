"""Tests of synthetic.py: determinism, rendering and boxes, and that every derived text (captions,
questions, expressions, grounding spans, NLVR2 statements) is true of its scene. The checks
parse the texts back and judge them from the object list, independently of the generator."""
import re
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

import synthetic
from conftest import REPO
from data import build_pretrain_dataset, load_tokenizer
from images import swap_left_right
from synthetic import ANSWERS, BACKGROUNDS, COLORS, SHAPES, SyntheticWorld, WorldConfig

WORLD = SyntheticWorld(seed=0)
SCENES = [WORLD.scene(i) for i in range(300)]
NUMBERS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4}
SPATIAL = ("left of", "right of", "above", "below")


def singular(word):
    return word[:-2] if word.endswith("sses") else word[:-1] if word[:-1] in SHAPES else word


def parse_group(text):
    """"two large blue squares" -> (2, ("large", "blue", "square"))."""
    count, *words = text.split()
    return NUMBERS[count], (*words[:-1], singular(words[-1]))


def fits(obj, words):
    """Every word is one of the object's attributes and the last one is its shape."""
    return words[-1] == obj.shape and set(words) <= {obj.size, obj.color, obj.shape}


def holds(a, b, relation):
    """Loose reading of a spatial relation between object centres."""
    return {"left of": a.cx < b.cx, "right of": a.cx > b.cx,
            "above": a.cy < b.cy, "below": a.cy > b.cy}[relation]


def mirrored(obj):
    return synthetic.SceneObject(obj.shape, obj.color, obj.size, 1 - obj.cx, obj.cy, obj.radius)


# ----------------------------------------------------------------------------- determinism

def test_scenes_are_pure_functions_of_seed_and_index():
    again = SyntheticWorld(seed=0)
    assert all(again.scene(i) == SCENES[i] for i in range(0, 300, 37))
    assert again.scene(5).render(64).tobytes() == SCENES[5].render(64).tobytes()
    assert all(WORLD.captions(i) == SCENES[i].captions for i in range(50))
    other = SyntheticWorld(seed=1)
    assert sum(other.scene(i).objects == SCENES[i].objects for i in range(50)) == 0
    layouts = {scene.objects for scene in SCENES}
    pictures = {scene.render(32).tobytes() for scene in SCENES}
    assert len(layouts) == len(pictures) == 300  # different index, different scene


def test_scenes_are_the_same_in_another_process():
    # `random` seeded with a string hashes it with SHA-512, not with Python's per-process
    # salted hash: a fresh interpreter with another hash seed must build the same scenes.
    code = ("import synthetic; w = synthetic.SyntheticWorld(0); "
            "print([w.scene(i) for i in range(5)])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env={"PYTHONHASHSEED": "123"}, check=True).stdout
    assert out.strip() == repr([SCENES[i] for i in range(5)])


def test_splits_are_disjoint_index_ranges():
    world = SyntheticWorld(0, WorldConfig(num_train=100, num_val=20, num_test=10))
    ranges = [world.split_range(s) for s in ("train", "val", "test")]
    assert ranges == [range(0, 100), range(100, 120), range(120, 130)]
    with pytest.raises(ValueError, match="split 'dev'"):
        world.split_range("dev")


# ----------------------------------------------------------------------------- rendering

@pytest.mark.parametrize("size", [64, 384])
def test_each_object_is_drawn_in_its_colour_at_its_centre(size):
    for scene in SCENES[:30]:
        image = scene.render(size)
        assert image.mode == "RGB" and image.size == (size, size)
        for obj in scene.objects:
            assert image.getpixel((int(obj.cx * size), int(obj.cy * size))) == COLORS[obj.color]


def test_boxes_are_tight_around_the_drawn_objects():
    checked = 0
    for scene in SCENES:
        boxes = scene.boxes(64)
        assert np.allclose(scene.boxes(384), np.array(boxes) * 6)  # pixels of each resolution
        if scene.texture != "plain":
            continue
        pixels = np.asarray(scene.render(64)).astype(int)
        drawn = np.abs(pixels - BACKGROUNDS[scene.background]).sum(-1) > 0  # (H, W)
        inside = np.zeros_like(drawn)
        for x0, y0, x1, y1 in boxes:
            # The renderer draws 4x larger and averages down; a drawing may overshoot its
            # outline by one of those small pixels, a quarter of an output pixel.
            left, top = int(x0 - 0.25), int(y0 - 0.25)
            right, bottom = int(np.ceil(x1 + 0.25)), int(np.ceil(y1 + 0.25))
            inside[top:bottom, left:right] = True
            ys, xs = np.nonzero(drawn[top:bottom, left:right])
            # Drawn pixels reach every side of the box: the box is tight.
            assert xs.min() <= 1 and ys.min() <= 1
            assert xs.max() >= right - left - 2 and ys.max() >= bottom - top - 2
        assert not (drawn & ~inside).any()  # nothing drawn outside the boxes
        checked += 1
    assert checked > 100


# ----------------------------------------------------------------------------- texts

def parse_listing(caption):
    """A listing caption -> (Counter of object names, background)."""
    lone = re.fullmatch(r"an? (\w+) background with (an? [\w ]+?) (in|on|at) the [\w ]+", caption)
    if lone:
        return Counter([parse_group(lone.group(2))[1]]), lone.group(1)
    body, background = re.fullmatch(r"(.+) on an? (\w+) background", caption).groups()
    names = Counter()
    for part in re.split(r", | and ", body):
        count, words = parse_group(part)
        names[words] += count
    return names, background


def test_first_caption_lists_every_object_and_the_background():
    for scene in SCENES:
        names, background = parse_listing(scene.captions[0])
        assert names == Counter((o.size, o.color, o.shape) for o in scene.objects)
        assert background == scene.background
        assert 1 <= len(scene.captions) <= 3 and len(set(scene.captions)) == len(scene.captions)


def test_relation_captions_are_true_and_stay_true_when_mirrored():
    found = 0
    for scene in SCENES:
        for caption in scene.captions:
            m = re.fullmatch(r"an? ([\w ]+) (left of|right of|above|below) an? ([\w ]+)", caption)
            if not m:
                continue
            found += 1
            a, relation, b = m.group(1).split(), m.group(2), m.group(3).split()
            assert a != b  # "a red circle left of a red circle" would say little
            objs = scene.objects
            assert any(fits(p, a) and fits(q, b) and holds(p, q, relation)
                       for p in objs for q in objs if p is not q)
            flipped = re.fullmatch(r"an? [\w ]+ (left of|right of|above|below) an? [\w ]+",
                                   swap_left_right(caption)).group(1)
            assert any(fits(p, a) and fits(q, b) and holds(mirrored(p), mirrored(q), flipped)
                       for p in objs for q in objs if p is not q)
    assert found > 50


def test_lone_objects_are_placed_in_words_that_mirror_correctly():
    for scene in SCENES:
        if len(scene.objects) == 1:
            obj, caption = scene.objects[0], scene.captions[0]
            for text, x in ((caption, obj.cx), (swap_left_right(caption), 1 - obj.cx)):
                assert ("left" in text) == (x < 0.4) and ("right" in text) == (x > 0.6)


def test_shape_summaries_count_shapes_and_name_colours():
    found = 0
    for scene in SCENES:
        for caption in scene.captions[1:]:
            m = re.fullmatch(r"(.+) in ([\w ,]+) on an? (\w+) background", caption)
            if not m:
                continue
            found += 1
            shapes = Counter()
            for part in re.split(r", | and ", m.group(1)):
                count, words = parse_group(part)
                shapes[words[-1]] += count
            assert shapes == Counter(o.shape for o in scene.objects)
            assert set(re.split(r", | and ", m.group(2))) == {o.color for o in scene.objects}
    assert found > 50


def answer(scene, question):
    """Independent answers to the generator's question templates."""
    objs, q = scene.objects, question
    if q == "what color is the background?":
        return scene.background
    if q == "how many objects are there?":
        return str(len(objs))
    if m := re.fullmatch(r"how many (\w+) are there\?", q):
        return str(sum(o.shape == singular(m.group(1)) for o in objs))
    if m := re.fullmatch(r"what color is the (\w+)\?", q):
        (only,) = [o for o in objs if o.shape == m.group(1)]
        return only.color
    if m := re.fullmatch(r"what shape is the (\w+) object\?", q):
        (only,) = [o for o in objs if o.color == m.group(1)]
        return only.shape
    m = re.fullmatch(r"is there an? (\w+) (\w+)\?", q)
    return "yes" if any(fits(o, [m.group(1), m.group(2)]) for o in objs) else "no"


def test_questions_have_correct_balanced_answers():
    kinds = Counter()
    for scene in SCENES:
        for q in scene.questions:
            assert q.answer in ANSWERS and answer(scene, q.question) == q.answer, q
            kinds[q.kind] += 1
        yes_no = Counter(q.answer for q in scene.questions if q.kind == "exists")
        assert yes_no == {"yes": 1, "no": 1}
    assert set(kinds) == {"color", "shape", "count", "exists", "background"}


def resolve(scene, text):
    """The objects a referring expression can mean."""
    objs = scene.objects
    body = text.removeprefix("the ")
    for relation in SPATIAL:
        if f" {relation} the " in body:
            head, landmark = (part.split() for part in body.split(f" {relation} the "))
            return [k for k, o in enumerate(objs) if fits(o, head) and any(
                fits(q, landmark) and holds(o, q, relation) for q in objs if q is not o)]
    words = body.split()
    extremes = {"leftmost": lambda o: o.cx, "rightmost": lambda o: -o.cx,
                "topmost": lambda o: o.cy, "bottommost": lambda o: -o.cy}
    if words[0] in extremes:
        matching = [k for k, o in enumerate(objs) if fits(o, words[1:])]
        return [min(matching, key=lambda k: extremes[words[0]](objs[k]))]
    return [k for k, o in enumerate(objs) if fits(o, words)]


def test_referring_expressions_pick_out_their_target():
    total, with_relation = 0, 0
    for scene in SCENES:
        for expression in scene.expressions:
            assert resolve(scene, expression.text) == [expression.target], expression
            total += 1
            with_relation += any(r in expression.text for r in SPATIAL)
        targets = [e.target for e in scene.expressions]
        assert len(set(targets)) == len(targets)
    assert total > 600 and with_relation > 100


def test_grounding_spans_cover_each_object_once():
    for scene in SCENES:
        g = scene.grounding
        assert parse_listing(g.text) == parse_listing(scene.captions[0]) or \
            len(scene.objects) == 1
        covered = []
        for phrase in g.phrases:
            count, words = parse_group(g.text[phrase.start:phrase.end])
            assert count == len(phrase.objects)
            assert all(fits(scene.objects[k], list(words)) for k in phrase.objects)
            covered += phrase.objects
        assert sorted(covered) == list(range(len(scene.objects)))


def test_texts_fit_in_40_tokens():
    tok = load_tokenizer()
    texts = [t for s in SCENES for t in (*s.captions, s.grounding.text,
                                         *(e.text for e in s.expressions),
                                         *(q.question for q in s.questions))]
    texts += [WORLD.nlvr2(k).statement for k in range(100)]
    lengths = tok.encode(texts, max_len=64)[1].sum(1)  # with <s> and </s>
    assert lengths.max() <= 40


# ----------------------------------------------------------------------------- NLVR2

def judge(first, second, statement):
    """Independent truth of the NLVR2 statement templates."""
    a, b = first.objects, second.objects
    has = lambda objs, *words: any(fits(o, list(words)) for o in objs)  # noqa: E731
    if m := re.fullmatch(r"the (first|second) image contains an? (\w+) (\w+)", statement):
        return has(a if m.group(1) == "first" else b, m.group(2), m.group(3))
    if m := re.fullmatch(r"both images contain an? (\w+)", statement):
        return has(a, m.group(1)) and has(b, m.group(1))
    if m := re.fullmatch(r"exactly one image contains an? (\w+) (\w+)", statement):
        return has(a, m.group(1), m.group(2)) != has(b, m.group(1), m.group(2))
    if m := re.fullmatch(r"the first image has more (\w+) than the second image", statement):
        shape = singular(m.group(1))
        return sum(o.shape == shape for o in a) > sum(o.shape == shape for o in b)
    if m := re.fullmatch(r"there (?:is|are) exactly (\w+) (\w+) objects? in total", statement):
        return sum(o.color == m.group(2) for o in a + b) == NUMBERS[m.group(1)]
    if m := re.fullmatch(r"both images have an? (\w+) background", statement):
        return first.background == second.background == m.group(1)
    m = re.fullmatch(r"the first image has exactly (\w+) objects?", statement)
    return len(a) == NUMBERS[m.group(1)]


def test_nlvr2_statements_are_balanced_and_correct():
    examples = [WORLD.nlvr2(k, split="val") for k in range(200)]
    assert sum(e.label for e in examples) == 100
    val = WORLD.split_range("val")
    for e in examples:
        assert e.first in val and e.second in val and e.first != e.second
        assert judge(WORLD.scene(e.first), WORLD.scene(e.second), e.statement) == e.label, e
    assert len({e.statement.split()[1] for e in examples}) >= 4  # several templates in use
    assert WORLD.nlvr2(3, split="val") == examples[3]


# ----------------------------------------------------------------------------- as a dataset

def test_thousands_of_mostly_distinct_pairs():
    train = build_pretrain_dataset("synthetic", split="train", image_size=32, train=False)
    val = build_pretrain_dataset("synthetic", split="val", image_size=32, train=False)
    assert len(train) > 8000 and len(val) > 800
    assert set(train.image_keys).isdisjoint(val.image_keys)
    # Retrieval needs captions that single out their image: most full listings are unique.
    firsts = [WORLD.captions(i)[0] for i in WORLD.split_range("val")]
    assert len(set(firsts)) / len(firsts) > 0.95
    item = val[0]
    assert item["image"].shape == (3, 32, 32) and item["caption"] == WORLD.captions(5000)[0]
