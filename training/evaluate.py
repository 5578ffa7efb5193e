"""Accuracy of a trained teacher or student directory on a data split."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader

from training.data import load_data
from training.dataset import ExampleDataset, batch_maker
from training.student import load_student, read_config
from training.teacher import load_teacher


@torch.no_grad()
def evaluate_dir(
    model_dir: str | Path,
    data_spec: str | None = None,
    split: str = "test",
    limit: int | None = None,
    batch_size: int = 256,
) -> dict:
    """Accuracy (and VQA score for VQAv2) of a teacher or student directory on a split.

    For itm: each test pair with its caption and one negative (itm_pairs, a fixed seed); `n` counts both,
    or for a ranking head (an HF retrieval teacher and its students) the images, each right when its caption
    outscores the negative.
    """
    meta = read_config(model_dir) if (Path(model_dir) / "config.json").is_file() else {}
    if meta.get("kind") == "student":
        loaded = load_student(model_dir)
        model, labels, spec, text, task = (
            loaded.model,
            loaded.labels,
            loaded.image_spec,
            loaded.text,
            loaded.model.config.task,
        )
        spec_str, blind, ranking = data_spec or loaded.data, meta.get("blind"), meta.get("ranking", False)

        def forward(b):
            return model(b["input_ids"], b["attention_mask"], b["pixels"], b.get("pixels2"))
    else:
        teacher = load_teacher(model_dir)
        labels, spec, text, task = teacher.labels, teacher.image_spec, teacher.text, teacher.task
        spec_str, blind, ranking = data_spec or teacher.data, None, teacher.ranking

        def forward(b):
            return teacher.forward(b["input_ids"], b["attention_mask"], b["pixels"], b.get("pixels2")).logits

    data = load_data(spec_str, task)
    if limit:
        setattr(data, split, getattr(data, split)[:limit])
    ds = ExampleDataset(data, split, labels, text, spec, blind=blind)
    batches = batch_maker(task, seed=0)
    correct, score, n = 0.0, 0.0, 0
    right: list[bool] = []  # per example, in order, for the accuracy by type (not for itm pairs)
    always = torch.zeros(())  # per answer: how many examples answering it every time would get right
    for batch in DataLoader(ds, batch_size=batch_size):
        batch = batches(batch)
        logits, target = forward(batch), batch["target"]
        if ranking:  # a ranking score: right when an image's caption outscores its negative; n counts images
            scores = logits[:, 0][batch["pairs"]]  # (P, 2)
            got = (scores[:, 0] > scores[:, 1]).float()
        elif task == "itm":  # one logit: right when its sign says whether the pair matches
            got = (target[:, 0] > 0.5).eq(logits[:, 0] > 0).float()
        else:
            got = target.gather(1, logits.argmax(-1)[:, None])[:, 0]
            always = always + ((target >= 1.0 - 1e-6) if task != "vqa" else (target > 0)).sum(0).float()
        hits = (got >= 1.0 - 1e-6) if task != "vqa" else (got > 0)
        right += hits.tolist()
        correct += float(hits.sum())
        score += float(got.sum())
        n += len(got)
    result = {"accuracy": correct / max(n, 1), "n": n, "task": task, "data": spec_str, "split": split}
    if not ranking and task != "itm":  # the accuracy of always giving the most frequent answer: chance, here
        result["majority"] = float(always.max()) / max(n, 1)
    if spec_str.startswith("vqav2"):
        result["vqa_score"] = score / max(n, 1)
    kinds = [getattr(ex, "kind", "") for ex in ds.examples]
    if task != "itm" and any(kinds) and len(kinds) == len(right):
        result["by_kind"] = accuracy_by_kind(kinds, right)
    return result


def accuracy_by_kind(kinds: list[str], right: list[bool]) -> dict[str, dict]:
    """{kind: {"accuracy": a, "n": n}}, kinds sorted."""
    totals: dict[str, list[int]] = {}
    for kind, ok in zip(kinds, right, strict=True):
        t = totals.setdefault(kind, [0, 0])
        t[0] += ok
        t[1] += 1
    return {k: {"accuracy": c / n, "n": n} for k, (c, n) in sorted(totals.items())}
