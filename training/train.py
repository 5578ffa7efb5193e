"""`dide-train`: teacher fine-tuning, DiDE distillation (pre-training and fine-tuning) and evaluation, one loop.

dide-train teacher --task vqa --data easy-vqa --size small --out runs/teacher
dide-train distill --task vqa --data easy-vqa --teacher runs/teacher --out runs/student
dide-train eval --model runs/student
torchrun --nproc_per_node 2 -m training.train distill ...   (DistributedDataParallel; gloo on CPU)

Two stages, as the paper: distil an image-text matching teacher on image-caption pairs, then a task teacher
fine-tuned from it, into a student that starts from stage 1's:
dide-train teacher --task itm --data easy-vqa --out runs/itm-teacher
dide-train pretrain --teacher runs/itm-teacher --out runs/stage1
dide-train teacher --task vqa --data easy-vqa --init runs/itm-teacher --out runs/teacher
dide-train distill --task vqa --teacher runs/teacher --init runs/stage1 --out runs/student
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from core.atomic import atomic_directory
from core.preprocess import decode_rgb, normalize
from training import losses
from training.data import load_data
from training.examples import TASKS, Example, PairExample, TaskData, images_of, target_of, text_of
from training.grid import GridProbe, GridTrainee
from training.scene_world import CELL_CLASSES, GRID, NAMED_CLASSES
from training.student import DualEncoderStudent, load_student, read_config, save_student
from training.teacher import (
    MAX_TEXT_LEN,
    SIZES,
    Teacher,
    build_teacher,
    checkpoint_task,
    is_vilt_checkpoint,
    load_teacher,
    student_for_teacher,
    student_from_pretrained,
    student_from_teacher,
    teacher_for_task,
    text_length,
)
from training.tokenizer import train_wordpiece

log = logging.getLogger(__name__)


# --- data --------------------------------------------------------------------------------------------


class ExampleDataset(Dataset):
    """Examples as tensors: token ids and mask (pre-tokenised), pixels (decoded once), target scores.

    Image-caption pairs also carry what `itm_pairs` needs to pick a negative: their image's and caption's
    ids, and their hard negatives' token ids (K per example, the first `negative_count` real).
    """

    def __init__(
        self,
        data: TaskData,
        split: str,
        labels: list[str],
        text,
        image_spec,
        augment: str = "none",
        blind: str | None = None,
    ) -> None:
        self.examples: list[Example] = getattr(data, split)
        self.spec, self.augment, self.blind = image_spec, augment, blind
        self.ids, self.mask = (torch.from_numpy(a) for a in text([text_of(e) for e in self.examples]))
        if blind == "text":  # text-only baseline's mirror: every text becomes "[CLS] [SEP]"
            self.ids[:, 1], self.ids[:, 2:], self.mask[:, 2:] = text.tokenizer.token_to_id("[SEP]"), text.pad_id, 0
        self.targets = torch.tensor([target_of(e, labels) for e in self.examples])
        grids = [getattr(e, "grid", None) for e in self.examples]
        self.grid = bool(grids) and all(g is not None for g in grids)  # synthetic scenes' free cell labels
        if self.grid:
            self.cells = torch.tensor([g.cells for g in grids])  # (E, I, G*G) class ids
            self.named = torch.tensor([g.named for g in grids], dtype=torch.uint8)  # (E, I, G*G)
        paths = sorted({p for e in self.examples for p in images_of(e)})
        self.image_index = {p: i for i, p in enumerate(paths)}
        rgb = []
        for p in tqdm(paths, desc=f"decode {split} images", disable=not is_main() or len(paths) < 2000):
            try:
                rgb.append(decode_rgb(Path(p).read_bytes(), image_spec))
            except (OSError, ValueError) as e:
                raise ValueError(f"{p}: {e}") from None
        self.rgb = torch.from_numpy(np.stack(rgb))  # (I, H, W, 3) uint8, shared by examples
        if data.task == "itm":
            captions = {c: i for i, c in enumerate(sorted({e.caption for e in self.examples}))}
            self.caption_ids = torch.tensor([captions[e.caption] for e in self.examples])
            self.negative_count = torch.tensor([len(e.negatives) for e in self.examples])
            k = int(self.negative_count.max()) if self.examples else 0
            padded = [t for e in self.examples for t in (*e.negatives, *[e.caption] * (k - len(e.negatives)))]
            ids, mask = (torch.from_numpy(a) for a in text(padded))
            self.negative_ids, self.negative_mask = (a.view(len(self.examples), k, text.max_len) for a in (ids, mask))

    def __len__(self) -> int:
        return len(self.examples)

    def pixels(self, path) -> Tensor:
        x = torch.from_numpy(normalize(self.rgb[self.image_index[path]].numpy(), self.spec))  # (3, H, W)
        if self.augment != "none":  # flips and edge-padded shifts commute with the per-channel normalisation
            x = augment_image(x, hflip=self.augment == "flip")
        return torch.zeros_like(x) if self.blind == "image" else x

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        images = images_of(self.examples[i])
        item = {"input_ids": self.ids[i], "attention_mask": self.mask[i], "target": self.targets[i]}
        item["pixels"] = self.pixels(images[0])
        if len(images) == 2:
            item["pixels2"] = self.pixels(images[1])
        if self.grid:
            item["cells"], item["named"] = self.cells[i], self.named[i]
        if isinstance(self.examples[i], PairExample):
            item["image_id"] = torch.tensor(self.image_index[images[0]])
            item["caption_id"] = self.caption_ids[i]
            item["negative_count"] = self.negative_count[i]
            item["negative_ids"], item["negative_mask"] = self.negative_ids[i], self.negative_mask[i]  # (K, L)
        return item


def itm_pairs(batch: dict[str, Tensor], generator: torch.Generator, p_hard: float = 0.5) -> dict[str, Tensor]:
    """Matched and mismatched pairs from a batch of image-caption pairs, for image-text matching.

    Each image comes with its caption (target 1) and with one negative (target 0): with probability
    `p_hard` one of its hard negatives when it has any, else the caption of another image in the batch
    (another image and another caption string); an image with neither gets no negative. The draws come
    from `generator` only, so a seed fixes them. `pairs` (n, 2) holds each image's rows, matched first, for
    a ranking teacher's softmax over an image's captions.
    """
    ids, mask = batch["input_ids"], batch["attention_mask"]
    image, caption, count = (batch[k].cpu() for k in ("image_id", "caption_id", "negative_count"))
    hard = torch.rand(len(ids), generator=generator) < p_hard
    neg_ids, neg_mask, rows = [], [], []
    for i in range(len(ids)):
        others = ((image != image[i]) & (caption != caption[i])).nonzero()[:, 0]
        if count[i] > 0 and (hard[i] or len(others) == 0):
            k = int(torch.randint(int(count[i]), (1,), generator=generator))
            neg_ids.append(batch["negative_ids"][i, k])
            neg_mask.append(batch["negative_mask"][i, k])
        elif len(others) > 0:
            j = int(others[torch.randint(len(others), (1,), generator=generator)])
            neg_ids.append(ids[j])
            neg_mask.append(mask[j])
        else:
            continue
        rows.append(i)
    rows_index = torch.tensor(rows, dtype=torch.long, device=ids.device)
    target = batch["target"]  # (B, 1): every loaded pair matches
    return {
        "input_ids": torch.stack([*ids, *neg_ids]),  # (B + n, L)
        "attention_mask": torch.stack([*mask, *neg_mask]),
        "pixels": torch.cat([batch["pixels"], batch["pixels"][rows_index]]),
        "target": torch.cat([target, target.new_zeros(len(rows), 1)]),
        "pairs": torch.stack([rows_index, len(ids) + torch.arange(len(rows), device=ids.device)], dim=1),
    }


def batch_maker(task: str, seed: int) -> Callable[[dict[str, Tensor]], dict[str, Tensor]]:
    """What a step trains or evaluates on: the loaded batch, or for itm its matched and mismatched pairs."""
    if task != "itm":
        return lambda batch: batch
    generator = torch.Generator().manual_seed(seed)
    return lambda batch: itm_pairs(batch, generator)


def augment_image(x: Tensor, hflip: bool) -> Tensor:
    """Label-preserving augmentation: a small translation with edge padding, optionally a mirror flip.

    Flips only where no text mentions left/right (easy-VQA); never on the scenes' spatial tasks.
    """
    if hflip and random.random() < 0.5:
        x = x.flip(-1)
    H = x.shape[-1]
    shift = max(1, H // 16)
    dy, dx = random.randint(-shift, shift), random.randint(-shift, shift)
    x = torch.nn.functional.pad(x[None], (shift, shift, shift, shift), mode="replicate")[0]
    return x[:, shift + dy : shift + dy + H, shift + dx : shift + dx + H]


# --- distributed -------------------------------------------------------------------------------------


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def setup_distributed() -> torch.device:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


# --- the loop ----------------------------------------------------------------------------------------


@dataclass
class LossWeights:
    gt: float = 0.0
    pred: float = 1.0
    attn: float = 1.0
    t2i: bool = True
    i2t: bool = True


def loss_weights(args) -> LossWeights:
    """The loss weights the distillation flags ask for (--w-gt, --w-pred, --w-attn, --no-t2i, --no-i2t)."""
    return LossWeights(gt=args.w_gt, pred=args.w_pred, attn=args.w_attn, t2i=not args.no_t2i, i2t=not args.no_i2t)


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
    """The student's training forward: logits plus each tower's output (with last-layer q/k when asked).

    It is what DistributedDataParallel wraps, so gradient sync sees the whole forward.
    """

    def __init__(self, student: DualEncoderStudent) -> None:
        super().__init__()
        self.student = student

    def forward(self, ids: Tensor, mask: Tensor, pixels: Tensor, pixels2: Tensor | None, keep_qk: bool):
        text = self.student.text_tower(ids, mask, keep_qk=keep_qk)
        images = [self.student.image_tower(p, keep_qk=keep_qk) for p in (pixels, pixels2) if p is not None]
        logits = self.student.head(text.pooled, images[0].pooled, images[1].pooled if len(images) == 2 else None)
        return logits, text, images


def distill_step(
    view: nn.Module, teacher: Teacher, batch: dict[str, Tensor], task: str, w: LossWeights, ls: float
) -> tuple[Tensor, dict[str, float]]:
    """One DiDE step: the frozen teacher's logits and last-layer q/k, the student's towers and head."""
    assert not teacher.model.training, "the teacher distils in eval mode (no dropout), as the official code"
    ids, mask, pixels, pixels2 = batch["input_ids"], batch["attention_mask"], batch["pixels"], batch.get("pixels2")
    need_attn = w.attn > 0 and (w.t2i or w.i2t)
    parts: dict[str, Tensor] = {}
    if w.pred > 0 or need_attn:
        with torch.no_grad():
            t_out = teacher.forward(ids, mask, pixels, pixels2, keep_qk=need_attn)
    logits, text, images = view(ids, mask, pixels, pixels2, need_attn)
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
    total = sum(parts.values())
    return total, {k: float(v.detach()) for k, v in parts.items()}


def teacher_step(teacher: nn.Module, wrapper: Teacher, batch: dict[str, Tensor], ls: float, w_grid: float = 0.0):
    """The task loss, plus the weighted grid loss when `teacher` is a GridTrainee (scenes)."""
    ids, mask, pixels = batch["input_ids"], batch["attention_mask"], batch["pixels"]
    if wrapper.task == "reasoning":
        pixels = torch.stack([pixels, batch["pixels2"]], dim=1)
    parts = {}
    if isinstance(getattr(teacher, "module", teacher), GridTrainee):
        logits, grid = teacher(ids, mask, pixels, batch["cells"], batch["named"])
        parts["grid"] = w_grid * grid
    else:
        logits = teacher(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    parts["gt"] = gt_loss(wrapper.task, logits, batch["target"], ls)
    return sum(parts.values()), {k: float(v.detach()) for k, v in parts.items()}


# Heads' learning-rate multiplier by task, as the official configs: lr_mult = 10 only for VQA.
HEAD_LR_MULT = {"vqa": 10.0}


def param_groups(model: nn.Module, lr: float, weight_decay: float, head_lr_mult: float):
    """AdamW groups: no decay on biases/norms/embeddings-like 1-D params; heads at lr x head_lr_mult."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_head = "classifier" in name.split(".")[:2]  # HF teachers' and the student's task heads
        no_decay = p.ndim < 2 or "norm" in name.lower() or "embedding" in name.split(".")[-1]
        groups.setdefault((is_head, no_decay), []).append(p)
    return [
        {"params": ps, "lr": lr * (head_lr_mult if head else 1.0), "weight_decay": 0.0 if nd else weight_decay}
        for (head, nd), ps in groups.items()
    ]


def lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


# The flags that must match for an interrupted run's state to be resumed.
RESUME_KEYS = ("command", "task", "data", "epochs", "batch_size", "max_train", "lr", "seed", "teacher", "size")


def run_fingerprint(args) -> dict:
    return {k: getattr(args, k, None) for k in RESUME_KEYS}


def save_resume(path: Path, model: nn.Module, optimizer, scheduler, epoch: int, step: int, run: dict) -> None:
    """Model + optimizer state for resuming; written to a temp dir and renamed (never half-written)."""
    model = getattr(model, "module", model)

    def write(tmp: Path) -> None:
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors")
        )
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optim.pt")
        (tmp / "state.json").write_text(json.dumps({"epoch": epoch, "step": step, "run": run}))

    atomic_directory(path, write)


def load_resume(path: Path, model: nn.Module, optimizer, scheduler, run: dict) -> tuple[int, int]:
    state = json.loads((path / "state.json").read_text())
    if state.get("run") != run:
        changed = sorted(k for k in run if state.get("run", {}).get(k) != run[k])
        raise ValueError(
            f"{path} holds an interrupted run with other settings ({', '.join(changed)}): "
            "rerun with the same flags to resume, or pass --restart to start over"
        )
    model = getattr(model, "module", model)
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    opt = torch.load(path / "optim.pt", weights_only=True)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    return state["epoch"], state["step"]


