"""One onnxruntime session per model, and the byte-bounded cache that holds them.

Everything that can be decided once per model (input names, element types, output
names, cost in memory) is decided here when the model loads, so that scoring a request
only looks the session up, builds the input arrays and calls ``run``.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort

from .errors import InputSchemaError, ModelLoadError
from .manifest import ModelEntry

__all__ = [
    "MISSING_CATEGORY",
    "LoadedModel",
    "SessionCache",
    "bound_run",
    "estimate_resident_bytes",
    "load_model",
    "make_session_options",
]

#: Resident memory of a session ≈ SESSION_BASE_BYTES + SESSION_BYTES_PER_FILE_BYTE × file
#: size, fitted on this project's models with the CPU arena off (docs/design/performance.md,
#: "Memory per session").
SESSION_BASE_BYTES = 75_000
SESSION_BYTES_PER_FILE_BYTE = 7.0
#: What a null in a text input is fed as (training and scoring alike): its own category.
MISSING_CATEGORY = ""


def make_session_options(optimisation: str = "basic") -> ort.SessionOptions:
    """Options for many small sessions in one process.

    One intra-op thread and sequential execution: the models are tiny and parallelism
    comes from requests, mini-batches and workers, not from inside one ``run``. The CPU
    memory arena is off because with it resident memory grows under load/evict churn and
    is not given back. Graph optimisation ``basic`` halves session creation time against
    ``all`` at no measurable cost for tree and linear graphs.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.enable_cpu_mem_arena = False
    options.log_severity_level = 3
    levels = {
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    options.graph_optimization_level = levels[optimisation]
    return options


def estimate_resident_bytes(file_bytes: int) -> int:
    """Resident memory a loaded session is expected to cost, from its file size."""
    return int(SESSION_BASE_BYTES + SESSION_BYTES_PER_FILE_BYTE * file_bytes)


def _text_of(value: Any) -> str:
    """One value of a text input; null, NaN and pandas' NA/NaT are the missing category."""
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and value != value):
        return MISSING_CATEGORY
    if type(value).__name__ in ("NAType", "NaTType"):  # pandas' missing scalars
        return MISSING_CATEGORY
    return str(value)


def as_string_column(values: Any) -> np.ndarray:
    """Values as an ONNX string column; integral numbers lose their ``.0`` like keys do.

    Null, NaN and ``""`` all become :data:`MISSING_CATEGORY`, in training and in every
    scoring path alike, so a model trained on a text column with gaps scores gaps as the
    category it learned for them (and as an unseen category, all zeros, otherwise).
    """
    arr = np.asarray(values)
    if arr.dtype.kind == "f":
        out = np.empty(arr.shape, dtype=object)
        integral = np.isfinite(arr) & (arr == np.round(arr))
        out[integral] = arr[integral].astype(np.int64).astype(str)
        out[~integral] = arr[~integral].astype(str)
        out[np.isnan(arr)] = MISSING_CATEGORY
        return out
    if arr.dtype.kind in "iub":
        return arr.astype(str).astype(object)
    if arr.dtype.kind in "US":
        return arr.astype(object)
    return np.array([_text_of(v) for v in arr.ravel()], dtype=object).reshape(arr.shape)


def as_float_column(values: Any, column: str, model: LoadedModel) -> np.ndarray:
    """Values as float32, or an :class:`InputSchemaError` naming the column."""
    try:
        arr = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise InputSchemaError(
            f"column '{column}' must be numeric for model '{model.name}' "
            f"(schema: {model.schema_text()}): {exc}"
        ) from None
    return arr


def fills_of(entry: ModelEntry, input_names: Sequence[str], string_inputs: frozenset[str]
             ) -> tuple[tuple[str, np.float32], ...]:
    """The numeric inputs a model fills with its training medians, and the medians."""
    return tuple((c, np.float32(entry.impute[c])) for c in input_names
                 if c in entry.impute and c not in string_inputs)


def fill_gaps(feed: dict[str, np.ndarray], fills: Sequence[tuple[str, np.float32]]
              ) -> dict[str, np.ndarray]:
    """``feed`` with the NaN of each filled input replaced by its median, on copies: the
    input contract leaves a null as NaN for every model, so that a blend's two members,
    trained with different medians (or none), each see the gap their own way."""
    out = feed
    for column, median in fills:
        values = feed.get(column)
        if values is None or values.dtype.kind != "f":
            continue
        gaps = np.isnan(values)
        if gaps.any():
            if out is feed:
                out = dict(feed)
            out[column] = np.where(gaps, median, values).astype(values.dtype, copy=False)
    return out


