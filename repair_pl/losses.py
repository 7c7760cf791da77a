"""Editing losses: target cross-entropy and WISE's margin routing loss (pure tensor functions)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def target_cross_entropy(logits: Tensor, input_ids: Tensor, answer_mask: Tensor) -> Tensor:
    """Mean cross-entropy over the answer tokens only (``logits[:, t]`` predicts token t+1)."""
    labels = input_ids[:, 1:].masked_fill(~answer_mask[:, 1:].bool(), -100)
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                           ignore_index=-100)


def margin_routing_loss(in_scope: Tensor, out_scope: Tensor, alpha: float, beta: float, gamma: float) -> Tensor:
    """WISE's routing loss ``[s(x_i) - alpha]+ + [beta - s(x_e)]+ + [gamma - (s(x_e) - s(x_i))]+``.

    ``in_scope`` holds scores s(x_e) of the edit's sequences, ``out_scope`` s(x_i) of unrelated
    ones; all pairs contribute (means over them).
    """
    e, i = in_scope.float(), out_scope.float()
    return (F.relu(i - alpha).mean() + F.relu(beta - e).mean()
            + F.relu(gamma - (e[:, None] - i[None, :])).mean())


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 2.0) -> Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, mean over positions (Hinton's
    scaling keeps the gradient size independent of ``T``)."""
    t = temperature
    teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    student = F.log_softmax(student_logits.float() / t, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * t * t
