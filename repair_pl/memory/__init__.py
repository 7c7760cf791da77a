"""The layers that replace the edited MLP down projection and hold the edits.

- :class:`SideMemory`: WISE's side memory with its router (WISE and REPAIR);
- :class:`FineTunedLayer`: constrained fine-tuning of the layer (FT-L, FT-M);
- :class:`GraceCodebook`: GRACE's key-value codebook;
- :class:`PromptRouter`: a side memory's retrieval routing by prompt similarity.

Each is an :class:`EditableLayer`: built from its options, attached to the frozen layer by
:class:`~repair_pl.module.RepairModule`, and owning its losses, optimiser, state and reset.
"""

from repair_pl.memory.base import EditableLayer, class_config, init_args
from repair_pl.memory.finetune import FineTunedLayer
from repair_pl.memory.grace import GraceCodebook
from repair_pl.memory.router import PromptRouter
from repair_pl.memory.side import SCORE_TOKENS, SideMemory

__all__ = ["EditableLayer", "FineTunedLayer", "GraceCodebook", "PromptRouter", "SCORE_TOKENS", "SideMemory",
           "class_config", "init_args"]
