"""Tests of atomic writes and directory swaps."""

from __future__ import annotations

import datetime as dt
import json
import os
import stat
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import manymodels.io as mio
from manymodels.io import (
    atomic_write_bytes,
    json_ready,
    link_or_copy,
    manifest_json,
    swap_directory_into_place,
    sync_tree,
)


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


def test_manifest_json_is_standard_json_without_nan() -> None:
    """Check that the manifest encoder writes what the standard library reads back:
    numpy scalars as numbers, NaN and infinities as null (never a bare NaN token), dates
    as ISO text, other objects as their text, integer keys as strings."""
    record = {"metric": np.float32(0.5), "rows": np.int64(24), "nan": float("nan"),
              "inf": np.float64("inf"), "when": dt.date(2026, 12, 1),
              "at": pd.Timestamp("2026-12-01T10:00:00"), "path": Path("runs/x"),
              "levels": {0: ["a"], 1: []}, "values": [1.25, None, "s"]}
    text = manifest_json(record)
    assert b"NaN" not in text and b"Infinity" not in text
    assert json.loads(text) == {
        "metric": 0.5, "rows": 24, "nan": None, "inf": None, "when": "2026-12-01",
        "at": "2026-12-01T10:00:00", "path": "runs/x", "levels": {"0": ["a"], "1": []},
        "values": [1.25, None, "s"]}
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c}")) is not None


def test_json_ready_gives_plain_values_and_null_for_non_finite() -> None:
    """Check that json_ready turns numpy scalars into Python ones of the same value, every
    NaN and infinity (Python or numpy) into None, dates into ISO text, tuples into lists,
    and leaves plain values and text subclasses as they are."""
    values = [1.25, float("nan"), float("-inf"), np.float64(2.5), np.float64("nan"),
              np.float32(0.5), np.float32("inf"), np.int64(3), np.bool_(True), True, 7,
              None, "s", np.str_("t"), (1, 2.0), pd.Timestamp("2026-12-01")]
    out = json_ready({"v": values, "nested": [{"x": [np.float64("inf"), 4.0]}]})
    assert out == {"v": [1.25, None, None, 2.5, None, 0.5, None, 3, True, True, 7, None,
                         "s", "t", [1, 2.0], "2026-12-01T00:00:00"],
                   "nested": [{"x": [None, 4.0]}]}
    assert [type(v) for v in out["v"][:12]] == [float, type(None), type(None), float,
                                                type(None), float, type(None), int, bool,
                                                bool, int, type(None)]


def test_link_or_copy_links_on_one_file_system_and_copies_across(tmp_path: Path) -> None:
    """Check that a file placed on the same file system is a hard link (one inode, no
    bytes written) and one placed on another file system (/dev/shm, a tmpfs) a copy."""
    src = tmp_path / "m.onnx"
    src.write_bytes(b"model bytes")
    linked = tmp_path / "linked.onnx"
    link_or_copy(src, linked)
    assert os.stat(linked).st_ino == os.stat(src).st_ino
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        return  # no second file system here: the link case above is the whole check
    with tempfile.TemporaryDirectory(dir=shm) as other:
        copied = Path(other) / "copied.onnx"
        link_or_copy(src, copied)
        assert copied.read_bytes() == b"model bytes"
        assert os.stat(copied).st_ino != os.stat(src).st_ino or \
            os.stat(copied).st_dev != os.stat(src).st_dev


def test_sync_tree_flushes_every_file_where_there_is_no_syncfs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Check that without ``syncfs`` every file under the tree, nested ones too, is fsynced
    (the files of a staging directory written with ``sync=False``)."""
    files = {tmp_path / "manifest.json", tmp_path / "models" / "a.onnx",
             tmp_path / "models" / "deep" / "b.onnx"}
    for path in files:
        atomic_write_bytes(path, b"x", sync=False)
    seen: list[Path] = []
    real = os.fsync

    def spy(fd: int) -> None:
        seen.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real(fd)

    monkeypatch.setattr(mio, "_LIBC", None)
    monkeypatch.setattr(mio.os, "fsync", spy)
    sync_tree(tmp_path)
    assert set(seen) == files and len(seen) == len(files)


def test_sync_tree_with_syncfs_keeps_the_files(tmp_path: Path) -> None:
    """Check that the one-call flush returns and leaves the tree as written."""
    atomic_write_bytes(tmp_path / "models" / "a.onnx", b"abc", sync=False)
    sync_tree(tmp_path)
    assert (tmp_path / "models" / "a.onnx").read_bytes() == b"abc"
    assert not list(tmp_path.rglob("*.tmp"))
