"""Benchmark ``manymodels batch`` against the floor and the hand-written pattern.

Usage::

    .venv/bin/python benchmarks/batch.py            # 1M rows in one file
    .venv/bin/python benchmarks/batch.py --ten-m    # ... and 10M rows in 10 files
    .venv/bin/python benchmarks/batch.py --ten-m --jobs-only   # only the batch-job rows

``--jobs`` (or ``--jobs-only``) adds the rows of batch jobs over HTTP (issue 30): the
largest input scored by a job submitted to a running ``manymodels serve`` (``POST
/batch/jobs``, then ``GET /batch/jobs/{id}?wait=`` until it ends: wall time from the
submission to the client seeing the end) against ``manymodels batch`` on the same input
(the default, and the job's runner at the default ``batch.nice`` 10 and at 0); then
online single-row ``/score`` requests at concurrency 4 (the load client of
``benchmarks/serve.py``, in its own process) against the same server idle and while a job
runs, p99 compared. Bars: job throughput ≥ 0.9× ``manymodels batch``; p99 during a job
≤ 2× idle.

Over 1,000 models (334 stores × 3 brands of Ridge pipelines + a global fallback, built
by tests/builders.py), every contender runs file to file in its own fresh process:

- floor: create every session, read the Parquet with pyarrow, run each model's rows on
  pre-grouped arrays, write the predictions with pyarrow (grouping is timed apart: the
  floor assumes it is free);
- ours: ``manymodels batch`` with ``--workers 1``, ``--workers 2`` and the default (and,
  at 10M rows, ``--workers 1`` with 250k-row mini-batches, to show that memory follows
  the mini-batch size rather than the input);
- hand-written: pandas ``read_parquet`` + ``groupby`` over the segment columns, each
  group's native scikit-learn pipeline ``joblib.load``-ed (once) and ``predict``-ed,
  ``to_parquet``.

Wall time includes interpreter start and imports for all (the floor's grouping time is
subtracted from its wall time, since the floor assumes pre-grouped arrays). Each contender
runs ``--repeat`` times (default 3, round-robin) and the median is reported, since single
runs on this shared 2-core machine vary by ±8%; the hand-written pattern runs once. Peak memory
is the sum of resident memory over the process tree, sampled every 20 ms. The machine
is shared, so compare ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from _docs import record  # benchmarks/ is the script's path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))

N_STORES = 334
ROW_GROUP = 131_072
ROWS_PER_FILE = 1_000_000
UNKNOWN_SHARE = 0.001  # rows of unknown stores: they go to the global fallback


# -- setup -----------------------------------------------------------------------------
def build_inputs(work: Path, ten_m: bool, with_native: bool = True) -> dict[str, Path]:
    """Bundle, native joblib models and the Parquet inputs (reused when present)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from builders import build_bundle

    bundle = work / "bundle"
    if not (bundle / "manifest.json").exists():
        build_bundle(bundle, n_stores=N_STORES)
    from builders import make_rows

    rows = make_rows(N_STORES, 40, seed=0)
    native = work / "native"
    if with_native and not (native / "global.joblib").exists():
        fit_native(rows, native)
    sizes = {"1M": (work / "in-1m", 1)}
    if ten_m:
        sizes["10M"] = (work / "in-10m", 10)
    rng = np.random.default_rng(0)
    for folder, n_files in sizes.values():
        if folder.exists() and len(list(folder.glob("*.parquet"))) == n_files:
            continue
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n_files):
            idx = rng.integers(0, len(rows), ROWS_PER_FILE)
            store = rows["store"].to_numpy()[idx].copy()
            store[rng.random(ROWS_PER_FILE) < UNKNOWN_SHARE] = 9_999
            table = pa.table({
                "store": store,
                "brand": rows["brand"].to_numpy()[idx].astype(str),
                "price": rows["price"].to_numpy()[idx] * rng.uniform(0.9, 1.1, ROWS_PER_FILE),
                "feat": rows["feat"].to_numpy()[idx],
            })
            pq.write_table(table, folder / f"part-{i:02d}.parquet", row_group_size=ROW_GROUP)
    return {"bundle": bundle, "native": native, **{k: v[0] for k, v in sizes.items()}}


