"""The GPU check: does ONNX Runtime's CUDA execution provider run our graphs, and how fast, beside the CPU.

    python -m bench.gpu prepare --graphs DIR [--sizes mini base]    # here, on CPU: export, then strip weights
    python -m bench.gpu run --graphs DIR [--out bench/results]      # on the GPU machine, onnxruntime-gpu

`prepare` exports, for each named size, a random-weight teacher's fusion graph and its student's three
graphs (image tower, text tower, head) with the project's exporters, then moves every float weight of
1,024 or more elements out of the graph into an external-data file and deletes that file: the graphs of
the base size (ViLT-B/32: 12 layers, 768 wide, 384 px, ~150 tokens) shrink from ~1 GB to under 1 MB, so
they can travel to a machine with no network. `run` writes those weights back as random floats (the
timings do not depend on the values) and then, on the same machine and in one process:

1. checks the CUDA provider: the sessions' provider list, and from one profiled run of every graph how
   many of its kernels ran on CUDA and which ran on the CPU;
2. loads the demo's bundles (service/demo_models, real weights, sha256-verified) through
   export.runtime.Bundle as the service does, with the default providers, and compares their logits on
   CUDA with the CPU's on the same inputs (the provider's default TF32 matmuls included);
3. times, per size, the teacher's fusion forward, the student's request with the image embedding cached
   (text tower + head) and the image tower alone, at batch 1 (latency) and at a large batch
   (throughput, what filling the embedding cache costs), on CUDA and on the machine's CPU (all its
   cores), interleaved in rounds so that every ratio is measured side by side. Inputs are plain numpy
   arrays, as the service passes them: host-device copies are in the times.

Writes gpu.json, gpu.md and gpu.png under --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, numpy_helper
from onnx.external_data_helper import set_external_data

from bench.measure import RESULTS, configure_logging, header, interleaved, paired_ratio, save_figure, write_results

log = logging.getLogger(__name__)

TEACHER, IMAGE, TEXT, HEAD = "teacher.onnx", "image_encoder.onnx", "text_encoder.onnx", "head.onnx"
GRAPHS = (TEACHER, IMAGE, TEXT, HEAD)
REQUEST = "request.json"
MIN_EXTERNAL = 1024  # float initializers this large travel without their values; smaller ones (scalars) stay
WEIGHT_STD = 0.02  # the random weights written back: ViLT's initializer range
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
LARGE_BATCH = {"tiny": 64, "mini": 512, "small": 512, "base": 128}  # the throughput batch, per size
DEMO_MODELS = Path(__file__).resolve().parent.parent / "service" / "demo_models"


def strip_weights(path: Path) -> int:
    """Move the graph's large float initializers to external data `<name>.weights`, not written; return its bytes."""
    model = onnx.load(str(path))
    location, offset = f"{path.name}.weights", 0
    for tensor in model.graph.initializer:
        if tensor.data_type != TensorProto.FLOAT or int(np.prod(tensor.dims)) < MIN_EXTERNAL:
            continue
        values = numpy_helper.to_array(tensor)
        n = values.nbytes
        tensor.ClearField("float_data")
        tensor.raw_data = values.tobytes()  # set_external_data wants raw_data there, then it is dropped
        set_external_data(tensor, location=location, offset=offset, length=n)
        tensor.data_location = TensorProto.EXTERNAL
        tensor.ClearField("raw_data")
        offset += n
    onnx.save(model, str(path))
    return offset


def write_random_weights(path: Path, seed: int = 0) -> int:
    """Write the external-data file a stripped graph names: random normal floats (std WEIGHT_STD); return its bytes."""
    model = onnx.load(str(path), load_external_data=False)
    end = 0
    for tensor in model.graph.initializer:
        if tensor.data_location == TensorProto.EXTERNAL:
            info = {e.key: e.value for e in tensor.external_data}
            end = max(end, int(info.get("offset", 0)) + int(info["length"]))
    if end == 0:
        return 0
    rng = np.random.default_rng(seed)
    block = 1 << 24  # floats per write
    with open(path.with_name(f"{path.name}.weights"), "wb") as f:
        left = end // 4
        while left:
            n = min(block, left)
            f.write((rng.standard_normal(n, dtype=np.float32) * WEIGHT_STD).tobytes())
            left -= n
    return end


