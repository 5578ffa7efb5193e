"""The teacher's auxiliary grid losses on synthetic scenes: what each cell shows, and which cells the text names.

ViLT never learns from scratch: its image side starts from an ImageNet ViT and the whole model from
image-text pre-training. A small ViLT trained from scratch on our scenes gets the same two rungs as
auxiliary losses on its last-layer patch tokens, from labels the scene generator knows for free:
- cells: the class of what each grid cell shows (empty, one of the coloured shapes, the occluder);
- named: whether the text names the shape in that cell ("the red circle", "circles"), and as which of its
  descriptions (the subject or the object of a relation), which a patch can only tell after attending to
  the words: it teaches the cross-modal attention that DiDE distils.
The probe reads a middle layer, not the last: a relation ("is the red circle left of the blue square?")
needs layers *after* the words have found their shapes, to compare where those are.
The probe is a training aid only: the saved teacher is a plain Hugging Face ViLT.

The student gets the image rung once more (`SceneProbe`): a dual encoder sees an image only through its
one pooled vector, so that vector must hold the whole scene, every cell's shape and colour, for the
fusion head to compare what the text names; the teacher never needed its image [CLS] to do that.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class GridProbe(nn.Module):
    """Two linear read-outs over the patch tokens pooled into the scene's grid cells."""

    def __init__(self, hidden: int, cell_classes: int, named_classes: int, grid: int) -> None:
        super().__init__()
        self.grid = grid
        self.cell = nn.Linear(hidden, cell_classes)
        self.named = nn.Linear(hidden, named_classes)

    def cells_of(self, patches: Tensor) -> Tensor:
        """(B, N, D) patch tokens in raster order -> (B, G*G, D), averaged over each cell's patches."""
        b, n, d = patches.shape
        side = int(n**0.5)
        if side * side != n or side % self.grid:
            raise ValueError(f"{n} patches do not tile a {self.grid}x{self.grid} grid")
        x = patches.transpose(1, 2).reshape(b, d, side, side)
        return F.adaptive_avg_pool2d(x, self.grid).flatten(2).transpose(1, 2)

    def loss(self, patches: Tensor, cells: Tensor, named: Tensor) -> Tensor:
        """patches (B, I, N, D) per image; cells and named (B, I, G*G) class ids."""
        x = self.cells_of(patches.flatten(0, 1))  # (B*I, G*G, D)
        cell_loss = F.cross_entropy(self.cell(x).flatten(0, 1), cells.flatten())
        named_loss = F.cross_entropy(self.named(x).flatten(0, 1), named.flatten().long())
        return cell_loss + named_loss


class GridTrainee(nn.Module):
    """A HF ViLT task model and its grid probe, trained together; forward gives the task logits and the
    grid loss (one module, so that DDP sees every parameter). The probe reads the output of encoder
    layer `layer` (1-based; default the middle one)."""

    def __init__(self, model: nn.Module, probe: GridProbe, layer: int | None = None) -> None:
        super().__init__()
        depth = model.config.num_hidden_layers
        self.layer = max(1, depth // 2) if layer is None else layer
        if not 1 <= self.layer <= depth:
            raise ValueError(f"the grid probe's layer must be in 1..{depth}, got {self.layer}")
        self.model, self.probe = model, probe

    def forward(self, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor, cells: Tensor, named: Tensor):
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, output_hidden_states=True
        )
        # One image: a tuple of layer outputs; NLVR2's two-image model: one such tuple per image.
        # hidden_states[0] is the embeddings, [k] the output of layer k.
        k = self.layer
        per_image = [out.hidden_states[k]] if pixel_values.dim() == 4 else [h[k] for h in out.hidden_states]
        text_len = input_ids.shape[1]
        patches = torch.stack([h[:, text_len + 1 :] for h in per_image], dim=1)  # (B, I, N, D) after image [CLS]
        return out.logits, self.probe.loss(patches, cells, named)


class SceneProbe(nn.Module):
    """A linear read-out of every grid cell's class from a pooled image embedding (the student's grid loss)."""

    def __init__(self, hidden: int, cell_classes: int, grid: int) -> None:
        super().__init__()
        self.cell_classes = cell_classes
        self.read = nn.Linear(hidden, grid * grid * cell_classes)

    def loss(self, pooled: Tensor, cells: Tensor) -> Tensor:
        """pooled (B, D), one image's embedding per example; cells (B, G*G) its cells' class ids."""
        return F.cross_entropy(self.read(pooled).view(-1, self.cell_classes), cells.flatten())
