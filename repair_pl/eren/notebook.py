"""EREN's notebook: the edits as natural-language notes, their embeddings, and persistence.

A notebook lives in a folder of three files, each written atomically (temp file, fsync,
``os.replace``): ``notes.jsonl`` (one ``{"id", "text", "meta"}`` per line, in index order),
``embeddings.npy`` (float32, one row per note) and ``notebook.json`` (the encoder's name, the
width and the note count). The manifest is written last and :meth:`Notebook.load` checks the
other two files against it, so a crash between the writes is detected rather than read as a
notebook whose notes and vectors no longer line up.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from repair_pl.checkpoint import write_file_atomic
from repair_pl.eren.retrieval import Encoder, VectorIndex

FORMAT_VERSION = 1


class NotebookError(RuntimeError):
    """A bad notebook operation (unknown id, duplicate id) or unreadable notebook files."""


@dataclass
class Note:
    """One edit as text. ``id`` is unique in its notebook; ``meta`` is free-form (e.g. case_id)."""

    id: str
    text: str
    meta: dict = field(default_factory=dict)


class Notebook:
    """An ordered set of notes with one embedding each, searchable by inner product.

    Args:
        encoder: embeds notes and questions (see :mod:`repair_pl.eren.retrieval`).
    """

    def __init__(self, encoder: Encoder):
        self.encoder = encoder
        self.index = VectorIndex(encoder.dim)
        self._notes: list[Note] = []
        self._position: dict[str, int] = {}
        self._next_id = 0

    def __len__(self) -> int:
        return len(self._notes)

    def __contains__(self, note_id: str) -> bool:
        return note_id in self._position

    def _new_id(self) -> str:
        while str(self._next_id) in self._position:
            self._next_id += 1
        return str(self._next_id)

    def add(self, text: str, id: str | None = None, meta: dict | None = None) -> Note:
        """Add one note and return it (an id is assigned when none is given)."""
        return self.add_many([text], [id], [meta])[0]

    def add_many(self, texts: list[str], ids: list[str | None] | None = None,
                 metas: list[dict | None] | None = None) -> list[Note]:
        """Add notes in one encoder pass (much faster than one :meth:`add` per note)."""
        ids = list(ids) if ids is not None else [None] * len(texts)
        metas = list(metas) if metas is not None else [None] * len(texts)
        if not len(texts) == len(ids) == len(metas):
            raise ValueError("texts, ids and metas must have the same length")
        for text in texts:
            if not isinstance(text, str) or not text.strip():
                raise NotebookError(f"a note must be a non-empty string, got {text!r}")
        given = [i for i in ids if i is not None]
        clash = [i for i in given if i in self._position] + [i for i in set(given) if given.count(i) > 1]
        if clash:
            raise NotebookError(f"note id {clash[0]!r} already exists (use update to change a note)")
        vectors = self.encoder.encode(list(texts))
        notes = []
        for text, note_id, meta in zip(texts, ids, metas):
            note = Note(str(note_id) if note_id is not None else self._new_id(), text, dict(meta or {}))
            self._position[note.id] = len(self._notes)
            self._notes.append(note)
            notes.append(note)
        self.index.add(vectors)
        return notes

    def get(self, note_id: str) -> Note:
        """The note with this id (:class:`NotebookError` when there is none)."""
        if note_id not in self._position:
            raise NotebookError(f"no note with id {note_id!r}")
        return self._notes[self._position[note_id]]

    def update(self, note_id: str, text: str, meta: dict | None = None) -> Note:
        """Replace a note's text (and re-embed it); ``meta`` replaces the meta when given."""
        note = self.get(note_id)
        if not isinstance(text, str) or not text.strip():
            raise NotebookError(f"a note must be a non-empty string, got {text!r}")
        self.index.replace(self._position[note_id], self.encoder.encode([text])[0])
        note.text = text
        if meta is not None:
            note.meta = dict(meta)
        return note

    def delete(self, note_id: str) -> Note:
        """Remove a note and return it."""
        note = self.get(note_id)
        position = self._position.pop(note_id)
        del self._notes[position]
        self.index.remove(position)
        for later in self._notes[position:]:
            self._position[later.id] -= 1
        return note

    def list(self) -> list[Note]:
        """All notes, in insertion order."""
        return list(self._notes)

    def clear(self) -> None:
        """Remove every note."""
        self.index = VectorIndex(self.encoder.dim)
        self._notes, self._position, self._next_id = [], {}, 0

    def search(self, questions: list[str], k: int = 5) -> list[list[tuple[Note, float]]]:
        """The ``k`` notes most similar to each question, best first, with their scores."""
        if not self._notes or not questions:
            return [[] for _ in questions]
        scores, positions = self.index.search(self.encoder.encode(list(questions)), k)
        return [[(self._notes[p], float(s)) for s, p in zip(row_s.tolist(), row_p.tolist())]
                for row_s, row_p in zip(scores, positions)]

    def save(self, folder: str | Path) -> Path:
        """Write the notebook into ``folder`` (created if needed); returns the folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_file_atomic(folder / "notes.jsonl", "".join(json.dumps(asdict(n), ensure_ascii=False) + "\n"
                                                     for n in self._notes))
        import io

        buffer = io.BytesIO()
        np.save(buffer, self.index.vectors.numpy().astype(np.float32))
        write_file_atomic(folder / "embeddings.npy", buffer.getvalue())
        manifest = {"format": FORMAT_VERSION, "encoder": self.encoder.name, "dim": self.encoder.dim,
                    "count": len(self), "next_id": self._next_id}
        write_file_atomic(folder / "notebook.json", json.dumps(manifest, indent=1))  # last: marks a complete save
        return folder

    @classmethod
    def load(cls, folder: str | Path, encoder: Encoder, reembed: bool = False) -> Notebook:
        """Read a notebook saved by :meth:`save`.

        The stored vectors are used as they are when ``encoder`` has the name they were made
        with; otherwise loading fails unless ``reembed=True``, which embeds every note again.
        """
        folder = Path(folder)
        try:
            manifest = json.loads((folder / "notebook.json").read_text())
            lines = (folder / "notes.jsonl").read_text(encoding="utf-8").splitlines()
            notes = [Note(**json.loads(line)) for line in lines if line.strip()]
        except FileNotFoundError as err:
            raise NotebookError(f"{folder} is not a saved notebook: {err.filename} is missing") from None
        except (json.JSONDecodeError, TypeError) as err:
            raise NotebookError(f"{folder}: unreadable notebook files ({err})") from None
        if len(notes) != manifest.get("count"):
            raise NotebookError(f"{folder}: notes.jsonl holds {len(notes)} notes but notebook.json says "
                                f"{manifest.get('count')} (an interrupted save?)")
        book = cls(encoder)
        if manifest.get("encoder") != encoder.name or manifest.get("dim") != encoder.dim:
            if not reembed:
                raise NotebookError(f"{folder} was embedded with {manifest.get('encoder')!r} (dim "
                                    f"{manifest.get('dim')}), not {encoder.name!r} (dim {encoder.dim}); "
                                    f"pass reembed=True to embed the notes again")
            vectors = encoder.encode([n.text for n in notes]) if notes else torch.empty(0, encoder.dim)
        else:
            vectors = torch.from_numpy(np.load(folder / "embeddings.npy"))
            if vectors.shape != (len(notes), encoder.dim):
                raise NotebookError(f"{folder}: embeddings.npy has shape {tuple(vectors.shape)}, expected "
                                    f"({len(notes)}, {encoder.dim})")
        book.index = VectorIndex(encoder.dim, vectors)
        book._notes = notes
        book._position = {n.id: i for i, n in enumerate(notes)}
        if len(book._position) != len(notes):
            raise NotebookError(f"{folder}: duplicate note ids in notes.jsonl")
        book._next_id = int(manifest.get("next_id", 0))
        return book
