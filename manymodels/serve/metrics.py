"""Prometheus metrics of the endpoint, and exact per-model statistics for the V2 stats route.

Every figure is a prometheus-client metric that is updated where the event happens (the
middleware of :mod:`.observe` for requests, the data plane for rows and models, the
registry for the session cache). With several uvicorn workers, prometheus-client's
multiprocess mode keeps each value in a memory-mapped file per worker, so ``/metrics``
sums every worker and nothing is lost, not even when a worker is killed.

Label cardinality stays bounded however many models a bundle has: per-model series are
kept for every model that was hit (a bundle holds finitely many), but ``/metrics``
exposes only the ``top_models`` busiest (by requests, summed over workers) and folds
the rest into ``model="other"`` (see :class:`FoldedCollector`). Full per-model detail,
for every model, is on ``GET /v2/models/{name}/stats`` (:class:`ModelStats`).

Names follow the Prometheus conventions (``_total`` counters, ``_seconds`` and
``_bytes`` units) and cover what Triton and MLServer report (request success/failure,
inference count, request duration) and what SageMaker multi-model endpoints report
(cache hits, model loading time, loaded model count), plus evictions and bytes.
"""

from __future__ import annotations

import math
import os
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

__all__ = ["METRICS_DIR_ENV", "FoldedCollector", "Metrics", "ModelStats", "multiprocess_dir",
           "render_metrics"]

METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
OTHER = "other"
#: Request latency buckets (seconds): from a cached single-row score to a cold large batch.
LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0)
LOAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                5.0, 10.0)
#: Metric families whose ``model`` label is folded to the busiest models.
PER_MODEL = ("manymodels_model_requests", "manymodels_model_rows",
             "manymodels_model_failures", "manymodels_model_duration_seconds")
#: The per-model latency buckets in nanoseconds (what the data plane measures).
LATENCY_BUCKETS_NS = tuple(round(b * 1e9) for b in LATENCY_BUCKETS)
RANKED_BY = "manymodels_model_requests"


def multiprocess_dir() -> str | None:
    """The multiprocess directory in use (set before prometheus-client is imported)."""
    # prometheus-client's multiprocess mode only with several workers
    from prometheus_client import values

    path = os.environ.get(METRICS_DIR_ENV)
    multi = values.ValueClass.__name__ != "MutexValue"
    return path if (path and multi) else None


