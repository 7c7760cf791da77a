"""repair_pl.checkpoint: saved states and files survive a crash at any instant of their write,
and a leftover that cannot be removed is reported."""

import errno
import json
import os
import shutil

import pytest
import torch

from repair_pl import checkpoint
from repair_pl.checkpoint import META, TENSORS, read_state, write_json_atomic, write_state
from repair_pl.resume import RunCheckpoint


class Crash(BaseException):
    """Stands in for the process dying: nothing in the writer catches it."""


def state(value: float) -> tuple[dict, dict]:
    return {"side": torch.full((3, 2), value)}, {"edit_count": int(value)}


def assert_reads_as(folder, expected) -> None:
    tensors, meta = read_state(folder)
    assert meta == expected[1] and torch.equal(tensors["side"], expected[0]["side"])


def crash_at_step(monkeypatch, k: int) -> None:
    """Make the k-th rename or removal from now raise :class:`Crash` before it happens: every
    instant between two steps of a write is one of these points."""
    calls = {"n": 0}

    def counted(real):
        def step(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == k:
                raise Crash
            return real(*args, **kwargs)
        return step

    for name in ("replace", "rename", "unlink", "rmdir"):
        monkeypatch.setattr(os, name, counted(getattr(os, name)))
    monkeypatch.setattr(shutil, "rmtree", counted(shutil.rmtree))


@pytest.mark.parametrize("existing", [True, False], ids=["over-a-state", "new-folder"])
def test_a_crash_at_any_step_of_write_state_leaves_a_complete_state(tmp_path, monkeypatch, existing):
    old, new = state(1.0), state(2.0)
    for k in range(1, 100):
        folder = tmp_path / f"crash{k}" / "edits"
        if existing:
            write_state(folder, *old)
        with monkeypatch.context() as patch:
            crash_at_step(patch, k)
            try:
                write_state(folder, *new)
                finished = True
            except Crash:
                finished = False
        if finished:
            assert_reads_as(folder, new)
            break
        if existing:  # the old state or the new one, whole, under the final name
            tensors, meta = read_state(folder)
            assert_reads_as(folder, new if meta == new[1] else old)
        elif folder.exists():
            assert_reads_as(folder, new)  # a new folder appears only complete
        # the next write after the crash succeeds and clears what the killed one left behind
        write_state(folder, *state(3.0))
        assert_reads_as(folder, state(3.0))
        assert len(list(folder.rglob(TENSORS))) == 1
        assert not [p.name for p in folder.parent.rglob("*") if ".tmp" in p.name or ".old" in p.name]
    else:
        pytest.fail("write_state never finished")
    assert k > 3  # the write had several steps, each tried


def test_a_state_saved_before_versions_existed_still_reads_and_is_replaced(tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "edits"
    folder.mkdir()
    tensors, meta = state(1.0)
    save_file(tensors, str(folder / TENSORS))  # the unversioned layout: the files in the folder itself
    (folder / META).write_text(json.dumps(meta))
    assert_reads_as(folder, (tensors, meta))
    write_state(folder, *state(2.0))
    assert_reads_as(folder, state(2.0))
    assert not (folder / TENSORS).exists() and not (folder / META).exists()


def test_write_state_keeps_files_it_did_not_write(tmp_path):
    folder = tmp_path / "edits"
    write_state(folder, *state(1.0))
    (folder / "notes.txt").write_text("mine")
    write_state(folder, *state(2.0))
    assert (folder / "notes.txt").read_text() == "mine"


def test_a_pointer_to_no_version_is_a_clear_error(tmp_path):
    folder = tmp_path / "edits"
    write_state(folder, *state(1.0))
    (folder / checkpoint.CURRENT).write_text("../elsewhere\n")
    with pytest.raises(ValueError, match=r"CURRENT: names '../elsewhere', not a state version"):
        read_state(folder)
    (folder / checkpoint.CURRENT).write_text("v000009\n")
    with pytest.raises(FileNotFoundError, match=r"no saved edits here.*v000009/, which CURRENT names"):
        read_state(folder)


@pytest.mark.parametrize("write", [lambda p: checkpoint.write_file_atomic(p, "new text"),
                                   lambda p: write_json_atomic(p, [2])], ids=["text", "json"])
def test_a_crash_while_writing_a_file_leaves_the_old_file(tmp_path, monkeypatch, write):
    path = tmp_path / "summary.md"
    path.write_text("old")
    with monkeypatch.context() as patch:
        crash_at_step(patch, 1)
        with pytest.raises(Crash):
            write(path)
    assert path.read_text() == "old"
    write(path)
    assert path.read_text() in ("new text", "[2]")


def refuse_rmdir(monkeypatch, refused: str) -> None:
    """Folders named ``refused`` cannot be removed (as on a busy network file system)."""
    real = os.rmdir

    def rmdir(path, *args, **kwargs):
        if os.path.basename(os.fspath(path)) == refused:
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "rmdir", rmdir)


def test_an_old_version_that_cannot_be_removed_is_reported(tmp_path, monkeypatch):
    folder = tmp_path / "edits"
    write_state(folder, *state(1.0))
    refuse_rmdir(monkeypatch, "v000001")
    with pytest.warns(RuntimeWarning, match=r"could not remove .*edits/v000001 .*Permission denied"):
        write_state(folder, *state(2.0))
    assert_reads_as(folder, state(2.0))  # the new state is in place all the same


def test_a_checkpoint_that_cannot_be_removed_is_reported(tmp_path, monkeypatch):
    folder = tmp_path / "run" / "checkpoint"
    (folder / "state-000001").mkdir(parents=True)
    refuse_rmdir(monkeypatch, "checkpoint")
    with pytest.warns(RuntimeWarning, match=r"could not remove .*run/checkpoint .*Permission denied"):
        RunCheckpoint(folder, {}).finish()
    assert not (folder / "state-000001").exists()  # what could go went


def test_remove_tree_is_quiet_when_it_removes_everything_or_there_is_nothing(tmp_path, recwarn):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "f").write_text("x")
    assert checkpoint.remove_tree(tmp_path / "a") and not (tmp_path / "a").exists()
    assert checkpoint.remove_tree(tmp_path / "missing")
    assert not recwarn.list
