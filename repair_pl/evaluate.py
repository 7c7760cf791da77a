"""Teacher-forced evaluation of (edited) models on edit records.

Padding: sequences are padded on the RIGHT for teacher-forced scoring. With a causal model the
pad tokens after a sequence cannot influence its earlier positions, so a batched score equals the
unbatched one (EasyEdit scores one prompt at a time). Generation uses left padding instead.

A query is ``prompt + " " + answer`` (EasyEdit's ``test_prediction_acc``); the answer's
positions are those after the tokens of ``prompt`` alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from repair_pl.data.records import EditDataError, EditRecord
from repair_pl.metrics import (ExactMatch, Generalization, Locality, RewriteAccuracy, TargetPerplexity, exact_match,
                               target_perplexity, token_accuracy)

LogitsFn = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``(input_ids, attention_mask, prompt_mask) -> logits``; ``prompt_mask`` marks the prompt's
tokens (an edited model routes on them)."""


@dataclass
class EncodedPairs:
    """A right-padded batch of ``prompt + " " + answer`` sequences."""

    input_ids: Tensor
    attention_mask: Tensor
    prompt_mask: Tensor
    answer_mask: Tensor

    def to(self, device) -> EncodedPairs:
        return EncodedPairs(*(t.to(device) for t in (self.input_ids, self.attention_mask,
                                                      self.prompt_mask, self.answer_mask)))


def encode_pairs(tokenizer, prompts: Sequence[str], answers: Sequence[str],
                 max_length: int | None = None) -> EncodedPairs:
    """Tokenise prompt/answer pairs into a right-padded batch with prompt and answer masks.

    ``max_length`` (tokens): when a sequence is longer, its prompt is cut from the LEFT (the
    end of a prompt matters most for the answer); an answer that alone does not fit is an error.
    """
    full = tokenizer([p + " " + a for p, a in zip(prompts, answers)]).input_ids
    prompt_lens = [len(ids) for ids in tokenizer(list(prompts)).input_ids]
    rows = []
    for i, (ids, n_prompt) in enumerate(zip(full, prompt_lens)):
        n_answer = len(ids) - n_prompt
        if n_answer < 1:
            raise EditDataError(f"answer {answers[i]!r} tokenises to nothing after prompt {prompts[i]!r}")
        if max_length is not None and len(ids) > max_length:
            if n_answer + 1 > max_length:
                raise EditDataError(f"answer {answers[i]!r} has {n_answer} tokens, more than "
                                    f"max_length={max_length} allows")
            cut = len(ids) - max_length
            ids, n_prompt = ids[cut:], n_prompt - cut
        rows.append((ids, n_prompt))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    prompt_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    answer_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (ids, n_prompt) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
        prompt_mask[i, :n_prompt] = True
        answer_mask[i, n_prompt: len(ids)] = True
    return EncodedPairs(input_ids, attention_mask, prompt_mask, answer_mask)


@torch.no_grad()
def answer_logits(logits_fn: LogitsFn, batch: EncodedPairs) -> tuple[Tensor, Tensor, Tensor]:
    """Return ``(logits, target, mask)`` aligned for scoring: ``logits[:, t]`` predicts token t+1."""
    logits = logits_fn(batch.input_ids, batch.attention_mask, batch.prompt_mask)
    return logits[:, :-1], batch.input_ids[:, 1:], batch.answer_mask[:, 1:]


def predict_answers(logits_fn: LogitsFn, batch: EncodedPairs) -> tuple[Tensor, Tensor, Tensor]:
    """Return ``(preds, target, mask)`` aligned for scoring: ``preds[:, t]`` predicts token t+1."""
    logits, target, mask = answer_logits(logits_fn, batch)
    return logits.argmax(-1), target, mask


KINDS = ("rewrite", "rephrase", "locality", "ood")


def record_queries(records: Sequence[EditRecord]) -> list[tuple[int, str, int, str, str]]:
    """Flatten records into ``(record, kind, slot, prompt, answer)`` queries, record by record
    in the order of :data:`KINDS`."""
    out = []
    for r, rec in enumerate(records):
        out.append((r, "rewrite", 0, rec.prompt, rec.target))
        out += [(r, "rephrase", j, p, rec.target) for j, p in enumerate(rec.rephrases)]
        out += [(r, "locality", j, p, a) for j, (p, a) in enumerate(rec.locality)]
        out += [(r, "ood", j, p, rec.target) for j, p in enumerate(rec.ood_rephrases)]
    return out


@dataclass
class Evaluation:
    """Per-record scores, their means, and the locality predictions (the reference for later)."""

    cases: list[dict]
    means: dict[str, float]
    locality_preds: list[list[list[int]]]


