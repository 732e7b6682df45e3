"""Tests of ``manymodels monitor``: PSI and its sample-size-aware threshold, measured over
repeated draws; and end to end, a real trained run served with prediction logging, one
segment's price shifted by +50%, monitored with actuals through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_serve import Running

from manymodels.monitor import drift_threshold, numeric_bins, psi
from manymodels.monitor.accuracy import label_metric
from manymodels.monitor.drift import bins_of, judge
from manymodels.monitor.logs import read_prediction_logs
from manymodels.monitor.run import ALARM_EXIT_CODE, monitor
from manymodels.runtime import read_manifest
from manymodels.serve import ServeSettings

DRAWS = 400
DISTRIBUTIONS = {
    "uniform price": lambda rng, n: rng.uniform(1.0, 4.0, n),
    "lognormal": lambda rng, n: rng.lognormal(0.5, 0.4, n),
    "binary flag": lambda rng, n: rng.integers(0, 2, n).astype(float),
}


def _verdicts(draw: object, m: int, n: int, shift: float, seed: int,
              fixed: float | None = None) -> np.ndarray:
    """Alarm (True/False) for each of DRAWS reference/live sample pairs."""
    rng = np.random.default_rng(seed)
    out = np.zeros(DRAWS, dtype=bool)
    for i in range(DRAWS):
        reference = draw(rng, m)  # type: ignore[operator]
        live = draw(rng, n) * shift  # type: ignore[operator]
        stats = {"bins": numeric_bins(reference)}
        verdict = judge("m", "x", stats, live, m, min_rows=1)
        out[i] = verdict.psi > fixed if fixed is not None else verdict.alarm  # type: ignore[operator]
    return out


@pytest.mark.parametrize("name", list(DISTRIBUTIONS))
@pytest.mark.parametrize(("m", "n"), [(40, 30), (150, 60), (1000, 500)])
def test_false_alarm_rate_over_repeated_draws_is_at_most_5_percent(name: str, m: int,
                                                                   n: int) -> None:
    """Unshifted data from the training distribution: at most 5% of draws raise an alarm,
    at every sample size (a fixed 0.2 cut flags most small samples)."""
    rate = _verdicts(DISTRIBUTIONS[name], m, n, 1.0, seed=m + n).mean()
    assert rate <= 0.05, f"{name}, m={m}, n={n}: false-alarm rate {rate:.1%}"
    if (m, n) == (40, 30) and name != "binary flag":
        fixed_rate = _verdicts(DISTRIBUTIONS[name], m, n, 1.0, seed=1, fixed=0.2).mean()
        assert fixed_rate > 0.5, f"a fixed 0.2 cut flags {fixed_rate:.0%} of noise"


@pytest.mark.parametrize("name", ["uniform price", "lognormal"])
@pytest.mark.parametrize(("m", "n"), [(150, 60), (1000, 500)])
def test_a_50_percent_shift_is_flagged(name: str, m: int, n: int) -> None:
    """A feature shifted by +50% is flagged in (almost) every draw once a model has
    seen 60 rows (with 30 live rows against 40 training rows no test at 1% false alarms
    can be sure; the power there is measured, not asserted, and in the closing note)."""
    rate = _verdicts(DISTRIBUTIONS[name], m, n, 1.5, seed=7 + m).mean()
    assert rate >= 0.95, f"{name}, m={m}, n={n}: detected in {rate:.1%} of draws"


def test_threshold_widens_for_small_samples_and_psi_is_zero_on_equal_shares() -> None:
    """Check the χ² threshold: wider for fewer rows, never below the floor."""
    assert drift_threshold(30, 40, 10) > drift_threshold(100, 100, 10) > 0.2
    assert drift_threshold(100_000, 100_000, 10) == 0.2
    shares = np.full(10, 0.1)
    assert psi(shares, np.full(10, 50), 500) == pytest.approx(0.0, abs=1e-12)


def test_bins_from_older_manifests_and_categories() -> None:
    """Manifests without bins use their quantile points; categories get an 'other' bin."""
    legacy = bins_of({"quantiles": {"0.0": 1, "0.05": 1, "0.25": 2, "0.5": 2, "0.75": 3,
                                    "0.95": 4, "1.0": 4}})
    assert legacy is not None and legacy.edges is not None
    assert legacy.edges.tolist() == [1, 2, 3, 4]
    assert legacy.fractions.sum() == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    same = rng.choice(["a", "b", "c"], 200, p=[0.5, 0.3, 0.2]).tolist()
    stats = {"frequencies": {"a": 0.5, "b": 0.3, "c": 0.2}}
    assert judge("m", "brand", stats, same, 300).verdict == "ok"
    assert judge("m", "brand", stats, ["z"] * 200, 300).verdict == "drift"
    assert judge("m", "brand", stats, ["a"] * 10, 300).verdict == "too few rows"
    assert judge("m", "brand", None, same, 300).verdict == "no reference"


# -- end to end ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served_logs(trained_run: Path, oj_small: pd.DataFrame,
                tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str, list[str]]:
    """Serve the real run with prediction logging; three segments' rows, one request per
    row (x-request-id = row id), the first segment's price shifted by +50%."""
    manifest = read_manifest(trained_run)
    own = [r for r in manifest.raw["routes"]
           if r["level"] == 0 and manifest.models[r["model"]].level == 0][:3]
    assert len(own) == 3, "the fixture run should have segments with their own model"
    shifted = own[0]["model"]
    work = tmp_path_factory.mktemp("monitor")
    logs = work / "logs"
    running = Running(ServeSettings(bundle=str(trained_run), log_predictions=str(logs)))
    actuals = []
    try:
        for route in own:
            store, brand = route["key"]
            rows = oj_small[(oj_small["store"].astype(str) == store)
                            & (oj_small["brand"] == brand)]
            for i, row in enumerate(rows.drop(columns=["week", "quantity"]).to_dict("records")):
                if route["model"] == shifted:
                    row["price"] = row["price"] * 1.5
                rid = f"{store}-{brand}-{i}"
                reply = running.client.post("/score", json={"data": [row]},
                                            headers={"x-request-id": rid})
                assert reply.status_code == 200, reply.text
                actuals.append({"request_id": rid, "quantity": rows["quantity"].iloc[i]})
    finally:
        running.stop()
    actual_file = work / "actuals.csv"
    pd.DataFrame(actuals).to_csv(actual_file, index=False)
    return logs, actual_file, shifted, [r["model"] for r in own]


