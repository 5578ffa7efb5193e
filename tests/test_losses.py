"""DiDE losses against hand-computed cases, and their finiteness on padded, masked and half inputs."""

import math

import pytest
import torch
import torch.nn.functional as F

from training import losses


def test_vqa_kd_loss_hand_computed():
    # BCE(logit 0, target sigmoid(0) = 0.5) = log 2 per answer; mean over answers, times the answer count.
    s, t = torch.zeros(1, 3), torch.zeros(1, 3)
    assert losses.vqa_kd_loss(s, t).item() == pytest.approx(3 * math.log(2), rel=1e-6)


def test_softmax_kd_loss_hand_computed():
    teacher = torch.tensor([[0.0, math.log(3.0)]])  # p = (0.25, 0.75)
    student = torch.zeros(1, 2)  # q = (0.5, 0.5)
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert losses.softmax_kd_loss(student, teacher).item() == pytest.approx(expected, rel=1e-6)
    assert losses.softmax_kd_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)


def test_ground_truth_losses_hand_computed():
    logits = torch.tensor([[0.0, math.log(3.0)]])
    assert losses.ce_gt_loss(logits, torch.tensor([[0.0, 1.0]])).item() == pytest.approx(-math.log(0.75))
    soft = torch.tensor([[1.0, 0.0]])
    expected = 2 * 0.5 * (math.log(2) + (math.log(3.0) + math.log(1 + 1 / 3.0)))
    assert losses.vqa_gt_loss(logits, soft).item() == pytest.approx(expected, rel=1e-6)


def test_attention_kl_restricts_to_valid_keys():
    # Teacher over the two valid keys: (0.5, 0.5); the huge masked score must be ignored.
    teacher = torch.tensor([0.0, 0.0, 100.0]).view(1, 1, 1, 3)
    student = torch.tensor([0.0, math.log(3.0), -5.0]).view(1, 1, 1, 3)  # (0.25, 0.75) over valid keys
    mask = torch.tensor([[True, True, False]])
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert losses.attention_kl(teacher, student, mask).item() == pytest.approx(expected, rel=1e-5)


def test_attention_kl_query_mask_averages_valid_rows_only():
    teacher = torch.zeros(1, 1, 2, 2)
    student = torch.tensor([[[[0.0, 0.0], [0.0, math.log(3.0)]]]])
    row1 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert losses.attention_kl(teacher, student).item() == pytest.approx(row1 / 2, rel=1e-5)
    only_second = torch.tensor([[False, True]])
    assert losses.attention_kl(teacher, student, query_mask=only_second).item() == pytest.approx(row1, rel=1e-5)


def test_official_masking_gives_nan_and_ours_does_not():
    # The official code fills masked keys with -inf before kl_div: 0 * -inf = NaN on current PyTorch.
    scores = torch.tensor([[0.0, 1.0, float("-inf")]])
    official = F.kl_div(scores.log_softmax(-1), scores.softmax(-1), reduction="none") * torch.tensor([1.0, 1.0, 0.0])
    assert torch.isnan(official.sum())
    finite = losses.attention_kl(
        torch.tensor([0.0, 1.0, 0.0]).view(1, 1, 1, 3),
        torch.tensor([0.0, 1.0, 0.0]).view(1, 1, 1, 3),
        torch.tensor([[True, True, False]]),
    )
    assert torch.isfinite(finite) and finite.item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cross_modal_loss_finite_for_padding_all_masked_and_half(dtype):
    torch.manual_seed(0)
    B, H, L, N, hs = 3, 2, 5, 7, 4

    def qk(requires_grad=False):
        return [torch.randn(B, H, n, hs, dtype=dtype, requires_grad=requires_grad) for n in (L, L, N, N)]

    teacher = qk()
    s_txt_q, s_txt_k, s_img_q, s_img_k = qk(requires_grad=True)
    text_mask = torch.ones(B, L, dtype=torch.bool)
    text_mask[1, 2:] = False  # a padded text
    text_mask[2] = False  # a fully padded row: every text key masked
    image_mask = torch.ones(B, N, dtype=torch.bool)
    image_mask[2] = False  # all image keys masked too
    loss = losses.cross_modal_attention_loss(teacher, (s_txt_q, s_txt_k), (s_img_q, s_img_k), text_mask, image_mask)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    for t in (s_txt_q, s_txt_k, s_img_q, s_img_k):
        assert torch.isfinite(t.grad.float()).all()


def test_cross_modal_loss_zero_when_student_matches_teacher_and_directions_are_flags():
    torch.manual_seed(1)
    q_t, k_t, q_i, k_i = (torch.randn(2, 2, n, 4) for n in (3, 3, 5, 5))
    mask = torch.ones(2, 3, dtype=torch.bool)
    same = losses.cross_modal_attention_loss((q_t, k_t, q_i, k_i), (q_t, k_t), (q_i, k_i), mask)
    assert same.item() == pytest.approx(0.0, abs=1e-6)
    other = (torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4))
    both = losses.cross_modal_attention_loss((q_t, k_t, q_i, k_i), other, (q_i, k_i), mask)
    t2i = losses.cross_modal_attention_loss((q_t, k_t, q_i, k_i), other, (q_i, k_i), mask, i2t=False)
    i2t = losses.cross_modal_attention_loss((q_t, k_t, q_i, k_i), other, (q_i, k_i), mask, t2i=False)
    assert t2i.item() > 0 and i2t.item() > 0
    assert both.item() == pytest.approx(t2i.item() + i2t.item(), rel=1e-5)
    none = losses.cross_modal_attention_loss((q_t, k_t, q_i, k_i), other, (q_i, k_i), mask, t2i=False, i2t=False)
    assert none.item() == 0.0
