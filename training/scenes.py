"""Synthetic shape scenes (seeded, drawn with Pillow) for VQA, entailment, NLVR2-style reasoning and
image-text matching."""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import random
import shutil
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm import tqdm

from training.examples import (
    ENTAILMENT_LABELS,
    ITM_LABELS,
    REASONING_LABELS,
    EntailmentExample,
    GridLabels,
    PairExample,
    ReasoningExample,
    TaskData,
    VQAExample,
)

logger = logging.getLogger(__name__)

# Bump when the generator changes what it draws or asks, so old caches are not reused.
VERSION = 3

IMAGE_SIZE = 64
# Shapes sit in the cells of a 4x4 grid, at most one per cell. A cell is exactly one 16x16 patch of the
# `mini` teacher (2x2 patches of `small`): a patch then holds one whole shape or nothing, so the patch
# projection can name what a cell holds and attention only has to relate cells.
GRID = 4
CELL = 16  # px; cell (row, col) spans [16*col, 16*col + 15] x [16*row, 16*row + 15]
SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (230, 190, 30)}
BACKGROUND = (255, 255, 255)
OCCLUDER = (128, 128, 128)
RELATIONS = ("left of", "right of", "above", "below")
COUNTS = ("0", "1", "2", "3")
NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}
VQA_LABELS = [*COLORS, *SHAPES, "yes", "no", *COUNTS]

# Images rendered per split: (train, test). Each VQA image gets up to 6 questions (~3.6 on average:
# ~72,000 / ~3,600), each entailment image 2 hypotheses per label (72,000 / 6,000), and each
# reasoning image is the left image of one pair and the right image of another, with 2 true and 2
# false statements per pair (64,000 / 4,000, each with two images); each image-text matching image
# one caption with its hard negatives (6,000 / 1,000). A from-scratch teacher needs this many scenes
# to learn relations rather than memorise a few thousand.
DEFAULT_SIZES = {"vqa": (20000, 1000), "entailment": (12000, 1000), "reasoning": (16000, 1000), "itm": (6000, 1000)}
MAX_QUESTIONS_PER_IMAGE = 6
STATEMENTS_PER_LABEL = 2


@dataclass(frozen=True)
class Shape:
    """One shape in a grid cell; the jitter and size only affect drawing, not identity."""

    shape: str
    color: str
    row: int
    col: int
    dx: int = field(default=0, compare=False)
    dy: int = field(default=0, compare=False)
    half: int = field(default=6, compare=False)


@dataclass(frozen=True)
class Scene:
    """The shapes of one image and the grid cells hidden under a gray occluder (entailment only)."""

    shapes: tuple[Shape, ...]
    hidden: tuple[tuple[int, int], ...] = ()

    @property
    def visible(self) -> tuple[Shape, ...]:
        return tuple(s for s in self.shapes if (s.row, s.col) not in self.hidden)


# ---------------------------------------------------------------------------------------------------
# Scenes and drawing


def random_scene(rng: random.Random, *, occluded: bool = False) -> Scene:
    """2-5 shapes in distinct cells, colours drawn from a small per-scene palette so counts vary."""
    n = rng.randint(2, 5)
    palette = rng.sample(list(COLORS), rng.randint(1, min(n, len(COLORS))))
    shapes = tuple(
        Shape(
            shape=rng.choice(SHAPES),
            color=rng.choice(palette),
            row=cell // GRID,
            col=cell % GRID,
            dx=rng.randint(-1, 1),
            dy=rng.randint(-1, 1),
            half=rng.choice((5, 6)),
        )
        for cell in sorted(rng.sample(range(GRID * GRID), n))
    )
    if not occluded:
        return Scene(shapes)
    # The occluder covers one cell (or, 30% of the time, two adjacent ones); half the time it starts
    # on a shape.
    start = rng.choice(shapes) if rng.random() < 0.5 else None
    row, col = (start.row, start.col) if start else (rng.randrange(GRID), rng.randrange(GRID))
    hidden = [(row, col)]
    if rng.random() < 0.3:
        neighbours = [
            (r, c)
            for r, c in ((row, col - 1), (row, col + 1), (row - 1, col), (row + 1, col))
            if 0 <= r < GRID and 0 <= c < GRID
        ]
        hidden.append(rng.choice(neighbours))
    return Scene(shapes, tuple(sorted(hidden)))


