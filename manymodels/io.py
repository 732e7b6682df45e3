"""Atomic writes (a crash leaves the old result or the new one, never a mix), the
JSON encoder of manifests, and the CSV delimiter sniffer (here, not in
:mod:`manymodels.data`, because the batch path never imports pandas)."""

from __future__ import annotations

import csv
import ctypes
import math
import os
import shutil
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import yaml

from manymodels.errors import SpecError
from manymodels.runtime.manifest import MANIFEST_FILE

__all__ = ["atomic_write_bytes", "atomic_write_text", "finish_run_dir", "fsync_dir", "json_ready",
           "link_or_copy", "manifest_json", "swap_directory_into_place", "sync_tree"]

#: The C library, for ``syncfs`` (:func:`sync_tree`); Linux only.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None

_MANIFEST_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


def _json_default(value: Any) -> Any:
    """What the standard encoder's ``default=str`` did, dates as ISO text."""
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def manifest_json(value: Any) -> bytes:
    """Compact JSON of a manifest (or any run record), NaN and infinities as ``null``.

    orjson writes a large manifest many times faster than the standard encoder, and it is
    written twice per retrain (run and bundle). The text
    is standard JSON that every reader (:func:`manymodels.runtime.read_manifest`, other
    languages) parses the same.
    """
    return orjson.dumps(value, default=_json_default, option=_MANIFEST_OPTIONS)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, mode: int | None = None,
                       sync: bool = True) -> None:
    """Write ``data`` to a temp file beside ``path``, fsync it, then rename it over.

    ``sync=False`` leaves the flush to whoever renames the directory into place: a file
    written into a run's private staging directory is flushed with all the others by
    :func:`finish_run_dir`, in one call instead of one per file.

    The temp file is created with a fresh name rather than :func:`tempfile.mkstemp`, whose
    0600 mode would survive the rename and hide the file from other users (a server
    running as another account, say). ``mode`` (e.g. ``0o600`` for a key file) is set when
    the temp file is created, so the content is never readable with a wider mode.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        with os.fdopen(os.open(tmp, flags, 0o666 if mode is None else mode), "wb") as handle:
            if mode is not None:
                os.fchmod(handle.fileno(), mode)  # the umask cannot widen or narrow it
            handle.write(data)
            if sync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str, mode: int | None = None) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), mode)


def finish_run_dir(staging: Path, final_dir: Path, manifest: Any, report: Any,
                   specs: Mapping[str, Any], overwrite: bool) -> None:
    """Write a staged run's specs, report and manifest, then rename it into place.

    Every run directory (regression, classification, forecasting) ends this way. Plain
    writes suffice: the directory is private until the rename, and everything in it is
    flushed to disk (:func:`sync_tree`) before the rename, which is then flushed too;
    with ``overwrite`` the old run is moved aside first and deleted only once the new
    one is in place.
    ``specs`` maps a name (``segmenter``, ``trainer``) to its pydantic spec and
    ``report`` is a DataFrame.
    """
    (staging / "specs").mkdir(exist_ok=True)
    for kind, spec in specs.items():
        (staging / "specs" / f"{kind}.yaml").write_text(
            yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    report.to_parquet(staging / "report.parquet", index=False)
    (staging / MANIFEST_FILE).write_bytes(manifest_json(json_ready(manifest)))
    if final_dir.exists() and not overwrite:
        raise SpecError(f"run directory {final_dir} already exists; choose another "
                        f"run id or pass overwrite")
    sync_tree(staging)
    swap_directory_into_place(staging, final_dir)
    fsync_dir(final_dir.parent)


def sync_tree(root: Path) -> None:
    """Flush every file under ``root`` to disk before it is renamed into place.

    On Linux one ``syncfs`` flushes the file system ``root`` is on (a run's hundreds of
    model files in one call); elsewhere each file is fsynced.
    """
    if _LIBC is not None:
        fd = os.open(root, os.O_RDONLY)
        try:
            if _LIBC.syncfs(fd) == 0:
                return
        finally:
            os.close(fd)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def swap_directory_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished directory ``tmp`` to ``out``.

    An existing ``out`` is moved aside first and removed only once the new one is in
    place (and put back if the rename fails), so readers see the old directory or the
    new one, never a mix.
    """
    old: Path | None = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def link_or_copy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Place ``src`` at ``dst`` as a hard link (no bytes written), else as a copy.

    Safe for model files, which manymodels never rewrites in place: every write replaces
    a file (:func:`atomic_write_bytes`), so a link shared by a run, a bundle, the download
    cache and a local artifact store keeps its bytes. With many models, linking instead of
    copying is most of the cost of packing with a cold page cache.
    """
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)


_PLAIN = frozenset({str, int, bool, type(None)})


def json_ready(value: Any) -> Any:
    """JSON-ready value: numpy scalars become Python ones, NaN and infinities null.

    ``json.dumps`` would write NaN as the bare token ``NaN``, which is not JSON and breaks
    readers other than Python's.
    """
    kind = type(value)
    # the plain types first: a forecasting manifest holds a few values per series
    if kind is float or kind is np.float64:
        return float(value) if math.isfinite(value) else None
    if kind in _PLAIN:
        return value
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if hasattr(value, "isoformat"):  # dates and timestamps of a time column
        return value.isoformat()
    return value


#: Delimiters :func:`sniff_delimiter` chooses among (spreadsheets in many locales write ``;``).
CSV_DELIMITERS = ",;\t|"
#: Bytes of a CSV file read to guess its delimiter.
SNIFF_BYTES = 64 * 1024


def sniff_delimiter(sample: bytes | str) -> str:
    """The delimiter of a CSV text from its first lines: one of :data:`CSV_DELIMITERS`.

    The header row decides when the sniffer cannot (a one-column table, ragged quoting):
    the candidate that occurs most often in it, else ``,``.
    """
    text = sample.decode("utf-8-sig", errors="replace") if isinstance(sample, bytes) \
        else sample.lstrip("\ufeff")
    lines = text.splitlines()
    if len(text) >= SNIFF_BYTES and len(lines) > 1:
        lines = lines[:-1]  # the last line may be cut in the middle
    head = "\n".join(lines[:50])
    try:
        return csv.Sniffer().sniff(head, delimiters=CSV_DELIMITERS).delimiter
    except csv.Error:
        header = lines[0] if lines else ""
        counts = {d: header.count(d) for d in CSV_DELIMITERS}
        best = max(counts, key=lambda d: counts[d])
        return best if counts[best] else ","
