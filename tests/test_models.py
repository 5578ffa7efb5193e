"""The student's serving split, its checkpoints, and its initialisation from a ViLT teacher."""

from dataclasses import replace

import pytest
import torch
from tokenizers import Tokenizer
from transformers import ViltConfig, ViltForQuestionAnswering

from core.preprocess import ImageSpec
from training.student import DualEncoderStudent, load_student, save_student, tiny_config
from training.teacher import build_teacher, student_from_teacher
from training.tokenizer import train_wordpiece

SENTENCES = ["what color is the circle?", "is there a red square left of the triangle?", "how many shapes?"]


def tokenizer() -> Tokenizer:
    return train_wordpiece(SENTENCES * 5, vocab_size=200)


def test_student_split_equals_forward_and_exposes_qk():
    torch.manual_seed(0)
    for task, n_labels, fusion in (("vqa", 5, "concat"), ("reasoning", 2, "concat"), ("reasoning", 2, "product")):
        m = DualEncoderStudent(replace(tiny_config(task, n_labels, vocab_size=50), fusion=fusion)).eval()
        ids = torch.randint(5, 50, (3, 16))
        mask = torch.ones(3, 16, dtype=torch.long)
        mask[0, 6:] = 0
        px, px2 = torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32)
        second = px2 if task == "reasoning" else None
        logits = m(ids, mask, px, second)
        split = m.head(
            m.encode_text(ids, mask), m.encode_image(px), m.encode_image(px2) if second is not None else None
        )
        assert logits.shape == (3, n_labels)
        torch.testing.assert_close(logits, split)
        out = m.text_tower(ids, mask, keep_qk=True)
        assert out.query.shape == (3, 2, 16, 16) and out.key.shape == (3, 2, 16, 16)
        assert m.image_tower(px).query is None  # q/k only when asked
        img = m.image_tower(px, keep_qk=True)
        assert img.key.shape == (3, 2, 1 + 16, 16)


def test_product_fusion_sees_the_elementwise_product_and_round_trips(tmp_path):
    torch.manual_seed(0)
    tok = tokenizer()
    cfg = replace(tiny_config("entailment", 3, tok.get_vocab_size()), fusion="product")
    m = DualEncoderStudent(cfg).eval()
    assert m.fusion[0].in_features == 3 * cfg.hidden_size
    t, v = torch.randn(2, cfg.hidden_size), torch.randn(2, cfg.hidden_size)
    torch.testing.assert_close(m.fuse(t, v), m.fusion(torch.cat([t, v, t * v], -1)))
    save_student(m, tmp_path / "s", labels=["a", "b", "c"], tokenizer=tok, image_spec=ImageSpec(32), data="scenes")
    loaded = load_student(tmp_path / "s")
    assert loaded.model.config.fusion == "product"
    torch.testing.assert_close(loaded.model.head(t, v), m.head(t, v))
    with pytest.raises(ValueError, match="fusion must be one of concat, product"):
        DualEncoderStudent(replace(cfg, fusion="sum"))


def test_padding_does_not_change_the_text_embedding():
    torch.manual_seed(0)
    m = DualEncoderStudent(tiny_config("vqa", 4, vocab_size=50)).eval()
    ids = torch.randint(5, 50, (1, 16))
    mask = torch.zeros(1, 16, dtype=torch.long)
    mask[0, :5] = 1
    other = ids.clone()
    other[0, 5:] = 0  # different padding content
    torch.testing.assert_close(m.encode_text(ids, mask), m.encode_text(other, mask))


def test_checkpoint_alone_rebuilds_the_model(tmp_path):
    torch.manual_seed(0)
    tok = tokenizer()
    m = DualEncoderStudent(tiny_config("vqa", 3, tok.get_vocab_size())).eval()
    save_student(m, tmp_path / "s", labels=["a", "b", "c"], tokenizer=tok, image_spec=ImageSpec(32), data="scenes")
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    loaded = load_student(tmp_path / "s")
    ids, mask = (torch.from_numpy(a) for a in loaded.text(["what color is the circle?"]))
    px = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(loaded.model(ids, mask, px), m(ids, mask, px))
    assert loaded.labels == ["a", "b", "c"] and loaded.data == "scenes" and len(loaded.sha256) == 64
    assert not list(tmp_path.glob(".s.*"))  # no temp directory left behind


def _hf_tower(vilt, embeddings, mask):
    """Run HF ViLT's own encoder on one modality's embeddings: what the student's tower must equal."""
    ext = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    x = embeddings
    for layer in vilt.encoder.layer:
        x = layer(x, ext)[0]
    return vilt.pooler(vilt.layernorm(x))


