"""GRACE (Hartvigsen et al. 2023, "Aging with GRACE"): a discrete key-value codebook at one layer.

Keys are inputs of the down projection at a sequence's last prompt token; each key has a
trainable value (a vector of the layer's output size) and a radius epsilon. A sequence whose
query (its last prompt token's input) lies within epsilon (L2) of the nearest key gets that
key's value as the layer output from the prompt's last token on (earlier prompt tokens keep the
frozen output; our choice among GRACE's replacement rules, which keeps generation with a KV cache
simple: the decision is made once from the prompt).
Every other sequence gets the frozen layer's output, bit for bit.

A new edit with key ``h`` and answer ``y`` (GRACE's codebook update):

- no key within ``epsilon_nearest + eps`` of ``h``: add ``h`` with radius ``eps``;
- the nearest key has the same answer: grow its radius to reach ``h`` and train its value;
- the nearest key has another answer (the balls would overlap): split, both radii become
  half the distance (never larger than before), and add ``h``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repair_pl.memory.base import EditableLayer, edit_only_losses, lr_tagged
from repair_pl.memory.batch import prompt_target_batch


class GraceCodebook(EditableLayer):
    """GRACE's codebook in place of the down projection (see the module docstring).

    Modes: ``"off"`` (the frozen layer), ``"edit"`` (the value being trained, :attr:`value`,
    replaces the output of every row), ``"route"`` (inference: codebook lookup per sequence).
    In "off" and "route" the queries of the last call are kept in :attr:`last_queries`; in
    "route" :attr:`last_scores` holds the distance to the nearest key and :attr:`last_choice`
    the key used (-1: none).

    Args:
        eps: initial radius of a new key (L2, in the units of the down projection's input).
        lr: SGD learning rate of the value an edit trains.
        stop_loss: training a value ends once the prompt's target is fully predicted and the
            loss is below this (``None``: always the full budget).
    """

    def __init__(self, eps: float = 1.0, lr: float = 300.0, stop_loss: float | None = 0.1):
        super().__init__()
        if eps <= 0:
            raise ValueError(f"GraceCodebook.eps must be positive, got {eps}")
        if not lr > 0:
            raise ValueError(f"GraceCodebook.lr must be positive, got {lr!r}")
        self.eps, self.lr, self.stop_loss = eps, lr, stop_loss

    def attach(self, main: nn.Linear, seed: int = 0) -> None:
        super().attach(main, seed)
        d_out, d_in = main.weight.shape
        device = main.weight.device
        self.register_buffer("keys", torch.zeros(0, d_in, device=device), persistent=False)
        self.register_buffer("values", torch.zeros(0, d_out, device=device), persistent=False)
        self.register_buffer("epsilons", torch.zeros(0, device=device), persistent=False)
        self.labels: list[str] = []  # each key's answer (the split rule compares them)
        self.value = nn.Parameter(torch.zeros(d_out, device=device))  # the value trained by the current edit
        self.editing: int | None = None  # the key whose value is being trained
        self.last_queries: Tensor | None = None
        self.last_outputs: Tensor | None = None  # the frozen layer's output at the queries

    def __len__(self) -> int:
        return self.keys.shape[0]

    @property
    def trainable(self) -> nn.Parameter:
        return self.value

    # ---- one edit --------------------------------------------------------------------------
    def prepare(self, record, module, retry: bool = False) -> dict[str, Any]:
        return prompt_target_batch(module.tokenizer, [record.prompt], record.target, module.hparams.max_length)

    @torch.no_grad()
    def begin_edit(self, record, batch: dict[str, Any], module) -> None:
        """The key is the down projection's input at the prompt's last token (read from the
        unedited model); its value starts as the frozen output there."""
        previous, self.mode = self.mode, "off"
        try:
            module(batch["input_ids"], batch["attention_mask"], batch["route_mask"])
        finally:
            self.mode = previous
        self.add_edit(self.last_queries[0], record.target, self.last_outputs[0])
        super().begin_edit(record, batch, module)

    def losses(self, logits: Tensor, labels: Tensor, batch: dict[str, Any]) -> dict[str, Tensor]:
        edit_loss = F.cross_entropy(logits.float(), labels)
        return edit_only_losses(edit_loss, (logits.argmax(-1) == labels).all().float())

    def configure_optimizer(self) -> torch.optim.Optimizer:
        return lr_tagged(torch.optim.SGD([self.value], lr=self.lr), self.lr)

    def after_step(self, stats) -> bool:
        return self.stop_loss is not None and stats["target_correct"] == 1.0 and stats["edit_loss"] < self.stop_loss

    def finish_edit(self, record, batch: dict[str, Any], module, success: bool) -> float:
        self.end_edit()
        return super().finish_edit(record, batch, module, success)

    # ---- codebook ----------------------------------------------------------------------------
    def _last_positions(self, x: Tensor) -> Tensor:
        """Index of each row's last routing token (the last position without a matching mask)."""
        mask = self.route_mask
        if mask is None or mask.shape != x.shape[:2]:
            return torch.full(x.shape[:1], x.shape[1] - 1, dtype=torch.long, device=x.device)
        positions = torch.arange(mask.shape[1], device=x.device).expand_as(mask)
        return torch.where(mask.bool(), positions, -1).max(dim=1).values.clamp_min(0)

    def lookup(self, queries: Tensor) -> tuple[Tensor, Tensor]:
        """``(choice, distance)`` per query: the nearest key if within its radius, else -1."""
        if not len(self):
            inf = torch.full(queries.shape[:1], float("inf"), device=queries.device)
            return torch.full(queries.shape[:1], -1, dtype=torch.long, device=queries.device), inf
        distance, nearest = torch.cdist(queries.float(), self.keys).min(dim=1)
        hit = distance <= self.epsilons[nearest]
        return torch.where(hit, nearest, -1), distance

    @torch.no_grad()
    def add_edit(self, key: Tensor, label: str, init: Tensor) -> int:
        """Apply GRACE's codebook update for an edit with query ``key`` and answer ``label``;
        returns the key whose value the edit trains and loads it into :attr:`value` (``init``,
        the frozen output at the key, starts a new value)."""
        key, init = key.detach().float().to(self.keys.device), init.detach().float().to(self.values.device)
        if len(self):
            distances = (self.keys - key).norm(dim=1)
            distance, nearest = distances.min(dim=0)
            distance, nearest = float(distance), int(nearest)
            if distance <= float(self.epsilons[nearest]) + self.eps:
                if self.labels[nearest] == label:  # same answer: expand the ball to cover the key
                    self.epsilons[nearest] = max(float(self.epsilons[nearest]), distance)
                    return self._start(nearest)
                # another answer: split, neither ball grows and they no longer overlap
                self.epsilons[nearest] = min(float(self.epsilons[nearest]), distance / 2 - 1e-5)
                return self._append(key, label, init, min(self.eps, distance / 2))
        return self._append(key, label, init, self.eps)

    def _append(self, key: Tensor, label: str, init: Tensor, eps: float) -> int:
        self.keys = torch.cat([self.keys, key[None]])
        self.values = torch.cat([self.values, init[None]])
        self.epsilons = torch.cat([self.epsilons, self.epsilons.new_tensor([eps])])
        self.labels.append(label)
        return self._start(len(self) - 1)

    def _start(self, index: int) -> int:
        self.editing = index
        self.value.data.copy_(self.values[index])
        return index

    @torch.no_grad()
    def end_edit(self) -> None:
        """Write the trained :attr:`value` back into the codebook."""
        if self.editing is not None:
            self.values[self.editing] = self.value.detach()
            self.editing = None

    @torch.no_grad()
    def reset(self, seed: int = 0) -> None:
        """Forget every edit (an empty codebook)."""
        self.keys, self.values = self.keys[:0], self.values[:0]
        self.epsilons, self.labels, self.editing = self.epsilons[:0], [], None

    def state(self) -> tuple[dict[str, Tensor], dict]:
        return ({"keys": self.keys, "values": self.values, "epsilons": self.epsilons},
                {"labels": list(self.labels), "grace_eps": self.eps})

    def load_state(self, tensors: dict[str, Tensor], meta: dict) -> None:
        device = self.keys.device
        self.keys, self.values = tensors["keys"].float().to(device), tensors["values"].float().to(device)
        self.epsilons, self.labels, self.editing = tensors["epsilons"].float().to(device), list(meta["labels"]), None

    # ---- forward -----------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        main_out = self.main(x)
        last = self._last_positions(x)
        after = torch.arange(x.shape[1], device=x.device)[None, :] >= last[:, None]  # (B, T)
        if self.mode == "edit":
            return torch.where(after[..., None], self.value.to(main_out.dtype), main_out)
        if self.mode == "route" and self._sticky_on and self.sticky is not None:
            choice = self.sticky  # later generation steps: keep the prompt's decision
        else:
            rows = torch.arange(x.shape[0], device=x.device)
            self.last_queries = x[rows, last].detach().float()
            self.last_outputs = main_out[rows, last].detach().float()
            if self.mode == "off":
                self.last_choice = torch.full(x.shape[:1], -1, dtype=torch.long, device=x.device)
                return main_out
            choice, self.last_scores = self.lookup(self.last_queries)
            if self._sticky_on:
                self.sticky = choice
        self.last_choice = choice
        if not bool((choice >= 0).any()):
            return main_out
        replaced = self.values[choice.clamp_min(0)].to(main_out.dtype)[:, None, :].expand_as(main_out)
        return torch.where(((choice >= 0)[:, None] & after)[..., None], replaced, main_out)
