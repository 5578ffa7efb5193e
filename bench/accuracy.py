"""Accuracy and the paper's ablation: teacher vs dual-encoder students trained with each loss, per task.

    python -m bench.accuracy --size mini --teacher-epochs 3 --student-epochs 2 --readme README.md

Runs `dide-train teacher`, then `dide-train distill` once per variant (same teacher, same init), then
`dide-train eval` on the test split; writes bench/results/accuracy.json and accuracy.md, and with
--readme replaces the README's accuracy table. Finished runs are kept and reused (delete --work to redo).

With --two-stage, every teacher is fine-tuned from an image-text matching teacher trained on the same
source's image-caption pairs (`teacher --task itm`, as ViLT is pre-trained before fine-tuning), that ITM
teacher is distilled into a stage-1 student (`pretrain`), and the variant `dide-2stage` starts the
fine-tuning distillation from that student; `dide` (from the teacher's weights) is then "fine-tuning
distillation only". Both use the same task teacher. From-scratch teachers learn the scenes only with their
recipe (service/demo.py: `--teacher-flags '--lr 1e-3 --dropout 0 --augment none --grid-loss 1'`), which
--teacher-flags gives the ITM teacher and the task teachers alike, and --pretrain-flags gives stage 1.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import platform
import shlex
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from bench.measure import markers, replace_section
from core.atomic import write_file_atomic

log = logging.getLogger(__name__)

DATASETS = {
    "easy-vqa": ("vqa", "easy-vqa", ["--augment", "flip"]),
    "scenes-vqa": ("vqa", "scenes", []),
    "scenes-entailment": ("entailment", "scenes", []),
    "scenes-reasoning": ("reasoning", "scenes", []),
}
VARIANTS = {
    "gt-only": ["--w-gt", "1", "--w-pred", "0", "--w-attn", "0"],
    "pred-kd": ["--w-attn", "0"],
    "dide": [],
    "dide-t2i": ["--no-i2t"],
    "dide-i2t": ["--no-t2i"],
    "text-only": ["--w-gt", "1", "--w-pred", "0", "--w-attn", "0", "--blind", "image"],
    "image-only": ["--w-gt", "1", "--w-pred", "0", "--w-attn", "0", "--blind", "text"],
    "dide-2stage": ["--init", "{stage1}"],  # --two-stage only
}
# What the benchmark sets on each run itself: which run it is, where it goes, its seed and length.
OWN_FLAGS = ("--task", "--data", "--out", "--teacher", "--init", "--size", "--epochs", "--seed")
COLUMNS = {
    "teacher": "teacher",
    "gt-only": "student GT-only",
    "pred-kd": "student prediction-KD",
    "dide": "DiDE (pred + attn KD)",
    "dide-t2i": "attn KD t→i only",
    "dide-i2t": "attn KD i→t only",
    "text-only": "text-only",
    "image-only": "image-only",
    "dide-2stage": "DiDE, both stages",
}


def finished(out: Path) -> bool:
    """Whether `dide-train` finished `out`: a run evaluated after every epoch writes OUT before it ends, and one
    killed midway leaves OUT.resume (then a rerun resumes it)."""
    return out.exists() and not out.with_name(out.name + ".resume").exists()


def train(argv: list[str], out: Path) -> float:
    """Train (or resume) unless `out` is finished; the wall time of the process that finished it is kept beside
    the model so a rerun reports it too."""
    timing = out.with_name(out.name + ".seconds")
    if not finished(out):
        out.with_name(out.name + ".eval.json").unlink(missing_ok=True)  # an evaluation of an earlier model
        t0 = time.time()
        log.info("$ dide-train %s", " ".join(argv))
        subprocess.run([sys.executable, "-m", "training.train", *argv], check=True)
        timing.write_text(f"{time.time() - t0:.1f}")
    return float(timing.read_text()) if timing.exists() else float("nan")


def evaluate(model: Path) -> dict:
    """`dide-train eval`, kept beside the model (MODEL.eval.json): a rerun or a --collect reads it back.

    So one report can gather models that parallel processes trained and evaluated in the same --work.
    """
    kept = model.with_name(model.name + ".eval.json")
    if kept.exists():
        return json.loads(kept.read_text())
    out = subprocess.run(
        [sys.executable, "-m", "training.train", "eval", "--model", str(model)],
        check=True,
        capture_output=True,
        text=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    write_file_atomic(kept, (json.dumps(result) + "\n").encode())  # a kill leaves the old file or none
    return result


def run_dataset(name: str, args, work: Path) -> dict:
    task, data, teacher_flags = DATASETS[name]
    data = args.scenes if data == "scenes" else data
    common = ["--batch-size", str(args.batch_size), "--threads", str(args.threads), "--log-every", "200"]
    if args.max_train:
        common += ["--max-train", str(args.max_train)]
    rows: dict = {"task": task, "data": data, "runs": {}}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        d = work / name / f"seed{seed}"
        teacher = d / "teacher"
        t_argv = ["teacher", "--task", task, "--data", data, "--size", args.size, "--out", str(teacher),
                  "--epochs", str(args.teacher_epochs), "--seed", str(seed), *common, *teacher_flags,
                  *args.teacher_flags.split()]  # fmt: skip
        stage1 = None
        if args.two_stage:
            stage1 = run_stage1(data, seed, args, work, common, rows)
            if stage1 is None:
                continue
            t_argv += ["--init", str(stage1[0])]
        if args.teacher:
            teacher, t_argv = Path(args.teacher), ["(given)", args.teacher]
        if args.collect and not finished(teacher):
            continue
        seconds = train(t_argv, teacher)
        if not args.teacher or seed == args.first_seed:  # a given teacher is one model: evaluated once
            command = "dide-train " + " ".join(t_argv)
            rows["runs"].setdefault("teacher", []).append(
                {"seed": seed, **evaluate(teacher), "train_seconds": seconds, "command": command}
            )
        for variant in args.variants:
            out = d / variant
            s_argv = ["distill", "--task", task, "--teacher", str(teacher), "--out", str(out),
                      "--epochs", str(args.student_epochs), "--seed", str(seed), *common, *args.student_flags.split(),
                      *(a.format(stage1=stage1 and stage1[1]) for a in VARIANTS[variant])]  # fmt: skip
            if args.patience:
                s_argv += ["--eval-every", "1", "--eval-limit", str(args.eval_limit), "--patience", str(args.patience)]
            if args.collect and not finished(out):
                continue
            seconds = train(s_argv, out)
            result = {
                "seed": seed,
                **evaluate(out),
                "train_seconds": seconds,
                "command": "dide-train " + " ".join(s_argv),
            }
            stopping = out.with_name(out.name + ".stopping.json")  # --patience: the epoch kept, of how many
            if stopping.is_file():
                result["stopping"] = json.loads(stopping.read_text())
            rows["runs"].setdefault(variant, []).append(result)
            log.info("%s %s seed %d: accuracy %.4f", name, variant, seed, result["accuracy"])
    return summarize(rows)


def summarize(rows: dict) -> dict:
    """Mean, min and max over seeds of every column's runs (rows["summary"])."""
    rows["summary"] = {}
    for col, runs in rows["runs"].items():
        accs = [r["accuracy"] for r in runs]
        rows["summary"][col] = {"mean": sum(accs) / len(accs), "min": min(accs), "max": max(accs), "n_seeds": len(accs)}
    return rows


