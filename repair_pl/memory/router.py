"""``PromptRouter``: route a sequence to the side memory that holds the edit its prompt asks about.

Each kept edit leaves a key: the sentence-encoder embedding of its prompt (by default
all-MiniLM-L6-v2, the dual encoder EREN retrieves notes with). A sequence is routed by its
prompt's embedding: to the memory of the most similar key when the cosine similarity reaches
``threshold``, else to the frozen layer. The decision no longer reads the side memory's own
activation, which every merged edit raises on all text, so it holds as edits accumulate; and
since each key names its memory, edits can be kept in several memories (``retrieve``) and a
prompt reaches the one that holds its edit. A prompt in the tokenizer's chat template is compared
by its last user message (:meth:`~repair_pl.module.RepairModule.prompt_texts`), so a question
reaches its edit whether it is asked plainly or as a chat turn.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class PromptRouter:
    """Retrieval routing for :class:`~repair_pl.memory.SideMemory` (see the module docstring).

    Args:
        threshold: the cosine similarity a prompt needs to an edit's prompt to be routed.
        encoder: a sentence-transformers folder (``None``: the bundled all-MiniLM-L6-v2).
    """

    def __init__(self, threshold: float = 0.7, encoder: str | None = None):
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"PromptRouter.threshold is a cosine similarity in [-1, 1], got {threshold!r}")
        self.threshold, self.encoder = threshold, encoder

    def bind(self) -> None:
        """Load the encoder and start with no keys (called once by the memory that owns it)."""
        from repair_pl.eren.retrieval import load_encoder

        self._encoder = load_encoder(self.encoder)
        self.reset()

    def reset(self) -> None:
        """Forget every key."""
        self.keys = torch.zeros(0, getattr(self._encoder, "dim", 0))
        self.memory_of: list[int] = []  # the memory each key's edit lives in
        self.prompts: list[str] = []

    def __len__(self) -> int:
        return len(self.prompts)

    def add(self, prompt: str, memory: int) -> None:
        """Key an edit's prompt to ``memory``; a prompt keyed before now leads to ``memory`` (a
        re-edit, or a later edit of the same prompt: the newest wins)."""
        if prompt in self.prompts:
            self.memory_of[self.prompts.index(prompt)] = memory
            return
        self.keys = torch.cat([self.keys, self._encoder.encode([prompt]).float()])
        self.memory_of.append(memory)
        self.prompts.append(prompt)

    @torch.no_grad()
    def route(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """``(choice, similarity)`` per prompt: the memory of the most similar key when the
        similarity reaches ``threshold``, else -1; and that similarity."""
        if not len(self):
            return torch.full((len(prompts),), -1, dtype=torch.long), torch.zeros(len(prompts))
        similarity, nearest = (self._encoder.encode(list(prompts)).float() @ self.keys.T).max(dim=1)
        memory = torch.tensor(self.memory_of, dtype=torch.long)[nearest]
        return torch.where(similarity >= self.threshold, memory, -1), similarity

    def state(self) -> tuple[dict[str, Tensor], dict]:
        return {"router.keys": self.keys, "router.memory_of": torch.tensor(self.memory_of, dtype=torch.long)}, \
            {"router_prompts": list(self.prompts)}

    def load_state(self, tensors: dict[str, Tensor], meta: dict) -> None:
        self.keys = tensors["router.keys"].float().cpu()
        self.memory_of = tensors["router.memory_of"].tolist()
        self.prompts = list(meta["router_prompts"])
