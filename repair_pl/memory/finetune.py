"""``FineTunedLayer``: constrained fine-tuning of one down projection, the FT-L and FT-M baselines.

A trainable copy of the down projection serves every input (no router); edits accumulate in it.
The two objectives are EasyEdit's ``objective_optimization`` values:

- ``"prompt_last"`` (FT-L, Zhu et al. 2020 as EasyEdit runs it): the prompt alone is fed, and
  every target token's log-probability is read at the prompt's last position;
  loss = -mean_j log p(target_j | prompt).
- ``"target"`` (FT-M, EasyEdit's ``target_new``): ``prompt + " " + target`` teacher-forced,
  cross-entropy on the target tokens only.

After every step the weight is clamped elementwise to ``+-norm_constraint`` around its value at
the start of the edit (EasyEdit) or, with ``clamp_to="unedited"``, around the unedited weight
(Zhu et al.'s constraint: all edits stay in one box). An edit stops once its loss is below
``stop_loss`` (EasyEdit's 1e-2).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repair_pl.evaluate import encode_pairs
from repair_pl.memory.base import EditableLayer, edit_only_losses, lr_tagged
from repair_pl.memory.batch import flat_indices, prompt_target_batch

OBJECTIVES = ("prompt_last", "target")
CLAMP_TO = ("edit_start", "unedited")


class FineTunedLayer(EditableLayer):
    """FT-L / FT-M (see the module docstring). Defaults are EasyEdit's FT hyperparameters
    (Adam, lr 5e-4, box 5e-4 around the weight at the start of the edit, stop below 1e-2).

    Args:
        objective: ``"prompt_last"`` (FT-L) or ``"target"`` (FT-M).
        lr: Adam learning rate.
        norm_constraint: half-width of the elementwise box (``None``: no clamp).
        clamp_to: the box's centre: ``"edit_start"`` or ``"unedited"``.
        stop_loss: an edit ends once its loss is below this (``None``: always the full budget).
    """

    def __init__(self, objective: str = "prompt_last", lr: float = 5e-4, norm_constraint: float | None = 5e-4,
                 clamp_to: str = "edit_start", stop_loss: float | None = 0.01):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"FineTunedLayer.objective must be one of {OBJECTIVES}, got {objective!r}")
        if clamp_to not in CLAMP_TO:
            raise ValueError(f"FineTunedLayer.clamp_to must be one of {CLAMP_TO}, got {clamp_to!r}")
        if not lr > 0:
            raise ValueError(f"FineTunedLayer.lr must be positive, got {lr!r}")
        self.objective, self.lr, self.norm_constraint = objective, lr, norm_constraint
        self.clamp_to, self.stop_loss = clamp_to, stop_loss

    def attach(self, main: nn.Linear, seed: int = 0) -> None:
        super().attach(main, seed)
        self.weight = nn.Parameter(main.weight.detach().float().clone())  # fp32 like the side memory

    @property
    def trainable(self) -> nn.Parameter:
        return self.weight

    def prepare(self, record, module, retry: bool = False) -> dict[str, Any]:
        tok, max_length = module.tokenizer, module.hparams.max_length
        if self.objective == "target":
            return prompt_target_batch(tok, [record.prompt], record.target, max_length)
        # prompt_last: the prompt alone; the target tokens are all scored at its last position
        enc = encode_pairs(tok, [record.prompt], [record.target], max_length)
        n_prompt = int(enc.prompt_mask[0].sum())
        last = torch.zeros_like(enc.prompt_mask)
        last[0, n_prompt - 1] = True
        keep = slice(0, n_prompt)
        return {"input_ids": enc.input_ids[:, keep], "attention_mask": enc.attention_mask[:, keep],
                "route_mask": enc.prompt_mask[:, keep], "answer_mask": enc.answer_mask[:, keep],
                "is_edit": torch.ones(1, dtype=torch.bool), "positions": flat_indices(last[:, keep]),
                "labels": enc.input_ids[0][enc.answer_mask[0]], "n_first": 1,
                "edit_rows": torch.zeros(1, dtype=torch.long), "other_rows": torch.zeros(0, dtype=torch.long)}

    def losses(self, logits: Tensor, labels: Tensor, batch: dict[str, Any]) -> dict[str, Tensor]:
        if self.objective == "prompt_last":  # one position, every target token read there
            log_probs = F.log_softmax(logits[0].float(), dim=-1)
            edit_loss = -log_probs[labels].mean()
            correct = (logits[0].argmax(-1) == labels[0]).float()
        else:
            edit_loss = F.cross_entropy(logits.float(), labels)
            correct = (logits.argmax(-1) == labels).all().float()
        return edit_only_losses(edit_loss, correct)

    def configure_optimizer(self) -> torch.optim.Optimizer:
        return lr_tagged(torch.optim.Adam([self.weight], lr=self.lr), self.lr)

    def after_step(self, stats) -> bool:
        if self.norm_constraint is not None:
            centre = self.main.weight.float() if self.clamp_to == "unedited" else self.edit_start
            with torch.no_grad():
                self.weight.copy_(torch.clamp(self.weight, centre - self.norm_constraint,
                                              centre + self.norm_constraint))
        return self.stop_loss is not None and stats["edit_loss"] < self.stop_loss

    def state(self) -> tuple[dict[str, Tensor], dict]:
        return {"weight": self.weight.detach()}, {"objective": self.objective, "norm_constraint": self.norm_constraint}

    def load_state(self, tensors: dict[str, Tensor], meta: dict) -> None:
        with torch.no_grad():
            self.weight.copy_(tensors["weight"])

    def reset(self, seed: int = 0) -> None:
        with torch.no_grad():
            self.weight.copy_(self.main.weight.float())

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "off":
            return self._no_route(x)
        self.last_choice = torch.zeros(x.shape[:1], dtype=torch.long, device=x.device)
        return F.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)