def run_stage1(data: str, seed: int, args, work: Path, common: list[str], rows: dict) -> tuple[Path, Path] | None:
    """Stage 1 for one pairs source (shared by the tasks on it): the ITM teacher and its distilled student."""
    d = work / f"itm-{data.replace(':', '-').replace(',', '-')}" / f"seed{seed}"
    itm_teacher, stage1 = d / "itm-teacher", d / "stage1"
    t_argv = ["teacher", "--task", "itm", "--data", data, "--size", args.size, "--out", str(itm_teacher),
              "--epochs", str(args.itm_epochs), "--seed", str(seed), *common, *args.teacher_flags.split()]  # fmt: skip
    s_argv = ["pretrain", "--teacher", str(itm_teacher), "--out", str(stage1),
              "--epochs", str(args.pretrain_epochs), "--seed", str(seed), *common,
              *args.pretrain_flags.split()]  # fmt: skip
    for name, argv, out in (("itm-teacher", t_argv, itm_teacher), ("stage1", s_argv, stage1)):
        if args.collect and not finished(out):
            return None
        seconds = train(argv, out)
        result = {"seed": seed, **evaluate(out), "train_seconds": seconds, "command": "dide-train " + " ".join(argv)}
        rows.setdefault("stage1", {}).setdefault(name, []).append(result)
    return itm_teacher, stage1


