"""Model name → ready session, loaded lazily off the event loop, bounded in bytes.

The registry wraps a :class:`~manymodels.runtime.Bundle` and gives its session cache a
loader that also prepares what the HTTP routes need per model (allowed columns, the V2
metadata body), so that per request the server only looks the model up. A hit is a
dictionary lookup on the event loop; a miss creates the session in a small thread pool,
and concurrent first requests for one model share a single load. A model that fails to
load is remembered with its reason and answers 503, while every other model keeps
serving; an explicit load retries it.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from manymodels.errors import (
    BundleError,
    ManyModelsError,
    ModelLoadError,
    ModelNotFound,
    SpecError,
)
from manymodels.runtime import Bundle, LoadedModel, SessionCache, load_model
from manymodels.runtime.manifest import ModelEntry

from .errors import ModelUnavailable
from .integrity import FileChecks
from .observe import Telemetry

__all__ = ["ModelRegistry", "ServedModel", "SharedSessions", "SharedView", "v2_datatype"]

log = logging.getLogger("manymodels.serve")

_ONNX_TO_V2 = {"tensor(float)": "FP32", "tensor(double)": "FP64", "tensor(int64)": "INT64",
               "tensor(int32)": "INT32", "tensor(string)": "BYTES", "tensor(bool)": "BOOL",
               "tensor(float16)": "FP16"}
_NUMPY_TO_V2 = {"f": {4: "FP32", 8: "FP64", 2: "FP16"}, "i": {8: "INT64", 4: "INT32",
                2: "INT16", 1: "INT8"}, "u": {8: "UINT64", 4: "UINT32", 2: "UINT16",
                1: "UINT8"}, "b": {1: "BOOL"}}


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None


_MALLOC_TRIM = _find_malloc_trim()
#: Evictions between two ``malloc_trim`` calls.
TRIM_EVERY = 256


def v2_datatype(arr: np.ndarray) -> str:
    """Open Inference Protocol datatype of a numpy array (``BYTES`` for strings/objects)."""
    return _NUMPY_TO_V2.get(arr.dtype.kind, {}).get(arr.dtype.itemsize, "BYTES")


def _dims(shape: Iterable[Any]) -> list[int]:
    return [d if isinstance(d, int) else -1 for d in shape]


@dataclass
class ServedModel(LoadedModel):
    """A loaded model plus what the routes need, all computed once at load time.

    It *is* the cache entry (a :class:`LoadedModel` subclass) rather than a wrapper
    pointing back at one: a reference cycle would leave every evicted session to the
    cyclic garbage collector, which rarely runs here, and resident memory would climb to
    several times the budget under load/evict churn.
    """

    allowed: frozenset[str] = frozenset()
    """Columns a request naming this model may carry: its inputs and the segment columns."""
    float_inputs: tuple[str, ...] = ()
    v2_metadata: bytes = b""
    loaded_at: float = field(default_factory=time.time)

    @property
    def loaded(self) -> LoadedModel:
        return self


def _prepare(loaded: LoadedModel, entry: ModelEntry, segment_columns: Iterable[str],
             version: str) -> ServedModel:
    """The served model of manifest ``entry`` over the session of ``loaded`` (which
    another bundle's entry for the same file may have loaded)."""
    session = loaded.session
    metadata = {
        "name": entry.name, "versions": [version], "platform": "onnxruntime_onnx",
        "inputs": [{"name": i.name, "datatype": _ONNX_TO_V2.get(i.type, "BYTES"),
                    "shape": _dims(i.shape)} for i in session.get_inputs()],
        "outputs": [{"name": o.name, "datatype": _ONNX_TO_V2.get(o.type, "BYTES"),
                     "shape": _dims(o.shape)} for o in session.get_outputs()],
        "parameters": {"kind": entry.kind, "level": entry.level,
                       "segment": entry.key, "algorithm": entry.algorithm},
    }
    base = {f.name: getattr(loaded, f.name) for f in fields(LoadedModel) if f.init}
    base.update(name=entry.name, entry=entry,
                input_names=tuple(c.name for c in entry.inputs))
    return ServedModel(
        **base,
        allowed=frozenset(loaded.input_names) | frozenset(segment_columns),
        float_inputs=tuple(n for n in loaded.input_names if n not in loaded.string_inputs),
        # an exact-size copy: orjson's bytes keep a buffer many times what one holds
        v2_metadata=bytes(memoryview(orjson.dumps(metadata))),
    )


@dataclass
class _Resident(LoadedModel):
    """One session in the shared cache, with the served model each registry made of it.

    The views hang off the cache entry (not the other way round), so evicting the entry
    frees the session and every view at once, without a reference cycle.
    """

    views: dict[tuple[int, str], ServedModel] = field(default_factory=dict)


def _file_key(entry: ModelEntry, root: Path) -> str:
    """The shared-cache key of a model file: its sha256 (a path if the manifest has none)."""
    return entry.sha256 or f"path:{(root / entry.file).resolve()}"


class SharedSessions:
    """One byte-bounded session cache for every deployment, keyed by model file sha256.

    Registries register where each file of theirs lives; the first load of a file by any
    deployment serves all of them, and pins (fallback models) are counted per registry so
    a file stays pinned while any deployment pins it.
    """

    def __init__(self, max_bytes: int | None = None, load_threads: int = 2,
                 on_load: Callable[[float], None] | None = None) -> None:
        self.cache = SessionCache(self._load, max_bytes=max_bytes)
        #: Threads that create sessions, for every deployment (one pool, not one each).
        self.executor = ThreadPoolExecutor(load_threads, thread_name_prefix="manymodels-load")
        self._sources: dict[str, dict[int, tuple[ModelEntry, Path, Any]]] = {}
        #: sha256 verdicts of model files, by inode and mtime (checked on every load).
        self.checks = FileChecks()
        self._pins: dict[str, set[int]] = {}
        self._lock = threading.Lock()
        #: Called with the seconds each session took to create (the metrics' histogram).
        self.on_load = on_load
        self._reported_evictions = 0
        #: Sessions created per model file since start (a reload after eviction counts).
        self.loads_by_key: Counter[str] = Counter()

    def register(self, token: int, key: str, entry: ModelEntry, path: Path,
                 options: Any) -> None:
        with self._lock:
            self._sources.setdefault(key, {})[token] = (entry, path, options)

    def _load(self, key: str) -> LoadedModel:
        with self._lock:
            sources = list(self._sources.get(key, {}).values())
        if not sources:
            raise BundleError(f"no deployment serves model file {key} any more")
        entry, path, options = sources[0]
        self.checks.check(entry, path)  # a missing or swapped file: BundleError, 503
        started = time.perf_counter()
        loaded = load_model(entry, path, options)
        if self.on_load is not None:
            self.on_load(time.perf_counter() - started)
        with self._lock:
            self.loads_by_key[key] += 1
        base = {f.name: getattr(loaded, f.name) for f in fields(LoadedModel) if f.init}
        return _Resident(**base)

    def report(self, telemetry: Telemetry) -> None:
        """Tell ``telemetry`` what the cache holds now (after a load, eviction or unload);
        evictions are counted once here, whichever deployment's load caused them."""
        cache = self.cache
        with self._lock:
            new = cache.evictions - self._reported_evictions
            self._reported_evictions = cache.evictions
        telemetry.cache_state(len(cache), cache.bytes, cache.max_bytes, new)

    def pin(self, token: int, key: str) -> LoadedModel:
        with self._lock:
            self._pins.setdefault(key, set()).add(token)
        return self.cache.pin(key)

    def release(self, token: int) -> None:
        """Forget a closed registry: its views, its files and pins no other registry holds.

        A removed deployment's models leave memory at once, except the files another
        deployment also serves, which stay loaded for it."""
        drop = []
        with self._lock:
            for key, sources in list(self._sources.items()):
                if sources.pop(token, None) is None:
                    continue
                resident = self.cache._items.get(key)  # no LRU bump for a leaving registry
                if isinstance(resident, _Resident):
                    for view in [v for v in resident.views if v[0] == token]:
                        resident.views.pop(view, None)
                if not sources:
                    del self._sources[key]
                    drop.append(key)
            for key, owners in list(self._pins.items()):
                if token in owners and len(owners) == 1:
                    del self._pins[key]
                    drop.append(key)  # unpinned the only way the cache knows: reload on use
                owners.discard(token)
        for key in set(drop):
            self.cache.unload(key)

    def resident(self, key: str) -> LoadedModel | None:
        """The session of a file if it is loaded, without marking it used."""
        return self.cache._items.get(key)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    def stats(self) -> dict[str, Any]:
        return {"files": len(self._sources), "loaded": len(self.cache), "bytes": self.cache.bytes,
                "max_bytes": self.cache.max_bytes, "loads": self.cache.loads,
                "evictions": self.cache.evictions}


class SharedView:
    """The :class:`SessionCache` interface by model name, for one registry, over the
    shared cache: a hit is two dictionary lookups and the view of that registry."""

    _tokens = iter(range(1, 1 << 62))

    def __init__(self, shared: SharedSessions, bundle: Bundle,
                 prepare: Callable[[LoadedModel, ModelEntry], ServedModel]) -> None:
        self.shared = shared
        self.token = next(self._tokens)
        self._cache = shared.cache
        self._entries = bundle.manifest.models
        self._prepare = prepare
        self._keys: dict[str, str] = {}
        for name, entry in self._entries.items():
            key = self._keys[name] = _file_key(entry, bundle.root)
            shared.register(self.token, key, entry, bundle.root / entry.file, bundle._options)

    def _view(self, resident: LoadedModel, name: str) -> ServedModel:
        assert isinstance(resident, _Resident)
        view = resident.views.get((self.token, name))
        if view is None:
            view = resident.views[(self.token, name)] = self._prepare(resident,
                                                                      self._entries[name])
        return view

    def __contains__(self, name: object) -> bool:
        return self._keys.get(name) in self._cache  # type: ignore[call-overload]

    def __len__(self) -> int:
        return sum(1 for key in self._keys.values() if key in self._cache)

    @property
    def max_bytes(self) -> int | None:
        return self._cache.max_bytes

    @property
    def bytes(self) -> int:
        return self._cache.bytes

    @property
    def loads(self) -> int:
        return self._cache.loads

    @property
    def evictions(self) -> int:
        return self._cache.evictions

    def key(self, name: str) -> str:
        return self._keys[name]

    def loaded_names(self) -> list[str]:
        return [name for name, key in self._keys.items() if key in self._cache]

    def peek(self, name: str) -> ServedModel | None:
        key = self._keys.get(name)
        resident = None if key is None else self._cache.peek(key)
        return None if resident is None else self._view(resident, name)

    def get(self, name: str) -> ServedModel:
        return self._view(self._cache.get(self._keys[name]), name)

    def get_many(self, names: Sequence[str]) -> list[ServedModel]:
        found = self._cache.get_many([self._keys[n] for n in names])
        return [self._view(r, n) for r, n in zip(found, names, strict=True)]

    def pin(self, name: str) -> ServedModel:
        return self._view(self.shared.pin(self.token, self._keys[name]), name)

    def unload(self, name: str) -> bool:
        return self._cache.unload(self._keys[name])

    def close(self) -> None:
        self.shared.release(self.token)


class ModelRegistry:
    """The models of one bundle, served by name.

    Parameters
    ----------
    root
        Bundle directory.
    max_bytes
        Budget of the cache in estimated resident bytes (``None``: unbounded).
    optimisation
        onnxruntime graph optimisation level.
    load_threads
        Threads that create sessions.
    inline_rows
        Requests with more rows than this are scored in a thread, off the event loop.
    shared
        The session cache of the endpoint, when several deployments share one (then
        ``max_bytes`` is that cache's budget, not this registry's).
    telemetry
        Where cache events and scored rows are reported (metrics, stats, prediction log).
    strict_columns
        Refuse rows carrying columns no model takes (default: ignore them).
    """

    def __init__(self, root: str | Path, max_bytes: int | None = None,
                 optimisation: str = "basic", load_threads: int = 2,
                 inline_rows: int = 2048, shared: SharedSessions | None = None,
                 telemetry: Telemetry | None = None,
                 strict_columns: bool = False) -> None:
        self.bundle = Bundle(root, max_bytes=max_bytes, optimisation=optimisation,
                             strict_columns=strict_columns)
        manifest = self.bundle.manifest
        self.version = str(manifest.raw.get("version") or "1")
        self.task = manifest.task
        self.strict_columns = strict_columns
        self.segment_columns = tuple(manifest.segment_columns)
        #: Segment columns: routing refuses null keys there, so the contract need not.
        self.key_columns = frozenset(self.segment_columns)
        self.bundle_columns = self.bundle.allowed_columns
        self._owns_shared = shared is None
        self.shared = shared if shared is not None else SharedSessions(max_bytes, load_threads)
        self.cache = SharedView(self.shared, self.bundle, self._prepare)
        self.bundle.cache = self.cache  # type: ignore[assignment]  # Bundle's helpers see it too
        self.failed: dict[str, str] = {}
        self.pinned: tuple[str, ...] = ()
        self.preloading = False
        self.inline_rows = inline_rows
        self._executor = self.shared.executor
        self._inflight: dict[str, asyncio.Future[ServedModel]] = {}
        self._lock = threading.Lock()
        self._trimmed_at = 0
        self.telemetry = telemetry if telemetry is not None else Telemetry()
        self.load_failures = 0

    # -- loading ---------------------------------------------------------------------------
    def _prepare(self, loaded: LoadedModel, entry: ModelEntry) -> ServedModel:
        return _prepare(loaded, entry, self.segment_columns, self.version)

    def _trim_after_evictions(self) -> None:
        """Give freed session memory back to the OS every :data:`TRIM_EVERY` evictions.

        glibc keeps the memory of evicted sessions in its heaps; a trim gives it back once
        churn pauses. ``malloc_trim`` runs here, in a loading thread, never on the loop.
        """
        if _MALLOC_TRIM is None or self.cache.evictions - self._trimmed_at < TRIM_EVERY:
            return
        with self._lock:
            if self.cache.evictions - self._trimmed_at < TRIM_EVERY:
                return
            self._trimmed_at = self.cache.evictions
        _MALLOC_TRIM(0)

    def knows(self, name: str) -> bool:
        return name in self.bundle.manifest.models

    def load_sync(self, name: str) -> ServedModel:
        """Load (or find) ``name`` in the calling thread; raise 404/503-mapped errors."""
        if not self.knows(name):
            raise ModelNotFound(name, known=len(self.bundle.manifest.models))
        try:
            loaded = self.cache.get(name)
            self._trim_after_evictions()
        except (ModelLoadError, BundleError) as exc:
            self._load_failed(name, exc.message)
            log.warning("model %s failed to load: %s", name, exc.message)
            raise ModelUnavailable(f"model '{name}' is unavailable: {exc.message}") from exc
        finally:
            self.shared.report(self.telemetry)
        if name in self.failed:
            with self._lock:
                self.failed.pop(name, None)
        assert isinstance(loaded, ServedModel)
        return loaded

    def _load_failed(self, name: str, message: str) -> None:
        with self._lock:
            self.failed[name] = message
            self.load_failures += 1
        self.telemetry.load_failed()

    def cached(self, name: str) -> ServedModel | None:
        """The model if it is resident (and marked as just used), else ``None``."""
        loaded = self.cache.peek(name)
        if loaded is None:
            return None
        self.telemetry.hit()
        return loaded

    async def get(self, name: str) -> ServedModel:
        """The served model ``name``; a miss loads it in a thread, once for all callers."""
        hit = self.cached(name)
        if hit is not None:
            return hit
        if not self.knows(name):
            raise ModelNotFound(name, known=len(self.bundle.manifest.models))
        self.telemetry.miss()
        future = self._inflight.get(name)
        if future is None:
            loop = asyncio.get_running_loop()
            future = asyncio.ensure_future(loop.run_in_executor(self._executor, self.load_sync,
                                                                name))
            self._inflight[name] = future
            future.add_done_callback(lambda _f: self._inflight.pop(name, None))
        return await asyncio.shield(future)

    async def run_in_thread(self, func: Any, *args: Any) -> Any:
        """Run blocking work (a large request, a bulk load) off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, func, *args)

    def unload(self, name: str) -> bool:
        if not self.knows(name):
            raise ModelNotFound(name, known=len(self.bundle.manifest.models))
        unloaded = self.cache.unload(name)
        self.shared.report(self.telemetry)
        return unloaded

    # -- start-up --------------------------------------------------------------------------
    def pin_fallbacks(self) -> list[str]:
        """Load the fallback models and keep them resident; returns those that loaded."""
        pinned = []
        for name in self.bundle.fallback_models():
            try:
                self.cache.pin(name)
                pinned.append(name)
            except (ModelLoadError, BundleError) as exc:
                self._load_failed(name, exc.message)
                log.warning("fallback model %s failed to load: %s", name, exc.message)
        self.pinned = tuple(pinned)
        self.shared.report(self.telemetry)
        return pinned

    def preload_names(self, preload: str) -> list[str]:
        """Model names that ``--preload`` asks for (``all``, ``none`` or a file of names)."""
        if preload == "none":
            return []
        if preload == "all":
            return self.bundle.model_names
        lines = Path(preload).read_text(encoding="utf-8").splitlines()
        names = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
        unknown = [n for n in names if not self.knows(n)]
        if unknown:
            raise SpecError(f"preload file {preload} names {len(unknown)} model(s) the bundle "
                            f"does not have, e.g. '{unknown[0]}'; GET /models lists the names")
        return names

    def preload(self, names: Iterable[str]) -> int:
        """Load ``names`` in the calling thread; models that fail are recorded, not raised.

        A forecasting bundle with every model loaded also computes each series' forecast
        from its stored origin (:meth:`~manymodels.runtime.forecaster.Forecaster.warm`),
        so that no first request for a series pays for running its models."""
        self.preloading = True
        done = 0
        try:
            for name in names:
                try:
                    self.load_sync(name)
                    done += 1
                except ModelUnavailable:
                    pass
            if self.task == "forecast" and done == len(self.bundle.manifest.models):
                self._warm_forecasts()
        finally:
            self.preloading = False
        return done

    def _warm_forecasts(self) -> None:
        try:
            warmed = self.bundle.forecaster.warm()
        except ManyModelsError as exc:  # the requests that need it will answer the error
            log.warning("stored-origin forecasts not computed at preload: %s", exc)
            return
        log.info("computed the stored-origin forecasts of %d series", warmed)

    # -- reporting -------------------------------------------------------------------------
    def state(self, name: str) -> tuple[str, str]:
        """V2 repository state and reason of one model."""
        if name in self.cache:
            return "READY", ""
        if name in self._inflight:
            return "LOADING", ""
        if name in self.failed:
            return "UNAVAILABLE", self.failed[name]
        return "UNAVAILABLE", "not loaded; loads on first request"

    def stats(self, by_model: bool = False) -> dict[str, Any]:
        """Cache counters; ``by_model`` adds the sessions created per model loaded so far."""
        out: dict[str, Any] = {
            "models": len(self.bundle.manifest.models), "loaded": len(self.cache),
            "bytes": self.cache.bytes, "max_bytes": self.cache.max_bytes,
            "loads": self.cache.loads, "evictions": self.cache.evictions,
            "hits": self.telemetry.stats.hits, "misses": self.telemetry.stats.misses,
            "load_failures": self.load_failures,
            "pinned": list(self.pinned), "failed": len(self.failed)}
        if by_model:
            loads = self.shared.loads_by_key
            out["loads_by_model"] = {name: loads[key] for name in self.bundle.manifest.models
                                     if (key := self.cache.key(name)) in loads}
        return out

    def trim(self) -> None:
        """Give freed heap memory back to the OS (after a burst of loads and drops)."""
        if _MALLOC_TRIM is not None:
            _MALLOC_TRIM(0)

    def close(self) -> None:
        """Let go of this registry's models; the shared pool and cache stay for the others."""
        self.cache.close()
        if self._owns_shared:
            self.shared.close()
