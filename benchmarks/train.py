"""Benchmark: ``manymodels.train`` against what a user would otherwise write.

All contenders fit the same candidates (the ``default`` trainer: LightGBM 2×2 grid,
Ridge, decision tree, mean) on the same segments of the generated orange-juice data,
with the same validation (3 rolling-origin folds, each holding out the next 20% of a
segment's weeks and training on all earlier weeks), the same selection (one standard
error rule, simplest first) and refit the winner on all rows:

- **sequential loop**: one process, ``groupby`` + scikit-learn pipelines, no ONNX;
- **joblib peer**: the same per-segment function under ``joblib.Parallel`` (loky, same
  number of workers), plus ``skl2onnx`` conversion of each winner (LightGBM through
  ``onnxmltools``' converter), as a careful hand-written many-models job would;
- **ours**: ``manymodels.train --jobs N`` (+ONNX with a parity check on every model,
  + the global model, + the level gate and blends);
- **ours, one holdout**: the same with ``validation.method: time`` (the latest 20%),
  which gives the cost of the folds.

The two peers are written independently of manymodels' code (plain scikit-learn,
LightGBM, joblib, skl2onnx, onnxmltools). Contenders run round-robin, ``--repeat`` times;
the table shows medians (the machine is shared).

    python benchmarks/train.py [--stores 100] [--jobs 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Any

import numpy as np
import pandas as pd
from _docs import record  # benchmarks/ is the script's path

FEATURES = ["price", "feat", "week_of_year", "income", "age60", "ethnic", "hh_size"]
TARGET, TIME, KEYS = "quantity", "week", ["store", "brand"]
FOLDS, HOLDOUT = 3, 0.2
#: (label, algorithm, params, complexity): trainers/default.yaml, written out by hand
CANDIDATES: list[tuple[str, str, dict[str, Any], int]] = [
    (f"lightgbm[n_estimators={n},num_leaves={leaves}]", "lightgbm",
     {"n_estimators": n, "num_leaves": leaves, "learning_rate": 0.1, "min_child_samples": 5,
      "random_state": 0, "n_jobs": 1, "verbose": -1}, 4)
    for n in (40, 80) for leaves in (7, 15)
] + [("ridge", "ridge", {"alpha": 1.0}, 1),
     ("decision_tree", "decision_tree", {"max_depth": 5, "random_state": 0}, 2),
     ("mean", "mean", {}, 0)]


# -- the peers: plain scikit-learn / LightGBM / joblib / skl2onnx ---------------------------
def _estimator(algorithm: str, params: dict[str, Any]) -> Any:
    from lightgbm import LGBMRegressor
    from sklearn.dummy import DummyRegressor
    from sklearn.linear_model import Ridge
    from sklearn.tree import DecisionTreeRegressor

    return {"lightgbm": LGBMRegressor, "ridge": Ridge, "decision_tree": DecisionTreeRegressor,
            "mean": DummyRegressor}[algorithm](**params)


def _pipeline(algorithm: str, params: dict[str, Any], features: list[str]) -> Any:
    from sklearn.compose import ColumnTransformer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    prep = ColumnTransformer([("num", StandardScaler(), features)])
    return Pipeline([("prep", prep), ("model", _estimator(algorithm, params))])


def rolling_folds(n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Train/test positions of 3 expanding folds of round(20% of n) rows (time-sorted rows)."""
    size = max(2, round(HOLDOUT * n))
    return [(np.arange(0, n - (FOLDS - b) * size),
             np.arange(n - (FOLDS - b) * size, n - (FOLDS - b - 1) * size)) for b in range(FOLDS)]


def _one_se(means: dict[str, float], ses: dict[str, float]) -> list[str]:
    """Labels in preference order: the simplest within one SE of the best first."""
    best = min(means, key=means.__getitem__)
    rank = {label: c for label, _, _, c in CANDIDATES}
    within = [label for label in means if means[label] <= means[best] + ses[best] + 1e-12]
    winner = min(within, key=lambda label: rank[label])
    return [winner, *sorted((la for la in means if la != winner), key=means.__getitem__)]


def _convert(pipe: Any, features: list[str]) -> bytes:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    initial = [(c, FloatTensorType([None, 1])) for c in features]
    onx = convert_sklearn(pipe, initial_types=initial, target_opset={"": 17, "ai.onnx.ml": 3})
    return bytes(onx.SerializeToString())


def _register_lightgbm() -> None:
    from lightgbm import LGBMRegressor
    from onnxmltools.convert.lightgbm.operator_converters.LightGbm import convert_lightgbm
    from skl2onnx import update_registered_converter
    from skl2onnx.common.shape_calculator import calculate_linear_regressor_output_shapes

    update_registered_converter(LGBMRegressor, "LightGbmLGBMRegressor",
                                calculate_linear_regressor_output_shapes, convert_lightgbm)


def fit_segment(part: pd.DataFrame, convert: bool) -> tuple[str, int]:
    """Select on rolling folds (one-SE), refit the winner on all rows, convert it."""
    part = part.sort_values(TIME)
    x, y = part[FEATURES], part[TARGET].to_numpy()
    scores: dict[str, list[float]] = {label: [] for label, *_ in CANDIDATES}
    for train, test in rolling_folds(len(part)):
        for label, algorithm, params, _ in CANDIDATES:
            pipe = _pipeline(algorithm, params, FEATURES).fit(x.iloc[train], y[train])
            error = pipe.predict(x.iloc[test]) - y[test]
            scores[label].append(float(np.sqrt(np.mean(error ** 2))))
    means = {k: float(np.mean(v)) for k, v in scores.items()}
    ses = {k: float(np.std(v, ddof=1) / np.sqrt(len(v))) for k, v in scores.items()}
    spec = {label: (algorithm, params) for label, algorithm, params, _ in CANDIDATES}
    for label in _one_se(means, ses):
        pipe = _pipeline(*spec[label], FEATURES).fit(x, y)
        if not convert:
            return label, 0
        if spec[label][0] == "mean":  # skl2onnx has no DummyRegressor converter: next one
            continue
        return label, len(_convert(pipe, FEATURES))
    raise RuntimeError("no candidate converted")


