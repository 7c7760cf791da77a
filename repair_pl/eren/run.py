"""Run EREN from a YAML config (the ``method: eren`` branch of the project's CLI).

Config shape (see ``configs/eren_cfh.yaml``)::

    T: 200                      # edits per notebook (null: all records in one notebook)
    model:
      method: eren
      model: smollm2            # reader: any name/path load_model accepts
      reader: hf                # hf | openai
      openai: {base_url: ..., model: ..., api_key_env: OPENAI_API_KEY}
      encoder: null             # null: all-MiniLM-L6-v2; or a model folder, or "hash"
      k: 5
      min_score: null
      max_new_tokens: 12
      batch_size: 8
      prompts: {read: ..., closed_book: ..., note: ..., best_last: false, ...}
      match: contains           # contains | em
    data: {path: ..., format: auto, ds_size: 200, offset: 0}
    trainer: {default_root_dir: runs/eren_cfh}
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from repair_pl.eren.editor import ErenEditor, Prompts
from repair_pl.eren.notebook import Notebook
from repair_pl.eren.reader import CachedReader, HFReader, OpenAIReader
from repair_pl.eren.retrieval import load_encoder


def build_reader(model_cfg: dict):
    """The reader a ``model:`` section asks for, wrapped in a :class:`CachedReader`."""
    kind = model_cfg.get("reader", "hf")
    if kind == "openai":
        api = dict(model_cfg.get("openai") or {})
        if "base_url" not in api or "model" not in api:
            raise ValueError("model.openai needs base_url and model for reader: openai")
        key_env = api.pop("api_key_env", "OPENAI_API_KEY")
        return CachedReader(OpenAIReader(api.pop("base_url"), api.pop("model"), api_key=os.environ.get(key_env),
                                         max_tokens=model_cfg.get("max_new_tokens", 12), **api))
    if kind != "hf":
        raise ValueError(f"model.reader must be 'hf' or 'openai', got {kind!r}")
    from repair_pl.models import load_model

    model, tokenizer = load_model(model_cfg.get("model", "smollm2"), dtype=model_cfg.get("dtype", "float32"),
                                  device=model_cfg.get("device", "cpu"))
    return CachedReader(HFReader(model, tokenizer, max_new_tokens=model_cfg.get("max_new_tokens", 12),
                                 batch_size=model_cfg.get("batch_size", 8), chat=model_cfg.get("chat"),
                                 system=model_cfg.get("system")))


def build_editor(model_cfg: dict, reader=None, encoder=None) -> ErenEditor:
    """An editor with an empty notebook from a ``model:`` config section."""
    prompts = dict(model_cfg.get("prompts") or {})
    if "irrelevant" in prompts:
        prompts["irrelevant"] = tuple(prompts["irrelevant"])
    unknown = set(prompts) - set(Prompts.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown model.prompts keys {sorted(unknown)}; known: {sorted(Prompts.__dataclass_fields__)}")
    encoder = encoder or load_encoder(model_cfg.get("encoder"), device=model_cfg.get("device", "cpu"))
    return ErenEditor(reader or build_reader(model_cfg), Notebook(encoder), k=model_cfg.get("k", 5),
                      prompts=Prompts(**prompts), min_score=model_cfg.get("min_score"))


def load_config_records(data_cfg: dict):
    """The records a ``data:`` section selects: ``offset`` then the first ``ds_size``."""
    from repair_pl.data import load_records

    records, _ = load_records(data_cfg["path"], data_cfg.get("format", "auto"), data_cfg.get("on_invalid", "raise"))
    offset, size = data_cfg.get("offset", 0), data_cfg.get("ds_size")
    records = records[offset: offset + size if size is not None else None]
    if not records or (size is not None and len(records) < size):
        raise ValueError(f"data.offset={offset} and data.ds_size={size} ask for more records than the file has")
    return records


def run_config(cfg: dict, reader=None, encoder=None, progress: bool = True) -> dict:
    """Evaluate EREN as ``cfg`` describes; writes results into ``trainer.default_root_dir``."""
    from repair_pl.eren.evaluate import evaluate_editor, write_results

    model_cfg, data_cfg = cfg.get("model") or {}, cfg.get("data") or {}
    if model_cfg.get("method", "eren") != "eren":
        raise ValueError(f"this runner handles method: eren, got {model_cfg.get('method')!r}")
    records = load_config_records(data_cfg)
    editor = build_editor(model_cfg, reader, encoder)
    out = Path((cfg.get("trainer") or {}).get("default_root_dir", "runs/eren"))
    cases, summary = evaluate_editor(editor, records, dataset=Path(data_cfg["path"]).stem, T=cfg.get("T"),
                                     rule=model_cfg.get("match", "contains"), progress=progress)
    summary["reader"] = model_cfg.get("model", "smollm2") if model_cfg.get("reader", "hf") == "hf" else \
        f"openai:{(model_cfg.get('openai') or {}).get('model')}"
    summary["encoder"], summary["k"] = editor.notebook.encoder.name, editor.k
    write_results(out, cases, summary)
    editor.notebook.save(out / "notebook")
    return summary


def main(argv: list[str] | None = None) -> dict:
    """``--config FILE.yaml`` [``--set key.sub=value`` ...]: run EREN from a config."""
    import yaml

    parser = argparse.ArgumentParser(description="Run EREN (edit by reading notes) from a YAML config.")
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config entry, e.g. --set model.k=3 (value parsed as YAML)")
    args = parser.parse_args(argv)
    cfg = yaml.safe_load(Path(args.config).read_text()) or {}
    for item in args.set:
        key, _, value = item.partition("=")
        node = cfg
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    summary = run_config(cfg)
    print(f"ES {summary['es']:.4f}  BP {summary['bp']:.4f}  EQ {summary['eq']:.4f}  "
          f"seconds/query {summary['seconds_per_query']:.3f}", flush=True)
    return summary
