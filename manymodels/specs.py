"""Pydantic models of the YAML catalogues (``segmenters/``, ``trainers/``, ``serving/``).

Specs are resolved by name (``store_brand`` → ``segmenters/store_brand.yaml``) or by
path, validated once here, and any problem becomes one :class:`SpecError` line that names
the file and the field.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from manymodels.errors import SpecError

__all__ = [
    "AnomalySpec",
    "CandidateSpec",
    "ForecastSpec",
    "RetrainSpec",
    "SegmenterSpec",
    "TrainerSpec",
    "ValidationSpec",
    "catalogue_dir",
    "load_segmenter",
    "load_spec",
    "load_trainer",
    "spec_hash",
]

REGRESSION_METRICS = ("rmse", "mae", "wape", "mape")
FORECAST_METRICS = ("mase", "smape", "wape", "rmse")
#: Statistical methods a forecasting trainer may add to its lag models.
FORECAST_METHODS = ("naive", "seasonal_naive", "drift", "ets", "theta", "croston")
#: ``forecast.methods`` by default, simplest first; without a season (season length 1)
#: drift takes seasonal naive's place.
DEFAULT_METHODS = ("naive", "seasonal_naive", "ets", "theta")
NO_SEASON_METHODS = ("naive", "drift", "ets", "theta")
CLASSIFICATION_METRICS = ("logloss", "auc", "accuracy")
ALGORITHMS = ("lightgbm", "ridge", "logistic", "decision_tree", "random_forest", "mean",
              "hist_gradient_boosting")

#: Rows a segment needs before a candidate family is fitted on it, unless the spec says.
DEFAULT_MIN_ROWS = {"lightgbm": 60, "random_forest": 60, "hist_gradient_boosting": 60}


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AnomalySpec(_Spec):
    """Removal of target outliers within each segment before training."""

    method: Literal["none", "iqr", "zscore"] = "none"
    """``iqr`` drops rows outside [Q1 - k·IQR, Q3 + k·IQR]; ``zscore`` drops |z| > k."""
    threshold: float = Field(3.0, gt=0)
    """k above: 1.5–3 for IQR, 3–4 for z-scores."""


class SegmenterSpec(_Spec):
    """How a table is partitioned into segments."""

    name: str = "segmenter"
    """Name shown in reports and MLflow params."""
    columns: list[str] = Field(min_length=1)
    """Segment columns; the segment key is their values, e.g. ``[store, brand]``."""
    min_rows: int = Field(30, ge=2)
    """Segments with fewer rows than this are treated as small."""
    small_segments: Literal["pool", "fallback", "skip"] = "pool"
    """``pool``: one shared model for all small segments; ``fallback``: served by the
    global model; ``skip``: not trained and not routed (unknown at serving time)."""
    max_segments: int = Field(5000, ge=1)
    """Refuse partitions with more segments than this (guards against ID columns)."""
    anomalies: AnomalySpec = AnomalySpec()
    """Target outlier removal inside each segment (off by default)."""
    levels: list[list[str]] | None = None
    """Coarser levels to compare each segment against, e.g. ``[[store, brand], [brand], []]``.
    ``None`` means ``[columns, []]``: the segment itself, then the global model."""
    gate: bool = True
    """Route a segment to a coarser level's model unless its own model beats it by
    ``min_gain``. Off keeps every segment on its own model."""
    gate_rule: Literal["one_se", "min_gain"] = "one_se"
    """``one_se``: on the segment's validation folds, the coarsest level (or blend) whose
    mean fold metric is within one standard error of the best; ``min_gain``: a finer
    level must beat a coarser one by ``min_gain`` on all held-out rows together."""
    min_gain: float = Field(0.02, ge=0)
    """Relative improvement the segment's own model needs over a coarser one
    (``gate_rule: min_gain``)."""
    blend: bool = True
    """Also consider ``w · own + (1 − w) · coarser`` (w in 0.25, 0.5, 0.75) for each
    segment, where neither level wins outright (regression, ``gate_rule: one_se``)."""
    pooled_key_max_categories: int = Field(100, ge=0)
    """A pooled or global model sees a segment column it pools over (e.g. ``store``) as a
    one-hot feature only if the column has at most this many values."""

    @field_validator("columns")
    @classmethod
    def _unique_columns(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"columns repeat a name: {value}")
        return value

    @model_validator(mode="after")
    def _levels_nest(self) -> SegmenterSpec:
        if self.levels is None:
            return self
        levels = self.levels
        if not levels or levels[0] != self.columns:
            raise ValueError(f"levels must start with the segment columns {self.columns}")
        if levels[-1] != []:
            raise ValueError("levels must end with [] (the global model)")
        for finer, coarser in itertools.pairwise(levels):
            if not set(coarser) < set(finer):
                raise ValueError(f"level {coarser} is not strictly coarser than {finer}")
        return self

    @property
    def resolved_levels(self) -> list[list[str]]:
        return [list(lv) for lv in self.levels] if self.levels else [list(self.columns), []]


class CandidateSpec(_Spec):
    """One candidate model family, with fixed params or a small grid."""

    name: str | None = None
    """Label in reports; defaults to the algorithm (plus grid values)."""
    algorithm: str
    """One of: lightgbm, ridge, logistic, decision_tree, random_forest, mean,
    hist_gradient_boosting."""
    params: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments of the estimator."""
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    """Each combination becomes a candidate of its own (merged over ``params``)."""
    min_rows: int | None = Field(None, ge=1)
    """Segments (or pools) with fewer rows do not fit this candidate. Default: 60 for
    lightgbm, random_forest and hist_gradient_boosting (they cannot be fitted
    meaningfully on a few dozen rows), none for the others."""

    @field_validator("algorithm")
    @classmethod
    def _known_algorithm(cls, value: str) -> str:
        if value not in ALGORITHMS:
            raise ValueError(f"unknown algorithm '{value}'; choose one of {', '.join(ALGORITHMS)}")
        return value

    @property
    def resolved_min_rows(self) -> int:
        if self.min_rows is not None:
            return self.min_rows
        return DEFAULT_MIN_ROWS.get(self.algorithm, 0)

    def expand(self) -> list[tuple[str, dict[str, Any]]]:
        """(label, params) for every grid point."""
        if not self.grid:
            return [(self.name or self.algorithm, dict(self.params))]
        keys = sorted(self.grid)
        out = []
        for values in itertools.product(*(self.grid[k] for k in keys)):
            params = {**self.params, **dict(zip(keys, values, strict=True))}
            suffix = ",".join(f"{k}={v}" for k, v in zip(keys, values, strict=True))
            out.append((f"{self.name or self.algorithm}[{suffix}]", params))
        return out