def _fit_chunk(parts: list[pd.DataFrame], convert: bool) -> list[tuple[str, int]]:
    if convert:
        _register_lightgbm()
    return [fit_segment(p, convert) for p in parts]


def sequential_loop(frame: pd.DataFrame) -> tuple[float, int]:
    """The hand-written pattern: groupby, fit every candidate on every fold, keep the best."""
    started = time.perf_counter()
    done = [fit_segment(part, convert=False) for _, part in frame.groupby(KEYS, sort=False)]
    return time.perf_counter() - started, len(done)


def joblib_peer(frame: pd.DataFrame, jobs: int) -> tuple[float, int]:
    """The same under joblib.Parallel (segments in batches of 10), each winner to ONNX."""
    from joblib import Parallel, delayed

    started = time.perf_counter()
    parts = [part for _, part in frame.groupby(KEYS, sort=False)]
    chunks = [parts[i:i + 10] for i in range(0, len(parts), 10)]
    done = Parallel(n_jobs=jobs, backend="loky")(delayed(_fit_chunk)(c, True) for c in chunks)
    seconds = time.perf_counter() - started
    return seconds, sum(len(d) for d in done)


# -- ours ------------------------------------------------------------------------------------
def ours(frame: pd.DataFrame, jobs: int, method: str) -> tuple[float, Any]:
    from manymodels.training import train

    trainer = {"name": "default", "target": TARGET, "time_column": TIME,
               "validation": {"method": method, "holdout": HOLDOUT, "folds": FOLDS},
               "candidates": [{"algorithm": "lightgbm",
                               "params": {"learning_rate": 0.1, "min_child_samples": 5},
                               "grid": {"n_estimators": [40, 80], "num_leaves": [7, 15]}},
                              {"algorithm": "ridge", "params": {"alpha": 1.0}},
                              {"algorithm": "decision_tree", "params": {"max_depth": 5}},
                              {"algorithm": "mean"}]}
    segmenter = {"name": "bench", "columns": KEYS, "min_rows": 20, "levels": [KEYS, []]}
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        result = train(frame, segmenter, trainer, out=tmp, jobs=jobs, track=False)
        return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--stores", type=int, default=100, help="stores x 3 brands segments")
    parser.add_argument("--weeks", type=int, default=120)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-loop", action="store_true", help="leave out the sequential loop")
    args = parser.parse_args()
    from manymodels.datasets import make_oj

    frame = make_oj(stores=args.stores, weeks=args.weeks, seed=0)
    segments = frame.groupby(KEYS).ngroups
    print(f"{segments} segments, {len(frame):,} rows, {args.jobs} workers, "
          f"load average before: {os.getloadavg()[0]:.1f}", flush=True)
    times: dict[str, list[float]] = {}
    work: list[float] = []
    contenders = {
        "ours": lambda: ours(frame, args.jobs, "rolling"),
        "joblib peer": lambda: joblib_peer(frame, args.jobs),
        "ours, one holdout": lambda: ours(frame, args.jobs, "time"),
        **({} if args.skip_loop else {"sequential loop": lambda: sequential_loop(frame)}),
    }
    for round_ in range(args.repeat):
        for label, run in contenders.items():
            seconds, detail = run()
            times.setdefault(label, []).append(seconds)
            if label == "ours":
                work.append(detail.summary["fit_seconds"])
            print(f"round {round_ + 1}: {label}: {seconds:.1f} s "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)
    median = {k: statistics.median(v) for k, v in times.items()}
    print()
    print(f"| {'variant':<52} | {'median s':>8} | {'runs':<20} | {'ours is':>8} |")
    print(f"|{'-' * 54}|{'-' * 10}|{'-' * 22}|{'-' * 10}|")
    rows = [("ours", f"manymodels train --jobs {args.jobs} (3 rolling folds, +ONNX, +global)"),
            ("ours, one holdout", f"manymodels train --jobs {args.jobs} (one time holdout)"),
            ("joblib peer", f"joblib.Parallel({args.jobs}) + sklearn + skl2onnx (3 folds)"),
            ("sequential loop", "sequential groupby loop (3 folds, no ONNX)")]
    for key, label in rows:
        if key not in median:
            continue
        runs = "/".join(f"{t:.1f}" for t in times[key])
        ratio = median[key] / median["ours"]
        print(f"| {label:<52} | {median[key]:>8.1f} | {runs:<20} | {ratio:>7.2f}x |")
    print()
    print("per-round ratios (contender / ours, same round; median):")
    for key in ("joblib peer", "sequential loop", "ours, one holdout"):
        if key in times:
            ratios = [t / o for t, o in zip(times[key], times["ours"], strict=True)]
            print(f"  {key}: {' / '.join(f'{r:.2f}' for r in ratios)} -> "
                  f"{statistics.median(ratios):.2f}x")
    efficiency = statistics.median(work) / args.jobs / median["ours"]
    print()
    print(f"folds cost {median['ours'] / median['ours, one holdout']:.2f}x a single holdout; "
          f"parallel efficiency of ours {efficiency:.2f}; load average after "
          f"{os.getloadavg()[0]:.1f}")
    print("bars: ours >= 1.5x faster than the joblib peer, >= 1.7x than the sequential loop")


if __name__ == "__main__":
    with record("train", "Training: `benchmarks/train.py`"):
        main()
