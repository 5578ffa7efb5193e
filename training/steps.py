"""One training step's losses: the teacher's task loss, and DiDE's ground-truth, prediction and attention
distillation for the student."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from training import losses
from training.grid import GridTrainee, SceneProbe
from training.student import DualEncoderStudent
from training.teacher import FusionOutput, Teacher

log = logging.getLogger(__name__)


@dataclass
class LossWeights:
    gt: float = 0.0
    pred: float = 1.0
    attn: float = 1.0
    t2i: bool = True
    i2t: bool = True
    grid: float = 0.0  # the scene probe on the pooled image embeddings (scenes, easy-VQA; grid.SceneProbe)
    facts: float = 0.0  # its read-out of each image's fact from the fusion (reasoning scenes only)

    @property
    def attention(self) -> bool:
        """Whether the step distils attention, and so needs the teacher's last-layer q/k."""
        return self.attn > 0 and (self.t2i or self.i2t)


def loss_weights(args) -> LossWeights:
    """The loss weights the distillation flags ask for (--w-gt, --w-pred, --w-attn, --no-t2i, --no-i2t)."""
    return LossWeights(
        gt=args.w_gt,
        pred=args.w_pred,
        attn=args.w_attn,
        t2i=not args.no_t2i,
        i2t=not args.no_i2t,
        grid=args.grid_loss,
        facts=getattr(args, "fact_loss", 0.0),
    )


# Tasks scored with a sigmoid per label (VQA's soft answers; ITM's one logit), the others with a softmax.
SIGMOID_TASKS = ("vqa", "itm")


def gt_loss(task: str, logits: Tensor, target: Tensor, label_smoothing: float) -> Tensor:
    if task in SIGMOID_TASKS:
        return losses.vqa_gt_loss(logits, target)
    return losses.ce_gt_loss(logits, target, label_smoothing)


def pred_kd_loss(task: str, student_logits: Tensor, teacher_logits: Tensor, pairs: Tensor | None = None) -> Tensor:
    """The task's prediction KD; with `pairs` (an ITM teacher that ranks captions) a softmax over each image's."""
    if pairs is not None:
        return losses.ranking_kd_loss(student_logits, teacher_logits, pairs)
    if task in SIGMOID_TASKS:
        return losses.vqa_kd_loss(student_logits, teacher_logits)
    return losses.softmax_kd_loss(student_logits, teacher_logits)


class StudentTrainingView(nn.Module):
    """The student's training forward: logits, each tower's output (with last-layer q/k when asked) and the
    scene probe's losses, unweighted: with the cells given, "grid" on the pooled image embeddings, and with
    each image's fact given (two-image statements), "facts" on the fusion of the text with each image.

    It is what DistributedDataParallel wraps, so gradient sync sees the whole forward.
    """

    def __init__(self, student: DualEncoderStudent, probe: SceneProbe | None = None) -> None:
        super().__init__()
        self.student = student
        self.probe = probe

    def forward(
        self,
        ids: Tensor,
        mask: Tensor,
        pixels: Tensor,
        pixels2: Tensor | None,
        keep_qk: bool,
        cells: Tensor | None,
        facts: Tensor | None = None,
    ):
        text = self.student.text_tower(ids, mask, keep_qk=keep_qk)
        images = [self.student.image_tower(p, keep_qk=keep_qk) for p in (pixels, pixels2) if p is not None]
        logits = self.student.head(text.pooled, images[0].pooled, images[1].pooled if len(images) == 2 else None)
        aux: dict[str, Tensor] = {}
        if self.probe is not None and cells is not None:  # cells (B, I, G*G)
            aux["grid"] = sum(self.probe.loss(img.pooled, cells[:, i]) for i, img in enumerate(images))
        if self.probe is not None and self.probe.fact is not None and facts is not None:  # facts (B, I)
            fused = (self.student.fuse(text.pooled, img.pooled) for img in images)
            aux["facts"] = sum(self.probe.fact_loss(f, facts[:, i]) for i, f in enumerate(fused))
        return logits, text, images, aux


