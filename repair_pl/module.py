"""``RepairModule``: the frozen LLM plus a trainable memory at one layer; each edit is one short ``fit``."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from repair_pl.components import RepairComponents
from repair_pl.data.records import EditRecord
from repair_pl.evaluate import encode_pairs
from repair_pl.generation import user_message, user_turn_markers
from repair_pl.host_memory import trim_heap
from repair_pl.losses import distillation_loss
from repair_pl.memory import EditableLayer, FineTunedLayer, GraceCodebook, SideMemory, class_config
from repair_pl.memory.batch import flat_indices, predicting
from repair_pl.models import decoder_layers, load_model
from repair_pl.placement import PlacedStrategy, accelerator_for, check_device_map, dispatch, module_device
from repair_pl.presets import check_method, default_components, default_memory

STATE_FORMAT = 2
"""Version of the saved edit state (``edits.json``); format 1 states are read too."""


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
    """Lifelong editor: a frozen causal LM whose MLP down projection at layer ``layer`` is
    replaced by ``memory`` (an :class:`~repair_pl.memory.EditableLayer`); ``edit(record)`` runs
    one short ``Trainer.fit`` that trains the memory alone.

    Args:
        model: ``"smollm2"`` (embedded default), a local HF folder, a ``.gguf`` file, a hub id,
            or an already loaded ``PreTrainedModel`` (then pass ``tokenizer`` too).
        tokenizer: the tokenizer when ``model`` is an object.
        memory: the layer that holds the edits: :class:`~repair_pl.memory.SideMemory` (WISE,
            REPAIR), :class:`~repair_pl.memory.FineTunedLayer` (FT-L, FT-M) or
            :class:`~repair_pl.memory.GraceCodebook` (GRACE); ``None``: the preset's.
        components: REPAIR's components (:class:`~repair_pl.components.RepairComponents`);
            ``None``: the preset's (REPAIR's for ``method="repair"``, none otherwise).
        method: a preset naming the parts (:data:`repair_pl.presets.METHODS`): ``repair``
            (default), ``wise``, ``ft_l``, ``ft_m``, ``grace``, or ``none`` (no editing: the
            unedited model is evaluated). Parts given explicitly must be the method's kind
            (e.g. ``components`` only with ``repair``); ``None``: named after the parts.
        layer: index of the edited decoder layer; default ``round(0.85 * n_layers)``.
        max_steps: optimisation steps per edit (the budget).
        dtype: dtype of the frozen model (the memory is always fp32).
        device_map: spread the frozen model over several devices with accelerate (``"auto"``,
            or ``{module name: device}``); the memory lives on the edited layer's device and
            inputs go to the embedding's. ``None``: the module sits on one device (``.to()``).
        eval_batch_size: batch size of evaluation.
        max_length: longest sequence in tokens (prompts are cut from the left past it).
        seed: seeds masks, prefixes and generated out-of-scope texts.
    """

    def __init__(self, model: Any = "smollm2", tokenizer: Any = None, memory: EditableLayer | None = None,
                 components: RepairComponents | None = None, method: str | None = None, layer: int | None = None,
                 max_steps: int = 70, dtype: str = "float32", device_map: str | dict[str, int | str] | None = None,
                 eval_batch_size: int = 16, max_length: int | None = 256, seed: int = 0):
        super().__init__()
        method = _method_of(memory, components) if method is None else method
        check_method(method)
        if memory is None:
            memory = default_memory(method)
        if components is None:
            components = default_components(method)
        _check_parts(method, memory, components)
        _check_options(max_steps=max_steps, eval_batch_size=eval_batch_size, max_length=max_length)
        ignore = ["tokenizer", "memory", "components"] + ([] if isinstance(model, str) else ["model"])
        self.save_hyperparameters(ignore=ignore)
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
        self.method = method
        self.memory = memory
        # a copy: the run's state lives in the components, and a default instance may be shared
        self.components = copy.deepcopy(components)
        self.edit_callbacks: list[L.Callback] = self.components.callbacks() if self.components else []
        if memory is not None:
            memory.attach(mlp.down_proj, seed)
            mlp.down_proj = memory
        for component in self.edit_callbacks:
            component.bind(self)
        if memory is not None:
            memory.reset(seed)
        # what really runs, for the saved config, the run's fingerprint and the loggers
        self.hparams.update(method=method, memory=None if memory is None else class_config(memory),
                            components=None if self.components is None else self.components.config())
        self.edit_count = 0
        self.trainer_kwargs: dict[str, Any] = {"accelerator": "auto", "devices": 1}
        self.intervention = 1.0
        self.edit_failed: str | None = None
        self.step_stats: Mapping[str, float] = {}
        self.shard_plan: list[list[EditRecord]] | None = None
        self.distill_teacher: tuple | None = None  # set by InBatchDistillation for one edit
        self.routing_floor: float | None = None  # routing threshold before the current batch
        self._lower: tuple[tuple, dict] | None = None
        # Inputs of the edited layer per record of the current edit batch, so that error
        # feedback's re-edits skip the frozen layers below it (see edit_stream); capped in size.
        self._lower_cache: dict[int, tuple[Tensor, tuple[tuple, dict]]] | None = None
        self._lower_cache_bytes = 0
        self.lower_cache_mb = 512.0
        self._retries: list[tuple[EditRecord, EditResult]] = []

    # ---- placement ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where inputs go: the device of the input embedding. With ``device_map`` the model
        spans several devices; the memory sits on the edited layer's."""
        model = self.__dict__.get("_modules", {}).get("model")
        return super().device if model is None else module_device(model.get_input_embeddings())

    # ---- forward / inference -----------------------------------------------------------------
    @contextmanager
    def memory_mode(self, mode: str) -> Iterator[None]:
        """Run the memory in ``mode`` ("off": the unedited model, "edit", "route") and restore
        the mode it had, whatever happens inside."""
        if self.memory is None:
            yield
            return
        previous, self.memory.mode = self.memory.mode, mode
        try:
            yield
        finally:
            self.memory.mode = previous

    def _routing(self, mask: Tensor | None, sticky: bool = False, texts: list[str] | None = None):
        return nullcontext() if self.memory is None else self.memory.routing(mask, sticky, texts)

    def _routes_by_prompt(self) -> bool:
        return getattr(self.memory, "router", None) is not None and self.memory.mode == "route"

    def prompt_texts(self, input_ids: Tensor, mask: Tensor | None = None) -> list[str]:
        """The text of each row's tokens in ``mask`` (its prompt), as the tokenizer decodes it:
        what a memory that routes by prompt compares with the edits' prompts. A prompt in the
        tokenizer's chat template gives its last user message, so a question reaches its edit
        whether it is asked plainly or as a chat turn."""
        rows = [row.tolist() for row in (input_ids if mask is None else
                                         [ids[m.bool()] for ids, m in zip(input_ids, mask)])]
        texts = self.tokenizer.batch_decode(rows, skip_special_tokens=True)
        markers = user_turn_markers(self.tokenizer)
        if markers is None:
            return texts
        turns = [user_message(text, markers) for text in self.tokenizer.batch_decode(rows)]
        return [text if turn is None else turn for text, turn in zip(texts, turns)]

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                route_mask: Tensor | None = None) -> Tensor:
        """Logits of the edited model; routing looks at the tokens in ``route_mask`` (a memory
        that routes by prompt gets them as text)."""
        mask = attention_mask if route_mask is None else route_mask
        texts = self.prompt_texts(input_ids, mask) if self._routes_by_prompt() else None
        with self._routing(mask, texts=texts):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def logits_fn(self, edited: bool = True):
        """A :data:`repair_pl.evaluate.LogitsFn` for the edited (or, with False, unedited) model."""

        def run(input_ids: Tensor, attention_mask: Tensor, prompt_mask: Tensor) -> Tensor:
            with self.memory_mode("route" if edited else "off"):
                return self(input_ids, attention_mask, prompt_mask)

        return run

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], max_new_tokens: int = 20, edited: bool = True, **kwargs) -> list[str]:
        """Greedy generation with a KV cache; routing is decided once per sequence from its
        prompt. The tokenizer and the memory are left as they were found."""
        tokenizer = self.tokenizer
        side, tokenizer.padding_side = tokenizer.padding_side, "left"
        try:
            enc = tokenizer(list(prompts), return_tensors="pt", padding=True).to(self.device)
        finally:
            tokenizer.padding_side = side
        by_prompt = edited and getattr(self.memory, "router", None) is not None
        texts = self.prompt_texts(enc.input_ids, enc.attention_mask) if by_prompt else None
        with self.memory_mode("route" if edited else "off"), self._routing(enc.attention_mask, sticky=True, texts=texts):
            out = self.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                      pad_token_id=tokenizer.pad_token_id, **kwargs)
        return tokenizer.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)

    @torch.no_grad()
    def sample_texts(self, starts: Sequence[str], n: int, max_new_tokens: int, seed_offset: int = 0) -> list[str]:
        """``n`` texts the frozen (unedited) model writes by top-5 sampling, the i-th begun with
        ``starts[i % len(starts)]``, seeded with ``seed + seed_offset``; newlines become spaces.
        The global RNG (CUDA included) is left as it was."""
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        texts = []
        with torch.random.fork_rng(devices=devices), self.memory_mode("off"):
            torch.manual_seed(self.hparams.seed + seed_offset)
            for i in range(n):
                enc = self.tokenizer([starts[i % len(starts)]], return_tensors="pt").to(self.device)
                out = self.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=True, top_k=5,
                                          pad_token_id=self.tokenizer.pad_token_id)
                texts.append(self.tokenizer.decode(out[0], skip_special_tokens=True).replace("\n", " ").strip())
        return texts

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
        ``positions`` only (flat indices into the (B, T) positions, see :func:`~repair_pl.memory.batch.flat_indices`),
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
        """The memory's losses on the edit ``batch`` (from its ``prepare``), plus in-batch
        distillation when a teacher is set. The batch's index tensors let a step run without
        waiting on the GPU (no boolean indexing, no reading values back)."""
        if lower is None:
            lower = self.lower_states(batch)
        with self.memory.routing(batch["route_mask"]):  # edit rows come first
            logits = self.upper_forward(lower, batch["positions"], rows=len(batch["edit_rows"]))
        # With a device_map, logits come from the last GPU and scores from the edited layer's.
        out = self.memory.losses(logits, batch["labels"].to(logits.device), batch)
        distill = out["loss"].new_zeros(())
        if self.distill_teacher is not None:
            t_lower, t_positions, t_logits, weight, temperature = self.distill_teacher
            with self.memory.routing(None):
                distill = distillation_loss(self.upper_forward(t_lower, t_positions), t_logits, temperature)
            out["loss"] = out["loss"] + weight * distill
        return {**out, "distill_loss": distill.detach()}

    @torch.no_grad()
    def answer_logits(self, record: EditRecord) -> tuple[tuple, Tensor, Tensor]:
        """``(lower states, answer positions, logits there)`` of ``prompt + target`` through the
        side memory as it trains (mode "edit"): the teacher of in-batch distillation."""
        enc = encode_pairs(self.tokenizer, [record.prompt], [record.target], self.hparams.max_length)
        positions = flat_indices(predicting(enc.answer_mask))  # on the CPU, once per record
        enc = enc.to(self.device)
        lower = self.lower_states({"input_ids": enc.input_ids, "attention_mask": enc.attention_mask})
        with self.memory_mode("edit"), self.memory.routing(None):
            logits = self.upper_forward(lower, positions)
        return lower, positions, logits

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
        self.memory.after_backward()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.memory.after_step(self.step_stats):
            self.trainer.should_stop = True

    def configure_optimizers(self):
        return self.memory.configure_optimizer()

    def apply_lr(self, trainer) -> None:
        """Set the learning rate to ``base_lr x intervention`` (components change either factor)."""
        for group in trainer.optimizers[0].param_groups:
            group["lr"] = group["base_lr"] * self.intervention

    def fail_edit(self, reason: str) -> None:
        """Undo the edit in progress: the memory returns bit-identical to before it."""
        self.memory.undo_edit()
        self.edit_failed = reason

    @property
    def _reedits_possible(self) -> bool:
        """Only error feedback edits a record twice; without it no lower-layer cache is worth keeping."""
        return self.components is not None and self.components.error_feedback is not None

    def intervention_counts(self) -> dict[str, int]:
        """Counts of every intervention the components made in this run."""
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
        """Apply one edit: a short ``fit`` of the memory, then update routing and shards. A
        failed edit (see :class:`~repair_pl.components.ClosedLoopFeedback`) leaves the memory
        exactly as before it."""
        start = time.perf_counter()
        if self.memory is None:
            return EditResult(0, 0.0, 0.0, 0.0, 0.0, 0.0, success=False)
        streams = self.edit_callbacks
        for cb in streams:
            cb.on_edit_start(self, record)
        batch = self.prepare_edit(record, retry)
        self._lower = self._cached_lower(record, batch)  # None: the first step computes it
        self.edit_failed, self.intervention, self.step_stats = None, 1.0, {}
        self.memory.begin_edit(record, batch, self)
        self.memory.mode = "edit"
        self.memory.invalidate()
        with _quiet_lightning():
            trainer = self._edit_trainer()
            trainer.fit(self, DataLoader(_Repeat(batch, self.hparams.max_steps), batch_size=None))
        steps = trainer.global_step
        self.eval()
        self.memory.mode = "route"
        self.memory.invalidate()
        success = self.edit_failed is None
        if self._lower is not None:
            self._cache_lower(record, batch)
        score = self.memory.finish_edit(record, batch, self, success)
        self._lower = None
        last = self.step_stats
        result = EditResult(steps, last.get("loss", float("nan")), last.get("edit_loss", float("nan")),
                            last.get("routing_loss", float("nan")), time.perf_counter() - start, score, success,
                            retry, lr=trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan"),
                            intervention=self.intervention,
                            target_reached=success and last.get("target_correct") == 1.0)
        if not retry:
            self.edit_count += 1
            self.memory.after_edit(self.edit_count)
        for cb in streams:
            cb.on_edit_end(self, record, result)
        return result

    def prepare_edit(self, record: EditRecord, retry: bool = False) -> dict[str, Any]:
        """The memory's edit batch for ``record`` on the module's device (moved once per edit, not
        per step); ``retry``: a re-edit of a record edited before (adds nothing to replay)."""
        batch = self.memory.prepare(record, self, retry)
        return {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in batch.items()}

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

    @torch.no_grad()
    def in_scope_score(self, record: EditRecord) -> float:
        """Activation score of the bare edit prompt through the current side memory."""
        return self.in_scope_scores([record])[0]

    @torch.no_grad()
    def in_scope_scores(self, records: list[EditRecord]) -> list[float]:
        """Activation scores of the bare edit prompts through the current side memory (mode
        "edit": ``W'`` itself, not the routed choice), ``eval_batch_size`` prompts per forward."""
        out = []
        with self.memory_mode("edit"):
            for enc in self.encoded_records(records):
                self(enc.input_ids, enc.attention_mask, enc.prompt_mask)
                out += self.memory.last_scores.tolist()
        return out

    def encoded_records(self, records: list[EditRecord]):
        """``prompt + target`` of ``records``, ``eval_batch_size`` at a time, on the module's device."""
        size = self.hparams.eval_batch_size
        for start in range(0, len(records), size):
            chunk = records[start: start + size]
            yield encode_pairs(self.tokenizer, [r.prompt for r in chunk], [r.target for r in chunk],
                               self.hparams.max_length).to(self.device)

    @torch.no_grad()
    def trained_score(self, batch: dict[str, Tensor]) -> float:
        """:meth:`in_scope_score` of the edit ``batch`` was prepared from (its first row is the
        bare prompt + target, routed on the prompt), from the edited layer's inputs of the edit
        just made: the score is taken inside that layer, so no other layer runs."""
        args, kwargs = self.lower_states(batch) if self._lower is None else self._lower
        with self.memory_mode("edit"), self.memory.routing(batch["route_mask"]):
            decoder_layers(self.model)[self.layer](*args, **kwargs)
        return float(self.memory.last_scores[0])

    def edit_stream(self, records: list[EditRecord], progress: bool = True):
        """Edit ``records`` one after another (they accumulate); yields ``(record, EditResult)``
        per edit, and again for every re-edit by error feedback (``result.retry`` is True).

        The stream is taken in batches of ``edit_batch_size``; REPAIR's callbacks may reorder a
        batch (clustering) and merge and re-check between batches."""
        streams = self.edit_callbacks
        size = (self.components.edit_batch_size if self.components else None) or len(records)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(records), desc="editing", unit="edit", dynamic_ncols=True)
        done = reached = 0
        for start in range(0, len(records), size):
            batch = list(records[start: start + size])
            self.shard_plan, self._retries = None, []
            # only error feedback edits a record twice: without it nothing is worth keeping
            self._lower_cache, self._lower_cache_bytes = ({} if self._reedits_possible else None), 0
            self.routing_floor = getattr(self.memory, "min_in_scope", None)  # see recalibrate_routing
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
            trim_heap()  # the batch's caches are freed: keep the RSS from growing with the stream
            yield from self._retries
        if bar is not None:
            bar.close()

    def unwrap_model(self) -> None:
        """Put the frozen down projection back into the model (the module is spent), so the
        same loaded model can be wrapped by another ``RepairModule``."""
        if self.memory is not None:
            decoder_layers(self.model)[self.layer].mlp.down_proj = self.memory.main

    def reset_edits(self) -> None:
        """Forget every edit: the memory returns to its state right after construction (for
        the side memory: a fresh copy of the frozen weight, reseeded masks), so lifelong chunks
        are independent and may run on different processes with the same results."""
        if self.memory is not None:
            self.memory.reset(self.hparams.seed)
        self.edit_count = 0

    # ---- saving and loading ------------------------------------------------------------------
    def edited_state(self) -> tuple[dict[str, Tensor], dict]:
        """Tensors and metadata that fully describe the edits (nothing of the frozen model).
        On the CPU the tensors share storage with the live memory: for a state to return to,
        take :meth:`snapshot_edits`."""
        tensors, extra = self.memory.state() if self.memory is not None else ({}, {})
        main = decoder_layers(self.model)[self.layer].mlp.down_proj if self.memory is None else self.memory.main
        meta = {"format": STATE_FORMAT, "layer": self.layer, "n_layers": len(decoder_layers(self.model)),
                "weight_shape": list(main.weight.shape), "edit_count": self.edit_count,
                "method": self.method, "memory": type(self.memory).__name__ if self.memory is not None else None,
                **extra}
        return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, meta

    def snapshot_edits(self) -> tuple[dict[str, Tensor], dict]:
        """The edited state as it is now, for :meth:`restore_edits` to return to after later
        edits (error feedback undoes a round with it). It stays on the module's device, copies
        what edits change in place and shares what they never change (a side memory's kept
        memories), so its cost does not grow with the edits made (``EditableLayer.snapshot``)."""
        tensors, meta = self.memory.snapshot() if self.memory is not None else ({}, {})
        return tensors, {**meta, "edit_count": self.edit_count}

    def save_edits(self, path: str | Path) -> Path:
        """Write the edited state to ``path/`` as ``edits.safetensors`` + ``edits.json`` (atomically)."""
        from repair_pl.checkpoint import write_state

        tensors, meta = self.edited_state()
        return write_state(Path(path), tensors, meta)

    def load_edits(self, path: str | Path) -> None:
        """Load an edited state written by :meth:`save_edits`; a state made for another base
        model, layer or kind of memory is refused with a message naming what differs."""
        from repair_pl.checkpoint import read_state

        tensors, meta = read_state(Path(path))
        _check_state(meta, self, path)
        self.restore_edits(tensors, meta)

    def restore_edits(self, tensors: dict[str, Tensor], meta: dict) -> None:
        """Put back an edited state from :meth:`snapshot_edits` or :meth:`edited_state`
        (unchecked: :meth:`load_edits` checks that a saved state fits this module)."""
        if self.memory is not None:
            self.memory.load_state(tensors, meta)
        self.edit_count = meta["edit_count"]


