"""REPAIR's components, each a Callback that can be switched off."""

from repair_pl.callbacks.base import EditStreamCallback
from repair_pl.callbacks.closed_loop import ClosedLoopFeedback
from repair_pl.callbacks.distillation import InBatchDistillation
from repair_pl.callbacks.memory import DistributionAwareMemory, ErrorFeedback, MemoryMerging
from repair_pl.callbacks.progressive import ProgressiveIntervention

__all__ = ["ClosedLoopFeedback", "DistributionAwareMemory", "EditStreamCallback", "ErrorFeedback",
           "InBatchDistillation", "MemoryMerging", "ProgressiveIntervention"]
