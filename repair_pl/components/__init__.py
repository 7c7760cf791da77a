"""REPAIR's components: named parts that each switch off with one flag (``null``).

``RepairComponents`` is what ``RepairModule(components=...)`` takes; a component left ``None`` is
off. ``method: repair`` (:func:`repair_pl.presets.default_components`) turns the four on with
their defaults; in a config each is listed, and ``null`` is its ablation::

    components:
      progressive: {stop_loss: 0.1}       # ProgressiveIntervention's options
      closed_loop: {max_lr_factor: 2.0}   # ClosedLoopFeedback's
      distribution_aware: {cluster_size: 20}
      error_feedback: {}                  # on, with its defaults; null: "w/o error feedback"

Each component is a Lightning ``Callback`` of the per-edit fits and an
:class:`~repair_pl.components.base.EditStreamCallback` between edits.
"""

from __future__ import annotations

from dataclasses import dataclass

from repair_pl.components.base import EditStreamCallback, recalibrate_routing
from repair_pl.components.closed_loop import ClosedLoopFeedback
from repair_pl.components.distillation import InBatchDistillation
from repair_pl.components.distribution_aware import DistributionAwareMemory
from repair_pl.components.error_feedback import ErrorFeedback, rewrite_correct
from repair_pl.components.progressive import ProgressiveIntervention

NEEDS_SIDE_MEMORY = ("distribution_aware", "error_feedback", "distillation")
"""Components that work on shards and routing, so only with a ``SideMemory``."""


@dataclass
class RepairComponents:
    """REPAIR's parts (``None``: off) and the options of the edit stream they share.

    Args:
        progressive: progressive adaptive intervention (decay, early stop).
        closed_loop: stagnation and divergence feedback with rollback.
        distribution_aware: clustered shards, merged after each batch.
        error_feedback: re-check a merged batch and re-edit what was lost.
        distillation: in-batch distillation (off in REPAIR's preset).
        edit_batch_size: records edited per batch (clustered inside, merged and re-checked
            between batches); ``None``: the whole lifelong chunk.
        recalibration_margin: after a merge, the routing threshold is this fraction of the
            weakest score among the batch's edits.
    """

    progressive: ProgressiveIntervention | None = None
    closed_loop: ClosedLoopFeedback | None = None
    distribution_aware: DistributionAwareMemory | None = None
    error_feedback: ErrorFeedback | None = None
    distillation: InBatchDistillation | None = None
    edit_batch_size: int | None = None
    recalibration_margin: float = 0.91

    def __post_init__(self):
        if self.edit_batch_size is not None and (not isinstance(self.edit_batch_size, int) or self.edit_batch_size < 1):
            raise ValueError(f"components.edit_batch_size must be a positive integer or null, got {self.edit_batch_size!r}")
        if not 0 < self.recalibration_margin <= 1:
            raise ValueError(f"components.recalibration_margin must be in (0, 1], got {self.recalibration_margin!r}")

    @classmethod
    def all_on(cls, **options) -> RepairComponents:
        """REPAIR as the package runs it: the four components on with their defaults."""
        return cls(progressive=ProgressiveIntervention(), closed_loop=ClosedLoopFeedback(),
                   distribution_aware=DistributionAwareMemory(), error_feedback=ErrorFeedback(), **options)

    def callbacks(self) -> list[EditStreamCallback]:
        """The components that are on, in the order their hooks must run: closed loop before
        progressive (which applies the step's final lr), merging before distillation's reset
        and error feedback's re-check."""
        order = (self.closed_loop, self.progressive, self.distribution_aware, self.distillation, self.error_feedback)
        return [c for c in order if c is not None]

    def config(self) -> dict:
        """The values really used: each component's options (``None`` when off)."""
        from repair_pl.memory.base import init_args

        out = {}
        for name in ("progressive", "closed_loop", "distribution_aware", "error_feedback", "distillation"):
            part = getattr(self, name)
            out[name] = None if part is None else init_args(part)
        return {**out, "edit_batch_size": self.edit_batch_size, "recalibration_margin": self.recalibration_margin}


__all__ = ["ClosedLoopFeedback", "DistributionAwareMemory", "EditStreamCallback", "ErrorFeedback",
           "InBatchDistillation", "NEEDS_SIDE_MEMORY", "ProgressiveIntervention", "RepairComponents",
           "recalibrate_routing", "rewrite_correct"]
