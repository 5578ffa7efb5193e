"""The scenes' splits: random scenes with balanced texts, so that no text reveals its answer."""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Sequence

from training.examples import ENTAILMENT_LABELS, REASONING_LABELS
from training.scene_captions import hard_negatives, scene_caption
from training.scene_language import (
    ENTAILMENT_STATEMENTS,
    REASONING_STATEMENTS,
    VQA_ANSWER_SPACES,
    VQA_QUESTIONS,
    entailment_label,
)
from training.scene_world import Scene, named_cells, random_scene

MAX_QUESTIONS_PER_IMAGE = 6
STATEMENTS_PER_LABEL = 2


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
    """Scenes, each with one true caption, its hard negatives, and which cells the caption names: the subject
    (1) and the object (2) of its relation, as a question's mentions (the other shapes it lists only where they
    fit one of those two descriptions)."""
    scenes = [random_scene(rng) for _ in range(n_images)]
    records = []
    for i, scene in enumerate(scenes):
        caption = scene_caption(scene, rng)
        negatives = hard_negatives(caption, scene.shapes, rng)
        named = [named_cells(scene, (caption.a, caption.b))]  # draws nothing: the captions stay as they were
        records.append({"image": i, "caption": caption.text, "negatives": negatives, "named": named})
    return scenes, records


def make_split(task: str, n_images: int, rng: random.Random) -> tuple[list[Scene], list[dict]]:
    """`n_images` scenes for `task` and their examples as records (image indices, texts, labels)."""
    splits = {"vqa": _vqa_split, "entailment": _entailment_split, "reasoning": _reasoning_split, "itm": _itm_split}
    return splits[task](n_images, rng)