def fit_native(rows: Any, folder: Path) -> None:
    """One scikit-learn Ridge pipeline per segment (+ global), saved with joblib."""
    import joblib
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    folder.mkdir(parents=True, exist_ok=True)
    numeric = ["price", "feat"]
    for (store, brand), part in rows.groupby(["store", "brand"]):
        pipe = Pipeline([("prep", ColumnTransformer([("num", StandardScaler(), numeric)])),
                         ("model", Ridge(alpha=1.0))]).fit(part[numeric], part["quantity"])
        joblib.dump(pipe, folder / f"{store}__{brand}.joblib")
    prep = ColumnTransformer([("num", StandardScaler(), numeric),
                              ("cat", OneHotEncoder(handle_unknown="ignore"),
                               ["store", "brand"])])
    frame = rows.astype({"store": str})
    pipe = Pipeline([("prep", prep), ("model", Ridge(alpha=1.0))]).fit(
        frame[numeric + ["store", "brand"]], frame["quantity"])
    joblib.dump(pipe, folder / "global.joblib")


# -- contenders (each runs in its own process) -----------------------------------------
def run_floor(bundle: Path, source: Path, out: Path) -> dict[str, float]:
    """The unavoidable work: sessions, pyarrow read, session.run on pre-grouped arrays, write.

    Each part uses what ours uses, so that the floor is what an ideal implementation of
    the same choices costs: session options of ``make_session_options("none")`` (one
    thread, sequential, no CPU arena, no graph optimisation), text segment columns read
    as Arrow dictionaries through ``ParquetFile``, the prediction column written PLAIN
    without dictionary. The
    pre-grouped arrays (and freeing them) are built in the uncounted grouping step; only
    the fallback's rows get string inputs, as ours does.
    """
    import onnxruntime as ort
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = {"sessions": 0.0, "read": 0.0, "group (not counted)": 0.0, "run": 0.0, "write": 0.0}
    manifest = json.loads((bundle / "manifest.json").read_text())
    t = time.perf_counter()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.enable_cpu_mem_arena = False
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sessions = {name: ort.InferenceSession(str(bundle / m["file"]), sess_options=options,
                                           providers=["CPUExecutionProvider"])
                for name, m in manifest["models"].items()}
    parts["sessions"] = time.perf_counter() - t
    route = {f"{r['key'][0]}\x1f{r['key'][1]}": r["model"] for r in manifest["routes"]
             if r["level"] == 0}
    out.mkdir(parents=True, exist_ok=True)
    grouped: Any = None
    for path in sorted(source.glob("*.parquet")):
        t = time.perf_counter()
        # ParquetFile, as ours: pq.read_table would import pyarrow.dataset (~0.2 s) first.
        table = pq.ParquetFile(path, read_dictionary=["brand"]).read(
            columns=["store", "brand", "price", "feat"])
        parts["read"] += time.perf_counter() - t
        t = time.perf_counter()
        del grouped  # the previous file's arrays are freed here, not in a counted part
        grouped = _pre_group(table, route)
        order, bounds, names, price, feat, strings = grouped
        parts["group (not counted)"] += time.perf_counter() - t
        t = time.perf_counter()
        pred = np.empty(len(order), dtype=np.float32)
        for i, name in enumerate(names):
            a, b = bounds[i], bounds[i + 1]
            feed = {"price": price[a:b], "feat": feat[a:b]}
            if name in strings:
                feed.update(strings[name])
            pred[a:b] = sessions[name].run(None, feed)[0].ravel()
        parts["run"] += time.perf_counter() - t
        t = time.perf_counter()
        result = np.empty(len(order), dtype=np.float64)
        result[order] = pred
        pq.write_table(pa.table({"prediction": result}), out / path.name, use_dictionary=False,
                       column_encoding={"prediction": "PLAIN"})
        parts["write"] += time.perf_counter() - t
    return parts