def prepare(sizes: list[str], graphs: Path) -> None:
    """Export each size's random-weight teacher and student graphs into graphs/SIZE, weights stripped."""
    from bench.models import build_models, real_request  # torch, transformers, easy-vqa: here only
    from export.onnx_export import export_graphs
    from export.teacher_export import export_teacher_graph

    for size in sizes:
        models = build_models(size)
        out = graphs / size
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            export_graphs(models.student, Path(tmp))
            for name in (IMAGE, TEXT, HEAD):
                shutil.copyfile(Path(tmp) / name, out / name)
        export_teacher_graph(models.teacher, out / TEACHER)
        weights = {name: strip_weights(out / name) for name in GRAPHS}
        request = real_request(models.text, models.teacher.config.image_size)
        n = request.tokens
        (out / REQUEST).write_text(
            json.dumps(
                {
                    "size": size,
                    "question": request.question,
                    "input_ids": request.input_ids[0, :n].tolist(),  # trimmed to its own tokens, as the service does
                    "image_size": models.teacher.config.image_size,
                    "dim": models.student.config.hidden_size,
                    "weight_bytes": weights,
                },
                indent=2,
            )
        )
        log.info("%s: graphs in %s; %.0f MB of weights stripped", size, out, sum(weights.values()) / 1e6)


def gpu_name() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"unknown ({e})"


def kernels_by_provider(session: ort.InferenceSession, feeds: dict) -> dict:
    """Run a profiled session once; count its kernels per provider and name the CPU ones."""
    session.run(None, feeds)
    trace = Path(session.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    counts: dict[str, int] = {}
    on_cpu: set[str] = set()
    for e in events:
        provider = e.get("args", {}).get("provider")
        if e.get("cat") == "Node" and provider and e["name"].endswith("_kernel_time"):
            counts[provider] = counts.get(provider, 0) + 1
            if provider == CPU:
                on_cpu.add(e["args"].get("op_name", "?"))
    return {"kernels": counts, "cpu_ops": sorted(on_cpu)}


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / max(np.linalg.norm(b.astype(np.float64)), 1e-30))


def check_demo_bundles(bundles: Path, accel: str) -> list[dict]:
    """The service's own loading path on CUDA: provider picked, logits beside the CPU's on the same inputs."""
    from export.runtime import Bundle, default_providers

    rows = []
    rng = np.random.default_rng(0)
    for directory in sorted(p for p in bundles.iterdir() if (p / "manifest.json").is_file()):
        gpu = Bundle.load(directory)
        if gpu.provider != accel:  # onnxruntime falls back to the CPU when the provider's libraries fail to load
            raise SystemExit(f"{directory}: the service's loader picked {gpu.provider}, not {accel}; see the log above")
        cpu = Bundle.load(directory, [CPU])
        size = gpu.image_spec.size
        pixels = rng.standard_normal((8, 3, size, size), dtype=np.float32)
        texts = (["what color is the circle?", "is there a red square?", "there are two circles."] * 3)[:8]
        out = {}
        for name, b in (("gpu", gpu), ("cpu", cpu)):
            image = b.encode_images(pixels)
            text = b.encode_texts(texts)
            second = image[::-1].copy() if b.task == "reasoning" else None
            out[name] = (image, b.head(text, image, second))
        rows.append(
            {
                "bundle": directory.name,
                "default_providers": default_providers(),
                "provider": gpu.provider,
                "image_embedding_rel_diff": rel_diff(out["gpu"][0], out["cpu"][0]),
                "logits_rel_diff": rel_diff(out["gpu"][1], out["cpu"][1]),
                "argmax_agree": float(np.mean(out["gpu"][1].argmax(1) == out["cpu"][1].argmax(1))),
            }
        )
        log.info("demo bundle %s: %s", directory.name, rows[-1])
    return rows


