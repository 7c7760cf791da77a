"""Reliability: checkpoint/resume (in process and with a real SIGKILL), determinism, NaN edits
reported, config errors named, bad input on the record -> tokens path."""

import json
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from repair_pl.data import EditDataError, EditRecord
from repair_pl.evaluate import encode_pairs
from repair_pl.interrupt import kill_and_resume, output_differences, run_outputs, without_wall_time
from repair_pl.lifelong import run_lifelong
from repair_pl.module import RepairModule
from repair_pl.testing import char_tokenizer, tiny_editor, tiny_llama

ROOT = Path(__file__).resolve().parents[1]
RECORDS = [EditRecord(f"capital of c{i}?", f"x{i}y", rephrases=(f"c{i} capital?",),
                      locality=((f"who is p{i}", "abc"),), routing_prompt=f"unrelated text {i}", case_id=i)
           for i in range(6)]
# Margins scaled to the tiny model; shards, merges and negatives on so that all of them are checkpointed.
TINY = dict(n_prefixes=1, layer=2, lr=10.0, max_steps=8, alpha=1.0, beta=5.0, gamma=3.0, mask_ratio=0.5,
            norm_constraint=None, eval_batch_size=4, routing_weight=0.1)
WISE = dict(TINY, method="wise", save_freq=2, merge_freq=3, n_negatives=2)
REPAIR = dict(TINY, method="repair", max_steps=12, edit_batch_size=2, cluster_size=1, threshold=0.5, max_retries=1)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add noise


class Killed(BaseException):
    """Stands in for the process dying: nothing in the run catches it."""


def run(out: Path, options: dict, T=4, checkpoint_every=2, die_at_edit: int | None = None) -> dict:
    """One run on a fresh module; ``die_at_edit=k`` stops it at the k-th call of ``edit``."""
    L.seed_everything(0, verbose=False)
    module = tiny_editor(**options)
    if die_at_edit is not None:
        original, calls = module.edit, {"n": 0}

        def edit(record, retry=False):
            calls["n"] += 1
            if calls["n"] == die_at_edit:
                raise Killed
            return original(record, retry)

        module.edit = edit
    return run_lifelong(module, RECORDS, out, T=T, progress=False, checkpoint_every=checkpoint_every)


def assert_same_outputs(a: Path, b: Path) -> None:
    assert output_differences(a, b) == []


# ---------------------------------------------------------------------------------------------
# Checkpoint and resume in process
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("options, die_at", [(WISE, [3, 3, 2]), (REPAIR, [4, 5, 3]), (dict(layer=2, max_steps=8, eval_batch_size=4, method="ft_l"), [3, 2]),
                                             (dict(layer=2, max_steps=8, eval_batch_size=4, method="grace"), [3, 2])],
                         ids=["wise", "repair", "ft_l", "grace"])
def test_interrupted_run_resumes_to_the_same_end(tmp_path, capsys, options, die_at):
    run(tmp_path / "whole", options)
    assert not (tmp_path / "whole" / "checkpoint").exists()  # a finished run removes its checkpoint
    out = tmp_path / "resumed"
    for k in die_at:  # stopped again and again, each time resuming from the last checkpoint
        with pytest.raises(Killed):
            run(out, options, die_at_edit=k)
        assert (out / "checkpoint" / "progress.json").is_file()
    capsys.readouterr()
    run(out, options)
    assert "resuming from" in capsys.readouterr().out
    assert not (out / "checkpoint").exists()
    assert_same_outputs(tmp_path / "whole", out)


def test_resume_does_not_redo_finished_edits(tmp_path, monkeypatch):
    with pytest.raises(Killed):
        run(tmp_path, WISE, T=6, die_at_edit=6)  # checkpoints after edits 2 and 4
    progress = json.loads((tmp_path / "checkpoint" / "progress.json").read_text())
    assert progress["chunk"] == 0 and progress["position"] == 4
    calls = []
    original = RepairModule.edit

    def counting(self, record, retry=False):
        calls.append(record.case_id)
        return original(self, record, retry)

    monkeypatch.setattr(RepairModule, "edit", counting)
    run(tmp_path, WISE, T=6)
    assert calls == [4, 5]