class Metrics:
    """Every Prometheus metric of one application.

    The per-request figures (requests, latency, per-model counts, fallbacks, cache hits)
    are plain integers in this process, read by ``/metrics`` when it is scraped: an
    update is a dictionary lookup and a few additions, no lock (they all happen on the
    event loop). With several workers they also go to prometheus-client's
    memory-mapped values, so that every worker's counts are summed. Rare events (model
    loads, evictions, gauges, the prediction log) always go through prometheus-client.
    """

    def __init__(self, top_models: int = 50) -> None:
        disable_created_metrics()  # no *_created series: they double the output for nothing
        self.top_models = top_models
        self.multiprocess = multiprocess_dir() is not None
        self.registry = CollectorRegistry(auto_describe=True)
        self.sources: list[tuple[str, ModelStats]] = []
        reg = self.registry
        self.cache_evictions = Counter("manymodels_cache_evictions", "Models evicted to stay "
                                       "within the memory budget", registry=reg)
        self.load_failures = Counter("manymodels_model_load_failures", "Model loads that "
                                     "failed", registry=reg)
        self.load_seconds = Histogram("manymodels_model_load_seconds", "Time to create a "
                                      "model's session", buckets=LOAD_BUCKETS, registry=reg)
        self.cache_models = Gauge("manymodels_cache_models", "Models resident in the session "
                                  "cache (summed over workers)", registry=reg,
                                  multiprocess_mode="livesum")
        self.cache_bytes = Gauge("manymodels_cache_resident_bytes", "Estimated resident bytes "
                                 "of the cached models (summed over workers)", registry=reg,
                                 multiprocess_mode="livesum")
        self.cache_budget = Gauge("manymodels_cache_budget_bytes", "Memory budget of the "
                                  "session cache, 0 when unbounded (summed over workers)",
                                  registry=reg, multiprocess_mode="livesum")
        self.log_rows = Counter("manymodels_prediction_log_rows", "Rows in completed "
                                "prediction-log files", registry=reg)
        self.log_dropped = Counter("manymodels_prediction_log_dropped_rows", "Rows not logged: "
                                   "the log queue was full or a write failed (full disk)",
                                   registry=reg)
        self.auth_denied = Counter("manymodels_auth_denied", "Requests refused by "
                                   "authentication (401), scope (403) or rate limit (429), "
                                   "by reason", ["reason"], registry=reg)
        self.rollout_step = Gauge("manymodels_rollout_step", "Step of the running rollout: "
                                  "0 the mirror phase, 1.. the traffic steps, -1 none",
                                  registry=reg, multiprocess_mode="max")
        self.rollout_step.set(-1)
        self.rollout_verdicts = Counter("manymodels_rollout_verdicts", "Rollout phase "
                                        "judgements by verdict (wait, pass, fail)",
                                        ["verdict"], registry=reg)
        self._routes: dict[tuple[str, int, str], list[float]] = {}
        self.shared = _SharedHot(reg) if self.multiprocess else None

    def watch(self, deployment: str, stats: ModelStats) -> None:
        """Expose the per-model figures of ``stats`` (one per registry / deployment)."""
        self.sources = [(d, s) for d, s in self.sources if d != deployment]
        self.sources.append((deployment, stats))

    # -- hot path ----------------------------------------------------------------------------
    def observe_request(self, route: str, status: int, deployment: str, seconds: float) -> None:
        """Count one HTTP request and its latency: [count, sum, bucket counts...]."""
        key = (route, status, deployment)
        cell = self._routes.get(key)
        if cell is None:
            cell = self._routes[key] = [0, 0.0] + [0] * (len(LATENCY_BUCKETS) + 1)
        cell[0] += 1
        cell[1] += seconds
        cell[2 + bisect_left(LATENCY_BUCKETS, seconds)] += 1
        if self.shared is not None:
            self.shared.observe_request(key, seconds)

    # -- rare events -------------------------------------------------------------------------
    def model_loaded(self, seconds: float) -> None:
        self.load_seconds.observe(seconds)

    def cache_state(self, models: int, resident: int, budget: int | None,
                    new_evictions: int) -> None:
        self.cache_models.set(models)
        self.cache_bytes.set(resident)
        self.cache_budget.set(budget or 0)
        if new_evictions:
            self.cache_evictions.inc(new_evictions)

    # -- exposition (one process) ------------------------------------------------------------
    def hot_families(self) -> Iterator[Metric]:
        """The per-request figures of this process as metric families."""
        requests = CounterMetricFamily("manymodels_requests", REQUESTS_DOC,
                                       labels=["route", "status", "deployment"])
        latency = HistogramMetricFamily("manymodels_request_duration_seconds", LATENCY_DOC,
                                        labels=["route", "status", "deployment"])
        for (route, status, deployment), cell in list(self._routes.items()):
            labels = [route, str(status), deployment]
            requests.add_metric(labels, cell[0])
            latency.add_metric(labels, _cumulative(cell[2:]), cell[1])
        yield requests
        yield latency
        per_model = {name: CounterMetricFamily(name, doc, labels=["deployment", "model"])
                     for name, doc in MODEL_DOCS.items()}
        fallback = CounterMetricFamily("manymodels_fallback_rows", FALLBACK_DOC,
                                       labels=["deployment", "level"])
        duration = HistogramMetricFamily("manymodels_model_duration_seconds",
                                         MODEL_LATENCY_DOC, labels=["deployment", "model"])
        hits = misses = 0
        for deployment, stats in list(self.sources):
            for name, f in list(stats.by_model.items()):
                labels = [deployment, name]
                per_model["manymodels_model_requests"].add_metric(labels, f.success)
                per_model["manymodels_model_rows"].add_metric(labels, f.rows)
                if f.fail:
                    per_model["manymodels_model_failures"].add_metric(labels, f.fail)
                if f.success:
                    duration.add_metric(labels, _cumulative(f.buckets), f.success_ns / 1e9)
            for level, rows in sorted(stats.levels.items()):
                fallback.add_metric([deployment, str(level)], rows)
            hits += stats.hits
            misses += stats.misses
        yield from per_model.values()
        yield duration
        yield fallback
        yield CounterMetricFamily("manymodels_cache_hits", HITS_DOC, value=hits)
        yield CounterMetricFamily("manymodels_cache_misses", MISSES_DOC, value=misses)

    def collect_process(self) -> Iterator[Metric]:
        yield from self.hot_families()
        yield from self.registry.collect()


def _cumulative(counts: Iterable[float]) -> list[tuple[str, float]]:
    """Prometheus' ``le`` buckets from counts per bucket (the last one is ``+Inf``)."""
    cumulative, buckets = 0.0, []
    for bound, count in zip((*LATENCY_BUCKETS, math.inf), counts, strict=True):
        cumulative += count
        buckets.append((floatToGoString(bound), cumulative))
    return buckets


