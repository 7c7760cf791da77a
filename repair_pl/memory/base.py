"""``EditableLayer``: what replaces the edited MLP down projection and holds every edit.

A memory is built with its options only (so LightningCLI can build it from ``class_path`` /
``init_args``) and gets the frozen layer it wraps with :meth:`EditableLayer.attach`.
``RepairModule`` drives it through the methods below; everything that is specific to one editing
method (how an edit batch is built, its losses, its optimiser, its state) lives in the memory.

Modes: ``"off"`` (the frozen layer: the unedited model), ``"edit"`` (the weights being trained
serve every row) and ``"route"`` (inference: the memory decides per sequence).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn


class EditableLayer(nn.Module):
    """Base class of the layers that replace ``mlp.down_proj`` (see the module docstring).

    Subclasses store every ``__init__`` argument under its own name (the saved config reads them
    back, :func:`init_args`) and implement the editing methods below.
    """

    def __init__(self):
        super().__init__()
        self.main: nn.Linear | None = None
        self.mode = "route"
        self.route_mask: Tensor | None = None
        self.sticky: Tensor | None = None  # per-sequence decision kept across generate() steps
        self._sticky_on = False
        self.last_scores: Tensor | None = None
        self.last_choice: Tensor | None = None
        self.edit_start: Tensor | None = None  # the trained tensor at the start of the current edit
        self.route_texts: list[str] | None = None

    # ---- wiring ----------------------------------------------------------------------------
    def attach(self, main: nn.Linear, seed: int = 0) -> None:
        """Wrap the frozen down projection ``main``; ``seed`` seeds any randomness (masks)."""
        if self.main is not None:
            raise ValueError(f"this {type(self).__name__} already holds the edits of a model; build a new one")
        if main.bias is not None:
            raise ValueError(f"{type(self).__name__} expects a bias-free down projection (Llama-family MLP)")
        self.main = main

    @contextmanager
    def routing(self, mask: Tensor | None, sticky: bool = False, texts: list[str] | None = None) -> Iterator[None]:
        """Route on the tokens in ``mask`` (B, T) (or, for a memory that routes by prompt, on
        ``texts``, the sequences' prompts); ``sticky`` keeps the first decision per sequence for
        later calls (generation with a KV cache sees one new token per step)."""
        self.route_mask, self.sticky, self._sticky_on, self.route_texts = mask, None, sticky, texts
        try:
            yield
        finally:
            self.route_mask, self.sticky, self._sticky_on, self.route_texts = None, None, False, None

    def invalidate(self) -> None:
        """Forget cached inference weights (call after the trained weights changed)."""

    # ---- one edit --------------------------------------------------------------------------
    @property
    def trainable(self) -> nn.Parameter:
        """The tensor an edit trains (closed-loop feedback checkpoints and rolls it back)."""
        raise NotImplementedError

    def prepare(self, record, module, retry: bool = False) -> dict[str, Any]:
        """The edit batch of ``record`` (see :func:`repair_pl.memory.batch.with_loss_indices`);
        ``retry``: a re-edit of a record edited before."""
        raise NotImplementedError

    def begin_edit(self, record, batch: dict[str, Any], module) -> None:
        """Before the fit of one edit: remember where the trained tensor starts."""
        self.edit_start = self.trainable.detach().clone()

    def losses(self, logits: Tensor, labels: Tensor, batch: dict[str, Any]) -> dict[str, Tensor]:
        """``loss`` (optimised), ``edit_loss``, ``routing_loss``, ``in_scope``, ``out_scope`` and
        ``target_correct`` from the logits at ``batch["positions"]``."""
        raise NotImplementedError

    def configure_optimizer(self) -> torch.optim.Optimizer:
        """The optimiser of one edit; each param group carries ``base_lr`` (what the learning
        rate is scaled from) and ``configured_lr`` (the option's value)."""
        raise NotImplementedError

    def after_backward(self) -> None:
        """After the backward pass of a step (e.g. mask gradients)."""

    def after_step(self, stats) -> bool:
        """After the optimiser step (e.g. clamp weights); True stops the edit early."""
        return False

    def undo_edit(self) -> None:
        """Return the trained tensor to where the edit started, bit for bit."""
        with torch.no_grad():
            self.trainable.copy_(self.edit_start)

    def finish_edit(self, record, batch: dict[str, Any], module, success: bool) -> float:
        """After the fit of one edit; returns its in-scope routing score (NaN without routing)."""
        self.edit_start = None
        return float("nan")

    def after_edit(self, edit_count: int) -> None:
        """After a new edit (not a re-edit) counted as the ``edit_count``-th."""

    # ---- state -----------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, Tensor], dict]:
        """Tensors and JSON metadata that fully describe the edits."""
        raise NotImplementedError

    def load_state(self, tensors: dict[str, Tensor], meta: dict) -> None:
        """Restore a state from :meth:`state` (a saved state's compatibility is checked by the module)."""
        raise NotImplementedError

    def snapshot(self) -> tuple[dict[str, Tensor], dict]:
        """A state to return to later with :meth:`load_state`, unchanged by the edits made in
        between: :meth:`state` with every tensor copied. A layer whose finished tensors are
        never written in place shares them instead of copying them."""
        tensors, meta = self.state()
        return {k: v.clone() for k, v in tensors.items()}, copy.deepcopy(meta)

    def reset(self, seed: int = 0) -> None:
        """Forget every edit and start from the state right after :meth:`attach`."""
        raise NotImplementedError

    def _no_route(self, x: Tensor) -> Tensor:
        """Output of the frozen layer, recording that no sequence took the memory."""
        self.last_choice = torch.full(x.shape[:1], -1, dtype=torch.long, device=x.device)
        return self.main(x)


def edit_only_losses(edit_loss: Tensor, correct: Tensor) -> dict[str, Tensor]:
    """:meth:`EditableLayer.losses` of a memory that trains the edit alone: no routing loss,
    and zero in/out-of-scope scores (it routes by other means)."""
    zero = edit_loss.new_zeros(()).detach()
    return {"loss": edit_loss, "edit_loss": edit_loss, "routing_loss": zero, "in_scope": zero, "out_scope": zero,
            "target_correct": correct}


def lr_tagged(optimizer: torch.optim.Optimizer, lr: float) -> torch.optim.Optimizer:
    """``optimizer`` with the ``base_lr`` / ``configured_lr`` tags that
    :meth:`EditableLayer.configure_optimizer` promises (``lr``: the memory's option)."""
    optimizer.param_groups[0].update(base_lr=lr, configured_lr=lr)
    return optimizer


def init_params(cls: type) -> list[str]:
    """The names of ``cls.__init__``'s arguments (the options of a memory or component)."""
    return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]


def held_args(obj: Any) -> dict[str, Any]:
    """The ``__init__`` arguments of ``obj`` (a memory or component) as stored on it, by name;
    parts such as a memory's router stay objects (what building it again takes)."""
    return {name: getattr(obj, name) for name in init_params(type(obj))}


def init_args(obj: Any) -> dict[str, Any]:
    """:func:`held_args` for a config: a part of the package inside them (a memory's router) as
    its own ``class_path``/``init_args``."""
    return {k: class_config(v) if type(v).__module__.startswith("repair_pl.") else v for k, v in held_args(obj).items()}


def class_config(obj: Any) -> dict[str, Any]:
    """``{"class_path", "init_args"}`` of ``obj``: the values it really runs with."""
    cls = type(obj)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": init_args(obj)}
