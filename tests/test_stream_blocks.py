"""tools/stream_blocks.py: a long run's results by block of records and by split."""

from pathlib import Path

import pytest

from repair_pl.checkpoint import write_json_atomic
from repair_pl.testing import load_script

ROOT = Path(__file__).resolve().parents[1]


def case(case_id: int, rel: float, steps: int, seconds: float, retries: int) -> dict:
    return {"case_id": case_id, "post": {"rewrite_acc": [rel], "rephrase_acc": [rel / 2], "locality": {"neighborhood_acc": [1.0]}},
            "edit": {"steps": steps, "seconds": seconds, "success": True, "retries": retries}}


def test_blocks_in_stream_order_then_the_split(tmp_path, capsys):
    results = [case(0, 1.0, 10, 2.0, 0), case(1, 0.0, 30, 4.0, 1), case(5, 1.0, 20, 1.0, 2)]
    write_json_atomic(tmp_path / "results.json", results)
    load_script(ROOT / "tools" / "stream_blocks.py").main([str(tmp_path / "results.json"), "--block", "2", "--split", "5"])
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines()[2:]]
    assert [r[0] for r in rows] == ["| 0-1", "| 2-2", "| case_id < 5", "| case_id >= 5"]
    assert rows[0][1:] == ["0.500", "0.250", "1.000", "20.0", "3.00", "1 |"]  # means over the block's records
    assert rows[1][1:] == ["1.000", "0.500", "1.000", "20.0", "1.00", "2 |"]
    assert rows[2][1:] == rows[0][1:]


def test_a_bad_block_size_is_refused(tmp_path):
    write_json_atomic(tmp_path / "results.json", [case(0, 1.0, 1, 1.0, 0)])
    with pytest.raises(SystemExit):
        load_script(ROOT / "tools" / "stream_blocks.py").main([str(tmp_path / "results.json"), "--block", "0"])


def test_a_run_with_generation_gets_the_generated_columns(tmp_path, capsys):
    def generated(rel: float) -> dict:
        plain = {"rewrite_em": [rel], "rephrase_em": [0.0], "locality_unchanged": [1.0]}
        return {"plain": plain, "chat": {**plain, "rewrite_em": [0.0]}}

    results = [case(0, 1.0, 10, 2.0, 0), case(1, 0.0, 30, 4.0, 1)]
    for c, rel in zip(results, (1.0, 0.0)):
        c["post"]["gen"] = generated(rel)
    write_json_atomic(tmp_path / "results.json", results)
    load_script(ROOT / "tools" / "stream_blocks.py").main([str(tmp_path / "results.json"), "--block", "1", "--split", "5"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("gen Rel | gen Gen | gen Loc | chat Rel | chat Gen | chat Loc |")
    rows = [line.split(" | ") for line in lines[2:]]
    assert len(rows[0]) == len(lines[0].split(" | "))
    assert rows[0][7:] == ["1.000", "0.000", "1.000", "0.000", "0.000", "1.000 |"]  # plain, then chat
    assert rows[1][7] == "0.000"
