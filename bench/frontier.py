"""The accuracy-latency frontier of trained students: one teacher, students with text towers of different
depths distilled from it, each exported in fp32 and int8 by `dide-export`.

    python -m bench.frontier --teacher artifacts/demo-rebuild/vqa/teacher \\
        --students artifacts/demo-rebuild/vqa/student runs/vqa-text3 runs/vqa-text2 runs/vqa-text1

Accuracy: each model through its exported graphs on the whole test split of the data it was trained on, as
`dide-export` records it (`--eval-size` covering the split): the fp32 bundle's and the int8 bundle's, and the
teacher's fp32 and int8 ONNX graphs'. Latency, per request, at each batch size: the student with its image
embedding cached (text tower + head, the service's path: texts tokenised by the bundle, padding cut to the
longest text) against the teacher as one ONNX graph over the same question's own tokens and the image, both
on ONNX Runtime with one thread, all variants of a group timed in interleaved rounds; speed-ups are medians
of per-round ratios against the teacher of the same precision. Two groups of shapes:
- the trained size: the models above, on one real test question of their data;
- base shapes (ViLT-B/32: 12 layers, 768 wide, 384-pixel images), random weights, students with the text
  depths of --base-layers: what the same depths cost at the size a user would deploy. Their accuracy is not
  known (random weights); the teacher is timed at batch 1 only (seconds a call at batch 32).
"Deployable" is within 0.5 point of the same model's fp32 accuracy; the recommended configuration is the
fastest deployable student at batch 1 within 1 point of the best student's fp32 accuracy.
Writes bench/results/frontier.json, frontier.md and frontier.png (accuracy against latency, the Pareto front
marked).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bench.measure import (
    RESULTS,
    configure_logging,
    header,
    interleaved,
    paired_ratio,
    save_figure,
    set_threads,
    summary_ms,
    write_results,
)
from bench.models import Request, real_request, teacher_graphs, write_bundle
from export.runtime import Bundle

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "int8")
DEPLOYABLE_PTS = 0.5  # a low-precision model within this many points of its own fp32 accuracy
RECOMMEND_PTS = 1.0  # the recommendation: within this many points of the best student's fp32 accuracy
ALL_TEST = 10**9  # --eval-size covering any test split: dide-export evaluates on all of it
TARGET_S = 0.2  # seconds of back-to-back calls per sample


class FrontierError(ValueError):
    """The students cannot be compared: a bad directory, or not distilled from the teacher given."""


def export(what: str, checkpoint: Path, out: Path, precision: str) -> Path:
    """`dide-export` of a student (a bundle) or the teacher (one graph) into `out`, evaluated on the whole
    test split; reused when `out` exists (exports are atomic, so an existing one is complete)."""
    if not out.exists():
        argv = ["export.onnx_export", f"--{what}", str(checkpoint), "--out", str(out), "--eval-size", str(ALL_TEST)]
        subprocess.run([sys.executable, "-m", *argv, *(["--int8"] if precision == "int8" else [])], check=True)
    return out


def accuracy_of(parity: dict, precision: str) -> tuple[float, int]:
    """(accuracy on the real test examples, their number) from an export's parity record."""
    stats = parity["fp32"]["real"] if precision == "fp32" else parity["int8"]
    if "accuracy" not in stats:
        raise FrontierError(f"the export has no test accuracy ({stats}): is the student's data available here?")
    return stats["accuracy"], stats["examples"]


def student_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise FrontierError(f"{directory} is not a student checkpoint (no config.json)")
    meta = json.loads(path.read_text())
    if meta.get("kind") != "student":
        raise FrontierError(f"{directory} holds a {meta.get('kind')!r} checkpoint, not a student")
    return meta


def check_students(teacher: Path, students: list[Path]) -> list[dict]:
    """Each student's config; refused unless every one was distilled from `teacher` with distinct depths."""
    metas = [student_config(s) for s in students]
    for s, meta in zip(students, metas, strict=True):
        source = meta.get("teacher")
        if source is None or Path(source).resolve() != teacher.resolve():
            raise FrontierError(f"{s} was distilled from {source!r}, not {teacher}: compare one teacher's students")
    depths = [m["student"]["text_layers"] for m in metas]
    if len(set(depths)) != len(depths):
        raise FrontierError(f"two students have the same text depth ({depths}): give one per depth")
    return metas


