"""Pack a training run into one bundle directory; inspect and validate bundles.

A *run* directory (``manymodels train``) holds every model the trainer exported. A
*bundle* is what gets deployed and registered: only the models the routing table uses,
a manifest of kind ``bundle``, an environment record, an MLflow ``MLmodel`` file whose
``python_function`` flavor loads the bundled copy of :mod:`manymodels.runtime`, and an
Azure ML ``score.py``. Every model is ONNX, so serving needs onnxruntime, numpy and
pandas and nothing the models were trained with.

Layout of a bundle::

    <out>/
      manifest.json        kind "bundle": routes, fallback chain, one entry per model
      models/<name>.onnx   only the models some route uses
      requirements.txt     exact serving requirements (onnxruntime, numpy, pandas)
      environment.json     Python version, serving and training package versions
      python_env.yaml      \\ MLflow environment files, so that ``mlflow models serve``
      conda.yaml           / can also build the environment itself
      MLmodel              python_function flavor, loader_module manymodels_runtime
      code/manymodels_runtime/   copy of manymodels.runtime (the one scoring code path)
      score.py             Azure ML online endpoint entry script (init / run)
      report.parquet       the run's per-segment training report (``manymodels report``)
      backtests.parquet    \\ forecasting runs: each series' backtest windows and recent
      history.parquet      / history, plotted by ``manymodels report``
"""

from __future__ import annotations

from ._inspect import (
    BundleSummary,
    ModelRow,
    SegmentRoute,
    inspect_bundle,
    segment_routes,
    selection_metric,
    summarise,
)
from ._pack import (
    RUNTIME_MODULE,
    SERVING_PACKAGES,
    TRAINING_PACKAGES,
    PackResult,
    environment_record,
    package_run,
)
from ._validate import BUNDLE_FILES, Problem, ValidationReport, validate_bundle

__all__ = [
    "BUNDLE_FILES",
    "RUNTIME_MODULE",
    "SERVING_PACKAGES",
    "TRAINING_PACKAGES",
    "BundleSummary",
    "ModelRow",
    "PackResult",
    "Problem",
    "SegmentRoute",
    "ValidationReport",
    "environment_record",
    "inspect_bundle",
    "package_run",
    "segment_routes",
    "selection_metric",
    "summarise",
    "validate_bundle",
]
