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
      min_relation_score: null  # gate on the subject-masked score (see repair_pl.eren.editor)
      extract: false            # prefer a span of the note over an answer it does not support
      max_new_tokens: 12
      stop: []                  # strings that end an answer, e.g. ["\n"]
      chat: null                # apply the tokenizer's chat template (null: when it has one)
      batch_size: 8
      prompts: {read: ..., closed_book: ..., note: ..., best_last: false, ...}
      match: contains           # contains | em | verdict
    data: {path: ..., format: auto, ds_size: 200, offset: 0, unrelated_per_kind: null}
    trainer: {default_root_dir: runs/eren_cfh}
"""

from __future__ import annotations

import os
from pathlib import Path

from repair_pl.eren.editor import ErenEditor, Prompts
from repair_pl.eren.notebook import Notebook
from repair_pl.eren.reader import CachedReader, HFReader, OpenAIReader
from repair_pl.eren.retrieval import load_encoder


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file."""


def build_reader(model_cfg: dict):
    """The reader a ``model:`` section asks for, wrapped in a :class:`CachedReader`."""
    kind = model_cfg.get("reader", "hf")
    if kind == "openai":
        api = dict(model_cfg.get("openai") or {})
        if "base_url" not in api or "model" not in api:
            raise ValueError("model.openai needs base_url and model for reader: openai")
        key_env = api.pop("api_key_env", "OPENAI_API_KEY")
        return CachedReader(OpenAIReader(api.pop("base_url"), api.pop("model"), api_key=os.environ.get(key_env),
                                         max_tokens=model_cfg.get("max_new_tokens", 12),
                                         stop=model_cfg.get("stop") or (), **api))
    if kind != "hf":
        raise ValueError(f"model.reader must be 'hf' or 'openai', got {kind!r}")
    from repair_pl.models import load_model

    model, tokenizer = load_model(model_cfg.get("model", "smollm2"), dtype=model_cfg.get("dtype", "float32"),
                                  device=model_cfg.get("device", "cpu"))
    return CachedReader(HFReader(model, tokenizer, max_new_tokens=model_cfg.get("max_new_tokens", 12),
                                 batch_size=model_cfg.get("batch_size", 8), chat=model_cfg.get("chat"),
                                 system=model_cfg.get("system"), stop=model_cfg.get("stop") or ()))


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
                      prompts=Prompts(**prompts), min_score=model_cfg.get("min_score"),
                      min_relation_score=model_cfg.get("min_relation_score"), extract=bool(model_cfg.get("extract")))


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
    out.mkdir(parents=True, exist_ok=True)
    cases, summary = evaluate_editor(editor, records, dataset=Path(data_cfg["path"]).stem, T=cfg.get("T"),
                                     rule=model_cfg.get("match", "contains"),
                                     unrelated_per_kind=data_cfg.get("unrelated_per_kind"), progress=progress,
                                     checkpoint=out / "checkpoint.jsonl")  # a rerun resumes after its last slice
    summary["reader"] = model_cfg.get("model", "smollm2") if model_cfg.get("reader", "hf") == "hf" else \
        f"openai:{(model_cfg.get('openai') or {}).get('model')}"
    summary["encoder"], summary["k"] = editor.notebook.encoder.name, editor.k
    import yaml

    from repair_pl.checkpoint import write_file_atomic

    editor.notebook.save(out / "notebook")
    write_file_atomic(out / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))  # as the REPAIR runs do
    write_results(out, cases, summary)  # summary.json last: a sweep takes it as "this run is done"
    return summary


def _config_paths(argv: list[str]) -> list[str]:
    paths = []
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            paths.append(argv[i + 1])
        elif arg.startswith("--config="):
            paths.append(arg.split("=", 1)[1])
    return paths


