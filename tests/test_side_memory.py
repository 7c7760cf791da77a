"""SideMemory routing at generation time: the per-sequence decision and its outputs."""

import torch
from torch import nn

from repair_pl.side_memory import SideMemory


def routed_memory() -> SideMemory:
    torch.manual_seed(0)
    memory = SideMemory(nn.Linear(8, 4, bias=False).requires_grad_(False))
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
