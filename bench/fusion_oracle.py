"""Can the student's fusion head do a scenes task at all? Its upper bound with perfect tower outputs.

The towers are replaced by oracles: the image embedding is a learnt function of the scene's true cell
classes (what each of the 16 cells shows, the labels the generator knows), the text embedding a learnt
vector per statement. On top sits the student's own head (`DualEncoderStudent.head`: the fusion MLP and
the task head) with `--fusion concat` (the paper's [t; v]) or `product` ([t; v; t*v]), trained on the
ground truth. A head that cannot learn the task from perfect embeddings cannot learn it by distillation.

python -m bench.fusion_oracle                        # entailment and reasoning, concat and product, 6 epochs
python -m bench.fusion_oracle --facts                # and reasoning with each image's fact read from the fusion
python -m bench.fusion_oracle --tasks reasoning --epochs 2 --train 200 --test 50   # a quick look
"""

from __future__ import annotations

import argparse
import collections
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

from bench.measure import RESULTS, header, save_figure, set_threads, write_results

TASKS = ("entailment", "reasoning")
TEXT_KEY = {"entailment": "hypothesis", "reasoning": "statement"}


def split(task: str, n_images: int, seed: int) -> tuple[list, list]:
    """The scenes (not rendered) and example records of one split, as training.scenes generates them."""
    from training.scene_splits import make_split

    return make_split(task, n_images, random.Random(seed))


def encode(task: str, scenes: list, records: list, texts: dict[str, int], labels: list[str]):
    """Statement ids (N,), image indices (N, I), every scene's cell classes (S, 16), labels (N,), kinds, and for
    reasoning each image's fact (N, I) (else None)."""
    import torch

    from training.scene_language import ENTAILMENT_STATEMENTS, REASONING_STATEMENTS, pair_facts
    from training.scene_world import cell_classes

    catalogue = ENTAILMENT_STATEMENTS if task == "entailment" else REASONING_STATEMENTS
    key = TEXT_KEY[task]
    facts = None
    if task == "reasoning":
        facts = torch.tensor([pair_facts(r[key], *(scenes[i].shapes for i in r["images"])) for r in records])
    return (
        torch.tensor([texts[r[key]] for r in records]),
        torch.tensor([r.get("images", [r.get("image")]) for r in records]),
        torch.tensor([cell_classes(s) for s in scenes]),
        torch.tensor([labels.index(r["label"]) for r in records]),
        [catalogue[r[key]][0] for r in records],
        facts,
    )