def _pre_group(table: Any, route: dict[str, str]) -> tuple[Any, ...]:
    """Rows sorted by segment, float32 (n, 1) inputs in that order, string inputs for the
    fallback's groups only: the arrays the floor assumes are given."""
    store = table["store"].to_numpy()
    brand = table["brand"].combine_chunks()
    brands = brand.dictionary.to_pylist()
    codes = brand.indices.to_numpy()
    uniq, inverse = np.unique(store * len(brands) + codes, return_inverse=True)
    names = [route.get(f"{u // len(brands)}\x1f{brands[u % len(brands)]}", "quantity__global")
             for u in uniq]
    order = np.argsort(inverse, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(inverse))]).tolist()
    price = table["price"].to_numpy().astype(np.float32)[order].reshape(-1, 1)
    feat = table["feat"].to_numpy().astype(np.float32)[order].reshape(-1, 1)
    strings: dict[str, dict[str, np.ndarray]] = {}
    for i, name in enumerate(names):
        if name == "quantity__global":
            rows = order[bounds[i]:bounds[i + 1]]
            strings.setdefault(name, {"store": [], "brand": []})  # type: ignore[dict-item]
            strings[name]["store"] += store[rows].astype(str).tolist()  # type: ignore[operator]
            strings[name]["brand"] += [brands[c] for c in codes[rows]]  # type: ignore[operator]
    # The fallback serves several unknown keys: give it one group of its rows in order.
    return _merge_fallback(order, bounds, names, price, feat, strings)


def _merge_fallback(order: Any, bounds: list[int], names: list[str], price: Any, feat: Any,
                    strings: dict[str, Any]) -> tuple[Any, ...]:
    """Put all rows of a model served by several keys (the fallback) into one group."""
    spans: dict[str, list[tuple[int, int]]] = {}
    for i, name in enumerate(names):
        spans.setdefault(name, []).append((bounds[i], bounds[i + 1]))
    pick = np.concatenate([np.arange(a, b) for name in spans for a, b in spans[name]])
    sizes = [sum(b - a for a, b in spans[name]) for name in spans]
    new_bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(int).tolist()
    arrays = {name: {k: np.asarray(v, dtype=object).reshape(-1, 1) for k, v in cols.items()}
              for name, cols in strings.items()}
    return order[pick], new_bounds, list(spans), price[pick], feat[pick], arrays


def run_handwritten(native: Path, source: Path, out: Path) -> dict[str, float]:
    """pandas groupby + joblib-loaded native models + predict, file to file."""
    import joblib
    import pandas as pd

    parts = {"read": 0.0, "load": 0.0, "predict": 0.0, "write": 0.0}
    models: dict[str, Any] = {}
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.glob("*.parquet")):
        t = time.perf_counter()
        frame = pd.read_parquet(path)
        parts["read"] += time.perf_counter() - t
        prediction = np.empty(len(frame))
        used = np.empty(len(frame), dtype=object)
        for (store, brand), idx in frame.groupby(["store", "brand"]).indices.items():
            key = f"{store}__{brand}"
            t = time.perf_counter()
            if key not in models:
                file = native / f"{key}.joblib"
                models[key] = joblib.load(file if file.exists() else native / "global.joblib")
            parts["load"] += time.perf_counter() - t
            t = time.perf_counter()
            group = frame.iloc[idx]
            if (native / f"{key}.joblib").exists():
                prediction[idx] = models[key].predict(group[["price", "feat"]])
            else:
                prediction[idx] = models[key].predict(group.astype({"store": str}))
            used[idx] = key
            parts["predict"] += time.perf_counter() - t
        t = time.perf_counter()
        pd.DataFrame({"row_number": np.arange(len(frame)), "prediction": prediction,
                      "model": used}).to_parquet(out / path.name)
        parts["write"] += time.perf_counter() - t
    return parts


