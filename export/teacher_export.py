"""`dide-export --teacher`: the fusion teacher as one ONNX graph (fp32 or dynamic int8), checked against torch.

Not a serving bundle: the graph the students are timed against on the same runtime and precision
(bench.latency), with its parity in the file's metadata (`dide` key of metadata_props, JSON).

Inputs: input_ids and attention_mask (B, L) int64, pixel_values (B, 3, S, S) float32, or (B, 2, 3, S, S)
for the NLVR2 teacher; output logits (B, C). Batch and text length are dynamic; the image is the whole
image at the teacher's configured size S (ViLT's pixel_mask all ones), because HF ViLT's visual_embed
(multinomial patch sampling, per-image position interpolation) does not trace. At that size it reduces
to patches + positions, which is what the graph computes, and the parity check proves the two agree.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import Tensor, nn

from core.atomic import write_file_atomic
from export.onnx_export import (
    EVAL_BATCH,
    OPSET,
    PARITY_TOL,
    ExportOptions,
    ParityCheck,
    Sample,
    export_graph,
    provenance,
    real_sample,
)
from training.teacher import Teacher, load_teacher

log = logging.getLogger(__name__)

INPUTS = ("input_ids", "attention_mask", "pixel_values")
OUTPUT = "logits"
METADATA_KEY = "dide"
CPU = ["CPUExecutionProvider"]


class TeacherGraph(nn.Module):
    """The teacher's logits from token ids, mask and whole images (one, or two stacked for NLVR2)."""

    def __init__(self, teacher: Teacher) -> None:
        super().__init__()
        self.model = teacher.model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor) -> Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values).logits


