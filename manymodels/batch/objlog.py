"""Exactly-once batch output on an object store (``s3://...``), beside :mod:`.txlog`.

An object store has no rename and no append, so the local protocol (rename the staged
part, then append a commit line) cannot be copied. Instead each piece is committed by
one **write-once marker** created with a conditional put:

    <OUTPUT>/predictions/part-<piece>-<run>.parquet   uploaded first, under a name unique
    <OUTPUT>/rejected/part-<piece>-<run>.parquet      to this run (never overwritten)
    <OUTPUT>/_manymodels_batch/begin.json             the header, written once
    <OUTPUT>/_manymodels_batch/commits/<piece>.json   the commit point: created with
                                                      If-None-Match: *, names the parts

A part is committed exactly when a marker names it. A crash after the upload and before
the marker leaves an unnamed part, which the next run deletes; a marker that already
exists (another run got there first) makes this run delete its own upload. A rerun
reads only the markers, so it trusts nothing a crashed run left half-done. Retracting a
stale piece deletes its marker first, then its parts. Staging stays on local disk
(workers write there exactly as for a local OUTPUT), so scoring is unchanged.

Unlike a local OUTPUT, two runs writing the same store OUTPUT at once are not locked
out (object stores have no lock that survives a ``kill -9`` cleanly); the markers still
keep every piece single, but one run's cleanup may delete the other's uncommitted
uploads, so run one at a time per OUTPUT.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from manymodels.errors import SpecError
from manymodels.storage import filesystem, put_exclusive

from .txlog import PREDICTIONS_DIR, REJECTED_DIR, STATE_DIR, CommittedPiece, CommittedState

__all__ = ["ObjectTxLog"]

COMMITS_DIR = "commits"
BEGIN_FILE = "begin.json"


class ObjectTxLog(CommittedState):
    """The state of one OUTPUT on an object store; the same methods as :class:`.TxLog`.

    Parameters
    ----------
    url
        The OUTPUT URL (``s3://bucket/prefix``).
    header
        What must match between runs writing the same OUTPUT.
    overwrite
        Delete earlier results (markers first) and start over.
    """

    def __init__(self, url: str, header: Mapping[str, Any], overwrite: bool = False) -> None:
        self.url = url.rstrip("/")
        self.output = self.url  # what summaries print
        self.fs, self.base = filesystem(self.url)
        self.fs.invalidate_cache()
        self._token = uuid.uuid4().hex[:12]
        self.staging = Path(tempfile.mkdtemp(prefix="manymodels-batch-staging-"))
        self.pieces: dict[str, CommittedPiece] = {}
        if overwrite:
            self._delete_all()
        self._begin(header)
        self._read()

    # -- paths ------------------------------------------------------------------------------
    def _key(self, *parts: str) -> str:
        return "/".join((self.base, *parts))

    def _marker(self, piece_id: str) -> str:
        return self._key(STATE_DIR, COMMITS_DIR, f"{piece_id}.json")

    def _listing(self, *parts: str) -> list[str]:
        try:
            return [str(p) for p in self.fs.ls(self._key(*parts), detail=False)]
        except FileNotFoundError:
            return []

    # -- opening ----------------------------------------------------------------------------
    def _delete_all(self) -> None:
        for folder in ((STATE_DIR, COMMITS_DIR), (PREDICTIONS_DIR,), (REJECTED_DIR,)):
            paths = self._listing(*folder)
            if paths:
                self.fs.rm(paths)
        try:
            self.fs.rm_file(self._key(STATE_DIR, BEGIN_FILE))
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache()

    def _begin(self, header: Mapping[str, Any]) -> None:
        path = self._key(STATE_DIR, BEGIN_FILE)
        data = json.dumps({"type": "begin", **header}, sort_keys=True).encode()
        if put_exclusive(self.fs, path, data):
            return
        event = json.loads(self.fs.cat_file(path))
        for key, want in header.items():
            have = event.get(key)
            if have != want:
                raise SpecError(
                    f"OUTPUT {self.url} holds results written with {key}={have!r}, this run "
                    f"uses {key}={want!r}; rerun with --overwrite to start over, or choose "
                    f"another OUTPUT")

    def _read(self) -> None:
        for path in self._listing(STATE_DIR, COMMITS_DIR):
            if not path.endswith(".json"):
                continue
            piece = CommittedPiece.from_json(json.loads(self.fs.cat_file(path)))
            self.pieces[piece.id] = piece

    # -- state (as TxLog) ------------------------------------------------------------------
    def clean(self) -> int:
        """Delete uploaded parts that no marker names (a crash between upload and marker)."""
        listed = {p.part for p in self.pieces.values() if p.part}
        listed_rejected = {p.rejected_part for p in self.pieces.values() if p.rejected_part}
        orphans = [path for folder, names in ((PREDICTIONS_DIR, listed),
                                              (REJECTED_DIR, listed_rejected))
                   for path in self._listing(folder) if path.rsplit("/", 1)[-1] not in names]
        if orphans:
            self.fs.rm(orphans)
        return len(orphans)

    # -- writing ---------------------------------------------------------------------------
    def _delete_parts(self, piece: CommittedPiece) -> None:
        for folder, name in ((PREDICTIONS_DIR, piece.part), (REJECTED_DIR, piece.rejected_part)):
            if name:
                try:
                    self.fs.rm_file(self._key(folder, name))
                except FileNotFoundError:
                    pass

    def retract(self, pieces: Iterable[CommittedPiece]) -> int:
        """Withdraw pieces (markers first, then their parts); returns how many."""
        count = 0
        for piece in list(pieces):
            try:
                self.fs.rm_file(self._marker(piece.id))
            except FileNotFoundError:
                pass
            self._delete_parts(piece)
            self.pieces.pop(piece.id, None)
            count += 1
        return count

    def commit(self, pieces: Iterable[tuple[CommittedPiece, Path | None, Path | None]],
               hook: Any = None) -> None:
        """Upload each piece's parts under run-unique names, then create its marker."""
        uploaded: list[CommittedPiece] = []
        for piece, staged, staged_rejected in pieces:
            unique = replace(
                piece,
                part=f"part-{piece.id}-{self._token}.parquet" if piece.part else None,
                rejected_part=(f"part-{piece.id}-{self._token}.parquet"
                               if piece.rejected_part else None))
            for local, folder, name in ((staged, PREDICTIONS_DIR, unique.part),
                                        (staged_rejected, REJECTED_DIR, unique.rejected_part)):
                if local is not None and name:
                    self.fs.put_file(str(local), self._key(folder, name))
                    os.unlink(local)
            uploaded.append(unique)
        if not uploaded:
            return
        if hook is not None:
            hook("after_rename")
        for piece in uploaded:
            data = json.dumps(piece.to_json(), separators=(",", ":")).encode()
            if put_exclusive(self.fs, self._marker(piece.id), data):
                self.pieces[piece.id] = piece
            else:  # committed already (by a run we did not know of): ours is a duplicate
                self._delete_parts(piece)

    def close(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
