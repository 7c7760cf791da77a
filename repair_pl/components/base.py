"""What REPAIR's components share: a Lightning ``Callback`` of the per-edit fits that also hears
about the edit stream (single edits and batches of edits)."""

from __future__ import annotations

import lightning as L


class EditStreamCallback(L.Callback):
    """A Callback of the per-edit fits that also sees the edit stream.

    ``RepairModule.edit_stream`` calls ``on_edit_batch_start`` before editing a batch of records
    and ``on_edit_batch_end`` after it (for merging, re-checking and re-editing between batches).

    A component's ``__init__`` stores its options only, each under its own name (LightningCLI
    reads them back from default instances, and the saved config from live ones); state of a
    run is made in :meth:`bind`, which the module calls once when it takes the component.
    """

    def bind(self, module) -> None:
        """The module takes this component: make the state of a run (counts, caches)."""

    def on_edit_start(self, module, record) -> None:
        """Before the fit of one edit (reset per-edit state here)."""

    def on_edit_end(self, module, record, result) -> None:
        """After the fit of one edit, once its result is known."""

    def on_edit_batch_start(self, module, records: list) -> list:
        """Before a batch of edits; may return the records reordered (clustering)."""
        return records

    def on_edit_batch_end(self, module, records: list, results: list) -> None:
        """After a batch of edits."""


def recalibrate_routing(module, records: list, margin: float) -> None:
    """Re-measure the routing threshold after a merge (REPAIR; ours). Merging moves every score,
    so the threshold is set to ``margin`` x the weakest of ``records`` (the successful edits the
    merge took in) on the merged memory: every one of them routes, with some room for their
    rephrasings. It never rises above the threshold from before the batch
    (``module.routing_floor``; earlier batches' edits are not re-measured).

    With ``retrieve`` the merge made a memory of its own, and only its scale is set, from the
    scores through it: earlier memories and their scales stay as they are."""
    memory = module.memory
    if memory.router is not None or not records:  # routed by prompt: no score threshold to set
        return
    if memory.retrieve:
        if memory.memories:
            with memory.holding(memory.memories[-1]):
                weakest = min(module.in_scope_scores(records))
            memory.memory_scales[-1] = margin * weakest / memory.act_ratio  # ratio test: score / scale > act_ratio
            memory.invalidate()
        return
    weakest = min(module.in_scope_scores(records))
    # epsilon = act_ratio x min_in_scope, so this puts epsilon at margin x the weakest score
    measured = margin * weakest / memory.act_ratio
    floor = module.routing_floor
    memory.min_in_scope = measured if floor is None else min(floor, measured)
    memory.invalidate()
