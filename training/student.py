"""The DiDE dual-encoder student: ViLT-shaped image and text towers, a fusion MLP and task heads."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from torch import Tensor, nn

from core.atomic import atomic_directory
from core.preprocess import ImageSpec, TextEncoder


@dataclass
class StudentConfig:
    task: str  # "vqa" | "entailment" | "reasoning" | "itm" (image-text matching: one logit)
    num_labels: int
    vocab_size: int
    max_text_len: int  # L
    image_size: int  # square input, H = W
    patch_size: int
    hidden_size: int  # D
    num_layers: int  # image tower depth
    text_layers: int  # text tower depth
    num_heads: int
    intermediate_size: int
    layer_norm_eps: float = 1e-12
    # Hidden dropout as the official towers' drop_rate: on the embeddings, after attention and inside and
    # after the MLP; none on attention probabilities (timm's attn_drop 0). dide-train sets 0.1 (official).
    dropout: float = 0.0
    # The fusion MLP's input: "concat" is the paper's [t; v]; "product" adds the elementwise product,
    # [t; v; t*v], a bilinear interaction (see DualEncoderStudent.fuse).
    fusion: str = "concat"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def tiny_config(task: str, num_labels: int, vocab_size: int) -> StudentConfig:
    """A config small enough for tests to run in seconds."""
    return StudentConfig(task=task, num_labels=num_labels, vocab_size=vocab_size, max_text_len=16, image_size=32,
                         patch_size=8, hidden_size=32, num_layers=2, text_layers=2, num_heads=2,
                         intermediate_size=64)  # fmt: skip


class TowerOutput(NamedTuple):
    pooled: Tensor  # (B, D)
    query: Tensor | None  # last layer's queries (B, H, N, hs), only when asked
    key: Tensor | None  # last layer's keys (B, H, N, hs)


class SelfAttention(nn.Module):
    """Multi-head self-attention with the parameter names of HF ViLT (query/key/value/output)."""

    def __init__(self, cfg: StudentConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_size = cfg.hidden_size // cfg.num_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.output = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        B, N, _ = x.shape
        q = self.query(x).view(B, N, self.num_heads, self.head_size).transpose(1, 2)  # (B, H, N, hs)
        k = self.key(x).view(B, N, self.num_heads, self.head_size).transpose(1, 2)
        v = self.value(x).view(B, N, self.num_heads, self.head_size).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_size)  # (B, H, N, N)
        if bias is not None:
            scores = scores + bias
        probs = scores.softmax(dim=-1)
        out = (probs @ v).transpose(1, 2).reshape(B, N, -1)
        return self.output(out), q, k


class Block(nn.Module):
    """A pre-LN transformer block, as ViltLayer: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, cfg: StudentConfig) -> None:
        super().__init__()
        self.layernorm_before = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attention = SelfAttention(cfg)
        self.layernorm_after = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.intermediate = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.output = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        a, q, k = self.attention(self.layernorm_before(x), bias)
        x = x + self.dropout(a)
        x = x + self.dropout(self.output(self.dropout(F.gelu(self.intermediate(self.layernorm_after(x))))))
        return x, q, k


class Encoder(nn.Module):
    """A stack of blocks, a final LayerNorm and a tanh pooler on the first token."""

    def __init__(self, cfg: StudentConfig, depth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(cfg) for _ in range(depth)])
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.pooler = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: Tensor, bias: Tensor | None, keep_qk: bool) -> TowerOutput:
        for layer in self.layers:
            x, q, k = layer(x, bias)
        pooled = torch.tanh(self.pooler(self.layernorm(x)[:, 0]))
        return TowerOutput(pooled, q if keep_qk else None, k if keep_qk else None)


class TextTower(nn.Module):
    """BERT-style embeddings (word + position + token type, LayerNorm) + the text modality type + blocks."""

    def __init__(self, cfg: StudentConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_text_len, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(2, cfg.hidden_size)
        self.embed_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.modality_embedding = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.dropout = nn.Dropout(cfg.dropout)
        self.encoder = Encoder(cfg, cfg.text_layers)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, keep_qk: bool = False) -> TowerOutput:
        L = input_ids.shape[1]
        pos = torch.arange(L, device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos) + self.token_type_embeddings.weight[0]
        x = self.dropout(self.embed_norm(x)) + self.modality_embedding  # (B, L, D)
        # Additive key mask: 0 for real tokens, a large finite negative for padding.
        bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        return self.encoder(x, bias, keep_qk)


class ImageTower(nn.Module):
    """ViT embeddings (patch projection, image [CLS], position) + the image modality type + blocks."""

    def __init__(self, cfg: StudentConfig) -> None:
        super().__init__()
        self.patch_projection = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.position_embeddings = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, cfg.hidden_size))
        self.modality_embedding = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.dropout = nn.Dropout(cfg.dropout)
        self.encoder = Encoder(cfg, cfg.num_layers)

    def forward(self, pixels: Tensor, keep_qk: bool = False) -> TowerOutput:
        x = self.patch_projection(pixels).flatten(2).transpose(1, 2)  # (B, N, D), raster order
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.position_embeddings
        x = self.dropout(x) + self.modality_embedding
        return self.encoder(x, None, keep_qk)


# The fusion MLP's input width, in embeddings, per kind of fusion.
FUSIONS = {"concat": 2, "product": 3}


def mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    """Linear -> LayerNorm -> GELU -> Linear, the shape of ViLT's heads and DiDE's fusion."""
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.LayerNorm(d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out))