def _overrides(argv: list[str]) -> list[tuple[str, str]]:
    """``--a.b=v`` / ``--a.b v`` pairs (LightningCLI style) and ``--set a.b=v``."""
    pairs, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("fit", "--config"):
            i += 2 if arg == "--config" else 1
            continue
        if arg.startswith("--config="):
            i += 1
            continue
        if arg == "--set" and i + 1 < len(argv):
            key, _, value = argv[i + 1].partition("=")
            pairs.append((key, value))
            i += 2
            continue
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            if not eq:
                if i + 1 >= len(argv):
                    raise SystemExit(f"option {arg} needs a value")
                value, i = argv[i + 1], i + 1
            pairs.append((key, value))
            i += 1
            continue
        raise SystemExit(f"unexpected argument {arg!r}; usage: [fit] --config FILE.yaml [--key.sub VALUE ...]")
    return pairs


def read_config(path: str | Path) -> dict:
    """One YAML config file as a mapping; :class:`ConfigError` naming the file otherwise."""
    import yaml

    try:
        cfg = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise ConfigError(f"config {path}: cannot read it ({err.strerror or err})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config {path}: not valid YAML ({' '.join(str(err).split())})") from None
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise ConfigError(f"config {path}: expected a mapping of sections (model:, data:, ...), "
                          f"got a {type(cfg).__name__}")
    for section in ("model", "data", "trainer"):
        if cfg.get(section) is not None and not isinstance(cfg[section], dict):
            raise ConfigError(f"config {path}: section {section!r} must be a mapping, "
                              f"got {type(cfg[section]).__name__}")
    return cfg


def _method_overrides(argv: list[str]) -> list[str]:
    """Every ``model.method`` an override on the command line sets, found token by token (so a
    malformed argument elsewhere, which :func:`main` reports, cannot hide it)."""
    methods = []
    for i, arg in enumerate(argv):
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if arg == "--model.method" and nxt is not None:
            methods.append(nxt)
        elif arg.startswith("--model.method="):
            methods.append(arg.split("=", 1)[1])
        elif arg == "--set" and nxt is not None and nxt.startswith("model.method="):
            methods.append(nxt.split("=", 1)[1])
    return methods


def is_eren_invocation(argv: list[str]) -> bool:
    """Whether a command line (``[fit] --config X.yaml ...``) asks for ``model.method: eren``;
    the project's CLI sends such command lines to :func:`main`.

    A config that cannot be read is reported with a warning naming it (it is then not
    consulted; the runner that takes the command line fails on it with its own message)."""
    import warnings

    method = None
    for path in _config_paths(argv):
        try:
            method = (read_config(path).get("model") or {}).get("method", method)
        except ConfigError as err:
            warnings.warn(f"{err}; not consulted for model.method", stacklevel=2)
    for value in _method_overrides(argv):
        method = value
    return method == "eren"


def main(argv: list[str] | None = None) -> dict:
    """``[fit] --config FILE.yaml [--model.k 3 --T 100 --set data.ds_size=50 ...]``: run EREN.

    Overrides are dotted config keys; values are parsed as YAML. Several ``--config`` files are
    merged in order (later keys win, section by section).
    """
    import sys

    import yaml

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(main.__doc__)
        return {}
    paths = _config_paths(argv)
    if not paths:
        raise SystemExit("EREN needs --config FILE.yaml (see configs/eren_cfh.yaml)")
    cfg: dict = {}
    for path in paths:
        for key, value in read_config(path).items():
            cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
    for key, value in _overrides(argv):
        node = cfg
        *parents, leaf = key.split(".")
        for depth, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"option --{key}: {'.'.join(parents[:depth + 1])} is a "
                                  f"{type(node).__name__}, not a section")
        try:
            node[leaf] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"option --{key}: value {value!r} is not valid YAML "
                              f"({' '.join(str(err).split())})") from None
    summary = run_config(cfg)
    print(f"ES {summary['es']:.4f}  BP {summary['bp']:.4f}  EQ {summary['eq']:.4f}  "
          f"seconds/query {summary['seconds_per_query']:.3f}", flush=True)
    print(f"summary: {Path(cfg.get('trainer', {}).get('default_root_dir', 'runs/eren')) / 'summary.json'}", flush=True)
    return summary