def test_monitor_cli_flags_the_shifted_model_and_scores_accuracy(
        trained_run: Path, served_logs: tuple[Path, Path, str, list[str]],
        tmp_path: Path) -> None:
    """The CLI raises an alarm (exit 10) for the shifted model's price only, and its
    accuracy per model equals a direct computation from the logs and the actuals."""
    logs, actual_file, shifted, models = served_logs
    out = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "manymodels", "monitor", str(trained_run),
                           "--predictions", str(logs), "--actuals", str(actual_file),
                           "--id-column", "request_id", "--out", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == ALARM_EXIT_CODE, done.stdout + done.stderr
    assert "alarms:" in done.stdout
    report = json.loads(out.read_text())
    drifted = {(d["model"], d["feature"]) for d in report["drift"] if d["verdict"] == "drift"}
    assert (shifted, "price") in drifted
    assert {m for m, _ in drifted} == {shifted}
    unshifted = [d for d in report["drift"] if d["model"] != shifted]
    assert unshifted and all(d["verdict"] == "ok" for d in unshifted)
    log = read_prediction_logs(logs).to_pandas()
    truth = pd.read_csv(actual_file)
    joined = log.merge(truth, on="request_id")
    metric = next(k for k in read_manifest(trained_run).models[models[1]].raw["metrics"]
                  if k != "parity_max_abs_diff")
    for entry in report["accuracy"]:
        rows = joined[joined["model"] == entry["model"]]
        assert entry["rows"] == len(rows)
        direct = label_metric(metric, rows["quantity"].to_numpy(), rows["prediction"].to_numpy())
        assert entry["value"] == pytest.approx(direct, rel=1e-9)
        assert entry["holdout"] is not None
    assert {e["model"] for e in report["accuracy"]} == set(models)
    summary = {m["model"]: m for m in report["models"]}
    assert summary[shifted]["alarm"] and "price" in summary[shifted]["drifted_features"]
    from manymodels.serve.ui import monitor_flags  # the endpoint's page reads this file

    assert [f["model"] for f in monitor_flags(out)["flagged"]] == [shifted]


def test_monitor_without_alarms_exits_0_and_writes_parquet(
        trained_run: Path, served_logs: tuple[Path, Path, str, list[str]],
        tmp_path: Path) -> None:
    """No alarm (the floor set above any PSI) exits 0; a .parquet report has every verdict."""
    logs, _, _, _ = served_logs
    out = tmp_path / "report.parquet"
    done = subprocess.run([sys.executable, "-m", "manymodels", "monitor", str(trained_run),
                           "--predictions", str(logs), "--psi-floor", "1000", "--out",
                           str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    frame = pd.read_parquet(out)
    assert set(frame["kind"]) == {"drift"} and (frame["verdict"] != "drift").all()
    in_process = monitor(trained_run, logs, floor=1000)
    assert len(in_process.drift) == len(frame)


def test_monitor_errors_are_one_line(trained_run: Path, tmp_path: Path) -> None:
    """A missing log directory and actuals without an id column give one clear line."""
    done = subprocess.run([sys.executable, "-m", "manymodels", "monitor", str(trained_run),
                           "--predictions", str(tmp_path / "nope")],
                          capture_output=True, text=True)
    assert done.returncode == 3 and "does not exist" in done.stderr
    assert "Traceback" not in done.stderr
    done = subprocess.run([sys.executable, "-m", "manymodels", "monitor", str(trained_run),
                           "--predictions", str(tmp_path), "--actuals", "a.csv"],
                          capture_output=True, text=True)
    assert done.returncode == 3 and "--id-column" in done.stderr


def test_monitor_imports_no_training_library() -> None:
    """Check that monitoring pulls in no training or conversion library."""
    code = ("import sys, manymodels.monitor.run, manymodels.cli.monitor; "
            "print([m for m in ('sklearn', 'lightgbm', 'skl2onnx', 'manymodels.training', "
            "'manymodels.candidates') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_actuals_with_zero_padded_ids_join_their_logged_rows(tmp_path: Path) -> None:
    """Check that actuals whose ids are written 000123 in a CSV join the logged rows of
    id "000123" (read as the number 123 they joined nothing, and the accuracy silently
    covered fewer rows)."""
    from manymodels.monitor.accuracy import join_actuals, read_actuals

    path = tmp_path / "actuals.csv"
    pd.DataFrame({"order": ["000123", "000124", "125"], "quantity": [1.0, 2.0, 3.0]}) \
        .to_csv(path, index=False)
    log = pd.DataFrame({"model": ["m"] * 3, "prediction": [1.5, 2.5, 3.5],
                        "order": ["000123", "000124", "125"]})
    joined = join_actuals(log, read_actuals(path), "order", "quantity")
    assert sorted(joined["order"]) == ["000123", "000124", "125"]
    assert joined.set_index("order").loc["000124", "actual"] == 2.0
