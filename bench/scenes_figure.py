"""A figure of a few synthetic scenes with their texts and answers, for the README (bench/results/scenes.png).

python -m bench.scenes_figure            # the first test examples of each task and template
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

from bench.measure import RESULTS, save_figure
from training.examples import EntailmentExample, ReasoningExample, VQAExample, images_of, text_of
from training.scenes import load_scenes


def answer_of(ex) -> str:
    if isinstance(ex, VQAExample):
        return next(iter(ex.answers))
    return ex.label if isinstance(ex, EntailmentExample) else str(ex.label).lower()


def pick(task: str, per_task: int, test_images: int) -> list:
    """The first test example of each template, up to `per_task`."""
    seen, chosen = set(), []
    for ex in load_scenes(task, train=2, test=test_images).test:  # the test split does not depend on train
        if ex.kind not in seen:
            seen.add(ex.kind)
            chosen.append(ex)
        if len(chosen) == per_task:
            break
    return chosen


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scenes_figure", description=__doc__.split("\n")[0])
    p.add_argument("--per-task", type=int, default=4, help="examples per task (one per template)")
    p.add_argument("--test-images", type=int, default=1000, help="test images of each task's scenes")
    p.add_argument("--out", default=str(RESULTS / "scenes.png"), help="where to write the PNG")
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    rows = [(task, pick(task, args.per_task, args.test_images)) for task in ("vqa", "entailment", "reasoning")]
    fig, axes = plt.subplots(len(rows), args.per_task, figsize=(3.2 * args.per_task, 3.6 * len(rows)))
    for r, (task, examples) in enumerate(rows):
        for c in range(args.per_task):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(examples):
                ax.axis("off")
                continue
            ex = examples[c]
            images = [Image.open(p).convert("RGB") for p in images_of(ex)]
            if isinstance(ex, ReasoningExample):  # left and right images side by side, a gap between
                canvas = Image.new("RGB", (64 * 2 + 6, 64), (40, 40, 40))
                canvas.paste(images[0], (0, 0))
                canvas.paste(images[1], (70, 0))
                images = [canvas]
            ax.imshow(images[0], interpolation="nearest")
            label = f"{task} · {ex.kind}\n" + "\n".join(textwrap.wrap(text_of(ex), 34)) + f"\n→ {answer_of(ex)}"
            ax.set_title(label, fontsize=8, loc="left")
    fig.tight_layout()
    path = Path(args.out)
    save_figure(fig, path)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
