"""easy-VQA (the `easy-vqa` PyPI package): 4,000 / 1,000 64x64 images, 38,575 / 9,673 questions, 13 answers.

Also image-caption pairs for image-text matching, written from each image's own questions and answers.
"""

from __future__ import annotations

import random
from pathlib import Path
from types import ModuleType

from training.examples import ITM_LABELS, GridLabels, GridSpec, PairExample, TaskData, VQAExample

SHAPES = ("circle", "rectangle", "triangle")  # every other non-yes/no answer is a colour


def _package() -> ModuleType:
    try:
        import easy_vqa
    except ImportError as e:
        raise RuntimeError("easy-VQA needs the `easy-vqa` package: pip install easy-vqa") from e
    return easy_vqa


def _colors(easy_vqa: ModuleType) -> set[str]:
    """easy-VQA's colour answers: every answer that is neither yes/no nor a shape."""
    return set(easy_vqa.get_answers()) - set(SHAPES) - {"yes", "no"}


def answer_type(answer: str) -> str:
    """easy-VQA's three question types, told by the answer: yes/no, a shape, or a colour."""
    if answer in ("yes", "no"):
        return "yes/no"
    return "shape" if answer in ("circle", "rectangle", "triangle") else "color"


def load_easy_vqa() -> TaskData:
    """The real easy-VQA splits as shipped in the package (one answer per question, score 1).

    Each example also carries its image's one shape as a free label (`GridLabels` of a 1x1 grid: which of
    the colour x shape classes it is, as `image_attributes` reads it from the split's own questions; -100,
    left out of the loss, where they do not tell both), for the teacher's image rung (`--grid-loss`).
    """
    easy_vqa = _package()
    colors = sorted(_colors(easy_vqa))

    def split(questions, image_paths) -> list[VQAExample]:
        texts, answers, image_ids = questions
        attributes = image_attributes(questions, set(colors))
        grids = {i: GridLabels.of([[shape_class(*attributes.get(i, (None, None)), colors)]]) for i in set(image_ids)}
        return [
            VQAExample(image=Path(image_paths[i]), question=q, answers={a: 1.0}, kind=answer_type(a), grid=grids[i])
            for q, a, i in zip(texts, answers, image_ids, strict=True)
        ]

    return TaskData(
        task="vqa",
        labels=sorted(easy_vqa.get_answers()),
        train=split(easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths()),
        test=split(easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths()),
        name="easy-vqa",
        grid=GridSpec(side=1, cell_classes=len(colors) * len(SHAPES)),
    )


def shape_class(color: str | None, shape: str | None, colors: list[str]) -> int:
    """The class of a coloured shape among colours x SHAPES; -100 (ignored by the loss) if either is unknown."""
    if color is None or shape is None:
        return -100
    return colors.index(color) * len(SHAPES) + SHAPES.index(shape)


def image_attributes(questions, colors: set[str]) -> dict[int, tuple[str | None, str | None]]:
    """image id -> (colour, shape) of its one shape, as far as its questions and answers tell.

    An answer that is a colour or shape states it ("what color is the shape?" -> blue), and so does the
    attribute an open question names ("what is the blue shape?" -> rectangle: the shape is blue); a
    yes/no question names a colour or shape that is present when the answer is yes, or no to a negated
    question ("is there not a red shape?" -> no).
    """
    found: dict[int, dict[str, str]] = {}
    for question, answer, image in zip(*questions, strict=True):
        words = question.rstrip("?").split()
        named = [w for w in words if w in colors or w in SHAPES]
        if answer in colors or answer in SHAPES:
            present = [answer, *named]
        else:
            negated = "not" in words or "no" in words
            present = named if (answer == "yes") != negated else []
        for word in present:
            found.setdefault(image, {})["color" if word in colors else "shape"] = word
    return {image: (a.get("color"), a.get("shape")) for image, a in found.items()}


def captions(color: str | None, shape: str | None) -> list[str]:
    """Captions in easy-VQA's own words (no word its questions do not use, so the tokenizer trained on them
    serves the questions too), for a shape whose colour or kind may be unknown."""
    thing = f"{color} {shape}" if color and shape else shape or f"{color} shape"
    last = f"the shape is a {thing}" if shape else f"the shape is {color}"
    return [f"there is a {thing} in the image", f"the image does contain a {thing}", f"a {thing} is present", last]


def _pairs(questions, image_paths, colors: set[str], split: str) -> list[PairExample]:
    """One pair per caption template per image; hard negatives change the colour or the shape."""
    pairs = []
    for image, (color, shape) in sorted(image_attributes(questions, colors).items()):
        rng = random.Random(f"easy-vqa/itm/{split}/{image}")
        changed = []
        if color:
            changed.append((rng.choice(sorted(colors - {color})), shape))
        if shape:
            changed.append((color, rng.choice([s for s in SHAPES if s != shape])))
        negatives = [captions(*c) for c in changed]
        for k, caption in enumerate(captions(color, shape)):
            pairs.append(PairExample(Path(image_paths[image]), caption, tuple(n[k] for n in negatives)))
    return pairs


def load_easy_vqa_pairs() -> TaskData:
    """easy-VQA's images with captions of their shape (images whose questions tell neither are left out)."""
    easy_vqa = _package()
    colors = _colors(easy_vqa)
    return TaskData(
        task="itm",
        labels=list(ITM_LABELS),
        train=_pairs(easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths(), colors, "train"),
        test=_pairs(easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths(), colors, "test"),
        name="easy-vqa",
    )
