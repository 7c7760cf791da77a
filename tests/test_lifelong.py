"""run_lifelong's protocol with a scripted module: every edit of a chunk before that chunk's
evaluation, the memory reset between chunks, locality scored against the unedited model's
predictions for the same records, and summary.json written last."""

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.fabric.utilities.data import AttributeDict

import repair_pl.lifelong as lifelong
from repair_pl.checkpoint import write_json_atomic
from repair_pl.data import EditRecord
from repair_pl.evaluate import evaluate_records
from repair_pl.lifelong import run_lifelong
from repair_pl.testing import char_tokenizer

VOCAB = 128
# Locality answers of different lengths and texts: a reference taken from other records does not fit.
RECORDS = [EditRecord(f"capital of c{i}?", f"x{i}y", rephrases=(f"c{i} capital?",),
                      locality=((f"who is p{i}", "abc"[: 1 + i % 3] + str(i)),), case_id=i) for i in range(7)]


class Killed(BaseException):
    """Stands in for the process dying: nothing in the run catches it."""


class ScriptedModule:
    """What :func:`run_lifelong` calls on a module (the ``RepairModule`` contract), scripted.

    Its model predicts a fixed function of each input token; edited, it answers the prompts of
    the records edited since the last reset exactly and, for the case ids in ``damaged``, also
    changes its answer to their locality prompts. Every call is logged in ``events``:
    ``("reset",)``, ``("edit", case_id)`` and ``("eval", edited, case ids in the memory)``.
    """

    method = "scripted"

    def __init__(self, records, damaged=(), die_at_edit: int | None = None, batch_end: tuple[int, float] | None = None):
        self.records = {r.case_id: r for r in records}
        self.damaged, self.die_at_edit = set(damaged), die_at_edit
        self.batch_end = batch_end  # (n, s): after every n edits, s seconds of re-checks around one re-edit
        self.tokenizer = char_tokenizer()
        self.hparams = AttributeDict(eval_batch_size=3, max_length=None, edit_batch_size=1, model=None)
        self.device = torch.device("cpu")
        self.edit_callbacks = []
        self.memory: list[int] = []
        self.events: list[tuple] = []
        self.n_edits = 0

    def reset_edits(self):
        self.memory = []
        self.events.append(("reset",))

    def edit_stream(self, records, progress=False):
        for record in records:
            self.n_edits += 1
            if self.n_edits == self.die_at_edit:
                raise Killed
            self.memory.append(record.case_id)
            self.events.append(("edit", record.case_id))
            result = SimpleNamespace(steps=2, seconds=0.01, loss=0.0, edit_loss=0.0, routing_loss=0.0,
                                     in_scope_score=1.0, success=True, retry=False, lr=1.0, intervention=None,
                                     target_reached=True)
            yield record, result
            if self.batch_end is not None and self.n_edits % self.batch_end[0] == 0:
                time.sleep(self.batch_end[1] / 2)
                yield record, SimpleNamespace(**{**vars(result), "retry": True})
                time.sleep(self.batch_end[1] / 2)

    def logits_fn(self, edited=True):
        def ids(text):
            return tuple(self.tokenizer(text).input_ids)

        def logits(input_ids, attention_mask, prompt_mask):
            self.events.append(("eval", edited, tuple(self.memory)))
            preds = (input_ids * 3 + 1) % VOCAB  # the unedited model
            if edited:
                edits = {ids(self.records[c].prompt) for c in self.memory}
                damaged = {ids(p) for c in self.memory if c in self.damaged for p, _ in self.records[c].locality}
                for row in range(input_ids.shape[0]):
                    prompt = tuple(input_ids[row][prompt_mask[row]].tolist())
                    if prompt in edits:  # the edit's answer, token by token
                        preds[row] = torch.roll(input_ids[row], -1)
                    elif prompt in damaged:
                        preds[row] = (preds[row] + 1) % VOCAB
            return torch.nn.functional.one_hot(preds, VOCAB).float()

        return logits

    def intervention_counts(self):
        return {}

    def save_edits(self, path):
        write_json_atomic(Path(path) / "memory.json", self.memory)

    def load_edits(self, path):
        self.memory = json.loads((Path(path) / "memory.json").read_text())


