"""scripts/bench.py on the tiny random model with minimal sizes, so the bench cannot rot."""

import json
from pathlib import Path

import pytest
import torch

from repair_pl.data import EditRecord
from repair_pl.testing import load_script

BENCH = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"


@pytest.fixture(scope="module")
def bench():
    return load_script(BENCH)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add noise


RECORDS = [EditRecord(f"capital of x{i}?", f"ab{i}", locality=(("who is bob", "abc"),), routing_prompt=f"unrelated {i}")
           for i in range(4)]


def test_plain_loop_reaches_the_lightning_weights(bench):
    module = bench.load_editor("tiny-random", max_steps=3)
    out = bench.lightning_overhead(module, RECORDS[:2], steps=3)
    assert out["edits"] == 1 and out["steps"] == 3
    assert out["max_weight_diff"] <= 1e-5
    assert module.edit_count == 2  # both edits kept, as the Lightning path would
    assert not torch.equal(module.memory.side.detach(), module.memory.main.weight.float())


def test_plain_loop_mismatch_is_caught(bench, monkeypatch):
    module = bench.load_editor("tiny-random", max_steps=3)
    original = bench.plain_edit
    monkeypatch.setattr(bench, "plain_edit", lambda m, r, steps: original(m, r, steps + 2))
    with pytest.raises(AssertionError, match="disagree"):
        bench.lightning_overhead(module, RECORDS[:1], steps=3)


def test_bench_main_writes_json_and_markdown(bench, tmp_path):
    result = bench.main(["--model", "tiny-random", "--data", "demo", "--out", str(tmp_path), "--overhead-edits", "1",
                         "--overhead-steps", "2", "-T", "2", "--max-steps", "2", "--prompts", "4", "--repeats", "1",
                         "--gen-prompts", "2", "--gen-tokens", "2", "--mem-edits", "4", "--mem-steps", "1",
                         "--save-freq", "2", "--merge-freq", "4", "-n", "2",
                         "--stream", json.dumps({"method": "repair", "max_steps": 2})])
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["device"]["torch"] == torch.__version__ and saved["device"]["dtype"] == "float32"
    assert set("12345") <= set(saved)
    assert saved["1"]["ratio"] > 0 and saved["2"]["methods"]["repair"]["seconds_ratio_vs_wise"] > 0
    assert saved["3"]["forward_b16"]["ratio"] > 0 and saved["3"]["generate"]["ratio"] > 0
    assert saved["3"]["routed_share"] >= 0 and saved["4"]["edits"] == 4
    assert saved["4"]["stored_shards_mb_max"] > 0  # shards were stored between merges
    assert saved["5"]["run"]["n_edits"] == 2 and "rewrite_acc" in saved["5"]["run"]["post"]
    md = (tmp_path / "BENCH.md").read_text()
    for title in ("Lightning overhead", "REPAIR vs WISE", "Inference latency", "Memory over", "Long stream"):
        assert title in md
    assert result["model"] == "tiny-random"


def test_stream_budget_cuts_part_5_to_what_fits(bench):
    measured = {"2": {"methods": {"repair": {"seconds_per_edit": 0.5}}}}
    assert bench.stream_length(1000, None, measured) == 1000  # no budget: as asked
    assert bench.stream_length(1000, 100.0, {}) == 1000  # nothing measured to estimate from
    assert bench.stream_length(1000, 100.0, measured) == 150  # 100 s / (1.3 x 0.5 s) = 153 -> 150
    assert bench.stream_length(1000, 1.0, measured) == 10  # never fewer than 10
    assert bench.stream_length(100, 1e6, measured) == 100  # never more than asked


@pytest.mark.parametrize("method", ["grace", "ft_l"])
def test_part_5_streams_a_baseline(bench, tmp_path, method):
    # a baseline holds no side memory or shards: part 5 reports what it keeps beside the frozen layer
    bench.main(["--model", "tiny-random", "--data", "demo", "--out", str(tmp_path), "--parts", "5", "-n", "2",
                "--stream", json.dumps({"method": method, "max_steps": 2})])
    run = json.loads((tmp_path / "bench.json").read_text())["5"]["run"]
    assert run["method"] == method and run["n_edits"] == 2
    assert run["side_memory_mb"]["side"] > 0 and run["side_memory_mb"]["shards"] == 0
