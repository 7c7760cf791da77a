"""The comparison sweep (scripts/compare.py, repair_pl.sweep): plan, resume, table, plots."""

import json
from pathlib import Path

import pytest
import yaml

from repair_pl.sweep import Run, SweepError, collect, comparison_table, find_config, plan, run_sweep
from repair_pl.testing import load_script

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--", "--model.layer", "2", "--model.max_steps", "2", "--generation_examples", "0",
        "--trainer.enable_progress_bar", "false"]


def load_compare():
    return load_script(ROOT / "scripts" / "compare.py")


def test_plan_is_datasets_x_T_x_methods_and_skips_T_beyond_the_data(tmp_path):
    config = tmp_path / "mine.yaml"
    config.write_text((ROOT / "configs" / "demo.yaml").read_text())
    runs, notes = plan(["demo", str(config)], ["wise", "ft_l"], [10, 50], ablations=["closed_loop"])
    assert [(r.dataset, r.name, r.T) for r in runs] == [
        ("demo", "wise", 10), ("demo", "ft_l", 10), ("demo", "repair-no-closed_loop", 10),
        ("mine", "wise", 10), ("mine", "ft_l", 10), ("mine", "repair-no-closed_loop", 10)]
    assert notes == ["demo: T=50 skipped, the data has 40 records", "mine: T=50 skipped, the data has 40 records"]
    assert all(r.n_records == 10 for r in runs)
    assert runs[0].args == ("--config", str(find_config("methods/wise")))  # the method's overlay
    assert runs[2].args == ("--model.components.closed_loop", "null")  # REPAIR (the dataset config) minus one part
    assert runs[0].folder(tmp_path / "out") == tmp_path / "out" / "demo" / "wise_T10"


def test_ds_size_is_capped_by_the_data_and_must_cover_T():
    runs, notes = plan(["demo"], ["wise"], [10], ds_size=100)
    assert runs[0].n_records == 40 and "uses all 40 records" in notes[0]
    with pytest.raises(SweepError, match="smaller than T=10"):
        plan(["demo"], ["wise"], [10], ds_size=5)
    with pytest.raises(SweepError, match="configs/nope.yaml"):
        plan(["nope"], ["wise"], [10])


def test_run_arguments_carry_the_wandb_group_and_name(tmp_path):
    run = Run("zsre", Path("configs/zsre.yaml"), "repair", 10, 10, ())
    args = run.cli_args(tmp_path, ["--model.max_steps", "5"], wandb={"config": "configs/wandb.yaml", "group": "g"})
    pairs = dict(zip(args[1::2], args[2::2]))
    assert args[0] == "fit" and args[-2:] == ["--model.max_steps", "5"]  # user overrides come last
    assert pairs["--trainer.logger.init_args.group"] == "g"
    assert pairs["--trainer.logger.init_args.name"] == "zsre/repair_T10"
    assert pairs["--trainer.logger.init_args.save_dir"] == str(tmp_path / "zsre" / "repair_T10")
    assert pairs["--T"] == "10" and pairs["--data.ds_size"] == "10"


def summary(method, T, rel, loc, ood=None):
    post = {"rewrite_acc": rel, "rephrase_acc": rel / 2, "locality": loc, "rewrite_ppl": 3.5}
    if ood is not None:
        post["ood_acc"] = ood
    return {"method": method, "T": T, "n_edits": T, "pre": {}, "post": post, "steps_per_edit": 12.5,
            "seconds_per_edit": 0.75, "n_failed": 1}


def write_runs(out, runs):
    for dataset, name, s in runs:
        folder = out / dataset / f"{name}_T{s['T']}"
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text(json.dumps(s))


def test_table_has_one_section_per_dataset_and_ood_only_where_measured(tmp_path):
    write_runs(tmp_path, [("zsre", "wise", summary("wise", 10, 0.9, 0.95)),
                          ("zsre", "repair", summary("repair", 10, 1.0, 0.99)),
                          ("zsre", "repair", summary("repair", 50, 0.8, 0.9)),
                          ("temporal", "wise", summary("wise", 10, 0.7, 0.8, ood=0.25))])
    rows = collect(tmp_path, order=["repair", "wise"])
    assert [(r["dataset"], r["run"], r["T"]) for r in rows] == [
        ("temporal", "wise", 10), ("zsre", "repair", 10), ("zsre", "repair", 50), ("zsre", "wise", 10)]
    text = comparison_table(rows, notes=["temporal: T=100 skipped, the data has 75 records"])
    temporal, zsre = text.split("## temporal")[1].split("## zsre")
    assert "| method | T | n | Rel | Gen | Loc | OOD | PPL | steps/edit | s/edit | failed |" in temporal
    assert "| wise | 10 | 10 | 0.700 | 0.350 | 0.800 | 0.250 | 3.500 | 12.5 | 0.75 | 1 |" in temporal
    assert "OOD" not in zsre and "| repair | 50 | 50 | 0.800 | 0.400 | 0.900 | 3.500 |" in zsre
    assert "T=100 skipped" in text.split("## Not run")[1]