def collapsed(events):
    """The events with runs of identical ones (one per evaluated batch) counted once."""
    return [e for i, e in enumerate(events) if i == 0 or e != events[i - 1]]


def test_all_edits_of_a_chunk_come_before_its_evaluation_and_chunks_start_empty(tmp_path):
    module = ScriptedModule(RECORDS)
    summary = run_lifelong(module, RECORDS, tmp_path, T=3, progress=False)
    assert collapsed(module.events) == [
        ("eval", False, ()),  # the unedited model, once, on every record
        ("reset",), ("edit", 0), ("edit", 1), ("edit", 2), ("eval", True, (0, 1, 2)),
        ("reset",), ("edit", 3), ("edit", 4), ("edit", 5), ("eval", True, (3, 4, 5)),
        ("reset",), ("edit", 6), ("eval", True, (6,))]
    results = json.loads((tmp_path / "results.json").read_text())
    assert [c["case_id"] for c in results] == list(range(7))
    assert all(c["post"]["rewrite_acc"] == [1.0] and c["pre"]["rewrite_acc"][0] < 1.0 for c in results)
    assert summary["post"]["rewrite_acc"] == 1.0 and summary["pre"]["rewrite_acc"] < 0.5


def test_locality_is_scored_against_the_unedited_prediction_for_the_same_records(tmp_path, monkeypatch):
    references = []
    real = lifelong.evaluate_records

    def spy(logits_fn, tokenizer, records, reference=None, **kwargs):
        references.append(([r.case_id for r in records], reference))
        return real(logits_fn, tokenizer, records, reference=reference, **kwargs)

    monkeypatch.setattr(lifelong, "evaluate_records", spy)
    module = ScriptedModule(RECORDS, damaged={1, 4})
    run_lifelong(module, RECORDS, tmp_path, T=3, progress=False)
    unedited = ScriptedModule(RECORDS).logits_fn(edited=False)
    post = [(ids, ref) for ids, ref in references if ref is not None]
    assert [ids for ids, _ in post] == [[0, 1, 2], [3, 4, 5], [6]]
    for ids, ref in post:
        chunk = [RECORDS[i] for i in ids]
        assert ref == evaluate_records(unedited, module.tokenizer, chunk).locality_preds
    # the edits that changed their neighbours' answers lose locality, the others keep it
    results = json.loads((tmp_path / "results.json").read_text())
    assert [c["post"]["locality"]["neighborhood_acc"] for c in results] == \
        [[0.0] if i in (1, 4) else [1.0] for i in range(7)]


def test_a_resumed_run_still_evaluates_each_chunk_after_all_its_edits(tmp_path):
    with pytest.raises(Killed):  # killed in the middle of the second chunk, after a checkpoint
        run_lifelong(ScriptedModule(RECORDS, die_at_edit=6), RECORDS, tmp_path, T=3, checkpoint_every=1,
                     progress=False)
    module = ScriptedModule(RECORDS)
    run_lifelong(module, RECORDS, tmp_path, T=3, checkpoint_every=1, progress=False)
    assert collapsed(module.events) == [
        ("edit", 5), ("eval", True, (3, 4, 5)),  # the chunk's first edits come back from the checkpoint
        ("reset",), ("edit", 6), ("eval", True, (6,))]


def test_summary_json_is_written_after_every_other_output(tmp_path, monkeypatch):
    present = {}
    real = lifelong.write_json_atomic

    def spy(path, *args, **kwargs):
        if Path(path).name == "summary.json":
            present["then"] = {p.name for p in tmp_path.iterdir()}
        return real(path, *args, **kwargs)

    monkeypatch.setattr(lifelong, "write_json_atomic", spy)
    run_lifelong(ScriptedModule(RECORDS), RECORDS, tmp_path, T=3, progress=False)
    assert present["then"] == {"results.json", "summary.md", "edits"}


