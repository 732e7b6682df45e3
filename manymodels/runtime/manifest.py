"""Read ``manifest.json``: the contract between training, packing and every scorer.

A run directory (``manymodels train``) and a bundle directory (``manymodels package``)
share this one schema, so every scorer reads both. Only the standard library is used:
this file travels inside every bundle.

Schema (version 1)::

    {
      "schema_version": 1,
      "kind": "run" | "bundle",
      "name": str | null, "version": str | null, "created_at": ISO-8601 str,
      "run_id": str,
      "target": str, "task": "regression" | "classification",
      "segment_columns": [str, ...],
      "levels": [[str, ...], ..., []],      # fallback chain, finest first, [] = global
      "routes": [{"level": int, "key": [str, ...], "model": str,
                  "blend": {"with": str, "weight": float}}, ...],   # blend: optional
      # a blended level-0 route scores weight · model + (1 − weight) · with (regression);
      # its model serves that route only
      "models": {name: {"file": "models/<name>.onnx", "sha256": str, "bytes": int,
                        "level": int, "key": {col: str}, "algorithm": str,
                        "inputs": [{"name": str, "dtype": "float32" | "string"}],
                        "output": {"kind": "regression"} |
                                  {"kind": "classification", "classes": [...]},
                        "metrics": {...}, "rows": int, "fingerprint": str,
                        "tags": {...}, "feature_stats": {...},
                        "accepts_missing": bool,        # NaN inputs scored as trained
                        "impute": {col: float}}},       # training medians (missing: impute)
      "failed": [{"key": {col: str}, "reason": str}, ...],
    }

Segment key values are stored as normalised strings (:func:`normalise_key_value`), so
``42``, ``42.0`` and ``"42"`` name the same store.

``accepts_missing`` is measured at export (the ONNX graph, fed NaN, answers finite
values equal to the native model's); manifests written before it existed get it from
the algorithm (:data:`ACCEPTS_MISSING_BY_DEFAULT`: LightGBM and the mean baseline, the
two whose exported graphs were measured to route NaN as the native model does).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import BundleError

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
_INTEGRAL_TEXT = re.compile(r"-?[0-9]+\.0*")
#: Algorithms whose models accept missing values when the manifest does not say.
ACCEPTS_MISSING_BY_DEFAULT = frozenset({"lightgbm", "mean"})

__all__ = [
    "MANIFEST_FILE",
    "SCHEMA_VERSION",
    "Blend",
    "InputColumn",
    "Manifest",
    "ModelEntry",
    "blend_label",
    "normalise_key_value",
    "read_manifest",
]


def normalise_key_value(value: Any) -> str:
    """Turn one segment-key value into its canonical string.

    Integral floats lose their ``.0`` (CSV readers and JSON clients turn ``42`` into
    ``42.0``), and so does text spelling one (``"42.0"``, as a CSV read as text holds
    it), booleans and everything else use ``str``. Nulls are refused by callers before
    they get here.
    """
    if isinstance(value, str):
        if "." in value and _INTEGRAL_TEXT.fullmatch(value):
            return value.split(".", 1)[0]
        return value
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return str(int(value))
    if hasattr(value, "item"):  # numpy scalar
        return normalise_key_value(value.item())
    return str(value)


@dataclass(frozen=True)
class InputColumn:
    """One raw column a model takes, with the ONNX element type it is fed as."""

    name: str
    dtype: str  # "float32" or "string"


@dataclass(frozen=True)
class ModelEntry:
    """What the manifest says about one model file."""

    name: str
    file: str
    inputs: tuple[InputColumn, ...]
    kind: str
    classes: tuple[Any, ...] | None
    level: int
    key: dict[str, str]
    sha256: str | None
    bytes: int
    algorithm: str
    raw: dict[str, Any] = field(repr=False, compare=False)
    #: The model scores NaN inputs as its native self would (measured at export).
    accepts_missing: bool = False
    #: Training medians that replace missing values (``missing: impute`` in the trainer).
    impute: dict[str, float] = field(default_factory=dict)

    @property
    def input_names(self) -> list[str]:
        return [c.name for c in self.inputs]

    def schema_text(self) -> str:
        return ", ".join(f"{c.name}:{c.dtype}" for c in self.inputs)


@dataclass(frozen=True)
class Blend:
    """A blended route: its model's predictions mixed with those of a coarser model."""

    partner: str  # the coarser model ("with")
    weight: float  # weight of the route's own model

    def label(self, model: str) -> str:
        """What an answer's ``model`` field says for rows of blended ``model``: both
        members and their weights (one member alone would name a different number)."""
        return blend_label(model, self.partner, self.weight)