@contextmanager
def whole_image_patches(embeddings: nn.Module) -> Iterator[None]:
    """Swap ViLT's visual_embed for one that traces, valid for whole images at the configured size.

    With every pixel valid, HF's version keeps all patches (shuffled by multinomial, which Teacher undoes)
    and interpolates the position grid to its own size (the identity); what is left is this.
    """
    saved = embeddings.__dict__.get("visual_embed")  # Teacher's raster-order wrapper, an instance attribute

    def visual_embed(pixel_values: Tensor, pixel_mask: Tensor, max_image_length: int = -1):
        x = embeddings.patch_embeddings(pixel_values).flatten(2).transpose(1, 2)  # (B, N, D), raster order
        x = torch.cat([embeddings.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + N, D)
        x = embeddings.dropout(x + embeddings.position_embeddings)
        return x, torch.ones_like(x[..., 0], dtype=torch.long), None  # patch_index: unused downstream

    embeddings.visual_embed = visual_embed
    try:
        yield
    finally:
        if saved is None:
            del embeddings.visual_embed
        else:
            embeddings.visual_embed = saved


def export_teacher_graph(teacher: Teacher, path: Path) -> None:
    """Write the teacher's fp32 graph to `path` (dynamic batch and text length)."""
    cfg, S = teacher.config, teacher.config.image_size
    if teacher.image_spec.size != S:
        raise ValueError(
            f"the teacher's images are preprocessed to {teacher.image_spec.size} px but its config says {S}: "
            "the ONNX graph takes whole images at the configured size only"
        )
    B, L = 2, teacher.text.max_len
    ids = torch.randint(5, cfg.vocab_size, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    pixels = torch.zeros(B, 2, 3, S, S) if teacher.task == "reasoning" else torch.zeros(B, 3, S, S)
    with torch.no_grad(), whole_image_patches(teacher.model.vilt.embeddings), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        graph = TeacherGraph(teacher)
        export_graph(graph, (ids, mask, pixels), path, INPUTS, OUTPUT, seq_inputs=("input_ids", "attention_mask"))
    onnx.checker.check_model(str(path))


def pixel_values(s: Sample, a: int, b: int) -> np.ndarray:
    """The graph's pixel_values for rows a:b of `s`: (n, 3, S, S), or (n, 2, 3, S, S) with a second image."""
    if s.pixels2 is None:
        return s.pixels[a:b]
    return np.stack([s.pixels[a:b], s.pixels2[a:b]], axis=1)


def torch_teacher_logits(teacher: Teacher, s: Sample, batch: int = EVAL_BATCH) -> np.ndarray:
    """The teacher's logits in torch, through Teacher.forward (HF's visual_embed, raster order)."""
    out = []
    with torch.no_grad():
        for a in range(0, len(s.pixels), batch):
            p2 = None if s.pixels2 is None else torch.from_numpy(s.pixels2[a : a + batch])
            ids, mask = torch.from_numpy(s.input_ids[a : a + batch]), torch.from_numpy(s.attention_mask[a : a + batch])
            out.append(teacher.forward(ids, mask, torch.from_numpy(s.pixels[a : a + batch]), p2).logits.numpy())
    return np.concatenate(out)


def onnx_teacher_logits(session: ort.InferenceSession, s: Sample, batch: int = EVAL_BATCH) -> np.ndarray:
    out = []
    for a in range(0, len(s.pixels), batch):
        feed = {
            "input_ids": s.input_ids[a : a + batch],
            "attention_mask": s.attention_mask[a : a + batch],
            "pixel_values": pixel_values(s, a, a + batch),
        }
        out.append(session.run([OUTPUT], feed)[0])
    return np.concatenate(out)


def quantize_teacher_int8(src: Path, dst: Path) -> None:
    """ONNX Runtime dynamic int8 quantisation of the whole graph (the same call the students' int8 uses)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(src, dst, weight_type=QuantType.QInt8)


def read_metadata(path: str | Path) -> dict:
    """What export_teacher recorded in a teacher graph: task, labels, sizes, precision, parity, provenance."""
    model = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    if METADATA_KEY not in props:
        raise ValueError(f"{path} has no {METADATA_KEY!r} metadata: was it written by dide-export --teacher?")
    return json.loads(props[METADATA_KEY])


def export_teacher(teacher_dir: str | Path, out: str | Path, options: ExportOptions) -> dict:
    """Export the teacher at `teacher_dir` to the ONNX file `out` (fp32 or dynamic int8), checked against torch.

    fp32: max |logit difference| <= PARITY_TOL and the same argmax as torch on random inputs (batch 1, 7,
    64; full and half text length) and on the first `eval_size` test examples of its data. int8: its
    agreement with the fp32 graph (and both accuracies when labelled) on the same examples, recorded, not
    required. Raises ExportError (and writes nothing) when the fp32 graph disagrees; returns the metadata.
    """
    precision = options.precision
    if precision not in ("fp32", "int8"):
        raise ValueError(f"a teacher graph is fp32 or int8, got {precision!r}")
    teacher_dir, out = Path(teacher_dir), Path(out)
    teacher = load_teacher(teacher_dir)
    teacher.model.eval()
    cfg, two, L = teacher.config, teacher.task == "reasoning", teacher.text.max_len
    torch.manual_seed(options.seed)
    spec = options.eval_data or teacher.data
    real = real_sample(spec, options.eval_size, teacher.task, teacher.text, teacher.image_spec, teacher.labels)
    check = ParityCheck(cfg.vocab_size, cfg.image_size, two, L, real, spec, options)
    parity: dict = {"tolerance": PARITY_TOL}
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        fp32_path = Path(tmp) / "teacher.onnx"
        t0 = time.perf_counter()
        export_teacher_graph(teacher, fp32_path)
        log.info("exported the teacher graph (opset %d) in %.1f s", OPSET, time.perf_counter() - t0)
        fp32 = ort.InferenceSession(str(fp32_path), providers=CPU)
        parity["fp32"], fp32_real = check.fp32(
            partial(torch_teacher_logits, teacher), partial(onnx_teacher_logits, fp32)
        )
        log.info("fp32 parity: %s", json.dumps(parity["fp32"]))
        path = fp32_path
        if precision == "int8":
            path = Path(tmp) / "teacher.int8.onnx"
            quantize_teacher_int8(fp32_path, path)
            low = ort.InferenceSession(str(path), providers=CPU)
            s, stats = check.against_fp32(
                partial(onnx_teacher_logits, fp32), partial(onnx_teacher_logits, low), fp32_real
            )
            parity["int8"] = {"reference": "fp32 onnx", "source": s.source, **stats}
            log.info("int8 vs fp32: %s", json.dumps(parity["int8"]))
        meta = {
            "kind": "teacher",
            "task": teacher.task,
            "labels": teacher.labels,
            "image_size": cfg.image_size,
            "two_images": two,
            "max_text_len": L,
            "precision": precision,
            "opset": OPSET,
            "inputs": list(INPUTS),
            "parity": parity,
            "source": {"checkpoint": str(teacher_dir.resolve()), "data": teacher.data},
            **provenance(),
        }
        model = onnx.load(str(path))
        onnx.helper.set_model_props(model, {METADATA_KEY: json.dumps(meta)})
        write_file_atomic(out, model.SerializeToString())
    return meta
