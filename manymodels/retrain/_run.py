"""``manymodels retrain``: refit what changed, keep the rest byte for byte, promote if no worse.

One call, in order: open the champion (a bundle directory or ``models:/NAME@ALIAS``),
prepare and fingerprint the new data, plan (:mod:`._plan`), then under the model's lock
fit the plan's part through :func:`manymodels.training.train` (resumable, :mod:`._state`),
put every retrained segment's challenger against its current model (:mod:`._merge`),
write the merged run directory, pack it, register it, and with ``promote`` move the
alias once ``validate`` passes and the bundle is no worse than the champion on the new
data. Each part is timed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from manymodels.bundle import package_run, validate_bundle
from manymodels.candidates import score_metric
from manymodels.data import read_table
from manymodels.engine import default_jobs, start_workers
from manymodels.errors import BundleError, SpecError
from manymodels.fit import warm_worker
from manymodels.prepare import PreparedData, prepare_data
from manymodels.promotions import state_dir as default_state_dir
from manymodels.registry import (
    find_version,
    parse_models_uri,
    promote,
    register_bundle,
    resolve_bundle,
    resolve_version,
    seed_cache,
)
from manymodels.results import TrainResult
from manymodels.rundir import new_run_id
from manymodels.runtime import Bundle, Manifest, parse_manifest, read_manifest
from manymodels.specs import load_segmenter, load_trainer
from manymodels.training import train

from ._forecast import (
    SeriesOutcome,
    bundle_comparison,
    compare_series,
    merge_forecast,
    plan_forecast,
    retrain_report,
)
from ._lock import hold_lock
from ._merge import (
    Decision,
    Merged,
    compared_rows,
    decide,
    merge,
    relative_gain,
    training_report,
    write_merged_run,
)
from ._plan import Plan, make_plan
from ._result import BundleComparison, Outcome, RetrainResult
from ._reuse import RetrainReuse
from ._state import Attempt
from ._track import log_retrain

__all__ = ["BundleComparison", "Outcome", "RetrainResult", "retrain"]


@dataclass
class _Champion:
    root: Path
    bundle: Bundle
    registered: str | None  # name of the registered model it came from
    version: str | None  # its registered version


@contextmanager
def _open_champion(source: str, uri: str | None, throwaway: bool) -> Iterator[_Champion]:
    """The champion as a local directory; with ``throwaway`` a registry download goes to a
    temporary cache removed afterwards (a dry run leaves nothing on disk)."""
    with ExitStack() as stack:
        registered = version = None
        cache = None
        if source.startswith("models:"):
            parse_models_uri(source)
            found = resolve_version(source, uri)
            registered, version = found.name, found.version
            if throwaway:
                cache = stack.enter_context(tempfile.TemporaryDirectory(prefix="mm-retrain-"))
        root = resolve_bundle(source, uri, cache=cache)
        yield _Champion(root, Bundle(root), registered, version)


def _comparison(new_root: Path, champion: Bundle, prepared: PreparedData) -> BundleComparison:
    new = Bundle(new_root)
    trainer = prepared.trainer
    seg_cols = prepared.segmentation.columns
    picked: list[np.ndarray] = []
    segments = 0
    for seg in prepared.segmentation.segments:
        key = {c: seg.key[c] for c in seg_cols}
        old_served, new_served = _served(champion, key), _served(new, key)
        if old_served is None or new_served is None:
            continue
        if old_served != new_served:
            picked.append(compared_rows(seg, prepared.plan.expanding))
            segments += 1
    rows = np.concatenate(picked) if picked else np.zeros(0, dtype=int)
    tolerance = trainer.retrain.tolerance
    if len(rows) == 0:
        return BundleComparison(trainer.metric, 0, 0, None, None, tolerance)
    frame = prepared.frame.iloc[rows].reset_index(drop=True)
    truth = frame[trainer.target].to_numpy()
    values = []
    for bundle in (new, champion):
        scored = bundle.score_frame(frame)
        classes = np.asarray(scored.classes) if scored.classes is not None else None
        values.append(score_metric(trainer.metric, truth, scored.prediction,
                                   scored.probabilities, classes))
    return BundleComparison(trainer.metric, len(rows), segments, values[0], values[1], tolerance)


def _served(bundle: Bundle, key: dict[str, str]) -> tuple[Any, ...] | None:
    """What serves a segment key: its model's file (and its blend partner's and weight)."""
    name, _ = bundle.manifest.resolve(key)
    if name is None:
        return None
    models = bundle.manifest.models
    blend = bundle.manifest.blends.get(name)
    if blend is None:
        return (models[name].sha256,)
    return models[name].sha256, models[blend.partner].sha256, blend.weight


def _report(decisions: list[Decision], prepared: PreparedData) -> pd.DataFrame:
    metric = prepared.trainer.metric
    seg_cols = prepared.segmentation.columns
    rows = []
    for d in decisions:
        gain = None
        if d.outcome in ("replaced", "kept current") and d.metric_new is not None \
                and d.metric_current is not None:
            gain = relative_gain(d.metric_new, d.metric_current, metric)
        rows.append({**{f"key.{c}": d.change.key.get(c) for c in seg_cols},
                     "segment": d.change.segment,
                     "action": "retrain" if d.change.retrain else "keep",
                     "outcome": d.outcome, "reason": d.reason, "model": d.route,
                     "level": d.level, "status": d.status,
                     f"current_{metric}": d.metric_current, f"new_{metric}": d.metric_new,
                     "gain": gain, "compared_on": d.compared_on,
                     "compared_rows": d.compared_rows, "fit_seconds": d.fit_seconds,
                     "resumed": d.resumed})
    return pd.DataFrame(rows)


def _same_routes_and_files(new: dict[str, Any], champion: Bundle) -> bool:
    """The merged manifest ``new`` has the champion's routes and model files: the bundle
    it would make is the champion, so nothing is written."""

    def routes(raw: dict[str, Any]) -> frozenset[tuple[Any, ...]]:
        return frozenset((int(r["level"]), tuple(str(v) for v in r["key"]), str(r["model"]),
                          json.dumps(r.get("blend"), sort_keys=True))
                         for r in raw.get("routes", []))

    files = frozenset((str(n), str(e.get("sha256"))) for n, e in new.get("models", {}).items())
    return routes(new) == routes(champion.manifest.raw) and files == frozenset(
        (n, e.sha256) for n, e in champion.manifest.models.items())


class _Clock:
    """Wall time per part of the run."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._started = time.perf_counter()

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - started

    def total(self) -> dict[str, float]:
        return {**self.timings, "total": time.perf_counter() - self._started}


