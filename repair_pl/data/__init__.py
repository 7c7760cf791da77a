"""Edit data: the record type, format loaders, routing text and the Lightning data module."""

from repair_pl.data.datamodule import DEMO_PATH, EditDataModule
from repair_pl.data.formats import FORMATS, UneditableRecord, detect_format, load_records, read_rows
from repair_pl.data.records import EditDataError, EditRecord
from repair_pl.data.routing import (
    assign_routing_prompts,
    clean_texts,
    evaluated_texts,
    load_routing_texts,
    overlapping,
    routing_text,
)

__all__ = ["DEMO_PATH", "FORMATS", "EditDataError", "EditDataModule", "EditRecord", "UneditableRecord",
           "assign_routing_prompts", "clean_texts", "detect_format", "evaluated_texts", "load_records",
           "load_routing_texts", "overlapping", "read_rows", "routing_text"]