def oracle_model(task: str, fusion: str, n_texts: int, n_labels: int, dim: int):
    """Oracle towers (cells -> MLP -> tanh; statement id -> embedding -> tanh) and the student's head."""
    import torch.nn.functional as F
    from torch import nn

    from training.scene_world import CELL_CLASSES, GRID
    from training.student import DualEncoderStudent, tiny_config

    cfg = replace(tiny_config(task, n_labels, vocab_size=2), hidden_size=dim, num_heads=1, fusion=fusion)
    head = DualEncoderStudent(replace(cfg, num_layers=0, text_layers=0))  # only .head is used

    class Oracle(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.image = nn.Sequential(
                nn.Linear(GRID * GRID * CELL_CLASSES, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Tanh()
            )
            self.text = nn.Sequential(nn.Embedding(n_texts, dim), nn.Tanh())
            self.student = head

        def forward(self, text_ids, cells_per_image):
            t = self.text(text_ids)
            v = [self.image(F.one_hot(c, CELL_CLASSES).flatten(1).float()) for c in cells_per_image]
            return self.student.head(t, *v)

    return Oracle()


def run_one(task: str, fusion: str, data: dict, args, facts: bool = False) -> dict:
    """Train one oracle head; its test accuracy (overall and per statement type) after every epoch. With
    `facts` (reasoning), a linear probe also reads each image's fact from the fusion of the text with it."""
    import torch
    import torch.nn.functional as F

    from training.scene_language import FACT_CLASSES
    from training.scene_world import CELL_CLASSES

    torch.manual_seed(args.seed)
    train, test = data["train"], data["test"]
    model = oracle_model(task, fusion, len(data["texts"]), len(data["labels"]), args.dim)
    probe = torch.nn.Linear(args.dim, FACT_CLASSES)
    opt = torch.optim.AdamW([*model.parameters(), *probe.parameters()], lr=args.lr, weight_decay=0.01)

    def loss_of(ix) -> torch.Tensor:
        t = model.text(train[0][ix])
        v = [model.image(F.one_hot(c, CELL_CLASSES).flatten(1).float()) for c in images(train, ix)]
        loss = F.cross_entropy(model.student.head(t, *v), train[3][ix])
        if facts:
            fused = (model.student.fuse(t, x) for x in v)
            loss = loss + sum(F.cross_entropy(probe(f), train[5][ix, i]) for i, f in enumerate(fused))
        return loss

    def images(d, ix):
        return [d[2][d[1][ix, j]] for j in range(d[1].shape[1])]

    def accuracy(d) -> tuple[float, dict[str, float]]:
        model.eval()
        with torch.no_grad():
            right = (model(d[0], images(d, torch.arange(len(d[0])))).argmax(-1) == d[3]).tolist()
        model.train()
        kinds = collections.defaultdict(list)
        for kind, ok in zip(d[4], right, strict=True):
            kinds[kind].append(ok)
        return sum(right) / len(right), {k: round(sum(v) / len(v), 4) for k, v in sorted(kinds.items())}

    curve, t0 = [], time.time()
    for epoch in range(1, args.epochs + 1):
        for ix in torch.randperm(len(train[0])).split(args.batch_size):
            loss = loss_of(ix)
            opt.zero_grad()
            loss.backward()
            opt.step()
        acc, by_kind = accuracy(test)
        curve.append({"epoch": epoch, "test_accuracy": round(acc, 4), "by_kind": by_kind})
        print(f"{task} {fusion} facts={facts} epoch {epoch}: {acc:.3f} {by_kind} ({time.time() - t0:.0f} s)",
              file=sys.stderr)  # fmt: skip
    name = fusion + (" + facts" if facts else "")
    return {"task": task, "fusion": name, "facts": facts, "curve": curve, "train_s": round(time.time() - t0, 1)}


def markdown(report: dict) -> str:
    epochs = report["settings"]["epochs"]
    lines = [
        "# The fusion head's upper bound: perfect tower outputs, the student's head on top",
        "",
        f"`{report['command']}` ({report['date']}). Oracle towers (true cell classes; one vector per statement),",
        "the student's fusion MLP and task head, trained on the ground truth. Test accuracy after each epoch:",
        "",
        "| task | fusion | " + " | ".join(f"epoch {e}" for e in range(1, epochs + 1)) + " |",
        "|---|---|" + "---|" * epochs,
    ]
    for r in report["runs"]:
        cells = " | ".join(f"{c['test_accuracy']:.3f}" for c in r["curve"])
        lines.append(f"| {r['task']} | {r['fusion']} | {cells} |")
    lines += ["", "Per statement type, last epoch:", ""]
    for r in report["runs"]:
        kinds = ", ".join(f"{k} {v:.3f}" for k, v in r["curve"][-1]["by_kind"].items())
        lines.append(f"- {r['task']}, {r['fusion']}: {kinds}")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(report["settings"]["tasks"]), figsize=(5 * len(report["settings"]["tasks"]), 3.6))
    axes = axes if hasattr(axes, "__len__") else [axes]
    for ax, task in zip(axes, report["settings"]["tasks"], strict=True):
        for r in (r for r in report["runs"] if r["task"] == task):
            ax.plot([c["epoch"] for c in r["curve"]], [c["test_accuracy"] for c in r["curve"]], "o-", label=r["fusion"])
        ax.set_title(f"scenes {task}: oracle towers + student head")
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0.3, 1.0)
        ax.legend()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m bench.fusion_oracle", description=__doc__.split("\n")[0])
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    p.add_argument("--fusions", nargs="+", choices=("concat", "product"), default=["concat", "product"])
    p.add_argument("--train", type=int, default=None, help="training scenes (default: the demo's: 12000 / 16000)")
    p.add_argument("--test", type=int, default=1000, help="test scenes")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--dim", type=int, default=128, help="embedding size D (the mini teacher's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--facts", action="store_true", help="reasoning: also train each head with the per-image facts")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    set_threads(args.threads)
    from training.scenes import DEFAULT_SIZES

    report = header("fusion_oracle", argv, quick=False, threads=args.threads, provider="torch CPU")
    report["settings"] = {k: v for k, v in vars(args).items() if k != "out"}
    report["runs"] = []
    for task in args.tasks:
        n_train = args.train or DEFAULT_SIZES[task][0]
        (tr_scenes, tr_records), (te_scenes, te_records) = split(task, n_train, 0), split(task, args.test, 1)
        key = TEXT_KEY[task]
        texts = {t: i for i, t in enumerate(sorted({r[key] for r in tr_records + te_records}))}
        labels = sorted({r["label"] for r in tr_records})
        data = {
            "texts": texts,
            "labels": labels,
            "train": encode(task, tr_scenes, tr_records, texts, labels),
            "test": encode(task, te_scenes, te_records, texts, labels),
        }
        for fusion in args.fusions:
            for facts in (False, True) if args.facts and task == "reasoning" else (False,):
                run = run_one(task, fusion, data, args, facts)
                report["runs"].append({**run, "train_examples": len(tr_records)})
    write_results(args.out, "fusion_oracle", report, markdown, plot)
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