def render_scene(scene: Scene) -> Image.Image:
    """The scene as a 64x64 RGB image; hidden cells are painted over with the gray occluder."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        # Centre of the cell plus jitter; |jitter| + half <= 7 keeps each shape inside its cell.
        cx, cy, h = CELL // 2 + CELL * s.col + s.dx, CELL // 2 + CELL * s.row + s.dy, s.half
        fill = COLORS[s.color]
        if s.shape == "circle":
            draw.ellipse((cx - h, cy - h, cx + h, cy + h), fill=fill)
        elif s.shape == "square":
            draw.rectangle((cx - h + 1, cy - h + 1, cx + h - 1, cy + h - 1), fill=fill)
        else:
            draw.polygon([(cx, cy - h), (cx - h, cy + h), (cx + h, cy + h)], fill=fill)
    for row, col in scene.hidden:
        draw.rectangle((CELL * col, CELL * row, CELL * (col + 1) - 1, CELL * (row + 1) - 1), fill=OCCLUDER)
    return img


# What a cell holds, as a class: 0 empty, 1 + i for the i-th of COLORED_SHAPES, then the occluder.
OCCLUDED_CELL = 1 + len(SHAPES) * len(COLORS)
CELL_CLASSES = OCCLUDED_CELL + 1


def cell_classes(scene: Scene) -> list[int]:
    """What each grid cell shows, in raster order: labels the generator knows for free, for the
    teacher's auxiliary grid loss (a small version of the image-side pre-training ViLT starts from)."""
    classes = [0] * (GRID * GRID)
    for s in scene.shapes:
        classes[s.row * GRID + s.col] = 1 + COLORED_SHAPES.index((s.color, s.shape))
    for row, col in scene.hidden:
        classes[row * GRID + col] = OCCLUDED_CELL
    return classes


# A text names at most two descriptions ("the red circle", "the blue square"): a cell is 0 when its
# shape is not named, else 1 + the index of the first description that names it.
NAMED_CLASSES = 3


def named_cells(scene: Scene, mentions: Sequence[Description]) -> list[int]:
    """Which visible cells hold a shape that a text names, and by which of its descriptions, in raster
    order: the teacher's auxiliary grounding target (which image tokens the words are about, and in
    which role, e.g. the subject or the object of a relation)."""
    named = [0] * (GRID * GRID)
    for s in scene.visible:
        roles = [i for i, (c, k) in enumerate(mentions) if c in (None, s.color) and k in (None, s.shape)]
        if roles:
            named[s.row * GRID + s.col] = 1 + roles[0]
    return named


# ---------------------------------------------------------------------------------------------------
# The language: groups of shapes, relations and the three catalogues of texts


def relation_holds(a: Shape, relation: str, b: Shape) -> bool:
    """Grid relations: `a` is left of `b` when its column is smaller, whatever the rows."""
    if relation == "left of":
        return a.col < b.col
    if relation == "right of":
        return a.col > b.col
    if relation == "above":
        return a.row < b.row
    return a.row > b.row


# A description picks shapes by colour, kind or both: ("red", None) is every red shape, (None,
# "circle") every circle, ("red", "circle") every red circle.
Description = tuple["str | None", "str | None"]

# What counting statements count: all shapes of one colour, or all shapes of one kind.
GROUPS: list[Description] = [(c, None) for c in COLORS] + [(None, s) for s in SHAPES]


def _matching(shapes: Sequence[Shape], color: str | None = None, shape: str | None = None) -> list[Shape]:
    return [s for s in shapes if color in (None, s.color) and shape in (None, s.shape)]


def _count(shapes: Sequence[Shape], group: Description) -> int:
    return len(_matching(shapes, *group))


def _plural(group: Description) -> str:
    color, shape = group
    return f"{color} shapes" if shape is None else f"{shape}s"


def _singular(group: Description) -> str:
    color, shape = group
    return f"{color} shape" if shape is None else shape


def _has_related_pair(shapes: Sequence[Shape], a: Description, relation: str, b: Description) -> bool:
    """Whether some shape matching `a` is in `relation` to some (other) shape matching `b`."""
    return any(x != y and relation_holds(x, relation, y) for x in _matching(shapes, *a) for y in _matching(shapes, *b))