def blend_label(model: str, partner: str, weight: float) -> str:
    """``blend(0.75*<model>+0.25*<partner>)``: the route a blended row was scored by
    (weights to six significant digits; model names hold no ``*``, ``+`` or parentheses)."""
    return f"blend({weight:g}*{model}+{1 - weight:g}*{partner})"


@dataclass
class Manifest:
    """The parsed manifest with its routing table indexed for lookups."""

    root: Path
    raw: dict[str, Any]
    segment_columns: list[str]
    levels: list[list[str]]
    models: dict[str, ModelEntry]
    routes: list[dict[str, str]]  # one dict per level: joined key -> model name
    #: Models scored as a blend (model name -> partner and weight); empty for most bundles.
    blends: dict[str, Blend] = field(default_factory=dict)

    def answer_name(self, name: str) -> str:
        """The ``model`` an answer names for rows routed to model ``name``: the name
        itself, or for a blended model its blend (:func:`blend_label`)."""
        blend = self.blends.get(name)
        return name if blend is None else blend.label(name)

    def answer_names(self, names: Iterable[str | None]) -> list[str | None]:
        """:meth:`answer_name` of each name (``None`` stays ``None``)."""
        blends = self.blends
        if not blends:
            return list(names)
        return [n if n is None or n not in blends else blends[n].label(n) for n in names]

    def inputs_of(self, name: str) -> list[str]:
        """Input columns scoring model ``name`` needs, its blend partner's included."""
        names = self.models[name].input_names
        blend = self.blends.get(name)
        if blend is None:
            return names
        return list(dict.fromkeys([*names, *self.models[blend.partner].input_names]))

    @property
    def name(self) -> str:
        return str(self.raw.get("name") or self.root.name)

    @property
    def task(self) -> str:
        return str(self.raw.get("task", "regression"))

    @property
    def target(self) -> str:
        return str(self.raw.get("target", "prediction"))

    def level_key(self, level: int, full_key: Mapping[str, str]) -> str:
        """Join the values of ``full_key`` for the columns of ``level`` into a lookup key."""
        return "\x1f".join(full_key[c] for c in self.levels[level])

    def resolve(self, full_key: Mapping[str, str]) -> tuple[str | None, bool]:
        """Walk the fallback chain for one normalised segment key.

        Returns the model name (or ``None`` when no level serves it) and whether a
        coarser level than the segment itself was used.
        """
        for level, table in enumerate(self.routes):
            name = table.get(self.level_key(level, full_key))
            if name is not None:
                return name, level > 0
        return None, True


def _parse_model(name: str, entry: Mapping[str, Any]) -> ModelEntry:
    try:
        inputs = tuple(InputColumn(str(i["name"]), str(i["dtype"])) for i in entry["inputs"])
        output = entry.get("output", {"kind": "regression"})
        classes = output.get("classes")
        algorithm = str(entry.get("algorithm", "unknown"))
        accepts = entry.get("accepts_missing")
        return ModelEntry(
            name=name,
            file=str(entry["file"]),
            inputs=inputs,
            kind=str(output.get("kind", "regression")),
            classes=tuple(classes) if classes is not None else None,
            level=int(entry.get("level", 0)),
            key={str(k): str(v) for k, v in dict(entry.get("key", {})).items()},
            sha256=entry.get("sha256"),
            bytes=int(entry.get("bytes", 0)),
            algorithm=algorithm,
            raw=dict(entry),
            accepts_missing=bool(accepts) if accepts is not None
            else algorithm in ACCEPTS_MISSING_BY_DEFAULT,
            impute={str(k): float(v) for k, v in dict(entry.get("impute") or {}).items()},
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"manifest entry for model '{name}' is malformed: {exc!r}") from exc


