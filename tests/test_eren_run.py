"""EREN config runner (the ``method: eren`` CLI branch) and scripts/eren_eval.py."""

import json
from pathlib import Path

import pytest
import yaml

from repair_pl.eren import HashEncoder
from repair_pl.eren.run import build_editor, main, run_config
from repair_pl.testing import load_script

REPO = Path(__file__).resolve().parents[1]


def reader(prompt):
    """Answers from the note when it names the question's subject, else says so; closed-book
    prompts get a fixed answer."""
    question = prompt.rsplit("Question: ", 1)[1].strip()
    if "Notes:" in prompt:
        subject = question.split("'s")[0].split()[-1]
        return "English" if subject in prompt.split("Question:")[0] else "unanswerable"
    return "French"


def cfh_file(tmp_path):
    rows = [{"id": i, "edit_statement": f"Person{i}'s mother tongue is English.", "subject_name": f"Person{i}",
             "edit_scope": [[f"What is Person{i}'s mother tongue?", "English"]], "edit_scope_true_ans": ["French"],
             "unrelated": {"neighbor_subj": [f"What is Other{i}'s mother tongue?"], "same_subj": []},
             "unrelated_true_ans": {"neighbor_subj": ["French"], "same_subj": []}} for i in range(3)]
    path = tmp_path / "cfh.json"
    path.write_text(json.dumps(rows))
    return path


def test_run_config_writes_results(tmp_path):
    cfg = {"T": None, "model": {"method": "eren", "k": 2, "prompts": {"irrelevant": ["unanswerable"]}},
           "data": {"path": str(cfh_file(tmp_path)), "ds_size": 2, "offset": 1},
           "trainer": {"default_root_dir": str(tmp_path / "out")}}
    summary = run_config(cfg, reader=reader, encoder=HashEncoder(128), progress=False)
    assert (summary["es"], summary["bp"], summary["n_edits"], summary["k"]) == (1.0, 1.0, 2, 2)
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == {"results.json", "summary.json", "summary.md", "notebook", "config.yaml"}
    assert [c["case_id"] for c in json.loads((out / "results.json").read_text())] == [1, 2]
    assert (out / "notebook" / "notes.jsonl").read_text().count("\n") == 2


def test_a_run_killed_while_saving_its_notebook_has_no_summary_json(tmp_path, monkeypatch):
    from repair_pl.eren import Notebook

    class Killed(BaseException):
        """Stands in for the process dying."""

    def killed(self, folder):
        raise Killed

    monkeypatch.setattr(Notebook, "save", killed)
    cfg = {"model": {"method": "eren", "k": 2}, "data": {"path": str(cfh_file(tmp_path)), "ds_size": 2},
           "trainer": {"default_root_dir": str(tmp_path / "out")}}
    with pytest.raises(Killed):
        run_config(cfg, reader=reader, encoder=HashEncoder(16), progress=False)
    assert not (tmp_path / "out" / "summary.json").exists()  # a sweep must not take the run as done


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown model.prompts"):
        build_editor({"prompts": {"reed": "x"}}, reader=reader, encoder=HashEncoder(8))
    with pytest.raises(ValueError, match="method: eren"):
        run_config({"model": {"method": "wise"}, "data": {"path": "x"}})
    with pytest.raises(ValueError, match="more records"):
        run_config({"data": {"path": str(cfh_file(tmp_path)), "ds_size": 5}}, reader=reader, encoder=HashEncoder(8))
    with pytest.raises(ValueError, match="base_url"):
        build_editor({"reader": "openai"}, encoder=HashEncoder(8))


def test_main_with_overrides(tmp_path, monkeypatch, capsys):
    import repair_pl.eren.run as run

    config = tmp_path / "eren.yaml"
    config.write_text(yaml.safe_dump({"model": {"method": "eren", "encoder": "hash:64"},
                                      "data": {"path": str(cfh_file(tmp_path))},
                                      "trainer": {"default_root_dir": str(tmp_path / "o")}}))
    monkeypatch.setattr(run, "build_reader", lambda cfg: reader)
    summary = main(["fit", "--config", str(config), "--model.k", "1", "--set", "data.ds_size=2"])
    assert summary["k"] == 1 and summary["n_edits"] == 2 and "ES 1.0000" in capsys.readouterr().out
    assert main(["--config=" + str(config), "--data.ds_size=3", "--T", "1"])["T"] == 1
    with pytest.raises(SystemExit, match="needs --config"):
        main(["fit"])
    with pytest.raises(SystemExit, match="unexpected argument"):
        main(["--config", str(config), "stray"])


def test_is_eren_invocation(tmp_path):
    from repair_pl.eren.run import is_eren_invocation

    eren, wise = tmp_path / "e.yaml", tmp_path / "w.yaml"
    eren.write_text("model:\n  method: eren\n")
    wise.write_text("model:\n  method: wise\n")
    assert is_eren_invocation(["fit", "--config", str(eren)])
    assert is_eren_invocation(["fit", f"--config={REPO / 'configs' / 'eren_zsre.yaml'}"])
    assert not is_eren_invocation(["fit", "--config", str(wise)])
    assert is_eren_invocation(["fit", "--config", str(wise), "--model.method=eren"])
    with pytest.warns(UserWarning, match="missing.yaml: cannot read it"):
        assert not is_eren_invocation(["fit", "--config", str(tmp_path / "missing.yaml")])
    assert not is_eren_invocation(["fit", "--config", str(REPO / "configs" / "zsre.yaml")])