def test_student_towers_initialised_from_teacher_compute_the_teachers_function():
    torch.manual_seed(0)
    teacher = build_teacher("tiny", "vqa", ["yes", "no", "red"], tokenizer(), data="scenes", dropout=0.0)
    teacher.model.eval()
    student = student_from_teacher(teacher).eval()
    vilt, emb = teacher.model.vilt, teacher.model.vilt.embeddings
    ids, mask = (torch.from_numpy(a) for a in teacher.text(SENTENCES))
    px = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        text_emb = emb.text_embeddings(input_ids=ids) + emb.token_type_embeddings.weight[0]
        image_emb, image_mask, _ = emb.visual_embed(px, torch.ones(3, 32, 32, dtype=torch.long), -1)
        image_emb = image_emb + emb.token_type_embeddings.weight[1]
        torch.testing.assert_close(student.encode_text(ids, mask), _hf_tower(vilt, text_emb, mask))
        torch.testing.assert_close(student.encode_image(px), _hf_tower(vilt, image_emb, image_mask))


def test_teacher_patch_order_is_raster_and_outputs_unchanged():
    torch.manual_seed(0)
    teacher = build_teacher("tiny", "vqa", ["yes", "no"], tokenizer(), data="scenes", dropout=0.0)
    teacher.model.eval()
    plain = ViltForQuestionAnswering(teacher.config).eval()  # HF's own shuffled patch order
    plain.load_state_dict(teacher.model.state_dict())
    ids, mask = (torch.from_numpy(a) for a in teacher.text(SENTENCES))
    px = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = teacher.forward(ids, mask, px, keep_qk=True)
        torch.testing.assert_close(out.logits, plain(input_ids=ids, attention_mask=mask, pixel_values=px).logits)
        _, _, (patch_index, _) = teacher.model.vilt.embeddings.visual_embed(px, torch.ones(3, 32, 32), -1)
    raster = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij"), -1).view(1, 16, 2)
    assert torch.equal(patch_index, raster.expand(3, -1, -1))
    assert [t.shape for t in out.qk[0]] == [(3, 2, 16, 16), (3, 2, 16, 16), (3, 2, 17, 16), (3, 2, 17, 16)]


def test_teacher_qk_match_hf_attention_probabilities_renormalised():
    # The target DiDE distils: softmax over the other modality's keys, computed from the captured q/k,
    # equals HF's output_attentions restricted to those keys and renormalised.
    torch.manual_seed(0)
    teacher = build_teacher("tiny", "vqa", ["yes", "no"], tokenizer(), data="scenes", dropout=0.0)
    teacher.model.config._attn_implementation = "eager"
    teacher.model.eval()
    ids, mask = (torch.from_numpy(a) for a in teacher.text(SENTENCES))
    px = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = teacher.forward(ids, mask, px, keep_qk=True)
        probs = teacher.model(input_ids=ids, attention_mask=mask, pixel_values=px, output_attentions=True)
    q_txt, _, _, k_img = out.qk[0]
    ours = (q_txt @ k_img.transpose(-1, -2) / 4.0).softmax(-1)  # (B, H, L, 1+N); head size 16
    theirs = probs.attentions[-1][:, :, :16, 16:]
    torch.testing.assert_close(ours, theirs / theirs.sum(-1, keepdim=True), atol=1e-5, rtol=1e-4)


def test_hf_config_sizes_match_student_config():
    teacher = build_teacher("tiny", "reasoning", [], tokenizer(), data="scenes")
    student = student_from_teacher(teacher, text_layers=1)
    assert isinstance(teacher.config, ViltConfig) and teacher.config.num_images == 2
    assert student.config.text_layers == 1 and student.config.num_layers == 2
    # A shallower text tower keeps the teacher's last layer as its last layer.
    torch.testing.assert_close(
        student.text_tower.encoder.layers[0].attention.query.weight,
        teacher.model.vilt.encoder.layer[1].attention.attention.query.weight,
    )


def test_from_scratch_teacher_patches_start_with_2d_positions():
    """HF ViLT starts patch positions at zero (real ViLT inherits them from its ImageNet ViT): from
    scratch, every patch would start without a position. Ours start at 2-D sine-cosine values."""
    tok = train_wordpiece(["what color is the circle?"] * 3)
    pos = build_teacher("tiny", "vqa", ["red", "blue"], tok, "test").model.vilt.embeddings.position_embeddings
    patches = pos[0, 1:].detach()  # (16, D) for a 4x4 grid, raster order
    assert patches.shape[0] == 16 and len({tuple(p.tolist()) for p in patches}) == 16  # all distinct
    half = patches.shape[1] // 2  # the first half encodes the row, the second the column
    grid = patches.view(4, 4, -1)
    assert torch.equal(grid[0, 0, :half], grid[0, 3, :half])  # same row: same row code
    assert torch.equal(grid[0, 1, half:], grid[3, 1, half:])  # same column: same column code
    assert not torch.equal(grid[0, 0, half:], grid[0, 1, half:])
    assert pos.requires_grad  # a starting point, still learned
