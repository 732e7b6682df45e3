"""Benchmark: past one machine. The proxy's added latency, and Dask's per-task overhead
projected to 10, 100 and 1,000 workers.

1. **Proxy latency**: the same ``POST /models/{name}/score`` requests (one row, a model
   chosen at random) sent straight to a replica and through nginx (``manymodels fleet``'s
   configuration, consistent hashing, keep-alive upstream), interleaved request by request
   on keep-alive connections; the difference of the medians is what the proxy adds.
2. **Dask per-task overhead** on a ``LocalCluster`` with 2 single-threaded worker
   processes: the wall time per task of a stream of no-op tasks (the scheduler's and the
   workers' fixed cost per task, with nothing to compute), and the real thing next to its
   local peer on the same input: ``train`` (Dask vs loky, 2 workers) and ``score_batch``
   (Dask vs the local pool, 2 workers).
3. **Projection** for 100,000 segments from the measured per-segment cost ``c`` and
   per-task overhead ``o``: with ``N`` tasks of ``k`` segments on ``W`` workers,
   ``T(W) = max(ceil(N / W) * (k * c + o), N * o_sched)`` and efficiency
   ``S * c / (W * T(W))``; ``o_sched`` (the one scheduler's serial cost per task) is taken
   as the no-op wall time per task at 2 workers, ``o`` (per worker) as twice that.

    python benchmarks/fleet.py [--requests 1500] [--stores 30] [--rounds 3]
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
from _docs import record  # benchmarks/ is the script's path

from manymodels.batch import score_batch
from manymodels.bundle import package_run
from manymodels.datasets import make_oj
from manymodels.fleet import LocalFleet
from manymodels.training import train


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min), {five:.1f} (5 min) on {os.cpu_count()} cores"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- 1. proxy latency ---------------------------------------------------------------------
def proxy_latency(bundle: Path, requests: int, rounds: int) -> None:
    with LocalFleet(str(bundle), replicas=1, listen="127.0.0.1:0") as fleet:
        direct_url, proxy_url = fleet.members[0].url, fleet.url
        with httpx.Client(base_url=direct_url) as direct, \
                httpx.Client(base_url=proxy_url) as proxy:
            bodies = _one_row_bodies(direct)
            names = list(bodies)
            for name in names:  # load every model first: latency, not load time
                direct.post(f"/models/{name}/score", json=bodies[name]).raise_for_status()
            print(f"\n1. proxy latency: {requests} one-row requests per contender per round "
                  f"over {len(names)} models, interleaved; {_load()}")
            print(f"{'round':>5} {'direct p50 µs':>14} {'nginx p50 µs':>13} {'added µs':>9} "
                  f"{'direct p99':>11} {'nginx p99':>10}")
            added = []
            rng = random.Random(0)
            for round_ in range(1, rounds + 1):
                times: dict[str, list[float]] = {"direct": [], "nginx": []}
                for _ in range(requests):
                    name = rng.choice(names)
                    for label, client in (("direct", direct), ("nginx", proxy)):
                        start = time.perf_counter()
                        client.post(f"/models/{name}/score", json=bodies[name]).raise_for_status()
                        times[label].append((time.perf_counter() - start) * 1e6)
                d50, n50 = statistics.median(times["direct"]), statistics.median(times["nginx"])
                added.append(n50 - d50)
                print(f"{round_:>5} {d50:>14.0f} {n50:>13.0f} {n50 - d50:>9.0f} "
                      f"{_percentile(times['direct'], 0.99):>11.0f} "
                      f"{_percentile(times['nginx'], 0.99):>10.0f}")
            print(f"median added latency over rounds: {statistics.median(added):.0f} µs")


def _one_row_bodies(client: httpx.Client) -> dict[str, dict[str, Any]]:
    """A one-row ``/models/{name}/score`` body for every segment model of the bundle."""
    bodies = {}
    for model in client.get("/models").json()["models"]:
        if model["level"] != 0:
            continue
        bodies[model["name"]] = {"data": {c["name"]: ["x" if c["dtype"] == "string" else 1.0]
                                          for c in model["inputs"]}}
    return bodies


# -- 2. Dask overhead ---------------------------------------------------------------------
def _noop(x: int) -> int:
    return x


def start_cluster() -> tuple[Any, Any, float]:
    """A LocalCluster of 2 single-threaded worker processes, its client, start seconds."""
    from distributed import Client, LocalCluster

    start = time.perf_counter()
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                           dashboard_address=None)
    return cluster, Client(cluster), time.perf_counter() - start


def dask_noop_overhead(client: Any, tasks: int, rounds: int) -> float:
    """Median wall seconds per no-op task on the cluster's 2 workers."""
    per_task = []
    client.gather(client.map(_noop, range(50), pure=False))  # warm
    for _ in range(rounds):
        t0 = time.perf_counter()
        client.gather(client.map(_noop, range(tasks), pure=False))
        per_task.append((time.perf_counter() - t0) / tasks)
    return statistics.median(per_task)


def _median_row(label: str, values: list[float]) -> str:
    return (f"  {label:<18} {statistics.median(values):7.2f} s "
            f"({', '.join(f'{v:.2f}' for v in values)})")