class ValidationSpec(_Spec):
    """How each candidate is scored before the winner is chosen."""

    method: Literal["auto", "rolling", "time", "shuffle", "kfold"] = "auto"
    """``rolling``: expanding-window folds, each tested on rows later than all it trained
    on; ``time``: one holdout of the latest rows; ``shuffle``: one shuffled holdout;
    ``kfold``: shuffled k-fold. ``auto``: ``rolling`` when a time column is named, else
    ``shuffle`` for segments of ``kfold_below`` rows or more and ``kfold`` under it."""
    holdout: float = Field(0.2, gt=0, lt=0.9)
    """Fraction of a segment's rows held out (per fold for ``rolling``; latest rows for
    ``time``); never fewer than 2 rows per fold for ``rolling``."""
    folds: int = Field(3, ge=2, le=20)
    """Folds for ``rolling`` (fewer when a segment is short) and ``kfold``."""
    kfold_below: int = Field(200, ge=2)
    """With ``auto`` and no time column, segments under this many rows use k-fold."""


class RetrainSpec(_Spec):
    """How ``manymodels retrain`` decides what to refit and what to replace."""

    refit_share: float = Field(0.2, gt=0, le=1)
    """A pooled or global model is kept as it is while less than this share of its rows
    changed (rows of new or changed segments, and of segments gone from the data), and
    refitted from this share on: refitting the global model costs about a fifth of a
    full run, too much to pay for every small change."""
    tolerance: float = Field(0.0, ge=0)
    """A retrained model replaces the current one unless its metric on the segment's
    latest holdout is worse by more than this share (relative); the same tolerance
    applies to the bundle as a whole before ``--promote`` moves the alias."""
    max_age: int | None = Field(None, ge=1)
    """Forecasting (the refit policy): a series whose route was fitted more than this
    many periods (of the series' frequency) before its newest period is refitted; by
    default age alone never refits."""
    error_growth: float | None = Field(0.2, ge=0)
    """Forecasting (the refit policy): a series is refitted when the champion's error on
    its newest periods (at most a horizon of them, all after the periods it was fitted
    on) exceeds its backtest error by more than this share; ``null``: error never refits.
    A series not refitted keeps its models and only its origin moves."""


