"""What DiDE distils: the teacher's last-layer text-to-image attention beside each student's virtual attention,
over a few test images (a PNG), and the mean attention KL on the test split per student (JSON + Markdown).

The teacher's map is its last layer's text queries over the image patches (ViLT's joint attention, restricted
to the image keys and renormalised); a student's is softmax(Q_text K_image^T / sqrt(d)) from its text tower's
and image tower's last layers, the "virtual" attention the DiDE loss compares with it. Both are averaged over
heads and the text's tokens. The KL is the distillation loss itself (losses.cross_modal_attention_loss), per
direction, over the first --kl-limit test examples: a student trained with attention KD should sit lower
than one trained on predictions alone.

python -m bench.attention_figure --teacher T --student DiDE=S1 --student pred-KD=S2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.measure import RESULTS, header, save_figure, set_threads, write_json


def load_split(teacher, limit: int):
    """The teacher's test split as an ExampleDataset (the first `limit` examples)."""
    from training.data import load_data
    from training.dataset import ExampleDataset

    data = load_data(teacher.data, teacher.task)
    data.test = data.test[:limit]
    return ExampleDataset(data, "test", teacher.labels, teacher.text, teacher.image_spec)


def text_to_image(scores, text_mask):
    """Attention logits (B, H, L, 1+N) -> (B, N): softmax over the patches (image [CLS] left out), averaged over
    heads and the valid text tokens."""
    import torch

    probs = torch.softmax(scores[..., 1:], dim=-1)  # (B, H, L, N)
    w = text_mask[:, None, :, None].float()
    return (probs * w).sum(dim=(1, 2)) / (w.sum(dim=(1, 2)) * probs.shape[1])


def maps_and_kl(teacher, students: dict, ds, batch_size: int = 64) -> tuple[dict, dict]:
    """Per model, the text-to-image maps of the first image of every example (E, N); per student, the mean
    attention KL to the teacher on the split, each direction apart."""
    import torch
    from torch.utils.data import DataLoader

    from training.losses import cross_attention_scores, cross_modal_attention_loss

    maps: dict[str, list] = {"teacher": [], **{name: [] for name in students}}
    kl = {name: {"t2i": 0.0, "i2t": 0.0} for name in students}
    n = 0
    with torch.no_grad():
        for b in DataLoader(ds, batch_size=batch_size):
            ids, mask, pixels, pixels2 = b["input_ids"], b["attention_mask"], b["pixels"], b.get("pixels2")
            t_qk = teacher.forward(ids, mask, pixels, pixels2, keep_qk=True).qk
            maps["teacher"].append(text_to_image(cross_attention_scores(t_qk[0][0], t_qk[0][3]), mask))
            for name, model in students.items():
                text = model.text_tower(ids, mask, keep_qk=True)
                images = [model.image_tower(p, keep_qk=True) for p in (pixels, pixels2) if p is not None]
                maps[name].append(text_to_image(cross_attention_scores(text.query, images[0].key), mask))
                student_text = (text.query, text.key)
                for direction in ("t2i", "i2t"):
                    one = {"t2i": direction == "t2i", "i2t": direction == "i2t"}
                    losses = [
                        cross_modal_attention_loss(qk, student_text, (img.query, img.key), mask, **one)
                        for qk, img in zip(t_qk, images, strict=True)
                    ]
                    loss = sum(losses) / len(losses)
                    kl[name][direction] += float(loss) * len(ids)
            n += len(ids)
    return {k: torch.cat(v) for k, v in maps.items()}, {
        name: {d: round(v / n, 4) for d, v in by.items()} for name, by in kl.items()
    }


def pick(ds, count: int) -> list[int]:
    """Indices of the first example of each statement type, up to `count` (then the next ones)."""
    seen, chosen = set(), []
    for i, ex in enumerate(ds.examples):
        if getattr(ex, "kind", None) not in seen:
            seen.add(getattr(ex, "kind", None))
            chosen.append(i)
        if len(chosen) == count:
            return chosen
    return (chosen + [i for i in range(len(ds.examples)) if i not in chosen])[:count]


def plot(ds, maps: dict, chosen: list[int], path: Path) -> None:
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from training.examples import images_of, text_of

    models = list(maps)
    fig, axes = plt.subplots(len(chosen), len(models), figsize=(3.0 * len(models), 3.3 * len(chosen)), squeeze=False)
    for r, i in enumerate(chosen):
        ex = ds.examples[i]
        image = Image.open(images_of(ex)[0]).convert("RGB")
        for c, name in enumerate(models):
            m = maps[name][i]
            side = int(len(m) ** 0.5)
            ax = axes[r][c]
            ax.imshow(image)
            ax.imshow(m.view(side, side).numpy(), cmap="magma", alpha=0.6, extent=(0, image.width, image.height, 0))
            ax.set_xticks([])
            ax.set_yticks([])
            title = name if c else f"teacher\n{textwrap.fill(text_of(ex), 34)}"
            ax.set_title(title, fontsize=8)
    save_figure(fig, path)


def markdown(report: dict) -> str:
    lines = [
        "# What is distilled: the teacher's text-to-image attention and the students' virtual attention",
        "",
        f"`{report['command']}` ({report['date']}). Mean attention KL(teacher ‖ student) over the first "
        f"{report['kl_examples']:,} test examples, last layer, per head and text or image query row "
        "(the DiDE loss); lower is closer to the teacher.",
        "",
        "| student | text→image KL | image→text KL |",
        "|---|---|---|",
    ]
    for name, kl in report["kl"].items():
        lines.append(f"| {name} (`{report['students'][name]}`) | {kl['t2i']:.4f} | {kl['i2t']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m bench.attention_figure", description=__doc__.split("\n")[0])
    p.add_argument("--teacher", required=True, help="a dide-train teacher directory")
    p.add_argument("--student", action="append", required=True, metavar="NAME=DIR", help="a student, named")
    p.add_argument("--examples", type=int, default=4, help="test examples in the picture (one per type)")
    p.add_argument("--kl-limit", type=int, default=1000, help="test examples the mean KL is taken over")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS, help="directory for attention.{png,json,md}")
    args = p.parse_args(argv)
    set_threads(args.threads)
    from training.student import load_student
    from training.teacher import load_teacher

    pairs = [s.split("=", 1) for s in args.student]
    if any(len(pair) != 2 for pair in pairs):
        p.error("--student takes NAME=DIR")
    teacher = load_teacher(args.teacher)
    teacher.model.eval()
    students = {name: load_student(d).model for name, d in pairs}
    ds = load_split(teacher, max(args.kl_limit, args.examples))
    maps, kl = maps_and_kl(teacher, students, ds)
    args.out.mkdir(parents=True, exist_ok=True)
    plot(ds, maps, pick(ds, args.examples), args.out / "attention.png")
    report = header("attention_figure", argv, quick=False, threads=args.threads, provider="torch CPU")
    report.update(teacher=args.teacher, students=dict(pairs), kl_examples=len(ds.examples), kl=kl)
    write_json(args.out / "attention.json", report)
    (args.out / "attention.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
