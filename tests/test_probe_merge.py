"""tools/probe_merge.py: a batch's shards kept from one edit pass and merged again."""

from pathlib import Path

import pytest
import torch

from repair_pl.data import EditRecord
from repair_pl.module import RepairModule
from repair_pl.presets import preset
from repair_pl.testing import char_tokenizer, load_script, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "probe_merge.py"
TINY = dict(n_prefixes=1, layer=2, lr=10.0, max_steps=4, undo_unreached=False, alpha=1.0, beta=5.0, gamma=3.0,
            mask_ratio=0.5, norm_constraint=None, eval_batch_size=4, cluster_size=2, error_feedback=False)
RECORDS = [EditRecord(f"question {i}?", t, rephrases=(f"q {i}?",), locality=((f"other {i}", "abc"),),
                      routing_prompt=f"unrelated {i}") for i, t in enumerate(["xyz", "qwe", "rty", "uio"])]


@pytest.mark.parametrize("stack", [False, True])
def test_the_kept_shards_merge_back_to_the_runs_memory(stack):
    probe = load_script(SCRIPT)
    torch.manual_seed(0)
    module = RepairModule(tiny_llama(), char_tokenizer(), **preset("repair", stack_shards=stack, **TINY))
    state = probe.edit_batch(module, RECORDS)
    assert len(state["shards"]) == 2 and sorted(i for group in state["plan"] for i in group) == [0, 1, 2, 3]
    merged, threshold = module.memory.merged.clone(), module.memory.min_in_scope
    assert not torch.equal(merged, state["merged"])  # the run merged its edits in
    module.memory.merged = torch.zeros_like(merged)  # the probe must rebuild it from the kept state alone
    probe.merged_variant(module, state, RECORDS, weights=None, margin=module.components.recalibration_margin)
    assert torch.allclose(module.memory.merged, merged) and module.memory.min_in_scope == pytest.approx(threshold)
    assert module.memory.stack_shards is stack
