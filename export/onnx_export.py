"""`dide-export`: a student to an ONNX bundle (3 graphs + preprocessing), or --teacher to one graph; parity-checked."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import platform
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import Tensor, nn

import core.bundle as fmt
from core.atomic import atomic_directory
from core.preprocess import ImageSpec, TextEncoder, load_image
from export.runtime import Bundle
from export.search import scan_parity
from export.search_export import export_search_files
from training.examples import images_of, target_of, text_of
from training.student import DualEncoderStudent, load_student

log = logging.getLogger(__name__)

OPSET = 18  # pinned: the bundle's graphs use this opset whatever the torch default becomes
PARITY_TOL = 1e-4  # max |logit difference| allowed between the fp32 graphs and torch
EVAL_SIZE = 1000
EVAL_BATCH = 64
PRECISIONS = ("fp32", "int8", "fp16")


class ExportError(RuntimeError):
    """The exported graphs do not reproduce the torch model closely enough; nothing was written."""


# --- the three graphs ----------------------------------------------------------------------------------


class ImageEncoder(nn.Module):
    def __init__(self, model: DualEncoderStudent) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: Tensor) -> Tensor:
        return self.model.encode_image(pixels)


class TextEncoderGraph(nn.Module):
    def __init__(self, model: DualEncoderStudent) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model.encode_text(input_ids, attention_mask)


class Head(nn.Module):
    def __init__(self, model: DualEncoderStudent) -> None:
        super().__init__()
        self.model = model

    def forward(self, text_embedding: Tensor, image_embedding: Tensor, image_embedding_2: Tensor | None = None):
        return self.model.head(text_embedding, image_embedding, image_embedding_2)


def export_graph(
    module: nn.Module,
    args: tuple[Tensor, ...],
    path: Path,
    input_names: tuple[str, ...],
    output: str,
    seq_inputs: tuple[str, ...] = (),
) -> None:
    """Export one graph with a dynamic batch axis on every input and the output, and a dynamic sequence axis
    (dim 1) on `seq_inputs`.

    The TorchScript exporter (dynamo=False): with torch pinned at 2.13 it gives the same graphs and
    parity as the torch.export-based one, in ~1 s instead of ~25 s per tiny bundle on a 2-core CPU.
    """
    # Inference mode for the export, and after it: torch.onnx.export restores the wrapper's mode, and a
    # wrapper made in training mode would leave the student's dropout on for the parity checks.
    module.eval()
    dynamic_axes = {name: {0: "batch", 1: "seq"} if name in seq_inputs else {0: "batch"} for name in input_names}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "You are using the legacy TorchScript-based ONNX export", DeprecationWarning)
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=list(input_names),
            output_names=[output],
            opset_version=OPSET,
            dynamo=False,
            dynamic_axes=dynamic_axes | {output: {0: "batch"}},
        )


def export_image_graph(model: DualEncoderStudent, path: Path) -> None:
    """Write the image tower alone as `path` (what the cache runs)."""
    S = model.config.image_size
    with torch.no_grad():
        export_graph(ImageEncoder(model), (torch.zeros(2, 3, S, S),), path, fmt.IMAGE_INPUTS, fmt.IMAGE_OUTPUT)


def export_graphs(model: DualEncoderStudent, directory: Path) -> None:
    """Write image_encoder.onnx, text_encoder.onnx and head.onnx (fp32), and the search files, into `directory`."""
    cfg = model.config
    B, L, D = 2, cfg.max_text_len, cfg.hidden_size
    ids = torch.randint(5, cfg.vocab_size, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    with torch.no_grad():
        export_image_graph(model, directory / fmt.IMAGE_ENCODER)
        text_path = directory / fmt.TEXT_ENCODER
        export_graph(TextEncoderGraph(model), (ids, mask), text_path, fmt.TEXT_INPUTS, fmt.TEXT_OUTPUT, fmt.TEXT_INPUTS)
        head_args = (torch.zeros(B, D), torch.zeros(B, D))
        names = fmt.HEAD_INPUTS
        if cfg.task == "reasoning":
            head_args, names = (*head_args, torch.zeros(B, D)), fmt.HEAD_INPUTS_REASONING
        export_graph(Head(model), head_args, directory / fmt.HEAD, names, fmt.HEAD_OUTPUT)
    for name in (fmt.IMAGE_ENCODER, fmt.TEXT_ENCODER, fmt.HEAD):
        onnx.checker.check_model(str(directory / name))
    export_search_files(model, directory)


def model_id_of(model: DualEncoderStudent, spec_dict: dict, image_precision: str) -> str:
    """Name the image-embedding space: image tower weights + its config + preprocessing + precision."""
    cfg = model.config
    h = hashlib.sha256()
    tower_cfg = {
        k: getattr(cfg, k)
        for k in (
            "image_size",
            "patch_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "intermediate_size",
            "layer_norm_eps",
        )
    }
    h.update(
        json.dumps({"tower": tower_cfg, "image": spec_dict, "precision": image_precision}, sort_keys=True).encode()
    )
    for name, tensor in sorted(model.image_tower.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


# --- evaluation samples and comparisons -----------------------------------------------------------------


@dataclass
class Sample:
    """Model inputs for a parity check; `targets` (N, C) scores per label when the sample is labelled."""

    source: str
    texts: list[str] | None  # real samples keep their texts (tokenised by the bundle)
    input_ids: np.ndarray  # (N, L) int64
    attention_mask: np.ndarray
    pixels: np.ndarray  # (N, 3, H, W) float32
    pixels2: np.ndarray | None
    targets: np.ndarray | None


def random_sample(vocab_size: int, image_size: int, two_images: bool, n: int, seq_len: int, seed: int) -> Sample:
    """Uniform pixels in [-1, 1], random token ids and random lengths up to seq_len."""
    rng = np.random.default_rng(seed)
    S = image_size
    ids = rng.integers(5, vocab_size, (n, seq_len)).astype(np.int64)
    lengths = rng.integers(1, seq_len + 1, n)
    mask = (np.arange(seq_len)[None, :] < lengths[:, None]).astype(np.int64)
    ids = np.where(mask == 1, ids, 0)

    def pix() -> np.ndarray:
        return rng.uniform(-1, 1, (n, 3, S, S)).astype(np.float32)

    return Sample(
        f"random (seed {seed}, seq_len {seq_len})",
        None,
        ids,
        mask,
        pix(),
        pix() if two_images else None,
        None,
    )


def real_sample(
    spec: str, n: int, task: str, text: TextEncoder, image_spec: ImageSpec, labels: list[str]
) -> Sample | None:
    """The first n test examples of `spec` (the data the model was trained on) as `task` examples, tokenised
    by `text` and preprocessed by `image_spec`, with targets over `labels`; None (logged) if unavailable."""
    try:
        from training.data import load_data

        data = load_data(spec, task)
    except (ImportError, OSError, ValueError, RuntimeError, KeyError) as e:
        log.warning("real-input parity skipped: cannot load data %r for task %s: %s (use --eval-data)", spec, task, e)
        return None
    examples = (data.test or data.train)[:n]
    if not examples:
        log.warning("real-input parity skipped: data %r has no examples", spec)
        return None
    cache: dict[Path, np.ndarray] = {}

    def pixels(i: int) -> np.ndarray:
        out = []
        for ex in examples:
            path = images_of(ex)[i]
            if path not in cache:
                cache[path] = load_image(path, image_spec)
            out.append(cache[path])
        return np.stack(out)

    texts = [text_of(ex) for ex in examples]
    ids, mask = text(texts)
    split = "test" if data.test else "train"
    return Sample(
        source=f"{spec} {split}[:{len(examples)}]",
        texts=texts,
        input_ids=ids,
        attention_mask=mask,
        pixels=pixels(0),
        pixels2=pixels(1) if task == "reasoning" else None,
        targets=np.array([target_of(ex, labels) for ex in examples], np.float32),
    )


def torch_logits(model: DualEncoderStudent, s: Sample, batch: int = EVAL_BATCH) -> np.ndarray:
    out = []
    with torch.no_grad():
        for a in range(0, len(s.pixels), batch):
            p2 = None if s.pixels2 is None else torch.from_numpy(s.pixels2[a : a + batch])
            logits = model(
                torch.from_numpy(s.input_ids[a : a + batch]),
                torch.from_numpy(s.attention_mask[a : a + batch]),
                torch.from_numpy(s.pixels[a : a + batch]),
                p2,
            )
            out.append(logits.numpy())
    return np.concatenate(out)


def bundle_logits(bundle: Bundle, s: Sample, batch: int = EVAL_BATCH) -> np.ndarray:
    """Logits through the runtime, as the service computes them (texts tokenised by the bundle)."""
    out = []
    for a in range(0, len(s.pixels), batch):
        if s.texts is not None:
            text = bundle.encode_texts(s.texts[a : a + batch])
        else:
            text = bundle.encode_tokens(s.input_ids[a : a + batch], s.attention_mask[a : a + batch])
        image = bundle.encode_images(s.pixels[a : a + batch])
        image2 = None if s.pixels2 is None else bundle.encode_images(s.pixels2[a : a + batch])
        out.append(bundle.head(text, image, image2))
    return np.concatenate(out)


def compare(reference: np.ndarray, got: np.ndarray, targets: np.ndarray | None) -> dict:
    """Max |logit difference|, argmax agreement and (when labelled) both accuracies and their delta."""
    ref_top, got_top = reference.argmax(1), got.argmax(1)
    out = {
        "examples": len(reference),
        "max_abs_logit_diff": float(np.abs(reference - got).max()),
        "argmax_agreement": float((ref_top == got_top).mean()),
    }
    if targets is not None:
        rows = np.arange(len(targets))
        ref_acc, acc = float(targets[rows, ref_top].mean()), float(targets[rows, got_top].mean())
        out.update(reference_accuracy=ref_acc, accuracy=acc, accuracy_delta=acc - ref_acc)
    return out


def check_fp32(stats: dict, what: str) -> None:
    if stats["max_abs_logit_diff"] > PARITY_TOL or stats["argmax_agreement"] < 1.0:
        raise ExportError(
            f"fp32 parity failed on {what}: max |logit diff| {stats['max_abs_logit_diff']:.3g} "
            f"(limit {PARITY_TOL:g}), argmax agreement {stats['argmax_agreement']:.2%} (need 100%)"
        )


@dataclass(frozen=True)
class ExportOptions:
    """dide-export's choices beyond what and where: the precision, and the inputs of the parity checks."""

    precision: str = "fp32"
    eval_data: str | None = None  # data spec of the real-input checks; None: the checkpoint's own data
    eval_size: int = EVAL_SIZE  # examples in the real-input checks
    seed: int = 0  # of the random-input checks


