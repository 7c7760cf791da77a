"""Atomic writing and reading of saved state (safetensors for tensors, JSON for the rest) and of
output files, and removal of leftovers that says when it fails."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from torch import Tensor

TENSORS, META = "edits.safetensors", "edits.json"
CURRENT = "CURRENT"  # a state folder's pointer file: the name of its complete version
VERSION = re.compile(r"v(\d{6,})")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(path: Path, data: str | bytes) -> None:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` atomically: temp file, fsync, rename,
    fsync the folder. A crash at any moment leaves the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_json_atomic(path: Path, obj, indent: int | None = None) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (:func:`write_file_atomic`)."""
    write_file_atomic(path, json.dumps(obj, indent=indent))


def remove_tree(path: Path) -> bool:
    """Remove the folder ``path`` (a missing one is fine) as far as possible. What cannot be
    removed is reported in one warning naming the path and the error rather than raised: callers
    remove leftovers after their result is already safe. Returns whether everything went."""
    errors = []

    def failed(function, name, exc):
        exc = exc[1] if isinstance(exc, tuple) else exc  # onerror gives exc_info, onexc the exception
        if not isinstance(exc, FileNotFoundError):
            errors.append(f"{name}: {exc}")

    shutil.rmtree(path, **({"onexc": failed} if sys.version_info >= (3, 12) else {"onerror": failed}))
    if errors:
        warnings.warn(f"could not remove {path} ({'; '.join(errors)})", RuntimeWarning, stacklevel=2)
    return not errors


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
    """Write ``tensors`` (safetensors) and ``meta`` (JSON) as the saved state in ``folder`` so
    that at every instant ``folder`` holds a complete state, the old one or the new one.

    Each write goes into a version folder of its own, ``folder/vNNNNNN/{edits.safetensors,
    edits.json}``, fsynced and renamed into place; then the pointer ``folder/CURRENT`` is
    replaced atomically to name it; only then are older versions removed. A folder that does
    not exist yet is built under a temporary name and renamed into place whole."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    fresh = not folder.is_dir()
    home = folder.with_name(f".{folder.name}.tmp{os.getpid()}") if fresh else folder
    if fresh:
        remove_tree(home)
        home.mkdir()
    versions = [int(m.group(1)) for m in map(VERSION.fullmatch, os.listdir(home)) if m]
    version = f"v{max(versions, default=0) + 1:06d}"
    staging = home / f".{version}.tmp{os.getpid()}"
    remove_tree(staging)
    staging.mkdir()
    save_file(tensors, str(staging / TENSORS))
    with open(staging / TENSORS, "rb+") as f:
        os.fsync(f.fileno())
    write_json_atomic(staging / META, meta)
    os.replace(staging, home / version)
    _fsync_dir(home)
    write_file_atomic(home / CURRENT, version + "\n")
    if fresh:
        os.replace(home, folder)
        _fsync_dir(folder.parent)
        return folder
    # The pointer names the new version: older versions, an unversioned state written before
    # versions existed, and leftovers of killed writes can go.
    for entry in os.scandir(folder):
        if entry.name in (CURRENT, version):
            continue
        if VERSION.fullmatch(entry.name) or (entry.name.startswith(".v") and ".tmp" in entry.name):
            remove_tree(Path(entry.path))
        elif entry.name in (TENSORS, META) or (entry.name.startswith(f".{CURRENT}.tmp")):
            Path(entry.path).unlink(missing_ok=True)
    return folder


def state_files(folder: Path) -> Path:
    """The folder holding the current ``edits.safetensors`` and ``edits.json`` of a state
    written by :func:`write_state` (the version ``folder/CURRENT`` names; ``folder`` itself for
    a state written before versions existed)."""
    folder = Path(folder)
    pointer = folder / CURRENT
    if not pointer.is_file():
        return folder
    name = pointer.read_text().strip()
    if not VERSION.fullmatch(name):
        raise ValueError(f"{pointer}: names {name!r}, not a state version (vNNNNNN)")
    return folder / name


def read_state(folder: Path) -> tuple[dict[str, Tensor], dict]:
    """Read a state written by :func:`write_state`; clear errors for missing or broken files."""
    from safetensors.torch import load_file

    folder = Path(folder)
    files = state_files(folder)
    if not (files / TENSORS).is_file() or not (files / META).is_file():
        raise FileNotFoundError(f"{folder}: no saved edits here (expected {TENSORS} and {META}"
                                + (f" in {files.name}/, which {CURRENT} names)" if files != folder else ")"))
    try:
        meta = json.loads((files / META).read_text())
        tensors = load_file(str(files / TENSORS))
    except (OSError, ValueError) as err:
        raise ValueError(f"{folder}: saved edits are unreadable ({err})") from err
    return tensors, meta
