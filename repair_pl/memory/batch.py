"""Building the tensors of one edit: rows of prompt + target, out-of-scope rows, and the flat
indices the loss selects with (computed once per edit on the CPU, so a step never waits on
the GPU for boolean indexing)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from repair_pl.evaluate import encode_pairs


def predicting(answer_mask: Tensor) -> Tensor:
    """Positions whose logits predict an answer token (``logits[:, t]`` predicts token t+1)."""
    out = torch.zeros_like(answer_mask, dtype=torch.bool)
    out[:, :-1] = answer_mask[:, 1:].bool()
    return out


def flat_indices(mask: Tensor) -> Tensor:
    """Indices of the True entries of ``mask`` flattened (row-major): selecting with them gives
    what ``x[mask]`` gives, without the device sync of boolean indexing."""
    return mask.flatten().nonzero().squeeze(1)


def with_loss_indices(batch: dict[str, Tensor], n_own_rows: int) -> dict[str, Any]:
    """Add what the losses select with: ``positions`` (flat indices of the positions that
    predict an answer token), their ``labels``, ``n_first`` (how many belong to the first row,
    the bare prompt), ``n_own`` (how many belong to the first ``n_own_rows`` rows, the edit's
    own; the rest are replayed edits) and the ``edit_rows`` / ``other_rows`` indices."""
    mask = predicting(batch["answer_mask"])
    is_edit = batch["is_edit"]
    return {**batch, "positions": flat_indices(mask), "labels": batch["input_ids"][:, 1:][mask[:, :-1]],
            "n_first": int(mask[0].sum()), "n_own": int(mask[:n_own_rows].sum()), "edit_rows": flat_indices(is_edit),
            "other_rows": flat_indices(~is_edit)}


def prompt_target_batch(tokenizer, prompts: list[str], target: str, max_length: int | None,
                        out_rows: list[list[int]] = (), replay: list[tuple[str, str]] = ()) -> dict[str, Any]:
    """Rows ``prompt + " " + target`` for each of ``prompts`` (the edit rows, scored on the
    target), then one row ``prompt + " " + target`` per ``replay`` pair (earlier edits, also
    scored), then ``out_rows`` (token ids of out-of-scope texts: routed, not scored), right-padded."""
    edit = encode_pairs(tokenizer, list(prompts) + [p for p, _ in replay],
                        [target] * len(prompts) + [t for _, t in replay], max_length)
    n_edit = edit.input_ids.shape[0]
    rows = n_edit + len(out_rows)
    width = max([edit.input_ids.shape[1], *map(len, out_rows)])

    def pad(t: Tensor, value) -> Tensor:
        full = torch.full((rows, width), value, dtype=t.dtype)
        full[: t.shape[0], : t.shape[1]] = t
        return full

    input_ids = pad(edit.input_ids, tokenizer.pad_token_id)
    attention_mask = pad(edit.attention_mask, 0)
    route_mask, answer_mask = pad(edit.prompt_mask, False), pad(edit.answer_mask, False)
    for i, ids in enumerate(out_rows, start=n_edit):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
        route_mask[i, : len(ids)] = True
    return with_loss_indices({"input_ids": input_ids, "attention_mask": attention_mask, "route_mask": route_mask,
                              "answer_mask": answer_mask, "is_edit": torch.arange(rows) < n_edit},
                             n_own_rows=len(prompts))