class TeacherCache:
    """The frozen teacher's outputs for each training example, kept from the first step that sees it.

    Exact where an example's teacher input is the same every epoch: no image augmentation, batches used as
    loaded (not itm's drawn pairs), and the teacher in eval mode. Every later epoch then skips the teacher's
    forward pass, a third of a scenes student's step on the CPU. Kept in CPU memory: `limit` bytes at most, or
    it turns itself off (logged) once the first batch shows it would need more.
    """

    def __init__(self, teacher: Teacher, examples: int, keep_qk: bool, limit: float) -> None:
        self.teacher, self.examples, self.keep_qk, self.limit = teacher, examples, keep_qk, limit
        self.filled = torch.zeros(examples, dtype=torch.bool)
        self.store: list[Tensor] | None = None  # logits, then each image pass's (q_text, k_text, q_image, k_image)
        self.off = False

    def forward(self, index: Tensor, ids: Tensor, mask: Tensor, pixels: Tensor, pixels2: Tensor | None):
        rows = index.cpu()
        if self.store is not None and bool(self.filled[rows].all()):
            flat = [t[rows].to(ids.device) for t in self.store]
        else:
            out = self.teacher.forward(ids, mask, pixels, pixels2, keep_qk=self.keep_qk)
            flat = [out.logits, *(t for qk in out.qk for t in qk)]
            if not self.off:
                self._keep(rows, flat)
        return FusionOutput(flat[0], [tuple(flat[i : i + 4]) for i in range(1, len(flat), 4)])

    def _keep(self, rows: Tensor, flat: list[Tensor]) -> None:
        if self.store is None:
            need = self.examples * sum(t[0].numel() * t.element_size() for t in flat)
            if need > self.limit:
                self.off = True
                log.info("teacher cache off: it would need %.2f GiB, over its %.2f", need / 2**30, self.limit / 2**30)
                return
            self.store = [t.new_empty((self.examples, *t.shape[1:]), device="cpu") for t in flat]
            log.info("teacher cache: %.2f GiB for %d examples", need / 2**30, self.examples)
        for kept, t in zip(self.store, flat, strict=True):
            kept[rows] = t.cpu()
        self.filled[rows] = True


def distill_step(
    view: nn.Module,
    teacher: Teacher,
    batch: dict[str, Tensor],
    task: str,
    w: LossWeights,
    ls: float,
    cache: TeacherCache | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """One DiDE step: the frozen teacher's logits and last-layer q/k (from `cache` where it holds them), the
    student's towers and head."""
    assert not teacher.model.training, "the teacher distils in eval mode (no dropout), as the official code"
    ids, mask, pixels, pixels2 = batch["input_ids"], batch["attention_mask"], batch["pixels"], batch.get("pixels2")
    need_attn = w.attention
    parts: dict[str, Tensor] = {}
    if w.pred > 0 or need_attn:
        with torch.no_grad():
            if cache is None:
                t_out = teacher.forward(ids, mask, pixels, pixels2, keep_qk=need_attn)
            else:
                assert cache.keep_qk == need_attn, "the cache keeps the teacher's q/k exactly when the step needs them"
                t_out = cache.forward(batch["index"], ids, mask, pixels, pixels2)
    cells = batch.get("cells") if w.grid else None
    facts = batch.get("facts") if w.grid and w.facts else None
    logits, text, images, aux = view(ids, mask, pixels, pixels2, need_attn, cells, facts)
    if w.gt > 0:
        parts["gt"] = w.gt * gt_loss(task, logits, batch["target"], ls)
    if w.pred > 0:
        pairs = batch["pairs"] if teacher.ranking else None
        parts["pred"] = w.pred * pred_kd_loss(task, logits, t_out.logits, pairs)
    if need_attn:
        attn = sum(
            losses.cross_modal_attention_loss(
                t_qk, (text.query, text.key), (img.query, img.key), mask, t2i=w.t2i, i2t=w.i2t
            )
            for t_qk, img in zip(t_out.qk, images, strict=True)
        )
        parts["attn"] = w.attn * attn
    for name, loss in aux.items():
        parts[name] = {"grid": w.grid, "facts": w.facts}[name] * loss
    total = sum(parts.values())
    return total, {k: float(v.detach()) for k, v in parts.items()}


def teacher_step(teacher: nn.Module, wrapper: Teacher, batch: dict[str, Tensor], ls: float, w_grid: float = 0.0):
    """The task loss, plus the weighted grid loss when `teacher` is a GridTrainee (scenes)."""
    ids, mask, pixels = batch["input_ids"], batch["attention_mask"], batch["pixels"]
    if wrapper.task == "reasoning":
        pixels = torch.stack([pixels, batch["pixels2"]], dim=1)
    parts = {}
    if isinstance(getattr(teacher, "module", teacher), GridTrainee):
        logits, grid = teacher(ids, mask, pixels, batch["cells"], batch.get("named"), batch.get("facts"))
        parts["grid"] = w_grid * grid
    else:
        logits = teacher(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    parts["gt"] = gt_loss(wrapper.task, logits, batch["target"], ls)
    return sum(parts.values()), {k: float(v.detach()) for k, v in parts.items()}