@dataclass
class LoadedModel:
    """A ready session plus everything resolved once at load time."""

    name: str
    session: ort.InferenceSession
    entry: ModelEntry
    input_names: tuple[str, ...]
    string_inputs: frozenset[str]
    output_names: tuple[str, ...]
    cost_bytes: int
    #: ``outputs(feed)``: the session's raw outputs for a ready feed (the hot path).
    outputs: Callable[[dict[str, np.ndarray]], list[Any]] = field(init=False, repr=False)
    classifier: bool = field(init=False)
    #: The first output is float32 (every converted regressor): float64 adds no digits.
    float32_output: bool = False
    #: Numeric inputs filled with training medians at run time (``missing: impute``).
    _fills: tuple[tuple[str, np.float32], ...] = field(init=False, repr=False, default=())
    #: The model file, and the options its session was made with: what a graph built
    #: around the model (a forecast's whole recursion) is read from and made with.
    path: str = ""
    options: ort.SessionOptions | None = field(default=None, repr=False, compare=False)
    #: Objects made once per loaded model by its users (a forecast's recursion runner),
    #: so that they live exactly as long as the model stays loaded; they must not refer
    #: to the model strongly (a cycle would leave an evicted session to the cyclic GC).
    companions: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        # onnxruntime's Python ``run`` re-validates the feed's names and rebuilds the
        # output list on every call: its pybind session takes the call directly
        # (the public path is kept for builds without it).
        # Neither closure refers to ``self``: a cycle would leave evicted sessions to the
        # cyclic garbage collector (see ``serve.registry.ServedModel``).
        session = self.session
        raw = getattr(session, "_sess", None)
        names = list(self.output_names)
        self.classifier = self.entry.kind == "classification"
        plain: Callable[[dict[str, np.ndarray]], list[Any]] = (
            (lambda feed: raw.run(names, feed, None)) if raw is not None and names
            else (lambda feed: session.run(None, feed)))
        fills = self._fills = fills_of(self.entry, self.input_names, self.string_inputs)
        self.outputs = plain if not fills else (lambda feed: plain(fill_gaps(feed, fills)))

    def filled(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``feed`` with its gaps (NaN) filled by this model's training medians when it
        was trained with them (``impute``); the feed itself when not."""
        return fill_gaps(feed, self._fills) if self._fills else feed

    @property
    def kind(self) -> str:
        return self.entry.kind

    def schema_text(self) -> str:
        return ", ".join(f"{c.name}:{c.dtype}" for c in self.entry.inputs)

    def check_columns(self, columns: Sequence[str], allow_extra: bool = True) -> None:
        """Raise :class:`InputSchemaError` naming missing (or extra) columns."""
        present = set(columns)
        missing = [c for c in self.input_names if c not in present]
        if missing:
            raise InputSchemaError(
                f"missing column(s) {', '.join(missing)} for model '{self.name}' "
                f"(schema: {self.schema_text()})"
            )
        if not allow_extra:
            extra = [c for c in columns if c not in set(self.input_names)]
            if extra:
                raise InputSchemaError(
                    f"unexpected column(s) {', '.join(extra)} for model '{self.name}' "
                    f"(schema: {self.schema_text()})"
                )

    def build_feed(self, columns: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Turn raw column values (lists or arrays of equal length) into ONNX inputs."""
        feed: dict[str, np.ndarray] = {}
        for name in self.input_names:
            try:
                values = columns[name]
            except KeyError:
                self.check_columns(list(columns))
                raise
            if name in self.string_inputs:
                arr = as_string_column(values)
            else:
                arr = as_float_column(values, name, self)
            feed[name] = arr.reshape(-1, 1)
        return feed

    def run(self, feed: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        """Score a feed: returns predictions (n,) and class probabilities (n, k) or None."""
        outputs = self.outputs(dict(feed))
        if self.classifier:
            labels = np.asarray(outputs[0]).ravel()
            probabilities = np.asarray(outputs[1], dtype=np.float64)
            return labels, probabilities
        return np.asarray(outputs[0], dtype=np.float64).ravel(), None

    def predict_columns(self, columns: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray | None]:
        return self.run(self.build_feed(columns))


def _cpu_device() -> Any:
    """onnxruntime's C-level CPU device (made once; ``None`` in a build without it)."""
    global _CPU_DEVICE
    if _CPU_DEVICE is None:
        try:
            _CPU_DEVICE = ort.OrtDevice.make("cpu", 0)._get_c_device()
        except (AttributeError, TypeError):
            _CPU_DEVICE = False
    return _CPU_DEVICE or None


_CPU_DEVICE: Any = None


def bound_run(session: ort.InferenceSession, inputs: Mapping[str, np.ndarray], output: str,
              out: np.ndarray) -> Callable[[], None] | None:
    """A ``run`` of ``session`` reading ``inputs`` and writing its ``output`` into ``out``
    in place (onnxruntime's I/O binding), so that a caller that runs one model many times
    over buffers it rewrites converts no feed per run; ``None`` where this onnxruntime
    build lacks the calls. Inputs are numeric (onnxruntime binds no text), and they and
    ``out`` C-contiguous; the returned function holds them."""
    raw_session = getattr(session, "_sess", None)
    device = _cpu_device()
    binding_type = getattr(getattr(ort, "capi", None), "onnxruntime_pybind11_state", None)
    if raw_session is None or device is None or binding_type is None:
        return None
    binding = binding_type.SessionIOBinding(raw_session)
    for name, values in inputs.items():
        binding.bind_input(name, device, values.dtype, list(values.shape), values.ctypes.data)
    binding.bind_output(output, device, out.dtype, list(out.shape), out.ctypes.data)
    run = raw_session.run_with_iobinding
    kept = (dict(inputs), out)

    def bound() -> None:
        run(binding, None)
        _ = kept  # the buffers the binding points into live as long as it

    return bound


def load_model(entry: ModelEntry, path: str | os.PathLike[str],
               options: ort.SessionOptions | None = None,
               session: ort.InferenceSession | None = None) -> LoadedModel:
    """Create the session for one manifest entry and resolve its inputs and outputs
    (``session``: one already made from the file's bytes with ``options``, as an
    export that has just checked the file hands it on)."""
    options = options or make_session_options()
    if session is None:
        try:
            session = ort.InferenceSession(os.fspath(path), sess_options=options,
                                           providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own non-exported exception types
            raise ModelLoadError(f"model '{entry.name}' cannot be loaded from {path}: "
                                 f"{exc}") from exc
    onnx_inputs = {i.name: i.type for i in session.get_inputs()}
    for column in entry.inputs:
        if column.name not in onnx_inputs:
            raise ModelLoadError(
                f"model '{entry.name}': manifest input '{column.name}' is not an input of "
                f"the ONNX graph ({', '.join(onnx_inputs)})"
            )
    string_inputs = frozenset(n for n, t in onnx_inputs.items() if t == "tensor(string)")
    file_bytes = os.path.getsize(path)
    outputs = session.get_outputs()
    return LoadedModel(
        name=entry.name,
        session=session,
        entry=entry,
        input_names=tuple(c.name for c in entry.inputs),
        string_inputs=string_inputs,
        output_names=tuple(o.name for o in outputs),
        cost_bytes=estimate_resident_bytes(file_bytes),
        float32_output=bool(outputs) and outputs[0].type == "tensor(float)",
        path=os.fspath(path),
        options=options,
    )


class SessionCache:
    """LRU cache of loaded models bounded by their resident cost in bytes.

    ``max_bytes=None`` means unbounded. Pinned models (the fallbacks) are never evicted.
    Each model has its own load lock, so concurrent first requests for one model load it
    once, while loads of other models and hits proceed in parallel: the cache-wide lock
    is only held for dictionary updates, never during a load.
    """

    def __init__(self, loader: Callable[[str], LoadedModel], max_bytes: int | None = None) -> None:
        self._loader = loader
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, LoadedModel] = OrderedDict()
        self._pinned: set[str] = set()
        self._lock = threading.Lock()
        self._load_locks: dict[str, threading.Lock] = {}
        self.bytes = 0
        self.loads = 0
        self.evictions = 0

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __len__(self) -> int:
        return len(self._items)

    def loaded_names(self) -> list[str]:
        with self._lock:
            return list(self._items)

    def pin(self, name: str) -> LoadedModel:
        """Load ``name`` and keep it resident whatever the budget."""
        with self._lock:
            self._pinned.add(name)
        return self.get(name)

    def peek(self, name: str) -> LoadedModel | None:
        """The model if it is resident (marked as just used), else ``None``; never loads."""
        model = self._items.get(name)
        if model is not None:
            with self._lock:
                if name in self._items:
                    self._items.move_to_end(name)
        return model

    def get_many(self, names: Sequence[str]) -> list[LoadedModel]:
        """The models called ``names``, in order: resident ones marked as used under one
        lock (a batch touches a thousand models per chunk), the others loaded."""
        found: list[LoadedModel | None] = []
        with self._lock:
            for name in names:
                model = self._items.get(name)
                if model is not None:
                    self._items.move_to_end(name)
                found.append(model)
        return [model if model is not None else self.get(name)
                for name, model in zip(names, found, strict=True)]

    def get(self, name: str) -> LoadedModel:
        """Return the loaded model, loading it (once) if needed."""
        model = self.peek(name)
        if model is not None:
            return model
        with self._lock:
            load_lock = self._load_locks.setdefault(name, threading.Lock())
        with load_lock:
            model = self._items.get(name)
            if model is not None:
                return model
            model = self._loader(name)
            with self._lock:
                self._items[name] = model
                self.bytes += model.cost_bytes
                self.loads += 1
                self._evict_locked(keep=name)
            return model

    def unload(self, name: str) -> bool:
        """Drop ``name`` from memory (it is reloaded on next use); False if not loaded."""
        with self._lock:
            self._pinned.discard(name)
            model = self._items.pop(name, None)
            if model is None:
                return False
            self.bytes -= model.cost_bytes
            return True

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.bytes = 0

    def _evict_locked(self, keep: str) -> None:
        if self.max_bytes is None or self.bytes <= self.max_bytes:
            return
        for name in list(self._items):
            if self.bytes <= self.max_bytes:
                break
            if name == keep or name in self._pinned:
                continue
            evicted = self._items.pop(name)
            self.bytes -= evicted.cost_bytes
            self.evictions += 1
