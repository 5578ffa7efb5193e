"""`distill_step` on tiny models: the frozen teacher, the attention loss against an independent computation,
NLVR2's two images, the ablation flags, ITM ranking teachers, a pre-trained `--init`, and the optimiser defaults."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import ViltConfig, ViltForImageAndTextRetrieval, ViltForMaskedLM, ViltModel

from training.loop import param_groups
from training.scene_language import VQA_LABELS
from training.steps import LossWeights, StudentTrainingView, TeacherCache, distill_step, loss_weights
from training.student import load_student
from training.teacher import Teacher, build_teacher, load_teacher, student_from_pretrained, student_from_teacher
from training.tokenizer import train_wordpiece
from training.train import main, parse_args

TEXTS = [
    "what color is the circle?",
    "is there a red square left of a blue triangle in the image?",
    "what shape?",
    "the green circle is right of the yellow square.",
]
TEXT_LEN = 16  # longer than the shortest texts: those rows carry padding
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
            patch_size=8)  # fmt: skip
HEAD_SIZE = 16  # 32 / 2 heads
DISTILL = ["distill", "--task", "vqa", "--teacher", "t", "--out", "o"]


@pytest.fixture(scope="module")
def tokenizer():
    return train_wordpiece(TEXTS * 3, vocab_size=120)


def sharpen(teacher: Teacher) -> None:
    """Scale the teacher's last-layer q/k so its attention is far from uniform (random init is near it)."""
    attn = teacher.model.vilt.encoder.layer[-1].attention.attention
    with torch.no_grad():
        attn.query.weight.mul_(8.0)
        attn.key.weight.mul_(8.0)


def make_models(tokenizer, task: str = "vqa", teacher_dropout: float = 0.0, seed: int = 0):
    """A tiny teacher (in eval mode, *not* frozen: the step itself must keep it out of the graph) and a
    student view started from it and then perturbed, so the two differ."""
    torch.manual_seed(seed)
    labels = ["yes", "no", "red", "blue"] if task == "vqa" else []
    teacher = build_teacher("tiny", task, labels, tokenizer, "test", dropout=teacher_dropout, max_text_len=TEXT_LEN)
    teacher.model.eval()
    sharpen(teacher)
    student = student_from_teacher(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.1 * torch.randn_like(p))
        for tower in (student.text_tower, student.image_tower):
            tower.encoder.layers[-1].attention.query.weight.mul_(4.0)
            tower.encoder.layers[-1].attention.key.weight.mul_(4.0)
    return teacher, StudentTrainingView(student).train()


