"""The fusion-encoder teacher: a thin wrapper over Hugging Face ViLT with the task heads (and ITM's)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import torch
from tokenizers import Tokenizer
from torch import Tensor, nn
from transformers import (
    ViltConfig,
    ViltForImageAndTextRetrieval,
    ViltForImagesAndTextClassification,
    ViltForQuestionAnswering,
    ViltModel,
)

from core.atomic import atomic_directory
from core.preprocess import ImageSpec, TextEncoder
from training.examples import ENTAILMENT_LABELS, ITM_LABELS, REASONING_LABELS
from training.student import DualEncoderStudent, StudentConfig, load_student
from training.tokenizer import load_checkpoint_tokenizer

# Named from-scratch sizes. `base` is ViLT-B/32; `small` is the report model for 64x64 easy-VQA and scenes,
# `mini` (16x16 patches, 4x fewer image tokens) the demo's; `tiny` is for tests.
SIZES: dict[str, dict] = {
    "tiny": dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8
    ),
    "mini": dict(
        hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512, image_size=64, patch_size=16
    ),
    "small": dict(
        hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512, image_size=64, patch_size=8
    ),
    "base": dict(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        image_size=384,
        patch_size=32,
    ),
}
log = logging.getLogger(__name__)
MAX_TEXT_LEN = 40  # position embeddings of from-scratch teachers (ViLT's max_text_len)

TeacherModel = ViltForQuestionAnswering | ViltForImagesAndTextClassification | ViltForImageAndTextRetrieval


def model_class(task: str) -> type[TeacherModel]:
    """The HF ViLT class of a task: NLVR2's two-image classifier, the ITM scorer, else the VQA classifier
    (which, with a 3-way head, is also the entailment model)."""
    if task == "reasoning":
        return ViltForImagesAndTextClassification
    return ViltForImageAndTextRetrieval if task == "itm" else ViltForQuestionAnswering


class FusionOutput(NamedTuple):
    logits: Tensor  # (B, C)
    # Last-layer queries/keys per image pass, split by modality, image patches in raster order:
    # (q_text (B,H,L,hs), k_text, q_image (B,H,1+N,hs), k_image); one tuple per image (two for NLVR2).
    qk: list[tuple[Tensor, Tensor, Tensor, Tensor]]


@dataclass
class Teacher:
    """A ViLT task model with what DiDE needs from it: logits and last-layer cross-modal q/k."""

    model: TeacherModel
    task: str
    labels: list[str]
    image_spec: ImageSpec
    text: TextEncoder
    data: str
    # ITM only: the logit is a ranking score, trained with a softmax over one image's captions (HF's
    # ViltForImageAndTextRetrieval checkpoints, as ViLT's retrieval fine-tuning), not a match logit
    # trained with BCE (`dide-train teacher --task itm`): distilled and scored per image, never by its sign.
    ranking: bool = False

    def __post_init__(self) -> None:
        _raster_order_patches(self.model.vilt.embeddings)

    @property
    def config(self) -> ViltConfig:
        return self.model.config

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        pixels: Tensor,
        pixels2: Tensor | None = None,
        keep_qk: bool = False,
    ) -> FusionOutput:
        """Logits and, with `keep_qk`, the last layer's q/k. Draws nothing from the global generators: HF ViLT
        shuffles the patches with torch.multinomial even in eval mode (undone here, `_raster_order_patches`),
        and that draw would otherwise shift the student's shuffles and dropout, and make a run that takes the
        teacher's outputs from `steps.TeacherCache` a different run."""
        if self.task == "reasoning":
            if pixels2 is None:
                raise ValueError("the reasoning teacher needs two images")
            pixels = torch.stack([pixels, pixels2], dim=1)
        captured: list[tuple[Tensor, Tensor]] = []
        hooks = []
        if keep_qk:
            attn = self.model.vilt.encoder.layer[-1].attention.attention
            store: dict[str, Tensor] = {}
            hooks.append(attn.query.register_forward_hook(lambda m, i, o: store.__setitem__("q", o)))

            def on_key(m, i, o):
                captured.append((store["q"], o))

            hooks.append(attn.key.register_forward_hook(on_key))
        try:
            with torch.random.fork_rng(devices=[pixels.device] if pixels.device.type == "cuda" else []):
                logits = self.model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels).logits
        finally:
            for h in hooks:
                h.remove()
        L, H = input_ids.shape[1], self.config.num_attention_heads
        qk = []
        for q, k in captured:
            q = q.view(q.shape[0], q.shape[1], H, -1).transpose(1, 2)  # (B, H, L + 1 + N, hs)
            k = k.view(k.shape[0], k.shape[1], H, -1).transpose(1, 2)
            qk.append((q[:, :, :L], k[:, :, :L], q[:, :, L:], k[:, :, L:]))
        return FusionOutput(logits, qk)

    def save(self, directory: str | Path, extra: dict | None = None) -> None:
        """save_pretrained + tokenizer.json + dide.json (task, labels, preprocessing, `extra`), atomically."""

        def write(tmp: Path) -> None:
            self.model.save_pretrained(tmp)
            self.text.tokenizer.save(str(tmp / "tokenizer.json"))
            meta = {
                "kind": "teacher",
                "task": self.task,
                "labels": self.labels,
                "image_spec": self.image_spec.to_dict(),
                "max_text_len": self.text.max_len,
                "data": self.data,
                **(extra or {}),
            }
            (tmp / "dide.json").write_text(json.dumps(meta, indent=2))

        atomic_directory(directory, write)


