"""RepairModule on the tiny random Llama: editing, routing, shards, merging, saving."""

import pytest
import torch

from repair_pl.data import EditRecord
from repair_pl.evaluate import encode_pairs
from repair_pl.merge import ties_merge
from repair_pl.module import RepairModule
from repair_pl.presets import preset
from repair_pl.testing import char_tokenizer, tiny_llama

A = EditRecord("capital of fr?", "xyz", rephrases=("fr capital?",), locality=(("who is bob", "abc"),),
               routing_prompt="unrelated text here")
B = EditRecord("ceo of msft?", "qwe", locality=(("what is 2+2", "four"),), routing_prompt="some other thing")
# Margins scaled to the tiny model's activation norms (SmolLM2's are ~10x larger).
TINY = dict(n_prefixes=2, layer=2, lr=10.0, max_steps=40, alpha=1.0, beta=5.0, gamma=3.0, mask_ratio=0.5,
            norm_constraint=None)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add noise


def make(method: str = "wise", **kwargs) -> RepairModule:
    return RepairModule(tiny_llama(), char_tokenizer(), **preset(method, **{**TINY, **kwargs}))


def target_loss(module: RepairModule, record: EditRecord, edited: bool = True) -> float:
    batch = encode_pairs(module.tokenizer, [record.prompt], [record.target])
    module.memory.mode = "edit" if edited else "off"  # "edit": side output regardless of routing
    with torch.no_grad():
        logits = module(batch.input_ids, batch.attention_mask, batch.prompt_mask)
    module.memory.mode = "route"
    labels = batch.input_ids[:, 1:].masked_fill(~batch.answer_mask[:, 1:], -100)
    return float(torch.nn.functional.cross_entropy(logits[0, :-1], labels[0], ignore_index=-100))


def route_choice(module: RepairModule, prompt: str) -> int:
    ids = module.tokenizer([prompt], return_tensors="pt")
    with torch.no_grad():
        module(ids.input_ids, ids.attention_mask)
    return int(module.memory.last_choice[0])


def test_every_edit_trains_its_full_budget():
    module = make(max_steps=5)
    first = module.edit(A)
    side_after_a = module.memory.side.detach().clone()
    second = module.edit(B)  # a reused Trainer would run 0 steps here (Lightning issue 11425)
    assert first.steps == 5 and second.steps == 5
    assert not torch.equal(side_after_a, module.memory.side)


def test_edit_lowers_target_loss_and_main_weight_is_untouched():
    module = make()
    main_before = module.memory.main.weight.clone()
    before = target_loss(module, A, edited=False)
    module.edit(A)
    assert target_loss(module, A) < 0.5 * before
    assert torch.equal(module.memory.main.weight, main_before)
    assert target_loss(module, A, edited=False) == pytest.approx(before)  # "unedited" is one flag away


def test_edits_accumulate():
    module = make()
    before = target_loss(module, A)
    module.edit(A)
    module.edit(B)
    assert target_loss(module, A) < 0.5 * before  # the second edit did not erase the first
    only_b = make()
    only_b.edit(B)
    assert not torch.equal(only_b.memory.side, module.memory.side)  # no silent restart per edit


def test_routing_side_for_edited_prompt_main_for_unrelated():
    module = make()
    assert route_choice(module, A.prompt) == -1  # no edit yet: main memory
    module.edit(A)
    assert route_choice(module, A.prompt) == 0
    assert route_choice(module, A.routing_prompt) == -1
    assert module.memory.epsilon == pytest.approx(module.memory.act_ratio * module.memory.min_in_scope)


