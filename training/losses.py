"""DiDE losses as pure functions over tensors: prediction KD, cross-modal attention KD, ground truth.

Every loss computes in float32 whatever the input dtype (fp16/bf16 autocast included) and stays finite
for fully padded rows and all-masked keys: masked keys get a finite fill and their terms are zeroed with
`torch.where`, never `0 * -inf` (which is what makes the official code return NaN on current PyTorch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

MASK_FILL = -1e30  # finite in float32, and exp(MASK_FILL - any real score) is exactly 0


def vqa_kd_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """BCEWithLogits(student, sigmoid(teacher)), mean over batch x answers, times the answer count (ViLT).

    Also ITM's: with its one logit, plain BCE against the teacher's match probability."""
    s, t = student_logits.float(), teacher_logits.float()
    return F.binary_cross_entropy_with_logits(s, torch.sigmoid(t)) * s.shape[1]


def softmax_kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(softmax(teacher/T) || softmax(student/T)), batch mean, times T^2 (T = 1 in the official code)."""
    s, t = student_logits.float() / temperature, teacher_logits.float() / temperature
    return F.kl_div(s.log_softmax(-1), t.log_softmax(-1), reduction="batchmean", log_target=True) * temperature**2


def ranking_kd_loss(student_logits: Tensor, teacher_logits: Tensor, pairs: Tensor) -> Tensor:
    """KD for an ITM head trained as a ranking score: softmax KD over each image's captions.

    logits: (N, 1), one score per image-caption pair; pairs: (P, C) row indices of one image's captions
    (matched first). Both models' scores are softmaxed over each row of `pairs`, as ViLT's retrieval
    fine-tuning trained the teacher's head, so only score differences within an image count.
    """
    return softmax_kd_loss(student_logits[:, 0][pairs], teacher_logits[:, 0][pairs])


def vqa_gt_loss(logits: Tensor, soft_targets: Tensor) -> Tensor:
    """BCEWithLogits against the VQA soft scores, times the answer count (ViLT's VQA loss; ITM's BCE)."""
    return F.binary_cross_entropy_with_logits(logits.float(), soft_targets.float()) * logits.shape[1]


def ce_gt_loss(logits: Tensor, targets: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy against one-hot (or soft) targets of shape (B, C)."""
    return F.cross_entropy(logits.float(), targets.float(), label_smoothing=label_smoothing)


def masked_log_softmax(scores: Tensor, key_mask: Tensor | None) -> Tensor:
    """log_softmax over the last axis restricted to valid keys; masked entries get a finite value."""
    scores = scores.float()
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask, MASK_FILL)
    return scores.log_softmax(dim=-1)


def attention_kl(
    teacher_scores: Tensor,
    student_scores: Tensor,
    key_mask: Tensor | None = None,
    query_mask: Tensor | None = None,
) -> Tensor:
    """Mean over (batch, head, query row) of KL(teacher || student), each a softmax over valid keys only.

    scores: (B, H, Q, K) attention logits; key_mask: (B, K) bool, True = valid; query_mask: (B, Q) bool,
    rows to average over (None = every row, as the official code, which also counts padded query rows).
    A row whose keys are all masked contributes 0.
    """
    log_t = masked_log_softmax(teacher_scores, None if key_mask is None else key_mask[:, None, None, :])
    log_s = masked_log_softmax(student_scores, None if key_mask is None else key_mask[:, None, None, :])
    terms = log_t.exp() * (log_t - log_s)
    if key_mask is not None:
        # Also covers rows with no valid key at all (uniform over fill values in both): exactly 0.
        terms = torch.where(key_mask[:, None, None, :], terms, torch.zeros_like(terms))
    per_row = terms.sum(dim=-1)  # (B, H, Q)
    if query_mask is None:
        return per_row.mean()
    w = query_mask[:, None, :].to(per_row.dtype).expand_as(per_row)
    return (per_row * w).sum() / w.sum().clamp_min(1.0)


def cross_attention_scores(query: Tensor, key: Tensor) -> Tensor:
    """Attention logits q k^T / sqrt(hs) in float32: (B, H, Q, hs) x (B, H, K, hs) -> (B, H, Q, K)."""
    q, k = query.float(), key.float()
    return q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5


def cross_modal_attention_loss(
    teacher_qk: tuple[Tensor, Tensor, Tensor, Tensor],
    student_text_qk: tuple[Tensor, Tensor],
    student_image_qk: tuple[Tensor, Tensor],
    text_mask: Tensor,
    image_mask: Tensor | None = None,
    t2i: bool = True,
    i2t: bool = True,
) -> Tensor:
    """DiDE's cross-modal attention distillation over the last layer, in either or both directions.

    teacher_qk: (q_text, k_text, q_image, k_image) from the fusion teacher's last layer; the student's
    come from its text tower and its image tower (the *virtual* cross attention). text_mask: (B, L) key
    validity of text tokens; image_mask: (B, 1+N) (None = all patches valid).
    """
    tq_txt, tk_txt, tq_img, tk_img = teacher_qk
    sq_txt, sk_txt = student_text_qk
    sq_img, sk_img = student_image_qk
    loss = sq_txt.new_zeros((), dtype=torch.float32)
    if t2i:  # text queries over image keys: (B, H, L, 1+N)
        loss = loss + attention_kl(
            cross_attention_scores(tq_txt, tk_img), cross_attention_scores(sq_txt, sk_img), image_mask
        )
    if i2t:  # image queries over text keys: (B, H, 1+N, L)
        loss = loss + attention_kl(
            cross_attention_scores(tq_img, tk_txt), cross_attention_scores(sq_img, sk_txt), text_mask.bool()
        )
    return loss
