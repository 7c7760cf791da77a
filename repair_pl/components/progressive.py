"""Progressive adaptive intervention: lighter updates as an edit converges, early stop."""

from __future__ import annotations

from repair_pl.components.base import EditStreamCallback


class ProgressiveIntervention(EditStreamCallback):
    """Intervention strength ``s`` starts at 1 and, once the edit loss is below ``threshold``,
    decays by ``decay_factor`` per step, never below ``min_intervention``. ``s`` scales the
    update size (the learning rate of the memory): edits that converge fast get lighter
    intervention, hard edits keep full strength.

    With ``early_stop`` the fit stops once the edit has converged: every target token of the
    bare prompt is predicted correctly, the routing loss is at most ``routing_tolerance``, and
    either the edit loss is below ``stop_loss`` (default ``threshold``) or, with
    ``plateau_window`` (ours), the loss has not improved by more than ``plateau_tol`` (relative)
    on its best over the last ``plateau_window`` steps: an edit whose target is reached but whose
    prefixed copies settle above ``stop_loss`` would otherwise run its whole budget.
    """

    def __init__(self, decay_factor: float = 0.95, threshold: float = 0.01, min_intervention: float = 0.1,
                 early_stop: bool = True, stop_loss: float | None = None, routing_tolerance: float = float("inf"),
                 plateau_window: int | None = None, plateau_tol: float = 0.05):
        if not 0 < decay_factor <= 1 or not 0 < min_intervention <= 1:
            raise ValueError("ProgressiveIntervention.decay_factor and min_intervention must be in (0, 1]")
        if plateau_window is not None and plateau_window < 1:
            raise ValueError(f"ProgressiveIntervention.plateau_window must be a positive number of steps or null, "
                             f"got {plateau_window}")
        self.decay_factor, self.threshold, self.min_intervention = decay_factor, threshold, min_intervention
        self.early_stop, self.stop_loss, self.routing_tolerance = early_stop, stop_loss, routing_tolerance
        self.plateau_window, self.plateau_tol = plateau_window, plateau_tol

    def bind(self, module) -> None:
        self.strength = 1.0
        self.history: list[float] = []  # strength per step of the current edit
        self.losses: list[float] = []  # edit loss per step of the current edit

    def on_edit_start(self, module, record) -> None:
        self.strength, self.history, self.losses = 1.0, [], []
        module.intervention = 1.0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        last = module.step_stats
        self.losses.append(last["edit_loss"])
        if last["edit_loss"] < self.threshold:
            self.strength = max(self.min_intervention, self.strength * self.decay_factor)
        self.history.append(self.strength)
        module.intervention = self.strength
        module.apply_lr(trainer)
        if self.early_stop and self.converged(last):
            trainer.should_stop = True

    def converged(self, last: dict) -> bool:
        if last["target_correct"] != 1.0 or last["routing_loss"] > self.routing_tolerance:
            return False
        stop_loss = self.threshold if self.stop_loss is None else self.stop_loss
        return last["edit_loss"] < stop_loss or self.plateaued()

    def plateaued(self) -> bool:
        """No step of the last ``plateau_window`` beat the best loss before them by ``plateau_tol``."""
        n = self.plateau_window
        if n is None or len(self.losses) <= n:
            return False
        return min(self.losses[-n:]) > (1 - self.plateau_tol) * min(self.losses[:-n])