BAD_CONFIGS = {"broken.yaml": ("model: {method: eren\n", "not valid YAML"),
               "list.yaml": ("- model\n- data\n", "expected a mapping of sections"),
               "section.yaml": ("model: eren\n", "section 'model' must be a mapping")}


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_unreadable_config_is_reported(tmp_path, name):
    """A config the EREN check cannot read is named in a warning (it used to be skipped in
    silence), and EREN's runner refuses it with an error naming the file."""
    from repair_pl.eren.run import ConfigError, is_eren_invocation

    text, reason = BAD_CONFIGS[name]
    path = tmp_path / name
    path.write_text(text)
    with pytest.warns(UserWarning, match=f"config {path}: {reason}"):
        assert not is_eren_invocation(["fit", "--config", str(path)])
    with pytest.raises(ConfigError, match=f"config {path}: {reason}"):
        main(["fit", "--config", str(path)])
    with pytest.raises(ConfigError, match="missing.yaml: cannot read it"):
        main(["fit", "--config", str(tmp_path / "missing.yaml")])


def test_method_override_found_despite_a_malformed_argument(tmp_path):
    """``--model.method eren`` after an argument the override parser rejects still makes the
    command line EREN's, so EREN's runner reports the bad argument (the parse error used to be
    swallowed and the command line handed to the weight-editing CLI)."""
    from repair_pl.eren.run import is_eren_invocation

    wise = tmp_path / "w.yaml"
    wise.write_text("model:\n  method: wise\n")
    for tail in (["stray", "--model.method=eren"], ["--model.k", "--model.method", "eren"],
                 ["--set", "model.method=eren", "stray"]):
        assert is_eren_invocation(["fit", "--config", str(wise), *tail]), tail
    with pytest.raises(SystemExit, match="unexpected argument 'stray'"):
        main(["fit", "--config", str(wise), "stray", "--model.method=eren"])


def test_bad_override_names_the_option(tmp_path):
    from repair_pl.eren.run import ConfigError

    config = tmp_path / "eren.yaml"
    config.write_text("T: 2\nmodel: {method: eren}\n")
    with pytest.raises(ConfigError, match=r"option --model.k: value '\[1' is not valid YAML"):
        main(["--config", str(config), "--model.k", "[1"])
    with pytest.raises(ConfigError, match="option --T.x: T is a int, not a section"):
        main(["--config", str(config), "--T.x", "1"])


@pytest.mark.parametrize("name", ["eren_cfh.yaml", "eren_zsre.yaml"])
def test_shipped_configs_build(name):
    cfg = yaml.safe_load((REPO / "configs" / name).read_text())
    assert cfg["model"]["method"] == "eren"
    editor = build_editor({**cfg["model"], "encoder": "hash"}, reader=reader)
    assert (editor.k, editor.min_score) == (cfg["model"]["k"], cfg["model"]["min_score"])


def test_eval_script_bench_index(capsys):
    script = load_script(REPO / "scripts" / "eren_eval.py")
    script.main(["--bench-index"])
    out = capsys.readouterr().out
    assert "top-5 of 10000 x 384, batch 1" in out and "ms/query" in out


def test_project_cli_dispatches_method_eren(tmp_path, monkeypatch, capsys):
    """``scripts/edit.py fit --config eren.yaml`` (repair_pl.cli.main) runs EREN; a bad EREN
    config ends with one clear line, as the REPAIR runs do."""
    import repair_pl.eren.run as run
    from repair_pl.cli import main as cli_main

    config = tmp_path / "eren.yaml"
    config.write_text(yaml.safe_dump({"T": 2, "model": {"method": "eren", "encoder": "hash:64"},
                                      "data": {"path": str(cfh_file(tmp_path)), "ds_size": 2},
                                      "trainer": {"default_root_dir": str(tmp_path / "o")}}))
    monkeypatch.setattr(run, "build_reader", lambda cfg: reader)
    cli_main(["fit", "--config", str(config)])
    assert f"summary: {tmp_path / 'o' / 'summary.json'}" in capsys.readouterr().out
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert (summary["method"], summary["n_edits"], summary["es"], summary["bp"]) == ("eren", 2, 1.0, 1.0)
    assert yaml.safe_load((tmp_path / "o" / "config.yaml").read_text())["model"]["method"] == "eren"
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(config), "--model.prompts", "{reed: x}"])
    assert exit_info.value.code == 2 and "unknown model.prompts" in capsys.readouterr().err


def test_eval_script_analyze(tmp_path, capsys):
    cfg = {"model": {"method": "eren", "k": 1}, "data": {"path": str(cfh_file(tmp_path))},
           "trainer": {"default_root_dir": str(tmp_path / "out")}}
    run_config(cfg, reader=reader, encoder=HashEncoder(128), progress=False)
    script = load_script(REPO / "scripts" / "eren_eval.py")
    breakdown = script.main(["--analyze", str(tmp_path / "out"), "--min-score", "1.01"])  # gate shuts everything
    assert breakdown["in_scope"]["gated"] == 1.0 and breakdown["unrelated"]["judged_relevant"] == 0.0
    assert "ES 0.0  BP 100.0" in capsys.readouterr().out
    ungated = script.main(["--analyze", str(tmp_path / "out"), "--grid", "--records", "1-2"])
    out = capsys.readouterr().out
    assert ungated["scores"] == {"es": 1.0, "bp": 1.0, "eq": 1.0} and ungated["n_in_scope"] == 2
    assert "2 records; with min_score None" in out and "0.7/0.3: 50.0 100.0 66.7" in out
