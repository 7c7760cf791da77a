"""Routing text never comes from evaluated text; ``data.start`` selects a slice of the records."""

import json
from pathlib import Path

import pytest
import yaml

from repair_pl.data import (
    EditDataError,
    EditDataModule,
    EditRecord,
    assign_routing_prompts,
    clean_texts,
    evaluated_texts,
    load_records,
    load_routing_texts,
    overlapping,
    routing_text,
)

ROOT = Path(__file__).resolve().parents[1]


def overlaps(text: str, evaluated: list[str]) -> list[str]:
    """The evaluated texts ``text`` equals, contains or lies inside (plain substring test)."""
    return [e for e in evaluated if e in text or text in e]


def run_records(data: dict) -> list[EditRecord]:
    """The records a config's ``data:`` section gives a run, paths read from the repository root."""
    options = {k: (str(ROOT / v) if k in ("path", "routing_path") and v not in (None, "demo") else v)
               for k, v in data.items()}
    module = EditDataModule(**options)
    module.setup()
    return module.records


def data_sections() -> list:
    cases = []
    for config in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = yaml.safe_load(config.read_text()) or {}
        data = cfg.get("data") or {}
        # Configs without an edit file (W&B, sweep settings) select no records.
        if "path" not in data:
            continue
        # EREN edits by writing notes and trains nothing: it has no routing text to check.
        if (cfg.get("model") or {}).get("method") == "eren":
            continue
        cases.append(pytest.param(data, id=config.name))
    return cases + [pytest.param({"path": "demo"}, id="demo")]


@pytest.mark.parametrize("data", data_sections())
def test_no_routing_prompt_is_evaluated_text(data):
    """Every record of the run has a routing prompt, and none equals, contains or lies inside
    a prompt, rephrase or locality prompt that the run scores."""
    records = run_records(data)
    locality = [p for r in records for p, _ in r.locality]
    others = [t for r in records for t in (r.prompt, *r.rephrases, *r.ood_rephrases)]
    assert locality, "the run scores no locality prompt: nothing to check"
    routed = [r for r in records if r.routing_prompt]
    assert [r.case_id for r in routed if overlaps(r.routing_prompt, locality)] == []
    assert [r.case_id for r in routed if overlaps(r.routing_prompt, others)] == []
    assert [r.case_id for r in records if not r.routing_prompt] == []


# ---- the filter ---------------------------------------------------------------------------------

def test_overlapping_flags_equal_containing_and_contained_texts():
    evaluated = ["Michel Rocard is a native speaker of", "Who is the CEO of Microsoft?"]
    texts = ["Michel Rocard is a native speaker of",           # equal
             "Michel Rocard is a native speaker of French",    # contains
             "native speaker",                                 # lies inside
             "MICHEL  rocard is a native\nspeaker of French",  # same up to case and spacing
             "Jean Rocard is a native speaker of French",      # different text
             ""]
    assert overlapping(texts, evaluated) == [True, True, True, True, False, True]
    assert overlapping(["a b"], []) == [False]


def test_clean_texts_keeps_first_order_without_repeats_or_overlaps():
    assert clean_texts(["x one", "y two", "x one", "the CEO of z", "w three"], ["CEO of z"]) == \
        ["x one", "y two", "w three"]


def test_routing_text_of_a_train_record():
    assert routing_text(EditRecord("q", "t", locality=(("John Lennon performs on the", "guitar"), ("p", "a")),
                                   routing_prompt="own")) == "John Lennon performs on the guitar"
    assert routing_text(EditRecord("q", "t", routing_prompt="nq question: own x")) == "nq question: own x"
    assert routing_text(EditRecord("Toko Yasuda, the", "piano")) == "Toko Yasuda, the piano"


# ---- routing files ------------------------------------------------------------------------------