def test_generate_decides_routing_once_from_the_prompt():
    module = make()
    module.edit(A)
    generated = module.generate([A.prompt], max_new_tokens=6)[0]
    # Reference: greedy decoding without a KV cache, routing on the prompt tokens only.
    ids = module.tokenizer([A.prompt], return_tensors="pt").input_ids
    n_prompt = ids.shape[1]
    with torch.no_grad():
        for _ in range(6):
            route = torch.zeros_like(ids, dtype=torch.bool)
            route[:, :n_prompt] = True
            logits = module(ids, torch.ones_like(ids), route)
            ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    expected = module.tokenizer.decode(ids[0, n_prompt:], skip_special_tokens=True)
    assert generated == expected
    assert module.memory.sticky is None  # the per-sequence decision does not leak out of generate()


def test_shards_saved_and_merged_at_their_frequencies():
    module = make(max_steps=2, save_freq=2, merge_freq=4)
    main = module.memory.main.weight.detach().float()
    masks = [module.memory.mask.clone()]
    module.edit(A)
    assert len(module.memory.shards) == 0
    module.edit(B)
    assert len(module.memory.shards) == 1
    assert torch.equal(module.memory.side.detach(), module.memory.merged)  # restarted from the memory
    masks.append(module.memory.mask.clone())
    assert not torch.equal(masks[0], masks[1])  # a new shard gets a new mask
    module.edit(A)
    module.edit(B)
    assert len(module.memory.shards) == 0
    assert not torch.equal(module.memory.merged, main)
    assert torch.equal(module.memory.side.detach(), module.memory.merged)


def test_merge_is_ties_of_the_shards():
    module = make(max_steps=2, save_freq=1, merge_freq=2, density=0.53)
    module.edit(A)
    module.edit(B)  # merge happens at the end of this edit; capture the shards just before
    module2 = make(max_steps=2, save_freq=1, merge_freq=None, density=0.53)
    module2.edit(A)
    module2.edit(B)
    base = module2.memory.main.weight.detach().float()
    expected = ties_merge(base, module2.memory.shards, density=0.53)
    assert torch.allclose(module.memory.merged, expected)


def test_unmerged_shards_stay_visible_to_routing():
    module = make(save_freq=1)
    module.edit(A)
    assert len(module.memory.shards) == 1 and torch.equal(module.memory.side.detach(), module.memory.merged)
    assert route_choice(module, A.prompt) == 0  # A lives in a stored shard only


def test_retrieve_mode_keeps_memories_apart():
    module = make(max_steps=20, save_freq=1, merge_freq=1, retrieve=True)
    module.edit(A)
    module.edit(B)
    assert len(module.memory.memories) == 2
    assert route_choice(module, A.prompt) == 0 and route_choice(module, B.prompt) == 1


def test_save_load_round_trip_is_exact(tmp_path):
    module = make(max_steps=10, save_freq=1)
    module.edit(A)
    module.edit(B)
    module.save_edits(tmp_path / "edits")
    fresh = make(max_steps=10, save_freq=1)
    fresh.load_edits(tmp_path / "edits")
    batch = encode_pairs(module.tokenizer, [A.prompt, B.prompt, "who is bob"], ["xyz", "qwe", "abc"])
    with torch.no_grad():
        a = module(batch.input_ids, batch.attention_mask, batch.prompt_mask)
        b = fresh(batch.input_ids, batch.attention_mask, batch.prompt_mask)
    assert torch.equal(a, b)
    assert fresh.edit_count == 2 and fresh.memory.epsilon == module.memory.epsilon
    assert torch.equal(fresh.memory.mask, module.memory.mask)


def test_save_load_round_trip_keeps_the_disjoint_mask_plan(tmp_path):
    module = make(max_steps=2, save_freq=1)
    module.memory.disjoint = True  # as REPAIR's distribution-aware memory sets it
    module.memory.plan_shards(4)
    module.edit(A)
    module.save_edits(tmp_path / "edits")
    fresh = make(max_steps=2, save_freq=1)
    fresh.memory.disjoint = True
    fresh.load_edits(tmp_path / "edits")
    assert fresh.memory.shard_ratio == module.memory.shard_ratio == 0.25
    assert torch.equal(fresh.memory.used, module.memory.used) and fresh.memory.used.any()
    fresh.memory.new_mask(), module.memory.new_mask()  # the next shard avoids the same entries
    assert torch.equal(fresh.memory.mask, module.memory.mask)
    assert not (fresh.memory.mask & fresh.memory.shards[0].ne(fresh.memory.merged)).any()