def retrain(data: str | os.PathLike[str] | pd.DataFrame, source: str | os.PathLike[str], *,
            name: str | None = None, out: str | os.PathLike[str] | None = None,
            runs: str | os.PathLike[str] = "runs", register: bool = False,
            promote: bool = False, alias: str = "champion", retrain_all: bool = False,
            dry_run: bool = False, segmenter: Any = None, trainer: Any = None,
            jobs: int | None = None, backend: str = "loky", scheduler: str | None = None,
            wait: float = 0.0, state_dir: str | os.PathLike[str] | None = None,
            uri: str | None = None, track: bool = True, progress: bool = False,
            say: Callable[[str], None] | None = None) -> RetrainResult:
    """Retrain what changed since the champion ``source``; see :mod:`manymodels.retrain`.

    Parameters
    ----------
    data
        The new data: the whole table (Parquet/CSV path or DataFrame), not a delta.
    source
        The champion: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or a bundle (or
        run) directory.
    name
        Registered-model name (default: the one ``source`` names, else the bundle's).
    out
        Bundle directory to write (default ``bundles/<name>-<run id>``).
    runs
        Parent of the merged run directory (``runs/<run id>``).
    register, promote, alias
        Register the new bundle; with ``promote`` (implies ``register``) move ``alias``
        to it when it validates and is no worse than the champion on the new data.
    retrain_all
        Refit everything (a full retrain through the same path).
    dry_run
        Plan only: nothing is written to disk or to the registry.
    segmenter, trainer
        Specs to use instead of the champion's (a change retrains everything).
    jobs, backend, scheduler
        Parallelism, as for :func:`manymodels.train`.
    wait
        Seconds to wait for another retrain of the same model to finish.
    state_dir
        Where locks and resumable state live (default :func:`manymodels.promotions.state_dir`).
    """
    clock = _Clock()
    messages: list[str] = []

    def tell(line: str) -> None:
        messages.append(line)
        if say is not None:
            say(line)

    register = register or promote
    # the worker processes start now, so their imports (scikit-learn, SciPy, ONNX Runtime,
    # paid once by the fork server from the command line) overlap the parent's MLflow
    # import and data preparation on the other core
    warming = None if dry_run or jobs == 1 \
        else start_workers(jobs or default_jobs(), backend, warm_worker)
    text = os.fspath(source)
    model = name or _model_name(text)
    with ExitStack() as stack:
        if not dry_run:
            # the lock comes first: a run that waited for another must plan against the
            # champion as that run left it, not as it was before
            state = Path(state_dir) if state_dir is not None else \
                default_state_dir(uri) / "retrain" / model
            with clock.part("lock"):
                stack.enter_context(hold_lock(state / "lock", wait=wait, on_stale=tell,
                                              what=f"retraining '{model}'"))
        if warming is not None:
            stack.callback(warming.join)  # every way out waits: no half-started workers
        with clock.part("open champion"):
            champion = stack.enter_context(_open_champion(text, uri, throwaway=dry_run))
        raw = champion.bundle.manifest.raw
        if raw.get("task") == "forecast":  # its series change every period: a refit policy
            return _retrain_forecast(data, champion, model, clock, messages, tell,
                                     segmenter=segmenter, trainer=trainer, out=out, runs=runs,
                                     register=register, promote=promote, alias=alias,
                                     retrain_all=retrain_all, dry_run=dry_run, jobs=jobs,
                                     uri=uri, track=track)
        with clock.part("prepare data"):
            specs = raw.get("specs") or {}
            seg_spec = segmenter if segmenter is not None else specs.get("segmenter")
            tr_spec = trainer if trainer is not None else specs.get("trainer")
            if seg_spec is None or tr_spec is None:
                raise SpecError(f"{champion.root} records no specs (made before manymodels "
                                "retrain): pass --segmenter and --trainer")
            prepared = prepare_data(data, seg_spec, tr_spec, workers=1, backend=backend)
        try:
            with clock.part("plan"):
                plan = make_plan(raw, prepared, retrain_all)
            if dry_run or plan.nothing_to_do:
                outcome = Outcome.PLANNED if dry_run else Outcome.NOTHING_TO_DO
                return RetrainResult(outcome, model, plan, champion.version,
                                     plan.segments_frame(), plan.shared_frame(), clock.total(),
                                     messages, metric=prepared.trainer.metric)
            workers = _workers_for(plan, jobs, backend, warm=warming is not None)
            prepared.warming, warming = warming, None
            return _locked(prepared, plan, champion, model, state, clock, messages, tell,
                           out=out, runs=runs, register=register, promote=promote,
                           alias=alias, jobs=workers, backend=backend, scheduler=scheduler,
                           uri=uri, track=track, progress=progress)
        finally:
            prepared.join_workers()


