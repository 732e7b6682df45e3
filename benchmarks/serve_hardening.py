"""What the endpoint's hardening (issue 28) adds to the request path, against the old code.

Three measurements, each interleaved over rounds and reported as medians, so that the
ratios hold on a shared machine even when the absolute times do not:

* **connection limits**: uvicorn's httptools protocol and ``GuardedHttpTools`` parse the
  same keep-alive GET requests (no application), CPU time per request (the guarded class
  overrides no per-request callback, so this shows the machine's noise as much as any
  cost: the fastest round is reported beside the median);
* **model file checks**: ``FileChecks.check`` the first time (a sha256) and again (a
  ``stat``), against creating the session it precedes, on Ridge and 20-tree forest files;
* **CSV bodies**: the old conversion (frozen here: one pandas call per column) against
  ``parse_csv`` on the same bodies, and a 30,000-column body.

Usage: ``python benchmarks/serve_hardening.py [--rounds 15]``
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from _docs import record  # noqa: E402  # benchmarks/ is the script's path


# -- connection limits ----------------------------------------------------------------------
class _Transport(asyncio.Transport):
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 1), "sockname": ("127.0.0.1", 2)}.get(name, default)

    def write(self, data: Any) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def _app(scope: Any, receive: Any, send: Any) -> None:
    pass


def _protocol_us(cls: Any, n: int) -> float:
    from uvicorn.config import Config
    from uvicorn.server import ServerState

    from manymodels.serve.limits import LIMITS_ATTRIBUTE, ConnectionLimits

    loop = asyncio.get_event_loop()
    config = Config(_app)
    config.load()
    setattr(config, LIMITS_ATTRIBUTE, ConnectionLimits(10, 30, 1000, 1000))
    protocol = cls(config=config, server_state=ServerState(), app_state={}, _loop=loop)
    protocol.connection_made(_Transport())
    protocol._start_asgi_task = lambda cycle, app: None  # parse and route only
    request = b"GET /ping HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    started = time.process_time()
    for _ in range(n):
        protocol.data_received(request)
        protocol.cycle = None
        protocol.pipeline.clear()
    return (time.process_time() - started) / n * 1e6


def bench_protocol(rounds: int) -> None:
    import uvloop
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from manymodels.serve.limits import GuardedHttpTools

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    plain: list[float] = []
    guarded: list[float] = []
    for i in range(rounds):  # the order alternates, so neither always runs second
        pair = [(HttpToolsProtocol, plain), (GuardedHttpTools, guarded)]
        for cls, out in pair if i % 2 else pair[::-1]:
            out.append(_protocol_us(cls, 20_000))
    p, g = statistics.median(plain), statistics.median(guarded)
    pm, gm = min(plain), min(guarded)
    print("\n| protocol | CPU µs per request, median | vs uvicorn | fastest round | vs uvicorn |")
    print("|---|---:|---:|---:|---:|")
    print(f"| uvicorn HttpToolsProtocol | {p:.2f} | 1.00 | {pm:.2f} | 1.00 |")
    print(f"| GuardedHttpTools | {g:.2f} | {g / p:.3f} | {gm:.2f} | {gm / pm:.3f} |")


# -- model file checks ----------------------------------------------------------------------
def bench_file_checks(work: Path) -> None:
    from builders import build_bundle

    from manymodels.runtime import Bundle, load_model
    from manymodels.runtime.session import make_session_options
    from manymodels.serve.integrity import FileChecks

    print("\n| model files | file KB | session µs | first check µs | vs session | "
          "cached check µs | vs session |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, extra in (("Ridge", {}), ("forest, 20 trees", {"forest": 20})):
        root, _ = build_bundle(work / label.split(",")[0], n_stores=10, rows_per_segment=12,
                               **extra)
        entries = list(Bundle(root).manifest.models.values())
        options = make_session_options("basic")
        first, cached, session = [], [], []
        for entry in entries:
            checks, path = FileChecks(), root / entry.file
            started = time.perf_counter()
            checks.check(entry, path)
            first.append(time.perf_counter() - started)
            started = time.perf_counter()
            checks.check(entry, path)
            cached.append(time.perf_counter() - started)
            started = time.perf_counter()
            load_model(entry, path, options)
            session.append(time.perf_counter() - started)
        size = statistics.median((root / e.file).stat().st_size for e in entries) / 1024
        f, c, s = (statistics.median(x) * 1e6 for x in (first, cached, session))
        print(f"| {label} | {size:.1f} | {s:.0f} | {f:.0f} | {f / s:.3f} | {c:.1f} | "
              f"{c / s:.4f} |")


# -- CSV bodies -------------------------------------------------------------------------------
def _old_csv(body: bytes) -> dict[str, list[Any]]:
    """The conversion before issue 28 (frozen): one pandas call per column."""
    import pandas as pd

    frame = pd.read_csv(io.BytesIO(body))
    return {str(c): frame[c].astype(object).where(frame[c].notna(), None).tolist()
            for c in frame.columns}


def bench_csv(rounds: int) -> None:
    import pandas as pd

    from manymodels.serve.dataplane import parse_csv

    rng = np.random.default_rng(0)
    print("\n| CSV body | old ms (median) | new ms (median) | new / old |")
    print("|---|---:|---:|---:|")
    for n in (1, 100, 10_000):
        frame = pd.DataFrame({"store": rng.integers(1, 100, n),
                              "brand": rng.choice(["a", "b"], n),
                              "price": rng.uniform(1, 4, n),
                              "feat": rng.integers(0, 2, n).astype(float)})
        body = frame.to_csv(index=False).encode()
        assert _old_csv(body) == parse_csv(body).columns  # the same values, the same types
        reps = max(1, 200 // n)
        old, new = [], []
        for _ in range(rounds):
            for fn, out in ((_old_csv, old), (parse_csv, new)):
                started = time.perf_counter()
                for _ in range(reps):
                    fn(body)
                out.append((time.perf_counter() - started) / reps * 1e3)
        o, w = statistics.median(old), statistics.median(new)
        print(f"| {n:,} rows × 4 columns | {o:.3f} | {w:.3f} | {w / o:.2f} |")
    wide = (",".join(f"c{i}" for i in range(30_000)) + "\n"
            + ",".join("1" for _ in range(30_000)) + "\n").encode()
    started = time.perf_counter()
    _old_csv(wide)
    print(f"\n30,000 columns × 1 row ({len(wide) // 1024} KB): old conversion "
          f"{time.perf_counter() - started:.1f} s on the event loop; now refused (422) "
          f"before parsing when the models take fewer than 29,937 columns")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    with record("serve-hardening", "Cost of the hardening: `benchmarks/serve_hardening.py`"), \
            tempfile.TemporaryDirectory(prefix="mm-bench-hardening-") as tmp:
        bench_protocol(args.rounds)
        bench_file_checks(Path(tmp))
        bench_csv(max(3, args.rounds // 3))


if __name__ == "__main__":
    main()
