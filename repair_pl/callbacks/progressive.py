"""Progressive adaptive intervention: lighter updates as an edit converges, early stop."""

from __future__ import annotations

from repair_pl.callbacks.base import EditStreamCallback


class ProgressiveIntervention(EditStreamCallback):
    """Intervention strength ``s`` starts at 1 and, once the edit loss is below ``threshold``,
    decays by ``decay_factor`` per step, never below ``min_intervention``. ``s`` scales the
    update size (the learning rate of the side memory): edits that converge fast get lighter
    intervention, hard edits keep full strength.

    With ``early_stop`` the fit stops once the edit has converged: every target token of the
    bare prompt is predicted correctly, the edit loss is below ``stop_loss`` (default
    ``threshold``) and the routing loss is at most ``routing_tolerance``.
    """

    def __init__(self, decay_factor: float = 0.95, threshold: float = 0.01, min_intervention: float = 0.1,
                 early_stop: bool = True, stop_loss: float | None = None, routing_tolerance: float = float("inf")):
        if not 0 < decay_factor <= 1 or not 0 < min_intervention <= 1:
            raise ValueError("decay_factor and min_intervention must be in (0, 1]")
        self.decay_factor, self.threshold, self.min_intervention = decay_factor, threshold, min_intervention
        self.early_stop, self.routing_tolerance = early_stop, routing_tolerance
        self.stop_loss = threshold if stop_loss is None else stop_loss
        self.strength = 1.0
        self.history: list[float] = []  # strength per step of the current edit

    def on_edit_start(self, module, record) -> None:
        self.strength, self.history = 1.0, []
        module.intervention = 1.0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        last = module.step_stats
        if last["edit_loss"] < self.threshold:
            self.strength = max(self.min_intervention, self.strength * self.decay_factor)
        self.history.append(self.strength)
        module.intervention = self.strength
        module.apply_lr(trainer)
        if self.early_stop and self.converged(last):
            trainer.should_stop = True

    def converged(self, last: dict) -> bool:
        return (last["target_correct"] == 1.0 and last["edit_loss"] < self.stop_loss
                and last["routing_loss"] <= self.routing_tolerance)
