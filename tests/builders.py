"""Build small but real bundles fast, for tests and benchmarks of the scoring side.

Each segment gets a real scikit-learn Ridge pipeline converted with skl2onnx, and the
manifest follows the schema of :mod:`manymodels.runtime.manifest`, so serve and batch
can be exercised on hundreds or thousands of models without running the full trainer.
The graph of the first segment is reused for the others with their own weights written
in (the same structure, only the numbers differ), which makes 10,000 models take seconds.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pandas as pd
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType, StringTensorType
from sklearn.compose import ColumnTransformer
from sklearn.linear_model import Ridge
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

NUMERIC = ["price", "feat"]
SEGMENT_COLUMNS = ["store", "brand"]
BRANDS = ["dominicks", "minute.maid", "tropicana"]


def make_rows(n_stores: int, rows_per_segment: int, seed: int = 0) -> pd.DataFrame:
    """A small table with a different price elasticity for every (store, brand)."""
    rng = np.random.default_rng(seed)
    frames = []
    for store in range(1, n_stores + 1):
        for b, brand in enumerate(BRANDS):
            price = rng.uniform(1.0, 4.0, rows_per_segment)
            feat = rng.integers(0, 2, rows_per_segment).astype(float)
            elasticity = -1.0 - 0.02 * store - 0.5 * b
            qty = 9 + elasticity * np.log(price) + 0.4 * feat + rng.normal(0, 0.1, rows_per_segment)
            frames.append(pd.DataFrame({"store": store, "brand": brand, "price": price,
                                        "feat": feat, "quantity": qty}))
    return pd.concat(frames, ignore_index=True)


def _segment_pipeline() -> Pipeline:
    prep = ColumnTransformer([("num", StandardScaler(), NUMERIC)])
    return Pipeline([("prep", prep), ("model", Ridge(alpha=1.0))])


def _global_pipeline() -> Pipeline:
    prep = ColumnTransformer([("num", StandardScaler(), NUMERIC),
                              ("cat", OneHotEncoder(handle_unknown="ignore"), SEGMENT_COLUMNS)])
    return Pipeline([("prep", prep), ("model", Ridge(alpha=1.0))])


def _to_onnx(pipe: Pipeline, numeric: list[str], strings: list[str], name: str) -> onnx.ModelProto:
    types: list[tuple[str, Any]] = [(c, FloatTensorType([None, 1])) for c in numeric]
    types += [(c, StringTensorType([None, 1])) for c in strings]
    return convert_sklearn(pipe, name=name, initial_types=types,
                           target_opset={"": 17, "ai.onnx.ml": 3})


def _set_weights(model: onnx.ModelProto, pipe: Pipeline) -> onnx.ModelProto:
    """Copy a template graph and write one segment's scaler and Ridge weights into it."""
    out = copy.deepcopy(model)
    scaler: StandardScaler = pipe.named_steps["prep"].named_transformers_["num"]
    ridge: Ridge = pipe.named_steps["model"]
    for node in out.graph.node:
        for attr in node.attribute:
            if node.op_type == "Scaler" and attr.name == "offset":
                attr.floats[:] = [float(v) for v in scaler.mean_]
            elif node.op_type == "Scaler" and attr.name == "scale":
                attr.floats[:] = [float(v) for v in 1.0 / scaler.scale_]
            elif node.op_type == "LinearRegressor" and attr.name == "coefficients":
                attr.floats[:] = [float(v) for v in np.ravel(ridge.coef_)]
            elif node.op_type == "LinearRegressor" and attr.name == "intercepts":
                attr.floats[:] = [float(v) for v in np.ravel(ridge.intercept_)]
    return out


def _write(model: onnx.ModelProto, path: Path, meta: dict[str, str]) -> tuple[str, int]:
    del model.metadata_props[:]
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    data = model.SerializeToString()
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest(), len(data)


def _forest_template(rows: pd.DataFrame, trees: int) -> onnx.ModelProto:
    """One random forest (scaler + ``trees`` trees) converted once: a file of the size
    of a real segment model (~150 KB at 20 trees), where the Ridge graphs are ~1 KB."""
    from sklearn.ensemble import RandomForestRegressor

    prep = ColumnTransformer([("num", StandardScaler(), NUMERIC)])
    pipe = Pipeline([("prep", prep), ("model", RandomForestRegressor(
        n_estimators=trees, max_depth=8, random_state=0))]).fit(rows[NUMERIC], rows["quantity"])
    return _to_onnx(pipe, NUMERIC, [], "forest")


def _scaled_forest(template: onnx.ModelProto, factor: float) -> onnx.ModelProto:
    """The template forest with its leaf values scaled: same structure, own numbers."""
    out = copy.deepcopy(template)
    for node in out.graph.node:
        for attr in node.attribute:
            if node.op_type == "TreeEnsembleRegressor" and attr.name == "target_weights":
                attr.floats[:] = [v * factor for v in attr.floats]
    return out