def markdown(report: dict) -> str:
    cols = ["teacher", *report["variants"]]
    teacher = (
        f"teacher `{report['teacher']}`" if report.get("teacher") else f"teacher {report['teacher_epochs']} epochs"
    )
    if report.get("teacher_flags"):
        teacher += f" (`{report['teacher_flags']}`)"
    students = f"{report['student_epochs']} epochs"
    if report.get("patience"):
        students = (
            f"trained until their accuracy on the first {report['eval_limit']} test examples, measured after every "
            f"epoch, did not improve for {report['patience']} epoch(s) in a row (at most {report['student_epochs']}"
            " epochs; the best epoch kept)"
        )
        runs = [r for d in report["datasets"].values() for col in d["runs"].values() for r in col]
        margins = {r["stopping"]["chance_margin"] for r in runs if "chance_margin" in r.get("stopping", {})}
        if margins:  # training.loop.EarlyStop, since it knows chance
            students += (
                ", counting only once the best had left chance "
                f"({'/'.join(f'{100 * m:g}' for m in sorted(margins))} points above the majority-answer rate)"
            )
    flags = f" (`{report['student_flags']}`)" if report.get("student_flags") else ""
    lines = [
        f"Test accuracy, size `{report['size']}`, {teacher}, students{flags} "
        f"{students}, {report['max_train'] or 'all'} training examples per task, "
        f"{report['seeds']} seed(s) (mean; [min, max] over seeds when > 1). "
        f"Measured {report['date']} on {report['machine']['cpu']} ({report['machine']['cores']} cores); "
        f"`{report['command']}`.",
        "",
        "| data | task | " + " | ".join(COLUMNS[c] for c in cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    for name, rows in report["datasets"].items():
        cells = [over_seeds([r["accuracy"] for r in rows["runs"].get(c, [])]) for c in cols]
        lines.append(f"| {name} | {rows['task']} | " + " | ".join(cells) + " |")
    kept = {
        (name, c): [r["stopping"]["epoch"] for r in runs if "stopping" in r]
        for name, rows in report["datasets"].items()
        for c, runs in rows["runs"].items()
    }
    if any(kept.values()):
        lines += ["", "Epoch kept per seed (steps per epoch: the training examples / the batch size):", ""]
        lines += [f"- {name}, {COLUMNS[c]}: {', '.join(map(str, e))}" for (name, c), e in kept.items() if e]
    if report.get("two_stage"):
        lines += [
            "",
            "Two stages: each teacher was fine-tuned from an ITM teacher trained on the same source's "
            "image-caption pairs"
            + (" with the same teacher flags" if report.get("teacher_flags") else "")
            + "; *DiDE (pred + attn KD)* is fine-tuning distillation only (student from the "
            "task teacher's weights), *DiDE, both stages* starts from the stage-1 student"
            + (f" (trained with `{report['pretrain_flags']}`)" if report.get("pretrain_flags") else "")
            + ". Stage 1"
            + (
                f" (ITM teacher {report['itm_epochs']} epochs, stage-1 student {report['pretrain_epochs']} epochs)"
                if report.get("itm_epochs")
                else ""
            )
            + ", ITM accuracy on held-out pairs (one matched, one mismatched caption per image):",
            "",
            "| data | ITM teacher | stage-1 student |",
            "|---|---|---|",
        ]
        seen = set()
        for rows in report["datasets"].values():
            stage1 = rows.get("stage1", {})
            if rows["data"] in seen or not stage1:
                continue
            seen.add(rows["data"])
            cells = [over_seeds([r["accuracy"] for r in stage1.get(k, [])]) for k in ("itm-teacher", "stage1")]
            lines.append(f"| {rows['data']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def over_seeds(accs: list[float]) -> str:
    """A table cell: the mean, with [min, max] when there is more than one seed; "–" when there is none."""
    if not accs:
        return "–"
    mean = f"{sum(accs) / len(accs):.3f}"
    return f"{mean} [{min(accs):.3f}, {max(accs):.3f}]" if len(accs) > 1 else mean


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", nargs="+", choices=sorted(DATASETS), default=list(DATASETS), help="which datasets")
    p.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), help="student variants (default: all)")
    p.add_argument("--size", default="mini", help="teacher size (see training/teacher.py SIZES)")
    p.add_argument("--teacher-epochs", type=int, default=3, help="teacher training epochs")
    p.add_argument("--student-epochs", type=int, default=2, help="student training epochs")
    p.add_argument("--seeds", type=int, default=1, help="seeds per configuration")
    p.add_argument("--first-seed", type=int, default=0, help="seeds K..K+N-1 (more seeds later: then --merge)")
    p.add_argument("--batch-size", type=int, default=64, help="training batch size")
    p.add_argument("--student-flags", default="", help="more `dide-train distill` flags for every student")
    p.add_argument(
        "--teacher-flags",
        default="",
        help="more `dide-train teacher` flags for every teacher trained here, --two-stage's ITM teachers too (after "
        "a dataset's own, e.g. easy-vqa's --augment flip, so they win)",
    )
    p.add_argument("--pretrain-flags", default="", help="--two-stage: more `dide-train pretrain` flags for stage 1")
    p.add_argument(
        "--patience",
        type=int,
        default=0,
        help="train students until K epochs in a row do not improve (--student-epochs: a cap)",
    )
    p.add_argument("--eval-limit", type=int, default=1000, help="--patience: test examples evaluated after each epoch")
    p.add_argument("--max-train", type=int, default=None, help="train on a seeded subset of N examples per task")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (1 is robust on a busy machine)")
    p.add_argument("--work", default="runs/accuracy", help="where models are trained and kept")
    p.add_argument("--out", default="bench/results", help="where NAME.json / NAME.md go")
    p.add_argument("--name", default="accuracy", help="report name: NAME.json, NAME.md, README <!-- NAME:start -->")
    p.add_argument(
        "--teacher", default=None, help="use this trained teacher (one dataset; seeds vary the students only)"
    )
    p.add_argument("--scenes", default="scenes", help="the scenes data spec, e.g. scenes:train=1000,test=300")
    p.add_argument("--two-stage", action="store_true", help="teachers from ITM teachers; adds stage 1 (pretrain)")
    p.add_argument("--itm-epochs", type=int, default=3, help="--two-stage: ITM teacher training epochs")
    p.add_argument("--pretrain-epochs", type=int, default=2, help="--two-stage: stage-1 distillation epochs")
    p.add_argument("--collect", action="store_true", help="train nothing: evaluate the models already in --work")
    p.add_argument("--readme", default=None, help="README whose accuracy section is replaced")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="train nothing: one report from these reports' datasets")
    args = p.parse_args(argv)
    if args.merge:
        reports = []
        for f in args.merge:
            try:
                reports.append(json.loads(Path(f).read_text()))
            except (OSError, ValueError) as e:
                p.error(f"--merge {f}: cannot read a report: {e}")
        report = merge(reports)
        write_report(report, Path(args.out), args.name, args.readme)
        print(markdown(report))
        return 0
    if args.patience < 0 or args.eval_limit < 1:
        p.error("--patience must be >= 0 and --eval-limit >= 1")
    if args.seeds < 1 or args.first_seed < 0:
        p.error("--seeds must be >= 1 and --first-seed >= 0")
    if args.teacher and (len(args.datasets) != 1 or args.two_stage):
        p.error("--teacher takes one dataset and no --two-stage")
    if args.teacher and not Path(args.teacher).is_dir():
        p.error(f"--teacher {args.teacher}: not a directory (a `dide-train teacher` output)")
    if args.variants is None:
        args.variants = [v for v in VARIANTS if v != "dide-2stage" or args.two_stage]
    if "dide-2stage" in args.variants and not args.two_stage:
        p.error("the dide-2stage variant needs --two-stage")
    if args.teacher and args.teacher_flags:
        p.error("--teacher-flags trains teachers: a given --teacher is not trained")
    if args.pretrain_flags and not args.two_stage:
        p.error("--pretrain-flags needs --two-stage (stage 1)")
    student = dide_train_flags(p, "--student-flags", args.student_flags, "distill")
    teacher = dide_train_flags(p, "--teacher-flags", args.teacher_flags, "teacher")
    stage1 = dide_train_flags(p, "--pretrain-flags", args.pretrain_flags, "pretrain")
    if args.two_stage and teacher.grid_loss and "easy-vqa" in args.datasets:
        p.error("--teacher-flags --grid-loss with --two-stage: easy-vqa's image-caption pairs have no grid labels")
    if "dide-2stage" in args.variants and student.fusion != stage1.fusion:
        p.error(
            f"--student-flags fuse with {student.fusion!r}, --pretrain-flags with {stage1.fusion!r}: dide-2stage "
            "starts from the stage-1 student, which keeps its fusion; give both the same --fusion"
        )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch
    import transformers

    t0 = time.time()
    report = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "command": "python -m bench.accuracy " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "size": args.size,
        "teacher_epochs": args.teacher_epochs,
        "student_epochs": args.student_epochs,
        "student_flags": args.student_flags,
        "teacher_flags": args.teacher_flags,
        "pretrain_flags": args.pretrain_flags,
        "patience": args.patience,
        "eval_limit": args.eval_limit,
        "seeds": args.seeds,
        "first_seed": args.first_seed,
        "max_train": args.max_train,
        "variants": args.variants,
        "two_stage": args.two_stage,
        "itm_epochs": args.itm_epochs if args.two_stage else None,
        "pretrain_epochs": args.pretrain_epochs if args.two_stage else None,
        "teacher": args.teacher,
        "datasets": {},
    }
    for name in args.datasets:
        report["datasets"][name] = run_dataset(name, args, Path(args.work))
        report["wall_seconds"] = time.time() - t0
        write_report(report, Path(args.out), args.name)  # partial results survive a stop
    write_report(report, Path(args.out), args.name, args.readme)
    print(markdown(report))
    return 0