def question_request(bundle: Bundle, data_spec: str, task: str) -> tuple[str, np.ndarray, np.ndarray | None]:
    """One real test question of the models' data, with its preprocessed image(s)."""
    from export.onnx_export import real_sample

    s = real_sample(data_spec, 1, task, bundle.text, bundle.image_spec, bundle.labels)
    if s is None:
        raise FrontierError(f"cannot load the test split of {data_spec!r}")
    return s.texts[0], s.pixels, s.pixels2


def measure(fns: dict[str, Callable[[], object]], rounds: int, what: str) -> dict[str, list[float]]:
    single = {}
    for name, fn in fns.items():  # one warm-up call each, timed: how many calls make a sample
        t0 = time.perf_counter()
        fn()
        single[name] = time.perf_counter() - t0
    return interleaved(fns, rounds, TARGET_S, lambda m: log.info("%s %s", what, m), single)


def rows_of(samples: dict[str, list[float]], batch: int, teachers: dict[str, str]) -> list[dict]:
    """Per variant: latency summary, per-request ms and the speed-up against the same precision's teacher."""
    rows = []
    for name, xs in samples.items():
        row = {"variant": name, **summary_ms(xs), "per_request_ms": 1000 * float(np.median(xs)) / batch}
        row["round_ms"] = [1000 * x for x in xs]  # one per interleaved round: any pair's ratio
        precision = name.rsplit(" ", 1)[-1]
        ref = teachers.get(precision)
        if ref is not None and ref in samples and ref != name:
            row["speedup_vs_teacher"] = paired_ratio(samples[ref], xs)
        rows.append(row)
    return rows


def student_name(depth: int) -> str:
    return f"student, {depth} text layer" + ("s" if depth != 1 else "")


def teacher_call(s: ort.InferenceSession, feed: dict[str, np.ndarray]) -> Callable[[], object]:
    """The teacher's one graph on a request: text tokens and the image(s)."""
    return lambda: s.run(None, feed)


def student_call(b: Bundle, texts: list[str], image: np.ndarray, image2: np.ndarray | None = None):
    """The service's path for a cached image: tokenise (padding cut to the longest text), text tower, head."""
    return lambda: b.head(b.encode_texts(texts), image, image2)


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def trained(args: argparse.Namespace, work: Path) -> dict:
    """The trained size: accuracy of every model and precision, and latency per batch."""
    from export.teacher_export import read_metadata

    metas = check_students(args.teacher, args.students)
    models = []
    for precision in PRECISIONS:
        path = export("teacher", args.teacher, work / f"teacher-{precision}.onnx", precision)
        acc, n = accuracy_of(read_metadata(path)["parity"], precision)
        models.append({"model": "teacher", "text_layers": None, "precision": precision, "accuracy": acc,
                       "examples": n, "path": path})  # fmt: skip
    for student, meta in zip(args.students, metas, strict=True):
        depth = meta["student"]["text_layers"]
        for precision in PRECISIONS:
            path = export("student", student, work / f"student-text{depth}-{precision}", precision)
            manifest = json.loads((path / "manifest.json").read_text())
            acc, n = accuracy_of(manifest["parity"], precision)
            models.append({"model": "student", "text_layers": depth, "precision": precision, "accuracy": acc,
                           "examples": n, "path": path, "checkpoint": str(student)})  # fmt: skip
    for m in models:
        m["name"] = "teacher" if m["model"] == "teacher" else student_name(m["text_layers"])
        m["name"] += f", {m['precision']}"
    bundles = {m["name"]: Bundle.load(m["path"], ["CPUExecutionProvider"], threads=args.threads) for m in models
               if m["model"] == "student"}  # fmt: skip
    sessions = {m["name"]: session(m["path"], args.threads) for m in models if m["model"] == "teacher"}
    first = next(iter(bundles.values()))
    data = metas[0]["data"]
    question, pixels, pixels2 = question_request(first, data, first.task)
    image = first.encode_images(pixels)
    image2 = None if pixels2 is None else first.encode_images(pixels2)
    ids, mask = first.text([question])
    tokens = int(mask.sum())
    groups = []
    for batch in args.batches:
        fns: dict[str, Callable[[], object]] = {}
        for name, s in sessions.items():
            pv = pixels if pixels2 is None else np.stack([pixels, pixels2], axis=1)
            feed = {
                "input_ids": np.repeat(ids[:, :tokens], batch, 0),
                "attention_mask": np.repeat(mask[:, :tokens], batch, 0),
                "pixel_values": np.ascontiguousarray(np.repeat(pv, batch, 0)),
            }
            fns[name] = teacher_call(s, feed)
        texts = [question] * batch
        img = np.repeat(image, batch, 0)
        img2 = None if image2 is None else np.repeat(image2, batch, 0)
        for name, b in bundles.items():
            fns[name] = student_call(b, texts, img, img2)
        samples = measure(fns, args.rounds, f"trained b{batch}")
        teachers = {p: f"teacher, {p}" for p in PRECISIONS}
        groups.append({"batch": batch, "rows": rows_of(samples, batch, teachers)})
    for m in models:
        del m["path"]
    depth = metas[0]["student"]["num_layers"]  # the image tower keeps the teacher's depth
    return {"data": data, "question": question, "tokens": tokens, "teacher_layers": depth, "models": models,
            "groups": groups}  # fmt: skip