def test_repair_uses_disjoint_masks_and_wise_does_not():
    assert make(method="repair").memory.disjoint and not make(method="wise").memory.disjoint
    assert not make(method="repair", distribution_aware=False).memory.disjoint


def test_loading_edits_into_another_model_fails_clearly(tmp_path):
    module = make(max_steps=2)
    module.edit(A)
    module.save_edits(tmp_path / "edits")
    other = RepairModule(tiny_llama(layers=6), char_tokenizer(), **preset("wise", **TINY))
    with pytest.raises(ValueError, match="6 layers"):
        other.load_edits(tmp_path / "edits")
    wider = RepairModule(tiny_llama(hidden=64), char_tokenizer(), **preset("wise", **TINY))
    with pytest.raises(ValueError, match="down projection"):
        wider.load_edits(tmp_path / "edits")
    with pytest.raises(FileNotFoundError, match="no saved edits"):
        module.load_edits(tmp_path / "nothing")
    last = make(score_tokens="last")  # thresholds on another scale: refused, naming the option
    with pytest.raises(ValueError, match="score_tokens"):
        last.load_edits(tmp_path / "edits")


def test_score_tokens_of_each_preset():
    assert make(method="wise").memory.score_tokens == "mean"  # WISE as published
    assert make(method="repair").memory.score_tokens == "last"
    assert make(method="repair", score_tokens="mean").memory.score_tokens == "mean"
    with pytest.raises(ValueError, match="SideMemory.score_tokens"):
        make(score_tokens="max")


def test_prompt_weight_splits_the_target_loss_between_bare_and_prefixed_prompts():
    batch = make().prepare_edit(A)

    def edit_loss(module: RepairModule) -> float:
        module.memory.mode = "edit"  # as inside an edit: side output, scores recorded
        with torch.no_grad():
            return float(module.edit_losses(batch)["edit_loss"])

    token_mean, half = edit_loss(make()), edit_loss(make(prompt_weight=0.5))
    bare_only = make(prompt_weight=1.0)
    bare, prefixed = edit_loss(bare_only), edit_loss(make(prompt_weight=0.0))
    assert bare == pytest.approx(target_loss(bare_only, A), rel=1e-4)  # the bare prompt's own CE
    assert half == pytest.approx(0.5 * bare + 0.5 * prefixed, rel=1e-5)
    assert token_mean != pytest.approx(half)  # None is the plain mean over all answer tokens
    with pytest.raises(ValueError, match="SideMemory.prompt_weight"):
        make(prompt_weight=1.5)


def test_unwrap_model_puts_the_frozen_layer_back_for_another_module():
    module = make()
    main = module.memory.main
    module.unwrap_model()
    layer = module.model.model.layers[module.layer].mlp
    assert layer.down_proj is main
    again = RepairModule(module.model, module.tokenizer, **preset("wise", **TINY))  # wraps the plain layer
    assert again.memory.main is main


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="model.layer"):
        make(layer=7)
    with pytest.raises(ValueError, match="model.method"):
        make(method="rome")


def test_method_none_does_not_edit():
    module = RepairModule(tiny_llama(), char_tokenizer(), method="none", layer=2)
    before = [p.clone() for p in module.model.parameters()]
    result = module.edit(A)
    assert module.memory is None and result.steps == 0 and not result.success
    assert all(torch.equal(a, b) for a, b in zip(before, module.model.parameters()))


def test_reset_edits_restores_the_unedited_model():
    module = make(max_steps=5, save_freq=1)
    module.edit(A)
    module.reset_edits()
    assert module.memory.min_in_scope is None and module.memory.shards == [] and module.edit_count == 0
    assert torch.equal(module.memory.side.detach(), module.memory.main.weight.float())