class DualEncoderStudent(nn.Module):
    """Image tower, text tower, fusion MLP over [text; image] and a ViLT-shaped task head."""

    def __init__(self, cfg: StudentConfig) -> None:
        super().__init__()
        if cfg.hidden_size % cfg.num_heads:
            raise ValueError(f"hidden_size {cfg.hidden_size} is not a multiple of num_heads {cfg.num_heads}")
        self.config = cfg
        if cfg.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}, got {cfg.fusion!r}")
        D = cfg.hidden_size
        self.image_tower = ImageTower(cfg)
        self.text_tower = TextTower(cfg)
        self.fusion = mlp(FUSIONS[cfg.fusion] * D, 2 * D, D)
        if cfg.task == "reasoning":  # NLVR2: fuse with each image, classify the concatenation
            self.classifier = mlp(2 * D, 2 * D, cfg.num_labels)
        else:
            self.classifier = mlp(D, 2 * D, cfg.num_labels)
        self.apply(_init_weights)

    def encode_image(self, pixels: Tensor) -> Tensor:
        return self.image_tower(pixels).pooled

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.text_tower(input_ids, attention_mask).pooled

    def fuse(self, text_emb: Tensor, image_emb: Tensor) -> Tensor:
        """The fusion MLP over one text and one image embedding.

        With "product" its first layer also sees t*v. The paper's [t; v] leaves every text-image interaction
        to the MLP's one nonlinearity; with perfect scene codes in place of the towers, that head stayed at
        chance on scenes reasoning for 6 epochs where [t; v; t*v] learnt (bench/results/fusion_oracle.md). The
        first layer stays linear in v for a given t, so collection search still scans cached vectors
        (export/search.py)."""
        parts = [text_emb, image_emb]
        if self.config.fusion == "product":
            parts.append(text_emb * image_emb)
        return self.fusion(torch.cat(parts, dim=-1))

    def head(self, text_emb: Tensor, image_emb: Tensor, image_emb2: Tensor | None = None) -> Tensor:
        fused = self.fuse(text_emb, image_emb)
        if self.config.task == "reasoning":
            if image_emb2 is None:
                raise ValueError("the reasoning head needs two image embeddings")
            fused = torch.cat([fused, self.fuse(text_emb, image_emb2)], dim=-1)
        return self.classifier(fused)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, pixels: Tensor, pixels2: Tensor | None = None):
        image2 = self.encode_image(pixels2) if pixels2 is not None else None
        return self.head(self.encode_text(input_ids, attention_mask), self.encode_image(pixels), image2)


def _init_weights(module: nn.Module) -> None:
    """normal(0, 0.02) weights, zero biases, unit LayerNorms (as ViLT's init_weights)."""
    if isinstance(module, (nn.Linear, nn.Embedding, nn.Conv2d)):
        nn.init.normal_(module.weight, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, (ImageTower,)):
        nn.init.normal_(module.cls_token, std=0.02)
        nn.init.normal_(module.position_embeddings, std=0.02)


# --- checkpoints -------------------------------------------------------------------------------------


CHECKPOINT_FILES = ("model.safetensors", "tokenizer.json")


@dataclass
class LoadedStudent:
    model: DualEncoderStudent  # in eval mode
    labels: list[str]
    image_spec: ImageSpec
    text: TextEncoder
    data: str  # the data spec it was trained on
    sha256: str  # of model.safetensors


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_student(
    model: DualEncoderStudent,
    directory: str | Path,
    *,
    labels: list[str],
    tokenizer: Tokenizer,
    image_spec: ImageSpec,
    data: str,
    extra: dict | None = None,
) -> None:
    """Write model.safetensors + config.json + tokenizer.json atomically; the directory alone rebuilds it."""
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    config = {
        "kind": "student",
        "student": asdict(model.config),
        "labels": list(labels),
        "image_spec": image_spec.to_dict(),
        "max_text_len": model.config.max_text_len,
        "data": data,
        **(extra or {}),
    }

    def write(tmp: Path) -> None:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        tokenizer.save(str(tmp / "tokenizer.json"))
        # The checkpoint is verified against these before use (load_student).
        config["sha256"] = {name: file_sha256(tmp / name) for name in CHECKPOINT_FILES}
        (tmp / "config.json").write_text(json.dumps(config, indent=2))

    atomic_directory(directory, write)


def read_config(directory: str | Path) -> dict:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {directory} a checkpoint directory?")
    return json.loads(path.read_text())


def load_student(directory: str | Path) -> LoadedStudent:
    directory = Path(directory)
    meta = read_config(directory)
    if meta.get("kind") != "student":
        raise ValueError(f"{directory} holds a {meta.get('kind', 'non-DiDE')!r} checkpoint, not a student")
    hashes = {name: file_sha256(directory / name) for name in CHECKPOINT_FILES}
    for name, expected in meta.get("sha256", {}).items():
        if hashes.get(name) != expected:
            raise ValueError(f"{directory / name}: sha256 does not match config.json: the checkpoint is damaged")
    cfg = StudentConfig(**meta["student"])
    model = DualEncoderStudent(cfg)
    model.load_state_dict(load_file(str(directory / "model.safetensors")))
    model.eval()
    return LoadedStudent(
        model=model,
        labels=meta["labels"],
        image_spec=ImageSpec.from_dict(meta["image_spec"]),
        text=TextEncoder.from_file(directory / "tokenizer.json", cfg.max_text_len),
        data=meta["data"],
        sha256=hashes["model.safetensors"],
    )