def base(args: argparse.Namespace, work: Path, trained_report: dict) -> dict:
    """Base shapes, random weights: latency of students of each text depth against the teacher (batch 1).
    The depths: --base-layers, or by default the trained students' fractions of their teacher's depth."""
    from bench.models import build_models
    from training.teacher import student_from_teacher

    models = build_models(args.base_size)
    full, trained_full = models.teacher.config.num_hidden_layers, trained_report["teacher_layers"]
    trained_depths = sorted({m["text_layers"] for m in trained_report["models"] if m["model"] == "student"})
    stands_for = {max(1, round(full * d / trained_full)): d for d in trained_depths}  # same fraction of depth
    depths = args.base_layers or sorted(stands_for, reverse=True)
    request: Request = real_request(models.text, models.student.config.image_size)
    teachers = {p: session(path, args.threads) for p, path in teacher_graphs(models, work).items()}
    bundles = {}
    for depth in depths:
        student = student_from_teacher(models.teacher, text_layers=depth).eval()
        fp32 = write_bundle(student, work / args.base_size / f"text{depth}-fp32", models.text, models.labels, "fp32")
        int8 = work / args.base_size / f"text{depth}-int8"
        bundles[depth, "fp32"] = fp32
        bundles[depth, "int8"] = write_bundle(student, int8, models.text, models.labels, "int8", graphs_from=fp32)
    loaded = {k: Bundle.load(d, ["CPUExecutionProvider"], threads=args.threads) for k, d in bundles.items()}
    ids, mask, pixels = request.batch(1)
    image = loaded[depths[0], "fp32"].encode_images(pixels)
    groups = []
    for batch in args.batches:
        fns: dict[str, Callable[[], object]] = {}
        if batch == 1:
            n = request.tokens
            feed = {"input_ids": ids[:, :n], "attention_mask": mask[:, :n], "pixel_values": pixels}
            for p, s in teachers.items():
                fns[f"teacher, {p}"] = teacher_call(s, feed)
        texts, img = [request.question] * batch, np.repeat(image, batch, 0)
        for (depth, p), b in loaded.items():
            fns[f"{student_name(depth)}, {p}"] = student_call(b, texts, img)
        samples = measure(fns, args.rounds, f"{args.base_size} b{batch}")
        groups.append({"batch": batch, "rows": rows_of(samples, batch, {p: f"teacher, {p}" for p in PRECISIONS})})
    return {
        "size": args.base_size,
        "question": request.question,
        "tokens": request.tokens,
        "text_layers": full,
        "stands_for": {str(b): stands_for[b] for b in depths if b in stands_for},  # base depth -> trained depth
        "groups": groups,
    }


def analyse(report: dict) -> dict:
    """Pareto front (batch 1), deployable models and the recommended serving configuration."""
    t = report["trained"]
    latency = {r["variant"]: r["per_request_ms"] for r in t["groups"][0]["rows"]}
    fp32 = {(m["model"], m["text_layers"]): m["accuracy"] for m in t["models"] if m["precision"] == "fp32"}
    points = []
    for m in t["models"]:
        drop = 100 * (fp32[m["model"], m["text_layers"]] - m["accuracy"])
        points.append({"name": m["name"], "model": m["model"], "accuracy": m["accuracy"],
                       "latency_ms": latency[m["name"]], "deployable": drop <= DEPLOYABLE_PTS})  # fmt: skip
    for p in points:
        p["pareto"] = not any(
            q is not p and q["accuracy"] >= p["accuracy"] and q["latency_ms"] <= p["latency_ms"]
            and (q["accuracy"] > p["accuracy"] or q["latency_ms"] < p["latency_ms"]) for q in points
        )  # fmt: skip
    best = max(v for (model, _), v in fp32.items() if model == "student")
    good = [p for p in points if p["model"] == "student" and p["deployable"]
            and 100 * (best - p["accuracy"]) <= RECOMMEND_PTS]  # fmt: skip
    pick = min(good, key=lambda p: p["latency_ms"]) if good else None
    out = {"batch": t["groups"][0]["batch"], "points": points, "best_student_fp32": best, "recommended": pick}
    if report.get("base"):
        out["base_speedups"] = base_speedups(report["base"], points, pick)
    return out


