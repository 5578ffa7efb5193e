"""Image-text matching captions for scenes: a true caption per scene and its hard negatives."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from training.scene_language import NUMBER_WORDS, has_related_pair
from training.scene_world import COLORS, RELATIONS, SHAPES, Description, Scene, Shape, relation_holds

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
        return all(have[d] >= n for d, n in named.items()) and has_related_pair(shapes, self.a, self.relation, self.b)

    def with_slot(self, i: int, description: Description) -> Caption:
        """The caption with its i-th shape (a, b, then the others) described otherwise."""
        slots = [self.a, self.b, *self.others]
        slots[i] = description
        return Caption(slots[0], self.relation, slots[1], tuple(slots[2:]))


def hard_negatives(caption: Caption, shapes: Sequence[Shape], rng: random.Random) -> list[str]:
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