def test_in_scope_scores_batched_and_from_the_edit_batch_match_one_by_one():
    module = make()
    module.edit(A)  # the threshold is recorded from the edit batch's cached inputs
    assert module.memory.min_in_scope == pytest.approx(module.in_scope_score(A), rel=1e-5)
    module.edit(B)
    one_by_one = [module.in_scope_score(r) for r in (A, B)]
    assert module.in_scope_scores([A, B]) == pytest.approx(one_by_one, rel=1e-5)
    batch = module.prepare_edit(B)  # the bare prompt is its first row, padded among the prefixed ones
    assert module.trained_score(batch) == pytest.approx(one_by_one[1], rel=1e-5)


def _stream_with_one_reedit(monkeypatch, cache_mb: float):
    """A and B in one REPAIR batch; error feedback's scripted re-check fails A once, so A is re-edited."""
    from repair_pl.components import error_feedback

    module = make(method="repair", progressive=False, closed_loop=False, cluster_size=1, max_retries=1)
    module.lower_cache_mb = cache_mb
    script = iter([[False, True], [True, True]])
    monkeypatch.setattr(error_feedback, "rewrite_correct", lambda module, records: next(script))
    calls = []
    original = module.lower_states
    monkeypatch.setattr(module, "lower_states", lambda batch: calls.append(1) or original(batch))
    results = [r for _, r in module.edit_stream([A, B], progress=False)]
    assert [r.retry for r in results] == [False, False, True]
    return module, len(calls)


def test_reedits_reuse_the_edited_layers_inputs_with_the_same_result(monkeypatch):
    cached, cached_calls = _stream_with_one_reedit(monkeypatch, 512.0)
    fresh, fresh_calls = _stream_with_one_reedit(monkeypatch, 0.0)  # nothing fits: every fit computes them
    assert fresh_calls == cached_calls + 1  # the re-edit of A skipped the frozen layers below
    assert torch.equal(cached.memory.side, fresh.memory.side)
    assert cached._lower_cache is None  # dropped with the batch: nothing kept across batches


def test_streams_without_error_feedback_keep_no_lower_states():
    module = make(method="wise")
    stream = module.edit_stream([A, B], progress=False)
    next(stream)
    assert module._lower_cache is None  # no re-edits to serve: a long WISE chunk keeps nothing
    list(stream)


def test_out_of_scope_rows_stop_at_the_edited_layer_without_changing_the_step():
    module = make(n_negatives=3)
    for record in (A, B, A):
        module.prepare_edit(record)  # fill the negatives: 1 edit row + 2 prefixed, then 4 out of scope
    batch = module.prepare_edit(B)
    n_edit = len(batch["edit_rows"])
    assert batch["input_ids"].shape[0] == n_edit + 4
    calls = []
    above = module.model.model.layers[module.layer + 1]
    above.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[0]))
    module.memory.mode, module.memory.side.grad = "edit", None  # as during an edit
    losses = module.edit_losses(batch)
    losses["loss"].backward()
    cut_grad = module.memory.side.grad.clone()
    assert calls == [n_edit]  # the layers above saw only the edit rows

    # reference: every row through every layer, the same loss and gradient
    original = module.upper_forward
    module.upper_forward = lambda lower, positions, rows=None: original(lower, positions)
    module.memory.side.grad = None
    full = module.edit_losses(batch)
    full["loss"].backward()
    assert calls[1:] == [n_edit + 4]
    for key in ("loss", "edit_loss", "routing_loss", "out_scope"):
        torch.testing.assert_close(losses[key], full[key])
    torch.testing.assert_close(cut_grad, module.memory.side.grad)


def test_generate_leaves_the_tokenizer_and_the_memory_mode_as_it_found_them():
    module = make()
    module.edit(A)
    module.tokenizer.padding_side, module.memory.mode = "left", "off"
    module.generate([A.prompt, "who is bob"], max_new_tokens=2)
    assert module.tokenizer.padding_side == "left" and module.memory.mode == "off"
    module.tokenizer.padding_side = "right"
    module.generate([A.prompt], max_new_tokens=2)
    assert module.tokenizer.padding_side == "right"


