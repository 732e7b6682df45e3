"""Tests of following an alias and rolling each new version out by analysis.

Real servers over HTTP on 127.0.0.1 (in this process, or ``manymodels serve`` processes
for the kill and the long client loop), a real MLflow SQLite registry in a temporary
directory. Version 1 is a small bundle of 6 segment models and a global one; each later
version changes a few models' files (the rest stay byte-identical) by a known amount:
``good`` moves two models by 0.01 (well under the policy's relative threshold),
``bad`` makes two models predict about ten times too high, ``mixed`` does that to one
model and moves two others by 0.01.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest
import yaml
from builders import build_bundle, derive_bundle
from conftest import free_port
from test_serve import Running
from typer.testing import CliRunner

from manymodels.cli import app
from manymodels.promotions import read_promotions
from manymodels.registry import promote, register_bundle, resolve_version
from manymodels.runtime import Bundle
from manymodels.serve import ServeSettings
from manymodels.serve.analysis import Analysis, ModelCounts, changed_models, judge
from manymodels.serve.policy import RolloutPolicy
from manymodels.serve.rollout_state import RolloutStore

NAME = "oj"
FOLLOW = f"models:/{NAME}@champion"
HEADER = "x-manymodels-deployment"
A = "quantity__store=1__brand=tropicana"
B = "quantity__store=2__brand=dominicks"
C = "quantity__store=2__brand=minute.maid"
UNCHANGED = "quantity__store=1__brand=dominicks"
#: Seconds a poll itself may take on a loaded two-core machine (a registry lookup and
#: the shared state read under its lock): an action reaches another replica within one
#: poll interval plus this.
POLL_WORK = 1.0
#: Registered versions of the template store.
VERSIONS = {"good": "2", "bad": "3", "mixed": "4"}


def fast_policy(**overrides: Any) -> dict[str, Any]:
    """A rollout policy of short windows (seconds, tens of requests) for tests."""
    window = {"min_requests": 40, "min_seconds": 0.6, "max_seconds": 60}
    policy: dict[str, Any] = {
        "poll_seconds": 0.2, "min_model_rows": 10, "latency_slack_ms": 200.0,
        "mirror": {"percent": 50, **window},
        "steps": [{"percent": p, **window} for p in (10, 50, 100)]}
    policy.update(overrides)
    return policy


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The bundles, their expected answers, and a store holding them as versions 1–4."""
    base = tmp_path_factory.mktemp("rollout")
    v1, rows = build_bundle(base / "v1", n_stores=2, rows_per_segment=6)
    paths = {"1": v1,
             "2": derive_bundle(v1, base / "good", [B, C], shift=0.01, version="2"),
             "3": derive_bundle(v1, base / "bad", [A, B], shift=80.0, version="3"),
             "4": derive_bundle(derive_bundle(v1, base / "mixed-a", [A], shift=80.0),
                                base / "mixed", [B, C], shift=0.01, version="4")}
    features = rows[["store", "brand", "price", "feat"]]
    by_segment = {}
    for record in features.to_dict(orient="records"):
        name = f"quantity__store={record['store']}__brand={record['brand']}"
        by_segment.setdefault(name, record)
    expected = {v: {name: Bundle(p).score_frame(pd.DataFrame([row])).to_frame()[
        "prediction"].tolist()[0] for name, row in by_segment.items()} for v, p in paths.items()}
    store = base / "store"
    store.mkdir()
    uri = f"sqlite:///{store / 'mlruns.db'}"
    for version in ("1", "2", "3", "4"):
        register_bundle(paths[version], name=NAME, alias="champion" if version == "1" else None,
                        uri=uri)
    return {"paths": paths, "rows": by_segment, "expected": expected, "store": store}


