"""Baselines at the same layer as the side memory: FT-L and GRACE (``method: ft_l`` / ``grace``).

Each replaces the MLP down projection of the edited layer, as :class:`~repair_pl.side_memory.SideMemory`
does, with the same interface (``mode`` "off"/"edit"/"route", ``routing()``, ``last_scores``,
``last_choice``, ``invalidate()``), so evaluation, generation and the lifelong protocol work unchanged.
"""

from repair_pl.baselines.ft import FineTunedLayer
from repair_pl.baselines.grace import GraceCodebook

BASELINES = ("ft_l", "grace")

__all__ = ["BASELINES", "FineTunedLayer", "GraceCodebook"]