def test_writing_prefixes_restores_the_rng_and_the_mode_even_when_generation_fails(monkeypatch):
    module = make()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    module.prepare_edit(A)  # writes the context prefixes with seeded sampling
    assert torch.equal(torch.get_rng_state(), state)
    fresh = make()

    def broken(*args, **kwargs):
        raise RuntimeError("generation failed")

    monkeypatch.setattr(fresh.model, "generate", broken)
    with pytest.raises(RuntimeError, match="generation failed"):
        fresh.prepare_edit(A)
    assert fresh.memory.mode == "route" and fresh.memory.prefixes is None


def test_a_reedit_does_not_add_its_routing_prompt_to_the_negatives_again():
    module = make(n_negatives=3, max_steps=2)
    module.edit(A)
    module.reedit(A)
    module.reedit(A)
    assert len(module.memory.negatives) == 1
    module.edit(B)
    assert len(module.memory.negatives) == 2


def test_a_record_without_routing_prompt_gets_text_the_frozen_model_wrote():
    record = EditRecord("capital of fr?", "xyz", locality=(("who is bob", "abc"),))
    module, other = make(), make()
    batch = module.prepare_edit(record)
    row = batch["other_rows"][0]
    out_row = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
    text, pool = module.memory.generated_routing_text(record, module), module.memory.routing_pool
    assert len(pool) == 32 and text in pool and out_row == module.tokenizer([text]).input_ids[0]
    assert "who is bob" not in text and record.prompt not in text
    other.prepare_edit(record)
    assert other.memory.routing_pool == pool  # seeded: the same texts in every module of this seed


def test_replay_trains_earlier_edits_of_the_shard_beside_the_new_one():
    module = make(n_replay=1, max_steps=3, save_freq=2)
    module.edit(A)
    batch = module.prepare_edit(B)
    plain = make(max_steps=3).prepare_edit(B)
    # B's own rows, then A's bare prompt + target, then the out-of-scope rows
    n_own_rows = 1 + module.memory.n_prefixes
    assert int(batch["is_edit"].sum()) == n_own_rows + 1
    assert module.tokenizer.decode(batch["input_ids"][n_own_rows][batch["attention_mask"][n_own_rows].bool()]) \
        == module.tokenizer.decode(encode_pairs(module.tokenizer, [A.prompt], [A.target]).input_ids[0])
    assert batch["n_own"] == len(plain["labels"]) < len(batch["labels"])
    module.memory.mode = "edit"
    with torch.no_grad():
        with_replay = float(module.edit_losses(batch)["edit_loss"])
        own = float(module.edit_losses(plain)["edit_loss"])
    module.memory.mode = "route"
    # the edit's own loss plus the replayed edit's mean cross-entropy through the same memory
    assert with_replay == pytest.approx(own + target_loss(module, A), rel=1e-4)
    module.edit(B)  # the second edit of the shard: it is stored, the next shard replays nothing
    assert module.memory.shards and module.memory.shard_edits == []
    assert int(module.prepare_edit(A)["is_edit"].sum()) == n_own_rows


def test_replay_keeps_only_the_most_recent_edits_and_survives_a_resume(tmp_path):
    C = EditRecord("sky color?", "red", routing_prompt="nothing at all")
    module = make(n_replay=1, max_steps=2)
    for record in (A, B, C):
        module.edit(record)
    assert [p for p, _ in module.memory.shard_edits] == [B.prompt, C.prompt]
    module.reedit(B)  # a re-edit moves B to the end instead of adding it twice
    assert [p for p, _ in module.memory.shard_edits] == [C.prompt, B.prompt]
    batch = module.prepare_edit(B)
    assert int(batch["is_edit"].sum()) == 1 + module.memory.n_prefixes + 1  # C, never B itself
    module.save_edits(tmp_path / "edits")
    fresh = make(n_replay=1, max_steps=2)
    fresh.load_edits(tmp_path / "edits")
    assert fresh.memory.shard_edits == module.memory.shard_edits
    with pytest.raises(ValueError, match="SideMemory.n_replay"):
        make(n_replay=-1)


