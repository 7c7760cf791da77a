"""W&B logging from YAML (configs/wandb.yaml), offline by default, read back from the run folder."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("wandb")

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model.model", "tiny-random", "--model.layer", "2", "--model.memory.n_prefixes", "1", "--model.max_steps", "3",
        "--trainer.enable_progress_bar", "false"]


def test_offline_wandb_run_holds_the_per_edit_curves_and_final_metrics(tmp_path):
    from repair_pl.tracking import read_offline_run

    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}  # offline must be the default
    env["WANDB_CACHE_DIR"] = env["WANDB_CONFIG_DIR"] = str(tmp_path / "wandb-home")
    cmd = [sys.executable, str(ROOT / "scripts" / "edit.py"), "fit", "--config", "configs/demo.yaml",
           "--config", "configs/wandb.yaml", *TINY, "--data.ds_size", "2", "--T", "2", "--model.memory.lr", "2.0",
           "--trainer.default_root_dir", str(tmp_path / "run"),
           "--trainer.logger.init_args.save_dir", str(tmp_path / "run"),
           "--trainer.logger.init_args.group", "sweep-a", "--trainer.logger.init_args.name", "demo/wise_T2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1  # offline without an account, one W&B run per lifelong run
    logged = read_offline_run(runs[0])
    assert logged["run"]["group"] == "sweep-a" and logged["run"]["name"] == "demo/wise_T2"
    assert logged["run"]["project"] == "repair-pl"

    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    for stage in ("pre", "post"):
        for key, value in summary[stage].items():
            assert logged["summary"][f"{stage}/{key}"] == pytest.approx(value)
    # per-edit curves: one history row per edit with loss, steps, lr and intervention strength
    edits = [row for row in logged["history"] if "edit/loss" in row]
    assert len(edits) == 2
    assert all({"edit/steps", "edit/lr", "edit/intervention"} <= set(row) for row in edits)
    assert [row["edit/steps"] for row in edits] == [3, 3]
    assert all(row["edit/lr"] == pytest.approx(2.0) for row in edits)  # WISE: the configured lr, full strength

    # the final metrics table, pre and post rows, as W&B stored it
    table_row = next(row for row in logged["history"] if "summary/path" in row)
    table = json.loads((runs[0] / "files" / table_row["summary/path"]).read_text())
    rows = {row[table["columns"].index("stage")]: row for row in table["data"]}
    post = rows["post"]
    assert post[table["columns"].index("rewrite_acc")] == pytest.approx(summary["post"]["rewrite_acc"])
    assert post[table["columns"].index("locality")] == pytest.approx(summary["post"]["locality"])