def build_bundle(root: str | os.PathLike[str], n_stores: int = 10, rows_per_segment: int = 40,
                 seed: int = 0, with_global: bool = True,
                 forest: int = 0) -> tuple[Path, pd.DataFrame]:
    """Write a bundle of ``3 × n_stores`` Ridge models (+ a global one) to ``root``.

    ``forest > 0`` makes each segment model a forest of that many trees instead (one
    template with per-segment leaf values), for tests whose subject is memory.
    Returns the bundle path and the training rows (useful as scoring input).
    """
    root = Path(root)
    (root / "models").mkdir(parents=True, exist_ok=True)
    rows = make_rows(n_stores, rows_per_segment, seed)
    models: dict[str, dict[str, Any]] = {}
    routes: list[dict[str, Any]] = []
    template: onnx.ModelProto | None = None
    seg_inputs = [{"name": c, "dtype": "float32"} for c in NUMERIC]
    trees = _forest_template(rows, forest) if forest else None
    for i, ((store, brand), part) in enumerate(rows.groupby(SEGMENT_COLUMNS, sort=True)):
        pipe = _segment_pipeline().fit(part[NUMERIC], part["quantity"])
        name = f"quantity__store={store}__brand={brand}"
        if template is None:
            template = _to_onnx(pipe, NUMERIC, [], "segment")
        graph = _set_weights(template, pipe) if trees is None else _scaled_forest(
            trees, 1 + 0.001 * i)
        sha, size = _write(graph, root / "models" / f"{name}.onnx",
                           {"name": name, "store": str(store), "brand": str(brand)})
        models[name] = {"file": f"models/{name}.onnx", "sha256": sha, "bytes": size, "level": 0,
                        "key": {"store": str(store), "brand": str(brand)}, "algorithm": "ridge",
                        "inputs": seg_inputs, "output": {"kind": "regression"},
                        "rows": len(part), "metrics": {}}
        routes.append({"level": 0, "key": [str(store), str(brand)], "model": name})
    if with_global:
        pipe = _global_pipeline().fit(rows[NUMERIC + SEGMENT_COLUMNS].astype(
            {"store": str}), rows["quantity"])
        name = "quantity__global"
        sha, size = _write(_to_onnx(pipe, NUMERIC, SEGMENT_COLUMNS, "global"),
                           root / "models" / f"{name}.onnx", {"name": name})
        models[name] = {"file": f"models/{name}.onnx", "sha256": sha, "bytes": size, "level": 1,
                        "key": {}, "algorithm": "ridge",
                        "inputs": seg_inputs + [{"name": c, "dtype": "string"}
                                                for c in SEGMENT_COLUMNS],
                        "output": {"kind": "regression"}, "rows": len(rows), "metrics": {}}
        routes.append({"level": 1, "key": [], "model": name})
    manifest = {"schema_version": 1, "kind": "bundle", "name": root.name, "version": "1",
                "created_at": "2026-11-27T00:00:00+00:00", "run_id": "handmade",
                "target": "quantity", "task": "regression", "segment_columns": SEGMENT_COLUMNS,
                "levels": [SEGMENT_COLUMNS, []], "routes": routes, "models": models, "failed": []}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return root, rows


