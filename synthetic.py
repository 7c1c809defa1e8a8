"""A procedurally generated world of coloured shapes: fiber's embedded default data set.

Scene i of SyntheticWorld(seed) is a pure function of (seed, i): 1-4 big, clearly coloured
shapes on a plain or faintly striped background. From each scene come captions that only the
image can confirm, VQA questions with answers, referring expressions with their target box,
and a grounding caption with a character span per object; pairs of scenes give NLVR2-style
statements with balanced true/false labels. Nothing is downloaded; a scene renders at any
resolution, with boxes in that resolution's pixels.

    world = SyntheticWorld(seed=0)
    scene = world.scene(7)
    image = scene.render(64)            # PIL RGB, 64 x 64
    scene.captions[0], scene.boxes(64)  # "two large blue squares and ...", [(x0, y0, x1, y1)]
"""
import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLORS = {  # seven hues spread around the colour wheel, far apart even at 64 px
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 215, 30),
    "green": (40, 170, 60),
    "cyan": (30, 200, 220),
    "blue": (40, 80, 230),
    "purple": (150, 60, 200),
}
BACKGROUNDS = {"white": (245, 245, 245), "gray": (120, 120, 120), "black": (25, 25, 25)}
TEXTURES = ("plain", "striped")  # drawn but never named: a nuisance a model must ignore
SHAPES = ("circle", "square", "triangle", "star", "cross")
SIZES = {"small": 0.09, "large": 0.15}  # object radius as a fraction of the image side
NUMBER_WORDS = ("no", "one", "two", "three", "four")
ANSWERS = (*COLORS, *SHAPES, *BACKGROUNDS, "yes", "no", "0", "1", "2", "3", "4")  # VQA answers
SPLITS = ("train", "val", "test")
MARGIN = 0.12  # two objects stand in a left/right/above/below relation only this far apart


@dataclass(frozen=True)
class WorldConfig:
    """Size of the world's splits and how crowded its scenes are."""
    num_train: int = 5000  # scenes 0 .. num_train-1
    num_val: int = 500  # the next num_val scenes
    num_test: int = 500  # the next num_test scenes
    count_weights: tuple = (1, 3, 3, 3)  # relative odds of a scene holding 1, 2, 3, 4 objects


# ----------------------------------------------------------------------------- scene content

@dataclass(frozen=True)
class SceneObject:
    """One shape; geometry in image-side units (0..1, y pointing down)."""
    shape: str
    color: str
    size: str
    cx: float
    cy: float
    radius: float

    @property
    def name(self):
        return f"{self.size} {self.color} {self.shape}"

    def outline(self):
        """Polygon vertices (x, y) in 0..1 units, all within `radius` of the centre (so objects
        placed apart as discs never touch); a circle is a 48-gon here, used for its box."""
        cx, cy, r = self.cx, self.cy, self.radius
        if self.shape == "circle":
            return _ring(cx, cy, [r], 48)
        if self.shape == "square":
            s = 0.7 * r
            return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
        if self.shape == "triangle":
            return _ring(cx, cy + 0.1 * r, [0.95 * r], 3)  # nudged down to look centred
        if self.shape == "star":
            return _ring(cx, cy, [r, 0.45 * r], 10)
        w, e = 0.3 * r, 0.95 * r  # cross: a plus sign, arms of half-width w reaching out to e
        arm = [(w, -e), (w, -w), (e, -w), (e, w), (w, w), (w, e)]
        return [(cx + x, cy + y) for x, y in arm + [(-x, -y) for x, y in arm]]

    def box(self, image_size):
        """Tight box (x0, y0, x1, y1) in pixels of an image_size x image_size rendering."""
        xs, ys = zip(*self.outline())
        return (min(xs) * image_size, min(ys) * image_size,
                max(xs) * image_size, max(ys) * image_size)


def _ring(cx, cy, radii, n):
    """n points around (cx, cy), starting at the top, cycling through `radii`."""
    angles = [-math.pi / 2 + 2 * math.pi * k / n for k in range(n)]
    return [(cx + radii[k % len(radii)] * math.cos(a), cy + radii[k % len(radii)] * math.sin(a))
            for k, a in enumerate(angles)]


