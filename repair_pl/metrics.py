"""Editing metrics as WISE/EasyEdit define them, as torchmetrics ``Metric`` classes.

All are teacher-forced and token level. Each update takes rows of predicted tokens, reference
tokens and a mask of the positions that count (the answer's tokens); a row's score is the
fraction of its masked positions that match, and ``compute`` is the mean over rows (rows with
no masked position are skipped, as EasyEdit skips NaN).

- :class:`RewriteAccuracy`: reference = the new answer's tokens after the edit prompt.
- :class:`Generalization`: the same on paraphrases of the edit prompt.
- :class:`Locality`: reference = the unedited model's predictions on an unrelated prompt's
  answer positions; 1.0 means nothing changed.
- :class:`ExactMatch`: 1 for a row whose masked positions all match, else 0.
- :class:`TargetPerplexity`: exp of the mean negative log-likelihood of the answer's tokens
  (WISE's metric on Hallucination; lower is better). Its update takes logits, not predictions.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


def token_accuracy(preds: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Per-row fraction of masked positions where ``preds == target`` (NaN for empty rows)."""
    if preds.shape != target.shape or preds.shape != mask.shape:
        raise ValueError(f"preds {tuple(preds.shape)}, target {tuple(target.shape)} and mask "
                         f"{tuple(mask.shape)} must have the same shape")
    mask = mask.bool()
    hits = ((preds == target) & mask).sum(-1).float()
    return hits / mask.sum(-1).float()  # 0/0 -> NaN marks rows with nothing to score


def exact_match(preds: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Per-row 1.0 when every masked position matches, else 0.0 (NaN for empty rows)."""
    acc = token_accuracy(preds, target, mask)
    return torch.where(acc.isnan(), acc, (acc == 1.0).float())


def target_perplexity(logits: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Per-row perplexity of the masked target tokens: ``exp(mean NLL)`` (NaN for empty rows).

    ``logits[:, t]`` scores ``target[:, t]`` (already aligned, as :func:`token_accuracy`'s inputs).
    """
    if logits.shape[:-1] != target.shape or target.shape != mask.shape:
        raise ValueError(f"logits {tuple(logits.shape)} must be target {tuple(target.shape)} + a vocabulary "
                         f"dimension, and mask {tuple(mask.shape)} the target's shape")
    nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), target, reduction="none")
    mask = mask.bool()
    mean_nll = (nll * mask).sum(-1) / mask.sum(-1).float()  # 0/0 -> NaN for empty rows
    return mean_nll.exp()


class _RowMean(Metric):
    """Mean over rows of a per-row score; subclasses choose the score."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    _score = staticmethod(token_accuracy)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("rows", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor, mask: Tensor) -> None:
        scores = self._score(preds, target, mask)
        scores = scores[~scores.isnan()]
        self.total += scores.double().sum()
        self.rows += scores.numel()

    def compute(self) -> Tensor:
        return (self.total / self.rows).float() if self.rows > 0 else torch.tensor(float("nan"))


class RewriteAccuracy(_RowMean):
    """Token accuracy of the new answer after the edit prompt (WISE's Rel.)."""


class Generalization(_RowMean):
    """Token accuracy of the new answer after a paraphrase of the edit prompt (WISE's Gen.)."""


class Locality(_RowMean):
    """Share of answer positions of unrelated prompts whose argmax is unchanged by editing
    (WISE's Loc.); pass the unedited model's predictions as ``target``."""


class ExactMatch(_RowMean):
    """Share of rows whose answer tokens are all predicted correctly."""

    _score = staticmethod(exact_match)


class TargetPerplexity(_RowMean):
    """Mean over rows of the answer's perplexity given the prompt (WISE's Hallucination metric);
    ``update(logits, target, mask)`` with logits aligned to ``target``."""

    higher_is_better = False
    _score = staticmethod(target_perplexity)
