"""FT-L, FT-M and GRACE baselines (``method: ft_l`` / ``ft_m`` / ``grace``) on the tiny random Llama."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from repair_pl.components import RepairComponents
from repair_pl.data import EditRecord
from repair_pl.evaluate import encode_pairs
from repair_pl.memory import GraceCodebook, SideMemory
from repair_pl.module import RepairModule
from repair_pl.presets import preset
from repair_pl.testing import attached, char_tokenizer, tiny_llama

ROOT = Path(__file__).resolve().parents[1]
# One-character answers: a single GRACE value at layer 2 of the tiny model can (nearly) fit them.
A = EditRecord("capital of fr?", "x", rephrases=("fr capital?",), locality=(("who is bob", "abc"),))
B = EditRecord("ceo of msft?", "q", locality=(("what is 2+2", "four"),))
UNRELATED = ["who is bob", "what is 2+2", "hello there friend"]
# Scaled to the tiny model (its gradients and activations are small).
TINY = {"ft_l": dict(lr=0.05, norm_constraint=0.5, stop_loss=None), "ft_m": dict(lr=0.05, norm_constraint=0.5,
        stop_loss=None), "grace": dict(lr=30.0, stop_loss=None), "wise": {}}
MAX_STEPS = 30


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add noise


def make(method: str, **kwargs) -> RepairModule:
    return RepairModule(tiny_llama(), char_tokenizer(), **preset(method, layer=2, max_steps=MAX_STEPS,
                                                                 **{**TINY[method], **kwargs}))


def logits(module: RepairModule, prompts: list[str], answers: list[str], edited: bool = True) -> torch.Tensor:
    batch = encode_pairs(module.tokenizer, prompts, answers)
    return module.logits_fn(edited)(batch.input_ids, batch.attention_mask, batch.prompt_mask)


def target_loss(module: RepairModule, record: EditRecord, edited: bool = True) -> float:
    batch = encode_pairs(module.tokenizer, [record.prompt], [record.target])
    with torch.no_grad():
        out = module.logits_fn(edited)(batch.input_ids, batch.attention_mask, batch.prompt_mask)
    labels = batch.input_ids[:, 1:].masked_fill(~batch.answer_mask[:, 1:], -100)
    return float(torch.nn.functional.cross_entropy(out[0, :-1], labels[0], ignore_index=-100))


def answer_correct(module: RepairModule, record: EditRecord) -> bool:
    batch = encode_pairs(module.tokenizer, [record.prompt], [record.target])
    with torch.no_grad():
        out = module.logits_fn(True)(batch.input_ids, batch.attention_mask, batch.prompt_mask)
    mask = batch.answer_mask[0, 1:]
    return bool((out[0, :-1].argmax(-1)[mask] == batch.input_ids[0, 1:][mask]).all())


# ---- FT-L, FT-M ------------------------------------------------------------------------------
def test_ft_m_changes_the_layer_within_its_bound_and_learns_the_target():
    module = make("ft_m")
    main_before = module.memory.main.weight.clone()
    before = target_loss(module, A)
    result = module.edit(A)
    assert result.steps == MAX_STEPS
    assert target_loss(module, A) < 0.5 * before
    change = (module.memory.weight.detach() - main_before).abs()
    assert change.max() > 0 and change.max() <= 0.5 + 1e-6  # the elementwise norm constraint
    assert torch.equal(module.memory.main.weight, main_before)
    assert target_loss(module, A, edited=False) == pytest.approx(before)
    # no router: the fine-tuned weight serves unrelated prompts too (what costs FT-L locality)
    assert not torch.equal(logits(module, UNRELATED, ["a"] * 3), logits(module, UNRELATED, ["a"] * 3, edited=False))


def test_ft_l_objective_reads_every_target_token_at_the_prompts_last_position():
    module = make("ft_l")
    record = EditRecord("capital of fr?", "xy")
    batch = module.prepare_edit(record)
    assert batch["input_ids"].shape[1] == len(record.prompt)  # the prompt alone is fed (one token a character)
    module.memory.mode = "edit"
    with torch.no_grad():
        loss = float(module.edit_losses(batch)["edit_loss"])
        ids = module.tokenizer([record.prompt], return_tensors="pt").input_ids
        log_probs = torch.log_softmax(module(ids)[0, -1], -1)
    targets = module.tokenizer([" xy"]).input_ids[0]  # " " + target, as the evaluation tokenises it
    assert loss == pytest.approx(float(-log_probs[targets].mean()), rel=1e-5)
    module.memory.mode = "route"
    assert module.edit(record).edit_loss < loss


def test_ft_box_is_around_the_edit_start_or_the_unedited_weight():
    for clamp_to, bound in (("edit_start", 1.0), ("unedited", 0.5)):
        module = make("ft_m", clamp_to=clamp_to)
        main = module.memory.main.weight.float()
        module.edit(A)
        module.edit(B)  # a second edit may move each entry another 0.5 only when the box follows the edit
        change = float((module.memory.weight.detach() - main).abs().max())
        assert 0.5 < change <= bound + 1e-6 if clamp_to == "edit_start" else change <= bound + 1e-6


def test_ft_l_edits_accumulate_and_reset_restores_the_weight():
    module = make("ft_l")
    module.edit(A)
    after_a = module.memory.weight.detach().clone()
    module.edit(B)
    assert not torch.equal(after_a, module.memory.weight)
    module.reset_edits()
    assert torch.equal(module.memory.weight.detach(), module.memory.main.weight.float())
    assert module.edit_count == 0


def test_ft_l_stops_early_once_the_loss_is_below_stop_loss():
    module = make("ft_l", stop_loss=100.0)  # any loss is below it: one step
    assert module.edit(A).steps == 1


# ---- GRACE -----------------------------------------------------------------------------------
def test_grace_adds_a_key_per_edit_and_answers_from_the_codebook():
    module = make("grace")
    before = [target_loss(module, r) for r in (A, B)]
    module.edit(A)
    module.edit(B)
    assert len(module.memory) == 2 and module.memory.labels == ["x", "q"]
    # one value vector per key can only do so much on the tiny random model: a large drop
    assert target_loss(module, A) < 0.5 * before[0] and target_loss(module, B) < 0.5 * before[1]
    logits(module, [A.prompt, B.prompt], ["x", "q"])
    assert module.memory.last_choice.tolist() == [0, 1]  # each prompt hit its own key


def test_grace_leaves_prompts_far_from_every_key_exactly_unchanged():
    module = make("grace")
    module.edit(A)
    module.edit(B)
    edited, unedited = logits(module, UNRELATED, ["abc"] * 3), logits(module, UNRELATED, ["abc"] * 3, edited=False)
    distances = module.memory.last_scores
    assert (distances > module.memory.epsilons.max()).all()  # the test's premise: far from every key
    assert module.memory.last_choice.tolist() == [-1, -1, -1]
    assert torch.equal(edited, unedited)  # bit for bit: locality 1.0


def test_grace_split_rule_shrinks_conflicting_balls_and_same_answer_expands():
    codebook = attached(GraceCodebook(eps=1.0), nn.Linear(4, 3, bias=False))
    zero = torch.zeros(3)
    assert codebook.add_edit(torch.tensor([0.0, 0, 0, 0]), "a", zero) == 0
    assert codebook.add_edit(torch.tensor([10.0, 0, 0, 0]), "b", zero) == 1  # far: a new ball of eps
    assert codebook.epsilons.tolist() == [1.0, 1.0]
    # another answer 1.5 from key 0: the balls would overlap, both shrink to half the distance
    assert codebook.add_edit(torch.tensor([0.0, 1.5, 0, 0]), "c", zero) == 2
    assert codebook.epsilons[0] < 0.75 and codebook.epsilons[2] == pytest.approx(0.75)
    assert codebook.epsilons[1] == 1.0
    choice, _ = codebook.lookup(torch.tensor([[0.0, 0.2, 0, 0], [0.0, 1.3, 0, 0], [0.0, 0.75, 0, 0]]))
    assert choice.tolist()[:2] == [0, 2] and choice[2] != 0  # the midpoint is no longer key 0's
    # the same answer near key 1: no new key, its ball grows to cover the new input
    assert codebook.add_edit(torch.tensor([11.5, 0, 0, 0]), "b", zero) == 1
    assert len(codebook) == 3 and codebook.epsilons[1] == pytest.approx(1.5)


def test_grace_split_through_the_module_on_a_conflicting_edit():
    module = make("grace", eps=50.0)  # every tiny-model key within reach: forces conflicts
    module.edit(A)
    module.edit(EditRecord(A.prompt + "!", "q"))
    assert len(module.memory) == 2
    distance = float((module.memory.keys[0] - module.memory.keys[1]).norm())
    assert (module.memory.epsilons <= distance / 2 + 1e-5).all()  # the two balls no longer overlap


def test_grace_generate_uses_the_codebook_with_the_kv_cache():
    module = make("grace")
    module.edit(A)
    generated = module.generate([A.prompt, "who is bob"], max_new_tokens=4)
    unedited = module.generate([A.prompt, "who is bob"], max_new_tokens=4, edited=False)
    assert generated[0] != unedited[0] and generated[1] == unedited[1]
    # greedy decoding without a cache, routed on the prompt alone, gives the same tokens
    ids = module.tokenizer([A.prompt], return_tensors="pt").input_ids
    n_prompt = ids.shape[1]
    for _ in range(4):
        route = torch.zeros_like(ids, dtype=torch.bool)
        route[:, :n_prompt] = True
        with torch.no_grad():
            out = module(ids, torch.ones_like(ids), route)
        ids = torch.cat([ids, out[:, -1:].argmax(-1)], dim=1)
        if ids[0, -1] == module.tokenizer.eos_token_id:
            break
    expected = module.tokenizer.decode(ids[0, n_prompt:], skip_special_tokens=True)
    assert generated[0] == expected and answer_correct(module, A)


def test_grace_reset_empties_the_codebook():
    module = make("grace")
    module.edit(A)
    module.reset_edits()
    assert len(module.memory) == 0 and module.edit_count == 0
    assert torch.equal(logits(module, [A.prompt], ["x"]), logits(module, [A.prompt], ["x"], edited=False))


# ---- both ------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["ft_l", "ft_m", "grace"])
def test_save_load_round_trip_is_exact(tmp_path, method):
    module = make(method)
    module.edit(A)
    module.edit(B)
    module.save_edits(tmp_path / "edits")
    fresh = make(method)
    fresh.load_edits(tmp_path / "edits")
    saved, _ = module.edited_state()
    loaded, meta = fresh.edited_state()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert meta["method"] == method and fresh.edit_count == 2
    prompts = [A.prompt, B.prompt, *UNRELATED]
    assert torch.equal(logits(module, prompts, ["x"] * 5), logits(fresh, prompts, ["x"] * 5))
    with pytest.raises(ValueError, match=f"made with method '{method}'"):
        make("wise").load_edits(tmp_path / "edits")


def test_empty_grace_codebook_saves_and_loads(tmp_path):
    module = make("grace")
    module.save_edits(tmp_path / "edits")
    fresh = make("grace")
    fresh.load_edits(tmp_path / "edits")
    assert len(fresh.memory) == 0


def test_parts_that_do_not_fit_the_method_are_a_clear_error():
    with pytest.raises(ValueError, match="model.components are REPAIR's; method 'grace'"):
        RepairModule(tiny_llama(), char_tokenizer(), method="grace", layer=2, components=RepairComponents.all_on())
    with pytest.raises(ValueError, match="method 'grace' edits with GraceCodebook, but model.memory is SideMemory"):
        RepairModule(tiny_llama(), char_tokenizer(), method="grace", layer=2, memory=SideMemory())
    with pytest.raises(ValueError, match=r"options \['retrieve'\] do not apply to method 'grace'"):
        preset("grace", retrieve=True)
    with pytest.raises(ValueError, match="method 'ft_l' trains objective 'prompt_last'"):
        RepairModule(tiny_llama(), char_tokenizer(), **{**preset("ft_m"), "method": "ft_l"})


@pytest.mark.parametrize("method", ["ft_l", "ft_m", "grace"])
def test_cli_runs_a_baseline_end_to_end(tmp_path, method):
    cmd = [sys.executable, str(ROOT / "scripts" / "edit.py"), "fit", "--config", "configs/demo.yaml",
           "--config", f"configs/methods/{method}.yaml",
           "--model.model", "tiny-random", "--model.layer", "2", "--model.max_steps", "3",
           "--trainer.enable_progress_bar", "false", "--data.ds_size", "4", "--T", "2",
           "--generation_examples", "0", "--trainer.default_root_dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["method"] == method and summary["n_edits"] == 4 and summary["steps_per_edit"] <= 3
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results) == 4 and all(case["edit"]["success"] for case in results)
    if method == "grace":  # the demo's locality prompts are far from its keys on this model
        assert summary["post"]["locality"] == 1.0
