"""tools/heap_census.py: what a long stream's process holds, block by block."""

from pathlib import Path

import torch

import repair_pl.cli as cli
from repair_pl import lifelong
from repair_pl.testing import load_script, tiny_editor

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model.model", "tiny-random", "--model.layer", "2", "--model.memory.init_args.n_prefixes", "1",
        "--model.max_steps", "3", "--trainer.enable_progress_bar", "false", "--generation", "false"]


def census():
    return load_script(ROOT / "tools" / "heap_census.py")


def test_one_row_per_block_and_the_command_line_left_as_it_was(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(lifelong, "BLOCK", 2)
    run_lifelong, note_block = cli.run_lifelong, lifelong._note_block
    census().main(["--config", "configs/demo.yaml", *TINY, "--data.ds_size", "4", "--T", "4",
                   "--trainer.default_root_dir", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| edits | RSS MB |")
    rows = [line.strip("|").split("|") for line in lines if line.startswith("| ")]
    rows = [row for row in rows if row[0].strip().isdigit()]
    assert [int(r[0]) for r in rows] == [2, 4] and all(len(r) == 7 for r in rows)
    for row in rows:
        rss, in_use, free, tensors, n, kept = map(float, row[1:])
        assert rss > 0 and tensors > 0 and in_use >= 0 and free >= 0 and n >= 0 and kept >= 0
    assert (tmp_path / "summary.json").exists()
    assert (cli.run_lifelong, lifelong._note_block) == (run_lifelong, note_block)


def test_stored_counts_the_shards_and_memories_and_their_bytes():
    module = tiny_editor("wise", layer=2)
    assert census().stored(module) == (0, 0.0)
    module.memory.shards.append(torch.zeros(256, 1024))
    module.memory.memories += [torch.zeros(512, 1024)] * 2
    assert census().stored(module) == (3, 5.0)  # 1 + 2 + 2 MB of fp32
    assert census().stored(tiny_editor("grace", layer=2))[0] == 0  # a baseline keeps no shards


def test_live_tensors_count_each_storage_once():
    probe = census()
    before = probe.live_tensor_mb()
    held = torch.zeros(1024, 1024)  # 4 MB
    views = [held[:10], held.view(-1)]  # noqa: F841  (same storage)
    assert 3.5 < probe.live_tensor_mb() - before < 4.5
