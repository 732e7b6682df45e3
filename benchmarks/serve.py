"""Benchmark of ``manymodels serve`` against its floor, its limit and two peers.

One run, one table. On one generated bundle (300 Ridge models + a global fallback):

* model limit: onnxruntime ``session.run`` in this process, no HTTP;
* HTTP floor: a bare ASGI app answering fixed JSON (``benchmarks/peers/floor.py``);
* ours: ``manymodels serve BUNDLE`` (one worker), ``POST /score`` naming the model;
* ``mlflow models serve -m BUNDLE --env-manager local`` (its defaults), ``/invocations``;
* the Azure sample pattern: FastAPI + joblib scikit-learn models + ``pd.DataFrame``.

Each server gets single-row and 100-row requests at concurrency 1 and 16, a fixed number
of requests per cell, from a load client in its own process (raw HTTP/1.1 keep-alive on
uvloop, so the client costs little CPU). Server CPU per request comes from the server's
process tree. The machine is shared: compare the ratios measured within one run.

``--rollout`` adds the rollout rows: single-row requests at concurrency 16 against one
deployment, two deployments 90/10, and two deployments 90/10 with 10% mirrored to a
third (shadow) deployment, run round-robin, median of the rounds; it reports the ratio to
one deployment and the mirror's CPU per mirrored request.

``--canary`` adds the rows of a rollout by analysis: ``serve models:/NAME@champion
--follow`` held at its first traffic step (90/10, every candidate answer copied to the
live version and compared per changed model; 5% of the models changed) against one
deployment, and the same step paused (no comparisons) to price the analysis: server CPU
per request, and per compared request.

``--scale`` adds the scale mode: 10,000 models served with ``--max-memory-mb 512`` under
random-model traffic; it reports the resident memory against budget + base, checks every
answer against in-process scoring, and gives the latency of requests that load a model.

``--observe`` adds the cost of observability: the same server with metrics on and off
(and with the JSON access log and prediction logging on top), single-row requests at
concurrency 16, contenders interleaved round-robin, median of ``--rounds`` runs each;
the bar is metrics on ≥ 95% of the requests/s of metrics off.

``--auth`` adds the cost of credentials: ``--auth none`` against ``--auth key`` and
``--auth token`` (single-row requests, concurrency 16, interleaved rounds, median).

Usage: ``python benchmarks/serve.py [--quick] [--scale] [--rollout[-only]] [--skip-peers]
[--observe] [--auth | --auth-only] [--canary]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from _docs import record  # benchmarks/ is the script's path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
PY = sys.executable
BIN = str(Path(PY).parent)
UVICORN_FLAGS = ["--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level",
                 "warning", "--no-server-header", "--no-date-header"]


# -- load client (runs in its own process) -------------------------------------------------
class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection that waits for one response at a time."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.waiter is None:
            return
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[:end]).lower()
        at = head.find(b"content-length:")
        if at >= 0:
            length = int(head[at + 15:head.find(b"\r\n", at) if head.find(b"\r\n", at) > 0
                              else len(head)])
            total = end + 4 + length
            if len(self.buffer) < total:
                return
            body = bytes(self.buffer[end + 4:total])
        else:  # chunked
            close = self.buffer.find(b"\r\n0\r\n\r\n", end)
            if close < 0:
                return
            total = close + 7
            body = bytes(self.buffer[end + 4:total])
        del self.buffer[:total]
        waiter, self.waiter = self.waiter, None
        waiter.set_result((int(head[9:12]), body))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("server closed the connection"))


async def _drive(port: int, path: str, bodies: list[bytes], n: int, concurrency: int,
                 keep: bool, header: str = "") -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    extra = f"{header}\r\n" if header else ""
    requests = [f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"{extra}Content-Length: {len(b)}\r\n\r\n".encode() + b for b in bodies]
    latencies = np.zeros(n)
    statuses = np.zeros(n, dtype=np.int32)
    replies: list[bytes | None] = [None] * n
    counter = iter(range(n))

    async def worker() -> None:
        _, conn = await loop.create_connection(_Connection, "127.0.0.1", port)
        for i in counter:
            conn.waiter = loop.create_future()
            t0 = time.perf_counter()
            conn.transport.write(requests[i % len(requests)])
            status, body = await conn.waiter
            latencies[i] = time.perf_counter() - t0
            statuses[i] = status
            if keep:
                replies[i] = body
        conn.transport.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    return {"latencies": latencies.tolist(), "statuses": statuses.tolist(), "wall": wall,
            "replies": [r.decode() for r in replies] if keep else None}


def client_main(args: argparse.Namespace) -> None:
    import uvloop

    bodies = [line.encode() for line in Path(args.bodies).read_text().splitlines()]
    header = Path(args.header_file).read_text().strip() if args.header_file else ""
    result = uvloop.run(_drive(args.port, args.path, bodies, args.n, args.c, args.keep, header))
    Path(args.out).write_text(json.dumps(result))


# -- servers -------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """A server process (tree) on a free port, with its CPU time and resident memory."""

    def __init__(self, name: str, argv: list[str], health: str, env: dict[str, str] | None = None,
                 method: str = "GET") -> None:
        import httpx
        import psutil

        self.name, self.port = name, free_port()
        argv = [a.replace("{port}", str(self.port)) for a in argv]
        full_env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", **(env or {})}
        self.process = subprocess.Popen(argv, env=full_env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE)
        self.ps = psutil.Process(self.process.pid)
        deadline = time.time() + 150  # two polls: the rollout starts, then passes step 0
        while True:
            try:
                if httpx.request(method, f"http://127.0.0.1:{self.port}{health}",
                                 timeout=5).status_code < 500:
                    break
            except httpx.TransportError:
                pass
            if self.process.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"{name} did not start: {self.process.stderr.read()!r}")  # type: ignore[union-attr]
            time.sleep(0.2)

    def tree(self) -> list[Any]:
        import psutil

        procs = [self.ps]
        try:
            procs += self.ps.children(recursive=True)
        except psutil.Error:
            pass
        return procs

    def cpu(self) -> float:
        total = 0.0
        for p in self.tree():
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except Exception:
                pass
        return total

    def rss(self) -> int:
        return sum(p.memory_info().rss for p in self.tree())

    def stop(self) -> None:
        for p in reversed(self.tree()):
            try:
                p.terminate()
            except Exception:
                pass
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()


def run_client(port: int, path: str, bodies: list[bytes], n: int, c: int, workdir: Path,
               keep: bool = False, header: str = "") -> dict[str, Any]:
    """The load client (its own process) against ``port``: latencies, statuses, wall."""
    body_file = workdir / "bodies.txt"
    body_file.write_bytes(b"\n".join(bodies))
    out = workdir / "result.json"
    header_file = workdir / "header.txt"
    header_file.write_text(header)
    subprocess.run([PY, __file__, "client", "--port", str(port), "--path", path,
                    "--bodies", str(body_file), "--n", str(n), "--c", str(c), "--out", str(out),
                    "--header-file", str(header_file)]
                   + (["--keep"] if keep else []), check=True)
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def load(server: Server, path: str, bodies: list[bytes], n: int, c: int, workdir: Path,
         keep: bool = False, header: str = "") -> dict[str, Any]:
    """Run the load client against ``server``; latencies, req/s and server CPU/request.

    ``header`` (``Name: value``) is sent with every request, e.g. the credentials; it
    reaches the client through a file so it never shows in a process listing."""
    cpu0 = server.cpu()
    result = run_client(server.port, path, bodies, n, c, workdir, keep, header)
    cpu = server.cpu() - cpu0
    lat = np.array(result["latencies"])
    bad = sum(1 for s in result["statuses"] if s != 200)
    result.update(p50=np.percentile(lat, 50) * 1e3, p99=np.percentile(lat, 99) * 1e3,
                  rps=n / result["wall"], cpu_us=cpu / n * 1e6, errors=bad, n=n)
    return result


# -- fixtures ------------------------------------------------------------------------------
def write_mlmodel(bundle: Path) -> None:
    """Make the bundle loadable by MLflow: MLmodel + the runtime as its code."""
    if (bundle / "MLmodel").is_file():
        return
    shutil.copytree(ROOT / "manymodels" / "runtime", bundle / "code" / "manymodels_runtime",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (bundle / "MLmodel").write_text(
        "flavors:\n  python_function:\n    loader_module: manymodels_runtime\n"
        "    code: code\n    python_version: \"3.11\"\n")


def write_joblib_models(rows: Any, names: dict[tuple[Any, Any], str], folder: Path) -> None:
    """The same per-segment scikit-learn pipelines, saved the way the Azure sample loads them."""
    import joblib
    from builders import NUMERIC, SEGMENT_COLUMNS, _segment_pipeline

    folder.mkdir(parents=True, exist_ok=True)
    for key, part in rows.groupby(SEGMENT_COLUMNS, sort=True):
        pipe = _segment_pipeline().fit(part[NUMERIC], part["quantity"])
        joblib.dump(pipe, folder / f"{names[key]}.joblib")


def make_bodies(rows: Any, names: dict[tuple[Any, Any], str], n_rows: int, count: int,
                seed: int) -> tuple[list[bytes], list[bytes], list[tuple[str, Any]]]:
    """Request bodies naming a model (ours, floor, Azure) and routed ones (MLflow)."""
    import orjson

    rng = np.random.default_rng(seed)
    keys = list(names)
    named, routed, plan = [], [], []
    for _ in range(count):
        key = keys[rng.integers(len(keys))]
        price = rng.uniform(1, 4, n_rows).round(3)
        feat = rng.integers(0, 2, n_rows).astype(float)
        data = [{"price": float(p), "feat": float(f)} for p, f in zip(price, feat, strict=True)]
        named.append(orjson.dumps({"model": names[key], "data": data}))
        routed.append(orjson.dumps({"dataframe_records": [
            {"store": int(key[0]), "brand": key[1], **d} for d in data]}))
        plan.append((names[key], {"price": price, "feat": feat}))
    return named, routed, plan


def session_limit(bundle: Path, plan: list[tuple[str, Any]], n: int) -> dict[str, Any]:
    """onnxruntime ``session.run`` in-process on the same rows: the model limit."""
    from manymodels.runtime import Bundle

    scorer = Bundle(bundle)
    feeds = [(scorer.model(name).session, scorer.model(name).build_feed(cols))
             for name, cols in plan]
    lat = np.zeros(n)
    cpu0 = time.process_time()
    start = time.perf_counter()
    for i in range(n):
        session, feed = feeds[i % len(feeds)]
        t0 = time.perf_counter()
        session.run(None, feed)
        lat[i] = time.perf_counter() - t0
    wall = time.perf_counter() - start
    return {"p50": np.percentile(lat, 50) * 1e3, "p99": np.percentile(lat, 99) * 1e3,
            "rps": n / wall, "cpu_us": (time.process_time() - cpu0) / n * 1e6, "errors": 0,
            "n": n}


# -- main benchmark ------------------------------------------------------------------------
def start_servers(bundle: Path, joblib_dir: Path, skip_peers: bool) -> dict[str, tuple[Any, str]]:
    uvicorn = [PY, "-m", "uvicorn", "--port", "{port}", *UVICORN_FLAGS]
    servers: dict[str, tuple[Any, str]] = {
        "HTTP floor (bare ASGI)": (Server("floor", [*uvicorn, "benchmarks.peers.floor:app"],
                                          "/", method="POST"), "named"),
        "ours (manymodels serve)": (Server("ours", [PY, "-m", "manymodels", "serve", str(bundle),
                                                    "--port", "{port}"], "/ping"), "named"),
    }
    if not skip_peers:
        servers["mlflow models serve"] = (Server(
            "mlflow", [f"{BIN}/mlflow", "models", "serve", "-m", str(bundle), "--env-manager",
                       "local", "-p", "{port}"], "/ping"), "routed")
        servers["Azure sample pattern"] = (Server(
            "azure", [*uvicorn, "benchmarks.peers.azure_pattern:app"], "/",
            env={"AZUREML_MODEL_DIR": str(joblib_dir)}), "named")
    return servers


def run_matrix(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    from builders import build_bundle

    bundle, rows = build_bundle(work / "bundle", n_stores=args.stores, rows_per_segment=40)
    write_mlmodel(bundle)
    names = {(int(s), b): f"quantity__store={s}__brand={b}"
             for s, b in rows[["store", "brand"]].drop_duplicates().itertuples(index=False)}
    if not args.skip_peers:
        write_joblib_models(rows, names, work / "joblib")
    print(f"bundle: {len(names) + 1} models in {bundle}", flush=True)
    servers = start_servers(bundle, work / "joblib", args.skip_peers)
    fast_n = {1: args.n, 100: args.n // 2}
    slow_n = {1: max(200, args.n // 5), 100: max(100, args.n // 10)}
    results = []
    try:
        for n_rows in (1, 100):
            named, routed, plan = make_bodies(rows, names, n_rows, 256, seed=n_rows)
            limit = session_limit(bundle, plan, fast_n[n_rows] * 4)
            results.append({"server": "model limit (session.run)", "rows": n_rows, "c": 1,
                             **limit})
            for label, (server, style) in servers.items():
                bodies = named if style == "named" else routed
                path = "/invocations" if style == "routed" else "/score"
                slow = label in ("mlflow models serve", "Azure sample pattern")
                for c in (1, 16):
                    n = (slow_n if slow else fast_n)[n_rows]
                    load(server, path, bodies, min(n, 300), c, work)  # warm up, load models
                    res = load(server, path, bodies, n, c, work)
                    results.append({"server": label, "rows": n_rows, "c": c,
                                    **{k: res[k] for k in ("p50", "p99", "rps", "cpu_us",
                                                           "errors", "n")}})
                    print_row(results[-1])
    finally:
        for server, _ in servers.values():
            server.stop()
    return results


def print_row(r: dict[str, Any]) -> None:
    print(f"  {r['server']:<28} rows={r['rows']:<3} c={r['c']:<2} n={r['n']:<6} "
          f"p50={r['p50']:8.3f} ms p99={r['p99']:8.3f} ms {r['rps']:9.0f} req/s "
          f"cpu={r['cpu_us']:8.0f} us/req errors={r['errors']}", flush=True)


def print_table(results: list[dict[str, Any]]) -> None:
    print("\n| server | rows | conc. | requests | p50 ms | p99 ms | req/s | server CPU µs/req |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['server']} | {r['rows']} | {r['c']} | {r['n']} | {r['p50']:.3f} | "
              f"{r['p99']:.3f} | {r['rps']:,.0f} | {r['cpu_us']:,.0f} |")
    get = {(r["server"], r["rows"], r["c"]): r for r in results}
    ours = "ours (manymodels serve)"
    print("\nBars (ratios within this run):")
    for peer, rows, bar in (("mlflow models serve", 1, 10), ("Azure sample pattern", 1, 10),
                            ("mlflow models serve", 100, 8), ("Azure sample pattern", 100, 8)):
        if (peer, rows, 16) in get:
            ratio = get[(ours, rows, 16)]["rps"] / get[(peer, rows, 16)]["rps"]
            verdict = "PASS" if ratio >= bar else "FAIL"
            print(f"- {rows}-row c=16: ours / {peer} = {ratio:.1f}x (bar >= {bar}x) {verdict}")
    floor = get[(ours, 1, 16)]["rps"] / get[("HTTP floor (bare ASGI)", 1, 16)]["rps"]
    print(f"- 1-row c=16: ours / HTTP floor = {floor:.0%} (bar >= 50%) "
          f"{'PASS' if floor >= 0.5 else 'FAIL'}")
    p50 = get[(ours, 1, 1)]["p50"]
    print(f"- 1-row c=1: ours p50 = {p50:.3f} ms (bar <= 1 ms) {'PASS' if p50 <= 1 else 'FAIL'}")
    errors = sum(r["errors"] for r in results)
    print(f"- non-200 answers over all runs: {errors}")


# -- auth mode -----------------------------------------------------------------------------
def run_auth(args: argparse.Namespace, work: Path) -> None:
    """``--auth none`` against ``key`` and ``token``: single-row /score at concurrency 16.

    Three servers on one bundle, measured round-robin (the order rotates every round)
    for ``--auth-rounds`` rounds; the median req/s of each is compared with ``none``'s.
    """
    import psutil
    from builders import build_bundle

    from manymodels.credentials import KeyFile, create_token, write_token_secret

    bundle, rows = build_bundle(work / "auth-bundle", n_stores=args.stores, rows_per_segment=40)
    names = {(int(s), b): f"quantity__store={s}__brand={b}"
             for s, b in rows[["store", "brand"]].drop_duplicates().itertuples(index=False)}
    key = KeyFile(work / "keys.json").create("bench", ["score"])[1]
    write_token_secret(work / "token-secret")
    token = create_token(["score"], 3600, subject="bench",
                         key=(work / "token-secret").read_bytes().strip())
    serve = [PY, "-m", "manymodels", "serve", str(bundle), "--port", "{port}"]
    contenders = {
        "none": (serve + ["--auth", "none"], ""),
        "key": (serve + ["--auth", "key", "--key-file", str(work / "keys.json")],
                f"Authorization: Bearer {key}"),
        "token": (serve + ["--auth", "token", "--token-secret-file",
                           str(work / "token-secret")], f"Authorization: Bearer {token}"),
    }
    servers = {label: Server(f"auth-{label}", argv, "/ping") for label, (argv, _) in
               contenders.items()}
    named, _, _ = make_bodies(rows, names, 1, 256, seed=1)
    rps: dict[str, list[float]] = {label: [] for label in contenders}
    cpu: dict[str, list[float]] = {label: [] for label in contenders}
    bad = 0
    load_seen = []
    try:
        for label, server in servers.items():  # warm up: load the models, fill the caches
            load(server, "/score", named, 1000, 16, work, header=contenders[label][1])
        order = list(contenders)
        for r in range(args.auth_rounds):
            psutil.cpu_percent(None)
            for label in order[r % 3:] + order[:r % 3]:
                res = load(servers[label], "/score", named, args.n, 16, work,
                           header=contenders[label][1])
                rps[label].append(res["rps"])
                cpu[label].append(res["cpu_us"])
                bad += res["errors"]
            load_seen.append(psutil.cpu_percent(None))
    finally:
        for server in servers.values():
            server.stop()
    median = {label: float(np.median(v)) for label, v in rps.items()}
    print(f"\n--auth comparison: single-row /score naming the model, concurrency 16, "
          f"{args.n} requests per cell, {args.auth_rounds} interleaved rounds "
          f"(machine CPU busy {np.median(load_seen):.0f}% while measuring, load average "
          f"{os.getloadavg()[0]:.1f})")
    # the ratio of each round (cells measured back to back) resists the load of other jobs
    paired = {label: float(np.median(np.array(rps[label]) / np.array(rps["none"])))
              for label in contenders}
    cpu_ratio = {label: float(np.median(cpu[label]) / np.median(cpu["none"]))
                 for label in contenders}
    print("\n| --auth | req/s (median) | vs none | vs none, per round (median) | "
          "server CPU µs/req | CPU vs none |")
    print("|---|---:|---:|---:|---:|---:|")
    for label in contenders:
        print(f"| {label} | {median[label]:,.0f} | {median[label] / median['none']:.2f} | "
              f"{paired[label]:.2f} | {np.median(cpu[label]):.0f} | {cpu_ratio[label]:.2f} |")
    print("\nreq/s per round: " + "; ".join(
        f"{label} " + ", ".join(f"{v:,.0f}" for v in rps[label]) for label in contenders))
    print("\nBars (ratios within this run):")
    for label in ("key", "token"):
        ratio = median[label] / median["none"]
        print(f"- --auth {label} / --auth none = {ratio:.2f} (per round {paired[label]:.2f}; "
              f"bar >= 0.90) {'PASS' if min(ratio, paired[label]) >= 0.90 else 'FAIL'}")
    print(f"- non-200 answers: {bad}")


# -- scale mode ----------------------------------------------------------------------------
def run_scale(args: argparse.Namespace, work: Path) -> None:
    import httpx
    import orjson
    from builders import build_bundle

    from manymodels.runtime import Bundle

    t0 = time.perf_counter()
    bundle, _ = build_bundle(work / "scale", n_stores=args.scale_stores, rows_per_segment=12)
    names = [n for n in Bundle(bundle).model_names if n != "quantity__global"]
    print(f"\nscale: {len(names) + 1} models built in {time.perf_counter() - t0:.1f} s", flush=True)
    budget_mb = 512
    server = Server("ours-scale", [PY, "-m", "manymodels", "serve", str(bundle), "--port",
                                   "{port}", "--max-memory-mb", str(budget_mb)], "/ping")
    try:
        stats = httpx.get(f"http://127.0.0.1:{server.port}/stats").json()
        base = server.rss() - stats["bytes"]  # the process without its models (fallback out)
        rng = np.random.default_rng(7)
        peak = [server.rss()]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak.append(server.rss())
                time.sleep(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        phases = {"cold (first request of each model)": list(rng.permutation(names)),
                  "random traffic": list(rng.choice(names, args.scale_requests))}
        outcomes = []
        for label, order in phases.items():
            price = rng.uniform(1, 4, len(order)).round(3)
            bodies = [orjson.dumps({"model": m, "data": [{"price": float(p), "feat": 1.0}]})
                      for m, p in zip(order, price, strict=True)]
            res = load(server, "/score", bodies, len(bodies), 16, work, keep=True)
            outcomes.append((label, order, price, res))
        stop.set()
        sampler.join()
        stats = httpx.get(f"http://127.0.0.1:{server.port}/stats").json()
    finally:
        server.stop()
    wrong = check_scale_answers(bundle, outcomes)
    limit = (base + budget_mb * 2**20) * 1.15
    print("\n| scale phase | requests | p50 ms | p99 ms | req/s | non-200 | wrong |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for (label, _, _, res), bad in zip(outcomes, wrong, strict=True):
        print(f"| {label} | {res['n']} | {res['p50']:.3f} | {res['p99']:.3f} | "
              f"{res['rps']:,.0f} | {res['errors']} | {bad} |")
    mb = 2**20
    print(f"\nscale memory: budget {budget_mb} MB, base {base / mb:.0f} MB, peak RSS "
          f"{max(peak) / mb:.0f} MB, limit (budget + base) x 1.15 = {limit / mb:.0f} MB "
          f"{'PASS' if max(peak) <= limit else 'FAIL'}; cache {stats['loaded']} models, "
          f"{stats['bytes'] / mb:.0f} MB counted, {stats['loads']} loads, "
          f"{stats['evictions']} evictions")


def check_scale_answers(bundle: Path, outcomes: list[Any]) -> list[int]:
    """Score every request in-process, one row per ``run`` as the server did (a batched
    ``run`` may round differently in the last bit), and count answers that differ."""
    from manymodels.runtime import Bundle

    scorer = Bundle(bundle, max_bytes=64 * 2**20)
    wrong = []
    for _, order, price, res in outcomes:
        bad = 0
        by_model: dict[str, list[int]] = {}
        for i, m in enumerate(order):
            by_model.setdefault(m, []).append(i)
        for m, idx in by_model.items():
            for i in idx:
                want = scorer.score_model(m, {"price": price[i:i + 1], "feat": np.ones(1)})
                reply = res["replies"][i]
                got = json.loads(reply)["predictions"][0] if res["statuses"][i] == 200 else None
                bad += got != float(want.prediction[0])
        wrong.append(bad)
    return wrong



# -- rollout mode --------------------------------------------------------------------------
def run_rollout(args: argparse.Namespace, work: Path) -> None:
    """One deployment vs two at 90/10 vs two at 90/10 + 10% mirrored, interleaved."""
    import httpx
    from builders import build_bundle, derive_bundle

    from manymodels.runtime import Bundle

    blue, rows = build_bundle(work / "rollout-blue", n_stores=args.stores, rows_per_segment=40)
    models = Bundle(blue).model_names
    green = derive_bundle(blue, work / "rollout-green", models[::20])
    shadow = derive_bundle(blue, work / "rollout-shadow", models[1::20], version="3")
    names = {(int(s), b): f"quantity__store={s}__brand={b}"
             for s, b in rows[["store", "brand"]].drop_duplicates().itertuples(index=False)}
    named, _, _ = make_bodies(rows, names, 1, 256, seed=11)
    serve = [PY, "-m", "manymodels", "serve", "--port", "{port}"]
    two = [*serve, "--deployment", f"blue={blue}", "--deployment", f"green={green}",
           "--deployment", f"shadow={shadow}", "--traffic", "blue=90,green=10,shadow=0"]
    one_server = Server("one", [*serve, str(blue)], "/ping")
    two_server = Server("two", two, "/ping")
    # the mirrored runs use the 90/10 server with mirroring switched on (admin API), so
    # the mirror's cost is not mixed up with where the OS placed a third process
    contenders = {"one deployment": (one_server, None),
                  "two deployments 90/10": (two_server, 0),
                  "90/10 + 10% mirrored": (two_server, 10)}
    admin = f"http://127.0.0.1:{two_server.port}/admin"
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label in contenders}
    try:
        for server in (one_server, two_server):
            load(server, "/score", named, 2000, 16, work)  # warm up: every model loaded
        before = httpx.get(f"{admin}/deployments/shadow/mirror").json()
        order = list(contenders)
        for round_ in range(args.rounds):
            for label in order[round_ % len(order):] + order[:round_ % len(order)]:
                server, percent = contenders[label]
                if percent is not None:
                    httpx.put(f"{admin}/mirror", json={"deployment": "shadow",
                                                       "percent": percent})
                res = load(server, "/score", named, args.n, 16, work)
                runs[label].append(res)
                print(f"  round {round_ + 1} {label:<24} {res['rps']:9.0f} req/s "
                      f"cpu={res['cpu_us']:6.0f} us/req errors={res['errors']}", flush=True)
        time.sleep(1.0)  # let the last mirrored copies be replayed
        after = httpx.get(f"{admin}/deployments/shadow/mirror").json()
    finally:
        one_server.stop()
        two_server.stop()
    print_rollout(runs, before, after)


def print_rollout(runs: dict[str, list[dict[str, Any]]], before: dict[str, Any],
                  after: dict[str, Any]) -> None:
    median = {label: {k: float(np.median([r[k] for r in results]))
                      for k in ("rps", "cpu_us", "p50", "p99")}
              for label, results in runs.items()}
    base = median["one deployment"]
    n = sum(r["n"] for r in runs["one deployment"]) // len(runs["one deployment"])
    print(f"\n| rollout (1-row, c=16, median of {len(runs['one deployment'])} interleaved runs)"
          f" | requests | p50 ms | p99 ms | req/s | vs one | server CPU µs/req |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, m in median.items():
        print(f"| {label} | {n} | {m['p50']:.3f} | {m['p99']:.3f} | {m['rps']:,.0f} | "
              f"{m['rps'] / base['rps']:.0%} | {m['cpu_us']:,.0f} |")
    mirrored = after["mirrored"] - before["mirrored"]
    total = sum(r["n"] for r in runs["90/10 + 10% mirrored"])
    errors = sum(r["errors"] for results in runs.values() for r in results)
    cpu_gap = (median["90/10 + 10% mirrored"]["cpu_us"]
               - median["two deployments 90/10"]["cpu_us"]) * total / max(mirrored, 1)
    ratio = median["90/10 + 10% mirrored"]["rps"] / base["rps"]
    print(f"\n- 90/10 + 10% mirrored / one deployment = {ratio:.0%} (bar >= 90%) "
          f"{'PASS' if ratio >= 0.9 else 'FAIL'}")
    capacity = base["cpu_us"] / median["90/10 + 10% mirrored"]["cpu_us"]
    print(f"- by server CPU per request (steadier on a shared machine: requests/s also "
          f"measure which process the OS ran): one / mirrored = {capacity:.0%} "
          f"{'PASS' if capacity >= 0.9 else 'FAIL'}")
    print(f"- mirrored {mirrored} of {total} requests ({mirrored / total:.1%}), dropped "
          f"{after['dropped'] - before['dropped']}, shadow errors "
          f"{after['errors'] - before['errors']}, compared {after['compared'] - before['compared']}")
    print(f"- mirror CPU per mirrored request: {cpu_gap:.0f} µs from the server CPU gap between "
          f"the mirrored and unmirrored 90/10 runs; "
          f"{after['shadow_loop_ms_per_request'] * 1e3:.0f} µs of event-loop time per replay "
          f"as the server measures it")
    print(f"- non-200 answers over all rollout runs: {errors}")


# -- a rollout step with analysis (serve --follow) ------------------------------------------
def run_canary(args: argparse.Namespace, work: Path) -> None:
    """One deployment vs a followed alias held at its 90/10 step, analysing and paused."""
    import httpx
    import yaml
    from builders import build_bundle, derive_bundle

    from manymodels.registry import promote, register_bundle
    from manymodels.runtime import Bundle
    from manymodels.serve.policy import RolloutPolicy

    blue, rows = build_bundle(work / "canary-v1", n_stores=args.stores, rows_per_segment=40)
    models = Bundle(blue).model_names
    green = derive_bundle(blue, work / "canary-v2", models[::20], shift=0.01)
    names = {(int(s), b): f"quantity__store={s}__brand={b}"
             for s, b in rows[["store", "brand"]].drop_duplicates().itertuples(index=False)}
    named, _, _ = make_bodies(rows, names, 1, 256, seed=11)
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{work / 'canary.db'}",
           "MANYMODELS_CACHE_DIR": str(work / "canary-cache"),
           "MANYMODELS_STATE_DIR": str(work / "canary-state")}
    os.environ.update(env)
    register_bundle(blue, name="bench", alias="champion")
    register_bundle(green, name="bench")
    hold = {"min_requests": 0, "min_seconds": 0, "max_seconds": 10**6}
    spec = work / "canary.yaml"
    # the default poll interval (30 s): a poll reads the registry and writes the shared state;
    # its own CPU cost is reported apart, from the in-process measurement
    spec.write_text(yaml.safe_dump({"rollout": {
        "mirror": {"percent": 10, **hold},
        "steps": [{"percent": 10, **hold, "min_seconds": 10**6, "min_requests": 10**9},
                  {"percent": 100, **hold}]}}))
    inprocess = canary_asgi_cost(blue, named, spec, args.rounds)
    serve = [PY, "-m", "manymodels", "serve", "--port", "{port}"]
    one_server = Server("one", [*serve, str(blue)], "/ping")
    follow = Server("follow", [*serve, "models:/bench@champion", "--follow", "--spec", str(spec),
                               "--endpoint", str(work / "canary-endpoint.yaml")], "/ping", env)
    url = f"http://127.0.0.1:{follow.port}/admin/rollout"
    runs: dict[str, list[dict[str, Any]]] = {"one deployment": [], "rollout step, paused": [],
                                             "rollout step, analysing": []}
    try:
        promote("bench", 2, "champion", reason="benchmark")
        deadline = time.time() + 150  # two polls: the rollout starts, then passes step 0
        while (httpx.get(url).json().get("state") or {}).get("step") != 1:
            if time.time() > deadline:
                raise RuntimeError(f"the rollout did not reach step 1: {httpx.get(url).json()}")
            time.sleep(0.5)
        for server in (one_server, follow):
            load(server, "/score", named, 2000, 16, work)  # warm up: every model loaded
        compared: list[int] = []
        mirror_url = f"http://127.0.0.1:{follow.port}/admin/deployments/default/mirror"
        mirror_before = httpx.get(mirror_url).json()
        order = list(runs)
        for round_ in range(args.rounds):
            for label in order[round_ % len(order):] + order[:round_ % len(order)]:
                server = one_server if label == "one deployment" else follow
                if server is follow:
                    httpx.post(f"{url}/{'pause' if 'paused' in label else 'resume'}")
                before = _compared(mirror_url)
                res = load(server, "/score", named, args.n, 16, work)
                time.sleep(0.5)  # the last copies replayed
                res["compared"] = _compared(mirror_url) - before
                runs[label].append(res)
                print(f"  round {round_ + 1} {label:<26} {res['rps']:9.0f} req/s "
                      f"cpu={res['cpu_us']:6.0f} us/req compared={res['compared']} "
                      f"errors={res['errors']}", flush=True)
            compared.append(runs["rollout step, analysing"][-1]["compared"])
        state = httpx.get(url).json()["state"]
        mirror_after = httpx.get(mirror_url).json()
    finally:
        one_server.stop()
        follow.stop()
    median = {label: {k: float(np.median([r[k] for r in results]))
                      for k in ("rps", "cpu_us", "p50", "p99")}
              for label, results in runs.items()}
    base = median["one deployment"]
    print(f"\n| rollout step 90/10 (1-row, c=16, median of {args.rounds} interleaved runs) "
          f"| requests | p50 ms | p99 ms | req/s | vs one | server CPU µs/req |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, m in median.items():
        print(f"| {label} | {args.n} | {m['p50']:.3f} | {m['p99']:.3f} | {m['rps']:,.0f} | "
              f"{m['rps'] / base['rps']:.0%} | {m['cpu_us']:,.0f} |")
    ratio = median["rollout step, analysing"]["rps"] / base["rps"]
    print(f"\n- rollout step (90/10, analysis on) / one deployment = {ratio:.0%} (bar >= 90%) "
          f"{'PASS' if ratio >= 0.9 else 'FAIL'}")
    capacity = base["cpu_us"] / median["rollout step, analysing"]["cpu_us"]
    print(f"- by server CPU per request: one / analysing = {capacity:.0%} "
          f"{'PASS' if capacity >= 0.9 else 'FAIL'}")
    gap = median["rollout step, analysing"]["cpu_us"] - median["rollout step, paused"]["cpu_us"]
    per = float(np.median(compared)) / args.n
    replays = mirror_after["compared"] - mirror_before["compared"]
    loop_us = mirror_after["shadow_loop_ms_per_request"] * 1e3
    print(f"- {per:.1%} of requests reached a changed model and were compared ({replays} "
          f"copies replayed); the others were not copied")
    print(f"- analysis CPU per compared request, as the server measures it (event-loop time "
          f"of the replay on the live version, pairing and counting): {loop_us:.0f} µs; "
          f"per request on average: {loop_us * per:.2f} µs")
    print(f"- of which the counting alone (Analysis.observe + reply_rows, one row, "
          f"in-process CPU time): {_observe_cost():.2f} µs")
    print(f"- server CPU per request, analysing − paused: {gap:.1f} µs (the difference of two "
          f"noisy medians on a shared machine)")
    print(f"- in-process CPU per /score request through the whole ASGI app (no HTTP; median "
          f"of {args.rounds} interleaved rounds of 20,000): "
          + ", ".join(f"{label} {us:.1f} µs" for label, us in inprocess.items()
                      if label not in ("compared over the analysing rounds", "poll ms"))
          + f" ({inprocess['compared over the analysing rounds']:.0f} requests compared "
            f"over the analysing rounds)"
          + f"; analysing / one = {inprocess['one deployment'] / inprocess['analysing']:.0%}")
    poll_ms = inprocess["poll ms"]
    print(f"- one poll of the rollout (alias lookup in the registry, shared state read and "
          f"written), in-process CPU: {poll_ms:.1f} ms; at the default interval "
          f"({RolloutPolicy().poll_seconds:.0f} s) {poll_ms / RolloutPolicy().poll_seconds / 10:.3f}% "
          f"of a core, at a 1 s interval {poll_ms / 10:.2f}%")
    print(f"- state at the end: step {state['step']}, status {state['status']}, "
          f"{len(state['changed'])} changed models of {len(models)}")
    print(f"- non-200 answers: {sum(r['errors'] for rs in runs.values() for r in rs)}")


def canary_asgi_cost(bundle: Path, bodies: list[bytes], spec: Path, rounds: int,
                     n: int = 20000) -> dict[str, float]:
    """CPU µs per ``/score`` request through the whole ASGI app in this process: one
    deployment, and a follower held at its 90/10 step, paused and analysing."""
    from manymodels.registry import promote
    from manymodels.serve import create_app
    from manymodels.serve.settings import load_settings

    state = os.environ["MANYMODELS_STATE_DIR"]
    os.environ["MANYMODELS_STATE_DIR"] = state + "-inprocess"  # its own rollout state
    one = create_app(load_settings(bundle=str(bundle)))
    follow = create_app(load_settings(spec, bundle="models:/bench@champion", follow=True))
    os.environ["MANYMODELS_STATE_DIR"] = state
    rollout = follow.mirror.canary
    assert rollout is not None
    promote("bench", 2, "champion", reason="benchmark, in-process")
    scopes = [{"type": "http", "method": "POST", "path": "/score", "headers": [
        (b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
        (b"content-length", str(len(b)).encode())], "state": {}} for b in bodies]

    async def send(message: Any) -> None:
        pass

    def receiver(body: bytes) -> Any:
        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}
        return receive

    async def run(app: Any) -> float:
        start = time.process_time()
        for i in range(n):
            j = i % len(bodies)
            await app({**scopes[j], "state": {}}, receiver(bodies[j]), send)
            await asyncio.sleep(0)  # the mirror's replays run between requests, as when served
        return (time.process_time() - start) / n * 1e6

    async def measure() -> dict[str, list[float]]:
        while (rollout.record.step if rollout.record else -1) != 1 \
                or rollout.record.status != "running":
            await rollout.poll()  # started, then past the mirror phase (no minimum)
        times: dict[str, list[float]] = {"one deployment": [], "paused": [], "analysing": []}
        for app in (one, follow):
            for i in range(len(bodies)):  # warm up: load every model
                await app({**scopes[i], "state": {}}, receiver(bodies[i]), send)
        order = list(times)
        for round_ in range(rounds):
            for label in order[round_ % 3:] + order[:round_ % 3]:
                if label != "one deployment":
                    if rollout.record.paused != (label == "paused"):
                        await rollout.command("pause" if label == "paused" else "resume",
                                              "benchmark")
                times[label].append(await run(one if label == "one deployment" else follow))
        # comparisons over all analysing rounds (pausing keeps the counts)
        times["compared over the analysing rounds"] = [
            float(rollout.analysis.requests) if rollout.analysis is not None else 0.0]
        started = time.process_time()  # the whole process: the poll's threads included
        for _ in range(20):
            await rollout.poll()
        times["poll ms"] = [(time.process_time() - started) / 20 * 1e3]
        return times

    times = asyncio.run(measure())
    promote("bench", 1, "champion", reason="benchmark: the processes start from version 1")
    one.endpoint.close()
    follow.endpoint.close()
    return {label: float(np.median(t)) for label, t in times.items()}


def _observe_cost(n: int = 100_000) -> float:
    """Microseconds to pair and count one single-row answer of a changed model."""
    from manymodels.serve.analysis import Analysis
    from manymodels.serve.mirror import reply_rows

    analysis = Analysis(["m"], 1, 0.2)
    live = {"predictions": np.array([9.0]), "model": "m"}
    candidate = {"predictions": np.array([9.01]), "model": "m"}
    started = time.process_time()  # CPU time: the machine is shared
    for _ in range(n):
        analysis.observe(reply_rows("/score", live), reply_rows("/score", candidate),
                         0.0002, 0.0002)
    return (time.process_time() - started) / n * 1e6


def _compared(mirror_url: str) -> int:
    """Requests compared so far on this replica (the rollout publishes them per poll)."""
    import httpx

    return int(httpx.get(mirror_url).json()["compared"])


# -- observability cost --------------------------------------------------------------------
def run_observe(args: argparse.Namespace, work: Path) -> None:
    from builders import build_bundle

    bundle, rows = build_bundle(work / "observe", n_stores=args.stores, rows_per_segment=40)
    names = {(int(s), b): f"quantity__store={s}__brand={b}"
             for s, b in rows[["store", "brand"]].drop_duplicates().itertuples(index=False)}
    named, _, _ = make_bodies(rows, names, 1, 256, seed=1)
    base = [PY, "-m", "manymodels", "serve", str(bundle), "--port", "{port}"]
    contenders = {"metrics off": [*base, "--no-metrics"], "metrics on (default)": base,
                  "metrics + access log json + prediction log":
                  [*base, "--access-log", "json", "--log-predictions", str(work / "predlog")]}
    servers = {label: Server(label, argv, "/ping") for label, argv in contenders.items()}
    rps: dict[str, list[float]] = {label: [] for label in servers}
    cpu: dict[str, list[float]] = {label: [] for label in servers}
    load_seen = []
    try:
        for server in servers.values():
            load(server, "/score", named, 1000, 16, work)  # warm up: load every model
        for _ in range(args.rounds):
            for label, server in servers.items():  # round-robin: same noise for each
                res = load(server, "/score", named, args.n, 16, work)
                rps[label].append(res["rps"])
                cpu[label].append(res["cpu_us"])
                load_seen.append(os.getloadavg()[0])
    finally:
        for server in servers.values():
            server.stop()
    in_process = asgi_cost(bundle, named, args.rounds)
    print(f"\nobservability cost: 1-row requests, c=16, {args.n} requests x {args.rounds} "
          f"rounds per contender, interleaved; load average seen "
          f"{min(load_seen):.1f}-{max(load_seen):.1f} on {os.cpu_count()} cores")
    print("\n| contender | median req/s | runs req/s | median server CPU µs/req |")
    print("|---|---:|---:|---:|")
    for label in servers:
        runs = ", ".join(f"{r:,.0f}" for r in rps[label])
        print(f"| {label} | {np.median(rps[label]):,.0f} | {runs} | "
              f"{np.median(cpu[label]):,.0f} |")
    off = float(np.median(rps["metrics off"]))
    on = float(np.median(rps["metrics on (default)"]))
    print(f"\n- metrics on / off = {on / off:.1%} (bar >= 95%) "
          f"{'PASS' if on >= 0.95 * off else 'FAIL'}")
    everything = float(np.median(rps["metrics + access log json + prediction log"]))
    print(f"- metrics + access log + prediction log / off = {everything / off:.1%} (no bar)")
    server_cpu = float(np.median(cpu["metrics off"]))
    extra = in_process["metrics on"] - in_process["metrics off"]
    print(f"- in-process CPU per /score request through the ASGI app (no HTTP parsing), "
          f"median of {args.rounds} interleaved runs: metrics off "
          f"{in_process['metrics off']:.2f} µs, on {in_process['metrics on']:.2f} µs: "
          f"+{extra:.2f} µs = {extra / server_cpu:.1%} of the server's {server_cpu:.0f} µs "
          f"CPU per request (bar <= 5%) {'PASS' if extra <= 0.05 * server_cpu else 'FAIL'}")
    whole = in_process["metrics on"] - in_process["no middleware"]
    print(f"- the whole middleware (request ids, metrics; against none): +{whole:.2f} µs = "
          f"{whole / server_cpu:.1%} of the server's CPU per request")


def asgi_cost(bundle: Path, bodies: list[bytes], rounds: int, n: int = 20000) -> dict[str, float]:
    """CPU µs per ``/score`` request through the whole ASGI application, in this process,
    with metrics on and off: the instrumentation's cost without the network's noise."""
    from manymodels.serve import ServeSettings, create_app

    apps: dict[str, Any] = {label: create_app(ServeSettings(bundle=str(bundle), metrics=on))
                            for label, on in (("metrics off", False), ("metrics on", True))}
    apps["no middleware"] = apps["metrics off"]._dispatch  # request ids off too
    scopes = [{"type": "http", "method": "POST", "path": "/score", "headers": [
        (b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
        (b"content-length", str(len(b)).encode())], "state": {}} for b in bodies]

    async def run(app: Any) -> float:
        async def send(message: Any) -> None:
            pass

        def receiver(body: bytes) -> Any:
            async def receive() -> dict[str, Any]:
                return {"type": "http.request", "body": body, "more_body": False}
            return receive

        for i in range(len(bodies)):  # warm up: load every model
            await app(dict(scopes[i]), receiver(bodies[i]), send)
        start = time.process_time()
        for i in range(n):
            j = i % len(bodies)
            await app({**scopes[j], "state": {}}, receiver(bodies[j]), send)
        return (time.process_time() - start) / n * 1e6

    times: dict[str, list[float]] = {label: [] for label in apps}
    for _ in range(rounds):
        for label, app in apps.items():
            times[label].append(asyncio.run(run(app)))
    return {label: float(np.median(t)) for label, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="mode")
    client = sub.add_parser("client")
    for flag, kind in (("--port", int), ("--path", str), ("--bodies", str), ("--n", int),
                       ("--c", int), ("--out", str)):
        client.add_argument(flag, type=kind, required=True)
    client.add_argument("--keep", action="store_true")
    client.add_argument("--header-file", default="")
    parser.add_argument("--n", type=int, default=4000, help="requests per cell (fast servers)")
    parser.add_argument("--stores", type=int, default=100, help="3 models per store")
    parser.add_argument("--skip-peers", action="store_true", help="no mlflow / Azure peers")
    parser.add_argument("--scale", action="store_true", help="also run the 10,000-model mode")
    parser.add_argument("--scale-only", action="store_true")
    parser.add_argument("--scale-stores", type=int, default=3334)
    parser.add_argument("--scale-requests", type=int, default=20000)
    parser.add_argument("--rollout", action="store_true", help="also run the rollout rows")
    parser.add_argument("--rollout-only", action="store_true")
    parser.add_argument("--canary", action="store_true",
                        help="only the rows of a rollout step with analysis (serve --follow)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (--rollout, --observe)")
    parser.add_argument("--observe", action="store_true", help="only the metrics-cost rows")
    parser.add_argument("--auth", action="store_true",
                        help="also run the --auth none|key|token comparison")
    parser.add_argument("--auth-only", action="store_true")
    parser.add_argument("--auth-rounds", type=int, default=15)
    args = parser.parse_args()
    if args.mode == "client":
        client_main(args)
        return
    with tempfile.TemporaryDirectory(prefix="mm-bench-serve-") as tmp:
        work = Path(tmp)
        if args.canary:
            with record("serve-canary", "A rollout step with analysis: "
                        "`benchmarks/serve.py --canary`"):
                run_canary(args, work)
            return
        if args.observe:
            with record("serve-observe", "Cost of metrics and request ids: `benchmarks/serve.py --observe`"):
                run_observe(args, work)
            return
        if not (args.scale_only or args.rollout_only or args.auth_only):
            with record("serve" + ("-quick" if args.skip_peers else ""),
                        "Online serving: `benchmarks/serve.py`"):
                print_table(run_matrix(args, work))
        if args.rollout or args.rollout_only:
            with record("serve-rollout", "Rollout: `benchmarks/serve.py --rollout`"):
                run_rollout(args, work)
        if args.auth or args.auth_only:
            with record("serve-auth", "Cost of authentication: `benchmarks/serve.py --auth`"):
                run_auth(args, work)
        if args.scale or args.scale_only:
            with record("serve-scale", "Scale mode: `benchmarks/serve.py --scale`"):
                run_scale(args, work)


if __name__ == "__main__":
    main()
