"""tools/probe_prompt_router.py: how a prompt router routes rephrasings and locality prompts as keys accumulate."""

from pathlib import Path

from repair_pl.data import EditRecord
from repair_pl.memory import PromptRouter
from repair_pl.testing import load_script

ROOT = Path(__file__).resolve().parents[1]


def record(prompt, rephrase, loc):
    return EditRecord(prompt=prompt, target="x", rephrases=(rephrase,), locality=((loc, "y"),))


def test_rephrasings_and_locality_prompts_are_routed_by_similarity_to_the_keys_so_far():
    probe = load_script(ROOT / "tools" / "probe_prompt_router.py")
    records = [record("alpha beta gamma", "alpha beta gamma", "delta epsilon zeta"),
               record("delta epsilon zeta", "omega psi chi", "phi tau sigma")]
    router = PromptRouter(threshold=0.99, encoder="hash")
    router.bind()
    first, both = probe.routing_by_size(records, router, [1, 2, 5])
    assert [first["k"], both["k"]] == [1, 2]  # 5 is capped at the number of records
    # one key: the rephrasing equals it, the locality prompt is the second record's prompt (not keyed yet)
    assert (first["own"], first["other"], first["none"], first["loc_routed"]) == (1.0, 0.0, 0.0, 0.0)
    # two keys: record 0's locality prompt is now record 1's edit prompt; record 1's rephrasing matches no key
    assert (both["own"], both["none"], both["loc_routed"]) == (0.5, 0.5, 0.5)
    [(prompt, edit, similarity)] = both["routed_locality"]
    assert (prompt, edit) == ("delta epsilon zeta", "delta epsilon zeta") and similarity >= 0.99


def test_the_command_prints_a_row_per_number_of_edits(capsys):
    probe = load_script(ROOT / "tools" / "probe_prompt_router.py")
    probe.main([str(ROOT / "repair_pl" / "data" / "demo.jsonl"), "--at", "1", "3", "--encoder", "hash", "--examples", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split("|")[0].strip() == "edits"
    assert [line.split("|")[0].strip() for line in lines[1:3]] == ["1", "3"]