# VQA questions: text -> (template, function from the shapes to the answer, or None when the
# question is not well defined for that scene, e.g. "the triangle" when there are two triangles,
# and the descriptions the text names).
Question = tuple[str, Callable[[Sequence[Shape]], "str | None"], tuple[Description, ...]]


def _color_of_shape(shape: str, shapes: Sequence[Shape]) -> str | None:
    found = _matching(shapes, shape=shape)
    # Binding: only asked when some other shape has another colour.
    if len(found) != 1 or all(s.color == found[0].color for s in shapes):
        return None
    return found[0].color


def _shape_of_color(color: str, shapes: Sequence[Shape]) -> str | None:
    found = _matching(shapes, color=color)
    if len(found) != 1 or all(s.shape == found[0].shape for s in shapes):
        return None
    return found[0].shape


def _related_to(relation: str, ref: Description, shapes: Sequence[Shape]) -> Shape | None:
    """The one shape in `relation` to the one shape matching `ref`, if both are unique."""
    refs = _matching(shapes, *ref)
    if len(refs) != 1:
        return None
    others = [s for s in shapes if s != refs[0] and relation_holds(s, relation, refs[0])]
    return others[0] if len(others) == 1 else None


def _shape_related_to(relation: str, color: str, shapes: Sequence[Shape]) -> str | None:
    found = _related_to(relation, (color, None), shapes)
    return found.shape if found else None


def _color_related_to(relation: str, shape: str, shapes: Sequence[Shape]) -> str | None:
    found = _related_to(relation, (None, shape), shapes)
    return found.color if found else None


def _is_related(a: Description, relation: str, b: Description, shapes: Sequence[Shape]) -> str | None:
    xs, ys = _matching(shapes, *a), _matching(shapes, *b)
    if len(xs) != 1 or len(ys) != 1:
        return None
    return "yes" if relation_holds(xs[0], relation, ys[0]) else "no"


def _how_many(group: Description, shapes: Sequence[Shape]) -> str | None:
    n = _count(shapes, group)
    return str(n) if n <= 3 else None


# Every (colour, shape) pair, e.g. ("red", "circle").
COLORED_SHAPES: list[Description] = list(itertools.product(COLORS, SHAPES))


def _vqa_questions() -> dict[str, Question]:
    q: dict[str, Question] = {}
    for shape in SHAPES:
        q[f"what color is the {shape}?"] = (
            "color-of-shape",
            functools.partial(_color_of_shape, shape),
            ((None, shape),),
        )
    for color in COLORS:
        q[f"which shape is {color}?"] = ("shape-of-color", functools.partial(_shape_of_color, color), ((color, None),))
    # The reference is named by colour when the answer is a shape and by kind when it is a colour:
    # naming the attribute asked about ("what shape is left of the red circle?") would make some
    # answers rarer for that text (the other shape is seldom another red circle).
    for rel in RELATIONS:
        for color in COLORS:
            q[f"what shape is {rel} the {color} shape?"] = (
                "shape-related",
                functools.partial(_shape_related_to, rel, color),
                ((color, None),),
            )
        for shape in SHAPES:
            q[f"what color is the shape {rel} the {shape}?"] = (
                "color-related",
                functools.partial(_color_related_to, rel, shape),
                ((None, shape),),
            )
    for a, rel, b in itertools.product(COLORED_SHAPES, RELATIONS, COLORED_SHAPES):
        if a != b:
            q[f"is the {' '.join(a)} {rel} the {' '.join(b)}?"] = (
                "is-related",
                functools.partial(_is_related, a, rel, b),
                (a, b),
            )
    for group in GROUPS:
        template = "count-color" if group[1] is None else "count-shape"
        q[f"how many {_plural(group)} are there?"] = (template, functools.partial(_how_many, group), (group,))
    return q


VQA_QUESTIONS = _vqa_questions()
VQA_ANSWER_SPACES = {
    "color-of-shape": tuple(COLORS),
    "shape-of-color": SHAPES,
    "shape-related": SHAPES,
    "color-related": tuple(COLORS),
    "is-related": ("yes", "no"),
    "count-color": COUNTS,
    "count-shape": COUNTS,
}


# Entailment hypotheses: text -> (template, predicate over a full scene's shapes, the descriptions
# it mentions). The label comes from every way the hidden cells could be filled (entailment_label).
Statement = tuple[str, Callable[[Sequence[Shape]], bool], tuple[Description, ...]]


