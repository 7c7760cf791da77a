"""Tests for scripts/get_data.py and the bundled demo edit set (no network, fast)."""

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "scripts" / "get_data.py"
DEMO = REPO_ROOT / "repair_pl" / "data" / "demo.jsonl"

LAYOUT = {
    "zsre": ["zsre/zsre_edit_1000.json"],
    "counterfact": ["counterfact/counterfact_edit_2000.json", "counterfact/counterfact-train.json"],
    "hallucination": ["hallucination/hallucination-edit.json",
                      "hallucination/hallucination-train.json"],
    "temporal": ["temporal/temporal-edit.json", "temporal/temporal-train.json"],
    "eren": ["eren/cfh_filtered.json", "eren/fever_filtered_small.json"],
    "reference": ["reference/smollm2_zsre_pre_edit_200.jsonl"],
}
ALL_FILES = [rel for rels in LAYOUT.values() for rel in rels]


def run(*args, timeout=60):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def make_source(root: Path) -> Path:
    """A fake source folder with the right layout and small distinct files."""
    for i, rel in enumerate(ALL_FILES):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps([{"i": i, "name": rel}]))
    return root


@pytest.fixture
def src(tmp_path):
    return make_source(tmp_path / "src")


def status_lines(stdout):
    """{relpath: status} from the script's one-line-per-file output."""
    out = {}
    for line in stdout.splitlines():
        for rel in ALL_FILES:
            if rel in line:
                out[rel] = line.split(rel)[0].strip()
    return out


def test_help():
    res = run("--help")
    assert res.returncode == 0
    for opt in ("--dest", "--from", "--download", "--only"):
        assert opt in res.stdout


def test_copies_all_files(src, tmp_path):
    dest = tmp_path / "dest"
    res = run("--from", src, "--dest", dest)
    assert res.returncode == 0, res.stderr
    assert status_lines(res.stdout) == {rel: "copied" for rel in ALL_FILES}
    for rel in ALL_FILES:
        assert (dest / rel).read_bytes() == (src / rel).read_bytes()
    # atomic copies leave no temporary files behind
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()) == sorted(ALL_FILES)


def test_rerun_is_up_to_date(src, tmp_path):
    dest = tmp_path / "dest"
    assert run("--from", src, "--dest", dest).returncode == 0
    res = run("--from", src, "--dest", dest)
    assert res.returncode == 0, res.stderr
    assert status_lines(res.stdout) == {rel: "up to date" for rel in ALL_FILES}

    # a changed destination file (same size, different bytes) is copied again, only that one
    target = dest / "zsre" / "zsre_edit_1000.json"
    data = bytearray(target.read_bytes())
    data[-2] = ord("x") if data[-2] != ord("x") else ord("y")
    target.write_bytes(bytes(data))
    res = run("--from", src, "--dest", dest)
    assert res.returncode == 0, res.stderr
    st = status_lines(res.stdout)
    assert st.pop("zsre/zsre_edit_1000.json") == "copied"
    assert set(st.values()) == {"up to date"}
    assert target.read_bytes() == (src / "zsre" / "zsre_edit_1000.json").read_bytes()


def test_missing_file_fails_and_names_it(src, tmp_path):
    missing = "eren/fever_filtered_small.json"
    (src / missing).unlink()
    dest = tmp_path / "dest"
    res = run("--from", src, "--dest", dest)
    assert res.returncode != 0
    assert missing in res.stderr
    assert status_lines(res.stdout)[missing] == "missing"
    assert not (dest / missing).exists()
    # the files that are there are still copied
    assert (dest / "eren" / "cfh_filtered.json").is_file()


def test_nonexistent_source(tmp_path):
    res = run("--from", tmp_path / "nope", "--dest", tmp_path / "dest")
    assert res.returncode != 0
    assert "nope" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "dest").exists()


def test_only_restricts(src, tmp_path):
    dest = tmp_path / "dest"
    res = run("--from", src, "--dest", dest, "--only", "zsre", "--only", "eren")
    assert res.returncode == 0, res.stderr
    wanted = LAYOUT["zsre"] + LAYOUT["eren"]
    assert set(status_lines(res.stdout)) == set(wanted)
    got = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert got == sorted(wanted)


def test_only_ignores_missing_files_outside_selection(src, tmp_path):
    (src / "counterfact" / "counterfact_edit_2000.json").unlink()
    res = run("--from", src, "--dest", tmp_path / "dest", "--only", "temporal")
    assert res.returncode == 0, res.stderr


def test_bad_only_and_conflicting_modes(src, tmp_path):
    assert run("--from", src, "--dest", tmp_path / "d", "--only", "bogus").returncode == 2
    assert run("--from", src, "--download", "--dest", tmp_path / "d").returncode == 2


def test_download_reference_has_no_public_source(tmp_path):
    # reference/ has no URL, so this never touches the network
    res = run("--download", "--only", "reference", "--dest", tmp_path / "dest")
    assert res.returncode != 0
    assert "reference/smollm2_zsre_pre_edit_200.jsonl" in res.stdout + res.stderr


# --------------------------------------------------------------------------- download logic
# Exercised in-process with ``fetch`` replaced, so no network is used.


