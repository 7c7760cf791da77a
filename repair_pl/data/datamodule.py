"""``EditDataModule``: the ordered stream of edits a lifelong run consumes."""

from __future__ import annotations

import random
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader

from repair_pl.data.formats import load_records
from repair_pl.data.records import EditDataError, EditRecord
from repair_pl.data.routing import assign_routing_prompts, evaluated_texts, load_routing_texts

DEMO_PATH = Path(__file__).with_name("demo.jsonl")


class EditDataModule(L.LightningDataModule):
    """Loads an edit file and yields its records one at a time, in order.

    Args:
        path: a data file (JSON list or JSONL), a hub dataset id (online only), or ``"demo"``
            for the bundled 40-edit demo set.
        format: ``"auto"`` or a name from :data:`repair_pl.data.formats.FORMATS`.
        start: index of the first record kept (after shuffling, if ``shuffle``); with
            ``ds_size`` it selects a slice, e.g. ``start=500, ds_size=500`` for records 500-999.
        ds_size: keep only N records from ``start`` on (default: all the rest).
        shuffle: shuffle the record order with ``seed`` before selecting.
        seed: the shuffling seed; also orders the routing texts drawn from ``routing_path``.
        on_invalid: ``"raise"`` stops at the first bad record; ``"skip"`` leaves bad records
            out and lists them in ``skipped``.
        routing_path: a file of routing (out-of-scope) text for records without their own
            (a train split, or a JSON/JSONL list of strings; see
            :func:`repair_pl.data.routing.load_routing_texts`). Any text that overlaps a prompt,
            rephrase or locality prompt of the edit file is left out, and so is a record's own
            routing prompt (ZsRE's ``loc_prompt``) that does; records still without one keep
            ``routing_prompt=None``.
    """

    def __init__(self, path: str = "demo", format: str = "auto", ds_size: int | None = None,
                 shuffle: bool = False, seed: int = 0, on_invalid: str = "raise", start: int = 0,
                 routing_path: str | None = None):
        super().__init__()
        if ds_size is not None and (isinstance(ds_size, bool) or not isinstance(ds_size, int) or ds_size < 1):
            raise EditDataError(f"data.ds_size must be a positive integer or null, got {ds_size!r}")
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise EditDataError(f"data.start must be an integer >= 0, got {start!r}")
        self.path, self.format, self.start, self.ds_size = path, format, start, ds_size
        self.shuffle, self.seed, self.on_invalid = shuffle, seed, on_invalid
        self.routing_path = routing_path
        self.records: list[EditRecord] = []
        self.skipped: list[EditDataError] = []

    @property
    def dataset_name(self) -> str:
        """A short name for summaries: ``demo``, or the data file's name without suffix."""
        return "demo" if self.path == "demo" else Path(self.path).stem

    def setup(self, stage: str | None = None) -> None:
        if self.records:
            return
        source = DEMO_PATH if self.path == "demo" else self.path
        records, self.skipped = load_records(source, self.format, self.on_invalid)
        evaluated = evaluated_texts(records)  # the whole file: a superset of any selection
        if self.shuffle:
            random.Random(self.seed).shuffle(records)
        if self.start >= len(records):
            raise EditDataError(f"data.start={self.start} is beyond the {len(records)} records in the data "
                                f"(the last index is {len(records) - 1})", str(source))
        end = len(records) if self.ds_size is None else self.start + self.ds_size
        if end > len(records):
            raise EditDataError(f"data.start={self.start} + data.ds_size={self.ds_size} = {end} is larger "
                                f"than the {len(records)} records in the data", str(source))
        pool = load_routing_texts(self.routing_path, on_invalid=self.on_invalid) if self.routing_path else ()
        self.records = assign_routing_prompts(records[self.start: end], evaluated, pool, self.seed)

    def train_dataloader(self) -> DataLoader:
        """One record per batch, in stream order."""
        self.setup()
        return DataLoader(self.records, batch_size=1, shuffle=False, collate_fn=lambda batch: batch[0])