def test_checkpoint_of_another_configuration_is_refused(tmp_path):
    with pytest.raises(Killed):
        run(tmp_path, WISE, die_at_edit=4)
    with pytest.raises(ValueError, match=r"different run \(model.memory.init_args.lr was 10.0, now 5.0\).*delete"):
        run(tmp_path, {**WISE, "lr": 5.0})
    with pytest.raises(ValueError, match=r"T was 4, now 2"):
        run(tmp_path, WISE, T=2)


def test_unreadable_checkpoint_is_reported(tmp_path):
    with pytest.raises(Killed):
        run(tmp_path, WISE, die_at_edit=4)
    (tmp_path / "checkpoint" / "progress.json").write_text('{"format": 1, "chunk"')
    with pytest.raises(ValueError, match=r"progress.json: checkpoint is unreadable.*delete"):
        run(tmp_path, WISE)


def test_saved_state_round_trips_negatives_and_shard_losses(tmp_path):
    options = {**WISE, "merge_freq": None}  # edits 1-2 in a stored shard, edit 3 in the current one
    module = tiny_editor(**options)
    for record in RECORDS[:3]:
        module.edit(record)
    module.save_edits(tmp_path / "edits")
    fresh = tiny_editor(**options)
    fresh.load_edits(tmp_path / "edits")
    assert list(fresh.memory.negatives) == list(module.memory.negatives) and len(module.memory.negatives) == 2
    assert fresh.memory.shard_losses == module.memory.shard_losses and module.memory.shard_losses
    assert fresh.memory.current_losses == module.memory.current_losses and module.memory.current_losses
    assert torch.equal(fresh.memory._generator.get_state(), module.memory._generator.get_state())


# ---------------------------------------------------------------------------------------------
# EREN: the evaluation resumes after its last finished slice
# ---------------------------------------------------------------------------------------------

def eren_reader(prompt: str) -> str:
    """Answers from a note naming the question's subject; closed book: the question back."""
    question = prompt.rsplit("Question: ", 1)[1].split("\n")[0].strip()
    if "Notes:" not in prompt:
        return f"closed {question}"
    subject = question.split()[-1].rstrip("?")
    return "x" + subject[1:] + "y" if subject in prompt.split("Question:")[0] else "unanswerable"


def eren_run(checkpoint: Path, die_after_calls: int | None = None):
    from repair_pl.eren import CachedReader, ErenEditor, HashEncoder, Notebook, evaluate_editor

    calls = {"n": 0}

    def reader(prompt):
        calls["n"] += 1
        if calls["n"] == die_after_calls:
            raise Killed
        return eren_reader(prompt)

    editor = ErenEditor(CachedReader(reader), Notebook(HashEncoder(64)), k=2)
    records = [EditRecord(f"capital of c{i}?", f"x{i}y", statement=f"The capital of c{i} is x{i}y.",
                          locality=((f"who is p{i}?", "abc"),), case_id=i) for i in range(5)]
    cases, summary = evaluate_editor(editor, records, T=3, slice_records=1, progress=True, checkpoint=checkpoint)
    return cases, summary, calls["n"]