def _raster_order_patches(embeddings: nn.Module) -> None:
    """Make ViLT keep image patches in raster order.

    HF ViLT's visual_embed samples the valid patches with torch.multinomial, i.e. shuffles them. Attention
    is permutation-equivariant, so the outputs do not change when we undo that shuffle, but the student's
    attention maps are compared entry by entry with the teacher's, so the order must match its own.
    """
    original = embeddings.visual_embed

    def visual_embed(pixel_values, pixel_mask, max_image_length=200):
        x, x_mask, (patch_index, (height, width)) = original(pixel_values, pixel_mask, max_image_length)
        order = (patch_index[..., 0] * width + patch_index[..., 1]).argsort(dim=1)  # (B, N)
        take = order[..., None]
        x = torch.cat([x[:, :1], x[:, 1:].gather(1, take.expand(-1, -1, x.shape[-1]))], dim=1)
        x_mask = torch.cat([x_mask[:, :1], x_mask[:, 1:].gather(1, order)], dim=1)
        patch_index = patch_index.gather(1, take.expand(-1, -1, 2))
        return x, x_mask, (patch_index, (height, width))

    embeddings.visual_embed = visual_embed


def labels_for(task: str, labels: list[str] | None) -> list[str]:
    if task == "entailment":
        return list(ENTAILMENT_LABELS)
    if task == "reasoning":
        return list(REASONING_LABELS)
    if task == "itm":
        return list(ITM_LABELS)
    if not labels:
        raise ValueError("a VQA teacher needs its answer vocabulary")
    return list(labels)


def build_teacher(
    size: str,
    task: str,
    labels: list[str],
    tokenizer: Tokenizer,
    data: str,
    dropout: float = 0.1,
    max_text_len: int = 16,
) -> Teacher:
    """A from-scratch ViLT of a named size; texts are padded to `max_text_len` tokens (<= MAX_TEXT_LEN)."""
    if size not in SIZES:
        raise ValueError(f"unknown teacher size {size!r}; choose one of {sorted(SIZES)}")
    if not 2 < max_text_len <= MAX_TEXT_LEN:
        raise ValueError(f"max_text_len must be in 3..{MAX_TEXT_LEN}, got {max_text_len}")
    labels = labels_for(task, labels)
    cfg = ViltConfig(
        **SIZES[size],
        vocab_size=tokenizer.get_vocab_size(),
        max_position_embeddings=MAX_TEXT_LEN,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={a: i for i, a in enumerate(labels)},
        num_images=2 if task == "reasoning" else -1,
        modality_type_vocab_size=3 if task == "reasoning" else 2,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        max_image_length=-1,
    )
    model = model_class(task)(cfg)
    init_image_positions(model.vilt.embeddings)
    text = TextEncoder(tokenizer, max_text_len)
    return Teacher(model, task, labels, ImageSpec(size=cfg.image_size), text, data)


