"""Tests of the scoring runtime: routing, fallback chain, input checks, session cache."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from builders import build_bundle

import manymodels.runtime as runtime_pkg
from manymodels.errors import BundleError, InputSchemaError, ModelNotFound
from manymodels.runtime import Bundle, SessionCache, normalise_key_value


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    return build_bundle(tmp_path_factory.mktemp("b") / "b", n_stores=4)


def test_runtime_imports_only_onnxruntime_numpy_pandas() -> None:
    """Check that the runtime package imports nothing outside stdlib, onnxruntime, numpy, pandas."""
    allowed = {"onnxruntime", "numpy", "pandas", "__future__"}
    import sys

    stdlib = set(sys.stdlib_module_names)
    for path in Path(runtime_pkg.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [(node.module or "").split(".")[0]]
            else:
                continue
            for name in names:
                assert name in allowed or name in stdlib, f"{path.name} imports {name}"


@pytest.mark.parametrize(("value", "expected"), [(42, "42"), (42.0, "42"), ("42", "42"),
                                                 (np.int64(7), "7"), (2.5, "2.5"), (True, "True")])
def test_key_values_normalise(value: object, expected: str) -> None:
    """Check that 42, 42.0 and '42' name the same segment."""
    assert normalise_key_value(value) == expected


def test_rows_route_to_their_segment_and_unknown_ones_fall_back(bundle_dir) -> None:  # noqa: ANN001
    """Check routing in row order, with the global fallback for unknown segments."""
    root, rows = bundle_dir
    frame = pd.concat([rows.iloc[[0, 50, 100]], rows.iloc[[5]].assign(store=999)])
    frame["store"] = frame["store"].astype(float)  # 1.0 must still find store 1
    result = Bundle(root).score_frame(frame)
    assert list(result.model[:3]) == [f"quantity__store={s}__brand={b}" for s, b in
                                      zip(rows.store.iloc[[0, 50, 100]], rows.brand.iloc[[0, 50, 100]],
                                          strict=True)]
    assert result.model[3] == "quantity__global" and result.fallback.tolist() == [0, 0, 0, 1]


def test_explicit_model_and_errors(bundle_dir) -> None:  # noqa: ANN001
    """Check that unknown models and missing or mistyped columns raise errors naming them."""
    root, rows = bundle_dir
    bundle = Bundle(root)
    name = "quantity__store=1__brand=tropicana"
    out = bundle.score_model(name, {"price": [1.5, 2.0], "feat": [0, 1]})
    assert out.prediction.shape == (2,) and np.isfinite(out.prediction).all()
    with pytest.raises(ModelNotFound, match="model 'nope' not found"):
        bundle.score_model("nope", {})
    with pytest.raises(InputSchemaError, match=r"missing column\(s\) feat .*schema: price:float32"):
        bundle.score_model(name, {"price": [1.0]})
    with pytest.raises(InputSchemaError, match=r"column 'price' must be numeric"):
        bundle.score_model(name, {"price": ["cheap"], "feat": [1]})
    with pytest.raises(InputSchemaError, match=r"lack the segment column\(s\) brand"):
        bundle.score_frame(rows.drop(columns=["brand"]))


def test_corrupt_manifest_is_a_bundle_error(bundle_dir, tmp_path: Path) -> None:  # noqa: ANN001
    """Check that a broken manifest or a dangling route gives a BundleError, not a traceback."""
    root, _ = bundle_dir
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["routes"][0]["model"] = "ghost"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="names model 'ghost'"):
        Bundle(copy)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="cannot be read as JSON"):
        Bundle(copy)
    with pytest.raises(BundleError, match="manifest.json is missing"):
        Bundle(tmp_path)


def test_cache_stays_within_budget_and_pins(bundle_dir) -> None:  # noqa: ANN001
    """Check that the LRU cache evicts to its byte budget but never evicts pinned models."""
    root, rows = bundle_dir
    probe = Bundle(root)
    one = probe.model("quantity__store=1__brand=tropicana").cost_bytes
    bundle = Bundle(root, max_bytes=3 * one)
    bundle.cache.pin("quantity__global")
    expected = Bundle(root).score_frame(rows).prediction
    got = bundle.score_frame(rows).prediction
    np.testing.assert_allclose(got, expected)
    assert bundle.cache.bytes <= 3 * one + bundle.model("quantity__global").cost_bytes
    assert "quantity__global" in bundle.cache.loaded_names()
    assert bundle.cache.evictions > 0


def test_concurrent_first_use_loads_once(bundle_dir) -> None:  # noqa: ANN001
    """Check that many threads asking for the same cold model trigger one load."""
    from concurrent.futures import ThreadPoolExecutor

    root, _ = bundle_dir
    bundle = Bundle(root)
    calls: list[str] = []
    original = bundle._load

    def counting(name: str):  # noqa: ANN202
        calls.append(name)
        return original(name)

    cache = SessionCache(counting)
    with ThreadPoolExecutor(8) as pool:
        models = list(pool.map(lambda _: cache.get("quantity__store=2__brand=dominicks"),
                               range(16)))
    assert calls == ["quantity__store=2__brand=dominicks"]
    assert all(m is models[0] for m in models)
