"""tools/probe_step.py: one edit step timed per number of context prefixes."""

import re
from pathlib import Path

from repair_pl.testing import load_script

ROOT = Path(__file__).resolve().parents[1]


def test_each_prefix_count_gets_its_batch_and_a_time(capsys):
    probe = load_script(ROOT / "tools" / "probe_step.py")
    probe.main(["--model", "tiny-random", "--data", "demo", "--record", "0", "--layer", "2",
                "--prefixes", "3", "1", "--repeats", "2"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("prefixes")]
    rows = [int(re.search(r"batch \((\d+), ", line).group(1)) for line in lines]
    assert rows == [5, 3]  # the bare prompt, the prefixed copies and one routing prompt
    assert all(float(re.search(r"step ([\d.]+) s", line).group(1)) > 0 for line in lines)
