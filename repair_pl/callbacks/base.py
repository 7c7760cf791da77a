"""Hooks between edits: a Lightning ``Callback`` that also hears about batches of the edit stream."""

from __future__ import annotations

import lightning as L


class EditStreamCallback(L.Callback):
    """A Callback of the per-edit fits that also sees the edit stream.

    ``RepairModule.edit_stream`` calls ``on_edit_batch_start`` before editing a batch of records
    and ``on_edit_batch_end`` after it (for merging, re-checking and re-editing between batches).
    """

    def on_edit_start(self, module, record) -> None:
        """Before the fit of one edit (reset per-edit state here)."""

    def on_edit_end(self, module, record, result) -> None:
        """After the fit of one edit, once its result is known."""

    def on_edit_batch_start(self, module, records: list) -> list:
        """Before a batch of edits; may return the records reordered (clustering)."""
        return records

    def on_edit_batch_end(self, module, records: list, results: list) -> None:
        """After a batch of edits."""
