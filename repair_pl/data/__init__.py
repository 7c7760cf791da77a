"""Edit data: the record type, format loaders and the Lightning data module."""

from repair_pl.data.datamodule import DEMO_PATH, EditDataModule, fill_routing_prompts
from repair_pl.data.formats import FORMATS, UneditableRecord, detect_format, load_records, read_rows
from repair_pl.data.records import EditDataError, EditRecord

__all__ = ["DEMO_PATH", "FORMATS", "EditDataError", "EditDataModule", "EditRecord", "detect_format",
           "UneditableRecord", "fill_routing_prompts", "load_records", "read_rows"]