REQUESTS_DOC = "HTTP requests by route, status and deployment"
LATENCY_DOC = "HTTP request latency (first byte in to last byte out of the application)"
MODEL_DOCS = {"manymodels_model_requests": "Requests scored per model (the busiest models; "
              "the rest as model=\"other\")",
              "manymodels_model_rows": "Rows scored per model",
              "manymodels_model_failures": "Requests naming a model that failed (bad input, "
              "scoring error)"}
MODEL_LATENCY_DOC = ("Time to score one request's rows with a model (the busiest models; "
                     "the rest as model=\"other\")")
FALLBACK_DOC = "Rows served by a fallback model, by its level in the fallback chain"
HITS_DOC = "Model lookups answered from the session cache"
MISSES_DOC = "Model lookups that had to wait for a load"


class _SharedHot:
    """The per-request figures as prometheus-client metrics, for multiprocess mode (their
    values live in memory-mapped files that ``/metrics`` sums over workers)."""

    def __init__(self, reg: CollectorRegistry) -> None:
        self.requests = Counter("manymodels_requests", REQUESTS_DOC,
                                ["route", "status", "deployment"], registry=reg)
        self.latency = Histogram("manymodels_request_duration_seconds", LATENCY_DOC,
                                 ["route", "status", "deployment"], buckets=LATENCY_BUCKETS,
                                 registry=reg)
        by_model = ["deployment", "model"]
        self.model_requests = Counter("manymodels_model_requests",
                                      MODEL_DOCS["manymodels_model_requests"], by_model,
                                      registry=reg)
        self.model_rows = Counter("manymodels_model_rows", MODEL_DOCS["manymodels_model_rows"],
                                  by_model, registry=reg)
        self.model_failures = Counter("manymodels_model_failures",
                                      MODEL_DOCS["manymodels_model_failures"], by_model,
                                      registry=reg)
        self.model_duration = Histogram("manymodels_model_duration_seconds",
                                        MODEL_LATENCY_DOC, by_model, buckets=LATENCY_BUCKETS,
                                        registry=reg)
        self.fallback_rows = Counter("manymodels_fallback_rows", FALLBACK_DOC,
                                     ["deployment", "level"], registry=reg)
        self.hit = Counter("manymodels_cache_hits", HITS_DOC, registry=reg).inc
        self.miss = Counter("manymodels_cache_misses", MISSES_DOC, registry=reg).inc
        self._routes: dict[tuple[str, int, str], tuple[Any, Any]] = {}
        self._models: dict[tuple[str, str], tuple[Any, Any, Any]] = {}

    def observe_request(self, key: tuple[str, int, str], seconds: float) -> None:
        children = self._routes.get(key)
        if children is None:
            labels = (key[0], str(key[1]), key[2])
            children = self._routes[key] = (self.requests.labels(*labels),
                                            self.latency.labels(*labels))
        children[0].inc()
        children[1].observe(seconds)

    def count_model(self, deployment: str, name: str, rows: int, fallback_rows: int,
                    level: int, ns: int) -> None:
        children = self._models.get((deployment, name))
        if children is None:
            children = self._models[(deployment, name)] = (
                self.model_requests.labels(deployment, name),
                self.model_rows.labels(deployment, name),
                self.model_duration.labels(deployment, name))
        children[0].inc()
        children[1].inc(rows)
        children[2].observe(ns / 1e9)
        if fallback_rows:
            self.fallback_rows.labels(deployment, str(level)).inc(fallback_rows)

    def count_failure(self, deployment: str, name: str) -> None:
        self.model_failures.labels(deployment, name).inc()


class _Figures:
    __slots__ = ("success", "success_ns", "fail", "fail_ns", "rows", "fallback_rows",
                 "last_ns", "buckets")

    def __init__(self) -> None:
        self.success = self.success_ns = self.fail = self.fail_ns = 0
        self.rows = self.fallback_rows = self.last_ns = 0
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        """Successful requests per latency bucket (not cumulative; the last is +Inf)."""


