"""``SideMemory``: WISE's side memory around one MLP down projection.

The frozen main weight ``W`` stays untouched; a trainable copy ``W'`` (the side memory) holds
the edits. Routing decides per sequence: the activation score of a sequence is the L2 norm of
``x W'^T - x W^T`` per token, averaged over the sequence's routing tokens (the prompt; with
``score_tokens="last"``, ours, the norm at the last routing token alone); the side output is
used when the score exceeds ``epsilon = act_ratio * (min in-scope score seen at the end of an
edit)``, else the main output.

An edit trains ``W'`` with SGD on the target cross-entropy of the prompt (bare and behind
random context prefixes the frozen model wrote) plus WISE's margin routing loss, which pushes
the prompt's score up and the score of an unrelated text (the record's routing prompt) down.

Shards: ``merged`` is the side memory as of the last merge (``W`` at first); a shard trains
``W'`` from ``merged`` inside a random mask; every ``save_freq`` edits the shard is stored and
``W'`` restarts from ``merged`` with a new mask; every ``merge_freq`` edits the stored shards
(and the current one) are merged into ``merged`` (TIES by default). Until a merge happens,
inference uses the merge of the stored shards and the current one, so edits are visible at
all times. With ``disjoint`` masks (set by REPAIR's distribution-aware memory) no two shards
pending a merge share an entry, so a TIES merge keeps every shard's change whole.
"""

from __future__ import annotations

import copy
import zlib
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repair_pl.generation import chat_prompt, has_chat_template
from repair_pl.losses import margin_routing_loss
from repair_pl.memory.base import EditableLayer, lr_tagged
from repair_pl.memory.batch import prompt_target_batch
from repair_pl.memory.router import PromptRouter
from repair_pl.merge import MERGERS, merge

SCORE_TOKENS = ("mean", "last")
"""Where a routing score is read: averaged over the routing tokens (WISE) or at the last one."""

ROUTING_POOL_SIZE = 32
"""Texts the frozen model writes once as out-of-scope examples for records without a routing prompt."""


