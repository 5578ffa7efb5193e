"""The example types shared by every dataset, one per task, and the split container."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

TASKS = ("vqa", "entailment", "reasoning", "itm")
ENTAILMENT_LABELS = ("entailment", "neutral", "contradiction")
REASONING_LABELS = ("False", "True")
ITM_LABELS = ("match",)  # image-text matching: one logit, whether the caption describes the image


@dataclass(frozen=True)
class GridSpec:
    """The shape of a dataset's free image labels (`GridLabels`): a side x side grid of cells, each of one of
    `cell_classes` classes, and `named_classes` ways for the text to name a cell (0: the text names none)."""

    side: int
    cell_classes: int
    named_classes: int = 0


@dataclass(frozen=True)
class GridLabels:
    """What a dataset knows for free about each grid cell (raster order) of each image: the class of what
    the cell shows (-100: unknown, left out of the loss), and for the scenes whether the text names the shape
    in it; for a reasoning statement also its fact of each image (scene_language.pair_facts)."""

    cells: tuple[tuple[int, ...], ...]
    named: tuple[tuple[int, ...], ...] | None = None
    facts: tuple[int, ...] | None = None

    @classmethod
    def of(
        cls, cells: list[list[int]], named: list[list[int]] | None = None, facts: list[int] | None = None
    ) -> GridLabels:
        return cls(
            tuple(map(tuple, cells)),
            None if named is None else tuple(map(tuple, named)),
            None if facts is None else tuple(facts),
        )


@dataclass(frozen=True, kw_only=True)
class LabelledExample:
    """What an example of a labelled task may carry beside its inputs and label, given by keyword."""

    grid: GridLabels | None = None  # synthetic scenes and easy-VQA (TaskData.grid)
    kind: str = (
        ""  # the question or statement type, for accuracy by type (scenes: the template; easy-VQA: the answer type)
    )


@dataclass(frozen=True)
class VQAExample(LabelledExample):
    """One question about one image; `answers` maps answer -> soft score in [0, 1]."""

    image: Path
    question: str
    answers: dict[str, float]


@dataclass(frozen=True)
class EntailmentExample(LabelledExample):
    """An image premise and a text hypothesis; `label` is one of ENTAILMENT_LABELS."""

    image: Path
    hypothesis: str
    label: str


@dataclass(frozen=True)
class ReasoningExample(LabelledExample):
    """Two images and one statement about them (NLVR2 style); `label` is whether it is true."""

    images: tuple[Path, Path]
    statement: str
    label: bool


@dataclass(frozen=True)
class PairExample:
    """An image and a caption that describes it (image-text matching, pre-training distillation).

    `negatives` are hard negative captions: each differs from the caption in one attribute or relation
    and is false for the image. `grid` (the scenes) holds the image's cells, which hold for the caption and
    every negative alike, and which cells the caption names, which hold for the caption only.
    """

    image: Path
    caption: str
    negatives: tuple[str, ...] = ()
    grid: GridLabels | None = None


Example = VQAExample | EntailmentExample | ReasoningExample | PairExample


@dataclass
class TaskData:
    """A dataset ready for training: its task, label vocabulary and splits."""

    task: str
    labels: list[str]
    train: list[Example]
    test: list[Example]
    name: str = ""
    meta: dict = field(default_factory=dict)
    grid: GridSpec | None = None  # what the examples' GridLabels hold, where they have them


def text_of(ex: Example) -> str:
    if isinstance(ex, VQAExample):
        return ex.question
    if isinstance(ex, EntailmentExample):
        return ex.hypothesis
    if isinstance(ex, PairExample):
        return ex.caption
    return ex.statement


def images_of(ex: Example) -> tuple[Path, ...]:
    if isinstance(ex, ReasoningExample):
        return ex.images
    return (ex.image,)


def target_of(ex: Example, labels: list[str]) -> list[float]:
    """The training target as a score per label (soft scores for VQA, one-hot otherwise; a pair matches)."""
    index = {a: i for i, a in enumerate(labels)}
    y = [0.0] * len(labels)
    if isinstance(ex, VQAExample):
        for a, s in ex.answers.items():
            if a in index:
                y[index[a]] = s
    elif isinstance(ex, EntailmentExample):
        y[index[ex.label]] = 1.0
    elif isinstance(ex, PairExample):
        y[index["match"]] = 1.0
    else:
        y[index[str(ex.label)]] = 1.0
    return y
