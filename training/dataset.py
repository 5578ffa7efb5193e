"""Examples as tensors for training and evaluation: the dataset, image-text matching pairs, augmentation."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from tqdm import tqdm

from core.preprocess import decode_rgb, normalize
from training.distributed import is_main
from training.examples import Example, PairExample, TaskData, images_of, target_of, text_of


class ExampleDataset(Dataset):
    """Examples as tensors: token ids and mask (pre-tokenised), pixels (decoded once), target scores, and each
    example's index in its split (what `steps.TeacherCache` keeps the teacher's outputs by).

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
        self.grid = data.grid if grids and all(g is not None for g in grids) else None  # free cell labels
        if self.grid:
            self.cells = torch.tensor([g.cells for g in grids])  # (E, I, G*G) class ids
        self.named = bool(self.grid and self.grid.named_classes)  # the scenes: which cells the text names
        if self.named:
            self.named_ids = torch.tensor([g.named for g in grids], dtype=torch.uint8)  # (E, I, G*G)
        self.facts = bool(self.grid) and all(g.facts is not None for g in grids)  # reasoning: each image's fact
        if self.facts:
            self.fact_ids = torch.tensor([g.facts for g in grids])  # (E, I) classes
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
        item = {"index": torch.tensor(i), "input_ids": self.ids[i], "attention_mask": self.mask[i]}
        item["target"] = self.targets[i]
        item["pixels"] = self.pixels(images[0])
        if len(images) == 2:
            item["pixels2"] = self.pixels(images[1])
        if self.grid:
            item["cells"] = self.cells[i]
        if self.named:
            item["named"] = self.named_ids[i]
        if self.facts:
            item["facts"] = self.fact_ids[i]
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
    a ranking teacher's softmax over an image's captions. Grid labels (the scenes) follow their rows: an image's
    cells hold for any caption, which cells a caption names only for its own, so a negative's are -100 (unknown).
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
    out = {
        "input_ids": torch.stack([*ids, *neg_ids]),  # (B + n, L)
        "attention_mask": torch.stack([*mask, *neg_mask]),
        "pixels": torch.cat([batch["pixels"], batch["pixels"][rows_index]]),
        "target": torch.cat([target, target.new_zeros(len(rows), 1)]),
        "pairs": torch.stack([rows_index, len(ids) + torch.arange(len(rows), device=ids.device)], dim=1),
    }
    if "cells" in batch:  # (B, 1, G*G) -> (B + n, 1, G*G)
        out["cells"] = torch.cat([batch["cells"], batch["cells"][rows_index]])
    if "named" in batch:
        named = batch["named"].long()  # uint8 cannot hold -100
        out["named"] = torch.cat([named, torch.full_like(named[rows_index], -100)])
    return out


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
