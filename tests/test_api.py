"""The package's face: every public name resolves, the editors of every method included."""

import repair_pl


def test_every_public_name_resolves():
    missing = [name for name in repair_pl.__all__ if not hasattr(repair_pl, name)]
    assert missing == []
    assert {"RepairModule", "SideMemory", "FineTunedLayer", "GraceCodebook", "PromptRouter", "RepairComponents",
            "ErenEditor", "preset", "run_lifelong"} <= set(repair_pl.__all__)
    assert set(repair_pl.METHODS) >= {"wise", "repair", "ft_l", "ft_m", "grace"}