def _model_name(source: str) -> str:
    """The registered-model name a source names (a directory: its manifest's name)."""
    if source.startswith("models:"):
        return parse_models_uri(source)[0]
    return read_manifest(source).name


#: Below this many models to fit (none of them shared), one process fits them unless
#: workers are already warm: starting and warming worker processes then costs
#: more than it saves.
IN_PROCESS_MODELS = 100


def _workers_for(plan: Plan, jobs: int | None, backend: str, warm: bool = False) -> int:
    """Workers for the fitting part: the requested ones, or this process for a small plan
    when no workers were started ahead."""
    requested = jobs or default_jobs()
    if not warm and jobs is None and backend == "loky" \
            and len(plan.retrained) < IN_PROCESS_MODELS \
            and not any(s.action == "refit" for s in plan.shared.values()):
        return 1
    return requested


def _locked(prepared: PreparedData, plan: Plan, champion: _Champion, model: str, state: Path,
            clock: _Clock, messages: list[str], tell: Callable[[str], None], *,
            out: str | os.PathLike[str] | None, runs: str | os.PathLike[str], register: bool,
            promote: bool, alias: str, jobs: int, backend: str, scheduler: str | None,
            uri: str | None, track: bool, progress: bool) -> RetrainResult:
    """The part of a retrain that runs under the model's lock."""
    attempt, note = Attempt.open(state / "attempt", plan.identity, new_run_id())
    if note:
        tell(note)
    run_id = attempt.run_id
    reuse = RetrainReuse(plan, champion.bundle, attempt)
    with clock.part("fit"):
        if (attempt.run_dir / "manifest.json").is_file():
            partial = _partial_from_disk(attempt.run_dir, read_manifest)
            reuse.resumed = set(attempt.results)
        else:
            partial = train(prepared, out=attempt.root, run_id=run_id, jobs=jobs,
                            backend=backend, scheduler=scheduler, max_failed=1.0,
                            progress=progress, track=False, reuse=reuse)
    fitted = reuse.fitted | reuse.resumed
    with clock.part("compare"):
        decisions = decide(plan, prepared, champion.bundle, partial, reuse.resumed, fitted)
        report = _report(decisions, prepared)
    origin = {"source": str(champion.root), "name": champion.registered,
              "version": champion.version,
              "bundle_version": champion.bundle.manifest.raw.get("version"),
              "run_id": champion.bundle.manifest.raw.get("run_id")}
    run_dir = Path(runs) / run_id
    with clock.part("merge"):
        merged = merge(plan, decisions, prepared, champion.bundle, partial, fitted, run_id, origin)
    if _same_routes_and_files(merged.manifest, champion.bundle):
        # a nightly job whose challengers all lost: nothing new to write, register or serve
        rejected = int((report["outcome"] == "kept current").sum())
        result = RetrainResult(Outcome.NOTHING_TO_DO, model, plan, champion.version, report,
                               plan.shared_frame(), {}, messages,
                               metric=prepared.trainer.metric)
        result.why = (f"no improvement: the new bundle would equal the champion ({rejected} "
                      f"challenger(s) were not better); nothing written or registered")
        _finish(result, attempt, clock, track, uri)
        return result
    with clock.part("merge"):
        if run_dir.exists():  # a rerun after a crash past this point: write it again
            shutil.rmtree(run_dir)
        write_merged_run(merged, run_dir, report,
                         {"segmenter": prepared.segmenter, "trainer": prepared.trainer},
                         training_report(decisions, champion.bundle, partial))
    result = RetrainResult(Outcome.NEW_VERSION, model, plan, champion.version, report,
                           plan.shared_frame(), {}, messages, run_dir=run_dir,
                           metric=prepared.trainer.metric)
    _publish(result, merged.manifest, champion, model, run_id, clock, tell, out=out,
             register=register, promote=promote, alias=alias, uri=uri,
             compare=lambda root: _comparison(root, champion.bundle, prepared))
    _finish(result, attempt, clock, track, uri)
    return result