@dataclass
class ParityCheck:
    """What an export's graphs are checked on: random inputs of the model's shapes, and `real` (labelled test
    examples of `data`, None when they could not be loaded)."""

    vocab_size: int
    image_size: int
    two_images: bool
    max_text_len: int
    real: Sample | None
    data: str
    options: ExportOptions

    def random(self, n: int, seq_len: int, seed: int) -> Sample:
        return random_sample(self.vocab_size, self.image_size, self.two_images, n, seq_len, seed)

    def fp32(
        self, reference: Callable[[Sample], np.ndarray], exported: Callable[[Sample, int], np.ndarray]
    ) -> tuple[dict, np.ndarray | None]:
        """Check exported (sample, batch) -> logits against torch's `reference` on random inputs at batch 1, 7
        and 64, full and half text length (the dynamic axes), and on `real`. Raises ExportError on the first
        failure.

        Returns (the figures, for parity["fp32"]; the exported logits of `real`, or None).
        """
        L, seed = self.max_text_len, self.options.seed
        out: dict = {}
        for i, (batch, seq_len) in enumerate(((1, L), (7, L), (EVAL_BATCH, max(1, L // 2)))):
            s = self.random(EVAL_BATCH, seq_len, seed + i)
            stats = compare(reference(s), exported(s, batch), None)
            check_fp32(stats, s.source)
            out[f"random_b{batch}_l{seq_len}"] = {"source": s.source, "batch": batch, **stats}
        if self.real is None:
            out["real"] = {"skipped": f"data {self.data!r} could not be loaded"}
            return out, None
        got = exported(self.real, EVAL_BATCH)
        stats = compare(reference(self.real), got, self.real.targets)
        check_fp32(stats, self.real.source)
        out["real"] = {"source": self.real.source, **stats}
        return out, got

    def against_fp32(
        self,
        fp32: Callable[[Sample], np.ndarray],
        low: Callable[[Sample], np.ndarray],
        fp32_real: np.ndarray | None,
    ) -> tuple[Sample, dict]:
        """The low-precision graphs' agreement with the fp32 ones (and both accuracies when labelled), recorded,
        not required: on `real`, whose fp32 logits fp32() returned as `fp32_real`, else on eval_size random inputs.

        Returns (the sample compared on, the figures).
        """
        s = self.real or self.random(self.options.eval_size, self.max_text_len, self.options.seed)
        reference = fp32_real if fp32_real is not None else fp32(s)
        return s, compare(reference, low(s), s.targets)


# --- writing the bundle --------------------------------------------------------------------------------


def base_manifest(model: DualEncoderStudent, image_spec: ImageSpec, precision: str) -> dict:
    """The manifest fields every bundle of `model` carries, whoever writes it (the exporter adds parity etc.)."""
    cfg = model.config
    return {
        "task": cfg.task,
        "model_id": model_id_of(model, image_spec.to_dict(), "fp16" if precision == "fp16" else "fp32"),
        "dim": cfg.hidden_size,
        "num_labels": cfg.num_labels,
        "max_text_len": cfg.max_text_len,
        "image_size": cfg.image_size,
        "precision": precision,
    }


def provenance() -> dict:
    """Who wrote an export and when (the manifest's or metadata's last fields): library versions and the time."""
    return {
        "exporter": {
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
            "torch_onnx_exporter": "torchscript",
            "python": platform.python_version(),
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def quantize_int8(directory: Path) -> None:
    """ONNX Runtime dynamic int8 quantisation of the text tower and head, in place."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    for name in (fmt.TEXT_ENCODER, fmt.HEAD):
        src = directory / name
        tmp = directory / f"{name}.int8"
        quantize_dynamic(src, tmp, weight_type=QuantType.QInt8)
        tmp.replace(src)


def convert_fp16(directory: Path) -> None:
    """float16 weights and activations in all three graphs (float32 inputs and outputs kept), in place."""
    from onnxconverter_common import float16

    for name in (fmt.IMAGE_ENCODER, fmt.TEXT_ENCODER, fmt.HEAD):
        model = float16.convert_float_to_float16(onnx.load(str(directory / name)), keep_io_types=True)
        # The converter retypes a Cast's output to float16 but leaves the node casting to float32
        # (the attention-mask cast in the text tower); make the node agree with its output type.
        types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
        for node in model.graph.node:
            if node.op_type == "Cast" and types.get(node.output[0]) == onnx.TensorProto.FLOAT16:
                for attr in node.attribute:
                    if attr.name == "to":
                        attr.i = onnx.TensorProto.FLOAT16
        onnx.checker.check_model(model)
        onnx.save(model, str(directory / name))


def export_bundle(student_dir: str | Path, out: str | Path, options: ExportOptions) -> dict:
    """Export, check parity, and atomically write the bundle at `out`; returns its manifest.

    Raises ExportError (and writes nothing) when the fp32 graphs disagree with torch.
    """
    precision = options.precision
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    student_dir = Path(student_dir)
    loaded = load_student(student_dir)
    model, cfg = loaded.model.eval(), loaded.model.config
    torch.manual_seed(options.seed)
    spec = options.eval_data or loaded.data
    real = real_sample(spec, options.eval_size, cfg.task, loaded.text, loaded.image_spec, loaded.labels)
    check = ParityCheck(cfg.vocab_size, cfg.image_size, cfg.task == "reasoning", cfg.max_text_len, real, spec, options)
    cpu = ["CPUExecutionProvider"]
    manifest: dict = {
        **base_manifest(model, loaded.image_spec, precision),
        "opset": OPSET,
        "precision_by_file": {
            fmt.IMAGE_ENCODER: "fp16" if precision == "fp16" else "fp32",
            fmt.TEXT_ENCODER: precision,
            fmt.HEAD: precision,
        },
        "source": {"checkpoint": str(student_dir.resolve()), "checkpoint_sha256": loaded.sha256, "data": loaded.data},
        **provenance(),
    }

    def write(tmp: Path) -> None:
        t0 = time.perf_counter()
        export_graphs(model, tmp)
        log.info("exported three graphs (opset %d) in %.1f s", OPSET, time.perf_counter() - t0)
        fmt.write_metadata(
            tmp,
            tokenizer_json=(student_dir / "tokenizer.json").read_text(),
            image_spec=loaded.image_spec,
            max_text_len=cfg.max_text_len,
            labels=loaded.labels,
        )
        fmt.write_manifest(tmp, {**manifest, "precision": "fp32", "precision_by_file": {}})
        fp32 = Bundle.load(tmp, cpu)
        parity: dict = {"tolerance": PARITY_TOL}
        parity["fp32"], fp32_real = check.fp32(lambda s: torch_logits(model, s), partial(bundle_logits, fp32))
        parity["fp32"]["search"] = scan_parity(fp32, seed=options.seed)  # the scan over cached images vs head.onnx
        check_fp32({**parity["fp32"]["search"], "argmax_agreement": 1.0}, "the search scan")
        log.info("fp32 parity: %s", json.dumps(parity["fp32"]))
        if precision != "fp32":
            (quantize_int8 if precision == "int8" else convert_fp16)(tmp)
            fmt.write_manifest(tmp, {**manifest, "parity": parity})
            low = Bundle.load(tmp, None if precision == "fp16" else cpu)  # fp16 on CUDA when there is one
            s, stats = check.against_fp32(partial(bundle_logits, fp32), partial(bundle_logits, low), fp32_real)
            parity[precision] = {"reference": "fp32 onnx", "source": s.source, "provider": low.provider, **stats}
            if precision == "fp16" and low.provider == "CPUExecutionProvider":
                parity[precision]["note"] = "measured on the CPU execution provider; the bundle is meant for CUDA"
            log.info("%s vs fp32: %s", precision, json.dumps(parity[precision]))
        fmt.write_manifest(tmp, {**manifest, "parity": parity})
        Bundle.load(tmp, cpu)  # the final files load and verify

    atomic_directory(out, write)
    return fmt.read_manifest(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dide-export", description=__doc__)
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--student", help="student checkpoint directory (from dide-train)")
    model.add_argument(
        "--teacher", help="teacher checkpoint directory: written as one ONNX file (the latency baseline), not a bundle"
    )
    parser.add_argument("--out", required=True, help="bundle directory (teacher: .onnx file) to write, atomically")
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--int8", action="store_true", help="int8 dynamic quantisation of text tower and head (teacher: all) (CPU)"
    )
    group.add_argument("--fp16", action="store_true", help="float16 graphs for the GPU (CUDA execution provider)")
    parser.add_argument("--eval-data", help="data spec for the real-input checks (default: the student's own data)")
    parser.add_argument("--eval-size", type=int, default=EVAL_SIZE, help="examples in the real-input checks")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random-input checks")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    precision = "int8" if args.int8 else "fp16" if args.fp16 else "fp32"
    options = ExportOptions(precision, args.eval_data, args.eval_size, args.seed)
    export: Callable[..., dict] = export_bundle
    if args.teacher:
        from export.teacher_export import export_teacher  # one graph, not a bundle

        export = export_teacher
    try:
        manifest = export(args.teacher or args.student, args.out, options)
    except (ExportError, ValueError, FileNotFoundError) as e:
        log.error("export failed, nothing written: %s", e)
        return 1
    what = "teacher" if args.teacher else f"model_id {manifest['model_id']}"
    log.info("wrote %s: task %s, %s, precision %s", args.out, manifest["task"], what, precision)
    return 0


if __name__ == "__main__":
    sys.exit(main())
