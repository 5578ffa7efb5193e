"""Logits to answers: the labels and scores each task's endpoint returns, computed once for the routes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.space import ImageVector

TRUE_LABELS = ("true", "yes", "1")


@dataclass(frozen=True)
class VQAAnswer:
    answers: list[tuple[str, float]]  # (label, probability), best first
    image: ImageVector
    model_id: str


@dataclass(frozen=True)
class EntailmentAnswer:
    label: str
    scores: dict[str, float]  # label -> probability, every label
    image: ImageVector
    model_id: str


@dataclass(frozen=True)
class ReasoningAnswer:
    label: bool  # is the statement true of the pair
    score: float  # the probability that it is
    images: list[ImageVector]
    model_id: str


@dataclass(frozen=True)
class ModelSummary:
    model_id: str
    provider: str
    labels: int
    dim: int


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x.astype(np.float64) - x.max())
    return e / e.sum()


def true_index(labels: list[str]) -> int:
    """The label that means "true" ("true", "yes" or "1"); the last label when none does."""
    for i, label in enumerate(labels):
        if label.strip().lower() in TRUE_LABELS:
            return i
    return len(labels) - 1


def top_answers(logits: np.ndarray, labels: list[str], k: int) -> list[tuple[str, float]]:
    """VQA: the k best labels by logit with their sigmoid probabilities (answers are scored independently)."""
    probs = sigmoid(logits)
    top = np.argsort(-logits, kind="stable")[: min(k, len(logits))]
    return [(labels[i], float(probs[i])) for i in top]


def entailment_scores(logits: np.ndarray, labels: list[str]) -> tuple[str, dict[str, float]]:
    """Entailment: the best label and the softmax probability of every label."""
    probs = softmax(logits)
    return labels[int(np.argmax(logits))], {label: float(p) for label, p in zip(labels, probs, strict=True)}


def reasoning_verdict(logits: np.ndarray, labels: list[str]) -> tuple[bool, float]:
    """Reasoning: (is it true, the probability that it is), from one logit or a true/false softmax."""
    if len(logits) == 1:
        p_true = float(sigmoid(logits)[0])
        return p_true >= 0.5, p_true
    i_true = true_index(labels)
    return int(np.argmax(logits)) == i_true, float(softmax(logits)[i_true])
