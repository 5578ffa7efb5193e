"""The one training loop: AdamW parameter groups, warm-up and linear decay, DDP, periodic resumable
checkpoints."""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from core.atomic import atomic_directory
from training.dataset import ExampleDataset
from training.distributed import is_main, setup_distributed
from training.evaluate import evaluate_dir

log = logging.getLogger(__name__)

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


def rng_state() -> dict:
    """The global generators training draws from: torch (shuffling, dropout) and Python's (augmentation)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_resume(
    path: Path, model: nn.Module, optimizer, scheduler, epoch: int, step: int, run: dict, early: dict | None = None
) -> None:
    """Model, optimizer and random-generator state (and --patience's record) for resuming, so a resumed run
    continues as the uninterrupted one would; written to a temp dir and renamed (never half-written)."""
    model = getattr(model, "module", model)

    def write(tmp: Path) -> None:
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors")
        )
        opt = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()}
        torch.save(opt, tmp / "optim.pt")
        (tmp / "state.json").write_text(json.dumps({"epoch": epoch, "step": step, "run": run, "early": early}))

    atomic_directory(path, write)


def load_resume(path: Path, model: nn.Module, optimizer, scheduler, run: dict) -> tuple[int, int, dict | None]:
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
    if "rng" in opt:  # a resume state from before this was kept: the run goes on with fresh draws
        set_rng_state(opt["rng"])
    return state["epoch"], state["step"], state.get("early")


CHANCE_MARGIN = 0.02  # a best accuracy within this of always giving the most frequent answer is still chance


class EarlyStop:
    """Training until the periodic test accuracy stops improving (`--patience K`): stop after K evaluations in a
    row none of which beats the best so far, and keep the best model. `--epochs` is then a cap (the learning
    rate still decays over it). The count starts once the best has left chance (more than CHANCE_MARGIN above
    the evaluated examples' majority-answer rate): a student that sits at chance for a while before it learns,
    as the scenes reasoning students do for up to 1,000 steps, is waiting, not done. The best model is copied
    to OUT.best when it is evaluated (atomically), moved back to OUT at the end, and what was kept is written
    to OUT.stopping.json."""

    def __init__(self, out: Path, patience: int) -> None:
        self.out, self.patience = out, patience
        self.best_dir = out.with_name(out.name + ".best")
        self.best: dict | None = None
        self.waited = 0

    def state(self) -> dict:
        """What a resumed run needs to go on counting (kept in the resume state)."""
        return {"best": self.best, "waited": self.waited}

    def restore(self, state: dict | None) -> None:
        if state:
            self.best, self.waited = state["best"], state["waited"]

    def update(self, accuracy: float, epoch: int, step: int, majority: float | None = None) -> bool:
        """Record one evaluation of the model just saved to OUT (`majority`: the rate of always giving the most
        frequent answer on the same examples, None where there is none); whether to stop."""
        if self.best is None or accuracy > self.best["accuracy"]:
            atomic_directory(self.best_dir, lambda tmp: shutil.copytree(self.out, tmp, dirs_exist_ok=True))
            self.best, self.waited = {"accuracy": accuracy, "epoch": epoch, "step": step}, 0
        elif majority is None or self.best["accuracy"] > majority + CHANCE_MARGIN:
            self.waited += 1
        if majority is not None:
            self.best["majority"] = majority
        return self.waited >= self.patience

    def finish(self, epochs_run: int, steps_run: int) -> None:
        """Put the best model in OUT and say what was kept."""
        atomic_directory(self.out, lambda tmp: shutil.copytree(self.best_dir, tmp, dirs_exist_ok=True))
        shutil.rmtree(self.best_dir, ignore_errors=True)
        record = {**self.best, "patience": self.patience, "epochs_run": epochs_run, "steps_run": steps_run}
        if "majority" in record:  # patience counted only once the best was this far above it (update)
            record["chance_margin"] = CHANCE_MARGIN
        self.out.with_name(self.out.name + ".stopping.json").write_text(json.dumps(record) + "\n")
        log.info("kept epoch %d (step %d): accuracy %.4f, after %d epochs", self.best["epoch"], self.best["step"],
                 self.best["accuracy"], epochs_run)  # fmt: skip


def stop_agreed(stop: bool, device: torch.device) -> bool:
    """Rank 0's decision, on every rank (so all leave the loop together); on `device` for NCCL."""
    if not dist.is_initialized():
        return stop
    flag = torch.tensor([int(stop)], device=device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def train_loop(args, model: nn.Module, step_fn, train_set: ExampleDataset, save_fn) -> None:
    """The one loop: AdamW, warm-up + linear decay, DDP, progress, periodic resumable checkpoints, and with
    --patience training until the test accuracy stops improving (EarlyStop)."""
    if args.patience < 0:
        raise ValueError(f"--patience must be 0 (off) or a number of evaluations, got {args.patience}")
    if args.patience and not args.eval_every:
        raise ValueError("--patience needs --eval-every N: it stops on the periodic test accuracy")
    device = setup_distributed()  # before is_main(): every process is rank 0 until then
    out = Path(args.out)
    if is_main():  # a record of an earlier run's early stop says nothing about this one
        out.with_name(out.name + ".stopping.json").unlink(missing_ok=True)
    early = EarlyStop(out, args.patience) if args.patience and is_main() else None
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
    resume_dir = out.with_name(out.name + ".resume")
    epoch0, step = 0, 0
    if resume_dir.is_dir() and not args.restart:
        epoch0, step, early_state = load_resume(resume_dir, model, optimizer, scheduler, run_fingerprint(args))
        if early is not None:
            early.restore(early_state)
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
        stop = False
        if is_main():
            record = early.state() if early else None  # as of the evaluations before this epoch's
            save_resume(resume_dir, model, optimizer, scheduler, epoch + 1, step, run_fingerprint(args), record)
            due = args.eval_every and (epoch + 1) % args.eval_every == 0
            if due and (epoch + 1 < args.epochs or early):  # the last model is evaluated by `eval`, unless stopping
                kept = rng_state()  # evaluating builds a model: its draws must not change the rest of training
                save_fn()
                result = evaluate_dir(args.out, limit=args.eval_limit)
                set_rng_state(kept)
                log.info("epoch %d: %s", epoch + 1, json.dumps(result))
                stop = early is not None and early.update(result["accuracy"], epoch + 1, step, result.get("majority"))
        if dist.is_initialized():
            dist.barrier()
        if stop_agreed(stop, device):
            break
    if is_main():
        if early is not None and early.best is not None:
            early.finish(epoch + 1, step)
        else:
            save_fn()
        shutil.rmtree(resume_dir, ignore_errors=True)
        log.info("trained %d steps in %.1fs; saved %s", step, time.time() - t0, args.out)