def base_speedups(b: dict, points: list[dict], pick: dict | None) -> dict:
    """At base shapes, batch 1: the best deployable teacher against (a) the fastest deployable student of any
    depth (deployable as measured on its trained counterpart, the same fraction of depth), and (b) the
    recommended configuration; each a median of per-round ratios."""
    group = next((g for g in b["groups"] if g["batch"] == 1), None)
    if group is None:
        return {}
    rows = {r["variant"]: r for r in group["rows"]}
    deployable = {p["name"] for p in points if p["deployable"]}
    teachers = [f"teacher, {p}" for p in PRECISIONS if f"teacher, {p}" in deployable and f"teacher, {p}" in rows]
    teacher = min(teachers, key=lambda n: rows[n]["median_ms"])
    found = {}
    for base_depth, depth in b["stands_for"].items():
        for precision in PRECISIONS:
            trained_name = f"{student_name(depth)}, {precision}"
            base_name = f"{student_name(int(base_depth))}, {precision}"
            if base_name in rows:
                found[trained_name] = base_name
    accuracy = {p["name"]: p["accuracy"] for p in points}

    def case(trained_name: str) -> dict:
        base_name = found[trained_name]
        ratio = paired_ratio(rows[teacher]["round_ms"], rows[base_name]["round_ms"])
        return {"student": base_name, "trained": trained_name, "accuracy": accuracy[trained_name],
                "teacher": teacher, "teacher_accuracy": accuracy[teacher], "speedup": ratio}  # fmt: skip

    any_depth = [n for n in found if n in deployable]
    fastest = min(any_depth, key=lambda n: rows[found[n]]["median_ms"]) if any_depth else None
    return {
        "any_depth": case(fastest) if fastest else None,
        "recommended": case(pick["name"]) if pick and pick["name"] in found else None,
    }


