"""The scenes' language: descriptions of shapes, and the catalogues of VQA questions, entailment
hypotheses (labelled over every way the hidden cells could be filled) and reasoning statements about two
images, each text with its template, its label function and the descriptions it names."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterator, Sequence

from training.scene_world import (
    COLORED_SHAPES,
    COLORS,
    RELATIONS,
    SHAPES,
    Description,
    Scene,
    Shape,
    relation_holds,
)

COUNTS = ("0", "1", "2", "3")
NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}
VQA_LABELS = [*COLORS, *SHAPES, "yes", "no", *COUNTS]

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


def has_related_pair(shapes: Sequence[Shape], a: Description, relation: str, b: Description) -> bool:
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
            st[text] = ("related", functools.partial(has_related_pair, a=a, relation=rel, b=b), (a, b))
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
# descriptions the text names, and the statement's per-image fact). Every statement is a comparison of one
# fact per image, a number the generator knows for free (how many shapes of a group, or whether a relation
# holds in it), so the predicate is `combine(fact(left), fact(right))`: the teacher's auxiliary loss asks
# each image's pooled output for its fact (training/grid.py).
PairStatement = tuple[
    str, Callable[[Sequence[Shape], Sequence[Shape]], bool], tuple[Description, ...], Callable[[Sequence[Shape]], int]
]
# Facts as classes for that loss: 0, 1, 2, 3, and 4 or more (a scene has at most 5 shapes).
FACT_CLASSES = 5

_COMBINE: dict[str, Callable[[int, int], bool]] = {
    "more": lambda a, b: a > b,
    "fewer": lambda a, b: a < b,
    "same-number": lambda a, b: a == b,
    "both-contain": lambda a, b: a > 0 and b > 0,
    "one-contains": lambda a, b: (a > 0) != (b > 0),
    "both-related": lambda a, b: a > 0 and b > 0,
    "one-related": lambda a, b: (a > 0) != (b > 0),
}


def _pair(template: str, fact: Callable[[Sequence[Shape]], int], mentions, combine=None) -> PairStatement:
    combine = combine or _COMBINE[template]

    def predicate(left: Sequence[Shape], right: Sequence[Shape]) -> bool:
        return combine(fact(left), fact(right))

    return template, predicate, mentions, fact


def _related_count(a: str, relation: str, b: str, shapes: Sequence[Shape]) -> int:
    return int(has_related_pair(shapes, (None, a), relation, (None, b)))


def _reasoning_statements() -> dict[str, PairStatement]:
    st: dict[str, PairStatement] = {}
    for group in GROUPS:
        p, g, count = _plural(group), (group,), functools.partial(_count, group=group)
        st[f"the left image has more {p} than the right image."] = _pair("more", count, g)
        st[f"the left image has fewer {p} than the right image."] = _pair("fewer", count, g)
        st[f"the two images have the same number of {p}."] = _pair("same-number", count, g)
        for n, word in NUMBER_WORDS.items():
            total = functools.partial(lambda n, a, b: a + b == n, n)
            st[f"there are exactly {word} {p} in total."] = _pair("total", count, g, total)
    for color, shape in itertools.product(COLORS, SHAPES):
        g = ((color, shape),)
        count = functools.partial(_count, group=(color, shape))
        st[f"both images contain a {color} {shape}."] = _pair("both-contain", count, g)
        st[f"exactly one image contains a {color} {shape}."] = _pair("one-contains", count, g)
    for a, rel, b in itertools.product(SHAPES, RELATIONS, SHAPES):
        g = ((None, a), (None, b))
        related = functools.partial(_related_count, a, rel, b)
        st[f"both images have a {a} {rel} a {b}."] = _pair("both-related", related, g)
        st[f"exactly one image has a {a} {rel} a {b}."] = _pair("one-related", related, g)
    return st


def pair_facts(statement: str, left: Sequence[Shape], right: Sequence[Shape]) -> list[int]:
    """The statement's fact of each image, as a class of FACT_CLASSES."""
    fact = REASONING_STATEMENTS[statement][3]
    return [min(fact(shapes), FACT_CLASSES - 1) for shapes in (left, right)]


REASONING_STATEMENTS = _reasoning_statements()
