"""Tests of real tables in, right answers out (issue 27).

Tables are generated here the way real ones come: real dates, string categories with
gaps, a one-row segment, Parquet decimal / categorical / nullable types, CSVs from a
spreadsheet. Everything is real: training, ONNX export, packing, the server over HTTP on
127.0.0.1, batch, retrain and the command line in its own process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from manymodels.bundle import package_run
from manymodels.retrain import retrain
from manymodels.runtime import Bundle
from manymodels.training import train

SEGMENTER = {"name": "store-brand", "columns": ["store", "brand"], "min_rows": 10,
             "levels": [["store", "brand"], ["brand"], []]}
TRAINER = {"name": "real", "target": "quantity", "time_column": "date", "metric": "rmse",
           "candidates": [{"algorithm": "ridge", "params": {"alpha": 1.0}},
                          {"algorithm": "mean"}]}
PROMOS = ["none", "tv", None, "print"]


def sales(weeks: int = 30, stores: int = 3, seed: int = 0,
          start: str = "2024-01-01") -> pd.DataFrame:
    """Weekly sales per (store, brand) with real dates, a text feature with gaps, and one
    store with a single row (a small segment, pooled)."""
    rng = np.random.default_rng(seed)
    frames = []
    dates = pd.date_range(start, periods=weeks, freq="W-MON")
    for store in range(1, stores + 1):
        for b, brand in enumerate(["alpha", "beta"]):
            price = rng.uniform(1.0, 4.0, weeks)
            promo = rng.choice(np.array(PROMOS, dtype=object), weeks)
            lift = np.where(promo == "tv", 0.4, np.where(promo == "print", 0.2, 0.0))
            quantity = 9 - (1 + 0.3 * store + 0.5 * b) * np.log(price) + lift \
                + rng.normal(0, 0.05, weeks)
            frames.append(pd.DataFrame({"store": store, "brand": brand, "date": dates,
                                        "price": price, "promo": promo,
                                        "quantity": quantity}))
    lone = pd.DataFrame({"store": [99], "brand": ["alpha"], "date": [dates[0]],
                         "price": [2.0], "promo": ["tv"], "quantity": [8.5]})
    return pd.concat([*frames, lone], ignore_index=True)


@pytest.fixture(scope="module")
def champion(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle trained on :func:`sales` (its text feature has gaps; one segment pooled)."""
    root = tmp_path_factory.mktemp("champion")
    run = train(sales(), SEGMENTER, TRAINER, out=root / "runs", run_id="champion", jobs=1,
                track=False)
    return package_run(run.run_dir, root / "bundle", name="sales").path


def test_a_null_in_a_text_feature_is_scored_as_the_missing_category(champion: Path) -> None:
    """Check that nulls in a text feature seen with nulls in training are scored, in a
    multi-row table and alone, the same as the empty string (the missing category)."""
    bundle = Bundle(champion)
    frame = sales()
    gaps = frame[frame["promo"].isna()]
    assert len(gaps) > 1
    scored = bundle.predict(frame)
    assert np.isfinite(scored["prediction"]).all()
    alone = bundle.predict(gaps.head(1))
    as_empty = bundle.predict(gaps.head(1).assign(promo=""))
    assert alone["prediction"].iloc[0] == pytest.approx(as_empty["prediction"].iloc[0])
    as_nan = bundle.predict(gaps.astype({"promo": "string"}).head(3))
    assert as_nan["prediction"].to_numpy() == pytest.approx(
        scored.loc[gaps.index[:3], "prediction"].to_numpy())
    tv = bundle.predict(gaps.head(1).assign(promo="tv"))
    assert tv["prediction"].iloc[0] != pytest.approx(alone["prediction"].iloc[0])


def test_retrain_of_a_champion_that_pooled_small_segments_succeeds(
        champion: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Check that a champion with a one-row segment (small pool unused by routing) retrains
    after a week is appended, instead of failing on the small pool's missing result."""
    monkeypatch.chdir(tmp_path)
    longer = sales(weeks=31)
    result = retrain(longer, champion, out=tmp_path / "bundle", runs=tmp_path / "runs",
                     jobs=1, track=False, state_dir=tmp_path / "state")
    assert result.bundle is not None
    assert Bundle(result.bundle).predict(longer)["prediction"].notna().all()


def _cli(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "manymodels", *args], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONWARNINGS": "default"})


def _big_table(path: Path) -> None:
    """A table whose global model's rows are several MB: joblib would memory-map them."""
    rng = np.random.default_rng(1)
    n = 160_000  # one float64 column is 1.3 MB: over joblib's 1 MB memory-map threshold
    frame = pd.DataFrame({"store": rng.integers(0, 4, n), "brand": "alpha",
                          "date": np.tile(pd.date_range("2020-01-01", periods=n // 4), 4),
                          "price": rng.uniform(1, 4, n), "x": rng.normal(size=n)})
    frame["quantity"] = 9 - np.log(frame["price"]) + rng.normal(0, 0.1, n)
    frame.to_parquet(path)


def test_a_big_run_prints_no_worker_traceback_and_a_stopped_run_leaves_nothing(
        tmp_path: Path) -> None:
    """Check that a run whose global model has MB of rows prints no resource-tracker
    traceback on two workers, and that SIGTERM mid-run exits 130 with one line and no
    hidden staging directory left behind."""
    import yaml

    _big_table(tmp_path / "big.parquet")
    (tmp_path / "seg.yaml").write_text(yaml.safe_dump({"columns": ["store"], "min_rows": 10}))
    (tmp_path / "tr.yaml").write_text(yaml.safe_dump(TRAINER))
    args = ["train", "--data", "big.parquet", "--segmenter", "seg.yaml", "--trainer",
            "tr.yaml", "--quiet", "--no-track", "-j", "2"]
    done = _cli([*args, "--out", "runs"], tmp_path)
    out, err = done.communicate(timeout=600)
    assert done.returncode == 0, err
    assert "Traceback" not in err and "resource_tracker" not in err, err
    stopped = _cli([*args, "--out", "stopped"], tmp_path)
    deadline = time.monotonic() + 300
    while not any((tmp_path / "stopped").glob(".*.tmp")):
        assert stopped.poll() is None and time.monotonic() < deadline, stopped.stderr
        time.sleep(0.05)
    stopped.send_signal(signal.SIGTERM)
    out, err = stopped.communicate(timeout=120)
    assert stopped.returncode == 130
    assert "Traceback" not in err and "stopped" in err, err
    assert list((tmp_path / "stopped").iterdir()) == []