class SideMemory(EditableLayer):
    """WISE's side memory (see the module docstring).

    Args:
        lr: SGD learning rate on ``W'``.
        act_ratio: routing threshold epsilon = act_ratio x min in-scope score.
        alpha, beta, gamma: margins of the routing loss (out-of-scope ceiling, in-scope floor, gap).
        routing_weight: weight of the routing loss against the target cross-entropy.
        prompt_weight: share of the target cross-entropy given to the bare prompt (the rest to
            its prefixed copies); ``None``: one mean over every answer token (WISE).
        mask_ratio: share of ``W'`` entries a shard may change.
        norm_constraint: ``W'`` stays within +-norm_constraint (elementwise) of its value at the
            start of the edit; ``None`` disables.
        n_prefixes: random context prefixes written once by the frozen model; the edit is trained
            on the prompt alone and behind each prefix.
        prefix_tokens: length in tokens of each prefix.
        save_freq: store the current shard every N edits (``None``: never).
        merge_freq: merge the stored shards into the memory every N edits (``None``: never).
        merge_method: ``ties``, ``dare_ties``, ``linear``, ``slerp`` or ``sign``.
        density: trim density of TIES/DARE.
        retrieve: WISE-Retrieve: keep merged memories apart and route top-1 by score.
        n_negatives: also hold down the scores of the routing prompts of up to N earlier edits.
        score_tokens: ``"mean"`` over the prompt's tokens (WISE) or ``"last"``, the prompt's last
            token alone, whose output the edit trains to produce the answer.
        stack_shards: a new shard starts where the stored ones left ``W'`` instead of from the
            merged memory, so its edits are trained beside theirs.
        router: route by the prompt's similarity to the edits' prompts
            (:class:`~repair_pl.memory.PromptRouter`) instead of by the activation score
            (ours); with ``retrieve`` a prompt goes to the memory that holds its edit.
        end_answer: train the end of the answer too (the tokenizer's end-of-sequence token after
            the target), so a generated edited answer stops where the model would stop (ours).
        n_replay: train each edit beside the bare prompts and targets of up to N earlier edits
            of the same shard (the most recent), so the shard keeps them while it takes new
            ones (ours; their mean cross-entropy is added to the edit loss). With a plan for the
            shard (:meth:`plan_replay`) the edits still to come are trained too, and every replayed
            edit weighs in the gradient as much as the edit itself.
        chat_turn: also train the prompt as the single user turn of the tokenizer's chat template
            with the target as the reply (and each replayed edit likewise), so a chat model asked
            the edit as a chat message answers it too (ours; no effect for a tokenizer without a
            chat template).
    """

    def __init__(self, lr: float = 1.0, act_ratio: float = 0.88, alpha: float = 5.0, beta: float = 20.0,
                 gamma: float = 10.0, routing_weight: float = 1.0, prompt_weight: float | None = None,
                 mask_ratio: float = 0.2, norm_constraint: float | None = 1.0, n_prefixes: int = 10,
                 prefix_tokens: int = 8, save_freq: int | None = None, merge_freq: int | None = None,
                 merge_method: str = "ties", density: float = 0.53, retrieve: bool = False, n_negatives: int = 0,
                 score_tokens: str = "mean", stack_shards: bool = False, router: PromptRouter | None = None,
                 end_answer: bool = False, n_replay: int = 0, chat_turn: bool = False):
        super().__init__()
        _check(lr=lr, mask_ratio=mask_ratio, prompt_weight=prompt_weight, n_prefixes=n_prefixes,
               n_negatives=n_negatives, n_replay=n_replay, save_freq=save_freq, merge_freq=merge_freq, merge_method=merge_method,
               score_tokens=score_tokens)
        self.lr, self.act_ratio, self.alpha, self.beta, self.gamma = lr, act_ratio, alpha, beta, gamma
        self.routing_weight, self.prompt_weight, self.mask_ratio = routing_weight, prompt_weight, mask_ratio
        self.norm_constraint, self.n_prefixes, self.prefix_tokens = norm_constraint, n_prefixes, prefix_tokens
        self.save_freq, self.merge_freq, self.merge_method = save_freq, merge_freq, merge_method
        self.density, self.retrieve, self.n_negatives = density, retrieve, n_negatives
        self.score_tokens, self.stack_shards, self.router, self.end_answer = score_tokens, stack_shards, router, end_answer
        self.n_replay, self.chat_turn = n_replay, chat_turn

    # ---- wiring ----------------------------------------------------------------------------
    def attach(self, main: nn.Linear, seed: int = 0) -> None:
        super().attach(main, seed)
        weight = main.weight.detach().float()
        self.side = nn.Parameter(weight.clone())  # fp32 even when the frozen model is bf16
        self.register_buffer("merged", weight.clone(), persistent=False)
        self.register_buffer("mask", torch.ones_like(weight, dtype=torch.bool), persistent=False)
        # entries already given to a shard since the last merge (disjoint masks only)
        self.register_buffer("used", torch.zeros_like(weight, dtype=torch.bool), persistent=False)
        self.disjoint = False  # REPAIR's distribution-aware memory turns it on
        self.shard_ratio = self.mask_ratio  # share of the next disjoint mask
        self.shards: list[Tensor] = []  # stored, not yet merged
        self.shard_losses: list[float] = []  # mean final edit loss of each stored shard
        self.current_losses: list[float] = []  # final losses of the edits in the current shard
        self.memories: list[Tensor] = []  # WISE-Retrieve: finished merged memories
        self.memory_scales: list[float] = []  # their min in-scope scores (retrieve compares ratios)
        self.period_min: float | None = None  # min in-scope score since the last retrieve merge
        self.min_in_scope: float | None = None
        self.prefixes: list[str] | None = None
        self.routing_pool: list[str] | None = None
        self.negatives: deque[list[int]] = deque(maxlen=self.n_negatives)
        self.shard_edits: list[tuple[str, str]] = []  # (prompt, trained target) of the current shard's edits
        self.planned: list[tuple[str, str]] = []  # those planned for it and not yet made (plan_replay)
        self._generator = torch.Generator().manual_seed(seed)
        self._view: Tensor | None = None  # cached merge of pending shards for inference
        if self.router is not None:
            self.router.bind()

    @property
    def trainable(self) -> nn.Parameter:
        return self.side

    @property
    def epsilon(self) -> float | None:
        """The routing threshold (None before the first edit)."""
        return None if self.min_in_scope is None else self.act_ratio * self.min_in_scope

    # ---- one edit --------------------------------------------------------------------------
    def prepare(self, record, module, retry: bool = False) -> dict[str, Any]:
        """Edit rows: the prompt (bare, behind each prefix, and with ``chat_turn`` as a chat turn)
        + target; then the out-of-scope rows: the record's routing prompt and up to
        ``n_negatives`` routing prompts of earlier edits (a re-edit does not add its own again)."""
        tok, max_length = module.tokenizer, module.hparams.max_length
        if self.prefixes is None:  # seeded, once: every edit sees the same prefixes
            texts = module.sample_texts(PREFIX_STARTS, self.n_prefixes, self.prefix_tokens)
            self.prefixes = [text + ". " for text in texts]
        prompts = [record.prompt] + [p + record.prompt for p in self.prefixes]
        chat = self.chat_turn and has_chat_template(tok)
        if chat:
            prompts.append(chat_prompt(tok, record.prompt))
        text = record.routing_prompt or self.generated_routing_text(record, module)
        out_rows = [tok([text]).input_ids[0][: max_length or None]] + list(self.negatives)
        if self.n_negatives and not retry:
            self.negatives.appendleft(out_rows[0])
        target = self.trained_target(record, tok)
        pairs = self.replayed(record.prompt)
        # replayed edits are trained as the edit is, so a shard's first fit also learns their chat turns
        replay = pairs + [(chat_prompt(tok, p), t) for p, t in pairs] if chat else pairs
        batch = prompt_target_batch(tok, prompts, target, max_length, out_rows, replay)
        # with a plan, replayed edits are still to be learnt, not only kept: each weighs as much as the edit
        batch["replay_weight"] = float(len(pairs)) if self.planned and pairs else 1.0
        return batch

    def replayed(self, prompt: str) -> list[tuple[str, str]]:
        """The (prompt, target) pairs trained beside the edit of ``prompt``: the shard's edits
        made so far, then those planned for it (:meth:`plan_replay`), the last ``n_replay``."""
        if not self.n_replay:
            return []
        done = {p for p, _ in self.shard_edits}
        pairs = self.shard_edits + [pair for pair in self.planned if pair[0] not in done]
        return [pair for pair in pairs if pair[0] != prompt][-self.n_replay:]

    def plan_replay(self, records, tokenizer) -> None:
        """The edits planned for the current shard (REPAIR's distribution-aware memory with
        ``train_ahead``): each edit of the shard is then also trained on those still to come, so
        the shard's first fit learns them all and later fits mostly confirm their own."""
        self.planned = [(r.prompt, self.trained_target(r, tokenizer)) for r in records]

    def trained_target(self, record, tokenizer) -> str:
        """The text an edit trains after its prompt: the target (and with ``end_answer`` the
        end-of-sequence token)."""
        return record.target + (tokenizer.eos_token if self.end_answer and tokenizer.eos_token else "")

    def generated_routing_text(self, record, module) -> str:
        """An out-of-scope text for a record without a routing prompt: one of
        :data:`ROUTING_POOL_SIZE` texts the frozen model writes once (seeded), picked by the
        prompt's hash, so no evaluated text is ever trained on as out-of-scope."""
        if self.routing_pool is None:
            self.routing_pool = module.sample_texts(ROUTING_STARTS, ROUTING_POOL_SIZE, 24, seed_offset=1)
        return self.routing_pool[zlib.crc32(record.prompt.encode()) % len(self.routing_pool)]

    def losses(self, logits: Tensor, labels: Tensor, batch: dict[str, Any]) -> dict[str, Tensor]:
        scores, n_first = self.last_scores, batch["n_first"]  # the bare prompt's answer positions come first
        n_own = batch["n_own"]  # then its prefixed copies', then replayed edits'
        edit_rows, other_rows = batch["edit_rows"].to(scores.device), batch["other_rows"].to(scores.device)
        token_ce = F.cross_entropy(logits.float(), labels, reduction="none")
        if self.prompt_weight is None or n_first == n_own:
            edit_loss = token_ce[:n_own].mean()
        else:
            w = self.prompt_weight
            edit_loss = w * token_ce[:n_first].mean() + (1 - w) * token_ce[n_first:n_own].mean()
        trained = edit_loss
        if n_own < len(labels):  # edit_loss (early stop, divergence) counts the mean replayed edit
            replayed = token_ce[n_own:].mean()
            edit_loss, trained = edit_loss + replayed, edit_loss + batch["replay_weight"] * replayed
        routing = margin_routing_loss(scores[edit_rows], scores[other_rows], self.alpha, self.beta, self.gamma)
        routing = routing.to(edit_loss.device)
        correct = (logits[:n_first].argmax(-1) == labels[:n_first]).all().float()
        return {"loss": trained + self.routing_weight * routing, "edit_loss": edit_loss, "routing_loss": routing,
                "in_scope": scores[0].detach(), "out_scope": scores[other_rows].max().detach(),
                "target_correct": correct}

    def configure_optimizer(self) -> torch.optim.Optimizer:
        return lr_tagged(torch.optim.SGD([self.side], lr=self.lr), self.lr)

    def after_backward(self) -> None:
        if self.side.grad is not None:  # only the current shard's entries may change
            self.side.grad.mul_(self.mask)

    def after_step(self, stats) -> bool:
        if self.norm_constraint is not None and self.edit_start is not None:
            c = self.norm_constraint
            with torch.no_grad():
                self.side.copy_(torch.clamp(self.side, self.edit_start - c, self.edit_start + c))
        return False

    def finish_edit(self, record, batch: dict[str, Any], module, success: bool) -> float:
        score = float("nan")
        self.planned = [pair for pair in self.planned if pair[0] != record.prompt]  # made, or undone
        if success:
            score = module.trained_score(batch)
            self.record_in_scope(score)
            self.current_losses.append(module.step_stats.get("edit_loss", 0.0))
            if self.n_replay:
                pair = (record.prompt, self.trained_target(record, module.tokenizer))
                kept = [p for p in self.shard_edits if p[0] != record.prompt] + [pair]
                self.shard_edits = kept[-(self.n_replay + 1):]  # a prompt's own entry is never replayed to it
            if self.router is not None:  # its memory: the current one (the next kept apart, with retrieve)
                ids = module.tokenizer([record.prompt], return_tensors="pt").input_ids
                self.router.add(module.prompt_texts(ids)[0], len(self.memories))
        self.edit_start = None
        return score

    def after_edit(self, edit_count: int) -> None:
        if self.save_freq and edit_count % self.save_freq == 0:
            self.save_shard()
        if self.merge_freq and edit_count % self.merge_freq == 0:
            self.merge_shards()

    # ---- routing threshold -----------------------------------------------------------------
    def record_in_scope(self, score: float) -> None:
        """Update the routing threshold with an edit's final in-scope score."""
        self.min_in_scope = score if self.min_in_scope is None else min(self.min_in_scope, score)
        self.period_min = score if self.period_min is None else min(self.period_min, score)

    # ---- shards ----------------------------------------------------------------------------
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

    def _mean_current_loss(self) -> float:
        return sum(self.current_losses) / len(self.current_losses) if self.current_losses else 0.0

    def _shard_start(self) -> Tensor:
        """The weight the current shard started from: the merged memory, or with ``stack_shards``
        the last stored shard (stored shards are then snapshots of ``W'``)."""
        return self.shards[-1] if self.stack_shards and self.shards else self.merged

    def save_shard(self) -> None:
        """Store the current shard and start a new one with a new mask: from the merged memory
        (WISE), or with ``stack_shards`` where ``W'`` is."""
        self.shards.append(self.side.detach().clone())
        self.shard_losses.append(self._mean_current_loss())
        self.current_losses, self.shard_edits, self.planned = [], [], []
        if not self.stack_shards:
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
        self.shard_losses, self.current_losses, self.shard_edits, self.planned = [], [], [], []
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
        if not self.stack_shards:
            return ends
        # stacked: each snapshot merges as the merged memory plus its own change
        return [self.merged + (end - start) for end, start in zip(ends, [self.merged] + self.shards)]

    def invalidate(self) -> None:
        self._view = None

    @contextmanager
    def holding(self, weight: Tensor) -> Iterator[None]:
        """``W'`` is ``weight`` inside the block (to score prompts through a stored memory in
        mode "edit"), and exactly what it was after it."""
        saved = self.side.detach().clone()
        with torch.no_grad():
            self.side.copy_(weight)
        try:
            yield
        finally:
            with torch.no_grad():
                self.side.copy_(saved)
            self.invalidate()

    def inference_weights(self) -> list[Tensor]:
        """The side weights routing chooses among (one, or several in retrieve mode)."""
        if self.shards:
            if self._view is None:
                self._view = merge(self.merge_method, self.merged, self._pending(), density=self.density)
            current = self._view
        else:
            current = self.side.detach()
        return self.memories + [current]

    # ---- state -----------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, Tensor], dict]:
        tensors = {"side": self.side.detach(), "merged": self.merged, "mask": self.mask.to(torch.uint8),
                   "used": self.used.to(torch.uint8)}
        tensors.update({f"shard.{i}": s for i, s in enumerate(self.shards)})
        tensors.update({f"memory.{i}": s for i, s in enumerate(self.memories)})
        meta = {"min_in_scope": self.min_in_scope, "period_min": self.period_min,
                "memory_scales": self.memory_scales, "act_ratio": self.act_ratio, "score_tokens": self.score_tokens,
                "shard_ratio": self.shard_ratio, "n_shards": len(self.shards), "n_memories": len(self.memories),
                "prefixes": self.prefixes, "routing_pool": self.routing_pool,
                "generator_state": self._generator.get_state().tolist(),
                "shard_losses": self.shard_losses, "current_losses": self.current_losses,
                "negatives": [list(ids) for ids in self.negatives],
                "shard_edits": [list(pair) for pair in self.shard_edits], "planned": [list(p) for p in self.planned]}
        if self.router is not None:
            keys, keyed = self.router.state()
            tensors.update(keys)
            meta.update(keyed)
        return tensors, meta

    def snapshot(self) -> tuple[dict[str, Tensor], dict]:
        """Only ``W'`` is written in place: shards, memories, the merged memory, masks and router
        keys are replaced, never changed, so the snapshot shares them (a long stream's kept
        memories are not copied at each undoable round of error feedback)."""
        tensors, meta = self.state()
        tensors["side"] = tensors["side"].clone()
        return tensors, copy.deepcopy(meta)

    def load_state(self, tensors: dict[str, Tensor], meta: dict) -> None:
        device = self.side.device
        with torch.no_grad():
            self.side.copy_(tensors["side"])
        self.merged, self.mask = tensors["merged"].to(device), tensors["mask"].bool().to(device)
        self.used = tensors["used"].bool().to(device) if "used" in tensors else torch.zeros_like(self.mask)
        self.shard_ratio = meta.get("shard_ratio", self.mask_ratio)
        self.shards = [tensors[f"shard.{i}"].to(device) for i in range(meta["n_shards"])]
        self.memories = [tensors[f"memory.{i}"].to(device) for i in range(meta["n_memories"])]
        self.min_in_scope, self.prefixes = meta["min_in_scope"], meta["prefixes"]
        self.routing_pool = meta.get("routing_pool")
        self.period_min, self.memory_scales = meta["period_min"], list(meta["memory_scales"])
        self._generator.set_state(torch.tensor(meta["generator_state"], dtype=torch.uint8))
        self.shard_losses, self.current_losses = list(meta.get("shard_losses", [])), list(meta.get("current_losses", []))
        self.negatives.clear()
        self.negatives.extend(meta.get("negatives", []))
        self.shard_edits = [tuple(pair) for pair in meta.get("shard_edits", [])]
        self.planned = [tuple(pair) for pair in meta.get("planned", [])]
        if self.router is not None:
            self.router.load_state(tensors, meta)
        self.invalidate()

    def reset(self, seed: int = 0) -> None:
        weight = self.main.weight.detach().float()
        with torch.no_grad():
            self.side.copy_(weight)
        self.merged, self.shards, self.memories, self.memory_scales = weight.clone(), [], [], []
        self.min_in_scope = self.period_min = None
        self.shard_losses, self.current_losses, self.shard_edits, self.planned = [], [], [], []
        self.negatives.clear()
        if self.router is not None:
            self.router.reset()
        self.invalidate()
        # Reseed: every reset starts from the same state, so lifelong chunks are independent
        # and may run on different processes (repair_pl.distributed) with the same results.
        self._generator.manual_seed(seed)
        self.release_masks()
        self.new_mask()

    # ---- forward ---------------------------------------------------------------------------
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
        routed_by_prompt = self.mode == "route" and self.router is not None
        if self.mode == "off" or (self.mode == "route" and not routed_by_prompt and self.min_in_scope is None):
            return self._no_route(x)
        main_out = self.main(x)
        if self.mode == "edit":
            side_out = F.linear(x.to(self.side.dtype), self.side)
            self.last_scores = self._scores(side_out - main_out.float())
            return side_out.to(main_out.dtype)
        weights = self.inference_weights()
        if routed_by_prompt and not (self._sticky_on and self.sticky is not None):
            return self._routed_by_prompt(x, main_out, weights)
        if self._sticky_on and self.sticky is not None:
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
        if self._sticky_on:
            self.sticky, self._sticky_used = choice, sorted(set(choice[choice >= 0].tolist()))
        self.last_choice = choice
        out = main_out
        for k, side_out in enumerate(outputs):
            out = torch.where((choice == k).view(-1, *([1] * (x.dim() - 1))), side_out, out)
        return out

    def _routed_by_prompt(self, x: Tensor, main_out: Tensor, weights: list[Tensor]) -> Tensor:
        """The router's choice for each sequence (from ``route_texts``); only the chosen memories run."""
        if self.route_texts is None or len(self.route_texts) != x.shape[0]:
            raise ValueError("a side memory with a router needs the prompts' texts to route on "
                             "(RepairModule.forward and generate() pass them)")
        choice, similarity = self.router.route(self.route_texts)
        choice = choice.to(x.device)
        self.last_scores, self.last_choice = similarity.to(x.device), choice
        if self._sticky_on:
            self.sticky, self._sticky_used = choice, sorted(set(choice[choice >= 0].tolist()))
        out = main_out
        for k in sorted(set(choice[choice >= 0].tolist())):
            side_out = F.linear(x.to(weights[k].dtype), weights[k]).to(main_out.dtype)
            out = torch.where((choice == k).view(-1, *([1] * (x.dim() - 1))), side_out, out)
        return out


PREFIX_STARTS = ("The", "Therefore", "Because", "I", "You")
ROUTING_STARTS = ("The", "In", "A", "It", "This", "When", "There", "One")


def _check(**options) -> None:
    """Start-up checks of options that would otherwise fail deep inside a run; errors name the option."""
    for key, value in options.items():
        if key in ("n_prefixes", "n_negatives", "n_replay"):
            bad, want = not isinstance(value, int) or value < 0, "an integer >= 0"
        elif key in ("save_freq", "merge_freq"):
            bad, want = value is not None and (not isinstance(value, int) or value < 1), "a positive integer or null"
        elif key == "mask_ratio":
            bad, want = not 0 < value <= 1, "in (0, 1]"
        elif key == "prompt_weight":
            bad, want = value is not None and not 0 <= value <= 1, "in [0, 1] or null"
        elif key == "lr":
            bad, want = not value > 0, "positive"
        elif key == "merge_method":
            bad, want = value not in MERGERS, f"one of {sorted(MERGERS)}"
        else:  # score_tokens
            bad, want = value not in SCORE_TOKENS, f"one of {SCORE_TOKENS}"
        if bad:
            raise ValueError(f"SideMemory.{key} must be {want}, got {value!r}")
