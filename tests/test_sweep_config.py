"""The W&B sweep config: the arguments a `wandb agent` passes (`--model.memory.lr=0.5`) reach the
LightningCLI; the sweep's objective is logged. No wandb needed."""

import csv
import math
from pathlib import Path

import pytest
import yaml

from repair_pl import EditRecord, RepairModule
from repair_pl.presets import preset
from repair_pl.cli import main
from repair_pl.lifelong import edit_score, run_lifelong
from repair_pl.testing import char_tokenizer, tiny_llama
from repair_pl.tracking import sweep_run_dir

ROOT = Path(__file__).resolve().parents[1]
SWEEP = yaml.safe_load((ROOT / "configs" / "sweep_wandb.yaml").read_text())


def _agent_value(spec: dict):
    """A value as the agent would draw it: a listed one, or inside the range."""
    if "values" in spec:
        return spec["values"][1]
    if spec.get("distribution") == "log_uniform_values":
        return round(math.sqrt(spec["min"] * spec["max"]), 4)
    return round((spec["min"] + spec["max"]) / 2, 4)


def test_sweep_searches_the_documented_knobs():
    assert SWEEP["method"] in ("bayes", "random") and SWEEP["metric"] == {"name": "post/score", "goal": "maximize"}
    assert set(SWEEP["parameters"]) == {"model.layer", "model.memory.lr", "model.memory.act_ratio",
                                        "model.components.progressive.decay_factor",
                                        "model.components.distribution_aware.cluster_size"}
    assert (ROOT / SWEEP["program"]).exists() and SWEEP["command"][-1] == "${args}"


def test_agent_arguments_parse_with_lightning_cli(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    drawn = {name: _agent_value(spec) for name, spec in SWEEP["parameters"].items()}
    command = SWEEP["command"]
    argv = command[command.index("${program}") + 1: -1] + [f"--{k}={v}" for k, v in drawn.items()]
    with pytest.raises(SystemExit) as exit_:
        main(argv + ["--print_config"])
    assert exit_.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    for name, value in drawn.items():
        node = printed
        for key in name.split("."):
            node = node.get("init_args", node)[key]  # class_path/init_args nest the options of a part
        assert node == value, name
    assert printed["model"]["method"] == "repair" and printed["data"]["start"] == 500


def test_the_objective_is_logged_and_runs_of_a_sweep_get_their_own_folder(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import CSVLogger

    assert edit_score({"rewrite_acc": 1.0, "rephrase_acc": 0.5, "locality": 0.0, "rewrite_ppl": 9.0}) == 0.5
    module = RepairModule(tiny_llama(), char_tokenizer(), **preset("wise", layer=2, n_prefixes=1, max_steps=2))
    record = EditRecord(prompt="Who leads Acme?", target="Zed", locality=(("sky is", "blue"),))
    logger = CSVLogger(tmp_path, name="log")
    summary = run_lifelong(module, [record], tmp_path / "run", logger=logger, progress=False)
    rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    logged = [float(r["post/score"]) for r in rows if r.get("post/score")]
    assert logged == [pytest.approx(edit_score(summary["post"]))]

    monkeypatch.delenv("WANDB_SWEEP_ID", raising=False)
    assert sweep_run_dir(tmp_path) == tmp_path
    monkeypatch.setenv("WANDB_SWEEP_ID", "abc")
    monkeypatch.setenv("WANDB_RUN_ID", "r1")
    assert sweep_run_dir(tmp_path) == tmp_path / "abc" / "r1"