def test_a_run_killed_while_saving_its_edits_has_no_summary_json(tmp_path):
    module = ScriptedModule(RECORDS)

    def killed(path):
        raise Killed

    module.save_edits = killed
    with pytest.raises(Killed):
        run_lifelong(module, RECORDS, tmp_path, T=3, progress=False)
    assert not (tmp_path / "summary.json").exists()  # the sweep must not take this run as done


def test_a_sharded_run_killed_before_its_summary_md_has_no_summary_json(tmp_path, monkeypatch):
    import repair_pl.distributed as distributed

    def killed(summary):
        raise Killed

    monkeypatch.setattr(distributed, "_markdown", killed)
    with pytest.raises(Killed):
        distributed.run_lifelong_sharded(ScriptedModule(RECORDS), RECORDS, tmp_path, T=3)
    assert (tmp_path / "rank0" / "summary.json").exists() and not (tmp_path / "summary.json").exists()


def test_a_run_of_several_chunks_reports_each_chunks_means_and_their_spread(tmp_path):
    from repair_pl.lifelong import case_means, chunk_spread

    cases = [{"post": {"rewrite_acc": [v], "rephrase_acc": [v], "locality": {"neighborhood_acc": [1.0]}}}
             for v in (1.0, 0.0, 0.5, 0.5)]
    out = chunk_spread(cases, T=2)
    assert [c["rewrite_acc"] for c in out["chunks"]] == [0.5, 0.5]
    assert out["chunk_spread"]["rewrite_acc"] == {"mean": 0.5, "std": 0.0, "min": 0.5, "max": 0.5}
    uneven = chunk_spread(cases, T=1)
    assert uneven["chunk_spread"]["rewrite_acc"]["std"] == pytest.approx(0.4082, abs=1e-4)  # sample std of 1,0,.5,.5
    assert uneven["chunk_spread"]["locality"]["std"] == 0.0
    assert chunk_spread(cases, T=4) == {}  # one chunk: nothing to spread
    assert case_means([c["post"] for c in cases])["rewrite_acc"] == 0.5


def test_a_long_run_reports_seconds_per_edit_and_peak_memory_per_block_of_edits(tmp_path, monkeypatch):
    monkeypatch.setattr(lifelong, "BLOCK", 3)  # blocks of 3 edits over these 7
    summary = run_lifelong(ScriptedModule(RECORDS), RECORDS, tmp_path, T=4, progress=False)
    *blocks, rest = summary["blocks"]
    assert [b["edits"] for b in blocks] == [3, 6]  # edit 7 does not close a block
    assert all(b["seconds_per_edit"] >= 0 and 0 < b["rss_mb"] <= b["peak_rss_mb"] * 1.01 for b in blocks)
    assert rest["edits"] == 7 and rest["rest_after"] == 6 and rest["seconds"] >= 0  # edit 7 and the end of its batch
    total = sum(b["seconds_per_edit"] * 3 for b in blocks) + rest["seconds"]
    assert total == pytest.approx(summary["seconds_per_edit"] * 7)  # the blocks add up to the run's editing time


def test_a_block_holds_the_re_checks_and_re_edits_that_follow_its_last_edit(tmp_path, monkeypatch):
    monkeypatch.setattr(lifelong, "BLOCK", 3)
    module = ScriptedModule(RECORDS, batch_end=(3, 0.2))  # edits are instant; each batch of 3 ends in 0.2 s
    *blocks, rest = run_lifelong(module, RECORDS[:6], tmp_path, T=6, progress=False)["blocks"]
    assert [b["edits"] for b in blocks] == [3, 6]
    assert all(0.18 <= b["seconds_per_edit"] * 3 < 0.3 for b in blocks)  # its own batch's end, not the one before
    assert rest["seconds"] < 0.05