def test_load_routing_texts_reads_strings_and_records(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps(["first text", "", "second text"]))
    assert load_routing_texts(tmp_path / "list.json") == ["first text", "second text"]
    (tmp_path / "lines.jsonl").write_text('"first text"\n\n"second text"\n')
    assert load_routing_texts(tmp_path / "lines.jsonl") == ["first text", "second text"]
    rows = [{"prompt": "Toko Yasuda, the", "target_new": "piano", "locality_prompt": "John Lennon performs on the",
             "locality_ground_truth": "guitar"},
            {"src": "q?", "alt": "a", "loc_prompt": "nq question: who sang x y"}]
    (tmp_path / "easyedit.json").write_text(json.dumps(rows[:1]))
    assert load_routing_texts(tmp_path / "easyedit.json") == ["John Lennon performs on the guitar"]
    (tmp_path / "zsre.jsonl").write_text(json.dumps(rows[1]) + "\n")
    assert load_routing_texts(tmp_path / "zsre.jsonl") == ["nq question: who sang x y"]


def test_load_routing_texts_errors_name_the_option_and_file(tmp_path):
    with pytest.raises(EditDataError, match=r"missing\.json.*data\.routing_path"):
        load_routing_texts(tmp_path / "missing.json")
    (tmp_path / "blank.json").write_text(json.dumps(["", "  "]))
    with pytest.raises(EditDataError, match=r"blank\.json.*no non-empty routing text.*data\.routing_path"):
        load_routing_texts(tmp_path / "blank.json")
    (tmp_path / "bad.json").write_text(json.dumps([{"prompt": "p"}]))
    with pytest.raises(EditDataError, match=r"bad\.json.*target_new"):
        load_routing_texts(tmp_path / "bad.json")


# ---- assignment ---------------------------------------------------------------------------------

RECORDS = [EditRecord(f"What is q{i}?", f"a{i}", locality=((f"nq question: unrelated {i}", f"ans{i}"),), case_id=i)
           for i in range(6)]
POOL = [f"train text {i}" for i in range(20)]


def test_assignment_is_seeded_and_gives_distinct_texts_from_the_pool():
    first = [r.routing_prompt for r in assign_routing_prompts(RECORDS, evaluated_texts(RECORDS), POOL, seed=0)]
    again = [r.routing_prompt for r in assign_routing_prompts(RECORDS, evaluated_texts(RECORDS), POOL, seed=0)]
    other = [r.routing_prompt for r in assign_routing_prompts(RECORDS, evaluated_texts(RECORDS), POOL, seed=1)]
    assert first == again and first != other
    assert set(first) <= set(POOL) and len(set(first)) == len(RECORDS)
    assert [r.routing_prompt for r in RECORDS] == [None] * 6  # inputs untouched (records are frozen)


def test_a_small_pool_repeats_and_no_pool_leaves_none():
    out = assign_routing_prompts(RECORDS, [], POOL[:2], seed=0)
    assert sorted({r.routing_prompt for r in out}) == POOL[:2]
    assert all(r.routing_prompt is None for r in assign_routing_prompts(RECORDS, evaluated_texts(RECORDS)))


def test_own_routing_prompts_are_kept_unless_evaluated():
    own = [EditRecord("What is q0?", "a0", routing_prompt="nq question: clean text x"),
           EditRecord("What is q1?", "a1", routing_prompt="nq question: unrelated 3 ans3")]  # scored with record 3
    evaluated = evaluated_texts(own + RECORDS)
    assert [r.routing_prompt for r in assign_routing_prompts(own, evaluated)] == ["nq question: clean text x", None]
    filled = assign_routing_prompts(own, evaluated, ["nq question: clean text x", "train text 0"])
    assert [r.routing_prompt for r in filled] == ["nq question: clean text x", "train text 0"]


def test_pool_texts_that_are_evaluated_are_never_assigned():
    pool = ["nq question: unrelated 1 ans1", "What is q2? a2", "q4", "train text 0"]
    out = assign_routing_prompts(RECORDS, evaluated_texts(RECORDS), pool, seed=3)
    assert {r.routing_prompt for r in out} == {"train text 0"}


