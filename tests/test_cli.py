"""The command line end to end on the tiny random model (seconds)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from repair_pl.cli import module_arguments

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, timeout=300):
    cmd = [sys.executable, str(ROOT / "scripts" / "edit.py"), "fit", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


TINY = ["--model.model", "tiny-random", "--model.layer", "2", "--model.memory.n_prefixes", "1", "--model.max_steps", "3",
        "--trainer.enable_progress_bar", "false"]


def test_fit_writes_results_and_summary(tmp_path):
    proc = run_cli("--config", "configs/demo.yaml", *TINY, "--data.ds_size", "4", "--T", "2",
                   "--trainer.default_root_dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last == f"summary: {tmp_path / 'summary.json'}"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {"method", "dataset", "T", "n_edits", "pre", "post", "seconds_per_edit", "steps_per_edit"} <= set(summary)
    assert summary["method"] == "repair" and summary["dataset"] == "demo" and summary["T"] == 2
    assert summary["n_edits"] == 4 and summary["steps_per_edit"] <= 3 * 3  # error feedback may re-edit
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())["model"]  # the values really used
    assert saved["memory"]["init_args"]["score_tokens"] == "last" and saved["memory"]["init_args"]["n_prefixes"] == 1
    assert saved["components"]["distribution_aware"]["init_args"]["cluster_size"] == 20
    assert saved["components"]["distillation"] is None
    rebuilt = module_arguments(tmp_path / "config.yaml")  # the saved file is a config to rerun with
    assert rebuilt["memory"].n_prefixes == 1 and rebuilt["components"].distribution_aware.cluster_size == 20
    assert set(summary["pre"]) >= {"rewrite_acc", "rephrase_acc", "locality"}
    assert summary["pre"]["locality"] == 1.0
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results) == 4 and {"case_id", "requested_rewrite", "pre", "post"} <= set(results[0])
    assert isinstance(results[0]["post"]["locality"]["neighborhood_acc"], list)
    assert (tmp_path / "config.yaml").exists() and (tmp_path / "summary.md").exists()
    # demo.yaml turns the generated-answer evaluation on (the tiny tokenizer has no chat template)
    assert {"rewrite_gen_em", "rephrase_gen_em", "locality_gen"} <= set(summary["post"])
    assert summary["generation"]["templates"] == ["plain"] and set(results[0]["post"]["gen"]) == {"plain"}
    assert "post-edit: " in proc.stdout and "locality_gen=" in proc.stdout


def test_data_path_override_and_method_none(tmp_path):
    data = tmp_path / "edits.jsonl"
    data.write_text('{"src": "a b?", "alt": "c", "loc": "d", "loc_ans": "e"}\n'
                    '{"src": "f g?", "alt": "h", "loc": "i", "loc_ans": "j"}\n')
    proc = run_cli("--config", "configs/zsre.yaml", "--config", "configs/methods/none.yaml", "--model.model",
                   "tiny-random", "--model.layer", "2", "--trainer.enable_progress_bar", "false", "--data.path",
                   str(data), "--data.ds_size", "2", "--T", "2", "--trainer.default_root_dir", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["method"] == "none" and summary["dataset"] == "edits" and summary["steps_per_edit"] == 0
    assert summary["post"]["locality"] == 1.0
    # nothing edited: every generated answer is the unedited model's (zsre.yaml generates)
    assert summary["post"]["locality_gen"] == 1.0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert all(case["post"]["gen"] == case["pre"]["gen"] for case in results)


@pytest.mark.parametrize("args, message", [
    (["--data.path", "data/nope/missing.json"], "get_data.py"),
    (["--model.method", "rome"], "method"),
    (["--model.method", "wise"], "model.components are REPAIR's; method 'wise' has none"),
    (["--model.memory.bogus", "1"], "bogus"),
    (["--data.ds_size", "3", "--T", "5"], "T=5 is larger"),
    (["--model.layer", "9"], "model.layer=9 is out of range"),
])
def test_bad_config_fails_with_a_clear_message(tmp_path, args, message):
    proc = run_cli("--config", "configs/demo.yaml", *TINY, *args, "--trainer.default_root_dir", str(tmp_path))
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr  # one clear line, not a deep traceback


def printed_config(*configs: str) -> dict:
    """The configuration the CLI builds from ``configs`` (in order), as ``--print_config`` shows it."""
    proc = run_cli(*(arg for c in configs for arg in ("--config", c)), "--print_config")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return yaml.safe_load(proc.stdout)


def test_print_config():
    config = printed_config("configs/zsre.yaml")
    assert config["model"]["method"] == "repair" and config["data"]["ds_size"] == 100


def test_generation_is_on_for_zsre_and_the_demo_and_off_by_default():
    assert printed_config("configs/zsre.yaml", "configs/methods/wise.yaml")["generation"] is True
    assert printed_config("configs/demo.yaml")["generation"] is True
    assert printed_config("configs/counterfact.yaml")["generation"] is False


@pytest.mark.parametrize("method", ["wise", "ft_l", "ft_m", "grace", "none"])
def test_method_overlays_switch_every_part(method):
    model = printed_config("configs/zsre.yaml", f"configs/methods/{method}.yaml")["model"]
    assert model["method"] == method and model["components"] is None
    overlay = yaml.safe_load((ROOT / "configs" / "methods" / f"{method}.yaml").read_text())["model"]
    if method in ("ft_l", "ft_m", "grace"):  # another memory class: every option of it set by the overlay,
        # so nothing of zsre.yaml's side memory (lr 5.0) carries over into it
        assert model["memory"]["class_path"] == overlay["memory"]["class_path"]
        assert model["memory"]["init_args"] == overlay["memory"]["init_args"]
