"""Atomic writes: a crash leaves the old result or the new one, never a mix."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

__all__ = ["atomic_write_bytes", "atomic_write_text", "swap_directory_into_place"]


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to a temp file beside ``path``, fsync it, then rename it over.

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
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str, mode: int | None = None) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), mode)


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