def _at_least_two(group: Description, shapes: Sequence[Shape]) -> bool:
    return _count(shapes, group) >= 2


def _at_most_one(group: Description, shapes: Sequence[Shape]) -> bool:
    return _count(shapes, group) <= 1


def _more(a: Description, b: Description, shapes: Sequence[Shape]) -> bool:
    return _count(shapes, a) > _count(shapes, b)


def _entailment_statements() -> dict[str, Statement]:
    st: dict[str, Statement] = {}
    for g in GROUPS:
        st[f"there are at least two {_plural(g)}."] = ("at-least-two", functools.partial(_at_least_two, g), (g,))
        st[f"there is at most one {_singular(g)}."] = ("at-most-one", functools.partial(_at_most_one, g), (g,))
    for a, b in itertools.permutations(GROUPS, 2):
        if (a[1] is None) == (b[1] is None):  # colours with colours, kinds with kinds
            st[f"there are more {_plural(a)} than {_plural(b)}."] = ("more", functools.partial(_more, a, b), (a, b))
    for a, rel, b in itertools.product(COLORED_SHAPES, RELATIONS, COLORED_SHAPES):
        if a != b:
            text = f"a {' '.join(a)} is {rel} a {' '.join(b)}."
            st[text] = ("related", functools.partial(_has_related_pair, a=a, relation=rel, b=b), (a, b))
    return st


ENTAILMENT_STATEMENTS = _entailment_statements()
ENTAILMENT_SPATIAL = [t for t, st in ENTAILMENT_STATEMENTS.items() if st[0] == "related"]
ENTAILMENT_COUNTING = [t for t, st in ENTAILMENT_STATEMENTS.items() if st[0] != "related"]


@functools.cache
def _colored_shapes_matching(mentions: tuple[Description, ...]) -> list[Description]:
    return [
        (color, shape)
        for color, shape in COLORED_SHAPES
        if any(c in (None, color) and s in (None, shape) for c, s in mentions)
    ]


def completions(scene: Scene, mentions: tuple[Description, ...] | None = None) -> Iterator[tuple[Shape, ...]]:
    """Every full scene consistent with what is visible: each hidden cell empty or holding any shape.

    With `mentions`, only shapes matching one of them are tried: for a statement that only counts or
    relates shapes matching its descriptions, any other shape in a hidden cell is as good as none."""
    candidates = COLORED_SHAPES if mentions is None else _colored_shapes_matching(mentions)
    options = [[None, *(Shape(shape, color, row, col) for color, shape in candidates)] for row, col in scene.hidden]
    visible = scene.visible
    for filling in itertools.product(*options):
        yield visible + tuple(s for s in filling if s is not None)


def entailment_label(text: str, scene: Scene) -> str:
    """Entailment if the statement holds however the hidden cells are filled, contradiction if it
    holds for none of the fillings, neutral otherwise."""
    _, holds, mentions = ENTAILMENT_STATEMENTS[text]
    seen = set()
    for shapes in completions(scene, mentions):
        seen.add(holds(shapes))
        if len(seen) == 2:
            return "neutral"
    return "entailment" if True in seen else "contradiction"


# Reasoning statements: text -> (template, predicate over the left and right images' shapes, the
# descriptions the text names).
PairStatement = tuple[str, Callable[[Sequence[Shape], Sequence[Shape]], bool], tuple[Description, ...]]


def _left_more(group: Description, left: Sequence[Shape], right: Sequence[Shape]) -> bool:
    return _count(left, group) > _count(right, group)


def _left_fewer(group: Description, left: Sequence[Shape], right: Sequence[Shape]) -> bool:
    return _count(left, group) < _count(right, group)


def _same_number(group: Description, left: Sequence[Shape], right: Sequence[Shape]) -> bool:
    return _count(left, group) == _count(right, group)


def _total(group: Description, n: int, left: Sequence[Shape], right: Sequence[Shape]) -> bool:
    return _count(left, group) + _count(right, group) == n


def _images_with(color: str, shape: str, images: Sequence[Sequence[Shape]]) -> int:
    return sum(bool(_matching(shapes, color, shape)) for shapes in images)


def _both_contain(color: str, shape: str, left: Sequence[Shape], right: Sequence[Shape]) -> bool:
    return _images_with(color, shape, (left, right)) == 2


