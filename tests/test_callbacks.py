"""REPAIR's callbacks driven by scripted loss sequences, and on the tiny model."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from repair_pl.clustering import cluster_labels, plan_shards
from repair_pl.components import ClosedLoopFeedback, InBatchDistillation, ProgressiveIntervention, recalibrate_routing
from repair_pl.data import EditRecord
from repair_pl.memory import EditableLayer
from repair_pl.module import RepairModule
from repair_pl.presets import preset
from repair_pl.testing import char_tokenizer, tiny_llama


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add noise


class FakeMemory(EditableLayer):
    """A memory whose trained tensor is three numbers."""

    def __init__(self):
        super().__init__()
        self.weights = torch.nn.Parameter(torch.zeros(3))
        self.edit_start = self.weights.detach().clone()

    @property
    def trainable(self):
        return self.weights


class FakeModule:
    """The parts of RepairModule the callbacks use, with scripted step statistics."""

    def __init__(self):
        self.memory = FakeMemory()
        self.intervention, self.edit_failed, self.step_stats = 1.0, None, {}

    apply_lr = RepairModule.apply_lr
    fail_edit = RepairModule.fail_edit


def fake_trainer(lr=1.0):
    group = {"lr": lr, "base_lr": lr, "configured_lr": lr}
    return SimpleNamespace(optimizers=[SimpleNamespace(param_groups=[group])], should_stop=False)


def bound(cb, module):
    cb.bind(module)
    return cb


def step(cb, trainer, module, loss, edit_loss=None, correct=0.0, routing=0.0, weights=None):
    if weights is not None:
        with torch.no_grad():
            module.memory.trainable.copy_(torch.tensor(weights))
    module.step_stats = {"loss": loss, "edit_loss": loss if edit_loss is None else edit_loss,
                         "target_correct": correct, "routing_loss": routing}
    if hasattr(cb, "on_train_batch_start"):  # ``weights`` are those this loss was computed on
        cb.on_train_batch_start(trainer, module, None, 0)
    cb.on_train_batch_end(trainer, module, None, None, 0)


def test_progressive_decays_below_threshold_with_a_floor():
    cb, module, trainer = ProgressiveIntervention(decay_factor=0.5, threshold=0.01, min_intervention=0.1,
                                                  early_stop=False), FakeModule(), fake_trainer()
    cb.on_edit_start(module, None)
    for loss in [0.5, 0.2, 0.005, 0.005, 0.005, 0.005, 0.005]:
        step(cb, trainer, module, loss)
    assert cb.history == [1.0, 1.0, 0.5, 0.25, 0.125, 0.1, 0.1]
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1)
    cb.on_edit_start(module, None)  # a new edit starts at full strength again
    assert cb.strength == 1.0 and module.intervention == 1.0


def test_progressive_early_stop_needs_correct_target_and_low_loss():
    cb, module, trainer = ProgressiveIntervention(threshold=0.01), FakeModule(), fake_trainer()
    cb.on_edit_start(module, None)
    step(cb, trainer, module, 0.005, correct=0.0)
    assert not trainer.should_stop
    step(cb, trainer, module, 0.05, correct=1.0)
    assert not trainer.should_stop
    step(cb, trainer, module, 0.005, correct=1.0)
    assert trainer.should_stop


def test_progressive_early_stop_waits_for_routing_when_asked():
    cb, module, trainer = ProgressiveIntervention(threshold=0.01, routing_tolerance=0.5), FakeModule(), fake_trainer()
    cb.on_edit_start(module, None)
    step(cb, trainer, module, 0.005, correct=1.0, routing=2.0)
    assert not trainer.should_stop
    step(cb, trainer, module, 0.005, correct=1.0, routing=0.1)
    assert trainer.should_stop


def test_stagnation_raises_lr_within_bounds():
    module, trainer = FakeModule(), fake_trainer()
    cb = bound(ClosedLoopFeedback(stagnation_window=3, lr_up=2.0, max_lr_factor=4.0), module)
    cb.on_edit_start(module, None)
    for _ in range(20):
        step(cb, trainer, module, 1.0)
    group = trainer.optimizers[0].param_groups[0]
    assert cb.counts["stagnations"] >= 2
    assert group["base_lr"] == 4.0 and group["lr"] == 4.0  # capped at max_lr_factor x lr


def test_improving_loss_is_not_stagnation():
    module, trainer = FakeModule(), fake_trainer()
    cb = bound(ClosedLoopFeedback(stagnation_window=3), module)
    cb.on_edit_start(module, None)
    for i in range(20):
        step(cb, trainer, module, 1.0 * 0.8 ** i)
    assert cb.counts["stagnations"] == 0 and trainer.optimizers[0].param_groups[0]["lr"] == 1.0


def test_flat_loss_after_the_target_is_reached_is_not_stagnation():
    module, trainer = FakeModule(), fake_trainer()
    cb = bound(ClosedLoopFeedback(stagnation_window=3), module)
    cb.on_edit_start(module, None)
    for _ in range(20):
        step(cb, trainer, module, 0.01, correct=1.0)
    assert cb.counts["stagnations"] == 0 and trainer.optimizers[0].param_groups[0]["lr"] == 1.0


def test_jitter_below_the_starting_loss_is_not_divergence():
    module, trainer = FakeModule(), fake_trainer()
    cb = bound(ClosedLoopFeedback(divergence_factor=3.0), module)
    cb.on_edit_start(module, None)
    for loss in (5.0, 0.5, 0.01, 0.2, 0.05, 4.9):  # all > 3 x 0.01, but below where the edit started
        step(cb, trainer, module, loss)
    assert cb.counts["divergences"] == 0
    step(cb, trainer, module, 6.0)  # worse than before any update
    assert cb.counts["divergences"] == 1


@pytest.mark.parametrize("bad_loss", [10.0, math.nan, math.inf])
def test_divergence_rolls_back_to_the_best_weights_and_lowers_lr(bad_loss):
    module, trainer = FakeModule(), fake_trainer()
    cb = bound(ClosedLoopFeedback(divergence_factor=3.0, lr_down=0.5), module)
    cb.on_edit_start(module, None)
    step(cb, trainer, module, 2.0, weights=[1.0, 1.0, 1.0])
    step(cb, trainer, module, 1.0, weights=[2.0, 2.0, 2.0])  # best so far: the good checkpoint
    step(cb, trainer, module, 1.5, weights=[3.0, 3.0, 3.0])
    step(cb, trainer, module, bad_loss, weights=[9.0, 9.0, 9.0])
    assert torch.equal(module.memory.trainable.detach(), torch.tensor([2.0, 2.0, 2.0]))
    assert cb.counts["divergences"] == 1 and cb.counts["rollbacks"] == 1
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.5
    assert not trainer.should_stop and module.edit_failed is None  # training goes on


def test_non_finite_gradient_never_reaches_the_weights():
    module = FakeModule()
    cb = bound(ClosedLoopFeedback(), module)
    cb.on_edit_start(module, None)
    module.memory.trainable.grad = torch.tensor([1.0, math.nan, 0.0])
    cb.on_before_optimizer_step(None, module, None)
    assert torch.equal(module.memory.trainable.grad, torch.zeros(3)) and cb.grad_bad


def test_repeated_divergence_fails_the_edit_bit_identically():
    module, trainer = FakeModule(), fake_trainer()
    cb = bound(ClosedLoopFeedback(max_rollbacks=2), module)
    module.memory.edit_start = torch.tensor([0.1, 0.2, 0.3])
    cb.on_edit_start(module, None)
    step(cb, trainer, module, 1.0, weights=[5.0, 5.0, 5.0])
    for _ in range(3):
        step(cb, trainer, module, math.nan, weights=[7.0, 7.0, 7.0])
    assert trainer.should_stop and module.edit_failed
    assert torch.equal(module.memory.trainable.detach(), torch.tensor([0.1, 0.2, 0.3]))


def test_unconverged_edit_is_undone_at_the_end():
    module, trainer = FakeModule(), fake_trainer()
    cb = bound(ClosedLoopFeedback(), module)
    module.memory.edit_start = torch.tensor([0.1, 0.2, 0.3])
    cb.on_edit_start(module, None)
    step(cb, trainer, module, 1.0, weights=[5.0, 5.0, 5.0], correct=0.0)
    cb.on_train_end(trainer, module)
    assert module.edit_failed and cb.counts["failed_edits"] == 1
    assert torch.equal(module.memory.trainable.detach(), torch.tensor([0.1, 0.2, 0.3]))


def test_clustering_groups_obviously_similar_edits():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)) * 5
    points = np.concatenate([c + rng.normal(scale=0.1, size=(4, 16)) for c in centres])
    for method in ("kmeans", "agglomerative"):
        labels = cluster_labels(torch.tensor(points, dtype=torch.float32), 3, method)
        assert [len(set(labels[i * 4:(i + 1) * 4])) for i in range(3)] == [1, 1, 1]
        assert len(set(labels)) == 3


def test_plan_shards_homogeneous_and_heterogeneous():
    records = list("aabbbcc")
    labels = np.array([0, 0, 1, 1, 1, 2, 2])
    assert plan_shards(records, labels) == [["a", "a"], ["b", "b", "b"], ["c", "c"]]
    mixed = plan_shards(records, labels, heterogeneous=True)
    assert [len(g) for g in mixed] == [2, 3, 2] and sorted(sum(mixed, [])) == sorted(records)
    assert all(len(set(g)) > 1 for g in mixed)  # every shard mixes clusters


def test_plan_shards_cuts_large_clusters_into_even_shards():
    records = [f"a{i}" for i in range(7)] + ["b0", "b1"]
    labels = np.array([0] * 7 + [1] * 2)
    assert plan_shards(records, labels, max_size=3) == [["a0", "a1"], ["a2", "a3"], ["a4", "a5", "a6"], ["b0", "b1"]]
    assert plan_shards(records, labels, max_size=7) == plan_shards(records, labels)


def test_distribution_aware_memory_plans_no_shard_above_max_shard_size():
    module = RepairModule(tiny_llama(), char_tokenizer(),
                          **preset("repair", max_steps=2, cluster_size=5, max_shard_size=2, n_replay=1, train_ahead=True))
    dist = module.components.distribution_aware
    order = dist.on_edit_batch_start(module, [A, B, C, D, E])  # one cluster of five
    assert [len(shard) for shard in dist.plan] == [1, 2, 2] and sum(dist.plan, []) == order
    assert [p for p, _ in module.memory.planned] == [r.prompt for r in dist.plan[0]]  # trained ahead: its own shard
    with pytest.raises(ValueError, match="max_shard_size"):
        preset("repair", max_shard_size=0)


A = EditRecord("capital of fr?", "xyz", routing_prompt="unrelated text here")
B = EditRecord("ceo of msft?", "qwe", routing_prompt="some other thing")
C = EditRecord("capital of de?", "xyw", routing_prompt="a third thing")
D = EditRecord("ceo of ibm?", "rty", routing_prompt="words of a fourth kind")
E = EditRecord("capital of it?", "uio", routing_prompt="and a fifth text")
TINY = dict(n_prefixes=2, layer=2, lr=10.0, max_steps=40, alpha=1.0, beta=5.0, gamma=3.0, mask_ratio=0.5,
            norm_constraint=None)


def repair(*off: str, **options) -> RepairModule:
    """REPAIR on the tiny model with the named components switched off."""
    return RepairModule(tiny_llama(), char_tokenizer(), **preset("repair", **{**TINY, **{c: False for c in off},
                                                                              **options}))


def test_nan_during_an_edit_is_rolled_back_and_the_stream_continues(monkeypatch):
    module = repair("progressive", "distribution_aware", "error_feedback", score_tokens="mean")  # closed loop only
    original = RepairModule.edit_losses
    calls = {"n": 0}

    def flaky(self, batch, lower=None):
        out = original(self, batch, lower)
        calls["n"] += 1
        if calls["n"] == 3:  # one poisoned step
            out["loss"] = out["loss"] * math.nan
        return out

    monkeypatch.setattr(RepairModule, "edit_losses", flaky)
    results = [result for _, result in module.edit_stream([A, B], progress=False)]
    assert len(results) == 2
    assert torch.isfinite(module.memory.trainable).all()
    assert module.intervention_counts()["divergences"] >= 1


def test_a_failed_edit_leaves_the_model_bit_identical():
    module = repair("progressive", "distribution_aware", "error_feedback", score_tokens="mean", max_steps=1)
    module.edit(A)  # one step cannot reach the target: undone
    before = module.memory.trainable.detach().clone()
    result = module.edit(B)
    assert not result.success
    assert torch.equal(module.memory.trainable.detach(), before)


def test_repair_early_stops_and_runs_all_components():
    # threshold 1.0: A's target CE falls below it within ~30 steps at TINY's lr (it is ~0.73 at step 60,
    # so 0.5 would need the stagnation lr boost that no longer fires once the target is predicted).
    # Mean scores, as TINY's routing margins were tuned with: on this random model, last-token scores
    # (REPAIR's default) leave A at CE 1.43 after 60 steps, where mean scores reach 0.97 by step 18.
    module = repair(cluster_size=2, threshold=1.0, score_tokens="mean", max_steps=60)
    names = [type(cb).__name__ for cb in module.edit_callbacks]
    assert names == ["ClosedLoopFeedback", "ProgressiveIntervention", "DistributionAwareMemory", "ErrorFeedback"]
    outputs = list(module.edit_stream([A, B, C], progress=False))
    first_pass = [r for _, r in outputs if not r.retry]
    assert len(first_pass) == 3
    assert min(r.steps for r in first_pass) < 60  # converged edits stop early
    assert module.memory.shards == []  # merged at the end of the batch


def routed(module: RepairModule, prompt: str) -> bool:
    ids = module.tokenizer([prompt], return_tensors="pt")
    with torch.no_grad():
        module(ids.input_ids, ids.attention_mask)
    return int(module.memory.last_choice[0]) == 0


def test_merge_recalibrates_the_routing_threshold_on_the_merged_memory():
    module = repair("progressive", "closed_loop", "error_feedback", cluster_size=1)
    list(module.edit_stream([A, B], progress=False))  # one shard per edit, TIES-merged after the batch
    assert module.memory.shards == []
    merged_scores = [module.in_scope_score(r) for r in (A, B)]
    assert module.memory.epsilon == pytest.approx(0.91 * min(merged_scores))  # recalibration_margin
    assert routed(module, A.prompt) and routed(module, B.prompt)  # both edits route
    module.routing_floor = 0.5 * module.memory.min_in_scope  # a lower threshold from before the batch is kept
    floor = module.routing_floor
    recalibrate_routing(module, [A, B], 0.91)
    assert module.memory.min_in_scope == pytest.approx(floor)


def test_an_undone_round_restores_kept_memories_without_copying_them(monkeypatch):
    from repair_pl.components import ErrorFeedback, error_feedback

    module = repair("progressive", "closed_loop", "error_feedback", cluster_size=1, retrieve=True)
    memory = module.memory
    list(module.edit_stream([A], progress=False))  # batch 1: a memory kept apart
    results = [r for _, r in module.edit_stream([B, C], progress=False)]
    assert len(memory.memories) == 2
    before, scales = {k: v.clone() for k, v in module.edited_state()[0].items()}, list(memory.memory_scales)
    snapshot, _ = module.snapshot_edits()
    assert all(snapshot[f"memory.{i}"].data_ptr() == m.data_ptr() for i, m in enumerate(memory.memories))
    assert snapshot["side"].data_ptr() != memory.side.data_ptr()  # what edits write in place is copied
    # scripted re-check: B fails; after the round both fail, so the round is undone
    script = iter([[False, True], [False, False]])
    monkeypatch.setattr(error_feedback, "rewrite_correct", lambda module, records: next(script))
    feedback = bound(ErrorFeedback(max_retries=1), module)
    feedback.on_edit_batch_end(module, [B, C], results)
    assert feedback.counts["reintegrated"] == 1 and feedback.counts["undone_rounds"] == 1
    after = module.edited_state()[0]
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert memory.memory_scales == scales and len(memory.memories) == 2


def test_with_retrieve_a_merge_rescales_only_its_own_memory():
    module = repair("progressive", "closed_loop", "error_feedback", cluster_size=1, retrieve=True)
    memory = module.memory
    list(module.edit_stream([A], progress=False))  # batch 1: A's merged memory kept apart
    list(module.edit_stream([B], progress=False))  # batch 2: B's
    assert len(memory.memories) == 2
    first_scale = memory.memory_scales[0]
    side = memory.side.detach().clone()
    with memory.holding(memory.memories[1]):
        b_score = module.in_scope_score(B)
    assert torch.equal(memory.side.detach(), side)  # holding() puts W' back
    assert memory.memory_scales[1] == pytest.approx(0.91 * b_score / memory.act_ratio)
    assert memory.memory_scales[0] == first_scale  # the earlier memory keeps its scale
    for record in (A, B):  # each edit clears its own memory's ratio test, so it is routed to a memory
        ids = module.tokenizer([record.prompt], return_tensors="pt")
        with torch.no_grad():
            module(ids.input_ids, ids.attention_mask)
        assert int(memory.last_choice[0]) >= 0


def test_wise_has_no_components_and_one_flag_switches_one_off():
    assert RepairModule(tiny_llama(), char_tokenizer(), **preset("wise", **TINY)).edit_callbacks == []
    ablated = repair("progressive")
    assert "ProgressiveIntervention" not in [type(cb).__name__ for cb in ablated.edit_callbacks]


def _drift_of_first_edit(distillation: bool) -> tuple[float, dict]:
    """KL of the shard's first edit's answer logits, after the shard's second edit, from right after the first."""
    from repair_pl.losses import distillation_loss

    torch.manual_seed(0)
    kwargs = preset("repair", progressive=False, closed_loop=False, error_feedback=False, cluster_size=2, **TINY)
    kwargs["components"].distillation = InBatchDistillation(weight=5.0) if distillation else None
    module = RepairModule(tiny_llama(), char_tokenizer(), **kwargs)
    module.edit_callbacks[0].n_clusters = 1  # A and C in one shard, A first
    stream = module.edit_stream([A, C], progress=False)
    next(stream)  # A edited
    _, _, teacher = module.answer_logits(A)
    next(stream)  # C edited (with or without distillation towards A's output); the shard is stored
    with torch.no_grad():
        module.memory.trainable.copy_(module.memory.shards[-1])
    _, _, after = module.answer_logits(A)
    list(stream)
    return float(distillation_loss(after, teacher)), module.intervention_counts()