def _publish(result: RetrainResult, manifest: dict[str, Any], champion: _Champion, model: str,
             run_id: str, clock: _Clock, tell: Callable[[str], None], *,
             out: str | os.PathLike[str] | None, register: bool, promote: bool, alias: str,
             uri: str | None, compare: Callable[[Path], BundleComparison]) -> None:
    """Pack the merged run ``result.run_dir``, register it, and promote it when it
    validates and ``compare`` finds it no worse than the champion."""
    assert result.run_dir is not None
    with clock.part("package"):
        if out is not None and os.fspath(out).startswith("s3://"):
            raise SpecError(f"--out {out}: retrain writes a local bundle (register it to share "
                            "it); choose a directory")
        target = Path(out) if out is not None else Path("bundles") / f"{model}-{run_id}"
        if target.resolve() == champion.root.resolve():
            raise BundleError(f"--out {target} is the champion's own directory; choose another")
        packed = package_run(result.run_dir, target, name=model, overwrite=True,
                             manifest=parse_manifest(result.run_dir, manifest))
        result.bundle, result.bundle_version = Path(packed.path), packed.version
        assert packed.manifest is not None  # a local bundle
    if register:
        with clock.part("register"):
            _register(result, packed.manifest, model, uri, tell)
    if promote:
        with clock.part("promote"):
            _promote(result, champion, model, alias, uri, compare)


