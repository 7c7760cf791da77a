"""tools/probe_shards.py: re-edits by shard size and place, with the run's shards re-planned."""

import re
from pathlib import Path

import pytest

from repair_pl.checkpoint import write_json_atomic
from repair_pl.testing import load_script

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--model", "tiny-random", "--data", "demo", "--layer", "2", "--batch", "6", "--cluster_size", "2"]


def results(case_ids, reedited):
    return [{"case_id": c, "edit": {"steps": 1, "seconds": 0.1, "retries": int(c in reedited)}} for c in case_ids]


def test_re_edits_are_counted_by_shard_size_and_place(tmp_path, capsys):
    probe = load_script(ROOT / "tools" / "probe_shards.py")
    write_json_atomic(tmp_path / "results.json", results(range(6), reedited={0, 1, 2}))
    probe.main([str(tmp_path / "results.json"), *ARGS, "--replay", "0"])
    out = capsys.readouterr().out
    sizes = [int(s) for s in out.splitlines()[0].split(":")[1].split()]
    assert sizes and max(sizes) <= 6
    (small_re, small), (large_re, large), (early_re, early), (late_re, late) = \
        [tuple(map(int, m)) for m in re.findall(r"(\d+) of (\d+)", out)]
    assert small + large == 6 and small_re + large_re == 3  # every record once, by its shard's size
    assert early + late == large and early_re + late_re == large_re  # the large shards' records by place


def test_results_of_other_records_are_refused(tmp_path):
    probe = load_script(ROOT / "tools" / "probe_shards.py")
    write_json_atomic(tmp_path / "results.json", results(range(3, 9), reedited=set()))
    with pytest.raises(SystemExit):
        probe.main([str(tmp_path / "results.json"), *ARGS])  # records 3-8 read as from record 0