def _one_contains(color: str, shape: str, left: Sequence[Shape], right: Sequence[Shape]) -> bool:
    return _images_with(color, shape, (left, right)) == 1


def _images_with_relation(a: str, relation: str, b: str, images: Sequence[Sequence[Shape]]) -> int:
    return sum(_has_related_pair(shapes, (None, a), relation, (None, b)) for shapes in images)


def _both_related(a: str, relation: str, b: str, left: Sequence[Shape], right: Sequence[Shape]) -> bool:
    return _images_with_relation(a, relation, b, (left, right)) == 2


def _one_related(a: str, relation: str, b: str, left: Sequence[Shape], right: Sequence[Shape]) -> bool:
    return _images_with_relation(a, relation, b, (left, right)) == 1


def _reasoning_statements() -> dict[str, PairStatement]:
    st: dict[str, PairStatement] = {}
    for group in GROUPS:
        p, g = _plural(group), (group,)
        st[f"the left image has more {p} than the right image."] = ("more", functools.partial(_left_more, group), g)
        st[f"the left image has fewer {p} than the right image."] = ("fewer", functools.partial(_left_fewer, group), g)
        st[f"the two images have the same number of {p}."] = (
            "same-number",
            functools.partial(_same_number, group),
            g,
        )
        for n, word in NUMBER_WORDS.items():
            st[f"there are exactly {word} {p} in total."] = ("total", functools.partial(_total, group, n), g)
    for color, shape in itertools.product(COLORS, SHAPES):
        g = ((color, shape),)
        st[f"both images contain a {color} {shape}."] = (
            "both-contain",
            functools.partial(_both_contain, color, shape),
            g,
        )
        st[f"exactly one image contains a {color} {shape}."] = (
            "one-contains",
            functools.partial(_one_contains, color, shape),
            g,
        )
    for a, rel, b in itertools.product(SHAPES, RELATIONS, SHAPES):
        g = ((None, a), (None, b))
        st[f"both images have a {a} {rel} a {b}."] = ("both-related", functools.partial(_both_related, a, rel, b), g)
        st[f"exactly one image has a {a} {rel} a {b}."] = (
            "one-related",
            functools.partial(_one_related, a, rel, b),
            g,
        )
    return st


REASONING_STATEMENTS = _reasoning_statements()


# Image-text matching captions: one relation between two shapes, then every other shape, e.g. "a red
# circle is left of a blue square. there are also two green triangles." A caption says that its shapes
# are there (as many of each colour and kind as it names) and that its relation holds between two
# of them; it describes every shape of its scene, so it is true. A hard negative changes one colour,
# kind or the relation, and is kept only if that makes it false for the scene.


@dataclass(frozen=True)
class Caption:
    """Two shapes in a relation, and the other shapes of the scene."""

    a: Description  # (colour, kind)
    relation: str
    b: Description
    others: tuple[Description, ...]

    @property
    def text(self) -> str:
        text = f"a {' '.join(self.a)} is {self.relation} a {' '.join(self.b)}."
        if self.others:
            counts = Counter(self.others)  # in the order first named
            parts = [f"a {' '.join(d)}" if n == 1 else f"{NUMBER_WORDS[n]} {' '.join(d)}s" for d, n in counts.items()]
            verb = "is" if len(self.others) == 1 else "are"
            text += f" there {verb} also {' and '.join(parts)}."
        return text

    def holds(self, shapes: Sequence[Shape]) -> bool:
        have = Counter((s.color, s.shape) for s in shapes)
        named = Counter([self.a, self.b, *self.others])
        return all(have[d] >= n for d, n in named.items()) and _has_related_pair(shapes, self.a, self.relation, self.b)

    def with_slot(self, i: int, description: Description) -> Caption:
        """The caption with its i-th shape (a, b, then the others) described otherwise."""
        slots = [self.a, self.b, *self.others]
        slots[i] = description
        return Caption(slots[0], self.relation, slots[1], tuple(slots[2:]))


