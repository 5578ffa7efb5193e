"""The synthetic scenes' world: shapes in the cells of a grid, random scenes, grid relations, and the
per-cell labels the generator knows for free."""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

# Shapes sit in the cells of a 4x4 grid, at most one per cell. A cell is exactly one 16x16 patch of the
# `mini` teacher (2x2 patches of `small`): a patch then holds one whole shape or nothing, so the patch
# projection can name what a cell holds and attention only has to relate cells.
GRID = 4
SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (230, 190, 30)}
RELATIONS = ("left of", "right of", "above", "below")


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


# A description picks shapes by colour, kind or both: ("red", None) is every red shape, (None,
# "circle") every circle, ("red", "circle") every red circle.
Description = tuple["str | None", "str | None"]

# Every (colour, shape) pair, e.g. ("red", "circle").
COLORED_SHAPES: list[Description] = list(itertools.product(COLORS, SHAPES))


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


def relation_holds(a: Shape, relation: str, b: Shape) -> bool:
    """Grid relations: `a` is left of `b` when its column is smaller, whatever the rows."""
    if relation == "left of":
        return a.col < b.col
    if relation == "right of":
        return a.col > b.col
    if relation == "above":
        return a.row < b.row
    return a.row > b.row


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


def shapes_of_cells(classes: Sequence[int]) -> tuple[Shape, ...]:
    """The shapes that `cell_classes` describes (their identity and cell; occluded cells hold none)."""
    return tuple(
        Shape(shape=COLORED_SHAPES[k - 1][1], color=COLORED_SHAPES[k - 1][0], row=i // GRID, col=i % GRID)
        for i, k in enumerate(classes)
        if 0 < k < OCCLUDED_CELL
    )


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