def markdown(report: dict) -> str:
    t, a = report["trained"], report["analysis"]
    lines = [
        f"Trained models ({t['data']}): accuracy on the whole test split through the exported graphs "
        f"({t['models'][0]['examples']:,} examples), latency per request on one ONNX Runtime thread for "
        f'"{t["question"]}" ({t["tokens"]} tokens), image embedding cached for the students.',
        "",
    ]
    head = "| model | accuracy | Pareto (b1) | deployable |"
    for g in t["groups"]:
        head += f" b{g['batch']} ms/request | b{g['batch']} speed-up vs teacher |"
    lines += [head, "|" + " --- |" * (4 + 2 * len(t["groups"]))]
    by_name = {p["name"]: p for p in a["points"]}
    for m in t["models"]:
        p = by_name[m["name"]]
        cells = [m["name"], f"{m['accuracy']:.4f}", "yes" if p["pareto"] else "", "yes" if p["deployable"] else "no"]
        for g in t["groups"]:
            row = next(r for r in g["rows"] if r["variant"] == m["name"])
            speed = f"{row['speedup_vs_teacher']:.1f}x" if "speedup_vs_teacher" in row else "–"
            cells += [f"{row['per_request_ms']:.3f}", speed]
        lines.append("| " + " | ".join(cells) + " |")
    pick = a["recommended"]
    lines += [""]
    if pick:
        lines.append(
            f"Recommended: **{pick['name']}**, {pick['accuracy']:.4f} "
            f"({100 * (pick['accuracy'] - a['best_student_fp32']):+.1f} points against the best student's fp32, "
            f"{a['best_student_fp32']:.4f}), {pick['latency_ms']:.3f} ms a request at batch {a['batch']}."
        )
    b = report.get("base")
    if b:
        lines += ["", f'Base shapes ({b["size"]}, random weights), per request, for "{b["question"]}":', ""]
        for g in b["groups"]:
            lines += [f"**batch {g['batch']}**", "", "| variant | ms/request | speed-up vs teacher |",
                      "| --- | --- | --- |"]  # fmt: skip
            for r in g["rows"]:
                speed = f"{r['speedup_vs_teacher']:.1f}x" if "speedup_vs_teacher" in r else "–"
                lines.append(f"| {r['variant']} | {r['per_request_ms']:.3f} | {speed} |")
            lines.append("")
        stands = ", ".join(f"{k} for {v}" for k, v in b["stands_for"].items())
        lines.append(f"Base text depths stand for the trained ones at the same fraction of depth ({stands}).")
        for key, what in (("any_depth", "the fastest deployable student of any depth"),
                          ("recommended", "the recommended configuration")):  # fmt: skip
            c = a.get("base_speedups", {}).get(key)
            if c:
                lines.append(
                    f"- Best deployable teacher ({c['teacher']}, {c['teacher_accuracy']:.4f} trained) against "
                    f"{what} ({c['student']}; trained: {c['accuracy']:.4f}): **{c['speedup']:.1f}x** at batch 1."
                )
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a, b = report["analysis"], report.get("base")
    fig, axes = plt.subplots(1, 2 if b else 1, figsize=(13 if b else 7.5, 4.8), squeeze=False)
    ax = axes[0, 0]
    front = sorted((p for p in a["points"] if p["pareto"]), key=lambda p: p["latency_ms"])
    ax.plot([p["latency_ms"] for p in front], [p["accuracy"] for p in front], color="0.7", ls="--", lw=0.8,
            drawstyle="steps-post", label="Pareto front", zorder=1)  # fmt: skip
    for p in a["points"]:
        color = "tab:red" if p["model"] == "teacher" else "tab:green"
        marker = "o" if p["name"].endswith("fp32") else "s"
        ax.scatter(p["latency_ms"], p["accuracy"], c=color, marker=marker, zorder=2,
                   edgecolors="k" if p["pareto"] else "none")  # fmt: skip
        ax.annotate(p["name"], (p["latency_ms"], p["accuracy"]), xytext=(-6, -11), textcoords="offset points",
                    fontsize=7)  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel(f"ms per request at batch {a['batch']} (log; one ONNX Runtime thread)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"Trained ({report['trained']['data']}): fp32 (o), int8 (s)", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    if b:
        ax = axes[0, 1]
        for g in b["groups"]:
            rows = {r["variant"]: r for r in g["rows"]}
            for precision, style in (("fp32", "o-"), ("int8", "s--")):
                pts = sorted((int(v.split(", ")[1].split()[0]), r["per_request_ms"]) for v, r in rows.items()
                             if v.startswith("student") and v.endswith(precision))  # fmt: skip
                ax.plot(*zip(*pts, strict=True), style, label=f"student {precision}, batch {g['batch']}")
                teacher = rows.get(f"teacher, {precision}")
                if teacher:
                    ax.axhline(teacher["per_request_ms"], color="tab:red", ls=style[1:], lw=0.8,
                               label=f"teacher {precision}, batch {g['batch']}")  # fmt: skip
        ax.set_yscale("log")
        ax.set_xlabel("student text layers")
        ax.set_ylabel("ms per request (log)")
        ax.set_title(f"{b['size']} shapes, random weights: latency by text depth", fontsize=9)
        ax.legend(fontsize=7)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, required=True, help="the teacher checkpoint the students came from")
    parser.add_argument("--students", type=Path, nargs="+", required=True, help="student checkpoints, one per depth")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="batch sizes (the first: the plot's)")
    parser.add_argument(
        "--base-layers", type=int, nargs="+", help="text depths at base shapes (default: the students' fractions)"
    )
    parser.add_argument("--no-base", action="store_true", help="skip the base-shape group")
    parser.add_argument("--base-size", default="base", help="the size of the base-shape group (training.teacher.SIZES)")
    parser.add_argument("--rounds", type=int, default=11, help="interleaved rounds per group")
    parser.add_argument("--threads", type=int, default=1, help="threads per ONNX Runtime call")
    parser.add_argument("--work", type=Path, help="where exports are written and reused (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for frontier.json, .md and .png")
    args = parser.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    if args.rounds < 3 or min(args.batches) < 1 or any(d < 1 for d in args.base_layers or []):
        parser.error("--rounds must be >= 3, batches >= 1 and --base-layers >= 1")
    configure_logging()
    set_threads(args.threads)
    ort.set_default_logger_severity(3)
    try:
        with tempfile.TemporaryDirectory(prefix="dide-frontier-") as tmp:
            work = args.work or Path(tmp)
            work.mkdir(parents=True, exist_ok=True)
            report = {
                **header("frontier", argv, quick=False, threads=args.threads, provider="CPUExecutionProvider"),
                "trained": trained(args, work),
            }
            if not args.no_base:
                report["base"] = base(args, work, report["trained"])
    except FrontierError as e:
        print(f"bench.frontier: {e}", file=sys.stderr)
        return 2
    report["analysis"] = analyse(report)
    write_results(args.out, "frontier", report, markdown, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
