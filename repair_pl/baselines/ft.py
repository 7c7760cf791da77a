"""FT-L: constrained fine-tuning of one down projection (Zhu et al. 2020; EasyEdit's FT-L)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class FineTunedLayer(nn.Module):
    """Replaces an ``nn.Linear`` down projection with a trainable copy ``weight`` that is used for
    every input (no router). :meth:`constrain` clamps it elementwise to
    ``±norm_constraint`` around the unedited weight, so edits accumulate inside one box.

    Modes: ``"off"`` (the unedited weight), ``"edit"`` and ``"route"`` (the fine-tuned weight,
    for every sequence). ``routing()`` is accepted and ignored, so the module is a drop-in for
    :class:`~repair_pl.side_memory.SideMemory`.
    """

    def __init__(self, main: nn.Linear, norm_constraint: float | None = 5e-4):
        super().__init__()
        if main.bias is not None:
            raise ValueError("FT-L expects a bias-free down projection (Llama-family MLP)")
        self.main = main
        self.weight = nn.Parameter(main.weight.detach().float().clone())  # fp32 like the side memory
        self.norm_constraint = norm_constraint
        self.mode = "route"
        self.last_scores: Tensor | None = None
        self.last_choice: Tensor | None = None

    @contextmanager
    def routing(self, mask: Tensor | None, sticky: bool = False) -> Iterator[None]:
        """No router: every input takes the fine-tuned weight (kept for interface parity)."""
        yield

    def invalidate(self) -> None:
        """Nothing is cached (kept for interface parity)."""

    @torch.no_grad()
    def constrain(self) -> None:
        """Clamp ``weight`` to ``±norm_constraint`` around the unedited weight (None: no clamp)."""
        if self.norm_constraint is not None:
            original = self.main.weight.float()
            self.weight.copy_(torch.clamp(self.weight, original - self.norm_constraint,
                                          original + self.norm_constraint))

    @torch.no_grad()
    def reset(self) -> None:
        """Forget every edit."""
        self.weight.copy_(self.main.weight.float())

    def state(self) -> tuple[dict[str, Tensor], dict]:
        """Tensors and metadata of the edits (for :mod:`repair_pl.checkpoint`)."""
        return {"weight": self.weight.detach()}, {"norm_constraint": self.norm_constraint}

    @torch.no_grad()
    def load_state(self, tensors: dict[str, Tensor], meta: dict) -> None:
        """Restore a state from :meth:`state`."""
        self.weight.copy_(tensors["weight"])

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "off":
            self.last_choice = torch.full(x.shape[:1], -1, dtype=torch.long, device=x.device)
            return self.main(x)
        self.last_choice = torch.zeros(x.shape[:1], dtype=torch.long, device=x.device)
        return F.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)