@pytest.fixture
def gd(monkeypatch):
    spec = importlib.util.spec_from_file_location("get_data_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, mod)
    spec.loader.exec_module(mod)
    return mod


def test_file_table_matches_layout(gd):
    assert [f.relpath for f in gd.FILES] == ALL_FILES
    for f in gd.FILES:
        assert f.group in LAYOUT and f.relpath in LAYOUT[f.group]
        assert len(f.sha256) == 64
        for url in f.urls:
            assert url.startswith("https://raw.githubusercontent.com/")


def _spec(gd, rel, payload, urls, transform=None):
    return gd.DataFile("zsre", rel, len(payload), hashlib.sha256(payload).hexdigest(),
                       urls=tuple(urls), transform=transform or gd.identity)


def test_download_transform_fallback_and_verify(gd, tmp_path, monkeypatch, capsys):
    upstream = json.dumps([{"k": i} for i in range(5)]).encode()
    expected = gd.first_n(3)(upstream)
    assert json.loads(expected) == [{"k": 0}, {"k": 1}, {"k": 2}]
    served = {"https://x/good": upstream}

    def fake_fetch(url, timeout):
        if url not in served:
            raise gd.GetDataError(f"{url}: HTTP 404 Not Found")
        return served[url]

    monkeypatch.setattr(gd, "fetch", fake_fetch)
    f = _spec(gd, "a/cf.json", expected, ["https://x/missing", "https://x/good"], gd.first_n(3))
    assert gd.download(tmp_path, [f], 5, True, False) == 0
    assert (tmp_path / "a" / "cf.json").read_bytes() == expected
    assert "downloaded" in capsys.readouterr().out
    # second run: already matches the expected hash, nothing fetched
    monkeypatch.setattr(gd, "fetch", lambda url, timeout: pytest.fail("fetched again"))
    assert gd.download(tmp_path, [f], 5, True, False) == 0
    assert "up to date" in capsys.readouterr().out

    # content that differs from the expected sha256 is refused unless verify is off
    monkeypatch.setattr(gd, "fetch", lambda url, timeout: b"[1, 2]")
    g = _spec(gd, "b/x.json", b"[1, 2, 3]", ["https://x/other"])
    assert gd.download(tmp_path, [g], 5, True, False) == 1
    assert not (tmp_path / "b" / "x.json").exists()
    assert gd.download(tmp_path, [g], 5, False, False) == 0
    assert (tmp_path / "b" / "x.json").read_bytes() == b"[1, 2]"


def test_download_network_down_fails_cleanly(gd, tmp_path, monkeypatch, capsys):
    calls = []

    def down(url, timeout):
        calls.append(url)
        raise gd.NetworkError(f"{url}: network unreachable (Name or service not known)")

    monkeypatch.setattr(gd, "fetch", down)
    files = [_spec(gd, "a.json", b"[]", ["https://x/a"]), _spec(gd, "b.json", b"[1]", ["https://x/b"])]
    assert gd.download(tmp_path, files, 5, True, False) == 1
    err = capsys.readouterr().err
    assert "https://x/a" in err and "unreachable" in err
    assert calls == ["https://x/a"]  # gives up at once instead of waiting on every URL
    assert not any(tmp_path.iterdir())


def test_zsre_log_transform(gd):
    rec = {"subject": "S", "src": "Q?", "rephrase": "Q2?", "alt": "A",
           "loc": "nq question: q", "loc_ans": "a", "loc_prompt": "nq question: p x"}
    log = [{"case_id": 0, "pre": {}, "post": {}, "requested_rewrite": {
        "prompt": "Q?", "target_new": "A", "ground_truth": "<|endoftext|>",
        "locality": {"neighborhood": {"prompt": "nq question: q", "ground_truth": "a"}},
        "subject": "S", "loc_prompt": "nq question: p x", "rephrase_prompt": "Q2?"}}] * 2
    out = gd.zsre_from_easyedit_log(2)(json.dumps(log).encode())
    assert json.loads(out) == [rec, rec]
    assert list(json.loads(out)[0]) == list(rec)
    with pytest.raises(gd.GetDataError):
        gd.zsre_from_easyedit_log(3)(json.dumps(log).encode())


# --------------------------------------------------------------------------- demo edit set

DEMO_KEYS = ["subject", "src", "alt", "rephrase", "loc", "loc_ans", "loc_prompt"]


def test_demo_jsonl():
    lines = [ln for ln in DEMO.read_text(encoding="ascii").splitlines() if ln.strip()]
    records = [json.loads(ln) for ln in lines]
    assert 30 <= len(records) <= 50
    for r in records:
        assert set(r) == set(DEMO_KEYS), r
        for k in DEMO_KEYS:
            assert isinstance(r[k], str) and r[k].strip(), (k, r)
        assert r["subject"] in r["src"]
        assert r["alt"] != r["loc_ans"]
        assert r["loc"].startswith("nq question: ")
        assert r["loc_prompt"].startswith("nq question: ")
        assert r["loc"] != r["loc_prompt"]
    subjects = [r["subject"] for r in records]
    assert len(set(subjects)) == len(subjects)
    assert len({r["src"] for r in records}) == len(records)