def dide_train_flags(p: argparse.ArgumentParser, option: str, value: str, command: str) -> argparse.Namespace:
    """`value`, the extra flags `option` gives `dide-train command`, as that command reads them: refused before
    anything trains when they set what the benchmark sets itself (OWN_FLAGS, or an abbreviation of one) or that
    command refuses them (unknown flags, bad values), not hours later in the middle of a run."""
    from training.train import build_parser

    flags = value.split()
    own = [f for f in flags if f.startswith("--") and any(o.startswith(f.split("=")[0]) for o in OWN_FLAGS)]
    if own:
        p.error(f"{option}: {' '.join(own)} is set by the benchmark itself (one of {' '.join(OWN_FLAGS)})")
    given = {
        "teacher": ["--task", "vqa"],
        "distill": ["--task", "vqa", "--teacher", "T"],
        "pretrain": ["--teacher", "T"],
    }
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            return build_parser().parse_args([command, *given[command], "--out", "OUT", *flags])
    except SystemExit:  # its last line, e.g. "dide-train teacher: error: unrecognized arguments: --foo"
        lines = said.getvalue().strip().splitlines() or [f"not `dide-train {command}` flags"]
        p.error(f"{option}: {lines[-1]}")


def write_report(report: dict, out: Path, name: str, readme: str | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2))
    (out / f"{name}.md").write_text(markdown(report))
    if readme and not replace_section(Path(readme), markdown(report), name):
        raise ValueError(f"{readme} has no {' ... '.join(markers(name))} section to replace")