def test_a_run_over_several_chunks_shows_the_mean_and_std_over_chunks():
    row = {**summary("repair", 10, 0.9, 1.0), "n_edits": 30, "dataset": "zsre", "run": "repair",
           "chunk_spread": {"rewrite_acc": {"mean": 0.88, "std": 0.05, "min": 0.8, "max": 0.95}}}
    text = comparison_table([row])
    assert "| repair | 10 | 30 | 0.880 ± 0.050 | 0.450 | 1.000 |" in text  # columns without a spread: the mean


def test_generated_columns_and_long_streams_appear_for_the_runs_that_have_them():
    plain = {**summary("wise", 10, 0.9, 1.0), "dataset": "zsre", "run": "wise"}
    post = {**summary("repair", 250, 0.8, 0.99)["post"], "rewrite_gen_em": 0.25, "rephrase_gen_em": 0.125,
            "locality_gen": 0.5}
    blocks = [{"edits": 100, "seconds_per_edit": 1.5, "peak_rss_mb": 900.0, "rss_mb": 700.0},
              {"edits": 200, "seconds_per_edit": 1.75, "peak_rss_mb": 950.0, "rss_mb": 720.0},
              {"edits": 250, "rest_after": 200, "seconds": 12.0}]
    stream = {**summary("repair", 250, 0.8, 0.99), "post": post, "n_edits": 250, "seconds_per_edit": 2.0,
              "blocks": blocks, "dataset": "zsre", "run": "repair"}
    text = comparison_table([stream, plain])
    assert "| Rel | Gen | Loc | PPL | gen Rel | gen Gen | gen Loc | steps/edit |" in text
    assert "| repair | 250 | 250 | 0.800 | 0.400 | 0.990 | 3.500 | 0.250 | 0.125 | 0.500 |" in text
    assert "| wise | 10 | 10 | 0.900 | 0.450 | 1.000 | 3.500 | - | - | - |" in text  # generation off: no value
    streams = text.split("## Long streams")[1]
    # 250 edits x 2 s = 8.3 min; the rest entry (no seconds_per_edit) is not a block
    assert "| zsre | repair | 250 | 250 | 8.3 min | 1.50 1.75 (per 100) | 900 / 950 | 700 / 720 |" in streams
    assert "wise" not in streams
    assert "## Long streams" not in comparison_table([plain])


