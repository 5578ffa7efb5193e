"""The teacher's auxiliary grid losses on synthetic scenes: what each cell shows, and which cells the text names.

ViLT never learns from scratch: its image side starts from an ImageNet ViT and the whole model from
image-text pre-training. A small ViLT trained from scratch on our scenes gets the same two rungs as
auxiliary losses on its last-layer patch tokens, from labels the scene generator knows for free:
- cells: the class of what each grid cell shows (empty, one of the coloured shapes, the occluder);
- named: whether the text names the shape in that cell ("the red circle", "circles"), and as which of its
  descriptions (the subject or the object of a relation), which a patch can only tell after attending to
  the words: it teaches the cross-modal attention that DiDE distils.
On image-text matching pairs (stage 1) the cells are the image's, for its true caption and its negatives alike;
the named cells are the caption's relation's subject and object, known for the true caption only.
The probe reads a middle layer, not the last: a relation ("is the red circle left of the blue square?")
needs layers *after* the words have found their shapes, to compare where those are.
For a reasoning statement about two images, a third read-out asks each image's pooled output (what the
NLVR2 head concatenates) for the statement's fact of that image: how many of the named shapes it has, or
whether the named relation holds in it (scene_language.pair_facts). The head then only has to compare two
facts; without it, the teacher had to find the per-image facts from the pair's true/false label alone, and
sat at chance for an unpredictable part of its training (README, Results).
easy-VQA gets the first rung only, on a grid of one cell: its image's one coloured shape (24 classes), read
from the split's own questions (easy_vqa.load_easy_vqa); there the teacher's shape questions left chance only
with it (README, Results).
The probe is a training aid only: the saved teacher is a plain Hugging Face ViLT.

The student gets the image rung once more (`SceneProbe`): a dual encoder sees an image only through its
one pooled vector, so that vector must hold the whole scene, every cell's shape and colour, for the
fusion head to compare what the text names; the teacher never needed its image [CLS] to do that.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def cell_loss(logits: Tensor, cells: Tensor) -> Tensor:
    """Cross-entropy over the cells whose class is known (-100: unknown, e.g. an easy-VQA image whose questions
    do not tell its colour and shape, or what a negative caption names); 0 when a batch has none, where the mean
    would be 0/0."""
    known = cells != -100
    if not known.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[known], cells[known])


class GridProbe(nn.Module):
    """Linear read-outs over the patch tokens pooled into the image's grid cells: what each cell shows and,
    with `named_classes`, whether the text names it; with `fact_classes` one over each image's pooled output
    (two-image statements)."""

    def __init__(self, hidden: int, cell_classes: int, named_classes: int, grid: int, fact_classes: int = 0) -> None:
        super().__init__()
        self.grid = grid
        self.cell = nn.Linear(hidden, cell_classes)
        self.named = nn.Linear(hidden, named_classes) if named_classes else None
        self.fact = nn.Linear(hidden, fact_classes) if fact_classes else None

    def cells_of(self, patches: Tensor) -> Tensor:
        """(B, N, D) patch tokens in raster order -> (B, G*G, D), averaged over each cell's patches."""
        b, n, d = patches.shape
        side = int(n**0.5)
        if side * side != n or side % self.grid:
            raise ValueError(f"{n} patches do not tile a {self.grid}x{self.grid} grid")
        x = patches.transpose(1, 2).reshape(b, d, side, side)
        return F.adaptive_avg_pool2d(x, self.grid).flatten(2).transpose(1, 2)

    def loss(self, patches: Tensor, cells: Tensor, named: Tensor | None) -> Tensor:
        """patches (B, I, N, D) per image; cells and named (B, I, G*G) class ids, -100 where unknown."""
        x = self.cells_of(patches.flatten(0, 1))  # (B*I, G*G, D)
        loss = cell_loss(self.cell(x).flatten(0, 1), cells.flatten())
        if self.named is not None:
            loss = loss + cell_loss(self.named(x).flatten(0, 1), named.flatten().long())
        return loss

    def fact_loss(self, pooled: Tensor, facts: Tensor) -> Tensor:
        """pooled (B, I, D) each image's pooled output; facts (B, I) class ids."""
        return F.cross_entropy(self.fact(pooled).flatten(0, 1), facts.flatten())


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

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        pixel_values: Tensor,
        cells: Tensor,
        named: Tensor | None,
        facts: Tensor | None = None,
    ):
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, output_hidden_states=True
        )
        # One image: a tuple of layer outputs; NLVR2's two-image model: one such tuple per image.
        # hidden_states[0] is the embeddings, [k] the output of layer k.
        k = self.layer
        per_image = [out.hidden_states[k]] if pixel_values.dim() == 4 else [h[k] for h in out.hidden_states]
        text_len = input_ids.shape[1]
        patches = torch.stack([h[:, text_len + 1 :] for h in per_image], dim=1)  # (B, I, N, D) after image [CLS]
        loss = self.probe.loss(patches, cells, named)
        if self.probe.fact is not None and facts is not None:
            vilt = self.model.vilt  # each image's pooled output, as the model's own forward computed it
            pooled = torch.stack([vilt.pooler(vilt.layernorm(h[-1])) for h in out.hidden_states], dim=1)
            loss = loss + self.probe.fact_loss(pooled, facts)
        return out.logits, loss


class SceneProbe(nn.Module):
    """A linear read-out of every grid cell's class from a pooled image embedding (the student's grid loss),
    and with `fact_classes` one of a two-image statement's fact of each image from the fusion's output for
    that image, the student's counterpart of the teacher's per-image pooled output."""

    def __init__(self, hidden: int, cell_classes: int, grid: int, fact_classes: int = 0) -> None:
        super().__init__()
        self.cell_classes = cell_classes
        self.read = nn.Linear(hidden, grid * grid * cell_classes)
        self.fact = nn.Linear(hidden, fact_classes) if fact_classes else None

    def loss(self, pooled: Tensor, cells: Tensor) -> Tensor:
        """pooled (B, D), one image's embedding per example; cells (B, G*G) its cells' class ids."""
        return cell_loss(self.read(pooled).view(-1, self.cell_classes), cells.flatten())

    def fact_loss(self, fused: Tensor, facts: Tensor) -> Tensor:
        """fused (B, D), the fusion of the text with one image; facts (B,) that image's fact class."""
        return F.cross_entropy(self.fact(fused), facts)