def _hard_negatives(caption: Caption, shapes: Sequence[Shape], rng: random.Random) -> list[str]:
    """Up to one false caption per kind of change: a colour, a kind of shape, the relation."""
    slots = [caption.a, caption.b, *caption.others]
    by_kind = {
        "color": [
            caption.with_slot(i, (c, kind)) for i, (color, kind) in enumerate(slots) for c in COLORS if c != color
        ],
        "shape": [
            caption.with_slot(i, (color, k)) for i, (color, kind) in enumerate(slots) for k in SHAPES if k != kind
        ],
        "relation": [Caption(caption.a, r, caption.b, caption.others) for r in RELATIONS if r != caption.relation],
    }
    negatives = []
    for changed in by_kind.values():
        false = [c for c in changed if not c.holds(shapes)]
        if false:
            negatives.append(rng.choice(false).text)
    return negatives


def scene_caption(scene: Scene, rng: random.Random) -> Caption:
    """A true caption: a random relation between two random shapes, then the others in grid order."""
    x, y = rng.sample(scene.shapes, 2)
    relation = rng.choice([r for r in RELATIONS if relation_holds(x, r, y)])  # distinct cells: one holds
    others = tuple((s.color, s.shape) for s in scene.shapes if s not in (x, y))
    return Caption((x.color, x.shape), relation, (y.color, y.shape), others)


# ---------------------------------------------------------------------------------------------------
# Balanced sampling


class Balancer:
    """Keeps every answer about equally frequent per exact text and per template, so that the text
    reveals nothing beyond the question type: an answer may be added only while it is at most one
    ahead of the rarest answer of that text, and of that template."""

    def __init__(self, spaces: dict[str, Sequence[str]]) -> None:
        self.spaces = spaces
        self.counts: dict[str, Counter] = defaultdict(Counter)

    def excess(self, key: str, template: str, answer: str) -> int:
        counts = self.counts[key]
        return counts[answer] - min(counts[a] for a in self.spaces[template])

    def allows(self, template: str, text: str, answer: str) -> bool:
        return self.excess(text, template, answer) <= 1 and self.excess(template, template, answer) <= 1

    def add(self, template: str, text: str, answer: str) -> None:
        self.counts[text][answer] += 1
        self.counts[template][answer] += 1


def _pick(
    candidates: list[tuple[str, str, str]], balancer: Balancer, rng: random.Random, exclude: set[str]
) -> tuple[str, str, str] | None:
    """A (template, text, answer) the balancer allows: from the template used least so far (so the
    mix of templates does not follow how many texts each has), its least represented answer."""
    by_template: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
    for c in candidates:
        if c[1] not in exclude and balancer.allows(*c):
            by_template[c[0]].append(c)
    if not by_template:
        return None
    templates = sorted(by_template)
    rng.shuffle(templates)  # random among equally used templates
    template = min(templates, key=lambda t: sum(balancer.counts[t].values()))
    return min(by_template[template], key=lambda c: balancer.excess(c[1], c[0], c[2]))


def _sample_texts(by_template: dict[str, list[str]], k: int, rng: random.Random) -> list[str]:
    """Up to k texts of every template, so that each scene costs a few dozen label computations
    (not one per text in the catalogue) and templates with many texts do not crowd out the rest."""
    return [t for texts in by_template.values() for t in (texts if len(texts) <= k else rng.sample(texts, k))]