@pytest.fixture
def store(versions: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's copy of the registry; state (rollouts, promotions) beside it."""
    shutil.copyfile(versions["store"] / "mlruns.db", tmp_path / "mlruns.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns.db'}")
    monkeypatch.setenv("MANYMODELS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def settings_for(tmp: Path, name: str = "endpoint", **policy: Any) -> ServeSettings:
    return ServeSettings(bundle=FOLLOW, follow=True, endpoint=str(tmp / f"{name}.yaml"),
                         rollout=fast_policy(**policy))


class Load:
    """A bounded client loop in a thread: single-row requests cycling over the segments,
    each answer kept with the deployment that gave it."""

    def __init__(self, url: str, rows: dict[str, dict[str, Any]], at_least: int = 0) -> None:
        self.url, self.at_least = url, at_least
        self.rows = list(rows.items())
        self.results: list[tuple[int, str, str, float | None]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        i = 0
        with httpx.Client(base_url=self.url, timeout=60) as client:
            while not self.stop.is_set() or len(self.results) < self.at_least:
                model, row = self.rows[i % len(self.rows)]
                i += 1
                try:
                    reply = client.post("/score", json={"data": [row]})
                except httpx.TransportError:
                    if self.stop.is_set():
                        return
                    self.results.append((0, "", model, None))
                    time.sleep(0.05)
                    continue
                body = reply.json()
                self.results.append((reply.status_code, reply.headers.get(HEADER, ""), model,
                                     (body.get("predictions") or [None])[0]))

    def finish(self) -> list[tuple[int, str, str, float | None]]:
        self.stop.set()
        self.thread.join(timeout=300)
        return self.results


def wait_for(check: Callable[[], Any], seconds: float = 90.0, what: str = "") -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"not reached within {seconds} s: {what}")


def rollout_state(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/admin/rollout", timeout=30).json()["state"] or {}


def deployment_versions(url: str) -> dict[str, str]:
    """Deployment name -> registered version, from the admin API."""
    described = httpx.get(f"{url}/admin/deployments", timeout=30).json()
    return {d["name"]: d["bundle"].rsplit("/", 1)[1] for d in described["deployments"]}


def assert_answers(results: list[tuple[int, str, str, float | None]],
                   versions: dict[str, Any], version_of: dict[str, str],
                   expected: dict[str, dict[str, float]] | None = None) -> Counter[str]:
    """Every answer 200 and exactly the answer of the version that gave it."""
    assert Counter(r[0] for r in results) == {200: len(results)}, Counter(r[0] for r in results)
    seen: Counter[str] = Counter()
    for _, name, model, prediction in results:
        version = version_of[name]
        want = (expected or versions["expected"])[version][model]
        assert prediction == pytest.approx(want, rel=1e-6, abs=1e-6), (name, model)
        seen[version] += 1
    return seen


# -- the analysis, without a server -------------------------------------------------------------
def test_changed_models_are_the_files_that_differ(versions: dict[str, Any]) -> None:
    """Check that only models whose file changed are compared (others share a session)."""
    paths = versions["paths"]
    manifests = {v: Bundle(p).manifest for v, p in paths.items()}
    assert changed_models(manifests["1"], manifests["2"]) == sorted([B, C])
    assert changed_models(manifests["1"], manifests["4"]) == sorted([A, B, C])
    assert changed_models(manifests["1"], manifests["1"]) == []


@pytest.mark.parametrize(("live", "candidate", "errors", "outcome"), [
    (9.0, 9.05, 0, "pass"),      # 0.6% apart: under the 20% threshold
    (9.0, 90.0, 0, "fail"),      # ten times too high
    (9.0, 9.0, 3, "fail"),       # 3 of 40 requests refused by the candidate
])
def test_a_phase_passes_or_fails_on_the_merged_counts(live: float, candidate: float, errors: int,
                                                      outcome: str) -> None:
    """Check that the verdict follows the thresholds, and that two replicas' halves merge
    into the counts of the whole (so every replica judges the same)."""
    policy = RolloutPolicy(**fast_policy())
    halves = [Analysis([A], 1, policy.max_relative_diff) for _ in range(2)]
    for i in range(40):
        failed = i < errors
        halves[i % 2].observe([(A, live), (UNCHANGED, 1.0)],
                              None if failed else [(A, candidate), (UNCHANGED, 1.0)],
                              0.001, 0.001)
    merged = ModelCounts.from_json(halves[0].as_json()["models"][A])
    merged.merge(ModelCounts.from_json(halves[1].as_json()["models"][A]))
    assert (merged.requests, merged.rows, merged.errors) == (40, 40, errors)
    assert UNCHANGED not in halves[0].models  # unchanged models are not counted
    early = judge(policy, policy.mirror, [A], 40, {A: merged}, seconds=0.1)
    late = judge(policy, policy.mirror, [A], 40, {A: merged}, seconds=1.0)
    assert late.outcome == outcome
    # errors and divergence fail at once; a pass waits for the phase's minimum duration
    assert early.outcome == ("wait" if outcome == "pass" else "fail")


def test_the_mirror_phase_names_every_failing_model_in_one_verdict() -> None:
    """Check that in the mirror phase (no client sees the candidate) a failing model waits
    for the other changed models' rows, so one verdict names all that fail; in a traffic
    step it fails at once."""
    policy = RolloutPolicy(**fast_policy())
    analysis = Analysis([A, B], 1, policy.max_relative_diff)
    for _ in range(policy.min_model_rows):
        analysis.observe([(A, 9.0)], [(A, 90.0)], 0.001, 0.001)
    counts = analysis.models
    assert judge(policy, policy.mirror, [A, B], 10, counts, 0.1, patient=True).outcome == "wait"
    assert judge(policy, policy.steps[0], [A, B], 10, counts, 0.1).failing.keys() == {A}
    for _ in range(policy.min_model_rows):
        analysis.observe([(B, 9.0)], [(B, 90.0)], 0.001, 0.001)
    verdict = judge(policy, policy.mirror, [A, B], 20, analysis.models, 0.1, patient=True)
    assert verdict.outcome == "fail" and verdict.failing.keys() == {A, B}


def test_the_policy_is_checked() -> None:
    """Check that traffic steps must rise and end at 100."""
    with pytest.raises(ValueError, match="must rise and end at 100"):
        RolloutPolicy(steps=[{"percent": 50}, {"percent": 10}])
    with pytest.raises(ValueError, match="must rise and end at 100"):
        RolloutPolicy(steps=[{"percent": 10}, {"percent": 50}])


# -- rollouts on a running server ---------------------------------------------------------------
def test_a_bad_version_is_rolled_back_in_the_mirror_phase(versions: dict[str, Any],
                                                          store: Path) -> None:
    """Check that a version whose changed models predict ten times too high is rolled back
    during the mirror phase: no client answer changed, the alias moved back, the version
    tagged rejected with the reason, the events logged."""
    running = Running(settings_for(store))
    load = Load(running.url, versions["rows"])
    try:
        wait_for(lambda: len(load.results) > 50)
        promote(NAME, VERSIONS["bad"], "champion", reason="test: a retrain promoted it")
        state = wait_for(lambda: (s := rollout_state(running.url)).get("status")
                         == "rolled_back" and s, what="rolled back")
        results = load.finish()
    finally:
        running.stop()
    assert {r[1] for r in results} == {"default"}  # only version 1 ever answered
    assert_answers(results, versions, {"default": "1"})
    assert "step 0 failed" in state["reason"] and A in state["reason"]
    assert set(state["verdicts"][-1]["failing"]) == {A, B}
    assert resolve_version(FOLLOW).version == "1"
    tags = resolve_version(f"models:/{NAME}/{VERSIONS['bad']}").tags
    assert tags["manymodels.rollout"] == "rejected" and A in tags["manymodels.rollout.reason"]
    assert [(p.previous, p.version) for p in read_promotions(model=NAME)][-1] == ("3", "1")
    events = [e["event"] for e in RolloutStore(NAME, "champion").events()]
    assert events[-3:] == ["started", "step_fail", "rolled_back"]


def test_a_failing_model_is_held_back_and_the_rest_promoted(versions: dict[str, Any],
                                                            store: Path) -> None:
    """Check that a version in which one changed model fails and two pass is promoted
    without that model: a new registered version whose failing model keeps version 1's
    file, the alias on it, every answer from exactly one version."""
    running = Running(settings_for(store))
    load = Load(running.url, versions["rows"])
    try:
        wait_for(lambda: len(load.results) > 50)
        promote(NAME, VERSIONS["mixed"], "champion")
        state = wait_for(lambda: (s := rollout_state(running.url)).get("status")
                         == "promoted" and s, what="promoted")
        time.sleep(0.3)
        results = load.finish()
        final = deployment_versions(running.url)
    finally:
        running.stop()
    held = state["stable"]
    assert set(state["held_back"]) == {A} and held not in VERSIONS.values()
    assert resolve_version(FOLLOW).version == held
    tags = resolve_version(f"models:/{NAME}/{held}").tags
    assert (tags["manymodels.rollout.derived_from"], tags["manymodels.rollout.held_back"]) \
        == (VERSIONS["mixed"], A)
    # the held-back version answers A as version 1 and B, C as version 4
    expected = {**versions["expected"], held: {**versions["expected"]["4"],
                                               A: versions["expected"]["1"][A]}}
    names = {"default": "1", f"v{VERSIONS['mixed']}": "4", f"v{held}": held}
    seen = assert_answers(results, versions, names, expected)
    assert seen["4"] == 0  # version 4 (with the failing model) never answered a client
    assert seen[held] > 0 and list(final.values()) == [held]


def test_operators_pause_resume_and_promote_within_one_poll(versions: dict[str, Any],
                                                           store: Path) -> None:
    """Check that pause, resume, promote and abort from the CLI take effect within one
    poll interval, on the server called and on a second replica sharing the registry, and
    that both replicas end in the same state."""
    slow = {"min_requests": 10**6, "min_seconds": 600, "max_seconds": 900}
    policy = {"poll_seconds": 0.5, "mirror": {"percent": 50, **slow},
              "steps": [{"percent": 10, **slow}, {"percent": 100, **slow}]}
    first = Running(settings_for(store, "a", **policy))
    second = Running(settings_for(store, "b", **policy))
    load = Load(first.url, versions["rows"])
    runner = CliRunner()
    try:
        promote(NAME, VERSIONS["good"], "champion")
        for running in (first, second):
            wait_for(lambda r=running: rollout_state(r.url).get("status") == "running")
        paused = runner.invoke(app, ["endpoint", "rollout", "pause", "--url", first.url])
        assert paused.exit_code == 0, paused.output
        assert "PAUSED" in paused.output
        started = time.monotonic()
        wait_for(lambda: rollout_state(second.url).get("paused"), 5)
        assert time.monotonic() - started <= 0.5 + POLL_WORK
        shown = runner.invoke(app, ["endpoint", "rollout", "show", "--url", second.url],
                              env={"COLUMNS": "300"})
        assert shown.exit_code == 0 and "PAUSED" in shown.output and "step 0" in shown.output
        resumed = runner.invoke(app, ["endpoint", "rollout", "resume", "--url", second.url])
        assert resumed.exit_code == 0 and "PAUSED" not in resumed.output
        promoted = runner.invoke(app, ["endpoint", "rollout", "promote", "--url", first.url])
        assert promoted.exit_code == 0, promoted.output
        assert deployment_versions(first.url) == {"v2": "2"}  # at once on the server called
        started = time.monotonic()
        wait_for(lambda: deployment_versions(second.url) == {"v2": "2"}, 5)
        assert time.monotonic() - started <= 0.5 + POLL_WORK
        again = runner.invoke(app, ["endpoint", "rollout", "abort", "--url", first.url])
        assert again.exit_code != 0 and "no rollout" in str(again.exception)
        results = load.finish()
        states = [rollout_state(r.url) for r in (first, second)]
    finally:
        first.stop()
        second.stop()
    assert states[0] == states[1] and states[0]["status"] == "promoted"
    assert "promoted by" in states[0]["reason"] and "at step 0" in states[0]["reason"]
    assert_answers(results, versions, {"default": "1", "v2": "2"})
    for name in ("a", "b"):
        written = yaml.safe_load((store / f"{name}.yaml").read_text())
        assert written["follow"] == FOLLOW and written["traffic"] == {"v2": 100}


def test_abort_rolls_back_and_metrics_and_ui_show_the_rollout(versions: dict[str, Any],
                                                              store: Path) -> None:
    """Check that abort rolls back at once (alias moved back, version tagged rejected
    naming who), and that /metrics and /ui/state show the step and the verdicts."""
    slow = {"min_requests": 10**6, "min_seconds": 600, "max_seconds": 900}
    running = Running(settings_for(store, mirror={"percent": 50, **slow}))
    load = Load(running.url, versions["rows"])
    try:
        promote(NAME, VERSIONS["good"], "champion")
        wait_for(lambda: rollout_state(running.url).get("status") == "running")
        wait_for(lambda: "manymodels_rollout_verdicts_total{verdict=\"wait\"}"
                 in running.client.get("/metrics").text)
        metrics = running.client.get("/metrics").text
        assert "manymodels_rollout_step 0.0" in metrics
        ui = running.client.get("/ui/state").json()["rollout"]
        assert ui["state"]["candidate"] == "2" and ui["state"]["step"] == 0
        page = running.client.get("/ui").text
        assert 'id="rollout"' in page
        aborted = CliRunner().invoke(app, ["endpoint", "rollout", "abort", "--url",
                                           running.url])
        assert aborted.exit_code == 0, aborted.output
        assert deployment_versions(running.url) == {"default": "1"}
        results = load.finish()
        metrics = running.client.get("/metrics").text
    finally:
        running.stop()
    assert "manymodels_rollout_step -1.0" in metrics
    assert_answers(results, versions, {"default": "1"})
    assert resolve_version(FOLLOW).version == "1"
    reason = resolve_version(f"models:/{NAME}/2").tags["manymodels.rollout.reason"]
    assert reason.startswith("aborted by client 127.0.0.1")


# -- processes: the long loop, kill -9 and restart ---------------------------------------------
def _serve(store: Path, spec: Path, name: str, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    command = [sys.executable, "-m", "manymodels", "serve", FOLLOW, "--follow", "--spec",
               str(spec), "--endpoint", str(store / f"{name}.yaml"), "--port", str(port)]
    if (store / f"{name}.yaml").is_file():
        command.remove(FOLLOW)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(command, stdout=log.open("ab"), stderr=subprocess.STDOUT,
                            start_new_session=True, env=env)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            return httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(ready, 90, "server ready")
    return proc, url


def _spec(store: Path, **policy: Any) -> Path:
    path = store / "serving.yaml"
    path.write_text(yaml.safe_dump({"rollout": fast_policy(**policy), "log_level": "warning"}))
    return path


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)


@pytest.mark.slow
def test_a_promoted_version_reaches_all_traffic_through_every_step(
        versions: dict[str, Any], store: Path, processes: list[Any]) -> None:
    """Check that under a steady client loop of at least 5,000 requests a promoted version
    goes through the mirror phase and every traffic step to 100 %, with no failed request
    and every answer exactly one version's."""
    proc, url = _serve(store, _spec(store), "endpoint", store / "serve.log")
    processes.append(proc)
    load = Load(url, versions["rows"], at_least=5000)
    wait_for(lambda: len(load.results) > 200)
    promote(NAME, VERSIONS["good"], "champion", reason="test: a retrain promoted it")
    steps_seen: set[int] = set()

    def done() -> bool:
        state = rollout_state(url)
        if state.get("status") == "running":
            steps_seen.add(state["step"])
        return state.get("status") == "promoted"

    wait_for(done, 120, "promoted")
    results = load.finish()
    assert len(results) >= 5000
    seen = assert_answers(results, versions, {"default": "1", "v2": "2"})
    assert seen["1"] > 0 and seen["2"] > 0
    last_v1 = max(i for i, r in enumerate(results) if r[1] == "default")
    assert {r[1] for r in results[last_v1 + 1:]} == {"v2"}
    events = RolloutStore(NAME, "champion").events()
    passed = [e["step"] for e in events if e["event"] == "step_pass"]
    assert passed == [0, 1, 2, 3]  # the mirror phase and the three traffic steps
    assert deployment_versions(url) == {"v2": "2"}
    verdicts = json.loads(RolloutStore(NAME, "champion").path.read_text())["verdicts"]
    assert all(set(v["models"]) == {B, C} for v in verdicts)  # only the changed models


@pytest.mark.slow
def test_kill_9_mid_rollout_resumes_at_the_same_step(versions: dict[str, Any], store: Path,
                                                     processes: list[Any]) -> None:
    """Check that a server killed with SIGKILL in the middle of a traffic step comes back
    at the same step (same candidate, same traffic), keeps what the step had seen, and
    finishes the rollout."""
    window = {"min_requests": 40, "min_seconds": 0.6, "max_seconds": 60}
    spec = _spec(store, steps=[{"percent": 10, **window, "min_seconds": 8},
                               {"percent": 100, **window}])
    proc, url = _serve(store, spec, "endpoint", store / "serve.log")
    processes.append(proc)
    load = Load(url, versions["rows"])
    promote(NAME, VERSIONS["good"], "champion")
    before = wait_for(lambda: (s := rollout_state(url)).get("step") == 1 and s, 60, "step 1")
    time.sleep(1.5)  # let the step see requests and publish them
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    load.finish()
    seen_before = json.loads(RolloutStore(NAME, "champion").path.read_text())["observations"]
    assert seen_before, "the step published nothing before the kill"
    proc, url = _serve(store, spec, "endpoint", store / "serve.log")
    processes.append(proc)
    after = wait_for(lambda: rollout_state(url), 60, "state read")
    assert (after["status"], after["step"], after["candidate"], after["generation"]) == \
        ("running", 1, before["candidate"], before["generation"])
    assert httpx.get(f"{url}/admin/traffic").json() == {"default": 90, "v2": 10}
    load = Load(url, versions["rows"])
    wait_for(lambda: rollout_state(url).get("status") == "promoted", 90, "promoted")
    assert_answers(load.finish(), versions, {"default": "1", "v2": "2"})
    events = [e["event"] for e in RolloutStore(NAME, "champion").events()]
    assert events.count("started") == 1 and events[-1] == "promoted"


@pytest.mark.slow
def test_a_retrain_promotes_and_the_follower_rolls_it_out(
        trained_run: Path, oj_small: pd.DataFrame, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Check the whole loop with nobody awake: `retrain --promote` on data that changed for
    two segments moves the alias, and a following server rolls the new version out to all
    traffic comparing only the models whose file the retrain changed, every answer 200
    and exactly one version's."""
    from manymodels.bundle import package_run
    from manymodels.registry import resolve_bundle
    from manymodels.retrain import retrain

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns.db'}")
    monkeypatch.setenv("MANYMODELS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    register_bundle(package_run(trained_run, tmp_path / "b1", name="oj-sales").path,
                    name="oj-sales", alias="champion")
    follow = "models:/oj-sales@champion"
    # the retrained models legitimately predict other values: this test is about the loop,
    # so the divergence bar is wide (the other tests hold it at 0.2)
    running = Running(ServeSettings(bundle=follow, follow=True, endpoint=str(
        tmp_path / "endpoint.yaml"), rollout=fast_policy(max_relative_diff=1e6)))
    features = oj_small.drop(columns=["quantity"])
    rows = {f"{r['store']}/{r['brand']}": r for r in features.drop_duplicates(
        ["store", "brand"]).to_dict(orient="records")}
    load = Load(running.url, rows)
    try:
        changed = oj_small.copy()
        picked = changed["store"].isin(sorted(changed["store"].unique())[:1]) \
            & changed["brand"].isin(sorted(changed["brand"].unique())[:2])
        changed.loc[picked, "quantity"] = changed.loc[picked, "quantity"] * 1.7 + 3.0
        result = retrain(changed, follow, promote=True, jobs=1, track=False)
        assert result.exit_code == 0, result.why
        state = wait_for(lambda: (s := rollout_state(running.url)).get("status")
                         == "promoted" and s, 180, "promoted")
        time.sleep(0.3)
        results = load.finish()
    finally:
        running.stop()
    assert state["stable"] == result.version == resolve_version(follow).version
    paths = {v: resolve_bundle(f"models:/oj-sales/{v}") for v in ("1", result.version)}
    manifests = {v: Bundle(p).manifest for v, p in paths.items()}
    assert state["changed"] == changed_models(manifests["1"], manifests[result.version])
    assert 0 < len(state["changed"]) < len(manifests["1"].models)
    expected = {v: {key: Bundle(p).score_frame(pd.DataFrame([row])).to_frame()[
        "prediction"].tolist()[0] for key, row in rows.items()} for v, p in paths.items()}
    seen = assert_answers(results, {"expected": expected},
                          {"default": "1", f"v{result.version}": result.version})
    assert seen["1"] > 0 and seen[result.version] > 0
