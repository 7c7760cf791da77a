"""Closed-loop feedback: react to stagnation and divergence while an edit trains."""

from __future__ import annotations

import math

import torch

from repair_pl.components.base import EditStreamCallback


class ClosedLoopFeedback(EditStreamCallback):
    """Watch the loss and gradient norm every step of an edit. "The loss" below is the
    target cross-entropy (``edit_loss``); a NaN/inf in the total loss counts as divergence too.

    - Stagnation: while the target is not yet predicted, the loss improved by less than
      ``stagnation_tol`` (relative) over the last ``stagnation_window`` steps -> the learning rate is
      multiplied by ``lr_up`` (at most ``max_lr_factor`` times the configured one). A loss that
      flattens once the target is reached is convergence, not stagnation.
    - Divergence: the loss is NaN/inf, the gradient is non-finite, or the loss exceeds both
      ``divergence_factor`` x its best value of this edit and the loss the edit started from
      (the normal jitter of SGD with WISE's lr, e.g. 0.01 -> 0.5, is not divergence; a loss
      worse than before any update is) -> the memory rolls back to the
      last good in-memory checkpoint of this edit (the weights at the best loss), the learning
      rate is multiplied by ``lr_down``, and training goes on. A non-finite gradient is zeroed
      before the optimiser can apply it.
    - Failure: after more than ``max_rollbacks`` rollbacks, or when the budget ends without the
      target predicted correctly, the whole edit is undone (the memory is bit-identical to
      before it) and reported as failed (the latter only with ``undo_unreached``; turn it off
      for long-form targets that are never fully predicted).

    ``counts`` holds the interventions of the whole run (stagnations, rollbacks, failed edits).
    """

    def __init__(self, stagnation_window: int = 5, stagnation_tol: float = 0.01, lr_up: float = 1.5,
                 max_lr_factor: float = 4.0, divergence_factor: float = 3.0, lr_down: float = 0.5,
                 max_rollbacks: int = 3, undo_unreached: bool = True):
        if not isinstance(stagnation_window, int) or stagnation_window < 1:
            raise ValueError(f"ClosedLoopFeedback.stagnation_window must be a positive integer, got {stagnation_window!r}")
        self.stagnation_window, self.stagnation_tol, self.lr_up = stagnation_window, stagnation_tol, lr_up
        self.max_lr_factor, self.divergence_factor, self.lr_down = max_lr_factor, divergence_factor, lr_down
        self.max_rollbacks, self.undo_unreached = max_rollbacks, undo_unreached

    def bind(self, module) -> None:
        self.counts = {"stagnations": 0, "divergences": 0, "rollbacks": 0, "failed_edits": 0}
        self._reset()

    def _reset(self) -> None:
        self.losses: list[float] = []
        self.best, self.good, self.rollbacks, self.grad_finite, self.last_stagnation = math.inf, None, 0, None, 0

    def on_edit_start(self, module, record) -> None:
        self._reset()

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        # The loss of this step is computed on these weights; by on_train_batch_end the optimiser
        # has already moved them, so a checkpoint taken there would hold the next step's weights.
        self.step_weights = module.memory.trainable.detach().clone()

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        grad = module.memory.trainable.grad
        if grad is None:
            self.grad_finite = None
            return
        # Kept on the device (read with the step's stats), so the step does not wait on the GPU.
        self.grad_finite = torch.isfinite(grad.norm())
        grad.masked_fill_(~self.grad_finite, 0.0)  # never let a NaN/inf gradient reach the weights

    @property
    def grad_bad(self) -> bool:
        """Whether this step's gradient norm was NaN/inf (its gradient was zeroed)."""
        return self.grad_finite is not None and not bool(self.grad_finite)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        # The target cross-entropy is what must converge; WISE's routing hinge on top of it jumps
        # by tens from step to step under SGD with lr 1 and would read as divergence.
        loss = module.step_stats["edit_loss"]
        diverged = self.grad_bad or not math.isfinite(module.step_stats["loss"]) or not math.isfinite(loss) or (
            self.good is not None and loss > self.divergence_factor * self.best and loss > self.losses[0])
        if diverged:
            self.counts["divergences"] += 1
            self._rollback(trainer, module)
            return
        self.losses.append(loss)
        if loss < self.best:
            self.best, self.good = loss, self.step_weights
        n = len(self.losses)
        reached = module.step_stats.get("target_correct") == 1.0
        window = self.stagnation_window
        if not reached and n > window and n - self.last_stagnation >= window:
            old = self.losses[-window - 1]
            if old > 0 and (old - loss) / old < self.stagnation_tol:
                self.counts["stagnations"] += 1
                self.last_stagnation = n
                self._scale_lr(trainer, module, self.lr_up)

    def _rollback(self, trainer, module) -> None:
        self.rollbacks += 1
        self.counts["rollbacks"] += 1
        if self.rollbacks > self.max_rollbacks:
            module.fail_edit("diverged repeatedly")
            trainer.should_stop = True
            return
        with torch.no_grad():
            module.memory.trainable.copy_(self.good if self.good is not None else module.memory.edit_start)
        self._scale_lr(trainer, module, self.lr_down)

    def _scale_lr(self, trainer, module, factor: float) -> None:
        for group in trainer.optimizers[0].param_groups:
            limit = group["configured_lr"] * self.max_lr_factor
            group["base_lr"] = min(group["base_lr"] * factor, limit)
        module.apply_lr(trainer)

    def on_train_end(self, trainer, module) -> None:
        if module.edit_failed is None and self.undo_unreached and module.step_stats.get("target_correct") != 1.0:
            module.fail_edit("target not reached within the step budget")
        if module.edit_failed is not None:
            self.counts["failed_edits"] += 1
