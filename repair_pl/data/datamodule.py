"""``EditDataModule``: the ordered stream of edits a lifelong run consumes."""

from __future__ import annotations

import random
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader

from repair_pl.data.formats import load_records
from repair_pl.data.records import EditDataError, EditRecord

DEMO_PATH = Path(__file__).with_name("demo.jsonl")


def fill_routing_prompts(records: list[EditRecord]) -> list[EditRecord]:
    """Give every record an out-of-scope routing prompt.

    Records without one borrow the locality text of the next record in the stream (ours:
    WISE draws these from a train split that not every dataset has; borrowing a neighbour's
    keeps the record's own locality prompt unseen during editing, so locality stays honest).
    """
    from dataclasses import replace

    out = []
    for i, record in enumerate(records):
        if record.routing_prompt is None:
            donor = records[(i + 1) % len(records)]
            text = " ".join(donor.locality[0]) if donor.locality and donor is not record else None
            record = replace(record, routing_prompt=text)
        out.append(record)
    return out


class EditDataModule(L.LightningDataModule):
    """Loads an edit file and yields its records one at a time, in order.

    Args:
        path: a data file (JSON list or JSONL), a hub dataset id (online only), or ``"demo"``
            for the bundled 40-edit demo set.
        format: ``"auto"`` or a name from :data:`repair_pl.data.formats.FORMATS`.
        ds_size: keep only the first N records (after shuffling, if ``shuffle``).
        shuffle: shuffle the record order with ``seed`` before taking the first ``ds_size``.
        seed: the shuffling seed.
        on_invalid: ``"raise"`` stops at the first bad record; ``"skip"`` leaves bad records
            out and lists them in ``skipped``.
    """

    def __init__(self, path: str = "demo", format: str = "auto", ds_size: int | None = None,
                 shuffle: bool = False, seed: int = 0, on_invalid: str = "raise"):
        super().__init__()
        if ds_size is not None and ds_size < 1:
            raise EditDataError(f"data.ds_size must be a positive integer or null, got {ds_size}")
        self.path, self.format, self.ds_size = path, format, ds_size
        self.shuffle, self.seed, self.on_invalid = shuffle, seed, on_invalid
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
        if self.shuffle:
            random.Random(self.seed).shuffle(records)
        if self.ds_size is not None:
            if self.ds_size > len(records):
                raise EditDataError(f"data.ds_size={self.ds_size} is larger than the {len(records)} records "
                                    f"in the data", str(source))
            records = records[: self.ds_size]
        self.records = fill_routing_prompts(records)

    def train_dataloader(self) -> DataLoader:
        """One record per batch, in stream order."""
        self.setup()
        return DataLoader(self.records, batch_size=1, shuffle=False, collate_fn=lambda batch: batch[0])