def _index_routes(raw_routes: Iterable[Mapping[str, Any]], levels: list[list[str]],
                  models: Mapping[str, ModelEntry]) -> list[dict[str, str]]:
    tables: list[dict[str, str]] = [{} for _ in levels]
    for route in raw_routes:
        level = int(route["level"])
        key = [normalise_key_value(v) for v in route["key"]]
        model = str(route["model"])
        if not 0 <= level < len(levels) or len(key) != len(levels[level]):
            raise BundleError(f"route {dict(route)} does not match the levels {levels}")
        if model not in models:
            raise BundleError(f"route {dict(route)} names model '{model}', not in the manifest")
        tables[level]["\x1f".join(key)] = model
    return tables


def _parse_blend(route: Mapping[str, Any], models: Mapping[str, ModelEntry]) -> Blend:
    blend = route["blend"]
    where = f"route {dict(route)}"
    if not isinstance(blend, Mapping) or "with" not in blend or "weight" not in blend:
        raise BundleError(f"{where}: 'blend' must be {{\"with\": model, \"weight\": w}}")
    partner, model = str(blend["with"]), str(route["model"])
    try:
        weight = float(blend["weight"])
    except (TypeError, ValueError):
        raise BundleError(f"{where}: blend weight {blend['weight']!r} is not a number") from None
    if not 0.0 <= weight <= 1.0:
        raise BundleError(f"{where}: blend weight {weight} is outside [0, 1]")
    if partner not in models:
        raise BundleError(f"{where}: blends with model '{partner}', not in the manifest")
    if int(route["level"]) != 0:
        raise BundleError(f"{where}: only segment routes (level 0) may blend")
    for name in (model, partner):
        if models[name].kind != "regression":
            raise BundleError(f"{where}: model '{name}' is a {models[name].kind} model; "
                              f"blends mix regression predictions only")
    return Blend(partner, weight)


def _index_blends(raw_routes: Iterable[Mapping[str, Any]], models: Mapping[str, ModelEntry]
                  ) -> dict[str, Blend]:
    """Blends by model name; a blended model must serve its one route only (routing
    groups rows by model, so the blend is a property of the model's group)."""
    blends: dict[str, Blend] = {}
    uses: dict[str, int] = {}
    for route in raw_routes:
        model = str(route["model"])
        uses[model] = uses.get(model, 0) + 1
        if route.get("blend") is not None:
            blends[model] = _parse_blend(route, models)
    for model in blends:
        if uses[model] > 1:
            raise BundleError(f"model '{model}' is blended in one route and used by "
                              f"{uses[model] - 1} other route(s); a blended model serves "
                              f"one segment only")
    return blends


def parse_manifest(root: Path, raw: dict[str, Any]) -> Manifest:
    """Validate the parts every scorer relies on and index the routing table."""
    version = raw.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(
            f"{root}: manifest schema_version {version!r} is not supported "
            f"(this runtime reads version {SCHEMA_VERSION})"
        )
    segment_columns = [str(c) for c in raw.get("segment_columns", [])]
    levels = [[str(c) for c in lv] for lv in raw.get("levels", [segment_columns, []])]
    models = {str(n): _parse_model(str(n), e) for n, e in dict(raw.get("models", {})).items()}
    raw_routes = raw.get("routes", [])
    routes = _index_routes(raw_routes, levels, models)
    return Manifest(root, raw, segment_columns, levels, models, routes,
                    _index_blends(raw_routes, models))


def read_manifest(root: str | Path) -> Manifest:
    """Read and validate ``root/manifest.json`` of a run or bundle directory."""
    root = Path(root)
    path = root / MANIFEST_FILE
    if not path.is_file():
        raise BundleError(f"{root} is not a manymodels run or bundle: {MANIFEST_FILE} is missing")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path} cannot be read as JSON: {exc}") from exc
    return parse_manifest(root, raw)
