"""The promotion log: every move of a registered model's alias, one JSON line each.

MLflow keeps no history of aliases (``set_registered_model_alias`` overwrites the old
target), so "who moved ``champion`` from version 4 to 5, when and why" would be lost.
Every alias move made through manymodels (:func:`manymodels.registry.promote`,
``register_bundle(alias=...)``, ``manymodels retrain --promote``) appends one line here.

The log sits in the store's state directory (:func:`state_dir`), beside the locks and
resumable state of unattended retrains: next to the database for a SQLite store (so a
store stays one self-contained folder), else under ``$XDG_STATE_HOME/manymodels``.
``MANYMODELS_STATE_DIR`` overrides both.
"""

from __future__ import annotations

import datetime as dt
import getpass
import hashlib
import json
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

from manymodels.tracking import sqlite_dir, tracking_uri

__all__ = ["LOG_FILE", "Promotion", "append_promotion", "actor", "log_path", "read_promotions",
           "state_dir"]

LOG_FILE = "promotions.jsonl"


def state_dir(uri: str | None = None) -> Path:
    """Directory where unattended jobs keep their state for the store at ``uri``."""
    explicit = os.environ.get("MANYMODELS_STATE_DIR")
    if explicit:
        return Path(explicit)
    resolved = tracking_uri(uri)
    db_dir = sqlite_dir(resolved)
    if db_dir is not None:
        return db_dir / "manymodels-state"
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return base / "manymodels" / hashlib.sha256(resolved.encode()).hexdigest()[:12]


def actor() -> str:
    """Who is acting: ``user@host`` (``MANYMODELS_ACTOR`` names a service account instead)."""
    explicit = os.environ.get("MANYMODELS_ACTOR")
    if explicit:
        return explicit
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


@dataclass(frozen=True)
class Promotion:
    """One alias move."""

    model: str
    alias: str
    version: str
    previous: str | None  # the version the alias pointed at before (None: a new alias)
    reason: str
    who: str
    at: str  # ISO-8601, UTC

    @classmethod
    def now(cls, model: str, alias: str, version: str, previous: str | None,
            reason: str) -> Promotion:
        at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        return cls(model, alias, str(version), None if previous is None else str(previous),
                   reason, actor(), at)


def log_path(uri: str | None = None) -> Path:
    return state_dir(uri) / LOG_FILE


def append_promotion(promotion: Promotion, uri: str | None = None) -> Path:
    """Append one line and fsync it; one ``write`` in append mode, so concurrent writers
    never interleave inside a line."""
    path = log_path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(asdict(promotion), sort_keys=True) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def read_promotions(uri: str | None = None, model: str | None = None) -> list[Promotion]:
    """Every logged alias move (of ``model``, if given), oldest first.

    A torn last line (a crash in the middle of a write) is skipped, not fatal.
    """
    path = log_path(uri)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            promotion = Promotion(**json.loads(line))
        except (ValueError, TypeError):
            continue
        if model is None or promotion.model == model:
            out.append(promotion)
    return out