class ModelStats:
    """Exact per-model counts and durations of this worker (one per registry).

    They feed the V2 statistics route (never folded, every model) and, in a single
    process, ``/metrics``. An update is a dictionary lookup and a few additions.
    """

    def __init__(self) -> None:
        self.by_model: dict[str, _Figures] = {}
        self.levels: dict[int, int] = {}
        self.hits = self.misses = 0

    def count_hit(self) -> None:
        self.hits += 1

    def count_miss(self) -> None:
        self.misses += 1

    def success(self, name: str, rows: int, fallback_rows: int, ns: int, level: int) -> None:
        f = self.by_model.get(name)
        if f is None:
            f = self.by_model[name] = _Figures()
        f.success += 1
        f.success_ns += ns
        f.buckets[bisect_left(LATENCY_BUCKETS_NS, ns)] += 1
        f.rows += rows
        f.last_ns = time.time_ns()
        if fallback_rows:
            f.fallback_rows += fallback_rows
            self.levels[level] = self.levels.get(level, 0) + fallback_rows

    def failure(self, name: str, ns: int) -> None:
        f = self.by_model.get(name)
        if f is None:
            f = self.by_model[name] = _Figures()
        f.fail += 1
        f.fail_ns += ns
        f.last_ns = time.time_ns()

    def model_stats(self, name: str, version: str) -> dict[str, Any]:
        """One entry of Triton's statistics extension (``model_stats``)."""
        f = self.by_model.get(name) or _Figures()
        zero = {"count": 0, "ns": 0}
        return {
            "name": name, "version": version, "last_inference": f.last_ns // 1_000_000,
            "inference_count": f.rows, "execution_count": f.success,
            "inference_stats": {"success": {"count": f.success, "ns": f.success_ns},
                                "fail": {"count": f.fail, "ns": f.fail_ns},
                                "queue": zero, "compute_input": zero,
                                "compute_infer": {"count": f.success, "ns": f.success_ns},
                                "compute_output": zero},
            "batch_stats": [],
            "fallback_rows": f.fallback_rows, "pid": os.getpid(),
        }

    def names(self) -> list[str]:
        return list(self.by_model)


# -- exposition ------------------------------------------------------------------------------
def _family_name(metric: Metric) -> str:
    return metric.name[:-6] if metric.name.endswith("_total") else metric.name


class FoldedCollector(Collector):
    """The families of ``source``, with per-model series beyond the busiest folded.

    The ``top`` models with the most requests (summed over deployments) keep their own
    series; every other model's values are summed into ``model="other"`` (per
    deployment), so the number of series is at most ``top + 1`` per family and
    deployment however many models were hit. Sums over ``model`` stay exact.
    When a model enters the top, its own series appears with its full count and
    ``other`` drops by as much (Prometheus reads that as a counter reset of ``other``).
    """

    def __init__(self, source: Callable[[], Iterable[Metric]], top: int) -> None:
        self.source = source
        self.top = top

    def collect(self) -> Iterator[Metric]:
        families = list(self.source())
        by_name = {_family_name(m): m for m in families}
        ranked = by_name.get(RANKED_BY)
        keep = _busiest(ranked, self.top) if ranked is not None else set()
        for metric in families:
            if _family_name(metric) in PER_MODEL:
                yield _fold(metric, keep)
            else:
                yield metric


def _busiest(metric: Metric, top: int) -> set[str]:
    counts: dict[str, float] = {}
    for sample in metric.samples:
        if sample.name.endswith("_total"):
            model = sample.labels.get("model", "")
            counts[model] = counts.get(model, 0.0) + sample.value
    counts.pop(OTHER, None)
    ranked = sorted(counts, key=lambda m: (-counts[m], m))
    return set(ranked[:top])


def _fold(metric: Metric, keep: set[str]) -> Metric:
    out = Metric(metric.name, metric.documentation, metric.type, metric.unit)
    folded: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for sample in metric.samples:
        if sample.name.endswith("_created"):
            continue  # per series, meaningless once folded
        model = sample.labels.get("model", "")
        labels = dict(sample.labels)
        if model not in keep:
            labels["model"] = OTHER
        key = (sample.name, tuple(sorted(labels.items())))
        folded[key] = folded.get(key, 0.0) + sample.value
    for (name, label_items), value in folded.items():
        out.add_sample(name, dict(label_items), value)
    return out


def _clear_dead_workers(path: str) -> None:
    """Drop the live-gauge files of worker processes that no longer exist (a worker that
    crashed and was replaced would otherwise be counted forever)."""
    # prometheus-client's multiprocess mode only with several workers
    from prometheus_client import multiprocess

    for file in Path(path).glob("gauge_live*_*.db"):
        try:
            pid = int(file.stem.rsplit("_", 1)[1])
        except ValueError:
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            multiprocess.mark_process_dead(pid, path)
        except PermissionError:
            pass


def render_metrics(metrics: Metrics) -> bytes:
    """The text exposition of ``/metrics``: this process, or every worker's files."""
    path = multiprocess_dir()
    if path is None:
        source: Callable[[], Iterable[Metric]] = metrics.collect_process
    else:
        # prometheus-client's multiprocess mode only with several workers
        from prometheus_client import multiprocess

        _clear_dead_workers(path)
        collector = multiprocess.MultiProcessCollector(None, path=path)  # type: ignore[no-untyped-call]
        source = collector.collect
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FoldedCollector(source, metrics.top_models))
    return generate_latest(registry)
