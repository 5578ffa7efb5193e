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

This file holds the command line; the data as tensors is in `dataset.py`, the losses of a step in `steps.py`,
the loop in `loop.py`, the accuracy of a saved model in `evaluate.py`.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys

import numpy as np
import torch
import torch.distributed as dist

from training.data import load_data
from training.dataset import ExampleDataset, batch_maker
from training.distributed import setup_distributed
from training.evaluate import evaluate_dir
from training.examples import TASKS, Example, PairExample, TaskData, text_of
from training.grid import GridProbe, GridTrainee, SceneProbe
from training.loop import CHANCE_MARGIN, HEAD_LR_MULT, train_loop
from training.scene_language import FACT_CLASSES
from training.steps import StudentTrainingView, TeacherCache, distill_step, loss_weights, teacher_step
from training.student import FUSIONS, DualEncoderStudent, save_student
from training.teacher import (
    MAX_TEXT_LEN,
    SIZES,
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
        require_grid_labels(train_set, spec, args.augment)
        facts = FACT_CLASSES if train_set.facts else 0  # reasoning: each image's fact, read from its pooled output
        g = train_set.grid
        model = GridTrainee(
            model, GridProbe(teacher.config.hidden_size, g.cell_classes, g.named_classes, g.side, facts)
        )

    def step_fn(m, batch):
        return teacher_step(m, teacher, batches(batch), args.label_smoothing, args.grid_loss)

    train_loop(args, model, step_fn, train_set, lambda: teacher.save(args.out, {"training": training_settings(args)}))
    return 0


def require_grid_labels(train_set: ExampleDataset, spec: str, augment: str) -> None:
    """--grid-loss needs free image labels (the scenes' cells, easy-VQA's one shape), and on a grid of
    cells the shapes left in them."""
    if not train_set.grid:
        raise ValueError(f"--grid-loss needs data with grid labels (--data scenes or easy-vqa), not {spec!r}")
    if augment != "none" and train_set.grid.side > 1:
        raise ValueError("--grid-loss needs --augment none here: shifts and flips move shapes out of their cells")


def training_settings(args) -> dict:
    """The optimisation settings a run used, saved beside its weights (the head multiplier as resolved)."""
    keys = ("lr", "head_lr_mult", "weight_decay", "warmup", "clip", "epochs", "batch_size", "augment", "dropout")
    keys += ("grid_loss",)
    return {k: getattr(args, k) for k in (*keys, "init", "seed") if hasattr(args, k)}


def cmd_distill(args) -> int:
    """DiDE distillation; `pretrain` is this with task itm (stage 1, on image-caption pairs)."""
    if args.teacher_cache_gib < 0:
        raise ValueError(f"--teacher-cache-gib must be 0 (off) or a size in GiB, got {args.teacher_cache_gib}")
    teacher = load_teacher(args.teacher, args.task, data=args.data)
    data = limit_train(load_data(args.data or teacher.data, args.task), args.max_train, args.seed)
    teacher.model.requires_grad_(False).eval()
    if args.init == "teacher":
        student = student_from_teacher(teacher, args.text_layers, args.dropout, args.fusion)
    elif args.init == "scratch":
        student = DualEncoderStudent(student_from_teacher(teacher, args.text_layers, args.dropout, args.fusion).config)
    elif is_vilt_checkpoint(args.init):  # the official way: a pre-trained ViLT in both towers
        student = student_from_pretrained(args.init, teacher, args.text_layers, args.dropout, args.fusion)
    else:
        student = student_for_teacher(args.init, teacher, args.dropout).train()
        if student.config.fusion != args.fusion:
            raise ValueError(f"{args.init} fuses with {student.config.fusion!r}: pass --fusion {student.config.fusion}")
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
    probe = None
    if w.facts > 0 and not train_set.facts:
        raise ValueError("--fact-loss needs two-image scenes statements (--task reasoning on scenes)")
    if w.facts > 0 and w.grid <= 0:
        raise ValueError("--fact-loss needs --grid-loss > 0: the facts are read by the scene probe")
    if w.grid > 0:
        require_grid_labels(train_set, args.data or teacher.data, args.augment)
        g = train_set.grid
        probe = SceneProbe(student.config.hidden_size, g.cell_classes, g.side, FACT_CLASSES if w.facts > 0 else 0)
    device = setup_distributed()
    teacher.model.to(device)

    batches = batch_maker(args.task, args.seed)
    cache = None
    if args.teacher_cache_gib > 0 and args.augment == "none" and args.task != "itm" and (w.pred > 0 or w.attention):
        cache = TeacherCache(teacher, len(train_set), w.attention, args.teacher_cache_gib * 2**30)

    def step_fn(m, batch):
        return distill_step(m, teacher, batches(batch), args.task, w, args.label_smoothing, cache)

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

    train_loop(args, StudentTrainingView(student, probe), step_fn, train_set, save)
    return 0


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
        sp.add_argument(
            "--patience",
            type=int,
            default=0,
            help="stop once K periodic evaluations in a row do not beat the best, keeping the best (--epochs: a cap); "
            f"counted only once the best has left chance ({100 * CHANCE_MARGIN:g} points above the majority-answer "
            "rate)",
        )
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
        help="weight of the auxiliary grid losses: what each cell shows (scenes: 4x4 cells; easy-VQA: the one "
        "coloured shape) and on the scenes which cells the text names",
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
        sp.add_argument(
            "--fusion",
            choices=tuple(FUSIONS),
            default="concat",
            help="the fusion MLP's input: concat [t; v] (the paper's) or product [t; v; t*v] (a bilinear term)",
        )
        sp.add_argument("--w-gt", type=float, default=0.0, help="weight of the ground-truth loss (official: 0)")
        sp.add_argument("--w-pred", type=float, default=1.0, help="weight of prediction distillation")
        sp.add_argument("--w-attn", type=float, default=1.0, help="weight of cross-modal attention distillation")
        sp.add_argument("--no-t2i", action="store_true", help="drop the text-to-image attention term")
        sp.add_argument("--no-i2t", action="store_true", help="drop the image-to-text attention term")
        sp.add_argument(
            "--grid-loss",
            type=float,
            default=0.0,
            help="weight of the scene probe (scenes, easy-VQA): each cell's class read from the pooled image embedding",
        )
        sp.add_argument(
            "--teacher-cache-gib",
            type=float,
            default=4.0,
            help="keep the teacher's outputs for each training example from the first epoch on, in at most this "
            "much CPU memory (GiB; 0: off); used only where they cannot change between epochs (--augment none, "
            "not itm)",
        )
        sp.add_argument(
            "--fact-loss",
            type=float,
            default=0.0,
            help="reasoning scenes: weight of each image's fact read from the fusion of the text with that image",
        )

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