def test_in_batch_distillation_keeps_the_first_edit_of_a_shard():
    drift_with, counts = _drift_of_first_edit(True)
    drift_without, counts_off = _drift_of_first_edit(False)
    assert counts["distilled_edits"] == 1 and "distilled_edits" not in counts_off
    assert drift_with < 0.5 * drift_without


def test_distillation_loss_is_zero_for_equal_logits_and_positive_otherwise():
    from repair_pl.losses import distillation_loss

    logits = torch.randn(4, 10)
    assert float(distillation_loss(logits, logits)) == pytest.approx(0.0, abs=1e-6)
    assert float(distillation_loss(logits, logits + torch.randn(4, 10))) > 0


@pytest.mark.parametrize("fixed_after_round", [True, False])
def test_error_feedback_keeps_a_round_only_if_it_fixes_more_edits(monkeypatch, fixed_after_round):
    from repair_pl.components import ErrorFeedback, error_feedback

    module = repair("progressive", "closed_loop", "error_feedback", cluster_size=1)
    results = [r for _, r in module.edit_stream([A, B], progress=False)]
    before = {k: v.clone() for k, v in module.edited_state()[0].items()}
    threshold = module.memory.min_in_scope
    # scripted re-check: A fails, B passes; after the round either both pass or neither does
    script = iter([[False, True], [fixed_after_round, fixed_after_round]])
    monkeypatch.setattr(error_feedback, "rewrite_correct", lambda module, records: next(script))
    feedback = bound(ErrorFeedback(max_retries=1), module)
    feedback.on_edit_batch_end(module, [A, B], results)
    assert feedback.counts["reintegrated"] == 1  # A was re-edited
    after = module.edited_state()[0]
    if fixed_after_round:
        assert feedback.counts["undone_rounds"] == 0 and feedback.counts["still_failing"] == 0
        assert not torch.equal(after["side"], before["side"])
    else:  # the round made things worse: the memory is exactly as before it
        assert feedback.counts["undone_rounds"] == 1 and feedback.counts["still_failing"] == 1
        assert all(torch.equal(after[k], before[k]) for k in before)
        assert module.memory.min_in_scope == threshold


def test_progressive_early_stop_on_a_plateau_once_the_target_is_reached():
    cb, module, trainer = ProgressiveIntervention(threshold=0.01, plateau_window=3, plateau_tol=0.05), \
        FakeModule(), fake_trainer()
    cb.on_edit_start(module, None)
    for loss in [1.0, 0.5, 0.5, 0.5]:  # flat, but the target is not predicted yet: keep going
        step(cb, trainer, module, loss, correct=0.0)
    assert not trainer.should_stop
    for loss in [0.3, 0.2, 0.19]:  # reached, still improving by more than 5% on the best before
        step(cb, trainer, module, loss, correct=1.0)
        assert not trainer.should_stop
    for loss in [0.2, 0.195]:
        step(cb, trainer, module, loss, correct=1.0)
        assert not trainer.should_stop
    step(cb, trainer, module, 0.21, correct=1.0)  # three steps without beating 0.19 by 5%
    assert trainer.should_stop
    off = ProgressiveIntervention(threshold=0.01)
    off.on_edit_start(module, None)
    for loss in [0.2] * 10:
        step(off, trainer := fake_trainer(), module, loss, correct=1.0)
    assert not trainer.should_stop  # without plateau_window only stop_loss stops an edit
