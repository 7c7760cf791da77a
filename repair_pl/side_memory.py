"""``SideMemory``: WISE's side memory around one MLP down projection.

The frozen main weight ``W`` stays untouched; a trainable copy ``W'`` (the side memory) holds
the edits. Routing decides per sequence: the activation score of a sequence is the L2 norm of
``x W'^T - x W^T`` per token, averaged over the sequence's routing tokens (the prompt; with
``score_tokens="last"``, ours, the norm at the last routing token alone); the side
output is used when the score exceeds ``epsilon = act_ratio * (min in-scope score seen at the end
of an edit)``, else the main output.

Shards (our reading of WISE's knowledge sharding, documented in README "Design choices"):
``merged`` is the side memory as of the last merge (``W`` at first); a shard trains ``W'`` from
``merged`` inside a random mask; every ``save_freq`` edits the shard is stored and ``W'`` restarts
from ``merged`` with a new mask; every ``merge_freq`` edits the stored shards (and the current
one) are merged into ``merged`` (TIES by default). Until a merge happens, inference uses the
merge of the stored shards and the current one, so edits are visible at all times.

With ``disjoint`` masks (REPAIR, ours) no two shards pending a merge share an entry, so a TIES
merge keeps every shard's change whole instead of averaging the overlaps (with 20 shards of 20%
each, an entry is shared by ~4 of them); :meth:`SideMemory.plan_shards` sizes the masks of a
batch's shards to fit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repair_pl.merge import merge


SCORE_TOKENS = ("mean", "last")
"""Where a routing score is read: averaged over the routing tokens (WISE) or at the last one."""


class SideMemory(nn.Module):
    """Replaces an ``nn.Linear`` down projection; see the module docstring for the semantics.

    Modes: ``"off"`` (main output only: the unedited model), ``"edit"`` (side output for every
    row, scores recorded for the routing loss), ``"route"`` (inference: per-sequence routing).
    """

    def __init__(self, main: nn.Linear, act_ratio: float = 0.88, mask_ratio: float = 0.2,
                 merge_method: str = "ties", density: float = 0.53, retrieve: bool = False, disjoint: bool = False,
                 stack: bool = False, score_tokens: str = "mean", seed: int = 0):
        super().__init__()
        if main.bias is not None:
            raise ValueError("SideMemory expects a bias-free down projection (Llama-family MLP)")
        if score_tokens not in SCORE_TOKENS:
            raise ValueError(f"score_tokens must be 'mean' or 'last', got {score_tokens!r}")
        self.score_tokens = score_tokens
        self.main = main
        weight = main.weight.detach().float()
        self.side = nn.Parameter(weight.clone())  # fp32 even when the frozen model is bf16
        self.register_buffer("merged", weight.clone(), persistent=False)
        self.register_buffer("mask", torch.ones_like(weight, dtype=torch.bool), persistent=False)
        # entries already given to a shard since the last merge (disjoint masks only)
        self.register_buffer("used", torch.zeros_like(weight, dtype=torch.bool), persistent=False)
        self.shards: list[Tensor] = []  # stored, not yet merged
        self.shard_losses: list[float] = []  # mean final edit loss of each stored shard
        self.current_losses: list[float] = []  # final losses of the edits in the current shard
        self.memories: list[Tensor] = []  # WISE-Retrieve: finished merged memories
        self.memory_scales: list[float] = []  # their min in-scope scores (retrieve compares ratios)
        self.period_min: float | None = None  # min in-scope score since the last retrieve merge
        self.act_ratio, self.mask_ratio = act_ratio, mask_ratio
        self.disjoint, self.shard_ratio = disjoint, mask_ratio  # shard_ratio: share of the next disjoint mask
        self.stack = stack  # a new shard starts from the stored ones (not from the merged memory)
        self.merge_method, self.density, self.retrieve = merge_method, density, retrieve
        self.min_in_scope: float | None = None
        self.mode = "route"
        self.route_mask: Tensor | None = None
        self.sticky: Tensor | None = None  # per-sequence decision kept across generate() steps
        self.last_scores: Tensor | None = None
        self.last_choice: Tensor | None = None
        self._generator = torch.Generator().manual_seed(seed)
        self._view: Tensor | None = None  # cached merge of pending shards for inference

    # ---- state -------------------------------------------------------------------------------
    @property
    def epsilon(self) -> float | None:
        """The routing threshold (None before the first edit)."""
        return None if self.min_in_scope is None else self.act_ratio * self.min_in_scope

    def new_mask(self) -> None:
        """Draw the random gradient mask of a new shard: ``mask_ratio`` of the entries, or with
        ``disjoint`` masks ``shard_ratio`` of them among those no pending shard holds (when too
        few are left, the rest; when none are, an overlapping draw)."""
        rand = torch.rand(self.side.shape, generator=self._generator)
        if not self.disjoint:
            self.mask = (rand < self.mask_ratio).to(self.side.device)
            return
        free = int((~self.used).sum())
        if free == 0:  # every entry is held by a pending shard: overlap
            self.mask = (rand < self.shard_ratio).to(self.side.device)
            return
        rand[self.used.cpu()] = 2.0  # above every draw: never picked
        k = min(max(1, round(self.shard_ratio * rand.numel())), free)
        self.mask = (rand <= rand.flatten().kthvalue(k).values).to(self.side.device)
        self.used = self.used | self.mask

    def plan_shards(self, n: int) -> None:
        """Before a batch whose edits will fill ``n`` shards (REPAIR): with ``disjoint`` masks,
        each shard gets ``min(mask_ratio, 1/n)`` of the entries, so all ``n`` fit side by side;
        the current shard's mask is drawn again at that size. Call it when no shard is pending."""
        if not self.disjoint:
            return
        self.release_masks()
        self.shard_ratio = min(self.mask_ratio, 1.0 / max(n, 1))
        self.new_mask()

    def release_masks(self) -> None:
        """No shard is pending (after a merge, a reset): every entry is free again and the next
        disjoint mask has ``mask_ratio`` of them."""
        self.used, self.shard_ratio = torch.zeros_like(self.used), self.mask_ratio

    def record_in_scope(self, score: float) -> None:
        """Update the routing threshold with an edit's final in-scope score."""
        self.min_in_scope = score if self.min_in_scope is None else min(self.min_in_scope, score)
        self.period_min = score if self.period_min is None else min(self.period_min, score)

    def note_edit_loss(self, loss: float) -> None:
        """Remember an edit's final loss for loss-aware merging of its shard."""
        self.current_losses.append(loss)

    def _mean_current_loss(self) -> float:
        return sum(self.current_losses) / len(self.current_losses) if self.current_losses else 0.0

    def _shard_start(self) -> Tensor:
        """The weight the current shard started from: the merged memory, or with ``stack`` the
        last stored shard (stored shards are then snapshots of ``W'``)."""
        return self.shards[-1] if self.stack and self.shards else self.merged

    def save_shard(self) -> None:
        """Store the current shard and start a new one with a new mask: from the merged memory
        (WISE), or with ``stack`` where ``W'`` is (ours: the new shard's edits are trained
        beside the stored ones, which a merge then adds back unchanged when masks are disjoint)."""
        self.shards.append(self.side.detach().clone())
        self.shard_losses.append(self._mean_current_loss())
        self.current_losses = []
        if not self.stack:
            with torch.no_grad():
                self.side.copy_(self.merged)
        self.new_mask()
        self._view = None

    def merge_shards(self, weights: list[float] | None = None, loss_aware: bool = False, eps: float = 0.05) -> None:
        """Merge stored shards and the current ``W'`` into the side memory; ``loss_aware``
        weighs each shard by 1 / (its edits' mean final loss + eps), normalised to mean 1."""
        pending = self._pending()
        if not pending:
            return
        if loss_aware and weights is None:
            inverse = [1.0 / (loss + eps) for loss in self._pending_losses(pending)]
            weights = [w * len(inverse) / sum(inverse) for w in inverse]
        merged = merge(self.merge_method, self.merged, pending, weights, density=self.density,
                       generator=self._generator if self.merge_method == "dare_ties" else None)
        if self.retrieve:  # keep the merged memory apart; the next one starts from W
            self.memories.append(merged)
            self.memory_scales.append(self.period_min if self.period_min is not None else 1.0)
            merged, self.period_min = self.main.weight.detach().float().clone(), None
        self.merged, self.shards, self._view = merged, [], None
        self.shard_losses, self.current_losses = [], []
        with torch.no_grad():
            self.side.copy_(merged)
        self.release_masks()
        self.new_mask()

    def _pending_losses(self, pending: list[Tensor]) -> list[float]:
        """The mean final edit loss of each of ``pending`` (:meth:`_pending`'s shards)."""
        return self.shard_losses + ([self._mean_current_loss()] if len(pending) > len(self.shards) else [])

    def _pending(self) -> list[Tensor]:
        """The shards to merge: the stored ones and the current one (when it changed)."""
        changed = not torch.equal(self.side.detach(), self._shard_start())
        ends = self.shards + ([self.side.detach()] if changed else [])
        if not self.stack:
            return ends
        # stacked: each snapshot merges as the merged memory plus its own change
        return [self.merged + (end - start) for end, start in zip(ends, [self.merged] + self.shards)]

    def invalidate(self) -> None:
        """Forget the cached inference weight (call after ``W'`` changed)."""
        self._view = None

    def inference_weights(self) -> list[Tensor]:
        """The side weights routing chooses among (one, or several in retrieve mode)."""
        if self.shards:
            if self._view is None:
                self._view = merge(self.merge_method, self.merged, self._pending(), density=self.density)
            current = self._view
        else:
            current = self.side.detach()
        return self.memories + [current]

    # ---- forward -----------------------------------------------------------------------------
    @contextmanager
    def routing(self, mask: Tensor | None, sticky: bool = False) -> Iterator[None]:
        """Route on the tokens in ``mask`` (B, T); ``sticky`` keeps the first decision per
        sequence for later calls (generation with a KV cache sees one new token per step)."""
        self.route_mask, self.sticky = mask, None
        self._sticky_on = sticky
        try:
            yield
        finally:
            self.route_mask, self.sticky, self._sticky_on = None, None, False

    def _scores(self, delta: Tensor) -> Tensor:
        """Per-token L2 norm of ``delta``, averaged over the routing tokens (or taken at the last
        one, ``score_tokens="last"``) -> (B,)."""
        norms = delta.float().norm(dim=-1)
        mask = self.route_mask
        last = self.score_tokens == "last"
        if mask is None or mask.shape != norms.shape:
            return norms[..., -1] if last else norms.mean(-1)
        mask = mask.to(device=norms.device, dtype=norms.dtype)  # masks come from the input device
        if last:  # the last routing token of each row, whichever side the row is padded on
            position = (mask * torch.arange(1, mask.shape[-1] + 1, device=mask.device, dtype=mask.dtype)).argmax(-1)
            return norms.gather(-1, position[..., None]).squeeze(-1)
        return (norms * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)

    def forward(self, x: Tensor) -> Tensor:
        main_out = self.main(x)
        if self.mode == "off" or (self.mode == "route" and self.min_in_scope is None):
            self.last_choice = torch.full(x.shape[:1], -1, dtype=torch.long, device=x.device)
            return main_out
        if self.mode == "edit":
            side_out = F.linear(x.to(self.side.dtype), self.side)
            self.last_scores = self._scores(side_out - main_out.float())
            return side_out.to(main_out.dtype)
        weights = self.inference_weights()
        if getattr(self, "_sticky_on", False) and self.sticky is not None:
            # Generation past the prompt: the decision is known, so only the chosen memories'
            # outputs are computed (none when no sequence is routed); the result is the same.
            self.last_choice, out = self.sticky, main_out
            for k in self._sticky_used:
                side_out = F.linear(x.to(weights[k].dtype), weights[k]).to(main_out.dtype)
                out = torch.where((self.sticky == k).view(-1, *([1] * (x.dim() - 1))), side_out, out)
            return out
        outputs = [F.linear(x.to(w.dtype), w).to(main_out.dtype) for w in weights]
        scores = torch.stack([self._scores(out - main_out) for out in outputs], dim=-1)  # (B, K)
        if self.memories:
            # Retrieve (ours): memories differ in scale, so each score is taken relative to
            # its memory's own min in-scope score; route when the best ratio beats act_ratio.
            scales = self.memory_scales + [self.period_min or self.min_in_scope]
            ratios = scores / torch.tensor(scales, dtype=scores.dtype, device=scores.device)
            best, index = ratios.max(dim=-1)
            choice = torch.where(best > self.act_ratio, index, torch.full_like(index, -1))
        else:
            best, index = scores.max(dim=-1)
            choice = torch.where(best > self.epsilon, index, torch.full_like(index, -1))
        self.last_scores = best
        if getattr(self, "_sticky_on", False):
            self.sticky, self._sticky_used = choice, sorted(set(choice[choice >= 0].tolist()))
        self.last_choice = choice
        out = main_out
        for k, side_out in enumerate(outputs):
            out = torch.where((choice == k).view(-1, *([1] * (x.dim() - 1))), side_out, out)
        return out
