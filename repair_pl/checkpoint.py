"""Atomic writing and reading of saved state: safetensors for tensors, JSON for the rest."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from torch import Tensor

TENSORS, META = "edits.safetensors", "edits.json"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj, indent: int | None = None) -> None:
    """Write ``obj`` as JSON to ``path`` atomically: temp file, fsync, rename, fsync the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=indent)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` (created if missing) across processes, so
    that one computes what the others then read. Without ``fcntl`` (Windows) it locks nothing."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_state(folder: Path, tensors: dict[str, Tensor], meta: dict) -> Path:
    """Write ``folder/edits.safetensors`` and ``folder/edits.json`` so that a crash at any moment
    leaves either the old complete state or the new one (temp folder, fsync, rename)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(tensors, str(tmp / TENSORS))
    with open(tmp / META, "w") as f:
        json.dump(meta, f)
        f.flush()
        os.fsync(f.fileno())
    with open(tmp / TENSORS, "rb+") as f:
        os.fsync(f.fileno())
    old = folder.with_name(f".{folder.name}.old{os.getpid()}")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(folder.parent)
    return folder


def read_state(folder: Path) -> tuple[dict[str, Tensor], dict]:
    """Read a state written by :func:`write_state`; clear errors for missing or broken files."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / TENSORS).is_file() or not (folder / META).is_file():
        raise FileNotFoundError(f"{folder}: no saved edits here (expected {TENSORS} and {META})")
    try:
        meta = json.loads((folder / META).read_text())
        tensors = load_file(str(folder / TENSORS))
    except (OSError, ValueError) as err:
        raise ValueError(f"{folder}: saved edits are unreadable ({err})") from err
    return tensors, meta