MEMORY_OF = {"none": None, "wise": SideMemory, "repair": SideMemory, "ft_l": FineTunedLayer, "ft_m": FineTunedLayer,
             "grace": GraceCodebook}
OBJECTIVE_OF = {"ft_l": "prompt_last", "ft_m": "target"}


def _method_of(memory: EditableLayer | None, components: RepairComponents | None) -> str:
    """The preset the parts amount to (a module built from parts gets a method name too)."""
    if memory is None:
        return "repair"
    if isinstance(memory, FineTunedLayer):
        return {v: k for k, v in OBJECTIVE_OF.items()}[memory.objective]
    if isinstance(memory, GraceCodebook):
        return "grace"
    return "repair" if components is not None else "wise"


def _check_parts(method: str, memory: EditableLayer | None, components: RepairComponents | None) -> None:
    """Parts must be what the method names; nothing given is silently ignored."""
    kind = MEMORY_OF[method]
    if (memory is None) != (kind is None) or (kind is not None and not isinstance(memory, kind)):
        raise ValueError(f"model.method {method!r} edits with {kind.__name__ if kind else 'no memory'}, but "
                         f"model.memory is {type(memory).__name__ if memory is not None else None}: drop one of them")
    if method in OBJECTIVE_OF and memory.objective != OBJECTIVE_OF[method]:
        raise ValueError(f"model.method {method!r} trains objective {OBJECTIVE_OF[method]!r}; model.memory has "
                         f"objective {memory.objective!r}")
    if components is not None and method != "repair":
        raise ValueError(f"model.components are REPAIR's; method {method!r} has none (set model.components "
                         f"null, or use method repair)")


