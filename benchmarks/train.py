"""Benchmark: ``manymodels.train`` with 2 workers vs a plain sequential groupby loop.

Both fit the same candidates (the ``default`` trainer) on the same 1,000 segments of the
generated orange-juice data, with the same time-ordered holdout, and refit the winner on
all rows. The loop is the pattern of a hand-written many-models script: one process, no
ONNX export, no global model. Ours also exports every winner to ONNX with a parity
check and trains the global model, so the comparison is conservative.

Prints (1) the wall-time ratio loop / ours and (2) the parallel efficiency
(sum of per-model fit+export seconds / workers) / wall seconds.

    python benchmarks/train.py [--stores 334] [--jobs 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import pandas as pd

from manymodels.candidates import build_candidates, build_pipeline, predict_with, score_metric
from manymodels.datasets import make_oj
from manymodels.specs import load_trainer
from manymodels.training import train


def sequential_loop(frame: pd.DataFrame, trainer_name: str) -> tuple[float, int]:
    """The hand-written pattern: groupby, fit every candidate, keep the best, refit."""
    trainer = load_trainer(trainer_name)
    candidates = build_candidates(trainer)
    features = ["price", "feat", "week_of_year", "income", "age60", "ethnic", "hh_size"]
    features = [f for f in features if f in frame.columns]
    started = time.perf_counter()
    n = 0
    for _, part in frame.groupby(["store", "brand"], sort=False):
        part = part.sort_values("week")
        cut = int(round(len(part) * (1 - trainer.validation.holdout)))
        train_rows, hold = part.iloc[:cut], part.iloc[cut:]
        best, best_metric = None, np.inf
        for cand in candidates:
            pipe = build_pipeline(cand, features, [], trainer.task, trainer.seed)
            pipe.fit(train_rows[features], train_rows[trainer.target])
            pred, _, _ = predict_with(pipe, hold[features], trainer.task)
            metric = score_metric(trainer.metric, hold[trainer.target].to_numpy(), pred)
            if metric < best_metric:
                best, best_metric = cand, metric
        assert best is not None
        build_pipeline(best, features, [], trainer.task, trainer.seed).fit(
            part[features], part[trainer.target])
        n += 1
    return time.perf_counter() - started, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--stores", type=int, default=334, help="334 stores x 3 brands = 1,002")
    parser.add_argument("--weeks", type=int, default=120)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--trainer", default="default")
    args = parser.parse_args()
    frame = make_oj(stores=args.stores, weeks=args.weeks, seed=0)
    segmenter = {"name": "bench", "columns": ["store", "brand"], "min_rows": 20,
                 "levels": [["store", "brand"], []]}
    segments = frame.groupby(["store", "brand"]).ngroups
    print(f"{segments} segments, {len(frame):,} rows, trainer '{args.trainer}', "
          f"{args.jobs} workers")

    loop_seconds, n = sequential_loop(frame, args.trainer)
    print(f"sequential loop: {loop_seconds:.1f} s for {n} segments")

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        result = train(frame, segmenter, args.trainer, out=tmp, jobs=args.jobs, track=False)
        ours_seconds = time.perf_counter() - started
    work = result.summary["fit_seconds"]
    efficiency = (work / args.jobs) / ours_seconds
    rows = [
        ("sequential groupby loop (no ONNX)", loop_seconds, 1.0, float("nan")),
        (f"manymodels train --jobs {args.jobs} (+ONNX, +global)", ours_seconds,
         loop_seconds / ours_seconds, efficiency),
    ]
    print()
    print(f"| {'variant':<48} | {'wall s':>7} | {'speed-up':>8} | {'efficiency':>10} |")
    print(f"|{'-' * 50}|{'-' * 9}|{'-' * 10}|{'-' * 12}|")
    for label, seconds, ratio, eff in rows:
        eff_text = "-" if eff != eff else f"{eff:.3f}"
        print(f"| {label:<48} | {seconds:>7.1f} | {ratio:>7.2f}x | {eff_text:>10} |")
    print()
    print(f"sum of per-model fit+export seconds: {work:.1f} s; models: {len(result.results)}; "
          f"bars: speed-up >= 1.7x, efficiency >= 0.85")


if __name__ == "__main__":
    main()