def test_plots_are_written_next_to_the_summary(tmp_path):
    pytest.importorskip("matplotlib")
    from repair_pl.plots import plot_sweep

    write_runs(tmp_path, [("zsre", "wise", summary("wise", 10, 0.9, 0.95)),
                          ("zsre", "wise", summary("wise", 100, 0.6, 0.7)),
                          ("temporal", "repair", summary("repair", 10, 0.7, 0.8, ood=0.25))])
    paths = plot_sweep(collect(tmp_path), tmp_path)
    assert sorted(p.name for p in paths) == ["locality_vs_T.png", "temporal_metrics_vs_T.png",
                                             "zsre_metrics_vs_T.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_rerun_finishes_only_the_missing_run(tmp_path, capsys):
    compare = load_compare()
    out = tmp_path / "sweep"
    argv = ["--datasets", "demo", "--T", "2", "50", "--methods", "wise", "none", "--model", "tiny-random",
            "--out", str(out), *TINY]
    assert compare.main(argv) == 0
    first = capsys.readouterr().out
    assert "note: demo: T=50 skipped, the data has 40 records" in first
    wise, none = out / "demo" / "wise_T2" / "summary.json", out / "demo" / "none_T2" / "summary.json"
    assert json.loads(wise.read_text())["steps_per_edit"] == 2 and none.exists()
    assert "| wise | 2 | 2 |" in (out / "COMPARISON_SUMMARY.md").read_text()
    # the unedited model is scored by the first run only; the second reads the same scores
    assert first.count("pre-edit evaluation read from") == 1
    assert len(list((out / "demo" / "pre_edit").glob("pre_edit_*.json"))) == 1
    assert json.loads(wise.read_text())["pre"] == json.loads(none.read_text())["pre"]

    none.unlink()  # as if the sweep had been killed during this run (no summary.json)
    kept = wise.stat().st_mtime_ns
    assert compare.main(argv) == 0
    second = capsys.readouterr().out
    assert f"skip {wise.parent} (done)" in second and f"run {none.parent}" in second
    assert f"run {wise.parent}" not in second
    assert wise.stat().st_mtime_ns == kept and none.exists()
    table = (out / "COMPARISON_SUMMARY.md").read_text()
    assert "| wise | 2 | 2 |" in table and "| none | 2 | 2 |" in table
    assert table.index("| wise |") < table.index("| none |")  # rows in the order of --methods


class Killed(BaseException):
    """Stands in for the process dying: the sweep does not catch it."""


def test_a_run_killed_before_its_outputs_are_all_written_is_not_taken_as_done(tmp_path, monkeypatch, capsys):
    from repair_pl.module import RepairModule

    runs, _ = plan(["demo"], ["wise"], [2])
    out, folder = tmp_path / "sweep", runs[0].folder(tmp_path / "sweep")
    extra = ["--model.model", "tiny-random", *TINY[1:]]
    real = RepairModule.save_edits

    def killed_at_the_final_state(self, path):
        if Path(path) == folder / "edits":  # checkpoints go through; the run's last output does not
            raise Killed
        return real(self, path)

    with monkeypatch.context() as patch:
        patch.setattr(RepairModule, "save_edits", killed_at_the_final_state)
        with pytest.raises(Killed):
            run_sweep(runs, out, extra)
    capsys.readouterr()
    assert run_sweep(runs, out, extra) == []
    assert f"run {folder}" in capsys.readouterr().out  # redone, not skipped as done
    assert (folder / "edits").is_dir() and (folder / "summary.md").is_file() and (folder / "summary.json").is_file()


def test_jobs_run_side_by_side_in_processes_with_their_own_logs(tmp_path, capsys):
    compare = load_compare()
    out = tmp_path / "sweep"
    argv = ["--datasets", "demo", "--T", "2", "3", "--methods", "wise", "--model", "tiny-random", "--out", str(out),
            "--jobs", "2", *TINY]
    assert compare.main(argv) == 0
    printed = capsys.readouterr().out
    for T in (2, 3):
        folder = out / "demo" / f"wise_T{T}"
        assert json.loads((folder / "summary.json").read_text())["steps_per_edit"] == 2
        assert "post-edit:" in (folder / "run.log").read_text() and f"done {folder} in " in printed
    assert "| wise | 2 | 2 |" in printed and "| wise | 3 | 3 |" in printed
    # a run that fails says why from its own log, and the others are unaffected
    bad = ["--datasets", "demo", "--T", "2", "4", "--methods", "wise", "--model", "tiny-random", "--out", str(out),
           "--jobs", "2", "--", "--model.layer", "9"]
    assert compare.main(bad) == 1
    captured = capsys.readouterr()
    assert f"skip {out / 'demo' / 'wise_T2'} (done)" in captured.out
    assert "model.layer=9 is out of range" in captured.err and "wise_T4" in captured.err
    assert compare.main(["--datasets", "demo", "--jobs", "0", "--out", str(out)]) == 2
    assert "--jobs must be at least 1" in capsys.readouterr().err


def test_jobs_start_the_largest_T_first(tmp_path, monkeypatch):
    import time

    import repair_pl.sweep as sweep

    started = []

    def fake(args, folder, threads):
        started.append(int(args[args.index("--T") + 1]))
        time.sleep(0.2 if len(started) == 1 else 0.05)
        (folder / "summary.json").write_text("{}")

    monkeypatch.setattr(sweep, "_run_in_subprocess", lambda args, folder, threads: fake(args, folder, threads))
    monkeypatch.setattr(sweep, "write_comparison", lambda *a, **k: None)
    runs, _ = plan(["demo"], ["wise"], [2, 10, 5, 3])
    for run in runs:
        run.folder(tmp_path).mkdir(parents=True)
    assert run_sweep(runs, tmp_path, jobs=2, log=lambda line: None) == []
    # two workers: 10 and 5 start together; 3 then 2 follow as they free up
    assert sorted(started[:2]) == [5, 10] and started[2:] == [3, 2]


def test_unknown_method_or_dataset_is_a_clear_error(tmp_path, capsys):
    compare = load_compare()
    assert compare.main(["--datasets", "demo", "--methods", "rome", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown method 'rome': there is no configs/methods/rome.yaml" in err and "wise" in err
    assert compare.main(["--datasets", "nosuch", "--methods", "wise", "--out", str(tmp_path)]) == 2
    assert "configs/nosuch.yaml" in capsys.readouterr().err


def test_a_failed_run_is_reported_and_the_sweep_goes_on(tmp_path, capsys):
    compare = load_compare()
    out = tmp_path / "sweep"
    # layer 9 does not exist in the 4-layer tiny model: every run fails at start-up
    argv = ["--datasets", "demo", "--T", "2", "3", "--methods", "wise", "--model", "tiny-random", "--out", str(out),
            "--", "--model.layer", "9"]
    assert compare.main(argv) == 1
    captured = capsys.readouterr()
    assert captured.out.count("failed ") == 2 and "model.layer=9 is out of range" in captured.err
    assert not list(out.glob("*/*/summary.json"))
    not_run = (out / "COMPARISON_SUMMARY.md").read_text().split("## Not run")[1]
    assert "demo/wise_T2 failed" in not_run and "demo/wise_T3 failed" in not_run


def test_eren_runs_from_its_own_config_through_the_sweep(tmp_path, monkeypatch, capsys):
    import repair_pl.eren.run as eren_run
    from test_eren_run import cfh_file, reader

    data = cfh_file(tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "mine.yaml").write_text(yaml.safe_dump({"data": {"path": str(data)}}))
    (tmp_path / "configs" / "eren_mine.yaml").write_text(yaml.safe_dump(
        {"model": {"method": "eren", "encoder": "hash:64"}, "data": {"path": str(data), "format": "cfh"}}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(eren_run, "build_reader", lambda cfg: reader)
    runs, notes = plan(["mine", "demo"], ["eren"], [2])
    assert [(r.dataset, r.name, r.config.name) for r in runs] == [("mine", "eren", "eren_mine.yaml")]
    assert notes == ["demo: eren skipped, there is no configs/eren_demo.yaml"]
    assert run_sweep(runs, tmp_path / "out") == []
    summary = json.loads((tmp_path / "out" / "mine" / "eren_T2" / "summary.json").read_text())
    assert summary["n_edits"] == 2


def test_a_task_only_eren_runs_goes_through_the_sweep(tmp_path, monkeypatch):
    """FEVER has configs/eren_fever.yaml but no weight-editing config: the sweep runs EREN on it,
    notes the other methods as skipped, and the table shows ES / BP / EQ."""
    import repair_pl.eren.run as eren_run
    from test_eren_fever import ROWS, VerdictReader

    data = tmp_path / "facts.json"
    data.write_text(json.dumps(ROWS))
    (tmp_path / "configs").mkdir()
    prompts = {"read": "Note: {notes}\nClaim: {question}\nVerdict:", "closed_book": "Claim: {question}\nVerdict:",
               "note": "{text}", "irrelevant": ["impossible to say"]}
    (tmp_path / "configs" / "eren_facts.yaml").write_text(yaml.safe_dump(
        {"model": {"method": "eren", "encoder": "hash:256", "k": 1, "match": "verdict", "prompts": prompts},
         "data": {"path": str(data), "format": "fever"}}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(eren_run, "build_reader", lambda cfg: VerdictReader())
    runs, notes = plan(["facts"], ["wise", "eren"], [2])
    assert [(r.dataset, r.name, r.T, r.n_records) for r in runs] == [("facts", "eren", 2, 2)]
    assert notes == ["facts: wise skipped, there is no configs/facts.yaml (EREN only)"]
    with pytest.raises(SweepError, match="no config for 'facts'"):
        plan(["facts"], ["wise"], [2])
    assert run_sweep(runs, tmp_path / "out", notes=notes) == []
    table = (tmp_path / "out" / "COMPARISON_SUMMARY.md").read_text()
    assert "| method | T | n | Rel | Gen | Loc | ES | BP | EQ |" in table
    assert "| eren | 2 | 2 | 1.000 | 1.000 | 1.000 | 1.000 | 1.000 | 1.000 |" in table


def test_module_arguments_merge_configs_as_the_cli_does():
    from repair_pl.cli import module_arguments

    repair = module_arguments(find_config("zsre"))
    assert "model" not in repair and repair["method"] == "repair"
    assert repair["memory"].lr == 5.0 and repair["memory"].score_tokens == "last"  # configs/zsre.yaml
    assert repair["components"].distribution_aware.cluster_size == 20
    wise = module_arguments(find_config("zsre"), find_config("methods/wise"))
    assert wise["memory"].lr == 5.0 and wise["memory"].score_tokens == "mean" and wise["components"] is None
    grace = module_arguments(find_config("zsre"), find_config("methods/grace"))
    assert type(grace["memory"]).__name__ == "GraceCodebook" and grace["memory"].lr == 300.0
