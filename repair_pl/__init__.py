"""repair_pl: lifelong model editing of Llama-family LLMs with PyTorch Lightning."""

from repair_pl.data import EditDataError, EditDataModule, EditRecord, load_records
from repair_pl.models import load_model
from repair_pl.module import EditResult, RepairModule
from repair_pl.side_memory import SideMemory

__all__ = ["EditDataError", "EditDataModule", "EditRecord", "EditResult", "RepairModule", "SideMemory",
           "load_model", "load_records"]
__version__ = "0.1.0"
