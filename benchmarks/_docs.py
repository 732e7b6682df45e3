"""Every benchmark writes what it prints into the docs, with its command, date and machine.

A figure in the documentation must come from a table a benchmark wrote, so the docs can
never quote a number nobody can reproduce. Each benchmark's ``main`` runs inside
:func:`record`: what it prints still goes to the terminal, and when it finishes without an
error the same text is written to ``docs/design/benchmarks/<name>.md`` (Markdown tables
rendered, everything else verbatim) under a header giving the command line, the UTC start
and end, the machine (CPU, cores, memory, OS, Python), the load average and the git
commit. The documentation site lists these pages on its performance page. Set
``MANYMODELS_BENCH_DOCS=0`` to leave the docs untouched (a trial run).
"""

from __future__ import annotations

import io
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "design" / "benchmarks"

__all__ = ["DOCS", "record"]


class _Tee(io.TextIOBase):
    """Writes to the terminal and keeps a copy."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.copy = io.StringIO()

    def write(self, text: str) -> int:
        self.copy.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


@contextmanager
def record(name: str, title: str) -> Iterator[None]:
    """Copy what the block prints into ``docs/design/benchmarks/<name>.md`` when it succeeds.

    Parameters
    ----------
    name
        File stem of the page; one per benchmark mode (``serve``, ``serve-auth``...), so
        a run of one mode replaces only its own page.
    title
        The page's heading.
    """
    started, load_before, measured = datetime.now(timezone.utc), os.getloadavg(), commit()
    tee = _Tee(sys.stdout)
    sys.stdout = tee  # type: ignore[assignment]
    try:
        yield
    finally:
        sys.stdout = tee.stream
    if os.environ.get("MANYMODELS_BENCH_DOCS", "1") == "0":
        return
    page = render(title, tee.copy.getvalue(), started, datetime.now(timezone.utc),
                  load_before, os.getloadavg(), measured)
    DOCS.mkdir(parents=True, exist_ok=True)
    path = DOCS / f"{name}.md"
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as out:  # temp, fsync, rename: never half a page
        out.write(page)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    print(f"table written to {path.relative_to(ROOT)}", file=sys.stderr)


def render(title: str, output: str, started: datetime, finished: datetime,
           load_before: tuple[float, float, float], load_after: tuple[float, float, float],
           measured: str) -> str:
    """The page: a header of provenance, then the output (tables rendered, text verbatim)."""
    command = "python " + shlex.join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    span = f"{started:%Y-%m-%d %H:%M}–{finished:%H:%M} UTC"
    lines = [f"# {title}", "",
             "Written by the benchmark itself (`benchmarks/_docs.py`); rerun the command to "
             "replace this page.", "",
             "| | |", "|---|---|",
             f"| command | `{command}` |",
             f"| date | {span} |",
             f"| machine | {machine()} |",
             f"| load average | {load_before[0]:.1f} at the start, {load_after[0]:.1f} at the "
             f"end (1-minute) |",
             f"| commit | {measured} |", ""]
    return "\n".join(lines + blocks(output)) + "\n"


def blocks(output: str) -> list[str]:
    """Markdown table lines as tables, every other run of lines in a text block."""
    out: list[str] = []
    text: list[str] = []

    def flush_text() -> None:
        while text and not text[-1].strip():
            text.pop()
        if any(line.strip() for line in text):
            out.extend(["```text", *text, "```", ""])
        text.clear()

    previous_table = False
    for line in output.splitlines():
        is_table = line.startswith("|") and line.rstrip().endswith("|")
        if is_table:
            flush_text()
            if not previous_table and out and out[-1]:
                out.append("")
            out.append(line.rstrip())
        else:
            if previous_table:
                out.append("")
            if text or line.strip():
                text.append(line.rstrip())
        previous_table = is_table
    flush_text()
    return out


def machine() -> str:
    """CPU model, cores, memory, OS and Python of this machine, on one line."""
    cpu = platform.processor() or platform.machine()
    memory = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info
                        if line.startswith("model name")), cpu)
        with open("/proc/meminfo", encoding="utf-8") as info:
            kib = int(next(line.split()[1] for line in info if line.startswith("MemTotal")))
            memory = f", {kib / 1024 ** 2:.0f} GB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    return (f"{cpu}, {os.cpu_count()} cores{memory}, {platform.system()} "
            f"{platform.release()}, Python {platform.python_version()}")


def commit() -> str:
    """The git commit measured (at the start), and whether the code differed from it."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              check=False, timeout=30)
        return done.stdout.strip() if done.returncode == 0 else ""

    head = git("rev-parse", "--short=9", "HEAD")
    if not head:
        return "unknown (not a git checkout)"
    changed = git("status", "--porcelain", "--", "manymodels", "benchmarks", "tests",
                  "pyproject.toml").splitlines()
    return f"`{head}`" + (" with uncommitted changes to the code" if changed else "")