@dataclass(frozen=True)
class Question:
    question: str
    answer: str  # one of ANSWERS
    kind: str  # "color", "shape", "count", "exists", "background"


@dataclass(frozen=True)
class RefExpression:
    text: str  # names exactly one object of the scene
    target: int  # index into Scene.objects; its box is scene.boxes(size)[target]


@dataclass(frozen=True)
class Phrase:
    start: int  # character span [start, end) in GroundingCaption.text
    end: int
    objects: tuple  # indices into Scene.objects that the phrase names


@dataclass(frozen=True)
class GroundingCaption:
    text: str
    phrases: tuple  # of Phrase; every object of the scene is in exactly one phrase


@dataclass(frozen=True)
class Nlvr2Example:
    first: int  # scene index of the first image
    second: int  # scene index of the second image
    statement: str  # says "first image" / "second image", never left/right (see nlvr2())
    label: bool


@dataclass(frozen=True)
class Scene:
    index: int
    background: str
    texture: str
    objects: tuple  # of SceneObject
    captions: tuple  # 1-3 strings, each true of this image and of few others
    questions: tuple  # of Question
    expressions: tuple  # of RefExpression
    grounding: GroundingCaption

    def boxes(self, image_size):
        """Per object, its box (x0, y0, x1, y1) in pixels at this image size."""
        return [obj.box(image_size) for obj in self.objects]

    def render(self, image_size):
        """Draw the scene as a PIL RGB image of image_size x image_size pixels."""
        scale = 4 if image_size <= 128 else 2  # draw larger, then average down: smooth edges
        side = image_size * scale
        image = Image.new("RGB", (side, side), BACKGROUNDS[self.background])
        draw = ImageDraw.Draw(image)
        if self.texture == "striped":
            shade = tuple(c + (14 if c < 128 else -14) for c in BACKGROUNDS[self.background])
            period = max(side // 10, 2)
            for x in range(-side, side, period):
                draw.line([(x, side), (x + side, 0)], fill=shade, width=max(period // 3, 1))
        # Pillow fills the pixels from floor(start) to floor(end): the drawing covers each
        # outline and overshoots it by less than one of these small pixels (1/4 or 1/2 of an
        # output pixel), so boxes computed from the outlines are tight to that precision.
        for obj in self.objects:
            fill = COLORS[obj.color]
            if obj.shape == "circle":
                x, y, r = obj.cx * side, obj.cy * side, obj.radius * side
                draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
            else:
                draw.polygon([(x * side, y * side) for x, y in obj.outline()], fill=fill)
        return image.resize((image_size, image_size), Image.BOX)


# ----------------------------------------------------------------------------- layout

def _layout(rng, count):
    """Place `count` random objects without overlap (gap >= 0.04), inside a 0.03 border."""
    for _ in range(200):  # restart when a crowded canvas leaves no room for the next object
        objects = []
        for _ in range(count):
            size = rng.choice(list(SIZES))
            r = SIZES[size]
            for _ in range(50):
                cx, cy = rng.uniform(r + 0.03, 1 - r - 0.03), rng.uniform(r + 0.03, 1 - r - 0.03)
                if all(math.hypot(cx - o.cx, cy - o.cy) > r + o.radius + 0.04 for o in objects):
                    objects.append(SceneObject(rng.choice(SHAPES), rng.choice(list(COLORS)),
                                               size, round(cx, 4), round(cy, 4), r))
                    break
        if len(objects) == count:
            return tuple(objects)
    raise RuntimeError(f"could not place {count} objects; lower SIZES")


# ----------------------------------------------------------------------------- text helpers

def _plural(shape):
    return shape + ("es" if shape.endswith("s") else "s")


def _counted(n, adjectives, shape):
    """(2, "large blue", "square") -> "two large blue squares"; n = 1 gives "a ..."."""
    words = f"{adjectives} {shape if n == 1 else _plural(shape)}".strip()
    article = "an" if words[0] in "aeiou" else "a"
    return f"{article if n == 1 else NUMBER_WORDS[n]} {words}"


def _join(parts):
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _groups(objects):
    """Objects grouped by full name, in order of first appearance: {name: [indices]}."""
    groups = {}
    for k, obj in enumerate(objects):
        groups.setdefault(obj.name, []).append(k)
    return groups


def _relation(a, b):
    """Where a stands relative to b ("left of", "above", ...), or None when too close to say."""
    dx, dy = a.cx - b.cx, a.cy - b.cy
    if max(abs(dx), abs(dy)) < MARGIN:
        return None
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def _place(obj):
    """Coarse position words for a lone object: "in the top left", "in the middle", ..."""
    row = "top" if obj.cy < 0.4 else "bottom" if obj.cy > 0.6 else ""
    col = "left" if obj.cx < 0.4 else "right" if obj.cx > 0.6 else ""
    if row and col:
        return f"in the {row} {col} corner"
    return f"at the {row}" if row else f"on the {col}" if col else "in the middle"


# ----------------------------------------------------------------------------- captions

def _listing(objects, background, rng):
    names = list(_groups(objects).items())
    rng.shuffle(names)
    parts = [_counted(len(ks), *name.rsplit(" ", 1)) for name, ks in names]
    if len(objects) == 1:  # a lone object: say where it is, so that such scenes differ more
        return f"a {background} background with {parts[0]} {_place(objects[0])}"
    return f"{_join(parts)} on a {background} background"


def _relation_caption(objects, rng):
    pairs = [(a, b) for a in objects for b in objects
             if a.name != b.name and _relation(a, b) is not None]
    if not pairs:
        return None
    a, b = rng.choice(pairs)
    # "a red circle" as often as "a small red circle", unless that would name both alike.
    short = rng.random() < 0.5 and (a.color, a.shape) != (b.color, b.shape)
    name_a, name_b = (f"{o.color} {o.shape}" if short else o.name for o in (a, b))
    return f"{_counted(1, *name_a.rsplit(' ', 1))} {_relation(a, b)} " \
           f"{_counted(1, *name_b.rsplit(' ', 1))}"


def _shape_summary(objects, background):
    counts = {}
    for obj in objects:
        counts[obj.shape] = counts.get(obj.shape, 0) + 1
    colors = sorted({obj.color for obj in objects}, key=list(COLORS).index)
    return f"{_join([_counted(n, '', s) for s, n in counts.items()])} in " \
           f"{_join(colors)} on a {background} background"


def make_captions(objects, background, rng):
    """1-3 captions: the full listing always, then a relation and a shape summary."""
    extra = [c for c in (_relation_caption(objects, rng), _shape_summary(objects, background))
             if c is not None]
    rng.shuffle(extra)
    return (_listing(objects, background, rng), *extra[: rng.randint(0, 2)])


def make_grounding(objects, background, rng):
    """A listing caption whose phrase spans point at the objects they name."""
    names = list(_groups(objects).items())
    rng.shuffle(names)
    text, phrases = "", []
    for j, (name, ks) in enumerate(names):
        text += "" if j == 0 else " and " if j == len(names) - 1 else ", "
        phrase = _counted(len(ks), *name.rsplit(" ", 1))
        phrases.append(Phrase(len(text), len(text) + len(phrase), tuple(ks)))
        text += phrase
    return GroundingCaption(f"{text} on a {background} background", tuple(phrases))


# ----------------------------------------------------------------------------- questions

def _count(objects, color=None, shape=None):
    return sum((color in (None, o.color)) and (shape in (None, o.shape)) for o in objects)


def make_questions(objects, background, rng):
    """VQA-style questions whose answers (in ANSWERS) need the image."""
    qs = [Question("what color is the background?", background, "background"),
          Question("how many objects are there?", str(len(objects)), "count")]
    for shape in sorted({o.shape for o in objects}, key=SHAPES.index):
        same = [o for o in objects if o.shape == shape]
        qs.append(Question(f"how many {_plural(shape)} are there?", str(len(same)), "count"))
        if len(same) == 1:
            qs.append(Question(f"what color is the {shape}?", same[0].color, "color"))
    for color in sorted({o.color for o in objects}, key=list(COLORS).index):
        same = [o for o in objects if o.color == color]
        if len(same) == 1:
            qs.append(Question(f"what shape is the {color} object?", same[0].shape, "shape"))
    absent = [s for s in SHAPES if _count(objects, shape=s) == 0]
    qs.append(Question(f"how many {_plural(rng.choice(absent))} are there?", "0", "count")
              if absent else Question("how many objects are there?", str(len(objects)), "count"))

    # One "yes" and one "no" existence question keep the yes/no answers balanced.
    present = rng.choice(objects)
    seen = {(o.color, o.shape) for o in objects}
    missing = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in seen]
    color, shape = rng.choice(missing)
    qs.append(Question(f"is there {_counted(1, present.color, present.shape)}?", "yes", "exists"))
    qs.append(Question(f"is there {_counted(1, color, shape)}?", "no", "exists"))
    return tuple(qs)


# ----------------------------------------------------------------------------- expressions

ATTRIBUTE_SETS = (("shape",), ("color", "shape"), ("size", "shape"), ("size", "color", "shape"))


def _unique_words(objects, k):
    """The fewest attribute words that single out object k ("circle", "red circle", ...)."""
    for attrs in ATTRIBUTE_SETS:
        words = [" ".join(getattr(o, a) for a in attrs) for o in objects]
        if words.count(words[k]) == 1:
            return words[k]
    return None


def _extreme(objects, k):
    """'leftmost', 'rightmost', 'topmost' or 'bottommost' if k clearly is that among its twins."""
    twins = [o for j, o in enumerate(objects) if j != k and o.name == objects[k].name]
    obj = objects[k]
    for word, key in (("leftmost", lambda o: o.cx), ("rightmost", lambda o: -o.cx),
                      ("topmost", lambda o: o.cy), ("bottommost", lambda o: -o.cy)):
        if all(key(obj) < key(t) - 0.05 for t in twins):
            return word
    return None


def make_expressions(objects, rng):
    """Per object (when possible), a phrase that picks it out: "the small red circle left of
    the blue square". Identical twins are told apart by "leftmost", "topmost", ..."""
    expressions = []
    for k, obj in enumerate(objects):
        words = _unique_words(objects, k)
        if words is None:
            extreme = _extreme(objects, k)
            if extreme is not None:
                expressions.append(RefExpression(f"the {extreme} {obj.name}", k))
            continue
        text = f"the {words}"
        landmarks = [j for j, o in enumerate(objects)
                     if j != k and _relation(obj, o) and _unique_words(objects, j)]
        if landmarks and rng.random() < 0.5:
            j = rng.choice(landmarks)
            text += f" {_relation(obj, objects[j])} the {_unique_words(objects, j)}"
        expressions.append(RefExpression(text, k))
    return tuple(expressions)


# ----------------------------------------------------------------------------- NLVR2

def _some_attributes(rng, first, second):
    """(color, shape) of an object in either scene half the time, else any combination."""
    if rng.random() < 0.5:
        obj = rng.choice(first.objects + second.objects)
        return obj.color, obj.shape
    return rng.choice(list(COLORS)), rng.choice(SHAPES)


def _says_contains(rng, first, second):
    which, scene = rng.choice([("first", first), ("second", second)])
    color, shape = _some_attributes(rng, first, second)
    return (f"the {which} image contains {_counted(1, color, shape)}",
            _count(scene.objects, color, shape) > 0)


def _says_both(rng, first, second):
    shape = _some_attributes(rng, first, second)[1]
    return (f"both images contain {_counted(1, '', shape)}",
            _count(first.objects, shape=shape) > 0 and _count(second.objects, shape=shape) > 0)


def _says_exactly_one(rng, first, second):
    color, shape = _some_attributes(rng, first, second)
    inside = [_count(s.objects, color, shape) > 0 for s in (first, second)]
    return f"exactly one image contains {_counted(1, color, shape)}", inside[0] != inside[1]


def _says_more(rng, first, second):
    shape = _some_attributes(rng, first, second)[1]
    return (f"the first image has more {_plural(shape)} than the second image",
            _count(first.objects, shape=shape) > _count(second.objects, shape=shape))


def _says_total(rng, first, second):
    color = _some_attributes(rng, first, second)[0]
    n = rng.randint(1, 4)
    total = _count(first.objects, color) + _count(second.objects, color)
    noun = f"{color} object" + ("" if n == 1 else "s")
    verb = "is" if n == 1 else "are"
    return f"there {verb} exactly {NUMBER_WORDS[n]} {noun} in total", total == n


def _says_background(rng, first, second):
    background = rng.choice(list(BACKGROUNDS))
    return (f"both images have a {background} background",
            first.background == background == second.background)


STATEMENTS = (_says_contains, _says_both, _says_exactly_one, _says_more, _says_total,
              _says_background)


# ----------------------------------------------------------------------------- the world

class SyntheticWorld:
    """Scenes, captions, questions, expressions and NLVR2 pairs, all pure functions of
    (seed, index). Splits are index ranges: train, then val, then test (see WorldConfig)."""

    def __init__(self, seed=0, config=None):
        self.seed = seed
        self.config = config if config is not None else WorldConfig()

    def _rng(self, *key):
        # String seeds are hashed with SHA-512 by `random`: the same on every run and machine.
        return random.Random("/".join(str(part) for part in ("fiber-synthetic", self.seed, *key)))

    def split_range(self, split):
        """The scene indices of "train", "val" or "test"."""
        if split not in SPLITS:
            raise ValueError(f"split {split!r}: the synthetic world has {SPLITS}")
        sizes = [self.config.num_train, self.config.num_val, self.config.num_test]
        start = sum(sizes[: SPLITS.index(split)])
        return range(start, start + sizes[SPLITS.index(split)])

    def _layout(self, index):
        rng = self._rng("layout", index)
        count = rng.choices(range(1, len(self.config.count_weights) + 1),
                            weights=self.config.count_weights)[0]
        objects = _layout(rng, count)
        return objects, rng.choice(list(BACKGROUNDS)), rng.choice(TEXTURES)

    def captions(self, index):
        """Scene(index).captions, without deriving the rest (quick, for building datasets)."""
        objects, background, _ = self._layout(index)
        return make_captions(objects, background, self._rng("captions", index))

    def scene(self, index):
        """Scene number `index` (any integer >= 0), with everything derived from it."""
        objects, background, texture = self._layout(index)
        # Each text facet has its own random stream: changing one leaves the others unchanged.
        return Scene(
            index, background, texture, objects,
            captions=make_captions(objects, background, self._rng("captions", index)),
            questions=make_questions(objects, background, self._rng("questions", index)),
            expressions=make_expressions(objects, self._rng("expressions", index)),
            grounding=make_grounding(objects, background, self._rng("grounding", index)))

    def nlvr2(self, k, split="train"):
        """NLVR2-style example k: two scenes of `split` and a statement about them. Labels
        alternate (even k: true), so any run of examples is balanced. The statement says
        "first"/"second image" rather than left/right, so that mirroring an image (which swaps
        left/right words in captions) never changes its meaning."""
        rng = self._rng("nlvr2", split, k)
        first, second = rng.sample(self.split_range(split), 2)
        a, b, label = self.scene(first), self.scene(second), k % 2 == 0
        for _ in range(200):
            statement, truth = rng.choice(STATEMENTS)(rng, a, b)
            if truth == label:
                return Nlvr2Example(first, second, statement, label)
        n = len(a.objects) if label else len(a.objects) % 4 + 1  # always constructible
        noun = "object" if n == 1 else "objects"
        return Nlvr2Example(first, second, f"the first image has exactly {NUMBER_WORDS[n]} "
                            f"{noun}", label)
