"""The search files of a bundle (fusion.npz and the weight-free scan.onnx), written from a torch student.

Called by `export.onnx_export.export_graphs`, so every bundle writer (dide-export, the benchmarks) adds them.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import core.bundle as fmt

OPSET = 18  # as the other graphs of the bundle


class ScanGraph(nn.Module):
    """The head after its first fusion layer, over B cached images and one query, weights fed as inputs.

    image_part (B, 2D) = W1_image v per cached image; text_part (1, 2D) = W1_text t + b1 for the query;
    w2 (2D, D), w3 (D, 2D) and w4 (2D, R) are transposed Linear weights; b3 may carry the other image's
    share of the classifier's first layer (reasoning). Returns the logits of the R head rows fed in (B, R).
    """

    def __init__(self, dim: int, eps1: float, eps2: float) -> None:
        super().__init__()
        self.dim, self.eps1, self.eps2 = dim, eps1, eps2

    def forward(self, image_part, text_part, ln1_w, ln1_b, w2, b2, w3, b3, ln2_w, ln2_b, w4, b4) -> Tensor:
        h = F.gelu(F.layer_norm(image_part + text_part, (2 * self.dim,), ln1_w, ln1_b, self.eps1))  # (B, 2D)
        fused = h @ w2 + b2  # (B, D)
        g = F.gelu(F.layer_norm(fused @ w3 + b3, (2 * self.dim,), ln2_w, ln2_b, self.eps2))  # (B, 2D)
        return g @ w4 + b4  # (B, R)


def fusion_arrays(model: nn.Module) -> dict[str, np.ndarray]:
    """The fusion MLP's and task head's weights (a DualEncoderStudent's `fusion` and `classifier`), float32."""
    out: dict[str, np.ndarray] = {}
    for prefix, mlp in (("fusion", model.fusion), ("cls", model.classifier)):
        first, norm, _, second = mlp
        for name, tensor in (
            ("w1", first.weight),
            ("b1", first.bias),
            ("ln_w", norm.weight),
            ("ln_b", norm.bias),
            ("w2", second.weight),
            ("b2", second.bias),
        ):
            out[f"{prefix}_{name}"] = tensor.detach().cpu().float().numpy()
        out[f"{prefix}_ln_eps"] = np.array(norm.eps, np.float32)
    return out


def export_search_files(model: nn.Module, directory: Path) -> None:
    """Write fusion.npz and scan.onnx for `model` into `directory` (fp32, whatever the bundle's precision)."""
    arrays = fusion_arrays(model)
    fmt.write_fusion(directory, arrays)
    D = model.config.hidden_size
    graph = ScanGraph(D, float(arrays["fusion_ln_eps"]), float(arrays["cls_ln_eps"]))
    B, R = 3, 2
    args = (
        *(torch.zeros(B, 2 * D), torch.zeros(1, 2 * D), torch.ones(2 * D), torch.zeros(2 * D)),
        *(torch.zeros(2 * D, D), torch.zeros(D), torch.zeros(D, 2 * D), torch.zeros(1, 2 * D)),
        *(torch.ones(2 * D), torch.zeros(2 * D), torch.zeros(2 * D, R), torch.zeros(R)),
    )
    axes = {"image_part": {0: "batch"}, "w4": {1: "rows"}, "b4": {0: "rows"}, fmt.SCAN_OUTPUT: {0: "batch", 1: "rows"}}
    path = directory / fmt.SCAN
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", "You are using the legacy TorchScript-based ONNX export", DeprecationWarning)
        torch.onnx.export(
            graph,
            args,
            str(path),
            input_names=list(fmt.SCAN_INPUTS),
            output_names=[fmt.SCAN_OUTPUT],
            opset_version=OPSET,
            dynamo=False,
            dynamic_axes=axes,
        )
    onnx.checker.check_model(str(path))
