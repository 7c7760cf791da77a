"""tools/probe_routing.py: one edit pass scored at several routing thresholds."""

from pathlib import Path

import pytest

from repair_pl.data import EditRecord
from repair_pl.evaluate import evaluate_records
from repair_pl.module import RepairModule
from repair_pl.presets import preset
from repair_pl.testing import char_tokenizer, load_script, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "probe_routing.py"
TINY = dict(n_prefixes=2, layer=2, lr=10.0, max_steps=30, alpha=1.0, beta=5.0, gamma=3.0, mask_ratio=0.5,
            norm_constraint=None, eval_batch_size=4)
RECORDS = [EditRecord("capital of fr?", "xyz", rephrases=("fr capital?",), locality=(("who is bob", "abc"),),
                      routing_prompt="unrelated text here"),
           EditRecord("ceo of msft?", "qwe", rephrases=("msft ceo?",), locality=(("what is 2+2", "four"),),
                      routing_prompt="some other thing")]


def test_probe_scores_one_memory_at_every_threshold():
    probe = load_script(SCRIPT).probe
    module = RepairModule(tiny_llama(), char_tokenizer(), **preset("wise", **TINY))
    pre = evaluate_records(module.logits_fn(edited=False), module.tokenizer, RECORDS)
    out = probe(module, RECORDS, T=2, act_ratios=[0.0, 1e6], reference=pre.locality_preds)
    assert out["n"] == 2 and out["steps_per_edit"] == 30
    everything, nothing = out["by_act_ratio"][0.0], out["by_act_ratio"][1e6]
    assert nothing["locality"] == 1.0 and nothing["rewrite_acc"] == pytest.approx(pre.means["rewrite_acc"])
    assert everything["rewrite_acc"] > nothing["rewrite_acc"]  # the edits live in the side memory


def test_saved_state_is_scored_at_each_threshold_without_editing(tmp_path):
    script = load_script(SCRIPT)
    module = RepairModule(tiny_llama(), char_tokenizer(), **preset("wise", **TINY))
    pre = evaluate_records(module.logits_fn(edited=False), module.tokenizer, RECORDS)
    for record in RECORDS:
        module.edit(record)
    module.save_edits(tmp_path / "edits")
    edited = evaluate_records(module.logits_fn(), module.tokenizer, RECORDS, reference=pre.locality_preds)
    fresh = RepairModule(tiny_llama(), char_tokenizer(), **preset("wise", **TINY))
    fresh.load_edits(tmp_path / "edits")
    out = script.score_thresholds(fresh, RECORDS, [module.memory.act_ratio, 1e6], pre.locality_preds)
    assert out[module.memory.act_ratio] == pytest.approx({k: edited.means[k] for k in script.METRICS})
    assert out[1e6]["locality"] == 1.0 and out[1e6]["rewrite_acc"] == pytest.approx(pre.means["rewrite_acc"])


def test_rescore_rereads_the_saved_memory_and_rethresholds(tmp_path):
    script = load_script(SCRIPT)
    module = RepairModule(tiny_llama(), char_tokenizer(), **preset("wise", **TINY))  # wise: mean scores
    for record in RECORDS:
        module.edit(record)
    mean_scores = module.in_scope_scores(RECORDS)
    margin = 0.91
    out = script.rescore(module, RECORDS, "last", margin)
    last_scores = module.in_scope_scores(RECORDS)
    assert module.memory.score_tokens == "last" and last_scores != pytest.approx(mean_scores)
    assert out["edit_min"] == pytest.approx(min(last_scores))
    assert out["edit_median"] == pytest.approx(sorted(last_scores)[len(last_scores) // 2])
    assert out["epsilon"] == pytest.approx(margin * min(last_scores))
    # the unrelated prompts are the records' locality prompts, scored through the same memory
    unrelated = module.in_scope_scores([EditRecord(*r.locality[0]) for r in RECORDS])
    assert out["unrelated_max"] == pytest.approx(max(unrelated))
    assert out["unrelated_above_weakest_edit"] == sum(u > min(last_scores) for u in unrelated)
    assert out["edits_below_strongest_unrelated"] == sum(e < max(unrelated) for e in last_scores)
    # one unrelated prompt scores above the weakest edit, one below: the count is neither none nor all
    assert 0 < out["unrelated_above_weakest_edit"] < len(RECORDS)


def test_retrieved_memories_follow_the_routing_choice():
    script = load_script(SCRIPT)
    module = RepairModule(tiny_llama(), char_tokenizer(), **preset("wise", **TINY, retrieve=True, save_freq=1, merge_freq=1,
                          merge_method="linear"))
    for record in RECORDS:
        module.edit(record)
    memory = module.memory
    assert len(memory.memories) == 2
    threshold = memory.act_ratio
    chosen = script.retrieved_memories(module, RECORDS)
    assert all(c in (0, 1) for c in chosen) and memory.act_ratio == threshold  # the threshold is restored
    memory.memories.reverse()  # the same memories in the other order: every choice flips
    memory.memory_scales.reverse()
    memory.invalidate()
    assert script.retrieved_memories(module, RECORDS) == [1 - c for c in chosen]
