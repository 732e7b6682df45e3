"""Benchmark: ``manymodels retrain`` after 5% of the segments changed vs a full retrain.

Both contenders are the same command, run as a fresh process each time (command to
command: interpreter start-up, imports, reading the champion from the registry,
fingerprinting, fitting, packing, registering), on the same new data and the same
champion (``bench@champion`` in a temporary SQLite store):

* incremental: ``manymodels retrain --data NEW --from models:/bench@champion --register``
* full:        the same with ``--all`` (every segment and every pooled/global model refitted)

5% of the segments get new rows-values (their target scaled), spread over the four groups,
so every pooled and global model stays under ``refit_share`` and is kept. The trainer is
small (Ridge + mean) for both, so 10,000 segments fit in a few minutes on two cores.
Contenders run round-robin (incremental first), the median is reported, with each part's
time from the command's own ``took`` line and the machine's load average.

After the incremental runs, every unchanged segment's rows are scored with the champion
bundle and with the new one: the predictions must be identical.

    python benchmarks/retrain.py --segments 1000
    python benchmarks/retrain.py --segments 10000 --full-repeats 2
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from _docs import record  # benchmarks/ is the script's path

from manymodels.bundle import package_run
from manymodels.datasets import make_mixed
from manymodels.registry import register_bundle, resolve_bundle
from manymodels.runtime import Bundle
from manymodels.training import train

SEGMENTER = {"name": "bench", "columns": ["group", "segment"], "min_rows": 10,
             "max_segments": 20000, "levels": [["group", "segment"], ["group"], []]}
TRAINER = {"name": "bench-small", "target": "y", "time_column": "week", "metric": "rmse",
           "candidates": [{"algorithm": "ridge", "params": {"alpha": 1.0}},
                          {"algorithm": "mean"}]}
TOOK = re.compile(r"took ([\d.]+) s \((.*)\)")


def changed_data(frame: pd.DataFrame, share: float) -> tuple[pd.DataFrame, list[str]]:
    """Scale the target of every ``1/share``-th segment (spread over all groups)."""
    names = sorted(frame["segment"].unique())
    step = round(1 / share)
    changed = names[::step]
    out = frame.copy()
    rows = out["segment"].isin(changed)
    out.loc[rows, "y"] = (out.loc[rows, "y"] * 1.5 + 2.0).round(4)
    return out, changed


def run_command(args: list[str], cwd: Path, env: dict[str, str]) -> dict[str, float]:
    """Run one ``manymodels retrain``; its wall time, its parts and the start-up."""
    load = os.getloadavg()[0]
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "manymodels", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode not in (0, 11):
        raise SystemExit(f"retrain exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    match = TOOK.search(done.stdout)
    if match is None:
        raise SystemExit(f"no timing line in the output:\n{done.stdout}")
    parts = {k: float(v) for k, v in (p.rsplit(" ", 1) for p in match.group(2).split(", "))}
    return {"wall": wall, "in_process": float(match.group(1)),
            "start-up": wall - float(match.group(1)), **parts, "load": load}


def check_unchanged(champion: Path, bundle: Path, frame: pd.DataFrame, changed: list[str]
                    ) -> tuple[int, int, float]:
    rows = frame[~frame["segment"].isin(changed)]
    before = Bundle(champion).predict(rows)
    after = Bundle(bundle).predict(rows)
    diff = float(np.max(np.abs(before["prediction"].to_numpy() - after["prediction"].to_numpy())))
    same_models = bool((before["model"] == after["model"]).all())
    return rows["segment"].nunique(), len(rows), diff if same_models else float("inf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--segments", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=24, help="rows per segment")
    parser.add_argument("--share", type=float, default=0.05, help="share of changed segments")
    parser.add_argument("--repeats", type=int, default=3, help="incremental runs")
    parser.add_argument("--full-repeats", type=int, default=3, help="full runs")
    parser.add_argument("--jobs", type=int, default=None,
                        help="workers (default: retrain's own choice, one per core)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="mm-bench-retrain-") as tmp:
        root = Path(tmp)
        uri = f"sqlite:///{root / 'mlruns.db'}"
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri,
               "MANYMODELS_CACHE_DIR": str(root / "cache"), "PYTHONUNBUFFERED": "1"}
        os.environ.update({k: env[k] for k in ("MLFLOW_TRACKING_URI", "MANYMODELS_CACHE_DIR")})
        frame = make_mixed(segments=args.segments, rows_per_segment=args.rows, seed=0)
        print(f"{args.segments:,} segments x {args.rows} rows, trainer Ridge + mean, "
              f"workers {args.jobs or 'default'}; setting up the champion ...", flush=True)
        started = time.perf_counter()
        run = train(frame, SEGMENTER, TRAINER, out=root / "runs", run_id="champion",
                    jobs=args.jobs, track=False)  # not timed
        packed = package_run(run.run_dir, root / "champion", name="bench")
        register_bundle(packed.path, name="bench", alias="champion", uri=uri)
        print(f"champion trained, packed and registered in {time.perf_counter() - started:.1f} s",
              flush=True)
        new, changed = changed_data(frame, args.share)
        new.to_parquet(root / "new.parquet")
        base = ["retrain", "--data", "new.parquet", "--from", "models:/bench@champion",
                "--register", "--quiet", *(["-j", str(args.jobs)] if args.jobs else [])]
        results: dict[str, list[dict[str, float]]] = {"incremental": [], "full": []}
        order = []
        for i in range(max(args.repeats, args.full_repeats)):
            if i < args.repeats:
                order.append("incremental")
            if i < args.full_repeats:
                order.append("full")
        for n, contender in enumerate(order):
            extra = ["--all"] if contender == "full" else []
            out = ["--out", str(root / "bundles" / f"{contender}-{n}"), "--runs",
                   str(root / "runs")]
            timing = run_command([*base, *extra, *out], root, env)
            results[contender].append(timing)
            print(f"  {contender:<11} {timing['wall']:7.2f} s  (load {timing['load']:.1f})",
                  flush=True)
        segments, rows, diff = check_unchanged(
            resolve_bundle("models:/bench@champion", uri), root / "bundles" / "incremental-0",
            new, changed)
        report(results, args, len(changed), segments, rows, diff)


def report(results: dict[str, list[dict[str, float]]], args: argparse.Namespace, changed: int,
           segments: int, rows: int, diff: float) -> None:
    parts = ["start-up", "lock", "open champion", "prepare data", "plan", "fit", "compare",
             "merge", "package", "register", "log"]
    median = {c: {k: statistics.median(r[k] for r in runs if k in r) for k in runs[0]}
              for c, runs in results.items()}
    print()
    print(f"{args.segments:,} segments, {changed} changed ({args.share:.0%}); median of "
          f"{args.repeats} incremental / {args.full_repeats} full runs, round-robin")
    print("| part (s) | incremental | full |")
    print("|---|---:|---:|")
    for part in parts:
        print(f"| {part} | {median['incremental'].get(part, 0):.2f} | "
              f"{median['full'].get(part, 0):.2f} |")
    print(f"| **command to command** | **{median['incremental']['wall']:.2f}** | "
          f"**{median['full']['wall']:.2f}** |")
    ratio = median["full"]["wall"] / median["incremental"]["wall"]
    fit_ratio = median["full"]["fit"] / max(median["incremental"]["fit"], 1e-9)
    loads = [r["load"] for runs in results.values() for r in runs]
    print(f"\nfull / incremental: {ratio:.1f}x wall ({fit_ratio:.1f}x in the fitting part); "
          f"load average {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} cores")
    print(f"unchanged segments: {segments:,} ({rows:,} rows) score the same with the champion "
          f"and the incremental bundle: max |difference| = {diff:g}")


def _segments() -> str:
    """The ``--segments`` of this run, for the name of its page (one page per size)."""
    argv = sys.argv[1:]
    for i, arg in enumerate(argv):
        if arg.startswith("--segments="):
            return arg.split("=", 1)[1]
        if arg == "--segments" and i + 1 < len(argv):
            return argv[i + 1]
    return "1000"


if __name__ == "__main__":
    with record(f"retrain-{_segments()}", "Retraining: `benchmarks/retrain.py`"):
        main()