# -- measuring -------------------------------------------------------------------------
def measure(command: list[str]) -> tuple[float, float, str, float]:
    """Wall seconds, peak resident MB of the process tree (sampled), stdout, and the CPU
    seconds (user + system) of the whole tree: with two cores, wall ≥ CPU / 2."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)
    peak = 0
    handle = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            tree = [handle, *handle.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.02)
    stdout, stderr = proc.communicate()
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the tree, once reaped
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{stderr}")
    return seconds, peak / 1e6, stdout, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ten-m", action="store_true", help="also run 10M rows in 10 files")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "mm-batch-bench")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs per contender (the median is reported; hand-written once)")
    parser.add_argument("--jobs", action="store_true",
                        help="also the batch-job rows (a job over HTTP, online p99 beside it)")
    parser.add_argument("--jobs-only", action="store_true", help="only the batch-job rows")
    args = parser.parse_args()
    work: Path = args.work
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    paths = build_inputs(work, args.ten_m, with_native=not args.jobs_only)
    print(f"setup (bundle, native models, data): {time.perf_counter() - t:.1f} s", flush=True)
    if args.jobs_only:
        run_jobs(paths, work, args.repeat)
        return
    python = sys.executable
    cli = [str(Path(python).parent / "manymodels"), "batch"]
    results: dict[str, dict[str, tuple[float, float, str, float]]] = {}
    for size in [s for s in ("1M", "10M") if s in paths]:
        source = paths[size]
        runs: dict[str, list[str]] = {
            "floor": [python, __file__, "_floor", str(paths["bundle"]), str(source)],
            "ours --workers 1": [*cli, str(paths["bundle"]), str(source), "{out}",
                                 "--workers", "1", "--no-progress"],
            "ours --workers 2": [*cli, str(paths["bundle"]), str(source), "{out}",
                                 "--workers", "2", "--no-progress"],
            "ours default": [*cli, str(paths["bundle"]), str(source), "{out}", "--no-progress"],
            "hand-written": [python, __file__, "_handwritten", str(paths["native"]),
                             str(source)],
        }
        if size == "10M":  # memory follows the mini-batch size, not the input
            runs["ours w1 mb=250k"] = [*cli, str(paths["bundle"]), str(source), "{out}",
                                       "--workers", "1", "--no-progress",
                                       "--mini-batch-size", "250000"]
        samples: dict[str, list[tuple[float, float, str, float]]] = {n: [] for n in runs}
        for round_ in range(args.repeat):  # round-robin: drift of the machine hits all alike
            for name, command in runs.items():
                if name == "hand-written" and round_ > 0:
                    continue  # 30-40 s a run, and its bars have a 10x margin
                out = work / "out" / f"{size}-{name.replace(' ', '_')}"
                shutil.rmtree(out, ignore_errors=True)
                command = [c.replace("{out}", str(out)) for c in command]
                if "_floor" in command or "_handwritten" in command:
                    command.append(str(out))
                seconds, peak, stdout, cpu = measure(command)
                if name == "floor":  # the floor assumes pre-grouped arrays: grouping is free
                    seconds -= json.loads(stdout)["group (not counted)"]
                samples[name].append((seconds, peak, stdout, cpu))
                print(f"  {size:>4} {name:<18} {seconds:7.2f} s  peak {peak:7.0f} MB  "
                      f"CPU {cpu:5.2f} s", flush=True)
                shutil.rmtree(out, ignore_errors=True)
        results[size] = {name: _median(runs_) for name, runs_ in samples.items()}
    report(results)
    if args.jobs:
        print()
        run_jobs(paths, work, args.repeat)


# -- batch jobs over HTTP ------------------------------------------------------------------
def _serve(bundle: Path, work: Path, nice: int) -> tuple[subprocess.Popen[bytes], str, int]:
    """A ``manymodels serve`` taking batch jobs under ``work`` (its runners at ``nice``)."""
    import httpx
    from conftest import free_port

    port = free_port()
    state = work / f"state-nice{nice}"
    shutil.rmtree(state, ignore_errors=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "manymodels", "serve", str(bundle), "--port", str(port),
         "--batch-root", str(work), "--state-dir", str(state), "--pin-fallbacks"],
        env={**__import__("os").environ, "MANYMODELS_BATCH__NICE": str(nice)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/ping", timeout=1).status_code == 200:
                return proc, url, port
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("manymodels serve did not start")


def _job(url: str, source: Path, out: Path) -> tuple[float, dict[str, Any]]:
    """Submit a job and wait for it through the API: seconds from POST to the end seen."""
    import httpx

    shutil.rmtree(out, ignore_errors=True)
    with httpx.Client(base_url=url, timeout=120) as client:
        start = time.perf_counter()
        job = client.post("/batch/jobs", json={"input": str(source), "output": str(out)}).json()
        while job["state"] in ("queued", "running"):
            job = client.get(f"/batch/jobs/{job['id']}", params={"wait": 60}).json()
        seconds = time.perf_counter() - start
    if job["state"] != "succeeded":
        raise SystemExit(f"job {job['id']} {job['state']}: {job['reason']}")
    shutil.rmtree(out, ignore_errors=True)
    return seconds, job


def _online(port: int, n: int, work: Path) -> dict[str, float]:
    """``n`` single-row ``/score`` requests at concurrency 4 (benchmarks/serve.py's load
    client, in its own process): p50, p99 and requests/s."""
    bodies = work / "bodies.txt"
    rng = np.random.default_rng(1)
    brands = ["dominicks", "minute.maid", "tropicana"]
    bodies.write_text("\n".join(json.dumps({"data": [{
        "store": int(rng.integers(1, N_STORES + 1)), "brand": brands[i % 3],
        "price": float(rng.uniform(1, 4)), "feat": float(i % 2)}]}) for i in range(512)))
    result = work / "online.json"
    subprocess.run([sys.executable, str(HERE / "serve.py"), "client", "--port", str(port),
                    "--path", "/score", "--bodies", str(bodies), "--n", str(n), "--c", "4",
                    "--out", str(result)], check=True, cwd=ROOT)
    got = json.loads(result.read_text())
    lat = np.array(got["latencies"]) * 1e3
    bad = sum(1 for s in got["statuses"] if s != 200)
    if bad:
        raise SystemExit(f"{bad} online requests failed")
    return {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
            "rps": n / got["wall"], "wall": got["wall"]}


def run_jobs(paths: dict[str, Path], work: Path, repeat: int) -> None:
    """The batch-job rows (see the module docstring)."""
    import threading

    size = "10M" if "10M" in paths else "1M"
    source, bundle = paths[size], paths["bundle"]
    rows = ROWS_PER_FILE * (10 if size == "10M" else 1)
    cli = [str(Path(sys.executable).parent / "manymodels"), "batch", str(bundle), str(source),
           str(work / "out" / "jobs-cli"), "--no-progress"]
    servers = {nice: _serve(bundle, work, nice) for nice in (10, 0)}
    try:
        samples: dict[str, list[float]] = {"manymodels batch": [], "job (nice 10)": [],
                                           "job (nice 0)": []}
        for round_ in range(repeat):  # round-robin: drift of the machine hits all alike
            shutil.rmtree(work / "out" / "jobs-cli", ignore_errors=True)
            seconds = measure(cli)[0]
            samples["manymodels batch"].append(seconds)
            print(f"  {size:>4} manymodels batch   {seconds:7.2f} s", flush=True)
            for nice, (_, url, _) in servers.items():
                seconds, job = _job(url, source, work / "out" / f"jobs-{nice}-{round_}")
                samples[f"job (nice {nice})"].append(seconds)
                print(f"  {size:>4} job (nice {nice:>2})     {seconds:7.2f} s  (runner: "
                      f"{job['timings']['seconds']:.2f} s from claim to end)", flush=True)
        medians = {k: float(np.median(v)) for k, v in samples.items()}
        _, url, port = servers[10]
        _online(port, 2_000, work)  # warm: every model of the requests loaded
        idle: list[dict[str, float]] = []
        busy: list[dict[str, float]] = []
        for round_ in range(repeat):  # idle and busy interleaved: drift hits both alike
            idle.append(_online(port, 4_000, work))
            done: dict[str, Any] = {}

            def submit(done: dict[str, Any] = done, out: Path = work / "out" / f"busy-{round_}"
                       ) -> None:
                done["seconds"], done["job"] = _job(url, source, out)
                done["end"] = time.perf_counter()

            thread = threading.Thread(target=submit)
            thread.start()
            time.sleep(1.0)  # the runner has started and scores
            rate = idle[-1]["rps"]
            n = max(500, int(rate * max(medians["job (nice 10)"] - 2.0, 1.0) * 0.7))
            began = time.perf_counter()
            busy.append(_online(port, n, work))
            ended = time.perf_counter()
            thread.join()  # the share of the load (client start-up included) the job overlapped
            busy[-1]["overlap"] = max(0.0, min(1.0, (done["end"] - began) / (ended - began)))
    finally:
        for proc, _, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=30)
    print()
    print(f"| {size} rows | wall s (median of {repeat}) | M rows/s | vs manymodels batch |")
    print("|---|---|---|---|")
    base = medians["manymodels batch"]
    for name, seconds in medians.items():
        print(f"| {name} | {seconds:.2f} | {rows / seconds / 1e6:.2f} | {base / seconds:.2f}× |")
    print()
    print("| online /score, 1 row, concurrency 4 | requests | p50 ms | p99 ms | req/s |")
    print("|---|---|---|---|---|")
    for label, runs in (("idle", idle), ("while a job runs", busy)):
        for r in runs:
            extra = f" (job running for ≥ {r['overlap']:.0%} of it)" if "overlap" in r else ""
            print(f"| {label}{extra} | {int(r['rps'] * r['wall'])} | {r['p50']:.2f} | "
                  f"{r['p99']:.2f} | {r['rps']:,.0f} |")
    idle99 = float(np.median([r["p99"] for r in idle]))
    busy99 = float(np.median([r["p99"] for r in busy]))
    print()
    for label, value, bar, higher in (
            ("job (nice 10) throughput / manymodels batch", base / medians["job (nice 10)"], 0.9,
             True),
            ("job (nice 0) throughput / manymodels batch", base / medians["job (nice 0)"], 0.9,
             True),
            ("online p99 during a job / idle p99", busy99 / idle99, 2.0, False)):
        ok = value >= bar if higher else value <= bar
        print(f"{label:<48} {value:5.2f} (bar {'≥' if higher else '≤'} {bar}) "
              f"{'PASS' if ok else 'FAIL'}")


def _median(samples: list[tuple[float, float, str, float]]) -> tuple[float, float, str, float]:
    """The sample with the median wall time, with the highest peak memory of all samples."""
    ordered = sorted(samples, key=lambda s: s[0])
    seconds, _, stdout, cpu = ordered[(len(ordered) - 1) // 2]
    return seconds, max(s[1] for s in samples), stdout, cpu


def report(results: dict[str, dict[str, tuple[float, float, str, float]]]) -> None:
    print()
    print(f"{'size':>5} | {'contender':<18} | {'wall s':>7} | {'M rows/s':>8} | "
          f"{'peak MB':>7} | {'CPU s':>6} | {'cores':>5} | parts (s)")
    print("-" * 116)
    for size, runs in results.items():
        rows = ROWS_PER_FILE * (10 if size == "10M" else 1)
        for name, (seconds, peak, stdout, cpu) in runs.items():
            parts = ""
            if stdout.strip().startswith("{"):
                parts = ", ".join(f"{k} {v:.2f}" for k, v in json.loads(stdout).items())
            print(f"{size:>5} | {name:<18} | {seconds:7.2f} | {rows / seconds / 1e6:8.2f} | "
                  f"{peak:7.0f} | {cpu:6.2f} | {cpu / seconds:5.2f} | {parts}")
    print()
    checks = []
    if "10M" in results:
        r = {k: v[0] for k, v in results["10M"].items()}
        checks += [
            ("10M: ours w2 >= 3x hand-written", r["hand-written"] / r["ours --workers 2"], 3.0),
            ("10M: ours w2 >= 1.6x ours w1", r["ours --workers 1"] / r["ours --workers 2"], 1.6),
            ("10M: ours w1 within 1.3x of floor", r["floor"] * 1.3 / r["ours --workers 1"], 1.0),
        ]
    r1 = {k: v[0] for k, v in results["1M"].items()}
    checks.append(("1M: ours default >= 2x hand-written", r1["hand-written"] / r1["ours default"],
                   2.0))
    for label, value, bar in checks:
        print(f"{label:<40} {value:5.2f} (bar {bar}) {'PASS' if value >= bar else 'FAIL'}")
    if "10M" in results:
        for name in ("ours --workers 1", "ours --workers 2"):
            print(f"peak RSS {name}: 1M {results['1M'][name][1]:.0f} MB, "
                  f"10M {results['10M'][name][1]:.0f} MB")
        print(f"peak RSS ours --workers 1 at 10M with 250k-row mini-batches: "
              f"{results['10M']['ours w1 mb=250k'][1]:.0f} MB")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("_floor", "_handwritten"):
        runner = run_floor if sys.argv[1] == "_floor" else run_handwritten
        print(json.dumps(runner(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))))
    else:
        name = "batch-10m" if "--ten-m" in sys.argv else "batch"
        if "--jobs-only" in sys.argv:
            name += "-jobs"
        with record(name, "Batch scoring: `benchmarks/batch.py`"):
            main()