def train_loop(args, model: nn.Module, step_fn, train_set: ExampleDataset, save_fn) -> None:
    """The one loop: AdamW, warm-up + linear decay, DDP, progress, periodic resumable checkpoints."""
    device = setup_distributed()
    model.to(device)
    world = dist.get_world_size() if dist.is_initialized() else 1
    sampler = DistributedSampler(train_set, shuffle=True, seed=args.seed) if world > 1 else None
    loader = DataLoader(
        train_set,
        batch_size=args.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=args.workers,
        drop_last=True,
        persistent_workers=args.workers > 0,
    )
    steps_per_epoch = len(loader)
    total = steps_per_epoch * args.epochs
    optimizer = torch.optim.AdamW(
        param_groups(model, args.lr, args.weight_decay, args.head_lr_mult), lr=args.lr, betas=(0.9, 0.98), eps=1e-8
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(int(total * args.warmup), total))
    resume_dir = Path(args.out).with_name(Path(args.out).name + ".resume")
    epoch0, step = 0, 0
    if resume_dir.is_dir() and not args.restart:
        epoch0, step = load_resume(resume_dir, model, optimizer, scheduler, run_fingerprint(args))
        if is_main():
            log.info("resuming from %s at epoch %d, step %d", resume_dir, epoch0, step)
    ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True) if world > 1 else model
    t0 = time.time()
    for epoch in range(epoch0, args.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        ddp.train()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=(not is_main()) or None, leave=False)
        for batch in bar:
            batch = {k: v.to(device) for k, v in batch.items()}
            loss, parts = step_fn(ddp, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at step {step}: {parts}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            optimizer.step()
            scheduler.step()
            step += 1
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if is_main() and step % args.log_every == 0:
                detail = " ".join(f"{k}={v:.4f}" for k, v in parts.items())
                log.info(
                    "step %d/%d epoch %d loss %.4f %s lr %.2e %.1fs",
                    step,
                    total,
                    epoch + 1,
                    loss.item(),
                    detail,
                    scheduler.get_last_lr()[0],
                    time.time() - t0,
                )
        if is_main():
            save_resume(resume_dir, model, optimizer, scheduler, epoch + 1, step, run_fingerprint(args))
            if args.eval_every and (epoch + 1) % args.eval_every == 0 and epoch + 1 < args.epochs:
                save_fn()
                log.info("epoch %d: %s", epoch + 1, json.dumps(evaluate_dir(args.out, limit=args.eval_limit)))
        if dist.is_initialized():
            dist.barrier()
    if is_main():
        save_fn()
        shutil.rmtree(resume_dir, ignore_errors=True)
        log.info("trained %d steps in %.1fs; saved %s", step, time.time() - t0, args.out)


# --- subcommands -------------------------------------------------------------------------------------


def limit_train(data: TaskData, n: int | None, seed: int) -> TaskData:
    """Keep a seeded random subset of n training examples (for quick runs such as the demo)."""
    if n and n < len(data.train):
        data.train = random.Random(seed).sample(data.train, n)
    return data


def all_texts(examples: list[Example]) -> list[str]:
    """Every text the examples carry, image-caption pairs' hard negatives too."""
    return [t for e in examples for t in (text_of(e), *(e.negatives if isinstance(e, PairExample) else ()))]


def cmd_teacher(args) -> int:
    spec = args.data or "easy-vqa"
    data = limit_train(load_data(spec, args.task), args.max_train, args.seed)
    texts = all_texts(data.train)
    if args.init and args.task != "itm" and checkpoint_task(args.init) == "itm":
        # Stage 2 from stage 1: the ITM teacher's ViLT and tokenizer, a new head, texts as long as these.
        base = load_teacher(args.init)
        max_len = text_length(base.text.tokenizer, texts, min(MAX_TEXT_LEN, base.config.max_position_embeddings))
        teacher = teacher_for_task(base, args.task, data.labels, spec, max_len)
    elif args.init:
        teacher = load_teacher(args.init, args.task, data=spec)
    else:
        tokenizer = train_wordpiece(texts, args.vocab_size)
        max_len = text_length(tokenizer, texts)
        teacher = build_teacher(args.size, args.task, data.labels, tokenizer, spec, args.dropout, max_len)
    train_set = ExampleDataset(data, "train", teacher.labels, teacher.text, teacher.image_spec, args.augment)
    model = teacher.model
    log.info(
        "teacher: %s, %.2fM parameters, %d train examples",
        type(model).__name__,
        sum(p.numel() for p in model.parameters()) / 1e6,
        len(train_set),
    )

    batches = batch_maker(args.task, args.seed)

    if args.grid_loss > 0:
        if not train_set.grid:
            raise ValueError(f"--grid-loss needs data with grid labels (--data scenes), not {spec!r}")
        if args.augment != "none":
            raise ValueError("--grid-loss needs --augment none: shifts and flips move shapes out of their cells")
        model = GridTrainee(model, GridProbe(teacher.config.hidden_size, CELL_CLASSES, NAMED_CLASSES, GRID))

    def step_fn(m, batch):
        return teacher_step(m, teacher, batches(batch), args.label_smoothing, args.grid_loss)

    train_loop(args, model, step_fn, train_set, lambda: teacher.save(args.out, {"training": training_settings(args)}))
    return 0


def training_settings(args) -> dict:
    """The optimisation settings a run used, saved beside its weights (the head multiplier as resolved)."""
    keys = ("lr", "head_lr_mult", "weight_decay", "warmup", "clip", "epochs", "batch_size", "augment", "dropout")
    keys += ("grid_loss",)
    return {k: getattr(args, k) for k in (*keys, "init", "seed") if hasattr(args, k)}


def cmd_distill(args) -> int:
    """DiDE distillation; `pretrain` is this with task itm (stage 1, on image-caption pairs)."""
    teacher = load_teacher(args.teacher, args.task, data=args.data)
    data = limit_train(load_data(args.data or teacher.data, args.task), args.max_train, args.seed)
    teacher.model.requires_grad_(False).eval()
    if args.init == "teacher":
        student = student_from_teacher(teacher, args.text_layers, args.dropout)
    elif args.init == "scratch":
        student = DualEncoderStudent(student_from_teacher(teacher, args.text_layers, args.dropout).config)
    elif is_vilt_checkpoint(args.init):  # the official way: a pre-trained ViLT in both towers
        student = student_from_pretrained(args.init, teacher, args.text_layers, args.dropout)
    else:
        student = student_for_teacher(args.init, teacher, args.dropout).train()
    w = loss_weights(args)
    train_set = ExampleDataset(
        data, "train", teacher.labels, teacher.text, teacher.image_spec, args.augment, blind=args.blind
    )
    log.info(
        "student: %.2fM parameters, weights %s, %d train examples",
        sum(p.numel() for p in student.parameters()) / 1e6,
        w,
        len(train_set),
    )
    device = setup_distributed()
    teacher.model.to(device)

    batches = batch_maker(args.task, args.seed)

    def step_fn(m, batch):
        return distill_step(m, teacher, batches(batch), args.task, w, args.label_smoothing)

    def save() -> None:
        save_student(
            student,
            args.out,
            labels=teacher.labels,
            tokenizer=teacher.text.tokenizer,
            image_spec=teacher.image_spec,
            data=args.data or teacher.data,
            extra={
                "blind": args.blind,
                "loss_weights": vars(w),
                "teacher": str(args.teacher),
                "ranking": teacher.ranking,
                "training": training_settings(args),
            },
        )

    train_loop(args, StudentTrainingView(student), step_fn, train_set, save)
    return 0


@torch.no_grad()
def evaluate_dir(
    model_dir: str | Path,
    data_spec: str | None = None,
    split: str = "test",
    limit: int | None = None,
    batch_size: int = 256,
) -> dict:
    """Accuracy (and VQA score for VQAv2) of a teacher or student directory on a split.

    For itm: each test pair with its caption and one negative (itm_pairs, a fixed seed); `n` counts both,
    or for a ranking head (an HF retrieval teacher and its students) the images, each right when its caption
    outscores the negative.
    """
    meta = read_config(model_dir) if (Path(model_dir) / "config.json").is_file() else {}
    if meta.get("kind") == "student":
        loaded = load_student(model_dir)
        model, labels, spec, text, task = (
            loaded.model,
            loaded.labels,
            loaded.image_spec,
            loaded.text,
            loaded.model.config.task,
        )
        spec_str, blind, ranking = data_spec or loaded.data, meta.get("blind"), meta.get("ranking", False)

        def forward(b):
            return model(b["input_ids"], b["attention_mask"], b["pixels"], b.get("pixels2"))
    else:
        teacher = load_teacher(model_dir)
        labels, spec, text, task = teacher.labels, teacher.image_spec, teacher.text, teacher.task
        spec_str, blind, ranking = data_spec or teacher.data, None, teacher.ranking

        def forward(b):
            return teacher.forward(b["input_ids"], b["attention_mask"], b["pixels"], b.get("pixels2")).logits

    data = load_data(spec_str, task)
    if limit:
        setattr(data, split, getattr(data, split)[:limit])
    ds = ExampleDataset(data, split, labels, text, spec, blind=blind)
    batches = batch_maker(task, seed=0)
    correct, score, n = 0.0, 0.0, 0
    for batch in DataLoader(ds, batch_size=batch_size):
        batch = batches(batch)
        logits, target = forward(batch), batch["target"]
        if ranking:  # a ranking score: right when an image's caption outscores its negative; n counts images
            scores = logits[:, 0][batch["pairs"]]  # (P, 2)
            got = (scores[:, 0] > scores[:, 1]).float()
        elif task == "itm":  # one logit: right when its sign says whether the pair matches
            got = (target[:, 0] > 0.5).eq(logits[:, 0] > 0).float()
        else:
            got = target.gather(1, logits.argmax(-1)[:, None])[:, 0]
        correct += float((got >= 1.0 - 1e-6).sum()) if task != "vqa" else float((got > 0).sum())
        score += float(got.sum())
        n += len(got)
    result = {"accuracy": correct / max(n, 1), "n": n, "task": task, "data": spec_str, "split": split}
    if spec_str.startswith("vqav2"):
        result["vqa_score"] = score / max(n, 1)
    return result


def cmd_eval(args) -> int:
    result = evaluate_dir(args.model, args.data, args.split, args.limit)
    print(json.dumps(result))
    return 0


# --- CLI ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dide-train", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser, train: bool = True, task: bool = True) -> None:
        if task:
            sp.add_argument(
                "--task", choices=TASKS, required=train, help="vqa, entailment, reasoning or itm (image-text matching)"
            )
        sp.add_argument(
            "--data",
            default=None,
            help="easy-vqa, scenes[:train=N,test=N,seed=S], vqav2:DIR, snli-ve:DIR, nlvr2:DIR; for itm also "
            "coco:CAPTIONS_JSON[,images=DIR], pairs:FILE.tsv|FILE.jsonl "
            "(default: teacher easy-vqa; distill, pretrain and eval: the data the model was trained on)",
        )
        if not train:
            return
        sp.add_argument("--out", required=True, help="output directory for the trained model")
        sp.add_argument("--epochs", type=int, default=10, help="passes over the training set")
        sp.add_argument("--max-train", type=int, default=None, help="train on a seeded random subset of N examples")
        sp.add_argument("--batch-size", type=int, default=64, help="batch size per process")
        sp.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
        sp.add_argument(
            "--head-lr-mult",
            type=float,
            default=None,
            help="learning-rate multiplier for the task head (default as the official configs: 10 for vqa, else 1)",
        )
        sp.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
        sp.add_argument("--warmup", type=float, default=0.1, help="warm-up as a fraction of all steps")
        sp.add_argument(
            "--clip", type=float, default=1.0, help="gradient-norm clipping (0: none, as the official code)"
        )
        sp.add_argument("--label-smoothing", type=float, default=0.0, help="for the cross-entropy GT loss")
        sp.add_argument(
            "--augment",
            choices=("none", "shift", "flip"),
            default="shift",
            help="training-image augmentation: none, small shifts, or shifts + mirror flips",
        )
        sp.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
        sp.add_argument("--seed", type=int, default=0, help="random seed")
        sp.add_argument("--log-every", type=int, default=50, help="log a line every N steps")
        sp.add_argument("--eval-every", type=int, default=0, help="evaluate on the test split every N epochs")
        sp.add_argument("--eval-limit", type=int, default=2000, help="examples for the periodic evaluation")
        sp.add_argument("--restart", action="store_true", help="ignore an interrupted run's resume state")
        sp.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = default)")

    t = sub.add_parser("teacher", help="fine-tune a ViLT teacher with the ground-truth loss")
    common(t)
    t.add_argument("--size", choices=sorted(SIZES), default="small", help="from-scratch teacher size")
    t.add_argument(
        "--init",
        default=None,
        help="start from a teacher or HF ViLT checkpoint directory instead; from an itm teacher (stage 1) a "
        "vqa, entailment or reasoning teacher gets a new head and keeps its ViLT weights and tokenizer",
    )
    t.add_argument("--vocab-size", type=int, default=1000, help="WordPiece vocabulary for from-scratch models")
    t.add_argument("--dropout", type=float, default=0.1, help="dropout of a from-scratch teacher")
    t.add_argument(
        "--grid-loss",
        type=float,
        default=0.0,
        help="weight of the auxiliary grid losses on scenes (what each cell shows, which cells the text names)",
    )

    def distillation(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--teacher", required=True, help="a `dide-train teacher` output or a HF ViLT checkpoint dir")
        sp.add_argument(
            "--init",
            default="teacher",
            help="student initialisation: teacher (its ViLT weights in both towers), scratch, a HF ViLT checkpoint "
            "directory with the teacher's tokenizer.json (e.g. a pre-trained ViltModel/ViltForMaskedLM, or an ITM "
            "teacher: both towers start from it, as the official code), or a student directory (e.g. stage 1's "
            "`pretrain` output: its towers and fusion, a new head for this task)",
        )
        sp.add_argument("--dropout", type=float, default=0.1, help="the student towers' dropout (official: 0.1)")
        sp.add_argument("--text-layers", type=int, default=None, help="a shallower text tower (default: teacher's)")
        sp.add_argument("--w-gt", type=float, default=0.0, help="weight of the ground-truth loss (official: 0)")
        sp.add_argument("--w-pred", type=float, default=1.0, help="weight of prediction distillation")
        sp.add_argument("--w-attn", type=float, default=1.0, help="weight of cross-modal attention distillation")
        sp.add_argument("--no-t2i", action="store_true", help="drop the text-to-image attention term")
        sp.add_argument("--no-i2t", action="store_true", help="drop the image-to-text attention term")

    d = sub.add_parser("distill", help="DiDE: distil a teacher into a dual-encoder student")
    common(d)
    distillation(d)
    d.add_argument(
        "--blind",
        choices=("image", "text"),
        default=None,
        help="baseline: blank the image (text-only) or the text (image-only)",
    )

    pt = sub.add_parser(
        "pretrain",
        help="DiDE stage 1: distil an image-text matching teacher into a dual-encoder student on image-caption "
        "pairs, each with a matched and a mismatched caption",
    )
    common(pt, task=False)
    distillation(pt)
    pt.set_defaults(task="itm", blind=None)

    e = sub.add_parser("eval", help="accuracy of a teacher or student on a split; prints one JSON object")
    common(e, train=False)
    e.add_argument("--model", required=True, help="a teacher or student directory")
    e.add_argument("--split", choices=("train", "test"), default="test", help="which split")
    e.add_argument("--limit", type=int, default=None, help="evaluate the first N examples only")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, with the head learning-rate multiplier defaulting to its task's (HEAD_LR_MULT)."""
    args = build_parser().parse_args(argv)
    if getattr(args, "head_lr_mult", 0.0) is None:
        args.head_lr_mult = HEAD_LR_MULT.get(args.task, 1.0)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    if hasattr(args, "seed"):
        random.seed(args.seed)
        np.random.seed(args.seed)
        torch.manual_seed(args.seed)
    try:
        commands = {"teacher": cmd_teacher, "distill": cmd_distill, "pretrain": cmd_distill, "eval": cmd_eval}
        return commands[args.command](args)
    except (ValueError, OSError) as e:  # bad flags, data or checkpoints: a message, not a traceback
        print(f"dide-train: error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
