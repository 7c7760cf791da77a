"""The edit stream spread over 2 CPU processes (Fabric ddp_spawn, gloo): metrics synced by
torchmetrics equal one process's."""

import json
import math

import pytest
import torch

from repair_pl import EditRecord, RepairModule
from repair_pl.presets import preset
from repair_pl.distributed import RANK_WAIT, chunk_indices, evaluate_sharded, launch, run_lifelong_sharded, shutdown
from repair_pl.evaluate import evaluate_records
from repair_pl.generation import GenerationCheck
from repair_pl.lifelong import run_lifelong
from repair_pl.testing import char_tokenizer, tiny_llama

HP = dict(layer=2, n_prefixes=1, max_steps=3, seed=0, eval_batch_size=4)
GENERATION = GenerationCheck(extra_tokens=2)  # the generated-answer means are synced too
RECORDS = [EditRecord(prompt=f"Who leads firm {c}?", target=t, rephrases=(f"Boss of {c}?",),
                       locality=((f"{c} sky is", "blue"),), case_id=i)
           for i, (c, t) in enumerate(zip("ABCDE", ["Zed", "Amy", "Bo", "Cy", "Di"]))]


def _module():
    return RepairModule(tiny_llama(), char_tokenizer(), **preset("wise", **HP))


def _each_rank(fabric, out_dir):
    torch.set_num_threads(1)  # two processes share the cores
    module = _module()
    evaluated = evaluate_sharded(module, RECORDS, edited=False)
    summary = run_lifelong_sharded(module, RECORDS, out_dir, T=2, dataset="toy", generation=GENERATION)
    assert (out_dir / "summary.json").exists()  # rank 1 too: rank 0 wrote it before any rank returned
    shutdown()
    assert not torch.distributed.is_initialized()
    return evaluated, summary


def test_chunks_are_dealt_round_robin_and_cover_the_stream():
    shares = [chunk_indices(5, 2, rank, 2) for rank in range(2)]
    assert shares == [[0, 1, 4], [2, 3]]
    assert sorted(shares[0] + shares[1]) == list(range(5))
    assert chunk_indices(3, 2, 2, 3) == []  # more processes than chunks: an idle rank


def test_two_gloo_processes_give_the_single_process_metrics(tmp_path):
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp_spawn")
    evaluated, summary = fabric.launch(_each_rank, tmp_path / "ddp")

    module = _module()
    single_eval = evaluate_records(module.logits_fn(edited=False), module.tokenizer, RECORDS, batch_size=4).means
    single = run_lifelong(module, RECORDS, tmp_path / "one", T=2, dataset="toy", progress=False, generation=GENERATION)

    assert set(evaluated) == set(single_eval) and set(summary["post"]) == set(single["post"])
    assert "locality_gen" in summary["post"] and summary["generation"] == single["generation"]
    # Float tolerance: perplexities change in the 7th digit with the batch's padding width (batches
    # differ when the records are sharded); evaluate_records rounds its means to float32.
    for key, value in single_eval.items():
        assert math.isclose(evaluated[key], value, rel_tol=1e-5), key
    for stage in ("pre", "post"):
        for key, value in single[stage].items():
            assert math.isclose(summary[stage][key], value, rel_tol=1e-5), (stage, key)
    assert summary["world_size"] == 2 and summary["n_edits"] == 5
    assert summary["steps_per_edit"] == pytest.approx(single["steps_per_edit"])
    # the spread over chunks, as one process reports it (3 chunks of T=2 here)
    assert len(summary["chunks"]) == len(single["chunks"]) == 3
    for key, spread in single["chunk_spread"].items():
        for stat in ("mean", "std", "min", "max"):
            assert math.isclose(summary["chunk_spread"][key][stat], spread[stat], rel_tol=1e-5, abs_tol=1e-9), key
    # rank 0 writes the whole stream's cases in order, equal case by case to one process's
    merged = json.loads((tmp_path / "ddp" / "results.json").read_text())
    alone = json.loads((tmp_path / "one" / "results.json").read_text())
    assert [c["case_id"] for c in merged] == [r.case_id for r in RECORDS]
    for key in ("rewrite_acc", "rephrase_acc", "locality", "gen"):  # token accuracies, generations: exactly equal
        assert [c["post"][key] for c in merged] == [c["post"][key] for c in alone]
    assert (tmp_path / "ddp" / "rank1" / "results.json").exists()


def test_ranks_wait_for_each_other_longer_than_a_chunk(monkeypatch):
    """A rank with one chunk fewer waits a whole chunk at the final gather: gloo's default 30
    minutes ended such runs."""
    import lightning.fabric

    seen = {}

    class Recorder:
        def __init__(self, **kwargs):
            seen.update(kwargs)

        def launch(self):
            pass

    monkeypatch.setattr(lightning.fabric, "Fabric", Recorder)
    launch("cpu", 2)
    assert seen["strategy"]._timeout == RANK_WAIT and RANK_WAIT.total_seconds() > 24 * 3600
