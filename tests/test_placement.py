"""A frozen model placed with a device_map (accelerate hooks on every layer, here all on the CPU)
edits and predicts exactly as the same model on one device; per-edit fits move nothing."""

import json
from pathlib import Path

import pytest
import torch

from repair_pl import EditRecord, RepairModule
from repair_pl.presets import preset
from repair_pl.cli import main
from repair_pl.evaluate import evaluate_records
from repair_pl.placement import dispatch
from repair_pl.testing import char_tokenizer, tiny_llama

HP = dict(layer=2, n_prefixes=1, max_steps=4, lr=1.0, seed=0)
RECORDS = [EditRecord(prompt="Who leads Acme?", target="Zed", locality=[("sky is", "blue")]),
           EditRecord(prompt="Capital of Foo?", target="Bar", rephrases=["Foo's capital?"])]
ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "llama3_70b.yaml")
PER_LAYER = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", **{f"model.layers.{i}": "cpu" for i in range(4)},
             "model.norm": "cpu", "lm_head": "cpu"}


def _sharded_module(dtype=torch.float32):
    model = dispatch(tiny_llama().to(dtype), PER_LAYER, force_hooks=True)  # hooks as on several GPUs
    return RepairModule(model, char_tokenizer(), device_map=PER_LAYER, dtype=str(dtype).split(".")[-1], **preset("wise", **HP))


def test_device_map_edits_equal_the_unsharded_module(dtype=torch.bfloat16):
    plain = RepairModule(tiny_llama().to(dtype), char_tokenizer(), **preset("wise", **HP))
    sharded = _sharded_module(dtype)
    assert hasattr(sharded.model.model.layers[2], "_hf_hook")  # the hook path really runs
    assert sharded.memory.side.dtype == torch.float32  # fp32 side memory beside bf16 frozen weights
    assert sharded.memory.side.device == sharded.memory.main.weight.device
    for record in RECORDS:
        a, b = plain.edit(record), sharded.edit(record)
        assert (a.steps, a.edit_loss) == (b.steps, b.edit_loss)
    assert torch.equal(plain.memory.side, sharded.memory.side)
    assert plain.memory.min_in_scope == sharded.memory.min_in_scope
    scores = [evaluate_records(m.logits_fn(), m.tokenizer, RECORDS, device=m.device).cases for m in (plain, sharded)]
    assert scores[0] == scores[1]
    assert plain.generate(["Who leads Acme?"], max_new_tokens=4) == sharded.generate(["Who leads Acme?"], max_new_tokens=4)


def test_per_edit_fits_do_not_move_the_module(monkeypatch):
    module = RepairModule(tiny_llama(), char_tokenizer(), **preset("wise", **HP))
    moves = []
    for name in ("to", "cpu", "cuda"):  # Lightning's strategies call these at fit start and teardown
        monkeypatch.setattr(module, name, lambda *a, _n=name, **k: moves.append(_n) or module)
    module.edit(RECORDS[0])
    assert moves == []


def test_bad_device_map_is_refused_with_a_message():
    with pytest.raises(ValueError, match="model.device_map='everywhere'"):
        RepairModule(tiny_llama(), char_tokenizer(), device_map="everywhere", **preset("wise", **HP))


def test_sharded_config_parses(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", CONFIG, "--print_config"])
    assert exit_.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "device_map: auto" in printed and "dtype: bfloat16" in printed


def test_sharded_config_builds_on_the_tiny_model_and_matches_one_device(tmp_path, capsys):
    data = tmp_path / "edits.jsonl"
    data.write_text("".join(json.dumps({"src": r.prompt, "alt": r.target, "loc": "sky is", "loc_ans": "blue"}) + "\n"
                            for r in RECORDS))
    tiny = ["--model.model", "tiny-random", "--model.layer", "2", "--model.memory.n_prefixes", "1", "--model.max_steps", "3",
            "--model.memory.save_freq", "null", "--model.memory.merge_freq", "null", "--data.path", str(data), "--data.ds_size", "2",
            "--T", "2", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"]
    summaries = []
    for name, device_map in (("sharded", "auto"), ("plain", "null")):
        out = tmp_path / name
        main(["fit", "--config", CONFIG, "--config", str(ROOT / "configs" / "methods" / "wise.yaml"), *tiny,
              "--model.device_map", device_map,
              "--trainer.default_root_dir", str(out)])
        summaries.append(json.loads((out / "summary.json").read_text()))
    assert summaries[0]["post"] == summaries[1]["post"] and summaries[0]["steps_per_edit"] == 3


def test_per_edit_fits_keep_the_cuda_cache(monkeypatch):
    """Lightning's CUDA accelerator empties the CUDA cache and cuBLAS workspaces at every fit
    start; the accelerator of the per-edit fits must not (runs without a GPU: the calls are
    recorded, not made)."""
    import lightning.pytorch.accelerators.cuda as lightning_cuda
    from lightning.pytorch.accelerators import CUDAAccelerator

    from repair_pl.placement import accelerator_for

    cleared, trainer = [], type("Trainer", (), {"local_rank": 0})()
    monkeypatch.setattr(lightning_cuda, "_clear_cuda_memory", lambda: cleared.append(True))
    CUDAAccelerator().setup(trainer)
    assert cleared == [True]  # what the plain accelerator does at each fit
    accelerator = accelerator_for(torch.device("cuda", 0))
    assert isinstance(accelerator, CUDAAccelerator)
    accelerator.setup(trainer)
    assert cleared == [True]
    assert accelerator_for(torch.device("cpu")) == "cpu"