def make_batch(teacher: Teacher, two_images: bool = False, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids, mask = (torch.from_numpy(a) for a in teacher.text(TEXTS))
    assert (mask == 0).any()  # some texts are padded
    B, C = len(TEXTS), len(teacher.labels)
    batch = {"input_ids": ids, "attention_mask": mask, "pixels": torch.randn(B, 3, 32, 32, generator=g)}
    batch["target"] = torch.eye(C)[torch.arange(B) % C]
    if two_images:
        batch["pixels2"] = torch.randn(B, 3, 32, 32, generator=g)
    return batch


def split_heads(x: torch.Tensor, heads: int = 2) -> torch.Tensor:
    B, N, D = x.shape
    return x.view(B, N, heads, D // heads).transpose(1, 2).double()  # (B, H, N, hs)


def teacher_qk(teacher: Teacher, batch: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The teacher's last-layer q/k over the joint sequence, one pair per image pass, rebuilt from HF's
    hidden states (the input of the last layer), not from the wrapper's hooks."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        if "pixels2" in batch:
            pixels = torch.stack([batch["pixels"], batch["pixels2"]], dim=1)
            passes = teacher.model(ids, mask, pixel_values=pixels, output_hidden_states=True).hidden_states
        else:
            out = teacher.model(ids, mask, pixel_values=batch["pixels"], output_hidden_states=True)
            passes = [out.hidden_states]
        layer = teacher.model.vilt.encoder.layer[-1]
        qk = []
        for hidden in passes:
            x = layer.layernorm_before(hidden[-2])
            qk.append((split_heads(layer.attention.attention.query(x)), split_heads(layer.attention.attention.key(x))))
    return qk


def student_qk(view: StudentTrainingView, batch: dict) -> tuple[tuple, list[tuple]]:
    """The student's last-layer q/k from forward hooks on each tower's last block: (text q, k), [(image q, k)]."""
    student = view.student
    got: dict[str, list] = {"tq": [], "tk": [], "iq": [], "ik": []}
    hooks = []
    for tower, prefix in ((student.text_tower, "t"), (student.image_tower, "i")):
        attn = tower.encoder.layers[-1].attention
        for name in ("q", "k"):
            module = attn.query if name == "q" else attn.key
            hooks.append(module.register_forward_hook(lambda m, i, o, key=prefix + name: got[key].append(o)))
    try:
        with torch.no_grad():
            student.text_tower(batch["input_ids"], batch["attention_mask"])
            for pixels in (batch["pixels"], batch.get("pixels2")):
                if pixels is not None:
                    student.image_tower(pixels)
    finally:
        for h in hooks:
            h.remove()
    text = (split_heads(got["tq"][0]), split_heads(got["tk"][0]))
    return text, [(split_heads(q), split_heads(k)) for q, k in zip(got["iq"], got["ik"], strict=True)]


def naive_kl(tq, tk, sq, sk, valid: torch.Tensor, scale: float) -> torch.Tensor:
    """Mean over (batch, head, query) of KL(teacher || student), each a softmax over the valid keys only,
    one example at a time with the padded keys cut off (float64)."""
    rows = []
    for b in range(tq.shape[0]):
        keep = valid[b].bool()
        t = (tq[b] @ tk[b][:, keep].transpose(-1, -2) * scale).softmax(-1)
        s = (sq[b] @ sk[b][:, keep].transpose(-1, -2) * scale).softmax(-1)
        rows.append((t * (t.log() - s.log())).sum(-1).flatten())
    return torch.cat(rows).mean()


def attention_terms(teacher, view, batch, t2i=True, i2t=True, scale: float = HEAD_SIZE**-0.5) -> list[torch.Tensor]:
    """The attention loss built independently, one term per image pass: text queries over image keys plus
    image queries over the valid text keys, teacher maps from its own q/k, student maps across its towers."""
    L = batch["input_ids"].shape[1]
    (s_tq, s_tk), images = student_qk(view, batch)
    terms = []
    for (t_q, t_k), (s_iq, s_ik) in zip(teacher_qk(teacher, batch), images, strict=True):
        term = torch.zeros((), dtype=torch.float64)
        all_patches = torch.ones(t_q.shape[0], t_q.shape[2] - L)
        if t2i:
            term += naive_kl(t_q[:, :, :L], t_k[:, :, L:], s_tq, s_ik, all_patches, scale)
        if i2t:
            term += naive_kl(t_q[:, :, L:], t_k[:, :, :L], s_iq, s_tk, batch["attention_mask"], scale)
        terms.append(term)
    return terms


def expected_attention(teacher, view, batch, t2i=True, i2t=True, scale: float = HEAD_SIZE**-0.5) -> torch.Tensor:
    return sum(attention_terms(teacher, view, batch, t2i, i2t, scale))


def step(teacher, view, batch, w: LossWeights, task: str = "vqa"):
    return distill_step(view, teacher, batch, task, w, 0.0)


# --- the teacher ---------------------------------------------------------------------------------------


def test_the_teacher_stays_in_eval_mode_and_gets_no_gradient(tokenizer):
    teacher, view = make_models(tokenizer, teacher_dropout=0.5)  # dropout would make its targets vary
    batch = make_batch(teacher)
    assert all(p.requires_grad for p in teacher.model.parameters())  # not frozen here: the step must do it
    loss, parts = step(teacher, view, batch, LossWeights())
    again, _ = step(teacher, view, batch, LossWeights())
    assert set(parts) == {"pred", "attn"} and torch.equal(loss, again)  # eval mode: the same targets twice
    loss.backward()
    assert not teacher.model.training
    assert all(p.grad is None for p in teacher.model.parameters())
    assert view.student.classifier[-1].weight.grad.abs().sum() > 0
    teacher.model.train()
    with pytest.raises(AssertionError, match="eval mode"):
        step(teacher, view, batch, LossWeights())


# --- the attention loss ----------------------------------------------------------------------------------


def test_attention_loss_equals_an_independent_sum_over_both_directions(tokenizer):
    teacher, view = make_models(tokenizer)
    batch = make_batch(teacher)
    _, parts = step(teacher, view, batch, LossWeights(pred=0.0))
    expected = expected_attention(teacher, view, batch)
    assert expected > 0.05  # sharpened maps: far from a trivially small loss
    assert parts["attn"] == pytest.approx(float(expected), rel=1e-4)
    t2i = expected_attention(teacher, view, batch, i2t=False)
    i2t = expected_attention(teacher, view, batch, t2i=False)
    assert t2i > 0.01 and i2t > 0.01 and float(t2i + i2t) == pytest.approx(float(expected), rel=1e-9)


def test_scores_are_scaled_by_one_over_sqrt_head_size(tokenizer):
    teacher, view = make_models(tokenizer)
    batch = make_batch(teacher)
    _, parts = step(teacher, view, batch, LossWeights(pred=0.0))
    right = expected_attention(teacher, view, batch, scale=HEAD_SIZE**-0.5)
    assert parts["attn"] == pytest.approx(float(right), rel=1e-4)
    for wrong in (32**-0.5, 1.0):  # 1/sqrt(hidden size), or no scale at all: a different loss
        assert abs(parts["attn"] - float(expected_attention(teacher, view, batch, scale=wrong))) > 1e-3 * parts["attn"]


def test_image_to_text_renormalises_over_real_text_keys_only(tokenizer):
    teacher, view = make_models(tokenizer)
    batch = make_batch(teacher)
    padded = batch["attention_mask"] == 0
    other = dict(batch, input_ids=batch["input_ids"].masked_fill(padded, 7))  # other tokens behind the mask
    i2t, t2i = LossWeights(pred=0.0, t2i=False), LossWeights(pred=0.0, i2t=False)
    assert step(teacher, view, other, i2t)[1]["attn"] == pytest.approx(step(teacher, view, batch, i2t)[1]["attn"])
    # ...while those positions do reach the q/k: as text *queries* (t->i counts every row, as the official code)
    assert step(teacher, view, other, t2i)[1]["attn"] != pytest.approx(step(teacher, view, batch, t2i)[1]["attn"])
    unmasked = dict(batch, attention_mask=torch.ones_like(batch["attention_mask"]))
    assert float(expected_attention(teacher, view, unmasked, t2i=False)) != pytest.approx(
        step(teacher, view, batch, i2t)[1]["attn"]
    )


def test_nlvr2_sums_the_attention_loss_over_both_images(tokenizer):
    teacher, view = make_models(tokenizer, task="reasoning")
    batch = make_batch(teacher, two_images=True)
    _, parts = step(teacher, view, batch, LossWeights(pred=0.0), task="reasoning")
    first, second = attention_terms(teacher, view, batch)  # teacher passes with image types 1 and 2
    assert first > 0.01 and second > 0.01 and float(second) != pytest.approx(float(first), rel=1e-3)
    assert parts["attn"] == pytest.approx(float(first + second), rel=1e-4)
    with pytest.raises(ValueError, match="the reasoning teacher needs two images"):
        teacher.forward(batch["input_ids"], batch["attention_mask"], batch["pixels"], keep_qk=True)


@pytest.mark.parametrize("task,w", [("reasoning", LossWeights()), ("vqa", LossWeights(attn=0.0))])
def test_the_teacher_cache_serves_what_the_teacher_said_without_asking_it_again(tokenizer, task, w):
    teacher, view = make_models(tokenizer, task=task)
    batch = make_batch(teacher, two_images=task == "reasoning")
    first = dict(batch, index=torch.tensor([4, 0, 7, 2]))  # rows of an 8-example training set
    cache = TeacherCache(teacher, 8, keep_qk=w.attention, limit=2**30)
    expected, _ = distill_step(view, teacher, first, task, w, 0.0)
    filled, _ = distill_step(view, teacher, first, task, w, 0.0, cache)
    assert torch.equal(filled, expected) and cache.filled.tolist() == [1, 0, 1, 0, 1, 0, 0, 1]
    assert len(cache.store) == (9 if task == "reasoning" else 1)  # logits, then 4 q/k per image pass
    with torch.no_grad():  # a teacher asked again would now answer differently
        for p in teacher.model.parameters():
            p.add_(torch.randn_like(p))
    assert not torch.equal(distill_step(view, teacher, first, task, w, 0.0)[0], expected)
    order = [2, 0, 3, 1]  # the same examples in another order: served from the cache, row by row
    shuffled = {k: v[order] for k, v in first.items()}
    again, _ = distill_step(view, teacher, shuffled, task, w, 0.0, cache)
    assert torch.allclose(again, expected, rtol=1e-6)
    missing = dict(first, index=torch.tensor([4, 0, 7, 5]))  # one unseen example: the teacher runs for the batch
    assert not torch.allclose(distill_step(view, teacher, missing, task, w, 0.0, cache)[0], expected)
    assert cache.filled[5]


def test_the_teacher_cache_turns_itself_off_over_its_limit(tokenizer, caplog):
    teacher, view = make_models(tokenizer)
    batch = dict(make_batch(teacher), index=torch.arange(4))
    cache = TeacherCache(teacher, 1000, keep_qk=True, limit=100_000)
    with caplog.at_level("INFO", logger="training.steps"):
        loss, _ = distill_step(view, teacher, batch, "vqa", LossWeights(), 0.0, cache)
    assert cache.off and cache.store is None and not cache.filled.any()
    assert "teacher cache off: it would need" in caplog.text
    assert torch.equal(loss, distill_step(view, teacher, batch, "vqa", LossWeights(), 0.0)[0])


def grad_norm(module: torch.nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


@pytest.mark.parametrize("t2i,i2t", [(True, True), (True, False), (False, True)])
def test_the_attention_loss_trains_both_towers_through_the_right_projections(tokenizer, t2i, i2t):
    teacher, view = make_models(tokenizer)
    loss, _ = step(teacher, view, make_batch(teacher), LossWeights(pred=0.0, t2i=t2i, i2t=i2t))
    loss.backward()
    s = view.student
    for tower in (s.text_tower, s.image_tower):
        assert grad_norm(tower.encoder.layers[0]) > 0  # down to the first layer of each tower
    txt, img = s.text_tower.encoder.layers[-1].attention, s.image_tower.encoder.layers[-1].attention
    # t->i: text queries, image keys; i->t: image queries, text keys. Neither touches fusion or head.
    assert (grad_norm(txt.query) > 0, grad_norm(img.key) > 0) == (t2i, t2i)
    assert (grad_norm(img.query) > 0, grad_norm(txt.key) > 0) == (i2t, i2t)
    assert grad_norm(s.fusion) == 0 and grad_norm(s.classifier) == 0


def test_ablation_flags_change_the_loss_as_they_say(tokenizer):
    teacher, view = make_models(tokenizer)
    batch = make_batch(teacher)
    both = float(expected_attention(teacher, view, batch))
    t2i = float(expected_attention(teacher, view, batch, i2t=False))
    i2t = float(expected_attention(teacher, view, batch, t2i=False))
    _, full = step(teacher, view, batch, loss_weights(parse_args(DISTILL)))
    for flags, attn in ((["--no-t2i"], i2t), (["--no-i2t"], t2i), (["--w-attn", "0.5"], 0.5 * both), ([], both)):
        total, parts = step(teacher, view, batch, loss_weights(parse_args([*DISTILL, *flags])))
        assert parts["attn"] == pytest.approx(attn, rel=1e-4), flags
        assert parts["pred"] == pytest.approx(full["pred"]) and float(total.detach()) == pytest.approx(
            attn + parts["pred"]
        )
    for flags in (["--w-attn", "0"], ["--no-t2i", "--no-i2t"]):
        total, parts = step(teacher, view, batch, loss_weights(parse_args([*DISTILL, *flags])))
        assert set(parts) == {"pred"} and float(total.detach()) == pytest.approx(full["pred"])
    _, parts = step(teacher, view, batch, loss_weights(parse_args([*DISTILL, "--w-gt", "1", "--w-pred", "0"])))
    assert set(parts) == {"gt", "attn"}


def test_prediction_kd_follows_the_teacher_logits(tokenizer):
    teacher, view = make_models(tokenizer)
    batch = make_batch(teacher)
    _, parts = step(teacher, view, batch, LossWeights(attn=0.0))
    with torch.no_grad():
        teacher.model.classifier[-1].bias.add_(3.0)  # other teacher logits: another target
    assert step(teacher, view, batch, LossWeights(attn=0.0))[1]["pred"] != pytest.approx(parts["pred"])


# --- ITM teachers: ranking (HF retrieval) vs match (BCE-trained here) --------------------------------------


def save_hf_retrieval(directory: Path, tokenizer) -> Path:
    """A tiny ViltForImageAndTextRetrieval saved as HF checkpoints are: no dide.json."""
    config = ViltConfig(**TINY, max_position_embeddings=40, vocab_size=tokenizer.get_vocab_size())
    torch.manual_seed(0)
    ViltForImageAndTextRetrieval(config).save_pretrained(directory)
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory


def itm_batch(teacher: Teacher) -> dict:
    """What itm_pairs hands a step: each image with its caption (rows 0..B-1) and a negative (B..2B-1)."""
    ids, mask = (torch.from_numpy(a) for a in teacher.text(TEXTS))
    B = len(TEXTS)
    negatives = [3, 2, 0, 1]
    pixels = torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return {
        "input_ids": torch.cat([ids, ids[negatives]]),
        "attention_mask": torch.cat([mask, mask[negatives]]),
        "pixels": torch.cat([pixels, pixels]),
        "target": torch.cat([torch.ones(B, 1), torch.zeros(B, 1)]),
        "pairs": torch.stack([torch.arange(B), B + torch.arange(B)], dim=1),
    }


def test_a_hf_retrieval_teacher_is_distilled_by_a_softmax_over_each_images_captions(tokenizer, tmp_path):
    teacher = load_teacher(save_hf_retrieval(tmp_path / "hf-itm", tokenizer))
    assert teacher.ranking and teacher.task == "itm"
    ours = tmp_path / "ours"
    build_teacher("tiny", "itm", [], tokenizer, "test").save(ours)
    assert not load_teacher(ours).ranking  # trained here with BCE: a match logit

    view = StudentTrainingView(student_from_teacher(teacher)).train()
    with torch.no_grad():  # scores of a few units, as a trained head's, and a student that differs
        teacher.model.rank_output.weight.mul_(100.0)
        view.student.classifier[-1].weight.normal_(0.0, 2.0)
        for p in view.student.parameters():
            p.add_(0.1 * torch.randn_like(p))
    batch = itm_batch(teacher)
    _, parts = step(teacher, view, batch, LossWeights(attn=0.0), task="itm")
    with torch.no_grad():
        t = teacher.model(batch["input_ids"], batch["attention_mask"], pixel_values=batch["pixels"]).logits[:, 0]
        s = view.student(batch["input_ids"], batch["attention_mask"], batch["pixels"])[:, 0]
    t, s = t[batch["pairs"]].double(), s[batch["pairs"]].double()  # (images, [caption, negative])
    expected = (t.softmax(-1) * (t.log_softmax(-1) - s.log_softmax(-1))).sum(-1).mean()
    assert expected > 0.01 and parts["pred"] == pytest.approx(float(expected), rel=1e-4)

    teacher.ranking = False
    bce = step(teacher, view, batch, LossWeights(attn=0.0), task="itm")[1]["pred"]
    with torch.no_grad():  # the same logits shifted: a ranking score only counts differences within an image
        teacher.model.rank_output.bias.add_(5.0)
    assert step(teacher, view, batch, LossWeights(attn=0.0), task="itm")[1]["pred"] != pytest.approx(bce)
    teacher.ranking = True
    assert step(teacher, view, batch, LossWeights(attn=0.0), task="itm")[1]["pred"] == pytest.approx(parts["pred"])


# --- initialisation, dropout, learning rates ------------------------------------------------------------


def save_pretrained_vilt(directory: Path, tokenizer, cls=ViltForMaskedLM, hidden: int = 48) -> Path:
    """A tiny 'pre-trained' ViLT that is not the teacher: wider than it (hidden 48), the same heads and
    patches, the teacher's tokenizer."""
    config = ViltConfig(**{**TINY, "hidden_size": hidden}, max_position_embeddings=40,
                        vocab_size=tokenizer.get_vocab_size())  # fmt: skip
    torch.manual_seed(1)
    cls(config).save_pretrained(directory)
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory


@pytest.mark.parametrize("cls", [ViltForMaskedLM, ViltModel])
def test_init_from_a_pretrained_vilt_loads_it_into_both_towers(tokenizer, tmp_path, cls):
    teacher, _ = make_models(tokenizer)
    source = save_pretrained_vilt(tmp_path / "pretrained", tokenizer, cls)
    vilt = ViltModel.from_pretrained(source)
    student = student_from_pretrained(source, teacher, dropout=0.1)
    assert (student.config.hidden_size, student.config.dropout, student.config.task) == (48, 0.1, "vqa")
    for tower in (student.text_tower, student.image_tower):
        for dst, src in zip(tower.encoder.layers, vilt.encoder.layer, strict=True):
            assert torch.equal(dst.attention.query.weight, src.attention.attention.query.weight)
            assert torch.equal(dst.output.weight, src.output.dense.weight)
    emb = vilt.embeddings
    assert torch.equal(student.text_tower.word_embeddings.weight, emb.text_embeddings.word_embeddings.weight)
    assert torch.equal(student.image_tower.patch_projection.weight, emb.patch_embeddings.projection.weight)
    assert torch.equal(student.image_tower.modality_embedding, emb.token_type_embeddings.weight[1])

    other = tmp_path / "other-tokenizer"
    save_pretrained_vilt(other, train_wordpiece(["an entirely different text"] * 3, vocab_size=120), cls)
    with pytest.raises(ValueError, match=r"does not fit the teacher: .*tokenizer\.json differs"):
        student_from_pretrained(other, teacher)


def test_distill_init_takes_a_pretrained_vilt_and_saves_what_it_used(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("DIDE_DATA_DIR", str(tmp_path / "data"))
    scenes = "scenes:train=16,test=8,seed=3"
    words = train_wordpiece([*TEXTS, *VQA_LABELS] * 3, vocab_size=120)
    teacher_dir = tmp_path / "teacher"
    build_teacher("tiny", "vqa", list(VQA_LABELS), words, scenes, max_text_len=TEXT_LEN).save(teacher_dir)
    source = save_pretrained_vilt(tmp_path / "mlm", words)
    fast = ["--epochs", "1", "--batch-size", "8", "--threads", "1", "--augment", "none"]
    out = tmp_path / "student"
    argv = ["distill", "--task", "vqa", "--teacher", str(teacher_dir), "--init", str(source), "--out", str(out)]
    assert main([*argv, *fast]) == 0
    assert load_student(out).model.config.hidden_size == 48  # the checkpoint's towers, not the teacher's
    saved = json.loads((out / "config.json").read_text())
    assert saved["training"]["init"] == str(source) and saved["training"]["head_lr_mult"] == 10.0
    assert saved["student"]["dropout"] == 0.1 and saved["ranking"] is False

    shutil.rmtree(out)
    assert main([*argv[:-4], "--out", str(out), "--dropout", "0", "--head-lr-mult", "2", *fast]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["student"]["dropout"] == 0.0 and saved["training"]["head_lr_mult"] == 2.0
    assert saved["training"]["init"] == "teacher" and load_student(out).model.config.hidden_size == 32


def test_tower_dropout_is_active_in_training_only(tokenizer):
    teacher, _ = make_models(tokenizer)
    student = student_from_teacher(teacher, dropout=0.1)
    assert student.config.dropout == 0.1
    ids, mask = (torch.from_numpy(a) for a in teacher.text(TEXTS))
    student.train()
    assert not torch.equal(student.encode_text(ids, mask), student.encode_text(ids, mask))
    student.eval()
    assert torch.equal(student.encode_text(ids, mask), student.encode_text(ids, mask))


@pytest.mark.parametrize("task,mult", [("vqa", 10.0), ("entailment", 1.0), ("reasoning", 1.0), ("itm", 1.0)])
def test_head_learning_rate_multiplier_follows_the_official_configs(tokenizer, task, mult):
    args = parse_args(["distill", "--task", task, "--teacher", "t", "--out", "o", "--lr", "1e-4"])
    assert args.head_lr_mult == mult
    assert parse_args(["pretrain", "--teacher", "t", "--out", "o"]).head_lr_mult == 1.0
    assert parse_args([*DISTILL, "--head-lr-mult", "3"]).head_lr_mult == 3.0  # an explicit override wins
    _, view = make_models(tokenizer)
    groups = param_groups(view, args.lr, 0.01, args.head_lr_mult)
    head = {id(p) for p in view.student.classifier.parameters()}
    fusion = {id(p) for p in view.student.fusion.parameters()}
    for g in groups:
        ids = {id(p) for p in g["params"]}
        assert ids <= head or not ids & head
        assert g["lr"] == pytest.approx(1e-4 * (mult if ids <= head else 1.0))
        if ids & fusion:
            assert g["lr"] == pytest.approx(1e-4)  # the fusion MLP is not a head (official head_names)