class ForecastSpec(_Spec):
    """How a ``task: forecast`` trainer builds features, backtests and chooses methods."""

    lags: list[int] | None = None
    """Lags of the (transformed) target; default 1..season length (at least 1..4), and for
    seasons over 24 periods 1..4 plus the season."""
    rolling: list[int] | None = None
    """Windows of rolling means over lagged values; default one season (4 without one)."""
    differences: int = Field(1, ge=0, le=1)
    """Difference the target before the lag models see it (1 lets them follow a trend)."""
    scale: bool = True
    """Standardise each series before the lag models see it, so one pooled or global model
    serves series of any size; undone after prediction."""
    scale_on: Literal["levels", "differences"] = "levels"
    """What ``scale`` standardises, per series on its periods before the cutoff:
    ``levels`` (mean and standard deviation of the values, then differenced) or
    ``differences`` (differenced first, then standardised by the mean and standard
    deviation of the differences, mlforecast's ``Differences`` then ``LocalStandardScaler``,
    so every series' changes are on one unit scale). With ``differences: 0`` both are the
    levels' standardisation."""
    strategy: Literal["recursive", "direct"] = "recursive"
    """``recursive``: one model, each step's prediction fed back as the next lag (forecasts
    any number of steps up to ``max_horizon``). ``direct``: one model for all steps of the
    horizon, the step number one of its features and every step predicted from the
    origin's lags (nothing fed back; one model call per forecast; only ``horizon`` steps)."""
    n_windows: int = Field(3, ge=1, le=50)
    """Rolling-origin backtest windows of ``horizon`` steps, the same for every method."""
    step_size: int | None = Field(None, ge=1)
    """Periods between backtest origins; default the horizon."""
    gaps: Literal["refuse", "zero", "ffill", "interpolate"] = "refuse"
    """Missing periods inside a series: refused with the series named, or filled."""
    known_future: list[str] = Field(default_factory=list)
    """Covariates known ahead (price, promotion): a forecast needs them for every step."""
    methods: list[str] | None = None
    """Statistical methods compared with the lag models for every series: naive,
    seasonal_naive, drift, ets (AutoETS picks the form), theta, croston (intermittent
    demand). The fitted ones are fitted by statsforecast and served as ONNX graphs.
    Default: naive, seasonal_naive, ets, theta; without a season (season length 1)
    drift takes seasonal naive's place (see :meth:`methods_for`)."""
    ets_search: Literal["once", "every_fit"] = "once"
    """How often ``ets`` runs AutoETS's search over forms (error, trend, damping,
    season), most of its fit time. ``once``: per series, on every period (the model
    exported when the series chooses ETS); the backtest windows estimate that form's
    parameters on their own periods, so they know which form suits the whole series but
    not its values. ``every_fit``: the first backtest window searches on its own periods
    and the exported model searches again on every period (about half as much ETS time
    again)."""
    stat_windows: Literal["forward", "refit"] = "forward"
    """How the fitted statistical methods (ets, theta) meet the later backtest windows:
    ``forward`` moves the first window's parameters forward over the new periods
    (statsforecast's forward filter); ``refit`` estimates them again on each window's
    own periods (ets keeps its searched form), as the exported model is estimated on
    every period."""
    panel_margin: float | None = Field(0.5, ge=0)
    """Methods whose mean backtest error over the whole panel is more than this fraction
    above the best method's (``0.5``: half as large again) are left out of every series'
    choice: a few short windows of one series cannot tell that a method is poor for the
    whole panel. ``null`` lets every series choose among every method."""
    own_models: bool = True
    """Fit a lag model per series (the trainer's ridge candidates) besides the pooled and
    global ones."""
    blend: int = Field(3, ge=1, le=5)
    """Each series is forecast by the equal-weight mean of its ``blend`` methods with the
    lowest backtest error (1: its best method alone)."""
    static_keys: bool = True
    """Pooled and global lag models see the segment columns (at most
    ``pooled_key_max_categories`` values each) as categorical features."""
    max_horizon: int | None = Field(None, ge=1)
    """Longest forecast served; default ten horizons (recursive strategy), the horizon
    (direct strategy, which cannot go further)."""
    hierarchy: list[list[str]] | None = None
    """Coarser levels forecast as series of their own: each a subset of the segment
    columns, e.g. ``[[store], []]`` for store totals and the grand total of store × brand
    segments. An aggregate series is the sum of the segments it holds; its key holds
    ``*`` in the columns it sums over. Default: none, or the segmenter's coarser
    ``levels`` when ``reconcile`` is on."""
    reconcile: Literal["none", "bottom_up", "mint_shrink"] = "none"
    """Make the levels add up: ``bottom_up`` sums the segments' forecasts, ``mint_shrink``
    combines every level's forecast (MinT with a shrunk covariance of the backtest
    errors, by hierarchicalforecast). Fitted at training, applied when forecasting."""
    levels: list[int] = Field(default_factory=lambda: [80, 95])
    """Prediction interval levels in percent (``lo_80``/``hi_80`` ... in every output),
    calibrated on the backtest errors (split conformal); an empty list turns them off."""

    @field_validator("levels")
    @classmethod
    def _interval_levels(cls, value: list[int]) -> list[int]:
        bad = [v for v in value if not 1 <= v <= 99]
        if bad:
            raise ValueError(f"interval levels are percentages from 1 to 99, got {bad}")
        return sorted(set(value))

    def methods_for(self, season_length: int) -> list[str]:
        """The methods of a panel with this season: ``methods`` as given, else the
        defaults. Without a season, seasonal naive is naive again, and a random walk
        with drift is the benchmark a trend without a season needs (on M3 and M1 yearly
        it was the best single method)."""
        if self.methods is not None:
            return list(self.methods)
        return list(DEFAULT_METHODS if season_length > 1 else NO_SEASON_METHODS)

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return value
        bad = [m for m in value if m not in FORECAST_METHODS]
        if bad:
            raise ValueError(f"unknown method(s) {bad}; choose from {', '.join(FORECAST_METHODS)}")
        return value

    @field_validator("hierarchy")
    @classmethod
    def _distinct_levels(cls, value: list[list[str]] | None) -> list[list[str]] | None:
        if value is None:
            return value
        seen = [tuple(sorted(level)) for level in value]
        if len(set(seen)) != len(seen) or any(len(set(lv)) != len(lv) for lv in value):
            raise ValueError(f"hierarchy levels repeat a level or a column: {value}")
        return value

    @model_validator(mode="after")
    def _reconcile_fits(self) -> ForecastSpec:
        if self.reconcile != "none" and self.known_future:
            raise ValueError("reconcile needs forecasts without known_future covariates "
                             "(an aggregate series has no covariate of its own); drop "
                             "known_future or set reconcile: none")
        return self


