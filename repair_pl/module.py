"""``RepairModule``: the frozen LLM plus a trainable side memory; each edit is one short ``fit``."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from repair_pl.data.records import EditRecord
from repair_pl.evaluate import encode_pairs
from repair_pl.losses import distillation_loss, margin_routing_loss
from repair_pl.models import decoder_layers, load_model
from repair_pl.placement import PlacedStrategy, accelerator_for, check_device_map, dispatch, module_device
from repair_pl.baselines import BASELINES, FineTunedLayer, GraceCodebook
from repair_pl.side_memory import SCORE_TOKENS, SideMemory

METHODS = ("none", "wise", "repair", *BASELINES)


@dataclass
class EditResult:
    """What one edit did: steps run, final losses, wall time, and whether it was kept."""

    steps: int
    loss: float
    edit_loss: float
    routing_loss: float
    seconds: float
    in_scope_score: float
    success: bool = True
    retry: bool = False  # a re-edit by error feedback
    lr: float = float("nan")  # learning rate at the last step
    intervention: float = 1.0  # REPAIR's intervention strength at the last step
    target_reached: bool = False  # kept, and the bare prompt's target fully predicted at the last step


class _Repeat(Dataset):
    """The same prepared edit batch ``n`` times: one optimisation step per item."""

    def __init__(self, batch: dict[str, Tensor], n: int):
        self.batch, self.n = batch, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return self.batch


class RepairModule(L.LightningModule):
    """Lifelong editor: a frozen causal LM whose layer ``layer`` MLP down projection is wrapped
    in a :class:`SideMemory`. ``edit(record)`` runs one short ``Trainer.fit`` on this module.

    Args:
        model: ``"smollm2"`` (embedded default), a local HF folder, a ``.gguf`` file, a hub id,
            or an already loaded ``PreTrainedModel`` (then pass ``tokenizer`` too).
        tokenizer: the tokenizer when ``model`` is an object.
        method: ``"none"`` (no editing: evaluate the base model), ``"wise"``, ``"repair"``, or a
            baseline at the same layer (:mod:`repair_pl.baselines`): ``"ft_l"`` (constrained
            fine-tuning of the layer) or ``"grace"`` (GRACE's key-value codebook). The baselines
            train on the bare prompt with ``max_steps`` steps; WISE/REPAIR options (routing,
            prefixes, shards, REPAIR's components) do not apply to them.
        layer: index of the edited decoder layer; default ``round(0.85 * n_layers)``.
        lr: SGD learning rate on the side memory.
        max_steps: optimisation steps per edit (the budget).
        act_ratio: routing threshold epsilon = act_ratio x min in-scope score.
        alpha, beta, gamma: margins of the routing loss (out-of-scope ceiling, in-scope floor, gap).
        routing_weight: weight of the routing loss against the target cross-entropy.
        prompt_weight: share of the target cross-entropy given to the bare prompt (the rest to the
            prefixed copies); ``None``: one mean over every answer token (WISE). Ours: the bare
            prompt is what Rel measures, and as one row in eleven it was the last to converge.
        mask_ratio: share of side-memory entries a shard may change.
        disjoint_masks: the shards of a REPAIR batch get disjoint masks of ``min(mask_ratio, 1 /
            n_shards)`` each, so merging them keeps every shard whole (ours; ``None``: on with
            REPAIR's distribution-aware memory, off for WISE, whose shards overlap at random).
        norm_constraint: W' stays within +-norm_constraint (elementwise) of its value at the
            start of the edit; ``None`` disables.
        n_prefixes: random context prefixes generated once by the model; the edit is trained on
            the prompt alone and behind each prefix.
        prefix_tokens: length in tokens of each generated prefix.
        save_freq: store the current shard every N edits (``None``: never).
        merge_freq: merge the stored shards into the side memory every N edits (``None``: never).
        merge_method: ``ties``, ``dare_ties``, ``linear``, ``slerp`` or ``sign``.
        density: trim density of TIES/DARE.
        retrieve: WISE-Retrieve: keep merged memories apart and route top-1 by score.
        score_tokens: where the routing score is read: ``"mean"`` over the prompt's tokens (WISE)
            or ``"last"``, the prompt's last token alone (ours; README "Design choices"), whose
            output the edit trains to produce the answer; ``None``: ``"last"`` for
            ``method="repair"``, ``"mean"`` for ``"wise"``.
        n_negatives: also hold down the scores of the routing prompts of up to N earlier edits
            (ours; WISE uses only the edit's own). As edits accumulate, the side memory drifts
            on all text; a short replay of negatives keeps unrelated scores low (locality).
        progressive, closed_loop, distribution_aware, error_feedback: REPAIR's components
            (:mod:`repair_pl.callbacks`); ``None`` means on for ``method="repair"`` and off for
            ``"wise"``. Switch one off for an ablation.
        loss_aware_merge: with distribution-aware memory, weigh shards by 1/(final loss + eps)
            (in TIES where shards share entries, i.e. with ``disjoint_masks=False``).
        stack_shards: a new shard starts where the stored ones left ``W'`` instead of from the
            merged memory, so its edits are trained beside theirs (ours; see README).
        recalibration_margin: after each REPAIR merge the routing threshold is set to this
            fraction of the weakest score among the batch's edits (:meth:`recalibrate_routing`).
        decay_factor, threshold, min_intervention, stop_loss, routing_tolerance, plateau_window: see
            :class:`~repair_pl.callbacks.ProgressiveIntervention`.
        stagnation_window, max_lr_factor, divergence_factor, max_rollbacks: see
            :class:`~repair_pl.callbacks.ClosedLoopFeedback`; ``undo_unreached`` is its
            ``fail_unconverged`` (turn it off for long-form targets that are never fully predicted).
        cluster_size, cluster_method, heterogeneous: see
            :class:`~repair_pl.callbacks.DistributionAwareMemory`.
        tau_prune, max_retries: see :class:`~repair_pl.callbacks.ErrorFeedback`.
        distillation, distill_weight, distill_temperature: REPAIR's in-batch distillation (off by
            default): later edits of a shard keep the shard's first edit's output
            (:class:`~repair_pl.callbacks.InBatchDistillation`).
        edit_batch_size: REPAIR edits the stream in batches of this many records (clustered
            inside, merged and re-checked between batches); ``None``: the whole chunk.
        ft_lr, ft_norm_constraint, ft_stop_loss: FT-L's Adam learning rate, elementwise bound
            around the unedited weight, and early stop once the loss is below ``ft_stop_loss``
            (``None``: always ``max_steps``); EasyEdit's 5e-4 box cannot move SmolLM2 (README).
        grace_eps, grace_lr: GRACE's initial radius of a new key (L2, in the units of the
            down projection's input) and the SGD learning rate of its value (README, Baselines).
        grace_stop_loss: GRACE's early stop: training a value ends once the prompt's target is
            fully predicted and the loss is below this (``None``: always ``max_steps``).
        dtype: dtype of the frozen model (the side memory is always fp32).
        device_map: spread the frozen model over several devices with accelerate (``"auto"``,
            or ``{module name: device}``); the side memory lives on the edited layer's device and
            inputs go to the embedding's. ``None``: the module sits on one device (``.to()``).
        eval_batch_size: batch size of evaluation.
        max_length: longest sequence in tokens (prompts are cut from the left past it).
        seed: seeds masks and prefixes.
    """

    def __init__(self, model: Any = "smollm2", tokenizer: Any = None, method: str = "wise",
                 layer: int | None = None, lr: float = 1.0, max_steps: int = 70, act_ratio: float = 0.88,
                 alpha: float = 5.0, beta: float = 20.0, gamma: float = 10.0, routing_weight: float = 1.0,
                 prompt_weight: float | None = None,
                 mask_ratio: float = 0.2, disjoint_masks: bool | None = None, stack_shards: bool = False,
                 norm_constraint: float | None = 1.0, n_prefixes: int = 10,
                 prefix_tokens: int = 8, save_freq: int | None = None, merge_freq: int | None = None,
                 merge_method: str = "ties", density: float = 0.53, retrieve: bool = False, n_negatives: int = 0,
                 score_tokens: str | None = None, progressive: bool | None = None, closed_loop: bool | None = None,
                 distribution_aware: bool | None = None, error_feedback: bool | None = None,
                 loss_aware_merge: bool = True, recalibration_margin: float = 0.91, decay_factor: float = 0.95, threshold: float = 0.01,
                 min_intervention: float = 0.1, stop_loss: float | None = None,
                 routing_tolerance: float = float("inf"), plateau_window: int | None = None,
                 stagnation_window: int = 5,
                 max_lr_factor: float = 4.0, undo_unreached: bool = True, divergence_factor: float = 3.0, max_rollbacks: int = 3, cluster_size: int = 5,
                 cluster_method: str = "kmeans", heterogeneous: bool = False, tau_prune: float = 0.5,
                 max_retries: int = 2, distillation: bool = False, distill_weight: float = 0.2,
                 distill_temperature: float = 2.0, edit_batch_size: int | None = None,
                 ft_lr: float = 1e-2, ft_norm_constraint: float | None = 1e-2, ft_stop_loss: float | None = 0.01,
                 grace_eps: float = 1.0, grace_lr: float = 300.0, grace_stop_loss: float | None = 0.1,
                 dtype: str = "float32", device_map: str | dict[str, int | str] | None = None,
                 eval_batch_size: int = 16, max_length: int | None = 256, seed: int = 0):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"model.method must be one of {METHODS}, got {method!r}")
        if method in BASELINES:
            _check_baseline_options(method, progressive=progressive, closed_loop=closed_loop,
                                    distribution_aware=distribution_aware, error_feedback=error_feedback,
                                    retrieve=retrieve, save_freq=save_freq, merge_freq=merge_freq,
                                    disjoint_masks=disjoint_masks, stack_shards=stack_shards)
        _check_options(max_steps=max_steps, eval_batch_size=eval_batch_size, edit_batch_size=edit_batch_size,
                       save_freq=save_freq, merge_freq=merge_freq, max_length=max_length, n_prefixes=n_prefixes,
                       n_negatives=n_negatives, mask_ratio=mask_ratio, prompt_weight=prompt_weight,
                       recalibration_margin=recalibration_margin, merge_method=merge_method,
                       cluster_method=cluster_method, score_tokens=score_tokens)
        self.save_hyperparameters(ignore=["model", "tokenizer"] if not isinstance(model, str) else ["tokenizer"])
        check_device_map(device_map)
        if isinstance(model, str):
            model, tokenizer = load_model(model, dtype=dtype, device_map=device_map)
        elif tokenizer is None:
            raise ValueError("pass `tokenizer` when `model` is a loaded model object")
        elif device_map is not None and getattr(model, "hf_device_map", None) is None:
            model = dispatch(model, device_map)
        model.requires_grad_(False)
        self.model, self.tokenizer = model.eval(), tokenizer
        layers = decoder_layers(model)
        n_layers = len(layers)
        self.layer = round(0.85 * n_layers) if layer is None else layer
        if not -n_layers <= self.layer < n_layers:
            raise ValueError(f"model.layer={layer} is out of range for a model with {n_layers} layers "
                             f"(valid: 0..{n_layers - 1})")
        self.layer %= n_layers
        mlp = layers[self.layer].mlp
        if mlp.down_proj.weight.device.type == "meta":
            raise ValueError(f"layer {self.layer} was offloaded by device_map (its weights are not on a device); "
                             f"the edited layer must sit on a GPU: give the GPUs more max_memory or use more GPUs")
        # The layer that wraps down_proj: WISE's side memory, or a baseline with its interface.
        if method == "ft_l":
            self.memory = FineTunedLayer(mlp.down_proj, norm_constraint=ft_norm_constraint)
        elif method == "grace":
            self.memory = GraceCodebook(mlp.down_proj, eps=grace_eps)
        else:
            if disjoint_masks is None:  # with REPAIR's distribution-aware memory
                disjoint_masks = _component_on(method, distribution_aware)
            if score_tokens is None:  # WISE's mean for method wise; the last token for REPAIR
                score_tokens = "last" if method == "repair" else "mean"
            self.memory = SideMemory(mlp.down_proj, act_ratio=act_ratio, mask_ratio=mask_ratio,
                                     merge_method=merge_method, density=density, retrieve=retrieve,
                                     disjoint=disjoint_masks, stack=stack_shards, score_tokens=score_tokens,
                                     seed=seed)
        mlp.down_proj = self.memory
        if isinstance(self.memory, SideMemory):
            self.memory.new_mask()
        self.method = method
        self.edit_count = 0
        self.prefixes: list[str] | None = None
        self.trainer_kwargs: dict[str, Any] = {"accelerator": "auto", "devices": 1}
        self.edit_callbacks: list[L.Callback] = self._build_callbacks()
        self.intervention = 1.0
        self.edit_failed: str | None = None
        self.step_stats: dict[str, float] = {}
        self.shard_plan: list[list[EditRecord]] | None = None
        self.edit_start_weight: Tensor | None = None
        self.distill_teacher: tuple | None = None  # set by InBatchDistillation for one edit
        self._lower: tuple[tuple, dict] | None = None
        # Inputs of the edited layer per record of the current edit batch, so that error
        # feedback's re-edits skip the frozen layers below it (see edit_stream); capped in size.
        self._lower_cache: dict[int, tuple[Tensor, tuple[tuple, dict]]] | None = None
        self._lower_cache_bytes = 0
        self.lower_cache_mb = 512.0
        self._negatives: deque[list[int]] = deque(maxlen=n_negatives)
        self._retries: list[tuple[EditRecord, EditResult]] = []
        self._routing_floor: float | None = None  # min in-scope score before the current batch

    # ---- placement ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where inputs go: the device of the input embedding. With ``device_map`` the model
        spans several devices; the side memory sits on the edited layer's (``memory.side.device``)."""
        model = self.__dict__.get("_modules", {}).get("model")
        return super().device if model is None else module_device(model.get_input_embeddings())

    # ---- forward / inference -----------------------------------------------------------------
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                route_mask: Tensor | None = None) -> Tensor:
        """Logits of the edited model; routing looks at the tokens in ``route_mask``."""
        if route_mask is None:
            route_mask = attention_mask
        with self.memory.routing(route_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def logits_fn(self, edited: bool = True):
        """A :data:`repair_pl.evaluate.LogitsFn` for the edited (or, with False, unedited) model."""

        def run(input_ids: Tensor, attention_mask: Tensor, prompt_mask: Tensor) -> Tensor:
            previous = self.memory.mode
            self.memory.mode = "route" if edited else "off"
            try:
                return self(input_ids, attention_mask, prompt_mask)
            finally:
                self.memory.mode = previous

        return run

    @torch.no_grad()
    def generate(self, prompts: list[str], max_new_tokens: int = 20, edited: bool = True, **kwargs) -> list[str]:
        """Greedy generation with a KV cache; routing is decided once per sequence from its prompt."""
        self.tokenizer.padding_side = "left"
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True).to(self.device)
        self.tokenizer.padding_side = "right"
        self.memory.mode = "route" if edited else "off"
        try:
            with self.memory.routing(enc.attention_mask, sticky=True):
                out = self.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                          pad_token_id=self.tokenizer.pad_token_id, **kwargs)
        finally:
            self.memory.mode = "route"
        return self.tokenizer.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)

    # ---- preparing an edit -------------------------------------------------------------------
    @torch.no_grad()
    def context_prefixes(self) -> list[str]:
        """WISE's random context prefixes, generated once by the frozen model (seeded)."""
        if self.prefixes is None:
            n = self.hparams.n_prefixes
            starts = ["The", "Therefore", "Because", "I", "You"]
            prefixes = []
            gen_state = torch.random.get_rng_state()
            torch.manual_seed(self.hparams.seed)
            self.memory.mode = "off"
            for i in range(n):
                enc = self.tokenizer([starts[i % len(starts)]], return_tensors="pt").to(self.device)
                out = self.model.generate(**enc, max_new_tokens=self.hparams.prefix_tokens, do_sample=True,
                                          top_k=5, pad_token_id=self.tokenizer.pad_token_id)
                text = self.tokenizer.decode(out[0], skip_special_tokens=True).replace("\n", " ").strip()
                prefixes.append(text + ". ")
            self.memory.mode = "route"
            torch.random.set_rng_state(gen_state)
            self.prefixes = prefixes
        return self.prefixes

    def prepare_edit(self, record: EditRecord, device: torch.device | None = None) -> dict[str, Tensor | int]:
        """Tensors of one edit: the prompt (bare and behind each prefix) + target as edit rows,
        then the out-of-scope rows: the record's routing prompt and up to ``n_negatives``
        routing prompts of earlier edits. The baselines train on the bare prompt alone (as their
        reference code does): one edit row. With ``device``, the tensors are moved there (once
        per edit, not per step)."""
        batch = self._edit_tensors(record)
        if device is None:
            return batch
        return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}

    def _edit_tensors(self, record: EditRecord) -> dict[str, Tensor | int]:
        if self.method in BASELINES:
            edit = encode_pairs(self.tokenizer, [record.prompt], [record.target], self.hparams.max_length)
            return _with_loss_indices({"input_ids": edit.input_ids, "attention_mask": edit.attention_mask,
                                       "route_mask": edit.prompt_mask, "answer_mask": edit.answer_mask,
                                       "is_edit": torch.ones(1, dtype=torch.bool)})
        prompts = [record.prompt] + [p + record.prompt for p in self.context_prefixes()]
        edit = encode_pairs(self.tokenizer, prompts, [record.target] * len(prompts), self.hparams.max_length)
        out_text = record.routing_prompt or "nq question: who wrote the novel moby dick Herman Melville"
        out_rows = [self.tokenizer([out_text]).input_ids[0][: self.hparams.max_length or None]]
        out_rows += list(self._negatives)
        if self.hparams.n_negatives:
            self._negatives.appendleft(out_rows[0])
        n_edit = edit.input_ids.shape[0]
        rows, width = n_edit + len(out_rows), max(edit.input_ids.shape[1], *map(len, out_rows))

        def pad(t: Tensor, value) -> Tensor:
            full = torch.full((rows, width), value, dtype=t.dtype)
            full[: t.shape[0], : t.shape[1]] = t
            return full

        input_ids = pad(edit.input_ids, self.tokenizer.pad_token_id)
        attention_mask = pad(edit.attention_mask, 0)
        route_mask, answer_mask = pad(edit.prompt_mask, False), pad(edit.answer_mask, False)
        for i, ids in enumerate(out_rows, start=n_edit):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention_mask[i, : len(ids)] = 1
            route_mask[i, : len(ids)] = True
        is_edit = torch.arange(rows) < n_edit
        return _with_loss_indices({"input_ids": input_ids, "attention_mask": attention_mask, "route_mask": route_mask,
                                   "answer_mask": answer_mask, "is_edit": is_edit})

    # ---- the edit step ------------------------------------------------------------------------
    @torch.no_grad()
    def lower_states(self, batch: dict[str, Tensor]) -> tuple[tuple, dict]:
        """Inputs of the edited layer for ``batch``: the frozen layers below it do not change
        during an edit, so they run once per edit and every step starts from here."""
        captured: dict = {}

        def grab(module, args, kwargs):
            captured["args"], captured["kwargs"] = args, kwargs
            raise _StopForward

        layers = decoder_layers(self.model)
        handle = layers[self.layer].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            self.model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()
        return captured["args"], captured["kwargs"]

    def upper_forward(self, lower: tuple[tuple, dict], positions: Tensor, rows: int | None = None) -> Tensor:
        """Run the edited layer and those above it from cached inputs; return logits at
        ``positions`` only (flat indices into the (B, T) positions, see :func:`_flat_indices`),
        since the loss needs no other. With ``rows``, only the first ``rows`` sequences go on
        above the edited layer: the out-of-scope rows after them count only through their
        scores in it, so running them higher would be wasted work."""
        args, kwargs = lower
        hidden = args[0]
        first, *above = decoder_layers(self.model)[self.layer:]
        out = first(hidden, *args[1:], **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
        if rows is not None and rows < hidden.shape[0]:
            args, kwargs = _first_rows((args, kwargs), hidden.shape[0], rows)
            hidden = hidden[:rows]
        for layer in above:
            out = layer(hidden, *args[1:], **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        hidden = hidden.flatten(0, 1).index_select(0, positions.to(hidden.device))
        return self.model.lm_head(self.model.model.norm(hidden))

    def edit_losses(self, batch: dict[str, Tensor], lower: tuple[tuple, dict] | None = None) -> dict[str, Tensor]:
        """Target cross-entropy on the edit rows + margin routing loss (edit rows vs last row).
        ``batch`` comes from :meth:`prepare_edit`; its index tensors let a step run without
        waiting on the GPU (no boolean indexing, no reading values back)."""
        if lower is None:
            lower = self.lower_states(batch)
        with self.memory.routing(batch["route_mask"]):  # edit rows come first (prepare_edit)
            logits = self.upper_forward(lower, batch["positions"], rows=len(batch["edit_rows"]))
        # With a device_map, logits come from the last GPU and scores from the edited layer's.
        labels = batch["labels"].to(logits.device)
        if self.method in BASELINES:
            return self._baseline_losses(logits, labels)
        scores = self.memory.last_scores
        hp, n_first = self.hparams, batch["n_first"]  # the bare prompt's answer positions come first
        edit_rows, other_rows = batch["edit_rows"].to(scores.device), batch["other_rows"].to(scores.device)
        token_ce = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none")
        if hp.prompt_weight is None or n_first == len(labels):
            edit_loss = token_ce.mean()
        else:
            edit_loss = hp.prompt_weight * token_ce[:n_first].mean() + (1 - hp.prompt_weight) * token_ce[n_first:].mean()
        routing = margin_routing_loss(scores[edit_rows], scores[other_rows], hp.alpha, hp.beta, hp.gamma)
        routing = routing.to(edit_loss.device)
        correct = (logits[:n_first].argmax(-1) == labels[:n_first]).all().float()
        loss, distill = edit_loss + hp.routing_weight * routing, edit_loss.new_zeros(())
        if self.distill_teacher is not None:
            t_lower, t_positions, t_logits, weight, temperature = self.distill_teacher
            with self.memory.routing(None):
                distill = distillation_loss(self.upper_forward(t_lower, t_positions), t_logits, temperature)
            loss = loss + weight * distill
        return {"loss": loss, "edit_loss": edit_loss, "routing_loss": routing, "distill_loss": distill.detach(),
                "in_scope": scores[0].detach(), "out_scope": scores[other_rows].max().detach(),
                "target_correct": correct}

    @torch.no_grad()
    def answer_logits(self, record: EditRecord) -> tuple[tuple, Tensor, Tensor]:
        """``(lower states, answer positions, logits there)`` of ``prompt + target`` through the
        side memory as it trains (mode "edit"): the teacher of in-batch distillation."""
        enc = encode_pairs(self.tokenizer, [record.prompt], [record.target], self.hparams.max_length)
        positions = _flat_indices(_predicting(enc.answer_mask))  # on the CPU, once per record
        enc = enc.to(self.device)
        lower = self.lower_states({"input_ids": enc.input_ids, "attention_mask": enc.attention_mask})
        previous = self.memory.mode
        self.memory.mode = "edit"
        try:
            with self.memory.routing(None):
                logits = self.upper_forward(lower, positions)
        finally:
            self.memory.mode = previous
        return lower, positions, logits

    def _baseline_losses(self, logits: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """FT-L and GRACE: cross-entropy on the target tokens only (no routing loss)."""
        edit_loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        zero = edit_loss.new_zeros(()).detach()
        correct = (logits.argmax(-1) == labels).all().float()
        return {"loss": edit_loss, "edit_loss": edit_loss, "routing_loss": zero, "in_scope": zero, "out_scope": zero,
                "target_correct": correct}

    # ---- Lightning hooks ---------------------------------------------------------------------
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        if self._lower is None:
            self._lower = self.lower_states(batch)
        out = self.edit_losses(batch, self._lower)
        # Share the step's numbers with callbacks (they decide decay, stopping and rollback).
        self.step_stats = StepStats({k: out[k] for k in STEP_STATS})
        if self.trainer.loggers:  # self.log costs ~5 ms a step; the per-edit fits have no logger
            self.log_dict({f"edit/{k}": v for k, v in self.step_stats.items()}, on_step=True, prog_bar=False,
                          logger=True)
        return out["loss"]

    def on_after_backward(self) -> None:
        # only the current shard's entries may change
        if isinstance(self.memory, SideMemory) and self.memory.side.grad is not None:
            self.memory.side.grad.mul_(self.memory.mask)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if isinstance(self.memory, FineTunedLayer):
            self.memory.constrain()
            if self.hparams.ft_stop_loss is not None and self.step_stats["edit_loss"] < self.hparams.ft_stop_loss:
                self.trainer.should_stop = True
        elif isinstance(self.memory, GraceCodebook):
            stop, last = self.hparams.grace_stop_loss, self.step_stats
            if stop is not None and last["target_correct"] == 1.0 and last["edit_loss"] < stop:
                self.trainer.should_stop = True
        elif self.hparams.norm_constraint is not None and self.edit_start_weight is not None:
            c = self.hparams.norm_constraint
            with torch.no_grad():
                self.memory.side.copy_(torch.clamp(self.memory.side, self.edit_start_weight - c, self.edit_start_weight + c))

    def configure_optimizers(self):
        hp = self.hparams
        if self.method == "ft_l":  # EasyEdit's FT-L optimiser
            optimizer, lr = torch.optim.Adam([self.memory.weight], lr=hp.ft_lr), hp.ft_lr
        elif self.method == "grace":
            optimizer, lr = torch.optim.SGD([self.memory.value], lr=hp.grace_lr), hp.grace_lr
        else:
            optimizer, lr = torch.optim.SGD([self.memory.side], lr=hp.lr), hp.lr
        optimizer.param_groups[0]["base_lr"] = lr  # callbacks scale from here
        return optimizer

    def apply_lr(self, trainer) -> None:
        """Set the learning rate to ``base_lr x intervention`` (callbacks change either factor)."""
        for group in trainer.optimizers[0].param_groups:
            group["lr"] = group["base_lr"] * self.intervention

    def fail_edit(self, reason: str) -> None:
        """Undo the edit in progress: the side memory returns bit-identical to before it."""
        with torch.no_grad():
            self.memory.side.copy_(self.edit_start_weight)
        self.edit_failed = reason

    def _build_callbacks(self) -> list[L.Callback]:
        """REPAIR's components from the flags (``None`` = on for ``repair``, off otherwise)."""
        from repair_pl.callbacks import (ClosedLoopFeedback, DistributionAwareMemory, ErrorFeedback,
                                         InBatchDistillation, MemoryMerging, ProgressiveIntervention)

        hp = self.hparams

        def on(flag):
            return _component_on(self.method, flag)

        callbacks: list[L.Callback] = []
        if on(hp.closed_loop):
            callbacks.append(ClosedLoopFeedback(window=hp.stagnation_window, max_lr_factor=hp.max_lr_factor,
                                                fail_unconverged=hp.undo_unreached,
                                                divergence_factor=hp.divergence_factor,
                                                max_rollbacks=hp.max_rollbacks))
        if on(hp.progressive):  # after closed loop: it applies the final lr of the step
            callbacks.append(ProgressiveIntervention(hp.decay_factor, hp.threshold, hp.min_intervention,
                                                     stop_loss=hp.stop_loss, routing_tolerance=hp.routing_tolerance,
                                                     plateau_window=hp.plateau_window))
        if on(hp.distribution_aware):
            callbacks.append(DistributionAwareMemory(hp.cluster_size, method=hp.cluster_method,
                                                     heterogeneous=hp.heterogeneous, seed=hp.seed))
            callbacks.append(MemoryMerging(loss_aware=hp.loss_aware_merge))
        if hp.distillation:  # after the shard plan exists, before error feedback's re-edits
            callbacks.append(InBatchDistillation(hp.distill_weight, hp.distill_temperature))
        if on(hp.error_feedback):  # after merging: re-checks the merged memory
            callbacks.append(ErrorFeedback(tau_prune=hp.tau_prune, max_retries=hp.max_retries))
        return callbacks

    def _reedits_possible(self) -> bool:
        from repair_pl.callbacks import ErrorFeedback

        return any(isinstance(cb, ErrorFeedback) for cb in self.edit_callbacks)

    def _stream_callbacks(self):
        from repair_pl.callbacks import EditStreamCallback

        return [cb for cb in self.edit_callbacks if isinstance(cb, EditStreamCallback)]

    def intervention_counts(self) -> dict[str, int]:
        """Counts of every intervention the callbacks made in this run."""
        counts: dict[str, int] = {}
        for cb in self.edit_callbacks:
            for key, value in getattr(cb, "counts", {}).items():
                counts[key] = counts.get(key, 0) + value
        return counts

    # ---- editing -----------------------------------------------------------------------------
    def _edit_trainer(self) -> L.Trainer:
        """A fresh lightweight Trainer per edit: calling ``fit`` twice on one Trainer with
        ``max_steps`` does not train again (Lightning issue 11425). It runs where the module is
        placed and moves nothing (:class:`~repair_pl.placement.PlacedStrategy`)."""
        kwargs = {k: v for k, v in self.trainer_kwargs.items() if k not in ("accelerator", "devices", "strategy")}
        return L.Trainer(max_steps=self.hparams.max_steps, max_epochs=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, callbacks=list(self.edit_callbacks),
                         accelerator=accelerator_for(self.device), devices=1, strategy=PlacedStrategy(self.device),
                         **kwargs)

    def edit(self, record: EditRecord, retry: bool = False) -> EditResult:
        """Apply one edit: a short ``fit`` on the side memory, then update routing and shards.
        A failed edit (see :class:`~repair_pl.callbacks.ClosedLoopFeedback`) leaves the side
        memory exactly as before it."""
        start = time.perf_counter()
        if self.method == "none":
            return EditResult(0, 0.0, 0.0, 0.0, 0.0, 0.0, success=False)
        streams = self._stream_callbacks()
        for cb in streams:
            cb.on_edit_start(self, record)
        batch = self.prepare_edit(record, self.device)
        side_memory = isinstance(self.memory, SideMemory)
        self.edit_start_weight = self.memory.side.detach().clone() if side_memory else None
        self._lower = self._cached_lower(record, batch)  # None: the first step computes it
        self.edit_failed, self.intervention, self.step_stats = None, 1.0, {}
        if self.method == "grace":
            self._add_grace_key(record, batch)
        self.memory.mode = "edit"
        self.memory.invalidate()
        with _quiet_lightning():
            trainer = self._edit_trainer()
            trainer.fit(self, DataLoader(_Repeat(batch, self.hparams.max_steps), batch_size=None))
        steps = trainer.global_step
        self.eval()
        if self.method == "grace":
            self.memory.end_edit()
        self.memory.mode = "route"
        self.memory.invalidate()
        success = self.edit_failed is None
        if self._lower is not None:
            self._cache_lower(record, batch)
        score = self.trained_score(batch, self._lower) if success and side_memory else float("nan")
        if success and side_memory:
            self.memory.record_in_scope(score)
            self.memory.note_edit_loss(self.step_stats.get("edit_loss", 0.0))
        self.edit_start_weight, self._lower = None, None
        last = self.step_stats
        result = EditResult(steps, last.get("loss", float("nan")), last.get("edit_loss", float("nan")),
                            last.get("routing_loss", float("nan")), time.perf_counter() - start, score, success,
                            retry, lr=trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan"),
                            intervention=self.intervention,
                            target_reached=success and last.get("target_correct") == 1.0)
        if not retry:
            self.edit_count += 1
            self._after_edit()
        for cb in streams:
            cb.on_edit_end(self, record, result)
        return result

    @torch.no_grad()
    def _add_grace_key(self, record: EditRecord, batch: dict[str, Tensor]) -> None:
        """GRACE: the key is the down projection's input at the prompt's last token (read from
        the unedited model); its value starts as the frozen output there."""
        self.memory.mode = "off"
        self(batch["input_ids"], batch["attention_mask"], batch["route_mask"])
        self.memory.add_edit(self.memory.last_queries[0], record.target, self.memory.last_outputs[0])

    def _cached_lower(self, record: EditRecord, batch: dict[str, Tensor]) -> tuple[tuple, dict] | None:
        """The edited layer's inputs for ``batch`` when this record was edited earlier in the
        batch with the same tokens (a re-edit), else ``None`` (the first step computes them)."""
        hit = (self._lower_cache or {}).get(id(record))
        if hit is None or not torch.equal(hit[0], batch["input_ids"]):
            return None
        return hit[1]

    def _cache_lower(self, record: EditRecord, batch: dict[str, Tensor]) -> None:
        if self._lower_cache is None or id(record) in self._lower_cache:
            return
        size = sum(t.numel() * t.element_size() for t in _tensors(self._lower))
        if self._lower_cache_bytes + size <= self.lower_cache_mb * 2**20:
            self._lower_cache[id(record)] = (batch["input_ids"], self._lower)
            self._lower_cache_bytes += size

    def reedit(self, record: EditRecord) -> EditResult:
        """Edit a record again (error feedback); it does not count as a new edit."""
        result = self.edit(record, retry=True)
        self._retries.append((record, result))
        return result

    def _after_edit(self) -> None:
        hp = self.hparams
        if hp.save_freq and self.edit_count % hp.save_freq == 0:
            self.memory.save_shard()
        if hp.merge_freq and self.edit_count % hp.merge_freq == 0:
            self.memory.merge_shards()

    @torch.no_grad()
    def in_scope_score(self, record: EditRecord) -> float:
        """Activation score of the bare edit prompt through the current side memory."""
        return self.in_scope_scores([record])[0]

    @torch.no_grad()
    def in_scope_scores(self, records: list[EditRecord]) -> list[float]:
        """Activation scores of the bare edit prompts through the current side memory (mode
        "edit": ``W'`` itself, not the routed choice), ``eval_batch_size`` prompts per forward."""
        out, previous = [], self.memory.mode
        self.memory.mode = "edit"
        try:
            for enc in self.encoded_records(records):
                self(enc.input_ids, enc.attention_mask, enc.prompt_mask)
                out += self.memory.last_scores.tolist()
        finally:
            self.memory.mode = previous
        return out

    def encoded_records(self, records: list[EditRecord]):
        """``prompt + target`` of ``records``, ``eval_batch_size`` at a time, on the module's device."""
        size = self.hparams.eval_batch_size
        for start in range(0, len(records), size):
            chunk = records[start: start + size]
            yield encode_pairs(self.tokenizer, [r.prompt for r in chunk], [r.target for r in chunk],
                               self.hparams.max_length).to(self.device)

    @torch.no_grad()
    def trained_score(self, batch: dict[str, Tensor], lower: tuple[tuple, dict] | None = None) -> float:
        """:meth:`in_scope_score` of the edit ``batch`` was prepared from (its first row is the
        bare prompt + target, routed on the prompt), from the edited layer's inputs ``lower``: the
        score is taken inside that layer, so no other layer runs."""
        args, kwargs = self.lower_states(batch) if lower is None else lower
        previous = self.memory.mode
        self.memory.mode = "edit"
        try:
            with self.memory.routing(batch["route_mask"]):
                decoder_layers(self.model)[self.layer](*args, **kwargs)
        finally:
            self.memory.mode = previous
        return float(self.memory.last_scores[0])

    @torch.no_grad()
    def recalibrate_routing(self, records: list[EditRecord]) -> None:
        """Re-measure the routing threshold after a merge (REPAIR; ours). Merging moves every
        score, so the threshold is set to ``recalibration_margin`` x the weakest of ``records``
        (the batch's successful edits) on the merged memory: every one of them routes, with some
        room for their rephrasings. It never rises above the threshold from before the batch
        (earlier batches' edits are not re-measured)."""
        if not isinstance(self.memory, SideMemory) or self.memory.retrieve or not records:
            return
        weakest = min(self.in_scope_scores(records))
        # epsilon = act_ratio x min_in_scope, so this puts epsilon at margin x the weakest score
        measured = self.hparams.recalibration_margin * weakest / self.memory.act_ratio
        floor = self._routing_floor
        self.memory.min_in_scope = measured if floor is None else min(floor, measured)
        self.memory.invalidate()

    def edit_stream(self, records: list[EditRecord], progress: bool = True):
        """Edit ``records`` one after another (they accumulate); yields ``(record, EditResult)``
        per edit, and again for every re-edit by error feedback (``result.retry`` is True).

        The stream is taken in batches of ``edit_batch_size``; REPAIR's callbacks may reorder a
        batch (clustering) and merge and re-check between batches."""
        streams = self._stream_callbacks()
        size = self.hparams.edit_batch_size or len(records)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(records), desc="editing", unit="edit", dynamic_ncols=True)
        done = reached = 0
        for start in range(0, len(records), size):
            batch = list(records[start: start + size])
            self.shard_plan, self._retries = None, []
            # only error feedback edits a record twice: without it nothing is worth keeping
            self._lower_cache, self._lower_cache_bytes = ({} if self._reedits_possible() else None), 0
            self._routing_floor = getattr(self.memory, "min_in_scope", None)  # see recalibrate_routing
            for cb in streams:
                batch = cb.on_edit_batch_start(self, batch)
            results = []
            for record in batch:
                result = self.edit(record)
                results.append(result)
                if bar is not None:  # one bar over the stream; rel: share of edits whose target was reached
                    done, reached = done + 1, reached + result.target_reached
                    bar.set_postfix({"rel": f"{reached / done:.2f}", "loss": f"{result.edit_loss:.3f}",
                                     "steps": result.steps}, refresh=False)
                    bar.update(1)
                yield record, result
            for cb in streams:
                cb.on_edit_batch_end(self, batch, results)
            self._lower_cache = None
            yield from self._retries
        if bar is not None:
            bar.close()

    def unwrap_model(self) -> None:
        """Put the frozen down projection back into the model (the module is spent), so the
        same loaded model can be wrapped by another ``RepairModule``."""
        decoder_layers(self.model)[self.layer].mlp.down_proj = self.memory.main

    def reset_edits(self) -> None:
        """Forget every edit: the side memory becomes a fresh copy of the main weight."""
        if self.method in BASELINES:
            self.memory.reset()
            self.edit_count = 0
            return
        memory = self.memory
        weight = memory.main.weight.detach().float()
        with torch.no_grad():
            memory.side.copy_(weight)
        memory.merged, memory.shards, memory.memories, memory.memory_scales = weight.clone(), [], [], []
        memory.min_in_scope = memory.period_min = None
        memory.shard_losses, memory.current_losses = [], []
        memory.invalidate()
        self._negatives.clear()
        # Reseed: every reset starts from the same state, so lifelong chunks are independent
        # and may run on different processes (repair_pl.distributed) with the same results.
        memory._generator.manual_seed(self.hparams.seed)
        memory.release_masks()
        memory.new_mask()
        self.edit_count = 0

    # ---- saving and loading ------------------------------------------------------------------
    def edited_state(self) -> tuple[dict[str, Tensor], dict]:
        """Tensors and metadata that fully describe the edits (nothing of the frozen model)."""
        m = self.memory
        if self.method in BASELINES:
            tensors, extra = m.state()
            meta = {"format": 1, "layer": self.layer, "n_layers": len(decoder_layers(self.model)),
                    "weight_shape": list(m.main.weight.shape), "edit_count": self.edit_count, "method": self.method,
                    **extra}
            return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, meta
        tensors = {"side": m.side.detach(), "merged": m.merged, "mask": m.mask.to(torch.uint8),
                   "used": m.used.to(torch.uint8)}
        tensors.update({f"shard.{i}": s for i, s in enumerate(m.shards)})
        tensors.update({f"memory.{i}": s for i, s in enumerate(m.memories)})
        meta = {"format": 1, "layer": self.layer, "n_layers": len(decoder_layers(self.model)),
                "weight_shape": list(m.side.shape), "edit_count": self.edit_count,
                "min_in_scope": m.min_in_scope, "period_min": m.period_min, "memory_scales": m.memory_scales,
                "act_ratio": m.act_ratio, "score_tokens": m.score_tokens, "shard_ratio": m.shard_ratio,
                "n_shards": len(m.shards),
                "n_memories": len(m.memories), "prefixes": self.prefixes, "method": self.method,
                "generator_state": m._generator.get_state().tolist(),
                "shard_losses": m.shard_losses, "current_losses": m.current_losses,
                "negatives": [list(ids) for ids in self._negatives]}
        return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, meta

    def save_edits(self, path: str | Path) -> Path:
        """Write the edited state to ``path/`` as ``edits.safetensors`` + ``edits.json`` (atomically)."""
        from repair_pl.checkpoint import write_state

        tensors, meta = self.edited_state()
        return write_state(Path(path), tensors, meta)

    def load_edits(self, path: str | Path) -> None:
        """Load an edited state written by :meth:`save_edits`; a state made for a different base
        model (other layer count or weight shape) is refused with a clear error."""
        from repair_pl.checkpoint import read_state

        tensors, meta = read_state(Path(path))
        n_layers = len(decoder_layers(self.model))
        shape = tuple(self.memory.main.weight.shape)
        if meta["n_layers"] != n_layers or tuple(meta["weight_shape"]) != shape:
            raise ValueError(f"{path}: edits were made on a model with {meta['n_layers']} layers and a "
                             f"{tuple(meta['weight_shape'])} down projection; this model has {n_layers} layers "
                             f"and {shape}")
        if meta["layer"] != self.layer:
            raise ValueError(f"{path}: edits are for layer {meta['layer']} but this module edits layer {self.layer}")
        saved = meta.get("method", "wise")
        if (saved in BASELINES or self.method in BASELINES) and saved != self.method:
            raise ValueError(f"{path}: edits were made with method {saved!r}; this module runs {self.method!r}")
        tokens = meta.get("score_tokens", "mean")  # states saved before the option scored the mean
        if saved not in BASELINES and tokens != self.memory.score_tokens:
            raise ValueError(f"{path}: edits were routed with score_tokens={tokens!r} (their thresholds are on "
                             f"that scale); this module has score_tokens={self.memory.score_tokens!r}: "
                             f"set model.score_tokens")
        self.restore_edits(tensors, meta)

    def restore_edits(self, tensors: dict[str, Tensor], meta: dict) -> None:
        """Put back an edited state from :meth:`edited_state` (unchecked: :meth:`load_edits` checks
        that a saved state fits this model). Keep a copy (``clone``/``deepcopy``) when the state
        is a snapshot to return to: ``edited_state`` shares storage with the live memory."""
        if self.method in BASELINES:
            self.memory.load_state(tensors, meta)
            self.edit_count = meta["edit_count"]
            return
        m, device = self.memory, self.memory.side.device
        with torch.no_grad():
            m.side.copy_(tensors["side"])
        m.merged, m.mask = tensors["merged"].to(device), tensors["mask"].bool().to(device)
        m.used = tensors["used"].bool().to(device) if "used" in tensors else torch.zeros_like(m.mask)
        m.shard_ratio = meta.get("shard_ratio", m.mask_ratio)
        m.shards = [tensors[f"shard.{i}"].to(device) for i in range(meta["n_shards"])]
        m.memories = [tensors[f"memory.{i}"].to(device) for i in range(meta["n_memories"])]
        m.min_in_scope, self.edit_count, self.prefixes = meta["min_in_scope"], meta["edit_count"], meta["prefixes"]
        m.period_min, m.memory_scales = meta["period_min"], list(meta["memory_scales"])
        m._generator.set_state(torch.tensor(meta["generator_state"], dtype=torch.uint8))
        m.shard_losses, m.current_losses = list(meta.get("shard_losses", [])), list(meta.get("current_losses", []))
        self._negatives.clear()
        self._negatives.extend(meta.get("negatives", []))
        m.invalidate()


def _component_on(method: str, flag: bool | None) -> bool:
    """Whether a REPAIR component is on: ``None`` means on for ``repair``, off otherwise."""
    return method == "repair" if flag is None else bool(flag)


def _check_baseline_options(method: str, **options) -> None:
    """The baselines have no side memory: WISE/REPAIR options that need one are an error."""
    for key, value in options.items():
        if value:
            raise ValueError(f"model.{key}={value!r} is a WISE/REPAIR option; method {method!r} is a baseline "
                             f"without side memory (drop it, or use method wise or repair)")


def _check_options(**options) -> None:
    """Start-up checks of options that would otherwise fail deep inside a run; errors name the key."""
    from repair_pl.merge import MERGERS

    for key, value in options.items():
        optional = key in ("edit_batch_size", "save_freq", "merge_freq", "max_length")
        if key in ("n_prefixes", "n_negatives"):
            bad = not isinstance(value, int) or value < 0
        elif key == "mask_ratio":
            bad = not 0 < value <= 1
        elif key == "prompt_weight":
            bad = value is not None and not 0 <= value <= 1
        elif key == "recalibration_margin":
            bad = not 0 < value <= 1
        elif key == "merge_method":
            bad = value not in MERGERS
        elif key == "cluster_method":
            bad = value not in ("kmeans", "agglomerative")
        elif key == "score_tokens":
            bad = value is not None and value not in SCORE_TOKENS
        else:
            bad = not (optional and value is None) and (not isinstance(value, int) or value < 1)
        if bad:
            expected = {"n_prefixes": "an integer >= 0", "n_negatives": "an integer >= 0", "mask_ratio": "in (0, 1]",
                        "prompt_weight": "in [0, 1] or null", "recalibration_margin": "in (0, 1]",
                        "merge_method": f"one of {sorted(MERGERS)}", "cluster_method": "'kmeans' or 'agglomerative'",
                        "score_tokens": "'mean', 'last' or null"}
            want = expected.get(key, "a positive integer" + (" or null" if optional else ""))
            raise ValueError(f"model.{key} must be {want}, got {value!r}")


def _predicting(answer_mask: Tensor) -> Tensor:
    """Positions whose logits predict an answer token (``logits[:, t]`` predicts token t+1)."""
    predicting = torch.zeros_like(answer_mask, dtype=torch.bool)
    predicting[:, :-1] = answer_mask[:, 1:].bool()
    return predicting


def _tensors(obj):
    """The tensors inside nested tuples, lists and dicts (a layer's cached inputs)."""
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, Mapping):
        for item in obj.values():
            yield from _tensors(item)


def _first_rows(obj, batch_size: int, rows: int):
    """``obj`` (a layer's cached inputs: nested tuples, lists and dicts) with every tensor
    whose first dimension is the batch cut to its first ``rows`` sequences; shared tensors
    (position embeddings of shape (1, T, d), flags) are kept as they are."""
    if isinstance(obj, Tensor):
        return obj[:rows] if obj.dim() and obj.shape[0] == batch_size else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_first_rows(item, batch_size, rows) for item in obj)
    if isinstance(obj, Mapping):
        return {k: _first_rows(v, batch_size, rows) for k, v in obj.items()}
    return obj


