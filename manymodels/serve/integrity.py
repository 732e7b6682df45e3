"""Model files checked against the manifest's sha256 before a session is made of them.

A model file replaced after packaging (by mistake, or by someone who can write the
bundle directory) would otherwise be served under the old model's name. The check
hashes the file when a model loads, and remembers the verdict by the file's inode,
modification time and size: a model evicted and loaded again costs a ``stat``, not a
hash, and the request path never touches this (a cache hit does not load).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from pathlib import Path

from manymodels.errors import BundleError
from manymodels.runtime import sha256_file
from manymodels.runtime.manifest import ModelEntry

__all__ = ["FileChecks", "file_problems"]

Signature = tuple[int, int, int]


class FileChecks:
    """sha256 verdicts of model files, cached by ``(inode, mtime_ns, size)``."""

    def __init__(self) -> None:
        self._verified: dict[str, Signature] = {}
        self._lock = threading.Lock()
        self.hashed = 0
        """Files hashed so far (a cached verdict does not count)."""

    def check(self, entry: ModelEntry, path: Path) -> None:
        """Raise :class:`BundleError` if ``path`` is missing or does not hash to
        ``entry.sha256`` (entries without a sha256 are taken as they are)."""
        try:
            info = os.stat(path)
        except FileNotFoundError:
            raise BundleError(f"model file {entry.file} of model '{entry.name}' is missing in "
                              f"{path.parent.parent}") from None
        if not entry.sha256:
            return
        key = os.fspath(path)
        signature = (info.st_ino, info.st_mtime_ns, info.st_size)
        with self._lock:
            if self._verified.get(key) == signature:
                return
        digest = sha256_file(path)
        with self._lock:
            self.hashed += 1
        if digest != entry.sha256:
            raise BundleError(f"model file {entry.file} does not match the sha256 the manifest "
                              f"records for model '{entry.name}' (changed or replaced since "
                              f"packaging); restore it or repackage the bundle")
        with self._lock:
            self._verified[key] = signature


def file_problems(checks: FileChecks, entries: Iterable[ModelEntry], root: Path,
                  limit: int = 5) -> list[str]:
    """The first ``limit`` model files of ``entries`` that are missing or changed (what
    ``manymodels validate`` reports as checksum problems), filling the verdict cache."""
    problems = []
    for entry in entries:
        try:
            checks.check(entry, root / entry.file)
        except BundleError as exc:
            problems.append(exc.message)
            if len(problems) >= limit:
                break
    return problems