def _partial_from_disk(run_dir: Path, read: Callable[[Path], Any]) -> Any:
    """The fitted part's result as written before a crash (training had finished)."""
    manifest = read(run_dir)
    report = pd.read_parquet(run_dir / "report.parquet")
    return TrainResult(str(manifest.raw.get("run_id")), run_dir, report,
                       dict(manifest.raw.get("summary") or {}))


def _register(result: RetrainResult, bundle: Manifest, model: str, uri: str | None,
              tell: Callable[[str], None]) -> None:
    assert result.bundle_version is not None
    existing = find_version(model, result.bundle_version, uri)
    if existing is not None:
        tell(f"bundle {result.bundle_version} is already registered as {model} version "
             f"{existing} (a rerun after a crash); not registering it twice")
        result.version = existing
    else:
        result.version = register_bundle(bundle.root, name=model, uri=uri,
                                         manifest=bundle).version
    seed_cache(bundle.root, model, result.version, uri)


def _promote(result: RetrainResult, champion: _Champion, model: str, alias: str,
             uri: str | None, compare: Callable[[Path], BundleComparison]) -> None:
    assert result.bundle is not None and result.version is not None
    report = validate_bundle(result.bundle)
    if not report.ok:
        result.outcome = Outcome.NO_IMPROVEMENT
        result.why = (f"validate failed ({len(report.errors)} problem(s), first: "
                      f"{report.errors[0]}); {alias} stays at version {champion.version}")
        return
    comparison = compare(result.bundle)
    result.comparison = comparison
    if comparison.worse:
        result.outcome = Outcome.NO_IMPROVEMENT
        result.why = (f"the new bundle is worse than the champion: {comparison.describe()} "
                      f"(tolerance {comparison.tolerance:.2%}); {alias} stays at version "
                      f"{champion.version}")
        return
    counts = result.counts()
    reason = (f"retrain {result.run_dir.name if result.run_dir else '?'}: "
              f"{len(result.plan.retrained)} segment(s) retrained "
              f"({counts.get('replaced', 0)} replaced, {counts.get('new', 0)} new, "
              f"{counts.get('kept current', 0)} kept current); validate ok; "
              f"{comparison.describe()}")
    previous = promote(model, result.version, alias, uri=uri, reason=reason)
    result.promoted = True
    result.outcome = Outcome.PROMOTED
    result.why = f"{model}@{alias}: version {previous} -> {result.version}; {reason}"


def _finish(result: RetrainResult, attempt: Attempt | None, clock: _Clock, track: bool,
            uri: str | None) -> None:
    result.timings = clock.total()
    if track:
        with clock.part("log"):
            log_retrain(result, uri)
    if attempt is not None:
        attempt.finish()
    result.timings = clock.total()