def _flat_indices(mask: Tensor) -> Tensor:
    """Indices of the True entries of ``mask`` flattened (row-major): selecting with them gives
    what ``x[mask]`` gives, without the device sync of boolean indexing."""
    return mask.flatten().nonzero().squeeze(1)


def _with_loss_indices(batch: dict[str, Tensor]) -> dict[str, Tensor | int]:
    """Add what :meth:`RepairModule.edit_losses` selects with, computed once on the CPU:
    ``positions`` (flat indices of the positions that predict an answer token), their
    ``labels``, ``n_first`` (how many belong to the first row, the bare prompt) and the
    ``edit_rows`` / ``other_rows`` indices."""
    predicting = _predicting(batch["answer_mask"])
    is_edit = batch["is_edit"]
    return {**batch, "positions": _flat_indices(predicting),
            "labels": batch["input_ids"][:, 1:][predicting[:, :-1]], "n_first": int(predicting[0].sum()),
            "edit_rows": _flat_indices(is_edit), "other_rows": _flat_indices(~is_edit)}


STEP_STATS = ("loss", "edit_loss", "routing_loss", "in_scope", "out_scope", "target_correct")


class StepStats(Mapping):
    """A training step's scalars for the callbacks. They stay on the device until one is read,
    then all come back in one transfer: a step with no reader (WISE) never waits on the GPU."""

    def __init__(self, values: dict[str, Tensor]):
        first = next(iter(values.values()))
        self._keys = list(values)
        self._stacked = torch.stack([v.detach().float().to(first.device) for v in values.values()])
        self._floats: dict[str, float] | None = None

    def _read(self) -> dict[str, float]:
        if self._floats is None:
            self._floats = dict(zip(self._keys, self._stacked.tolist()))
        return self._floats

    def __getitem__(self, key: str) -> float:
        return self._read()[key]

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the edited layer's inputs are captured."""


class _quiet_lightning:
    """Silence Lightning's per-fit info lines (GPU available, ...) during the many short fits,
    and two warnings every fit repeats: the frozen model is in eval mode on purpose, and the
    pytree deprecation is Lightning's own, about torch's API."""

    def __enter__(self):
        import logging
        import warnings

        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode")
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
        warnings.filterwarnings("ignore", message=r".*does not have many workers")  # one cached batch

        self._loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric",
                                                         "lightning.pytorch.utilities.rank_zero")]
        self._levels = [lg.level for lg in self._loggers]
        for lg in self._loggers:
            lg.setLevel(logging.WARNING)

    def __exit__(self, *exc):
        for lg, level in zip(self._loggers, self._levels):
            lg.setLevel(level)
        self._warnings.__exit__(*exc)
