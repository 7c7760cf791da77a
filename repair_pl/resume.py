"""Checkpoint and resume of a lifelong run.

A killed run resumes from its last checkpoint and ends exactly as an uninterrupted run would:
same final side memory (bit for bit) and same ``results.json`` / ``summary.json`` apart from
wall-time fields.

``DIR/checkpoint/`` holds

- ``state-NNNNNN/``: the module's edited state, written by
  :meth:`~repair_pl.module.RepairModule.save_edits` (side memory, merged memory, shards, mask,
  thresholds, prefixes, mask generator, negatives, shard losses);
- ``progress.json``: where the run stands (chunk, position in the chunk, per-record edit info,
  finished results, the pre-edit evaluation, step/second counters), the callbacks' intervention
  counts, the torch/numpy/python RNG states, the name of its state folder and a fingerprint of
  the run's configuration.

``progress.json`` is replaced last, with one atomic rename after an fsync, so it always names a
complete state folder; older state folders are removed only after it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import torch

from repair_pl.checkpoint import remove_tree, write_json_atomic

FORMAT = 1
PROGRESS = "progress.json"


def records_sha256(records: list) -> str:
    """A digest of everything in ``records`` that editing or scoring reads."""
    content = repr([(r.case_id, r.prompt, r.target, r.subject, r.rephrases, r.locality, r.routing_prompt,
                     r.ood_rephrases, r.statement, r.ground_truth) for r in records])
    return hashlib.sha256(content.encode()).hexdigest()


def run_fingerprint(module, records: list, T: int, generation=None) -> dict:
    """What must not change between a run and its resumption: hyperparameters, T, the records,
    and the generated-answer evaluation (``generation``, a
    :class:`~repair_pl.generation.GenerationCheck`: the pre-edit answers are its reference)."""
    hparams = json.loads(json.dumps(dict(module.hparams), default=repr, sort_keys=True))
    fingerprint = {"hparams": hparams, "T": T, "n_records": len(records), "records_sha256": records_sha256(records)}
    if generation is not None:  # absent when off, so checkpoints written without it still resume
        fingerprint["generation"] = generation.key()
    return fingerprint


def _first_change(saved, current, prefix: str) -> str | None:
    """The first leaf (``a.b.c``) whose value differs between two nested dicts."""
    if isinstance(saved, dict) and isinstance(current, dict):
        for name in sorted(set(saved) | set(current)):
            change = _first_change(saved.get(name), current.get(name), f"{prefix}.{name}")
            if change is not None:
                return change
        return None
    return None if saved == current else f"{prefix} was {saved!r}, now {current!r}"


def _difference(saved: dict, current: dict) -> str | None:
    """The first key whose value differs, phrased for an error message."""
    for key in sorted(set(saved) | set(current)):
        if key == "hparams":
            change = _first_change(saved[key], current[key], "model")
            if change is not None:
                return change
        elif saved.get(key) != current.get(key):
            return ("the data records differ" if key == "records_sha256"
                    else f"{key} was {saved.get(key)!r}, now {current.get(key)!r}")
    return None


def rng_states() -> dict:
    """The python, numpy, torch (and CUDA, when in use) RNG states as JSON-ready lists."""
    import numpy as np

    name, keys, pos, has_gauss, cached = np.random.get_state()
    states = {"python": random.getstate(), "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
              "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return states


def set_rng_states(states: dict) -> None:
    """Restore states captured by :func:`rng_states`."""
    import numpy as np

    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(states["torch"], dtype=torch.uint8))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in states["cuda"]])


class RunCheckpoint:
    """The checkpoint folder of one lifelong run (see the module docstring).

    Args:
        folder: usually ``DIR/checkpoint``.
        fingerprint: :func:`run_fingerprint` of the current run; a checkpoint written by a run
            with another fingerprint is refused with a message naming what differs.
    """

    def __init__(self, folder: str | Path, fingerprint: dict):
        self.folder, self.fingerprint, self.serial = Path(folder), fingerprint, 0

    def load(self, module) -> dict | None:
        """Restore the module (edited state, callback counts) and the RNG states from the last
        checkpoint and return the saved progress; ``None`` when there is no checkpoint."""
        path = self.folder / PROGRESS
        if not path.is_file():
            return None
        hint = f"delete {self.folder} to start the run over"
        try:
            progress = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"{path}: checkpoint is unreadable ({err}); {hint}") from None
        if progress.get("format") != FORMAT:
            raise ValueError(f"{path}: checkpoint format {progress.get('format')!r} is not {FORMAT}; {hint}")
        diff = _difference(progress["fingerprint"], self.fingerprint)
        if diff:
            raise ValueError(f"{self.folder} holds the checkpoint of a different run ({diff}); {hint} "
                             f"or choose another trainer.default_root_dir")
        module.load_edits(self.folder / progress["state"])
        callbacks = [cb for cb in module.edit_callbacks if hasattr(cb, "counts")]
        for cb, (name, counts) in zip(callbacks, progress["counts"]):
            if type(cb).__name__ != name:
                raise ValueError(f"{path}: callbacks differ from the checkpoint's; {hint}")
            cb.counts = dict(counts)
        set_rng_states(progress["rng"])
        self.serial = progress["serial"]
        return progress

    def save(self, module, progress: dict) -> None:
        """Write the module's edited state and ``progress`` (plus counts, RNG states) atomically."""
        self.serial += 1
        name = f"state-{self.serial:06d}"
        module.save_edits(self.folder / name)
        record = {**progress, "format": FORMAT, "serial": self.serial, "state": name, "fingerprint": self.fingerprint,
                  "counts": [[type(cb).__name__, cb.counts] for cb in module.edit_callbacks if hasattr(cb, "counts")],
                  "rng": rng_states()}
        write_json_atomic(self.folder / PROGRESS, record)
        for entry in self.folder.iterdir():  # older states and leftovers of killed writes
            if entry.name not in (name, PROGRESS):
                remove_tree(entry) if entry.is_dir() else entry.unlink(missing_ok=True)

    def finish(self) -> None:
        """Remove the checkpoint once the run's outputs are written."""
        remove_tree(self.folder)