def test_eren_evaluation_resumes_after_the_last_finished_slice(tmp_path, capsys):
    whole_cases, whole_summary, whole_calls = eren_run(tmp_path / "a.jsonl")
    assert not (tmp_path / "a.jsonl").exists()
    log = tmp_path / "b.jsonl"
    with pytest.raises(Killed):
        eren_run(log, die_after_calls=whole_calls // 2)
    with open(log, "a") as f:
        f.write('{"cases": [{"case_id"')  # a line torn by the kill
    capsys.readouterr()
    cases, summary, calls = eren_run(log)
    assert "resuming from" in capsys.readouterr().err
    assert 0 < calls < whole_calls  # finished slices were not asked again
    same = lambda x: json.dumps(without_wall_time(x), sort_keys=True)  # noqa: E731
    assert same(cases) == same(whole_cases)
    assert same({k: v for k, v in summary.items() if not k.startswith("seconds")}) == \
        same({k: v for k, v in whole_summary.items() if not k.startswith("seconds")})
    assert summary["es"] == 1.0 and not log.exists()


# ---------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------

def test_same_config_and_seed_give_identical_runs(tmp_path):
    run(tmp_path / "a", WISE, checkpoint_every=None)
    run(tmp_path / "b", WISE, checkpoint_every=None)
    assert_same_outputs(tmp_path / "a", tmp_path / "b")
    other = {**WISE, "seed": 1}  # the seed matters: other masks, so other weights
    run(tmp_path / "c", other, checkpoint_every=None)
    seed0, seed1 = run_outputs(tmp_path / "a")[2], run_outputs(tmp_path / "c")[2]
    assert not torch.equal(seed0["mask"], seed1["mask"]) and not torch.equal(seed0["shard.0"], seed1["shard.0"])


# ---------------------------------------------------------------------------------------------
# Numerical faults
# ---------------------------------------------------------------------------------------------

def test_nan_edit_is_reported_by_case_id_and_the_stream_continues(tmp_path, monkeypatch):
    original = RepairModule.edit_losses

    def poisoned(self, batch, lower=None):
        out = original(self, batch, lower)
        if self._poison:
            out["loss"] = out["loss"] * float("nan")
        return out

    original_edit = RepairModule.edit

    def edit(self, record, retry=False):
        self._poison = record.case_id == 1
        return original_edit(self, record, retry)

    monkeypatch.setattr(RepairModule, "edit_losses", poisoned)
    monkeypatch.setattr(RepairModule, "edit", edit)
    options = {**TINY, "method": "repair", "progressive": False, "distribution_aware": False,
               "error_feedback": False, "score_tokens": "mean", "max_steps": 40}  # WISE with closed loop
    L.seed_everything(0, verbose=False)
    module = tiny_editor(**options)
    summary = run_lifelong(module, RECORDS[:3], tmp_path, progress=False)
    assert 1 in summary["failed_case_ids"] and summary["n_failed"] == len(summary["failed_case_ids"])
    # the poisoned edit rolls back max_rollbacks times, then once more and is failed
    assert summary["interventions"]["rollbacks"] >= module.components.closed_loop.max_rollbacks + 1
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["case_id"] for r in results] == [0, 1, 2]
    assert results[2]["edit"]["steps"] > 0  # the edit after the failed one ran
    assert torch.isfinite(module.memory.side).all()


