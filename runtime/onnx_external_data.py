"""Where an ONNX file says its weights live, read without the onnx package.

An engine folder may come from someone else: before ONNX Runtime opens a graph, the runtime checks
that every external-data location in it names a file inside the engine folder (ONNX Runtime's own
check exists only in its recent versions). The graph files keep their weights outside, so they are
small; this walks their protobuf encoding for TensorProto.external_data entries wherever a tensor
can sit: graph initializers, sparse initializers, node attributes (also inside subgraphs and
functions).
"""

from __future__ import annotations

from collections.abc import Iterator

# Field numbers from onnx.proto (ModelProto, GraphProto, NodeProto, AttributeProto, TensorProto, ...).
_MODEL_GRAPH, _MODEL_FUNCTIONS = 7, 25
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_SPARSE = 1, 5, 15
_FUNCTION_NODE = 7
_NODE_ATTRIBUTE = 5
_ATTR_TENSOR, _ATTR_GRAPH, _ATTR_TENSORS, _ATTR_GRAPHS, _ATTR_SPARSE, _ATTR_SPARSES = 5, 6, 10, 11, 22, 23
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_TENSOR_EXTERNAL_DATA = 13
_ENTRY_KEY, _ENTRY_VALUE = 1, 2
_MAX_DEPTH = 64


class MalformedModel(ValueError):
    pass


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise MalformedModel("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _messages(data: bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(field number, start, end) of every length-delimited field of the message in data[start:end]."""
    pos = start
    while pos < end:
        key, pos = _varint(data, pos)
        wire = key & 7
        if wire == 0:
            _, pos = _varint(data, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _varint(data, pos)
            if pos + length > end:
                raise MalformedModel("a field runs past its message")
            yield key >> 3, pos, pos + length
            pos += length
        else:
            raise MalformedModel(f"unsupported wire type {wire}")
    if pos != end:
        raise MalformedModel("a field runs past its message")


def _tensor_locations(data: bytes, start: int, end: int) -> Iterator[str]:
    for field, s, e in _messages(data, start, end):
        if field == _TENSOR_EXTERNAL_DATA:
            entry = {f: data[a:b] for f, a, b in _messages(data, s, e)}
            if entry.get(_ENTRY_KEY) == b"location":
                yield entry.get(_ENTRY_VALUE, b"").decode("utf-8", "replace")


def _graph_locations(data: bytes, start: int, end: int, depth: int) -> Iterator[str]:
    if depth > _MAX_DEPTH:
        raise MalformedModel("graphs nested too deeply")
    for field, s, e in _messages(data, start, end):
        if field == _GRAPH_INITIALIZER:
            yield from _tensor_locations(data, s, e)
        elif field == _GRAPH_SPARSE:
            yield from _sparse_locations(data, s, e)
        elif field == _GRAPH_NODE:
            yield from _node_locations(data, s, e, depth)


def _sparse_locations(data: bytes, start: int, end: int) -> Iterator[str]:
    for field, s, e in _messages(data, start, end):
        if field in (_SPARSE_VALUES, _SPARSE_INDICES):
            yield from _tensor_locations(data, s, e)


def _node_locations(data: bytes, start: int, end: int, depth: int) -> Iterator[str]:
    for field, s, e in _messages(data, start, end):
        if field != _NODE_ATTRIBUTE:
            continue
        for attr_field, a, b in _messages(data, s, e):
            if attr_field in (_ATTR_TENSOR, _ATTR_TENSORS):
                yield from _tensor_locations(data, a, b)
            elif attr_field in (_ATTR_SPARSE, _ATTR_SPARSES):
                yield from _sparse_locations(data, a, b)
            elif attr_field in (_ATTR_GRAPH, _ATTR_GRAPHS):
                yield from _graph_locations(data, a, b, depth + 1)


def external_data_locations(model_bytes: bytes) -> set[str]:
    """Every external-data `location` an ONNX model (its serialized ModelProto) refers to."""
    found: set[str] = set()
    for field, s, e in _messages(model_bytes, 0, len(model_bytes)):
        if field == _MODEL_GRAPH:
            found.update(_graph_locations(model_bytes, s, e, 0))
        elif field == _MODEL_FUNCTIONS:
            for function_field, a, b in _messages(model_bytes, s, e):
                if function_field == _FUNCTION_NODE:
                    found.update(_node_locations(model_bytes, a, b, 0))
    return found
