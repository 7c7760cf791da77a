"""Every config in configs/ parses and builds (as litgpt's test_config_hub does): its parts are
instantiated, its data loads, and a RepairModule is built from it on the tiny random model."""

from pathlib import Path

import pytest
import yaml

from repair_pl.cli import module_arguments
from repair_pl.data import EditDataModule
from repair_pl.module import RepairModule
from repair_pl.presets import METHODS, preset
from repair_pl.testing import char_tokenizer, tiny_llama

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
DATASETS = sorted(p for p in CONFIGS.glob("*.yaml") if "path" in ((yaml.safe_load(p.read_text()) or {}).get("data") or {})
                  and not p.stem.startswith("eren_"))
OVERLAYS = sorted(CONFIGS.glob("methods/*.yaml"))


def test_the_lists_cover_every_weight_editing_config():
    named = {p.name for p in DATASETS} | {p.name for p in OVERLAYS if p.parent == CONFIGS}
    rest = {p.name for p in CONFIGS.glob("*.yaml")} - named
    assert rest == {"eren_cfh.yaml", "eren_zsre.yaml", "eren_fever.yaml", "sweep_wandb.yaml", "wandb.yaml"} - {
        n for n in ("eren_fever.yaml",) if not (CONFIGS / n).exists()}
    methods = {p.stem: yaml.safe_load(p.read_text())["model"]["method"] for p in OVERLAYS}
    assert set(methods.values()) <= set(METHODS)
    # every method but REPAIR (the dataset configs) has its overlay, named after it; REPAIR's variants say so
    assert {m for stem, m in methods.items() if stem == m} == set(METHODS) - {"repair"}
    assert all(stem.startswith(m) for stem, m in methods.items())


def build(*configs: Path) -> RepairModule:
    """The config's module with its own parts, on the tiny model (layer 2 of 4)."""
    kwargs = module_arguments(*configs)
    kwargs = preset(kwargs["method"], base={**kwargs, "layer": 2, "dtype": "float32", "device_map": None})
    return RepairModule(tiny_llama(), char_tokenizer(), **kwargs)


@pytest.mark.parametrize("config", DATASETS, ids=lambda p: p.stem)
def test_dataset_config_builds_its_module_and_loads_its_data(config):
    cfg = yaml.safe_load(config.read_text())
    module = build(config)
    assert module.method == cfg["model"]["method"] == "repair"
    assert type(module.memory).__name__ == cfg["model"]["memory"]["class_path"].rsplit(".", 1)[-1]
    datamodule = EditDataModule(**cfg["data"])
    datamodule.setup()
    assert datamodule.records and all(r.routing_prompt for r in datamodule.records)
    T = cfg.get("T")
    assert T is None or T <= len(datamodule.records), f"T={T} asks for more records than {config.name} yields"


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.stem)
def test_overlay_on_zsre_builds_the_method_it_names(overlay):
    module = build(CONFIGS / "zsre.yaml", overlay)
    assert module.method == yaml.safe_load(overlay.read_text())["model"]["method"]
    assert (module.components is None) == (module.method != "repair")


@pytest.mark.parametrize("config", sorted(CONFIGS.glob("eren_*.yaml")), ids=lambda p: p.stem)
def test_eren_config_builds_its_editor_and_loads_its_data(config):
    """EREN's configs go through their own runner: the editor (prompts, gates, k) builds and the
    records it selects load, with enough of them for its T."""
    from repair_pl.eren.retrieval import load_encoder
    from repair_pl.eren.run import build_editor, load_config_records, read_config

    cfg = read_config(config)
    assert cfg["model"]["method"] == "eren"
    editor = build_editor(cfg["model"], reader=lambda prompts: ["x"] * len(prompts), encoder=load_encoder("hash:64"))
    assert editor.k == cfg["model"].get("k", 5) and editor.min_score == cfg["model"].get("min_score")
    records = load_config_records(cfg["data"])
    assert records and (cfg.get("T") is None or cfg["T"] <= len(records))