# ---------------------------------------------------------------------------------------------
# Config errors: caught before any editing, naming the key
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(T=0), "T must be a positive integer"),
    (dict(T=-2), "T must be a positive integer"),
    (dict(T=7), "T=7 is larger than the 6 records"),
    (dict(checkpoint_every=0), "checkpoint_every must be a positive integer"),
    (dict(checkpoint_every=-1), "checkpoint_every must be a positive integer"),
])
def test_run_options_are_checked_first(tmp_path, kwargs, message):
    module = tiny_editor(**TINY)
    with pytest.raises(ValueError, match=message):
        run_lifelong(module, RECORDS, tmp_path, progress=False, **{"T": 2, **kwargs})
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize("option, value, key", [
    ("max_steps", 0, "model.max_steps"), ("eval_batch_size", -1, "model.eval_batch_size"),
    ("max_length", 0, "model.max_length"), ("layer", 4, "model.layer"), ("method", "rome", "model.method"),
    ("edit_batch_size", 0, "components.edit_batch_size"), ("save_freq", 0, "SideMemory.save_freq"),
    ("n_prefixes", -1, "SideMemory.n_prefixes"), ("mask_ratio", 0.0, "SideMemory.mask_ratio"),
    ("merge_method", "avg", "SideMemory.merge_method"), ("cluster_method", "dbscan", "DistributionAwareMemory.cluster_method"),
    ("recalibration_margin", 1.5, "components.recalibration_margin"),
])
def test_module_options_name_the_key(option, value, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        tiny_editor(**{**TINY, "method": "repair", option: value})


def test_cli_rejects_bad_checkpoint_every_before_loading_the_model(tmp_path, capsys):
    from repair_pl.cli import main

    with pytest.raises(SystemExit) as exit_:  # a model that does not exist is never reached
        main(["fit", "--config", str(ROOT / "configs" / "demo.yaml"), "--model.model", "does-not-exist",
              "--checkpoint_every", "0", "--trainer.default_root_dir", str(tmp_path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "checkpoint_every must be a positive integer" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# Bad input on the record -> tokens path
# ---------------------------------------------------------------------------------------------

def test_overlong_prompt_is_cut_from_the_left_when_editing():
    module = tiny_editor(**{**TINY, "max_length": 24, "n_prefixes": 0})
    long = EditRecord("blah " * 40 + "capital of fr?", "xyz", routing_prompt="unrelated " * 30)
    batch = module.prepare_edit(long)
    assert batch["input_ids"].shape[1] == 24
    edit_row = batch["input_ids"][0][batch["attention_mask"][0].bool()]
    assert module.tokenizer.decode(edit_row.tolist()).replace(" ", "").endswith("capitaloffr?xyz")
    assert module.edit(long).steps == TINY["max_steps"]


def test_answer_longer_than_max_length_is_rejected_naming_it(tmp_path):
    module = tiny_editor(**{**TINY, "max_length": 8})
    record = EditRecord("q?", "a very long answer", case_id=3)
    with pytest.raises(EditDataError, match=r"'a very long answer'.*max_length=8"):
        run_lifelong(module, [record], tmp_path, progress=False)


PRINTABLE = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=30)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pairs=st.lists(st.tuples(PRINTABLE, PRINTABLE), min_size=1, max_size=4),
       max_length=st.one_of(st.none(), st.integers(min_value=1, max_value=40)))
def test_property_encode_pairs_keeps_whole_answers_and_the_prompt_end(pairs, max_length):
    tokenizer = char_tokenizer()
    prompts, answers = [p for p, _ in pairs], [a for _, a in pairs]
    answer_tokens = [len(" " + a) for a in answers]  # one token per character
    if max_length is not None and any(n + 1 > max_length for n in answer_tokens):
        with pytest.raises(EditDataError, match="max_length"):
            encode_pairs(tokenizer, prompts, answers, max_length)
        return
    enc = encode_pairs(tokenizer, prompts, answers, max_length)
    assert max_length is None or enc.input_ids.shape[1] <= max_length
    assert not (enc.prompt_mask & enc.answer_mask).any()
    for i, (prompt, answer) in enumerate(pairs):
        ids = enc.input_ids[i]
        full = tokenizer([prompt + " " + answer]).input_ids[0]
        kept = ids[enc.attention_mask[i].bool()].tolist()
        assert kept == full[len(full) - len(kept):]  # only the left end is ever cut
        assert ids[enc.answer_mask[i]].tolist() == full[-answer_tokens[i]:]  # the answer is whole
        n_prompt = int(enc.prompt_mask[i].sum())
        assert 1 <= n_prompt <= len(prompt) and n_prompt + answer_tokens[i] == len(kept)
        assert enc.prompt_mask[i][:n_prompt].all()  # the prompt comes first, then the answer


TINY_MODEL = ["--config", str(ROOT / "configs" / "demo.yaml"), "--model.model", "tiny-random", "--model.layer", "2",
              "--model.memory.n_prefixes", "1", "--model.max_steps", "2", "--trainer.enable_progress_bar", "false",
              "--trainer.logger", "false"]


@pytest.mark.parametrize("content, message", [
    (b"", "edits.jsonl: file is empty"),
    (b"  \n\n", "edits.jsonl: file is empty"),
    (b'{"src": "caf\xe9?", "alt": "x"}\n', "edits.jsonl: not UTF-8 text (bad byte at line 1, offset 12)"),
    (b'{"src": "a?", "alt": "b"}\n{"src": "c?", "alt": "  "}\n', "record 1, field 'alt': is an empty string"),
    (b'{"src": "a?", "alt": "b"}\n{"src": "c?", "alt": "d"\n', "malformed JSON on line 2"),
])
def test_cli_reports_bad_data_in_one_line(tmp_path, capsys, content, message):
    from repair_pl.cli import main

    data = tmp_path / "edits.jsonl"
    data.write_bytes(content)
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *TINY_MODEL, "--data.path", str(data), "--trainer.default_root_dir", str(tmp_path / "out")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out" / "results.json").exists()


def test_cli_skips_and_reports_invalid_records_when_asked(tmp_path):
    from repair_pl.cli import main

    data = tmp_path / "edits.jsonl"
    data.write_text('{"src": "a b?", "alt": "c"}\n{"src": "d e?", "alt": 5}\n{"src": "f g?", "alt": "h"}\n')
    with pytest.warns(UserWarning, match="skipped 1 record"):
        main(["fit", *TINY_MODEL, "--data.path", str(data), "--data.on_invalid", "skip",
              "--trainer.default_root_dir", str(tmp_path)])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["n_edits"] == 2 and len(summary["skipped_records"]) == 1
    assert "record 1, field 'alt': must be a string, got int 5" in summary["skipped_records"][0]


# ---------------------------------------------------------------------------------------------
# SIGKILL of the real command line at random moments
# ---------------------------------------------------------------------------------------------

TINY_CLI = ["--config", str(ROOT / "configs" / "demo.yaml"), "--model.model", "tiny-random", "--model.layer", "2",
            "--model.memory.n_prefixes", "1", "--model.max_steps", "12", "--model.memory.save_freq", "2", "--model.memory.merge_freq", "3",
            "--data.ds_size", "8", "--T", "4", "--checkpoint_every", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.logger", "false"]


def test_sigkill_at_random_moments_then_rerun_ends_bit_identical(tmp_path):
    logs = kill_and_resume(TINY_CLI, tmp_path, kills=["editing", "checkpoint"], seed=7, timeout=120).logs
    assert "summary:" not in logs[0] and "resuming from" in logs[-1]
    assert_same_outputs(tmp_path / "whole", tmp_path / "resumed")
    assert not (tmp_path / "resumed" / "checkpoint").exists()


@pytest.mark.integration
def test_sigkill_and_resume_on_smollm2(tmp_path):
    # WISE writes a checkpoint after every edit (REPAIR's first one comes after its first batch)
    args = ["--config", str(ROOT / "configs" / "demo.yaml"), "--config", str(ROOT / "configs" / "methods" / "wise.yaml"),
            "--model.memory.n_prefixes", "1", "--model.max_steps", "6",
            "--data.ds_size", "4", "--checkpoint_every", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.logger", "false"]
    logs = kill_and_resume(args, tmp_path, kills=["checkpoint"], seed=3, timeout=300, max_delay=0.3).logs
    assert "summary:" not in logs[0] and "resuming from" in logs[-1]
    assert_same_outputs(tmp_path / "whole", tmp_path / "resumed")


def test_pre_edit_evaluation_is_cached_by_model_and_records(tmp_path, monkeypatch):
    import repair_pl.lifelong as lifelong

    calls = []
    real = lifelong.evaluate_records
    monkeypatch.setattr(lifelong, "evaluate_records", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    module = RepairModule("tiny-random", eval_batch_size=4)
    fresh = lifelong.pre_edit_evaluation(module, RECORDS[:4], tmp_path)
    again = lifelong.pre_edit_evaluation(module, RECORDS[:4], tmp_path)
    assert calls == [4] and again == fresh  # read back exactly, not recomputed
    lifelong.pre_edit_evaluation(module, RECORDS[:3], tmp_path)  # other records: another entry
    lifelong.pre_edit_evaluation(RepairModule("tiny-random", eval_batch_size=2), RECORDS[:4], tmp_path)
    assert calls == [4, 3, 4] and len(list(tmp_path.glob("pre_edit_*.json"))) == 3
    # a model passed as an object has no name to key the cache on: always scored, never stored
    lifelong.pre_edit_evaluation(RepairModule(tiny_llama(), char_tokenizer()), RECORDS[:4], tmp_path)
    assert calls == [4, 3, 4, 4] and len(list(tmp_path.glob("pre_edit_*.json"))) == 3


def test_side_by_side_runs_score_the_unedited_model_once(tmp_path, monkeypatch):
    """Two runs of a sweep (--jobs 2) asking for the same pre-edit scores at once: the second
    waits on the cache's lock and reads the first's result instead of scoring it again."""
    import threading
    import time

    import repair_pl.lifelong as lifelong

    calls = []
    real = lifelong.evaluate_records

    def slow(*a, **k):
        calls.append(threading.get_ident())
        time.sleep(0.5)  # long enough for the other thread to arrive while this one scores
        return real(*a, **k)

    monkeypatch.setattr(lifelong, "evaluate_records", slow)
    modules = [RepairModule("tiny-random", eval_batch_size=4) for _ in range(2)]
    results = [None, None]

    def score(i):
        results[i] = lifelong.pre_edit_evaluation(modules[i], RECORDS[:4], tmp_path)

    threads = [threading.Thread(target=score, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and results[0] == results[1]