def sincos_2d(dim: int, side: int) -> Tensor:
    """Fixed 2-D sine-cosine position embeddings (MAE's): half the channels encode the row, half the
    column, each as sines and cosines of geometrically spaced frequencies. (side*side, dim), raster order."""
    if dim % 4:
        raise ValueError(f"2-D sine-cosine positions need a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (dim/4,)
    rows, cols = torch.meshgrid(
        torch.arange(side, dtype=torch.float64), torch.arange(side, dtype=torch.float64), indexing="ij"
    )
    parts = []
    for pos in (rows.flatten(), cols.flatten()):
        angles = pos[:, None] * omega[None, :]  # (N, dim/4)
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()


@torch.no_grad()
def init_image_positions(embeddings: nn.Module) -> None:
    """Start a from-scratch ViLT's patch positions at 2-D sine-cosine values instead of HF's zeros.

    Real ViLT inherits learned positions from its ImageNet ViT. From zeros, every patch starts without a
    position and the small gradients take thousands of steps to give them one, so a from-scratch teacher
    sees a bag of patches: it learns colours and counts but not shapes made of several patches (easy-VQA)
    or where things are (relations). They stay trainable parameters."""
    pos = embeddings.position_embeddings  # (1, 1 + N, D): the image [CLS], then the patches in raster order
    side = int((pos.shape[1] - 1) ** 0.5)
    pos[0, 1:] = sincos_2d(pos.shape[2], side)


def text_length(tokenizer: Tokenizer, texts: list[str], limit: int = MAX_TEXT_LEN) -> int:
    """The longest text in tokens rounded up to a multiple of 4, at most `limit`: so no text is cut and
    none pays for 40."""
    tokenizer = Tokenizer.from_str(tokenizer.to_str())  # a copy without the truncation a TextEncoder sets
    tokenizer.no_truncation()
    longest = max(len(e.ids) for e in tokenizer.encode_batch(texts))
    return min(limit, -(-longest // 4) * 4)


def checkpoint_task(directory: str | Path) -> str:
    """The task a teacher directory was trained for: its dide.json's, else what its HF architecture does."""
    meta_path = Path(directory) / "dide.json"
    if meta_path.is_file() and "task" in (meta := json.loads(meta_path.read_text())):
        return meta["task"]
    cfg = ViltConfig.from_pretrained(directory)
    if "ViltForImageAndTextRetrieval" in (cfg.architectures or []):
        return "itm"
    return "reasoning" if cfg.num_images == 2 else "vqa"


def load_teacher(directory: str | Path, task: str | None = None, data: str = "") -> Teacher:
    """A teacher saved by `dide-train teacher`, or any HF ViLT task checkpoint directory (or hub id).

    HF checkpoints: ViltForQuestionAnswering (vqa; also entailment with a 3-way head),
    ViltForImagesAndTextClassification (reasoning), ViltForImageAndTextRetrieval (itm, e.g.
    dandelin/vilt-b32-finetuned-coco); the tokenizer.json saved beside the weights is used.
    """
    directory = Path(directory)
    meta_path = directory / "dide.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    cfg = ViltConfig.from_pretrained(directory)
    own = checkpoint_task(directory)
    task = task or own
    if task != own and (task, own) != ("entailment", "vqa"):
        hint = f"; to fine-tune a {task} teacher from it: dide-train teacher --task {task} --init {directory}"
        raise ValueError(f"{directory} is a teacher for {own}, not for {task}" + (hint if own == "itm" else ""))
    model = model_class(task).from_pretrained(directory)
    labels = meta.get("labels") or [cfg.id2label[i] for i in range(cfg.num_labels)]
    if task == "entailment" and len(labels) != 3:
        raise ValueError(f"{directory}: an entailment teacher needs a 3-way head, this one has {len(labels)}")
    if task == "reasoning" and [str(x) for x in labels] != list(REASONING_LABELS):
        labels = list(REASONING_LABELS)  # NLVR2 checkpoints label 0 False, 1 True
    if task == "itm":
        labels = list(ITM_LABELS)  # one logit, whatever the config's id2label says
    spec = ImageSpec.from_dict(meta["image_spec"]) if "image_spec" in meta else ImageSpec(size=cfg.image_size)
    max_len = meta.get("max_text_len", cfg.max_position_embeddings)
    text = TextEncoder(load_checkpoint_tokenizer(directory), max_len)
    model.eval()
    # Without dide.json the ITM head is as published: HF retrieval models rank captions (softmax).
    return Teacher(model, task, labels, spec, text, meta.get("data", data), ranking=task == "itm" and not meta)


def teacher_for_task(base: Teacher, task: str, labels: list[str], data: str, max_text_len: int) -> Teacher:
    """A new `task` teacher over `base`'s ViLT weights (stage 2 from an image-text matching teacher):
    a fresh head for `labels`, the same tokenizer and image preprocessing, texts padded to `max_text_len`.

    For reasoning the token-type table grows to 3 rows (text, image 1, image 2); the new row starts as
    a copy of the image row, as DiDE does for the student's NLVR2 image tower.
    """
    labels = labels_for(task, labels)
    if not 2 < max_text_len <= base.config.max_position_embeddings:
        raise ValueError(f"max_text_len must be in 3..{base.config.max_position_embeddings}, got {max_text_len}")
    cfg = ViltConfig.from_dict(
        {
            **base.config.to_dict(),
            "id2label": dict(enumerate(labels)),
            "label2id": {a: i for i, a in enumerate(labels)},
            "num_images": 2 if task == "reasoning" else -1,
            "modality_type_vocab_size": max(3 if task == "reasoning" else 2, base.config.modality_type_vocab_size),
            "architectures": None,
        }
    )
    model = model_class(task)(cfg)
    state = base.model.vilt.state_dict()
    key = "embeddings.token_type_embeddings.weight"
    old = state[key]
    state[key] = torch.cat([old, old[1:2].expand(cfg.modality_type_vocab_size - len(old), -1)])
    model.vilt.load_state_dict(state)
    tokenizer = Tokenizer.from_str(base.text.tokenizer.to_str())
    return Teacher(model, task, labels, base.image_spec, TextEncoder(tokenizer, max_text_len), data)


def student_from_teacher(
    teacher: Teacher, text_layers: int | None = None, dropout: float = 0.0, fusion: str = "concat"
) -> DualEncoderStudent:
    """A student whose two towers both start from the teacher's ViLT weights.

    With `text_layers` smaller than the teacher's depth, the text tower keeps the teacher's first
    layers and its last layer (so the distilled last-layer attention starts from the teacher's).
    """
    return _student_from_vilt(teacher.model.vilt, teacher, text_layers, dropout, fusion)


def is_vilt_checkpoint(directory: str | Path) -> bool:
    """Whether `directory` holds a Hugging Face ViLT checkpoint (any Vilt* class, our teachers included)."""
    path = Path(directory) / "config.json"
    return path.is_file() and json.loads(path.read_text()).get("model_type") == "vilt"


def student_from_pretrained(
    directory: str | Path,
    teacher: Teacher,
    text_layers: int | None = None,
    dropout: float = 0.0,
    fusion: str = "concat",
) -> DualEncoderStudent:
    """A student whose two towers both start from a ViLT checkpoint other than the teacher, as the official
    code does: each tower loads `load_path` (the pre-trained ViLT), the teacher `teacher_load_path`.

    Any Vilt* class saved with save_pretrained works (ViltModel, ViltForMaskedLM, an ITM or task model:
    heads are ignored; ViltForMaskedLM has no pooler, so the towers' poolers start fresh), with the
    tokenizer.json beside it, which must be the teacher's: both read the same token ids. Width and depth
    may differ from the teacher's; heads, image and patch size may not (the maps are compared per head
    and per patch).
    """
    vilt, info = ViltModel.from_pretrained(directory, output_loading_info=True)
    c, t = vilt.config, teacher.config
    sizes = [
        ("vocab size", c.vocab_size, t.vocab_size),
        ("attention heads", c.num_attention_heads, t.num_attention_heads),
        ("image size", c.image_size, t.image_size),
        ("patch size", c.patch_size, t.patch_size),
    ]
    _require_fit(directory, "checkpoint", sizes, load_checkpoint_tokenizer(directory), teacher)
    if c.max_position_embeddings < teacher.text.max_len:
        raise ValueError(
            f"{directory} has {c.max_position_embeddings} text positions, fewer than the teacher's text length "
            f"{teacher.text.max_len}"
        )
    if info["missing_keys"]:
        log.warning("%s: not in the checkpoint, starting fresh: %s", directory, ", ".join(info["missing_keys"]))
    return _student_from_vilt(vilt, teacher, text_layers, dropout, fusion)


def _student_from_vilt(
    vilt: ViltModel, teacher: Teacher, text_layers: int | None, dropout: float, fusion: str
) -> DualEncoderStudent:
    """A student for `teacher`'s task and text length with both towers copied from `vilt`."""
    c = vilt.config
    depth = c.num_hidden_layers
    cfg = StudentConfig(
        task=teacher.task,
        num_labels=len(teacher.labels),
        vocab_size=c.vocab_size,
        max_text_len=teacher.text.max_len,
        image_size=c.image_size,
        patch_size=c.patch_size,
        hidden_size=c.hidden_size,
        num_layers=depth,
        text_layers=text_layers or depth,
        num_heads=c.num_attention_heads,
        intermediate_size=c.intermediate_size,
        layer_norm_eps=c.layer_norm_eps,
        dropout=dropout,
        fusion=fusion,
    )
    student = DualEncoderStudent(cfg)
    emb = vilt.embeddings
    with torch.no_grad():
        img, txt = student.image_tower, student.text_tower
        img.patch_projection.load_state_dict(emb.patch_embeddings.projection.state_dict())
        img.cls_token.copy_(emb.cls_token)
        img.position_embeddings.copy_(emb.position_embeddings)
        img.modality_embedding.copy_(emb.token_type_embeddings.weight[1])
        te = emb.text_embeddings
        txt.word_embeddings.load_state_dict(te.word_embeddings.state_dict())
        txt.position_embeddings.weight.copy_(te.position_embeddings.weight[: cfg.max_text_len])
        txt.token_type_embeddings.load_state_dict(te.token_type_embeddings.state_dict())
        txt.embed_norm.load_state_dict(te.LayerNorm.state_dict())
        txt.modality_embedding.copy_(emb.token_type_embeddings.weight[0])
        text_source = [*range(cfg.text_layers - 1), depth - 1]
        for tower, sources in ((img.encoder, range(depth)), (txt.encoder, text_source)):
            for dst, src in zip(tower.layers, sources, strict=True):
                _copy_layer(dst, vilt.encoder.layer[src])
            tower.layernorm.load_state_dict(vilt.layernorm.state_dict())
            tower.pooler.load_state_dict(vilt.pooler.dense.state_dict())
    return student


def _copy_layer(dst: nn.Module, src: nn.Module) -> None:
    a = src.attention
    dst.layernorm_before.load_state_dict(src.layernorm_before.state_dict())
    dst.layernorm_after.load_state_dict(src.layernorm_after.state_dict())
    dst.attention.query.load_state_dict(a.attention.query.state_dict())
    dst.attention.key.load_state_dict(a.attention.key.state_dict())
    dst.attention.value.load_state_dict(a.attention.value.state_dict())
    dst.attention.output.load_state_dict(a.output.dense.state_dict())
    dst.intermediate.load_state_dict(src.intermediate.dense.state_dict())
    dst.output.load_state_dict(src.output.dense.state_dict())


def student_for_teacher(directory: str | Path, teacher: Teacher, dropout: float | None = None) -> DualEncoderStudent:
    """A saved student (e.g. stage 1's, distilled on image-text matching) ready to distil `teacher`.

    Both towers and the fusion MLP are kept; the head is new when the task or labels differ, and the
    text positions follow the teacher's text length (new rows start fresh); `dropout` replaces the saved
    one. Refused when the student's tokenizer or tower shapes differ from the teacher's: distillation
    compares them token by token.
    """
    loaded = load_student(directory)
    c, t = loaded.model.config, teacher.config
    sizes = [
        ("vocab size", c.vocab_size, t.vocab_size),
        ("hidden size", c.hidden_size, t.hidden_size),
        ("attention heads", c.num_heads, t.num_attention_heads),
        ("image layers", c.num_layers, t.num_hidden_layers),
        ("intermediate size", c.intermediate_size, t.intermediate_size),
        ("image size", c.image_size, t.image_size),
        ("patch size", c.patch_size, t.patch_size),
    ]
    _require_fit(directory, "student", sizes, loaded.text.tokenizer, teacher)
    same_head = (c.task, loaded.labels) == (teacher.task, teacher.labels)
    cfg = replace(c, task=teacher.task, num_labels=len(teacher.labels), max_text_len=teacher.text.max_len)
    if dropout is not None:
        cfg = replace(cfg, dropout=dropout)
    if same_head and cfg == c:
        return loaded.model
    student = DualEncoderStudent(cfg)
    state = {k: v for k, v in loaded.model.state_dict().items() if same_head or not k.startswith("classifier.")}
    key, n = "text_tower.position_embeddings.weight", min(c.max_text_len, cfg.max_text_len)
    state[key] = torch.cat([state[key][:n], student.state_dict()[key][n:]])
    missing, unexpected = student.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("classifier.") for k in missing), (missing, unexpected)
    return student


def _require_fit(
    directory: str | Path, what: str, sizes: list[tuple[str, int, int]], tokenizer: Tokenizer, teacher: Teacher
) -> None:
    """Refuse a starting point whose sizes (name, its value, the teacher's) or tokenizer differ from the teacher's."""
    mismatched = [f"{name} {a} ({what}) != {b} (teacher)" for name, a, b in sizes if a != b]
    if _tokenizer_content(tokenizer) != _tokenizer_content(teacher.text.tokenizer):
        mismatched.append("its tokenizer.json differs from the teacher's")
    if mismatched:
        raise ValueError(
            f"the {what} in {directory} does not fit the teacher: {'; '.join(mismatched)}. Fine-tune the "
            "teacher from the same checkpoint (dide-train teacher --init DIR) so both share its tokenizer"
        )


def _tokenizer_content(tokenizer: Tokenizer) -> dict:
    """tokenizer.json without the truncation and padding a TextEncoder sets for its text length."""
    content = json.loads(tokenizer.to_str())
    return {k: v for k, v in content.items() if k not in ("truncation", "padding")}