# ---- EditDataModule -----------------------------------------------------------------------------

def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def user_rows(n: int) -> list[dict]:
    return [{"src": f"What is q{i}?", "alt": f"a{i}", "rephrase": f"Tell me q{i}?",
             "loc": f"nq question: unrelated {i}", "loc_ans": f"ans{i}"} for i in range(n)]


def test_a_user_file_without_routing_text_keeps_none(tmp_path):
    module = EditDataModule(str(write_jsonl(tmp_path / "edits.jsonl", user_rows(4))))
    module.setup()
    assert [r.routing_prompt for r in module.records] == [None] * 4


def test_routing_path_fills_records_and_filters_against_the_whole_file(tmp_path):
    edits = write_jsonl(tmp_path / "edits.jsonl", user_rows(6))
    # record 5 is outside the selection (ds_size 3) but still in the file: its text stays out
    pool = write_jsonl(tmp_path / "pool.jsonl", ["nq question: unrelated 5 ans5", "Tell me q1? no", "free text a",
                                                 "free text b", "free text c"])
    module = EditDataModule(str(edits), ds_size=3, routing_path=str(pool), seed=2)
    module.setup()
    assert sorted(r.routing_prompt for r in module.records) == ["free text a", "free text b", "free text c"]


# ---- data.start ---------------------------------------------------------------------------------

def case_ids(**options) -> list[int]:
    module = EditDataModule(**options)
    module.setup()
    return [r.case_id for r in module.records]


def test_start_selects_a_slice_after_shuffling():
    assert case_ids(path="demo", start=5, ds_size=3) == [5, 6, 7]
    assert case_ids(path="demo", start=37) == [37, 38, 39]  # no ds_size: to the end
    shuffled = case_ids(path="demo", shuffle=True, seed=4)
    assert case_ids(path="demo", shuffle=True, seed=4, start=10, ds_size=5) == shuffled[10:15]


def test_zsre_dev_split_is_records_500_to_999():
    assert case_ids(path=str(ROOT / "data/zsre/zsre_edit_1000.json"), start=500, ds_size=500) == list(range(500, 1000))


@pytest.mark.parametrize("options, message", [
    (dict(start=40), r"data\.start=40 is beyond the 40 records"),
    (dict(start=30, ds_size=11), r"data\.start=30 \+ data\.ds_size=11 = 41 is larger than the 40 records"),
])
def test_start_beyond_the_data_is_an_error(options, message):
    module = EditDataModule("demo", **options)
    with pytest.raises(EditDataError, match=message):
        module.setup()
    assert module.records == []


@pytest.mark.parametrize("start", [-1, 1.5, "3"])
def test_start_must_be_a_non_negative_integer(start):
    with pytest.raises(EditDataError, match=r"data\.start must be an integer >= 0"):
        EditDataModule("demo", start=start)


def test_cli_reads_start_and_routing_path():
    from test_cli import run_cli

    proc = run_cli("--config", "configs/zsre.yaml", "--data.start", "500", "--data.ds_size", "500",
                   "--data.routing_path", "data/counterfact/counterfact-train.json", "--print_config")
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = yaml.safe_load(proc.stdout)["data"]
    assert (data["start"], data["ds_size"], data["routing_path"]) == (500, 500, "data/counterfact/counterfact-train.json")


def test_real_train_splits_lose_their_evaluated_texts():
    """CounterFact's train split shares locality prompts with its edit split: they are filtered."""
    edits, _ = load_records(ROOT / "data/counterfact/counterfact_edit_2000.json")
    train, _ = load_records(ROOT / "data/counterfact/counterfact-train.json")
    scored = {p for r in edits for p, _ in r.locality}
    shared = {routing_text(r) for r in train if r.locality[0][0] in scored}
    clean = clean_texts(load_routing_texts(ROOT / "data/counterfact/counterfact-train.json"), evaluated_texts(edits))
    assert len(shared) > 100 and len(clean) > 5000
    assert not shared & set(clean)