def derive_bundle(source: str | os.PathLike[str], root: str | os.PathLike[str],
                  changed: list[str], shift: float = 1.0, version: str = "2") -> Path:
    """A copy of bundle ``source`` as a new version whose models ``changed`` predict
    ``shift`` more (their Ridge intercept moved); every other model file is identical, so
    the two bundles share those files byte for byte (and by sha256)."""
    import shutil

    source, root = Path(source), Path(root)
    shutil.copytree(source, root)
    manifest = json.loads((root / "manifest.json").read_text())
    for name in changed:
        entry = manifest["models"][name]
        model = onnx.load(root / entry["file"])
        for node in model.graph.node:
            for attr in node.attribute:
                if node.op_type == "LinearRegressor" and attr.name == "intercepts":
                    attr.floats[:] = [v + shift for v in attr.floats]
            if node.op_type == "TreeEnsembleRegressor":
                node.attribute.append(onnx.helper.make_attribute("base_values", [shift]))
        data = model.SerializeToString()
        (root / entry["file"]).write_bytes(data)
        entry["sha256"], entry["bytes"] = hashlib.sha256(data).hexdigest(), len(data)
    manifest["version"] = version
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return root
def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A real self-signed certificate for 127.0.0.1 / localhost (EC P-256, one day).

    Returns ``(certificate, private key)`` PEM paths; clients verify against the
    certificate itself, as they would against a private CA.
    """
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "manymodels test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


#: The models of :func:`build_contract_bundle`: each takes missing values differently.
CONTRACT_MODELS = {
    "lightgbm": ("1", "tropicana"),   # accepts NaN (measured at export)
    "ridge": ("1", "dominicks"),      # refuses NaN
    "impute": ("2", "tropicana"),     # Ridge trained with missing: impute
    "unicode": ("3", "Ünïcødé"),      # a unicode segment key
}


def build_contract_bundle(root: str | os.PathLike[str]) -> tuple[Path, dict[str, str]]:
    """A real run, packed into a real bundle, whose models differ in how they take
    missing values: LightGBM (accepts NaN), Ridge (refuses), Ridge with ``missing:
    impute`` (training medians), a unicode segment, and a global Ridge fallback with
    the segment columns one-hot encoded.

    Each model goes through the trainer's own per-model code (:func:`manymodels.fit.run_job`:
    fit, ONNX export, parity and missing-value probe) and its manifest entry through the
    trainer's (:func:`manymodels.rundir.model_entry`); only the choice of algorithm
    per segment is fixed here, so the test knows which model refuses what. Returns the
    bundle and the model name of each :data:`CONTRACT_MODELS` role (plus ``global``).
    """
    from manymodels.bundle import package_run
    from manymodels.candidates import build_candidates
    from manymodels.datasets import make_oj
    from manymodels.fit import FitContext, FitJob, run_job
    from manymodels.rundir import model_entry
    from manymodels.segment import FeatureSet, model_name
    from manymodels.specs import TrainerSpec

    root = Path(root)
    data = make_oj(stores=3, weeks=40, seed=5)
    data["brand"] = data["brand"].astype(object)
    data.loc[(data["store"] == 3) & (data["brand"] == "minute.maid"), "brand"] = "Ünïcødé"
    frame = pd.DataFrame({"store": data["store"].astype(str), "brand": data["brand"],
                          "price": data["price"].astype(np.float32).astype(float),
                          "feat": data["feat"].astype(float), "quantity": data["quantity"]})
    base = {"target": "quantity", "features": ["price", "feat"], "metric": "rmse"}
    specs = {
        "lightgbm": TrainerSpec(**base, candidates=[
            # min_rows lowered: these 40-row segments exist to give a NaN-accepting model
            {"algorithm": "lightgbm", "min_rows": 2,
             "params": {"n_estimators": 20, "num_leaves": 7}}]),
        "ridge": TrainerSpec(**base, candidates=[{"algorithm": "ridge"}]),
        "impute": TrainerSpec(**base, missing="impute", candidates=[{"algorithm": "ridge"}]),
        "unicode": TrainerSpec(**base, candidates=[{"algorithm": "ridge"}]),
    }
    jobs: list[tuple[str, FitJob, TrainerSpec]] = []
    for role, (store, brand) in CONTRACT_MODELS.items():
        part = frame[(frame["store"] == store) & (frame["brand"] == brand)].reset_index(drop=True)
        holdout = np.arange(len(part)) >= int(len(part) * 0.8)
        key = {"store": store, "brand": brand}
        jobs.append((role, FitJob(model_name("quantity", key), 0, key, part, holdout,
                                  FeatureSet(["price", "feat"], [])), specs[role]))
    holdout = np.arange(len(frame)) % 5 == 0
    jobs.append(("global", FitJob(model_name("quantity", {}), 1, {}, frame, holdout,
                                  FeatureSet(["price", "feat"], ["store", "brand"]),
                                  segment_of_row=np.zeros(len(frame), dtype=int)),
                 specs["ridge"]))
    run = root / "run"
    (run / "models").mkdir(parents=True, exist_ok=True)
    models: dict[str, Any] = {}
    routes: list[dict[str, Any]] = []
    names: dict[str, str] = {}
    for role, job, spec in jobs:
        result = run_job(job, FitContext(spec, build_candidates(spec), {}))
        assert result.status == "ok" and result.onnx is not None, result.reason
        (run / "models" / f"{result.name}.onnx").write_bytes(result.onnx)
        models[result.name] = model_entry(result, spec, ["store", "brand"], job)
        level = job.level
        routes.append({"level": level, "key": list(job.key.values()), "model": result.name})
        names[role] = result.name
    manifest = {"schema_version": 1, "kind": "run", "name": None, "version": None,
                "created_at": "2026-12-01T00:00:00+00:00", "run_id": "contract",
                "target": "quantity", "task": "regression", "segment_columns": ["store", "brand"],
                "levels": [["store", "brand"], []], "routes": routes, "models": models,
                "failed": []}
    (run / "manifest.json").write_text(json.dumps(manifest, indent=1))
    bundle = package_run(run, root / "contract", name="contract").path
    return bundle, names