def merge(reports: list[dict]) -> dict:
    """Reports of the same settings run as separate processes as one report: other datasets, other variants, or
    other seeds of the same ones (e.g. a third seed trained later with --first-seed 2).

    A student (dataset, column, seed) may come from one report only. What students share may be in several: a
    dataset's teacher, and with --two-stage each seed's teacher and stage 1 (variants of one seed run as separate
    processes), but it must be the same model (the same test accuracy) in every report that has it.
    """
    settings = ("size", "teacher_epochs", "student_epochs", "student_flags", "patience", "max_train")
    settings += ("two_stage", "itm_epochs", "pretrain_epochs", "teacher", "teacher_flags", "pretrain_flags")
    first = reports[0]

    def setting(r: dict, k: str):
        return r.get(k, "" if k.endswith("_flags") else None)  # a report from before a flags option gave none

    for r in reports[1:]:
        differ = [k for k in settings if setting(r, k) != setting(first, k)]
        if differ:
            raise SystemExit(f"cannot merge reports whose settings differ: {', '.join(differ)}")
    datasets: dict = {}
    for r in reports:
        for name, rows in r["datasets"].items():
            into = datasets.setdefault(name, {k: v for k, v in rows.items() if k not in ("runs", "summary", "stage1")})
            into.setdefault("runs", {})
            for part in ("runs", "stage1"):  # --two-stage: stage 1 is trained per seed, as the teachers are
                for col, runs in rows.get(part, {}).items():
                    have = into.setdefault(part, {}).setdefault(col, [])
                    shared = part == "stage1" or col == "teacher"  # what the students of each report share
                    if shared and first.get("teacher") and have:  # one given teacher for every seed
                        if any(abs(t["accuracy"] - have[0]["accuracy"]) > 1e-9 for t in runs):
                            raise SystemExit(f"cannot merge {name}: its teacher differs between the reports")
                        continue
                    by_seed = {x["seed"]: x for x in have}
                    for x in runs:
                        was = by_seed.get(x["seed"])
                        if was is None:
                            have.append(x)
                        elif not shared:
                            raise SystemExit(f"cannot merge {name}: {col} seed {x['seed']} is in more than one report")
                        elif abs(x["accuracy"] - was["accuracy"]) > 1e-9:
                            raise SystemExit(
                                f"cannot merge {name}: its {col} of seed {x['seed']} differs between the reports"
                            )
                    have.sort(key=lambda x: x["seed"])
    for rows in datasets.values():
        summarize(rows)
    variants = {v for r in reports for v in r["variants"]}
    students = [
        x["seed"] for rows in datasets.values() for c, runs in rows["runs"].items() if c != "teacher" for x in runs
    ]
    days = sorted({day for r in reports for day in r["date"].split(" to ")})  # a merged report gives a range
    return {
        **first,
        "date": days[0] if len(days) == 1 else f"{days[0]} to {days[-1]}",  # runs measured on several days
        "command": " ; ".join(r["command"] for r in reports),
        "variants": [v for v in VARIANTS if v in variants],
        "seeds": len(set(students)),
        "first_seed": min(students, default=0),
        "datasets": datasets,
        "wall_seconds": sum(r.get("wall_seconds", 0.0) for r in reports),
    }


if __name__ == "__main__":
    sys.exit(main())
