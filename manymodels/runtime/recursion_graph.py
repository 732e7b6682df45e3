"""A lag model's whole recursion as one ONNX graph: the model inside an ONNX ``Loop``.

Run step by step, a recursive forecast costs one onnxruntime ``run`` and a round of
Python per step, more than the model itself for one series. :func:`recursion_graph`
wraps a lag model's graph in a ``Loop`` whose body builds the step's features from a
window of the transformed series (the lags by a gather, the rolling means by a mean, in
float64 like :func:`~.forecast.lag_matrix`, then float32 as the step path feeds them;
the mean adds in another order than numpy's sequential sum, which float32 absorbs), runs
the model's own nodes and shifts its prediction into the window: one ``run`` for the
whole horizon. The graph is written as protobuf bytes here, because the runtime imports
neither ``onnx`` nor ``protobuf`` (a bundle runs on onnxruntime, numpy and pandas
alone); only the top-level fields of the model file are read.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

__all__ = ["LOOP_PREFIX", "model_opset", "recursion_graph"]

#: Prefix of every name this module adds to a graph (the model's own names are kept).
LOOP_PREFIX = "mm_loop_"

# ONNX element types (TensorProto.DataType) and attribute types (AttributeProto.type)
_FLOAT, _INT64, _BOOL, _DOUBLE = 1, 7, 9, 11
_ATTR_INT, _ATTR_GRAPH, _ATTR_INTS = 2, 5, 7
# GraphProto fields kept from the model: node, initializer, value_info, sparse_initializer
_GRAPH_KEPT = {1, 5, 13, 15}
#: Oldest default-domain opset whose operators this module writes (Loop, Split, ...).
_MIN_OPSET = 11


# -- protobuf wire format ----------------------------------------------------------------
def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64 as protobuf writes it (ten bytes)
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _int(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _len(field: int, payload: bytes | str) -> bytes:
    data = payload.encode() if isinstance(payload, str) else payload
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int, bytes, bytes]]:
    """``(field, wire type, value, the whole field's bytes)`` of one message's top level."""
    pos = 0
    while pos < len(buf):
        start = pos
        key, pos = _read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
            payload = _varint(value)
        elif wire == 1:
            payload, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            size, pos = _read_varint(buf, pos)
            payload, pos = buf[pos:pos + size], pos + size
        elif wire == 5:
            payload, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"protobuf wire type {wire} is not read here")
        yield field, wire, payload, buf[start:pos]


# -- ONNX messages -----------------------------------------------------------------------
def _tensor(name: str, values: np.ndarray, elem: int) -> bytes:
    dims = b"".join(_int(1, d) for d in values.shape)
    return dims + _int(2, elem) + _len(8, name) + _len(9, np.ascontiguousarray(values).tobytes())


def _value_info(name: str, elem: int, dims: Sequence[int | str]) -> bytes:
    shape = b"".join(_len(1, _int(1, d) if isinstance(d, int) else _len(2, d)) for d in dims)
    tensor = _int(1, elem) + _len(2, shape)
    return _len(1, name) + _len(2, _len(1, tensor))


def _node(op: str, inputs: Sequence[str], outputs: Sequence[str], *attributes: bytes) -> bytes:
    out = b"".join(_len(1, i) for i in inputs) + b"".join(_len(2, o) for o in outputs)
    out += _len(3, LOOP_PREFIX + outputs[0]) + _len(4, op)
    return out + b"".join(_len(5, a) for a in attributes)


def _attr_int(name: str, value: int) -> bytes:
    return _len(1, name) + _int(3, value) + _int(20, _ATTR_INT)


def _attr_ints(name: str, values: Sequence[int]) -> bytes:
    return _len(1, name) + b"".join(_int(8, v) for v in values) + _int(20, _ATTR_INTS)


def _attr_graph(name: str, graph: bytes) -> bytes:
    return _len(1, name) + _len(6, graph) + _int(20, _ATTR_GRAPH)


def _opsets(model: bytes) -> dict[str, int]:
    found: dict[str, int] = {}
    for field, _, payload, _ in _fields(model):
        if field == 8:
            domain, version = "", 0
            for f, _, value, _ in _fields(payload):
                if f == 1:
                    domain = value.decode()
                elif f == 2:
                    version = _read_varint(value, 0)[0]
            domain = "" if domain == "ai.onnx" else domain
            found[domain] = min(version, found.get(domain, version))  # listed twice: older
    return found


def _model_nodes(graph: bytes, features: Sequence[str]) -> tuple[bytes, str | None]:
    """The fields of the model's graph a loop body keeps and, when one of its nodes only
    joins all of ``features`` in order into a matrix (``Concat`` on axis 1) and nothing
    else reads them, that node's output: the body then builds it directly, without the
    node or a split into single columns."""
    kept: list[bytes] = []
    joined, readers = None, 0
    for field, _, payload, raw in _fields(graph):
        if field not in _GRAPH_KEPT:
            continue
        if field == 1:
            inputs, outputs, op, axis = [], [], "", None
            attributes = []
            for f, _, value, _ in _fields(payload):
                if f == 1:
                    inputs.append(value.decode())
                elif f == 2:
                    outputs.append(value.decode())
                elif f == 4:
                    op = value.decode()
                elif f == 5:
                    attributes.append(value)
            # only a Concat's axis matters: a tree ensemble's large attributes stay unread
            for value in attributes if op == "Concat" else ():
                attr = {a: v for a, _, v, _ in _fields(value)}
                if attr.get(1) == b"axis" and 3 in attr:
                    axis = _read_varint(attr[3], 0)[0]
            if (joined is None and op == "Concat" and inputs == list(features)
                    and axis in (1, (1 << 64) - 1) and len(outputs) == 1):
                joined = outputs[0]
                continue
            readers += any(i in features for i in inputs)
        kept.append(raw)
    if joined is not None and readers:  # the inputs are read elsewhere too: keep all
        return b"".join(raw for f, _, _, raw in _fields(graph) if f in _GRAPH_KEPT), None
    return b"".join(kept), joined


def model_opset(model: bytes) -> int:
    """The default-domain opset a model file imports (0 when it imports none)."""
    return _opsets(model).get("", 0)


def recursion_graph(model: bytes, model_inputs: Sequence[str], output: str,
                    features: Sequence[str], lags: Sequence[int], rolling: Sequence[int],
                    window: int) -> bytes | None:
    """A model file whose one ``run`` is a lag model's whole recursion, or ``None`` when
    the model's file is not one this module can wrap (an old opset or IR version).

    Inputs: ``mm_loop_steps`` (int64 scalar, the horizon), ``mm_loop_window`` (float64
    (n, window): each series' last ``window`` transformed values, newest first: column
    ``k - 1`` is lag ``k``) and, when
    ``features`` has more than the lags and rolling means, ``mm_loop_extra`` (float64
    (steps, n, extra): each step's calendar and known-future values, in ``features``
    order). Output ``mm_loop_forecast``: float32 (steps, n, 1), the model's prediction of
    each step, fed back as the next step's lag 1. ``features`` are the step's feature
    names in order (lags, rolling means, then the extra ones); ``model_inputs`` the
    model's input names (each one of ``features``) and ``output`` its (n, 1) output.
    """
    opset = model_opset(model)
    ir_version = next((_read_varint(p, 0)[0] for f, _, p, _ in _fields(model) if f == 1), 0)
    if opset < _MIN_OPSET or ir_version < 4 or not features:
        return None
    if any(name not in features for name in model_inputs):
        return None
    p = LOOP_PREFIX
    n_extra = len(features) - len(lags) - len(rolling)
    nodes, inits, parts = [], [], []
    if tuple(lags) == tuple(range(1, window + 1)):
        parts.append(f"{p}win")  # the window, newest first, is the lags
    elif lags:
        inits.append(_tensor(f"{p}lag_at", np.asarray([k - 1 for k in lags], np.int64),
                             _INT64))
        nodes.append(_node("Gather", [f"{p}win", f"{p}lag_at"], [f"{p}lags"],
                           _attr_int("axis", 1)))
        parts.append(f"{p}lags")
    for w in rolling:
        source = f"{p}win"
        if w != window:
            source = f"{p}last{w}"
            inits.append(_tensor(f"{source}_at", np.arange(w, dtype=np.int64), _INT64))
            nodes.append(_node("Gather", [f"{p}win", f"{source}_at"], [source],
                               _attr_int("axis", 1)))
        if opset < 18:
            nodes.append(_node("ReduceMean", [source], [f"{p}roll{w}"], _attr_ints("axes", [1]),
                               _attr_int("keepdims", 1)))
        else:
            nodes.append(_node("ReduceMean", [source, f"{p}axis1"], [f"{p}roll{w}"],
                               _attr_int("keepdims", 1)))
        parts.append(f"{p}roll{w}")
    if rolling and opset >= 18:
        inits.append(_tensor(f"{p}axis1", np.asarray([1], np.int64), _INT64))
    if n_extra:
        nodes.append(_node("Gather", [f"{p}extra", f"{p}it"], [f"{p}now"], _attr_int("axis", 0)))
        parts.append(f"{p}now")
    nodes.append(_node("Concat", parts, [f"{p}x64"], _attr_int("axis", 1)))
    model_graph = b""
    for field, _, payload, _ in _fields(model):
        if field == 7:
            model_graph = payload
    kept, joined = _model_nodes(model_graph, features)
    if joined is not None:
        # the model's first step joins its inputs into the matrix built here: feed it
        nodes.append(_node("Cast", [f"{p}x64"], [joined], _attr_int("to", _FLOAT)))
    else:
        nodes.append(_node("Cast", [f"{p}x64"], [f"{p}x"], _attr_int("to", _FLOAT)))
        used = set(model_inputs)
        names = [f if f in used else f"{p}unused{j}" for j, f in enumerate(features)]
        ones = [1] * len(features)
        if opset < 13:
            nodes.append(_node("Split", [f"{p}x"], names, _attr_int("axis", 1),
                               _attr_ints("split", ones)))
        else:
            inits.append(_tensor(f"{p}ones", np.asarray(ones, np.int64), _INT64))
            nodes.append(_node("Split", [f"{p}x", f"{p}ones"], names, _attr_int("axis", 1)))
    tail = [
        _node("Cast", [output], [f"{p}y64"], _attr_int("to", _DOUBLE)),
        _node("Concat", [f"{p}y64", f"{p}older"], [f"{p}win_out"], _attr_int("axis", 1)),
        _node("Identity", [f"{p}cond"], [f"{p}cond_out"]),
    ]
    if window > 1:  # the prediction becomes lag 1, the oldest value leaves
        inits.append(_tensor(f"{p}keep", np.arange(window - 1, dtype=np.int64), _INT64))
        tail.insert(1, _node("Gather", [f"{p}win", f"{p}keep"], [f"{p}older"],
                             _attr_int("axis", 1)))
    else:  # a window of one value is replaced by the prediction
        tail[1] = _node("Identity", [f"{p}y64"], [f"{p}win_out"])
    body = (b"".join(_len(1, x) for x in nodes) + kept + b"".join(_len(1, x) for x in tail)
            + _len(2, f"{p}body") + b"".join(_len(5, t) for t in inits)
            + _len(11, _value_info(f"{p}it", _INT64, []))
            + _len(11, _value_info(f"{p}cond", _BOOL, []))
            + _len(11, _value_info(f"{p}win", _DOUBLE, ["n", window]))
            + _len(12, _value_info(f"{p}cond_out", _BOOL, []))
            + _len(12, _value_info(f"{p}win_out", _DOUBLE, ["n", window]))
            + _len(12, _value_info(output, _FLOAT, ["n", 1])))
    loop = _node("Loop", [f"{p}steps", f"{p}true", f"{p}window"],
                 [f"{p}last_window", f"{p}forecast"], _attr_graph("body", body))
    inputs = [_value_info(f"{p}steps", _INT64, []),
              _value_info(f"{p}window", _DOUBLE, ["n", window])]
    if n_extra:
        inputs.append(_value_info(f"{p}extra", _DOUBLE, ["steps", "n", n_extra]))
    graph = (_len(1, loop) + _len(2, f"{p}recursion")
             + _len(5, _tensor(f"{p}true", np.asarray(True), _BOOL))
             + b"".join(_len(11, i) for i in inputs)
             + _len(12, _value_info(f"{p}forecast", _FLOAT, ["steps", "n", 1])))
    # the model's IR version, opsets and local functions; a new graph
    head = b"".join(raw for f, _, _, raw in _fields(model) if f in (1, 8, 25))
    return head + _len(2, "manymodels") + _len(7, graph)
