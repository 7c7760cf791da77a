"""SideMemory routing at generation time: the per-sequence decision and its outputs."""

import pytest
import torch
from torch import nn

from repair_pl.memory import SideMemory
from repair_pl.testing import attached


def routed_memory() -> SideMemory:
    torch.manual_seed(0)
    memory = attached(SideMemory(), nn.Linear(8, 4, bias=False))
    with torch.no_grad():
        memory.side.add_(torch.randn_like(memory.side))
    memory.min_in_scope = 1.0
    return memory


def test_sticky_steps_equal_the_full_routed_formula():
    memory = routed_memory()
    prompt = torch.randn(3, 5, 8)
    prompt[1] *= 1e-3  # a tiny activation: its score stays under the threshold, main memory
    mask = torch.ones(3, 5, dtype=torch.bool)
    with memory.routing(mask, sticky=True):
        memory(prompt)
        choice = memory.sticky.clone()
        step = torch.randn(3, 1, 8)  # the next token of each sequence
        out = memory(step)
    assert choice.tolist() == [0, -1, 0]
    side, main = step @ memory.side.detach().T, memory.main(step)
    expected = torch.where((choice == 0).view(-1, 1, 1), side, main)
    assert torch.equal(out, expected)
    assert torch.equal(memory.last_choice, choice)


def test_sticky_step_with_nothing_routed_is_the_main_output():
    memory = routed_memory()
    with memory.routing(torch.ones(2, 4, dtype=torch.bool), sticky=True):
        memory(torch.randn(2, 4, 8) * 1e-3)
        assert memory.sticky.tolist() == [-1, -1]
        step = torch.randn(2, 1, 8)
        assert torch.equal(memory(step), memory.main(step))
    assert memory.sticky is None


def test_disjoint_masks_of_a_batch_never_overlap_and_merge_whole():
    from repair_pl.merge import ties_merge

    torch.manual_seed(0)
    memory = attached(SideMemory(mask_ratio=0.5), nn.Linear(40, 30, bias=False), disjoint=True)
    memory.plan_shards(3)  # 3 shards of min(0.5, 1/3) of the 1200 entries each
    masks = []
    for _ in range(3):
        masks.append(memory.mask.clone())
        with torch.no_grad():  # a shard's change lives inside its mask
            memory.side.add_(torch.randn_like(memory.side) * memory.mask)
        memory.save_shard()
    assert [int(m.sum()) for m in masks] == [400, 400, 400]
    assert int((masks[0] & masks[1]).sum() + (masks[0] & masks[2]).sum() + (masks[1] & masks[2]).sum()) == 0
    base, shards = memory.merged.clone(), list(memory.shards)
    memory.merge_shards()
    assert torch.allclose(memory.merged, base + sum(s - base for s in shards))  # TIES keeps every shard whole
    assert torch.allclose(ties_merge(base, shards, density=0.53), memory.merged)
    assert int(memory.used.sum()) == int(memory.mask.sum()) == 600  # after a merge: mask_ratio again, nothing pending


def test_stacked_shards_start_where_the_last_one_ended_and_merge_to_it():
    torch.manual_seed(0)
    memory = attached(SideMemory(mask_ratio=0.5, stack_shards=True), nn.Linear(40, 30, bias=False), disjoint=True)
    memory.plan_shards(3)
    changes = []
    for k in range(3):
        before = memory.side.detach().clone()
        if k:  # a new shard starts from W' as the stored shards left it, not from the merged memory
            assert torch.allclose(before, memory.merged + sum(changes))
        change = torch.randn_like(memory.side) * memory.mask
        with torch.no_grad():
            memory.side.add_(change)
        changes.append(change)
        memory.save_shard()
        # a shard merges as the merged memory plus its own change only
        assert torch.allclose(memory._pending()[-1], memory.merged + change)
    assert len(memory._pending()) == 3  # W' has not moved since the last shard: no fourth one
    assert torch.allclose(memory.inference_weights()[0], memory.merged + sum(changes))  # visible before a merge
    last = memory.side.detach().clone()
    memory.merge_shards()
    assert torch.allclose(memory.merged, last) and torch.allclose(memory.side.detach(), last)


def test_overlapping_masks_are_drawn_as_before_when_not_disjoint():
    a = attached(SideMemory(mask_ratio=0.2), nn.Linear(40, 30, bias=False), seed=3)  # draws the first mask
    b = attached(SideMemory(mask_ratio=0.2), nn.Linear(40, 30, bias=False), seed=3, disjoint=False)
    b.plan_shards(10)  # no effect without disjoint masks
    assert torch.equal(a.mask, b.mask)
    expected = torch.rand((30, 40), generator=torch.Generator().manual_seed(3)) < 0.2
    assert torch.equal(a.mask, expected)


def test_last_token_score_reads_the_last_routing_token_of_each_row():
    memory = routed_memory()
    memory.score_tokens, memory.mode = "last", "edit"
    x = torch.randn(3, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0],  # right-padded prompt: its last token is position 2
                         [0, 0, 1, 1, 1],  # left-padded (generation): position 4
                         [1, 1, 1, 1, 1]], dtype=torch.bool)
    norms = (x @ (memory.side.detach() - memory.main.weight).T).norm(dim=-1)
    with memory.routing(mask):
        memory(x)
    torch.testing.assert_close(memory.last_scores, norms[[0, 1, 2], [2, 4, 4]])
    memory(x)  # no mask: the last position
    torch.testing.assert_close(memory.last_scores, norms[:, -1])
    memory.score_tokens = "mean"
    with memory.routing(mask):
        memory(x)
    torch.testing.assert_close(memory.last_scores, (norms * mask).sum(-1) / mask.sum(-1))


def test_unknown_score_tokens_is_refused():
    with pytest.raises(ValueError, match="score_tokens"):
        SideMemory(score_tokens="first")
