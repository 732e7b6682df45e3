"""Cost of the input contract on the server's hot path: this tree against a base tree.

The contract (``manymodels/runtime/contract.py``) runs on every request; the bar is that
single-row requests per second do not drop measurably. HTTP load tests on this shared
2-core machine vary by ±10%, far more than a few microseconds, so this measures the
server's own work per request directly: each contender is a fresh process that imports
manymodels from its tree, opens the same bundle, and answers the same pre-encoded bodies
through the application's ASGI entry point (fast lane included: body checks, parsing,
routing, the contract, ``session.run``, the JSON reply) with no socket in between.
Contenders alternate round-robin; the median of the rounds is reported, in CPU
microseconds of the serving process per request (wall time is at the mercy of the other
jobs on this machine; CPU time much less so). Requests per second of one worker are the
inverse of this work.

Usage: ``python benchmarks/serve_contract.py --base DIR`` where ``DIR`` holds the code to
compare with (e.g. ``git archive main | tar -x -C DIR``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _docs import record  # benchmarks/ is the script's path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

CHILD = r"""
import asyncio, json, sys, time
import orjson
from manymodels.serve import ServeSettings, create_app

bundle, n = sys.argv[1], int(sys.argv[2])
app = create_app(ServeSettings(bundle=bundle))
reg = app.endpoint.deployments["default"].registry
for name in reg.bundle.model_names:
    reg.load_sync(name)
seg = "quantity__store=1__brand=tropicana"
bodies = {
    "/score named, 1 row": ("/score", {"model": seg, "data": [{"price": 2.5, "feat": 1.0}]}),
    "/score routed, 1 row": ("/score", {"data": [{"store": 1, "brand": "tropicana",
                                                   "price": 2.5, "feat": 1.0}]}),
    "V2 infer, 1 row": (f"/v2/models/{seg}/infer", {"inputs": [
        {"name": "price", "shape": [1, 1], "datatype": "FP32", "data": [2.5]},
        {"name": "feat", "shape": [1, 1], "datatype": "FP32", "data": [1.0]}]}),
    "/score routed, 100 rows": ("/score", {"data": [
        {"store": 1 + i % 10, "brand": "tropicana", "price": 1 + i / 50, "feat": i % 2}
        for i in range(100)]}),
}

async def call(path, body):
    scope = {"type": "http", "method": "POST", "path": path, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
    sent = []
    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}
    async def send(message):
        sent.append(message)
    await app(scope, receive, send)
    assert sent[0]["status"] == 200, sent

async def main():
    out = {}
    for label, (path, payload) in bodies.items():
        body = orjson.dumps(payload)
        for _ in range(300):
            await call(path, body)
        start = time.process_time()  # CPU seconds of this process: steadier than wall time
        for _ in range(n):                # on a machine shared with other jobs
            await call(path, body)
        out[label] = (time.process_time() - start) / n * 1e6
    print(json.dumps(out))

asyncio.run(main())
"""


def run(tree: Path, bundle: Path, n: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{ROOT / 'tests'}"}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(bundle), str(n)], env=env, cwd=tree,
                          capture_output=True, text=True, check=True, timeout=600)
    return json.loads(proc.stdout.splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", type=Path, required=True, help="tree of the code to compare")
    parser.add_argument("--n", type=int, default=5000, help="requests per body and round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from builders import build_bundle

    with tempfile.TemporaryDirectory() as tmp:
        bundle, _ = build_bundle(Path(tmp) / "bundle", n_stores=10, rows_per_segment=40)
        trees = {"base": args.base.resolve(), "contract": ROOT}
        samples: dict[str, list[dict[str, float]]] = {k: [] for k in trees}
        for _ in range(args.rounds):
            for label, tree in trees.items():
                samples[label].append(run(tree, bundle, args.n))
    load = os.getloadavg()
    print(f"load average during the run: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} "
          f"({os.cpu_count()} cores); median of {args.rounds} round-robin rounds")
    print("\n| request | base µs/req | contract µs/req | added µs | req/s ratio |")
    print("|---|---:|---:|---:|---:|")
    for body in samples["base"][0]:
        base = statistics.median(s[body] for s in samples["base"])
        new = statistics.median(s[body] for s in samples["contract"])
        print(f"| {body} | {base:.1f} | {new:.1f} | {new - base:+.1f} | {base / new:.3f} |")


if __name__ == "__main__":
    with record("serve-contract", "Cost of the input contract: `benchmarks/serve_contract.py`"):
        main()