def _check_options(**options) -> None:
    """Start-up checks of the module's own options; errors name the key."""
    for key, value in options.items():
        optional = key == "max_length"
        if not (optional and value is None) and (not isinstance(value, int) or value < 1):
            raise ValueError(f"model.{key} must be a positive integer{' or null' if optional else ''}, got {value!r}")


def _check_state(meta: dict, module: RepairModule, path) -> None:
    """Whether a saved state fits ``module``; the error names what differs."""
    n_layers = len(decoder_layers(module.model))
    main = decoder_layers(module.model)[module.layer].mlp.down_proj if module.memory is None else module.memory.main
    shape = tuple(main.weight.shape)
    if meta["n_layers"] != n_layers or tuple(meta["weight_shape"]) != shape:
        raise ValueError(f"{path}: edits were made on a model with {meta['n_layers']} layers and a "
                         f"{tuple(meta['weight_shape'])} down projection; this model has {n_layers} layers and {shape}")
    if meta["layer"] != module.layer:
        raise ValueError(f"{path}: edits are for layer {meta['layer']} but this module edits layer {module.layer}")
    saved = meta.get("method", "wise")
    if meta.get("format", 1) == 1 and saved == "ft_l":
        raise ValueError(f"{path}: these edits were saved by an older version whose ft_l trained the target "
                         f"teacher-forced, which is now method ft_m (ft_l reads the target at the prompt's last "
                         f"token, as EasyEdit's FT-L): load them with method ft_m")
    kind = MEMORY_OF.get(saved)
    if kind is not (type(module.memory) if module.memory is not None else None) or OBJECTIVE_OF.get(saved) != getattr(module.memory, "objective", None):
        raise ValueError(f"{path}: edits were made with method {saved!r}; this module runs {module.method!r}")
    if isinstance(module.memory, SideMemory):
        tokens = meta.get("score_tokens", "mean")  # states saved before the option scored the mean
        if tokens != module.memory.score_tokens:
            raise ValueError(f"{path}: edits were routed with score_tokens={tokens!r} (their thresholds are on that "
                             f"scale); this module's memory has score_tokens={module.memory.score_tokens!r}: set "
                             f"model.memory.score_tokens")


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
