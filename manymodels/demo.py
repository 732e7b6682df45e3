"""``make demo``: the whole job, end to end, on the bundled data, through the real CLI.

Train one model per (store, brand) on ``datasets/oj_sales.parquet``, pack the winners into
one bundle registered in the local MLflow store, validate it, batch-score the table, then
start the server and score a few rows over HTTP. Each step prints the command it runs, so
the demo doubles as a tour of the CLI.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

DATA = Path("datasets/oj_sales.parquet")
RUN_ID = "demo"


def _cli() -> list[str]:
    return [sys.executable, "-m", "manymodels"]


def step(title: str, *args: str) -> None:
    """Run one CLI command, echoing it; stop the demo if it fails."""
    print(f"\n=== {title}\n$ manymodels {shlex.join(args)}", flush=True)
    proc = subprocess.run([*_cli(), *args], check=False)
    if proc.returncode != 0:
        raise SystemExit(f"demo step failed ({proc.returncode}): manymodels {shlex.join(args)}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _post(url: str, payload: dict[str, object]) -> object:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise SystemExit(f"demo: {url} answered {exc.code}: {exc.read().decode()}") from None


def serve_and_query(bundle: str) -> None:
    """Start ``manymodels serve``, wait until ready, score rows by segment and by name."""
    port = _free_port()
    args = ["serve", bundle, "--host", "127.0.0.1", "--port", str(port)]
    print(f"\n=== serve the bundle over HTTP\n$ manymodels {shlex.join(args)} &", flush=True)
    server = subprocess.Popen([*_cli(), *args], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{base}/v2/health/ready", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("demo: the server did not become ready") from None
                time.sleep(0.3)
        rows = [{"store": 2, "brand": "tropicana", "week_of_year": 17,
                 "price": 2.6, "feat": 1, "income": 10.5, "age60": 0.15, "ethnic": 0.1,
                 "hh_size": 2.6},
                {"store": 9999, "brand": "dominicks", "week_of_year": 17,
                 "price": 1.7, "feat": 0, "income": 10.5, "age60": 0.15, "ethnic": 0.1,
                 "hh_size": 2.6}]
        print("POST /score  (rows routed by their store and brand; store 9999 is unknown)")
        print(json.dumps(_post(f"{base}/score", {"data": rows}), indent=1))
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    if not DATA.is_file():
        raise SystemExit(f"demo: {DATA} is missing; run from the repository root")
    os.environ.setdefault("MLFLOW_TRACKING_URI", "sqlite:///mlruns.db")
    step("train one model per store and brand", "train", "--data", str(DATA), "--segmenter",
         "store_brand", "--trainer", "default", "--run-id", RUN_ID, "--overwrite")
    step("pack every winner into one bundle, registered in MLflow", "package", f"runs/{RUN_ID}",
         "--name", "oj-sales", "--out", "bundles/oj-sales", "--overwrite", "--register",
         "--alias", "champion")
    step("validate the bundle (checksums, loads, schemas, routes)", "validate",
         "models:/oj-sales@champion")
    step("batch-score the whole table, exactly once", "batch", "bundles/oj-sales", str(DATA),
         "batch_out/oj-sales", "--overwrite", "--no-progress")
    serve_and_query("bundles/oj-sales")
    step("forecast: backtest every method per store and brand, keep the best blend", "train",
         "--data", str(DATA), "--segmenter", "store_brand", "--trainer", "forecast",
         "--run-id", f"{RUN_ID}-forecast", "--overwrite", "--quiet")
    step("pack the forecasting run", "package", f"runs/{RUN_ID}-forecast", "--name",
         "oj-forecast", "--out", "bundles/oj-forecast", "--overwrite")
    step("forecast the next 8 weeks of every series", "forecast", "bundles/oj-forecast",
         "--horizon", "8", "--out", "forecast_out/oj-forecast.csv")
    print("\ndemo finished: runs/demo, bundles/oj-sales, batch_out/oj-sales, mlruns.db, "
          "bundles/oj-forecast, forecast_out/oj-forecast.csv")


if __name__ == "__main__":
    main()