C = EditRecord("sky color?", "red", routing_prompt="nothing at all")
D = EditRecord("best pet?", "cat", routing_prompt="plain words")


def planned_module(**kwargs) -> RepairModule:
    """REPAIR whose shards' edits are each trained beside the shard's other planned edits."""
    return make("repair", **{"n_replay": 3, "cluster_size": 2, "train_ahead": True, "error_feedback": False, **kwargs})


def test_train_ahead_trains_the_shards_planned_edits_from_its_first_fit():
    # the tiny model's losses settle around 1-3: stop once the target is predicted below 3
    module = planned_module(cluster_size=4, routing_weight=0.0, stop_loss=3.0)
    dist = module.components.distribution_aware
    order = dist.on_edit_batch_start(module, [A, B, C, D])
    (first, *rest), = dist.plan  # one shard of four
    assert order[0] is first
    batch = module.prepare_edit(first)
    n_own_rows = 1 + module.memory.n_prefixes
    # the first edit of the shard is trained beside the three to come: they are not made yet
    assert int(batch["is_edit"].sum()) == n_own_rows + 3 and batch["replay_weight"] == 3.0
    rows = [module.tokenizer.decode(batch["input_ids"][i][batch["attention_mask"][i].bool()])
            for i in range(n_own_rows, n_own_rows + 3)]
    assert rows == [module.tokenizer.decode(encode_pairs(module.tokenizer, [r.prompt], [r.target]).input_ids[0])
                    for r in rest]
    planned, module.memory.planned = module.memory.planned, []
    plain = module.prepare_edit(first)  # without the plan: the edit's own rows only
    module.memory.planned = planned
    module.memory.mode = "edit"
    with torch.no_grad():
        out, own = module.edit_losses(batch), float(module.edit_losses(plain)["edit_loss"])
    module.memory.mode = "route"
    replayed = float(out["edit_loss"]) - own  # early stop and divergence read the mean planned edit ...
    assert replayed > 0
    assert float(out["loss"]) == pytest.approx(own + 3 * replayed, rel=1e-4)  # ... the gradient weighs each as the edit
    results = list(module.edit_stream([A, B, C, D], progress=False))
    assert all(r.success and r.target_reached for _, r in results)
    # the shard's first fit learnt the others: their own fits only confirm them
    steps = [r.steps for _, r in results]
    assert max(steps[1:]) < steps[0]
    assert module.memory.planned == []


def test_a_planned_edit_that_fails_is_undone_alone_and_dropped_from_its_shards_plan():
    hard = EditRecord("zzz?", "a long target the tiny model cannot reach in one step", routing_prompt="other words")
    module = planned_module(routing_weight=0.0, stop_loss=3.0)
    first, second = A, hard
    module.memory.plan_replay([first, second], module.tokenizer)
    assert int(module.prepare_edit(first)["is_edit"].sum()) == 1 + module.memory.n_prefixes + 1  # trained ahead
    assert module.edit(first).success
    before = module.memory.side.detach().clone()
    module.hparams.max_steps = 1
    result = module.edit(second)
    assert not result.success  # reported as failed ...
    assert torch.equal(module.memory.side, before)  # ... and undone alone: the first edit's change stays
    assert second.prompt not in [p for p, _ in module.memory.planned + module.memory.shard_edits]
    assert int(module.prepare_edit(first)["is_edit"].sum()) == 1 + module.memory.n_prefixes  # nothing left to replay


def test_train_ahead_needs_replay():
    with pytest.raises(ValueError, match="train_ahead.*n_replay"):
        make("repair", cluster_size=2, train_ahead=True)