class TrainerSpec(_Spec):
    """The candidate models fitted for every segment, and how the winner is chosen."""

    name: str = "trainer"
    """Name shown in reports and MLflow params."""
    target: str
    """Column to predict."""
    task: Literal["regression", "classification", "forecast"] = "regression"
    """Regression, (binary / multi-class) classification, or ``forecast``: the next
    ``horizon`` periods of every series (segment) from its own past."""
    time_column: str | None = None
    """Column that orders rows in time; enables the time-ordered holdout."""
    date_format: str | None = None
    """``strftime`` layout of a time column written as text in another layout than ISO
    8601, e.g. ``"%d/%m/%Y"``. Without it ISO dates are read, and a column whose dates
    read both day-first and month-first (``01/06/2025``) is refused as ambiguous."""
    duplicates: Literal["warn", "refuse"] = "warn"
    """Rows sharing a segment and a time value: ``warn`` trains on them and says how
    many there are; ``refuse`` stops with the count and the first one."""
    time_as_feature: bool = False
    """Also feed the time column to the models (trend); off by default."""
    features: list[str] | None = None
    """Feature columns; default: every column but the target, the segment columns and
    the time column."""
    exclude: list[str] = Field(default_factory=list)
    """Columns never used as features (IDs, leakage)."""
    metric: str = "rmse"
    """Selection metric: rmse, mae, wape, mape (regression); logloss, auc, accuracy
    (classification); mase (the default for forecasting), smape, wape, rmse (forecast)."""
    validation: ValidationSpec = ValidationSpec()
    """Validation folds."""
    selection: Literal["one_se", "best"] = "one_se"
    """``one_se``: the simplest candidate whose mean fold metric is within one standard
    error of the best (mean < ridge / logistic < decision tree < random forest <
    LightGBM); ``best``: the best mean."""
    candidates: list[CandidateSpec] = Field(default_factory=list)
    """Candidate families; every grid point is fitted for every segment (for forecasting:
    the lag models; default a global LightGBM and ridge models)."""
    seed: int = 0
    """Seed of every random choice (split, estimators)."""
    parity_tolerance: float = Field(1e-3, gt=0)
    """Max abs difference between ONNX and native predictions on the holdout rows
    (relative to the target's scale for regression; absolute for probabilities)."""
    segment_timeout_s: float = Field(300.0, gt=0)
    """A segment whose candidates take longer than this is recorded as failed."""
    missing: Literal["native", "impute"] = "native"
    """Missing numeric values at scoring time: ``native`` scores them where the exported
    model handles NaN as its native self does (measured at export; LightGBM, the mean
    baseline) and refuses the row elsewhere; ``impute`` fills them (in training too) with
    each model's training median, stored in the manifest."""
    retrain: RetrainSpec = RetrainSpec()
    """Incremental retraining (``manymodels retrain``); changing it refits nothing."""
    horizon: int | None = Field(None, ge=1)
    """Periods to forecast (``task: forecast``)."""
    freq: str | None = None
    """Period of the time column: a pandas alias (``W-SAT``, ``MS``, ``QS``, ``D``) or
    ``int`` for integer periods; inferred from the data by default."""
    season_length: int | None = Field(None, ge=1)
    """Periods in a season; default from ``freq`` (52 weekly, 12 monthly, 4 quarterly,
    7 daily, 1 for integer periods)."""
    forecast: ForecastSpec = ForecastSpec()
    """Features, backtests and methods of ``task: forecast``."""

    @field_validator("candidates")
    @classmethod
    def _some_candidates(cls, value: list[CandidateSpec], info: ValidationInfo
                         ) -> list[CandidateSpec]:
        if not value and info.data.get("task") != "forecast":
            raise PydanticCustomError("too_short", "List should have at least 1 item")
        return value

    @model_validator(mode="before")
    @classmethod
    def _forecast_metric(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("task") == "forecast" and "metric" not in data:
            return {**data, "metric": "mase"}
        return data

    @model_validator(mode="after")
    def _metric_fits_task(self) -> TrainerSpec:
        if self.task == "forecast":
            return self._forecast_fits()
        allowed = REGRESSION_METRICS if self.task == "regression" else CLASSIFICATION_METRICS
        if self.metric not in allowed:
            raise ValueError(f"metric '{self.metric}' does not fit task '{self.task}'; "
                             f"choose one of {', '.join(allowed)}")
        bad = [c.algorithm for c in self.candidates
               if (self.task == "regression" and c.algorithm == "logistic")
               or (self.task == "classification" and c.algorithm == "ridge")]
        if bad:
            raise ValueError(f"candidate algorithm(s) {bad} do not fit task '{self.task}'")
        return self

    def _forecast_fits(self) -> TrainerSpec:
        if self.horizon is None:
            raise ValueError("task: forecast needs a horizon (periods to forecast)")
        if self.time_column is None:
            raise ValueError("task: forecast needs a time_column")
        if self.metric not in FORECAST_METRICS:
            raise ValueError(f"metric '{self.metric}' does not fit task 'forecast'; "
                             f"choose one of {', '.join(FORECAST_METRICS)}")
        bad = [c.algorithm for c in self.candidates if c.algorithm not in ("lightgbm", "ridge")]
        if bad:
            raise ValueError(f"forecast lag models are lightgbm or ridge, not {bad}")
        return self


_S = TypeVar("_S", bound=BaseModel)

_KIND_DIRS = {"segmenter": "segmenters", "trainer": "trainers", "serving": "serving"}


def catalogue_dir(kind: str) -> Path:
    """Where named specs of ``kind`` live: ``$MANYMODELS_HOME/<dir>`` or ``./<dir>``,
    falling back to the catalogue shipped next to the package source."""
    folder = _KIND_DIRS[kind]
    home = os.environ.get("MANYMODELS_HOME")
    candidates = [Path(home) / folder] if home else []
    candidates += [Path.cwd() / folder, Path(__file__).resolve().parent.parent / folder]
    for path in candidates:
        if path.is_dir():
            return path
    return candidates[-1]


def _resolve(kind: str, name_or_path: str | os.PathLike[str]) -> Path:
    text = os.fspath(name_or_path)
    path = Path(text)
    if path.suffix in (".yaml", ".yml") or os.sep in text or path.is_file():
        if not path.is_file():
            raise SpecError(f"{kind} spec file {path} does not exist")
        return path
    folder = catalogue_dir(kind)
    for suffix in (".yaml", ".yml"):
        candidate = folder / f"{text}{suffix}"
        if candidate.is_file():
            return candidate
    known = sorted(p.stem for p in folder.glob("*.y*ml")) if folder.is_dir() else []
    raise SpecError(f"no {kind} spec named '{text}' in {folder} (known: {', '.join(known) or 'none'})")


def _format_validation_error(source: str, exc: ValidationError) -> str:
    problems = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        problems.append(f"{where}: {err['msg']}")
    return f"{source}: " + "; ".join(problems)


def load_spec(kind: str, model: type[_S], source: str | os.PathLike[str] | dict[str, Any] | _S) -> _S:
    """Load a spec of ``kind`` from a name, a path, a dict or an instance."""
    if isinstance(source, model):
        return source
    if isinstance(source, dict):
        data, label = source, f"{kind} spec"
    else:
        path = _resolve(kind, source)  # type: ignore[arg-type]
        label = str(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise SpecError(f"{path} is not valid YAML: {exc}") from None
        except UnicodeDecodeError:
            raise SpecError(f"{path} is not a YAML text file (it is not UTF-8 text)") from None
        except OSError as exc:
            raise SpecError(f"{path} cannot be read ({exc.strerror})") from None
        if not isinstance(data, dict):
            raise SpecError(f"{path} must hold a mapping of fields, not {type(data).__name__}")
        data.setdefault("name", path.stem)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise SpecError(_format_validation_error(label, exc)) from None


def load_segmenter(source: str | os.PathLike[str] | dict[str, Any] | SegmenterSpec) -> SegmenterSpec:
    return load_spec("segmenter", SegmenterSpec, source)


def load_trainer(source: str | os.PathLike[str] | dict[str, Any] | TrainerSpec) -> TrainerSpec:
    return load_spec("trainer", TrainerSpec, source)


def spec_hash(spec: BaseModel) -> str:
    """Short stable hash of a spec's content, stamped on every model it produced."""
    text = json.dumps(spec.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]
