"""Tests of atomic writes and directory swaps."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from manymodels.io import atomic_write_bytes, swap_directory_into_place


def test_atomic_write_replaces_and_leaves_no_temp_file(tmp_path: Path) -> None:
    """Check that a write replaces the old content whole and leaves nothing else behind."""
    target = tmp_path / "sub" / "model.onnx"
    atomic_write_bytes(target, b"old")
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in target.parent.iterdir()] == ["model.onnx"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o666 & ~umask  # not mkstemp's 0600


def test_failed_write_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Check that a write that fails midway leaves the previous file untouched.

    A full disk cannot be produced here, so the fsync is made to fail instead.
    """
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")

    def full_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_swap_directory_replaces_old_one(tmp_path: Path) -> None:
    """Check that swapping a finished directory into place replaces the old one whole."""
    out, new = tmp_path / "run", tmp_path / ".run.tmp"
    out.mkdir()
    (out / "old.txt").write_text("old")
    new.mkdir()
    (new / "new.txt").write_text("new")
    swap_directory_into_place(new, out)
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