def evaluate_records(logits_fn: LogitsFn, tokenizer, records: Sequence[EditRecord],
                     reference: Sequence[Sequence[Sequence[int]]] | None = None, batch_size: int = 16,
                     max_length: int | None = None, device: str | torch.device = "cpu",
                     progress: bool = False) -> Evaluation:
    """Score ``records`` teacher-forced through ``logits_fn``.

    ``reference`` holds the unedited model's locality predictions (``Evaluation.locality_preds``
    of a pre-edit run); without it locality is scored against the model's own predictions,
    which is 1.0 by definition (the pre-edit case).
    Per case the result has EasyEdit's shape: ``{"rewrite_acc": [..], "rephrase_acc": [..],
    "locality": {"neighborhood_acc": [..]}, "ood_acc": [..], "rewrite_em": [..], "rewrite_ppl": [..]}``
    (``rewrite_ppl``: perplexity of the target after the edit prompt, lower is better).
    """
    queries = record_queries(records)
    # Sort by length so batches hold similar lengths (less padding); results are put back in order.
    lengths = [len(p) + len(a) for _, _, _, p, a in queries]
    order = sorted(range(len(queries)), key=lambda q: lengths[q])
    # These means are this process's; under DDP, repair_pl.distributed syncs (no collective here).
    local = {"sync_on_compute": False}
    metrics = {"rewrite": RewriteAccuracy(**local), "rephrase": Generalization(**local), "locality": Locality(**local),
               "ood": Generalization(**local), "rewrite_em": ExactMatch(**local),
               "rewrite_ppl": TargetPerplexity(**local).to(device)}
    scores: dict[int, float] = {}
    ppl: dict[int, float] = {}
    em: dict[int, float] = {}
    loc_preds: dict[int, list[int]] = {}
    batches = range(0, len(order), batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="evaluate", unit="batch", leave=False)
    for start in batches:
        idx = order[start: start + batch_size]
        batch = encode_pairs(tokenizer, [queries[q][3] for q in idx], [queries[q][4] for q in idx], max_length)
        logits, target, mask = answer_logits(logits_fn, batch.to(device))
        # Target perplexity of the edit prompts (WISE's Hallucination metric), same forward pass.
        rewrites = [row for row, q in enumerate(idx) if queries[q][1] == "rewrite"]
        if rewrites:
            metrics["rewrite_ppl"].update(logits[rewrites], target[rewrites], mask[rewrites])
            ppl.update(zip([idx[row] for row in rewrites],
                           target_perplexity(logits[rewrites], target[rewrites], mask[rewrites]).tolist()))
        preds, target, mask = logits.argmax(-1).cpu(), target.cpu(), mask.cpu()
        for row, q in enumerate(idx):
            _, kind, slot, _, _ = queries[q]
            if kind == "locality":
                loc_preds[q] = preds[row][mask[row]].tolist()
                if reference is not None:
                    ref = torch.tensor(reference[queries[q][0]][slot])
                    if ref.numel() != int(mask[row].sum()):
                        raise ValueError("locality reference does not match the records (different tokenizer "
                                         "or records?)")
                    target[row, mask[row]] = ref
                else:
                    target[row] = preds[row]
        acc = token_accuracy(preds, target, mask)
        match = exact_match(preds, target, mask)
        for row, q in enumerate(idx):
            scores[q], em[q] = float(acc[row]), float(match[row])
            kind = queries[q][1]
            metrics[kind].update(preds[row: row + 1], target[row: row + 1], mask[row: row + 1])
            if kind == "rewrite":
                metrics["rewrite_em"].update(preds[row: row + 1], target[row: row + 1], mask[row: row + 1])
    cases = [{"rewrite_acc": [], "rephrase_acc": [], "locality": {"neighborhood_acc": []}, "ood_acc": [],
              "rewrite_em": [], "rewrite_ppl": []} for _ in records]
    locality_preds: list[list[list[int]]] = [[] for _ in records]
    for q, (r, kind, _, _, _) in enumerate(queries):
        if kind == "locality":
            cases[r]["locality"]["neighborhood_acc"].append(scores[q])
            locality_preds[r].append(loc_preds[q])
        else:
            cases[r][{"rewrite": "rewrite_acc", "rephrase": "rephrase_acc", "ood": "ood_acc"}[kind]].append(scores[q])
            if kind == "rewrite":
                cases[r]["rewrite_em"].append(em[q])
                cases[r]["rewrite_ppl"].append(ppl[q])
    names = {"rewrite": "rewrite_acc", "rephrase": "rephrase_acc", "locality": "locality", "ood": "ood_acc",
             "rewrite_em": "rewrite_em", "rewrite_ppl": "rewrite_ppl"}
    means = {names[k]: float(m.compute()) for k, m in metrics.items() if m.rows > 0}
    return Evaluation(cases, means, locality_preds)


def model_logits_fn(model) -> LogitsFn:
    """A :data:`LogitsFn` for a plain Hugging Face causal LM (ignores the prompt mask)."""
    return lambda input_ids, attention_mask, prompt_mask: model(input_ids=input_ids,
                                                                attention_mask=attention_mask).logits
