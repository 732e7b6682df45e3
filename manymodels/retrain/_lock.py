"""One lock per registered model, so two retrains of it never run at once.

The lock is an ``flock`` on a file that also names its holder (pid, host, start time,
command). The kernel releases an ``flock`` when its process dies, however it dies
(``kill -9`` included), so a lock can never be held by a dead process; what a dead
process leaves behind is its holder record. Finding a record in a file nobody holds is
how a stale lock is detected: it is taken over and the caller is told so. A clean exit
empties the record. On NFS, ``flock`` is mapped to POSIX byte-range locks by Linux
(NFSv4), so the lock also holds across hosts sharing the state directory.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from manymodels.errors import LockError

__all__ = ["LockHolder", "hold_lock", "read_holder"]


@dataclass(frozen=True)
class LockHolder:
    """Who holds (or last held) a lock."""

    pid: int
    host: str
    started_at: str
    command: str

    @classmethod
    def me(cls) -> LockHolder:
        return cls(os.getpid(), socket.gethostname(),
                   dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                   " ".join(sys.argv)[:300])

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host} (since {self.started_at})"

    def alive(self) -> bool | None:
        """Whether the process still runs (None: it ran on another host, unknowable)."""
        if self.host != socket.gethostname():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # exists, owned by someone else
            return True
        return True


def _read(fd: int) -> LockHolder | None:
    text = os.pread(fd, 65536, 0).decode("utf-8", errors="replace").strip()
    if not text:
        return None
    try:
        raw = json.loads(text)
        return LockHolder(int(raw["pid"]), str(raw["host"]), str(raw.get("started_at", "?")),
                          str(raw.get("command", "")))
    except (ValueError, KeyError, TypeError):
        return LockHolder(-1, "?", "?", text[:100])


def _write(fd: int, holder: LockHolder | None) -> None:
    data = b"" if holder is None else json.dumps(asdict(holder)).encode("utf-8")
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def read_holder(path: str | os.PathLike[str]) -> LockHolder | None:
    """The holder record of a lock file (None when there is none)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        return _read(fd)
    finally:
        os.close(fd)


def _stale_message(path: Path, holder: LockHolder) -> str:
    alive = holder.alive()
    state = ("which is no longer running" if alive is False else
             "which no longer holds it (the pid was reused)" if alive else
             "which no longer holds it")
    return f"lock {path}: taking over a stale lock of {holder.describe()}, {state}"


@contextmanager
def hold_lock(path: str | os.PathLike[str], *, wait: float = 0.0, poll: float = 0.2,
              what: str = "this model", on_stale: Callable[[str], None] | None = None
              ) -> Iterator[LockHolder]:
    """Hold the lock at ``path`` for the ``with`` block.

    Parameters
    ----------
    wait
        Seconds to wait for a busy lock before raising :class:`LockError` (0: do not wait).
    what
        What the lock protects, for the error message.
    on_stale
        Called with one line when a dead holder's record is taken over.
    """
    lock_path = Path(path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + max(wait, 0.0)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = _read(fd)
                    who = holder.describe() if holder else "another process"
                    waited = f" after waiting {wait:g} s" if wait > 0 else ""
                    raise LockError(f"{what} is locked by {who}{waited} (lock file "
                                    f"{lock_path}); wait for it or pass --wait SECONDS") from None
                time.sleep(min(poll, max(deadline - time.monotonic(), 0.01)))
        previous = _read(fd)
        if previous is not None and on_stale is not None:
            on_stale(_stale_message(lock_path, previous))
        me = LockHolder.me()
        _write(fd, me)
        try:
            yield me
        finally:
            _write(fd, None)  # a clean exit leaves no holder record behind
    finally:
        os.close(fd)  # releases the flock
