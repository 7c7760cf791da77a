"""repair_pl: lifelong model editing of Llama-family LLMs with PyTorch Lightning.

The public API: :class:`RepairModule` (the editor) with its parts (:mod:`repair_pl.memory`,
:mod:`repair_pl.components`, :func:`preset`), the data (:class:`EditRecord`,
:class:`EditDataModule`), :func:`run_lifelong` (the lifelong protocol) and EREN's notebook
editor (:class:`ErenEditor`).
"""

from repair_pl.components import (ClosedLoopFeedback, DistributionAwareMemory, ErrorFeedback, InBatchDistillation,
                                  ProgressiveIntervention, RepairComponents)
from repair_pl.data import EditDataError, EditDataModule, EditRecord, load_records
from repair_pl.eren import ErenEditor, Notebook
from repair_pl.lifelong import run_lifelong
from repair_pl.memory import EditableLayer, FineTunedLayer, GraceCodebook, PromptRouter, SideMemory
from repair_pl.models import load_model
from repair_pl.module import EditResult, RepairModule
from repair_pl.presets import METHODS, preset

__all__ = ["ClosedLoopFeedback", "DistributionAwareMemory", "EditDataError", "EditDataModule", "EditRecord",
           "EditResult", "EditableLayer", "ErenEditor", "ErrorFeedback", "FineTunedLayer", "GraceCodebook",
           "InBatchDistillation", "METHODS", "Notebook", "ProgressiveIntervention", "PromptRouter", "RepairComponents", "RepairModule",
           "SideMemory", "load_model", "load_records", "preset", "run_lifelong"]
__version__ = "0.2.0"