def training(frame: Any, work: Path, rounds: int, scheduler: str
             ) -> tuple[float, float, Path]:
    """Train serially, with loky and with Dask (2 workers each) round-robin; returns the
    per-segment cost, Dask's extra worker-seconds per task and a packaged bundle."""
    segments = frame.groupby(["store", "brand"]).ngroups
    contenders = (("serial (1 worker)", 1, "loky", None), ("loky (2)", 2, "loky", None),
                  ("dask (2)", 2, "dask", scheduler))
    timings: dict[str, list[float]] = {c[0]: [] for c in contenders}
    run_dir = None
    for round_ in range(rounds):
        for label, jobs, backend, address in contenders:
            start = time.perf_counter()
            result = train(frame, "store_brand", "default", out=work / "runs",
                           run_id=f"{backend}{jobs}-{round_}", jobs=jobs, backend=backend,
                           scheduler=address, track=False)
            timings[label].append(time.perf_counter() - start)
            run_dir = result.run_dir
    print(f"\n2a. train, {segments} segments (default trainer), median of {rounds} "
          f"round-robin runs (Dask on the running cluster); {_load()}")
    for label, values in timings.items():
        print(_median_row(label, values))
    serial = statistics.median(timings["serial (1 worker)"])
    dask, loky = statistics.median(timings["dask (2)"]), statistics.median(timings["loky (2)"])
    tasks = min(segments, 2 * 8)  # the engine packs about 8 chunks per worker
    per_task = max(0.0, 2 * (dask - loky) / tasks)
    print(f"  dask / loky at 2 workers: {dask / loky:.2f}x; per-segment cost (serial) "
          f"{serial / segments * 1e3:.1f} ms; Dask's extra cost per task (~{tasks} chunks): "
          f"{per_task * 1e3:.0f} worker-ms")
    assert run_dir is not None
    bundle = work / "bundle"
    package_run(run_dir, bundle, name="oj", overwrite=True)
    return serial / segments, per_task, bundle


def batch_overhead(frame: Any, bundle: Path, work: Path, rounds: int, client: Any) -> float:
    """Batch through the local pool and Dask (2 workers each); returns extra s per unit."""
    rows = frame.drop(columns=["quantity"], errors="ignore")
    big = pa.Table.from_pandas(rows.sample(1_000_000, replace=True, random_state=0),
                               preserve_index=False)
    source = work / "batch-in"
    source.mkdir(exist_ok=True)
    pq.write_table(big, source / "part-0.parquet", row_group_size=125_000)
    units = 8
    timings: dict[str, list[float]] = {"local pool (2)": [], "dask (2)": []}
    for round_ in range(rounds):
        for label, backend in (("local pool (2)", "local"), ("dask (2)", "dask")):
            out = work / f"batch-out-{backend}-{round_}"
            start = time.perf_counter()
            score_batch(bundle, source, out, mini_batch_size=125_000, workers=2, backend=backend,
                        scheduler=client if backend == "dask" else None)
            timings[label].append(time.perf_counter() - start)
    print(f"\n2b. batch, 1M rows in {units} units of 125k rows, median of {rounds} round-robin "
          f"runs (Dask on the running cluster); {_load()}")
    for label, values in timings.items():
        print(_median_row(label, values))
    extra = statistics.median(timings["dask (2)"]) - statistics.median(timings["local pool (2)"])
    print(f"  Dask's extra wall time: {extra:.2f} s, {extra / units * 1e3:.0f} ms per unit "
          f"(2 workers: {2 * extra / units * 1e3:.0f} worker-ms per unit)")
    return extra / units


# -- 3. projection ------------------------------------------------------------------------
def project(c: float, o: float, o_sched: float, what: str, segments: int = 100_000) -> None:
    print(f"\n3. projected efficiency, {what}, {segments:,} segments: c = {c * 1e3:.1f} ms per "
          f"segment, o = {o * 1e3:.1f} worker-ms per task, o_sched = {o_sched * 1e3:.2f} ms "
          f"per task (scheduler, serial)")
    print(f"{'workers':>8} {'tasks (engine)':>15} {'eff. engine chunks':>19} "
          f"{'eff. 1 segment/task':>20}")
    for workers in (2, 10, 100, 1_000):
        n_engine = min(segments, max(workers * 8, math.ceil(segments / 50)))
        row = []
        for n in (n_engine, segments):
            k = segments / n
            t = max(math.ceil(n / workers) * (k * c + o), n * o_sched)
            row.append(segments * c / (workers * t))
        print(f"{workers:>8} {n_engine:>15,} {row[0]:>19.0%} {row[1]:>20.0%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=1500)
    parser.add_argument("--stores", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--noop-tasks", type=int, default=2000)
    parser.add_argument("--skip-dask", action="store_true", help="Only the proxy latency.")
    args = parser.parse_args()
    frame = make_oj(stores=args.stores)
    with tempfile.TemporaryDirectory(prefix="manymodels-fleet-bench-") as tmp:
        work = Path(tmp)
        cluster, client, started = start_cluster()
        try:
            c, o_train, bundle = training(frame, work, args.rounds, cluster.scheduler_address)
            if not args.skip_dask:
                o_sched = dask_noop_overhead(client, args.noop_tasks, args.rounds)
                print(f"\n2c. Dask no-op tasks at 2 workers: {o_sched * 1e6:.0f} µs wall per "
                      f"task (median of {args.rounds} x {args.noop_tasks}); LocalCluster start "
                      f"{started:.1f} s; {_load()}")
                batch_overhead(frame, bundle, work, args.rounds, client)
                project(c, o_train, o_sched, "training (o = Dask's measured extra per task)")
                project(c, 2 * o_sched, o_sched, "the no-op floor (o = 2 x no-op wall)")
        finally:
            client.close()
            cluster.close()
        proxy_latency(bundle, args.requests, args.rounds)


if __name__ == "__main__":
    with record("fleet", "Fleet: proxy cost and Dask overhead: `benchmarks/fleet.py`"):
        main()