def _by_template(catalogue: dict[str, tuple]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = defaultdict(list)
    for text, entry in catalogue.items():
        groups[entry[0]].append(text)
    return dict(groups)


TEXTS_PER_TEMPLATE = 12


def _vqa_split(n_images: int, rng: random.Random) -> tuple[list[Scene], list[dict]]:
    """Scenes and their questions (up to MAX_QUESTIONS_PER_IMAGE each, ~5 on average)."""
    balancer = Balancer(VQA_ANSWER_SPACES)
    by_template = _by_template(VQA_QUESTIONS)
    scenes: list[Scene] = []
    records: list[dict] = []
    while len(scenes) < n_images:
        scene = random_scene(rng)
        candidates = [
            (VQA_QUESTIONS[text][0], text, answer)
            for text in _sample_texts(by_template, TEXTS_PER_TEMPLATE, rng)
            if (answer := VQA_QUESTIONS[text][1](scene.shapes)) is not None
        ]
        rng.shuffle(candidates)
        chosen: list[dict] = []
        for _ in range(MAX_QUESTIONS_PER_IMAGE):
            pick = _pick(candidates, balancer, rng, {r["question"] for r in chosen})
            if pick is None:
                break
            balancer.add(*pick)
            chosen.append({"image": len(scenes), "question": pick[1], "answer": pick[2]})
        if chosen:
            scenes.append(scene)
            records += chosen
    return scenes, records


def _fill(
    candidates: list[tuple[str, str, str]], balancer: Balancer, labels: Sequence[str], rng: random.Random
) -> list[tuple[str, str, str]] | None:
    """STATEMENTS_PER_LABEL statements per label, or None when this scene (or pair) cannot give them."""
    slots = [label for label in labels for _ in range(STATEMENTS_PER_LABEL)]
    rng.shuffle(slots)
    chosen: list[tuple[str, str, str]] = []
    for label in slots:
        pick = _pick([c for c in candidates if c[2] == label], balancer, rng, {c[1] for c in chosen})
        if pick is None:
            return None
        chosen.append(pick)
    for pick in chosen:
        balancer.add(*pick)
    return chosen


def _entailment_split(n_images: int, rng: random.Random) -> tuple[list[Scene], list[dict]]:
    """Occluded scenes, each with STATEMENTS_PER_LABEL hypotheses per label."""
    by_template = _by_template(ENTAILMENT_STATEMENTS)
    balancer = Balancer(dict.fromkeys(by_template, ENTAILMENT_LABELS))
    scenes: list[Scene] = []
    records: list[dict] = []
    while len(scenes) < n_images:
        scene = random_scene(rng, occluded=True)
        if not scene.visible:
            continue
        texts = _sample_texts(by_template, TEXTS_PER_TEMPLATE, rng)
        candidates = [(ENTAILMENT_STATEMENTS[t][0], t, entailment_label(t, scene)) for t in texts]
        rng.shuffle(candidates)
        chosen = _fill(candidates, balancer, ENTAILMENT_LABELS, rng)
        if chosen is not None:
            records += [{"image": len(scenes), "hypothesis": t, "label": label} for _, t, label in chosen]
            scenes.append(scene)
    return scenes, records


def _reasoning_split(n_images: int, rng: random.Random) -> tuple[list[Scene], list[dict]]:
    """Scenes, and STATEMENTS_PER_LABEL true and false statements per pair of them: in a shuffled
    order, each scene is the left image of one pair and the right image of the next."""
    scenes = [random_scene(rng) for _ in range(n_images)]
    order = list(range(n_images))
    rng.shuffle(order)
    by_template = _by_template(REASONING_STATEMENTS)
    balancer = Balancer(dict.fromkeys(by_template, REASONING_LABELS))
    records: list[dict] = []
    for k in range(n_images):
        left, right = order[k], order[(k + 1) % n_images]
        candidates = [
            (REASONING_STATEMENTS[t][0], t, str(REASONING_STATEMENTS[t][1](scenes[left].shapes, scenes[right].shapes)))
            for t in _sample_texts(by_template, TEXTS_PER_TEMPLATE, rng)
        ]
        rng.shuffle(candidates)
        chosen = _fill(candidates, balancer, REASONING_LABELS, rng)
        if chosen is not None:
            records += [{"images": [left, right], "statement": t, "label": label} for _, t, label in chosen]
    return scenes, records


def _itm_split(n_images: int, rng: random.Random) -> tuple[list[Scene], list[dict]]:
    """Scenes, each with one true caption and its hard negatives."""
    scenes = [random_scene(rng) for _ in range(n_images)]
    records = []
    for i, scene in enumerate(scenes):
        caption = scene_caption(scene, rng)
        records.append({"image": i, "caption": caption.text, "negatives": _hard_negatives(caption, scene.shapes, rng)})
    return scenes, records


# ---------------------------------------------------------------------------------------------------
# Building the cache and loading it


def data_dir() -> Path:
    """Where generated data is cached: $DIDE_DATA_DIR, default ~/.cache/dide."""
    return Path(os.environ.get("DIDE_DATA_DIR") or Path.home() / ".cache" / "dide")


def _mentions(task: str, text: str) -> tuple[Description, ...]:
    catalogue = {"vqa": VQA_QUESTIONS, "entailment": ENTAILMENT_STATEMENTS, "reasoning": REASONING_STATEMENTS}
    return catalogue[task][text][2]


def _write_split(task: str, n_images: int, rng: random.Random, out: Path, split: str) -> None:
    """Render one split's images to out/split/NNNNN.png and its examples to out/split.jsonl."""
    splits = {"vqa": _vqa_split, "entailment": _entailment_split, "reasoning": _reasoning_split, "itm": _itm_split}
    scenes, records = splits[task](n_images, rng)
    (out / split).mkdir()
    for i, scene in enumerate(tqdm(scenes, desc=f"rendering {split}", unit="img", disable=None)):
        render_scene(scene).save(out / split / f"{i:05d}.png")
    with open(out / f"{split}.jsonl", "w") as f:
        for r in records:
            if task != "itm":
                indices = r.get("images", [r.get("image")])
                mentions = _mentions(task, r.get("question") or r.get("hypothesis") or r["statement"])
                r["cells"] = [cell_classes(scenes[i]) for i in indices]
                r["named"] = [named_cells(scenes[i], mentions) for i in indices]
            if "images" in r:
                r["images"] = [f"{split}/{i:05d}.png" for i in r["images"]]
            else:
                r["image"] = f"{split}/{r['image']:05d}.png"
            f.write(json.dumps(r) + "\n")


def build_scenes(task: str, train: int, test: int, seed: int, root: Path) -> Path:
    """Render the dataset into `root` unless it is there already; returns its directory.

    Built in a temporary sibling directory and renamed into place, so an interrupted build never
    leaves a directory that looks complete."""
    final = root / f"{task}-train{train}-test{test}-seed{seed}-v{VERSION}"
    if final.is_dir():
        if not (final / "meta.json").is_file():
            raise ValueError(f"{final} is not a complete scenes directory (no meta.json): delete it and rerun")
        return final
    root.mkdir(parents=True, exist_ok=True)
    logger.info("generating %s scenes (%d train / %d test images) into %s", task, train, test, final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        for split, n in (("train", train), ("test", test)):
            # String seeds are hashed deterministically (not with PYTHONHASHSEED).
            _write_split(task, n, random.Random(f"scenes/{task}/{seed}/{split}"), tmp, split)
        meta = {"task": task, "train": train, "test": test, "seed": seed, "version": VERSION}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; the finished set is readable by all, like a plain mkdir
        try:
            tmp.rename(final)
        except OSError:
            if not (final / "meta.json").is_file():
                raise
            logger.info("%s was built concurrently; using that copy", final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return final


def _read_split(directory: Path, task: str, split: str) -> list:
    examples = []
    with open(directory / f"{split}.jsonl") as f:
        for line in f:
            r = json.loads(line)
            grid = GridLabels.of(r["cells"], r["named"]) if "cells" in r else None
            if task == "vqa":
                examples.append(VQAExample(directory / r["image"], r["question"], {r["answer"]: 1.0}, grid))
            elif task == "entailment":
                examples.append(EntailmentExample(directory / r["image"], r["hypothesis"], r["label"], grid))
            elif task == "itm":
                examples.append(PairExample(directory / r["image"], r["caption"], tuple(r["negatives"])))
            else:
                left, right = (directory / p for p in r["images"])
                examples.append(ReasoningExample((left, right), r["statement"], r["label"] == "True", grid))
    return examples


def load_scenes(task: str, *, train: int | None = None, test: int | None = None, seed: int = 0) -> TaskData:
    """The synthetic scenes for `task` ("vqa", "entailment", "reasoning" or "itm"), generated on first use
    and cached under data_dir()/scenes; `train` / `test` count rendered images (DEFAULT_SIZES)."""
    if task not in DEFAULT_SIZES:
        raise ValueError(f"unknown task {task!r} for scenes: choose one of {', '.join(DEFAULT_SIZES)}")
    train = DEFAULT_SIZES[task][0] if train is None else train
    test = DEFAULT_SIZES[task][1] if test is None else test
    least = 2 if task == "reasoning" else 1  # a reasoning pair needs two different images
    if train < least or test < least:
        raise ValueError(f"scenes for {task} need train and test >= {least} images, got train={train}, test={test}")
    directory = build_scenes(task, train, test, seed, data_dir() / "scenes")
    labels = {
        "vqa": list(VQA_LABELS),
        "entailment": list(ENTAILMENT_LABELS),
        "reasoning": list(REASONING_LABELS),
        "itm": list(ITM_LABELS),
    }
    return TaskData(
        task=task,
        labels=labels[task],
        train=_read_split(directory, task, "train"),
        test=_read_split(directory, task, "test"),
        name="scenes",
        meta={"train_images": train, "test_images": test, "seed": seed, "directory": str(directory)},
    )