def run(graphs: Path, bundles: Path, out: Path, rounds: int, accel: str, argv: list[str]) -> dict:
    if hasattr(ort, "preload_dlls"):  # the CUDA and cuDNN libraries of the nvidia-* wheels beside torch
        ort.preload_dlls()
    available = ort.get_available_providers()
    log.info("onnxruntime %s, device %s, providers %s", ort.__version__, ort.get_device(), available)
    report = header("gpu", argv, quick=False, threads=None, provider=accel)
    report["machine"]["gpu"] = gpu_name()
    report["onnxruntime"] = {"version": ort.__version__, "device": ort.get_device(), "available_providers": available}
    if accel not in available:
        raise SystemExit(f"this onnxruntime ({ort.__version__}) has no {accel}: {available}")
    report["demo_bundles"] = check_demo_bundles(bundles, accel)
    report["sizes"] = []
    for size_dir in size_dirs(graphs):
        report["sizes"].append(measure_size(size_dir, rounds, accel))
        write_json_now(out, report)
    return report


def size_dirs(graphs: Path) -> list[Path]:
    """The SIZE folders `prepare` wrote under `graphs`."""
    return sorted(p for p in graphs.iterdir() if (p / REQUEST).is_file())


def write_json_now(out: Path, report: dict) -> None:
    """The report so far, so a run stopped at its time limit still brings back what it measured."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.partial.json").write_text(json.dumps(report, indent=2))


def measure_size(size_dir: Path, rounds: int, accel: str) -> dict:
    request = json.loads((size_dir / REQUEST).read_text())
    size, dim, S = request["size"], request["dim"], request["image_size"]
    t0 = time.perf_counter()
    for i, name in enumerate(GRAPHS):
        write_random_weights(size_dir / name, seed=i)
    log.info("%s: random weights written in %.1f s", size, time.perf_counter() - t0)

    def session(name: str, provider: str, profile: bool = False) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.enable_profiling = profile
        if profile:
            options.profile_file_prefix = str(size_dir / f"profile-{name}")
        providers = [provider, CPU] if provider != CPU else [CPU]
        return ort.InferenceSession(str(size_dir / name), options, providers=providers)

    sessions = {tag: {name: session(name, p) for name in GRAPHS} for tag, p in (("gpu", accel), ("cpu", CPU))}
    result: dict = {
        "size": size,
        "question": request["question"],
        "tokens": len(request["input_ids"]),
        "image_size": S,
        "weights_mb": round(sum(request["weight_bytes"].values()) / 1e6, 1),
        "providers": {name: sessions["gpu"][name].get_providers() for name in GRAPHS},
        "provider_options": sessions["gpu"][TEACHER].get_provider_options().get(accel, {}),
    }
    rng = np.random.default_rng(1)

    def inputs(batch: int) -> dict[str, dict]:
        ids = np.repeat(np.array([request["input_ids"]], np.int64), batch, 0)
        mask = np.ones_like(ids)
        pixels = rng.standard_normal((batch, 3, S, S), dtype=np.float32)
        image_emb = rng.standard_normal((batch, dim), dtype=np.float32)
        text_emb = rng.standard_normal((batch, dim), dtype=np.float32)
        return {
            TEACHER: {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels},
            IMAGE: {"pixels": pixels},
            TEXT: {"input_ids": ids, "attention_mask": mask},
            HEAD: {"text_embedding": text_emb, "image_embedding": image_emb},
        }

    one = inputs(1)
    result["placement"] = {name: kernels_by_provider(session(name, accel, profile=True), one[name]) for name in GRAPHS}
    parity = {}
    for name in GRAPHS:
        a = sessions["gpu"][name].run(None, one[name])[0]
        b = sessions["cpu"][name].run(None, one[name])[0]
        parity[name] = rel_diff(a, b)
    result["gpu_vs_cpu_rel_diff"] = parity
    log.info("%s: placement %s, parity %s", size, result["placement"], parity)

    def variants(feeds: dict[str, dict]) -> dict[str, Callable[[], object]]:
        fns = {}
        for tag, s in sessions.items():

            def request_cached(s=s) -> object:  # the service's request: text tower, then the head
                text = s[TEXT].run(["text_embedding"], feeds[TEXT])[0]
                return s[HEAD].run(None, {"text_embedding": text, "image_embedding": feeds[HEAD]["image_embedding"]})

            fns[f"teacher fusion, {tag}"] = lambda s=s: s[TEACHER].run(None, feeds[TEACHER])
            fns[f"student, image cached, {tag}"] = request_cached
            fns[f"image tower, {tag}"] = lambda s=s: s[IMAGE].run(None, feeds[IMAGE])
        return fns

    result["batches"] = []
    for batch in (1, LARGE_BATCH[size]):
        fns = variants(one if batch == 1 else inputs(batch))
        for fn in fns.values():  # warm-up: CUDA kernels and cuDNN algorithm search for this shape
            fn()
            fn()
        t0 = time.perf_counter()
        samples = interleaved(fns, rounds if batch == 1 else max(3, rounds // 3), 0.05 if batch == 1 else 0.2)
        rows = {}
        for name, s in samples.items():
            median = statistics.median(s)
            rows[name] = {
                "median_ms": 1000 * median,
                "min_ms": 1000 * min(s),
                "max_ms": 1000 * max(s),
                "samples": len(s),
                "items_per_s": batch / median,
            }
        ratios = {}
        for variant in ("teacher fusion", "student, image cached", "image tower"):
            ratios[f"{variant}: cpu / gpu"] = paired_ratio(samples[f"{variant}, cpu"], samples[f"{variant}, gpu"])
        for tag in ("gpu", "cpu"):
            ratios[f"teacher / cached student, {tag}"] = paired_ratio(
                samples[f"teacher fusion, {tag}"], samples[f"student, image cached, {tag}"]
            )
        result["batches"].append({"batch": batch, "variants": rows, "ratios": ratios})
        log.info("%s batch %d: %.1f s; %s", size, batch, time.perf_counter() - t0, ratios)
    return result


def markdown(report: dict) -> str:
    m, o = report["machine"], report["onnxruntime"]
    accel = m["execution_provider"]
    lines = [
        "# GPU check: ONNX Runtime's CUDA provider, beside the CPU",
        "",
        f"- Date: {report['date']}; command: `{report['command']}`",
        f"- GPU: {m['gpu']}; CPU: {m['cpu']}, {m['cores']} cores (all used by the CPU provider)",
        f"- onnxruntime {o['version']} ({o['device']}); providers: {', '.join(o['available_providers'])}; "
        f"the accelerator's side of every table: {accel}",
        "",
        "## The demo's bundles through the service's loader (export.runtime.Bundle, default providers)",
        "",
        "| bundle | provider picked | image embedding, GPU vs CPU (rel. L2) | logits (rel. L2) | same argmax |",
        "|---|---|---|---|---|",
    ]
    for r in report["demo_bundles"]:
        lines.append(
            f"| {r['bundle']} | {r['provider']} | {r['image_embedding_rel_diff']:.1e} | "
            f"{r['logits_rel_diff']:.1e} | {r['argmax_agree']:.0%} |"
        )
    for s in report["sizes"]:
        lines += [
            "",
            f"## Size `{s['size']}` ({s['image_size']} px, {s['tokens']} text tokens, random weights, "
            f"{s['weights_mb']} MB of fp32 weights in all)",
            "",
            f"Kernels per provider in one profiled run on {accel}, and the outputs beside the CPU's:",
            "",
            "| graph | kernels on the GPU | kernels on the CPU (ops) | GPU vs CPU (rel. L2) |",
            "|---|---|---|---|",
        ]
        for name, p in s["placement"].items():
            k = p["kernels"]
            on_cpu = 0 if accel == CPU else k.get(CPU, 0)
            cpu_ops = f"{on_cpu} ({', '.join(p['cpu_ops'])})" if on_cpu else "0"
            lines.append(f"| {name} | {k.get(accel, 0)} | {cpu_ops} | {s['gpu_vs_cpu_rel_diff'][name]:.1e} |")
        for b in s["batches"]:
            lines += [
                "",
                f"Batch {b['batch']} (median of interleaved rounds):",
                "",
                "| variant | GPU ms | CPU ms | GPU items/s | CPU items/s | CPU / GPU |",
                "|---|---|---|---|---|---|",
            ]
            for variant in ("teacher fusion", "student, image cached", "image tower"):
                g, c = b["variants"][f"{variant}, gpu"], b["variants"][f"{variant}, cpu"]
                lines.append(
                    f"| {variant} | {g['median_ms']:.3f} | {c['median_ms']:.3f} | {g['items_per_s']:,.0f} | "
                    f"{c['items_per_s']:,.0f} | {b['ratios'][f'{variant}: cpu / gpu']:.1f}x |"
                )
            lines.append("")
            lines.append(
                f"Teacher / cached student: {b['ratios']['teacher / cached student, gpu']:.1f}x on the GPU, "
                f"{b['ratios']['teacher / cached student, cpu']:.1f}x on the CPU."
            )
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(s["size"], b) for s in report["sizes"] for b in s["batches"]]
    fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 3.6), squeeze=False)
    for ax, (size, b) in zip(axes[0], groups, strict=True):
        names = ("teacher fusion", "student, image cached", "image tower")
        x = np.arange(len(names))
        for i, (tag, colour) in enumerate((("gpu", "tab:green"), ("cpu", "tab:gray"))):
            ms = [b["variants"][f"{n}, {tag}"]["median_ms"] for n in names]
            ax.bar(x + (i - 0.5) * 0.4, ms, 0.4, label=tag.upper(), color=colour)
        ax.set_yscale("log")
        ax.set_xticks(x, ["teacher", "student\n(cached)", "image\ntower"])
        ax.set_title(f"{size}, batch {b['batch']}")
        ax.set_ylabel("ms per call (median)")
        ax.legend()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    pp = sub.add_parser("prepare", help="export random-weight graphs here and strip their weights")
    pp.add_argument("--graphs", type=Path, required=True, help="directory to write SIZE/*.onnx into")
    pp.add_argument("--sizes", nargs="+", default=["mini", "base"], choices=sorted(LARGE_BATCH), help="model sizes")
    pr = sub.add_parser("run", help="on the GPU machine: check the CUDA provider and time CUDA beside the CPU")
    pr.add_argument("--graphs", type=Path, required=True, help="the directory `prepare` wrote")
    pr.add_argument("--bundles", type=Path, default=DEMO_MODELS, help="bundles to load as the service does")
    pr.add_argument("--out", type=Path, default=RESULTS, help="where gpu.json, gpu.md and gpu.png go")
    pr.add_argument("--provider", default=CUDA, help="the accelerator's execution provider (the CPU's, for a dry run)")
    pr.add_argument("--rounds", type=int, default=15, help="interleaved rounds at batch 1 (a third at the large batch)")
    args = p.parse_args(argv)
    configure_logging()
    if args.command == "prepare":
        prepare(args.sizes, args.graphs)
        return 0
    if not args.graphs.is_dir() or not size_dirs(args.graphs):
        p.error(f"--graphs {args.graphs}: no graphs there (run `python -m bench.gpu prepare --graphs DIR` first)")
    if not args.bundles.is_dir():
        p.error(f"--bundles {args.bundles}: no such directory")
    if args.rounds < 3:
        p.error("--rounds must be at least 3")
    report = run(args.graphs, args.bundles, args.out, args.rounds, args.provider, argv)
    write_results(args.out, "gpu", report, markdown, plot)
    (args.out / "gpu.partial.json").unlink(missing_ok=True)
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
