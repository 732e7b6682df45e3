"""The resumable state of one retrain, so a killed run resumes instead of starting over.

Layout (under the model's state directory, written only while its lock is held)::

    attempt/
      attempt.json        what the run was asked to do (its plan identity) and its run id
      done/<n>.pkl        the results of each finished chunk of models, ONNX bytes included
                          (a state record per segment: status, metrics, holdout predictions
                          for the gate, the model)
      <run_id>/           the run directory of the fitted part, once training finished

Each record is written atomically (temp file, fsync, rename): one write and one fsync per
chunk, not per model, so recording costs little even for chunks of tiny segments. A rerun with
the same plan identity (same champion, same data fingerprints, same specs) takes every
recorded result and fits only the rest; any other rerun discards the attempt. The
pickled records are read only from this directory, which only this user's retrains
write.
"""

from __future__ import annotations

import datetime as dt
import json
import pickle
import shutil
import uuid
from pathlib import Path
from typing import Any

from manymodels.io import atomic_write_bytes, atomic_write_text
from manymodels.results import FitResult

__all__ = ["Attempt", "recorded_models"]

_ATTEMPT_FILE = "attempt.json"


class Attempt:
    """One retrain's state directory (see the module docstring)."""

    def __init__(self, root: Path, info: dict[str, Any], results: dict[str, FitResult]) -> None:
        self.root = root
        self.info = info
        self.results = results  # recorded before this process started (resumed)

    @property
    def run_id(self) -> str:
        return str(self.info["run_id"])

    @property
    def run_dir(self) -> Path:
        """Where the fitted part's run directory goes (it exists once training finished)."""
        return self.root / self.run_id

    @classmethod
    def open(cls, root: Path, identity: str, run_id: str) -> tuple[Attempt, str | None]:
        """Resume the attempt in ``root`` if it has this identity, else start a new one.

        Returns the attempt and a line to tell the user (None for a fresh start).
        """
        info_path = root / _ATTEMPT_FILE
        note = None
        if info_path.is_file():
            try:
                info = json.loads(info_path.read_text(encoding="utf-8"))
            except ValueError:
                info = {}
            if info.get("identity") == identity:
                results = _load_records(root)
                attempt = cls(root, info, results)
                return attempt, (f"resuming the unfinished retrain {attempt.run_id} (started "
                                 f"{info.get('started_at', '?')}): {len(results)} model(s) "
                                 "already fitted")
            note = (f"discarding the unfinished retrain {info.get('run_id', '?')}: the champion, "
                    "the data or the specs changed since")
        if root.exists():
            shutil.rmtree(root)
        (root / "done").mkdir(parents=True)
        info = {"identity": identity, "run_id": run_id,
                "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        atomic_write_text(info_path, json.dumps(info))
        return cls(root, info, {}), note

    def record(self, done: list[FitResult]) -> None:
        """Save a finished chunk, its models' ONNX bytes included, in one atomic write."""
        name = f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex[:8]}.pkl"
        atomic_write_bytes(self.root / "done" / name, pickle.dumps(done, protocol=5))

    def write_model(self, name: str, path: Path) -> None:
        """Write the ONNX file of a recorded model (its bytes are in the record)."""
        onnx = self.results[name].onnx
        assert onnx is not None, name
        path.write_bytes(onnx)

    def finish(self) -> None:
        """The retrain is complete: nothing left to resume."""
        shutil.rmtree(self.root, ignore_errors=True)


def _load_records(root: Path) -> dict[str, FitResult]:
    results: dict[str, FitResult] = {}
    for path in sorted((root / "done").glob("*.pkl")):
        try:
            chunk = pickle.loads(path.read_bytes())  # noqa: S301 - our own state directory
        except Exception:  # a torn file cannot exist (atomic writes); be safe anyway
            continue
        for res in chunk:
            if res.status == "ok" and res.onnx is None:
                continue  # fit it again rather than trust a record without its model
            results[res.name] = res
    return results


def recorded_models(root: str | Path) -> int:
    """How many models an attempt directory has recorded (for progress and tests)."""
    return len(_load_records(Path(root))) if (Path(root) / "done").is_dir() else 0