def _retrain_forecast(data: str | os.PathLike[str] | pd.DataFrame, champion: _Champion,
                      model: str, clock: _Clock, messages: list[str],
                      tell: Callable[[str], None], *, segmenter: Any, trainer: Any,
                      out: str | os.PathLike[str] | None, runs: str | os.PathLike[str],
                      register: bool, promote: bool, alias: str, retrain_all: bool,
                      dry_run: bool, jobs: int | None, uri: str | None, track: bool
                      ) -> RetrainResult:
    """A forecasting champion: refit the series its refit policy names, move the other
    series' origin (:mod:`._forecast`); packed, registered and promoted as any retrain."""
    raw = champion.bundle.manifest.raw
    with clock.part("prepare data"):
        specs = raw.get("specs") or {}
        seg_source = segmenter if segmenter is not None else specs.get("segmenter")
        tr_source = trainer if trainer is not None else specs.get("trainer")
        if seg_source is None or tr_source is None:
            raise SpecError(f"{champion.root} records no specs: pass --segmenter and --trainer")
        seg_spec, tr_spec = load_segmenter(seg_source), load_trainer(tr_source)
        frame = read_table(data)
    with clock.part("plan"):
        fplan = plan_forecast(champion.bundle, frame, seg_spec, tr_spec, retrain_all)
    plan = fplan.as_plan(hashlib.sha256(json.dumps(
        [raw.get("run_id"), raw.get("version"), champion.version, len(frame)],
        default=str).encode()).hexdigest()[:20])
    metric = tr_spec.metric
    if dry_run or fplan.nothing_to_do:
        result = RetrainResult(Outcome.PLANNED if dry_run else Outcome.NOTHING_TO_DO, model,
                               plan, champion.version, fplan.frame_of_plan(), pd.DataFrame(),
                               clock.total(), messages, metric=metric)
        if not dry_run:
            result.why = "no series needs a refit and none has new periods; nothing written"
        return result
    run_id = new_run_id()
    scratch = Path(runs) / f".{run_id}.challenger"
    outcomes: dict[str, SeriesOutcome] = {}
    try:
        challenger = None
        if fplan.refit:
            with clock.part("fit"):
                challenger = train(frame, seg_spec, tr_spec, out=scratch, run_id=run_id,
                                   jobs=jobs, track=False).run_dir
            with clock.part("compare"):
                outcomes = compare_series(fplan, challenger, tr_spec.retrain.tolerance)
        report = retrain_report(fplan, outcomes)
        taken = any(o.outcome in ("replaced", "new") for o in outcomes.values())
        if not taken and not any(s.new_periods and s.champion is not None
                                 for s in fplan.series):
            result = RetrainResult(Outcome.NOTHING_TO_DO, model, plan, champion.version, report,
                                   pd.DataFrame(), {}, messages, metric=metric)
            result.why = (f"no improvement: {len(outcomes)} refitted series were not better "
                          f"and no series has new periods; nothing written or registered")
            _finish(result, None, clock, track, uri)
            return result
        run_dir = Path(runs) / run_id
        with clock.part("merge"):
            merged = merge_forecast(fplan, champion.bundle, challenger, outcomes, run_id, {
                "source": str(champion.root), "name": champion.registered,
                "version": champion.version, "bundle_version": raw.get("version"),
                "run_id": raw.get("run_id")})
            write_merged_run(Merged(merged.manifest, merged.sources, []), run_dir, report,
                             {"segmenter": seg_spec, "trainer": tr_spec}, merged.report,
                             merged.tables)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result = RetrainResult(Outcome.NEW_VERSION, model, plan, champion.version, report,
                           pd.DataFrame(), {}, messages, run_dir=run_dir, metric=metric)
    _publish(result, merged.manifest, champion, model, run_id, clock, tell, out=out,
             register=register, promote=promote, alias=alias, uri=uri,
             compare=lambda root: bundle_comparison(fplan, outcomes))
    _finish(result, None, clock, track, uri)
    return result
