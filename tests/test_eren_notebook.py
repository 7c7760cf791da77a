"""EREN notebook: CRUD, incremental adds, persistence (atomic files, checks on load)."""

import json

import numpy as np
import pytest
import torch

from repair_pl.eren import HashEncoder, Notebook, NotebookError


@pytest.fixture
def book():
    return Notebook(HashEncoder(256))


def top(book, question):
    return book.search([question], k=1)[0][0][0]


def test_add_get_list_in_order(book):
    a = book.add("The capital of Peru is Lima.", meta={"case_id": 3})
    b = book.add("Toko Yasuda plays the guitar.", id="toko")
    assert [n.id for n in book.list()] == [a.id, "toko"] and len(book) == 2
    assert book.get(a.id).meta == {"case_id": 3} and book.get("toko") is b and "toko" in book


def test_update_reembeds(book):
    book.add_many(["The capital of Peru is Lima.", "Toko Yasuda plays the guitar."], ids=["peru", "toko"])
    book.update("toko", "Toko Yasuda plays the violin in Osaka.")
    assert book.get("toko").text.endswith("Osaka.")
    assert top(book, "Which instrument does Toko Yasuda play in Osaka?").id == "toko"
    assert torch.allclose(book.index.vectors[1], book.encoder.encode(["Toko Yasuda plays the violin in Osaka."])[0])


def test_delete_keeps_rows_aligned(book):
    book.add_many([f"Fact number {i} is about topic{i}." for i in range(5)], ids=[f"f{i}" for i in range(5)])
    book.delete("f1")
    assert [n.id for n in book.list()] == ["f0", "f2", "f3", "f4"] and len(book.index) == 4
    for i in (0, 2, 3, 4):
        assert top(book, f"topic{i}").id == f"f{i}"
    with pytest.raises(NotebookError, match="no note"):
        book.get("f1")


def test_errors(book):
    book.add("x is y", id="a")
    with pytest.raises(NotebookError, match="already exists"):
        book.add("z", id="a")
    with pytest.raises(NotebookError, match="already exists"):
        book.add_many(["p", "q"], ids=["b", "b"])
    with pytest.raises(NotebookError, match="non-empty"):
        book.add("  ")
    with pytest.raises(NotebookError, match="no note"):
        book.update("missing", "text")
    assert len(book) == 1  # failed adds changed nothing


def test_incremental_adds(book):
    # the reference implementation concatenated embeddings along the wrong axis: a second
    # batch of notes broke retrieval
    for batch in range(4):
        book.add_many([f"Person{batch}x{i} was born in City{batch}y{i}." for i in range(3)])
    assert len(book.index) == 12
    assert top(book, "Where was Person2x1 born?").text == "Person2x1 was born in City2y1."


def test_empty_search_and_clear(book):
    assert book.search(["anything"], 5) == [[]]
    book.add("a note")
    book.clear()
    assert len(book) == 0 and book.search(["a note"], 5) == [[]]


def test_save_load_roundtrip(book, tmp_path):
    book.add_many(["The capital of Peru is Lima.", "Toko Yasuda plays the guitar."], metas=[{"case_id": 1}, None])
    book.add("Über café notes keep UTF-8.", id="utf")
    book.save(tmp_path / "nb")
    assert sorted(p.name for p in (tmp_path / "nb").iterdir()) == ["embeddings.npy", "notebook.json", "notes.jsonl"]
    loaded = Notebook.load(tmp_path / "nb", HashEncoder(256))
    assert [(n.id, n.text, n.meta) for n in loaded.list()] == [(n.id, n.text, n.meta) for n in book.list()]
    assert torch.equal(loaded.index.vectors, book.index.vectors)
    assert top(loaded, "capital of Peru").text == "The capital of Peru is Lima."
    new = loaded.add("A later note.")
    assert new.id not in {"0", "1", "utf"} or new.id == "2"
    assert len({n.id for n in loaded.list()}) == 4


def test_load_checks(book, tmp_path):
    book.add_many(["one fact", "two facts"])
    folder = book.save(tmp_path / "nb")
    with pytest.raises(NotebookError, match="reembed=True"):
        Notebook.load(folder, HashEncoder(128))
    again = Notebook.load(folder, HashEncoder(128), reembed=True)
    assert again.index.vectors.shape == (2, 128)
    lines = (folder / "notes.jsonl").read_text().splitlines()
    (folder / "notes.jsonl").write_text(lines[0] + "\n")  # as if a save died half way
    with pytest.raises(NotebookError, match="interrupted save"):
        Notebook.load(folder, HashEncoder(256))
    (folder / "notes.jsonl").write_text("\n".join(lines) + "\n")
    np.save(folder / "embeddings.npy", np.zeros((2, 7), dtype=np.float32))
    with pytest.raises(NotebookError, match="shape"):
        Notebook.load(folder, HashEncoder(256))
    with pytest.raises(NotebookError, match="not a saved notebook"):
        Notebook.load(tmp_path / "nowhere", HashEncoder(256))


def test_save_is_atomic_and_overwrites(book, tmp_path):
    book.add("first")
    folder = book.save(tmp_path / "nb")
    book.add("second")
    book.save(folder)
    assert not [p for p in folder.iterdir() if ".tmp" in p.name]  # temp files were renamed
    assert json.loads((folder / "notebook.json").read_text())["count"] == 2
    assert len(Notebook.load(folder, HashEncoder(256))) == 2