class ProgressLog:
    """An append-only JSON-lines checkpoint for runs that finish in independent steps (EREN's
    evaluation slices): a header line with the run's fingerprint, then one line per finished step,
    each fsynced. A kill can only tear the last line, which :meth:`load` drops.

    Args:
        path: the log file.
        fingerprint: JSON-ready description of the run; a log of another run is refused.
    """

    def __init__(self, path: str | Path, fingerprint: dict):
        self.path = Path(path)
        self.fingerprint = json.loads(json.dumps(fingerprint, default=repr, sort_keys=True))

    def load(self) -> list[dict]:
        """The finished steps (starting a new log when there is none)."""
        if not self.path.is_file():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._append({"fingerprint": self.fingerprint}, truncate=True)
            return []
        entries, good = [], 0
        with open(self.path, "rb") as f:
            for number, line in enumerate(f):
                try:
                    entry = json.loads(line) if line.endswith(b"\n") else None
                except ValueError:
                    entry = None
                if entry is None:  # torn by a kill: everything after it is gone
                    break
                if number == 0:
                    diff = _difference(entry.get("fingerprint", {}), self.fingerprint) if isinstance(entry, dict) \
                        else "not a progress log"
                    if diff:
                        raise ValueError(f"{self.path} is the checkpoint of a different run ({diff}); delete it to "
                                         f"start the run over")
                else:
                    entries.append(entry)
                good += len(line)
        if good == 0:
            self._append({"fingerprint": self.fingerprint}, truncate=True)
        else:
            os.truncate(self.path, good)
        return entries

    def append(self, entry: dict) -> None:
        """Add one finished step durably."""
        self._append(entry)

    def _append(self, entry: dict, truncate: bool = False) -> None:
        with open(self.path, "w" if truncate else "a") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def finish(self) -> None:
        """Remove the log once the run's outputs are written."""
        self.path.unlink(missing_ok=True)
