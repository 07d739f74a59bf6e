"""Small integer shape computations evaluated without running the graph, so that a pass can tell a
Reshape target or a Slice bound built from Shape nodes is, say, (B, S, heads, D) or half a head.

A value is a flat list of symbols, one per element. A symbol is (coefficient, factors): an integer
times unknown dimensions, so that F*L compares equal wherever it is computed; None is unknown.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import onnx_graphsurgeon as gs

from .onnx_helpers import constant_array, producer

INT_TYPES = (np.int64, np.int32)


class Dim(NamedTuple):
    """An unknown dimension: axis `axis` of the tensor named `tensor`."""

    tensor: str
    axis: int


Symbol = tuple[int, tuple[Dim, ...]]


def number(n: int) -> Symbol:
    return (int(n), ())


def as_int(value: Symbol | None) -> int | None:
    return value[0] if value is not None and not value[1] else None


def times(a: Symbol | None, b: Symbol | None) -> Symbol | None:
    if a is None or b is None:
        return None
    return a[0] * b[0], tuple(sorted(a[1] + b[1]))


def known_shapes(types: dict) -> dict:
    """Shapes by tensor name, from onnx_helpers.tensor_types, where shape inference found one."""
    return {name: shape for name, (_, shape) in types.items() if shape is not None}


def dimension_symbols(name: str, dims) -> list[Symbol]:
    """The tensor `name`'s dimensions as symbols, as a Shape node of it gives them."""
    return [number(d) if isinstance(d, int) and d > 0 else (1, (Dim(name, i),)) for i, d in enumerate(dims)]


def shape_value(tensor: gs.Tensor, shapes: dict, depth: int = 0) -> list[Symbol | None] | None:
    """Evaluates a small integer shape computation (Constant, Shape, Gather, Unsqueeze, Squeeze, Cast,
    Concat, Add, Sub, Mul, Div) to a flat list of symbols; `shapes` gives each tensor's dimensions
    (int, or None / a name for unknown ones). None when it is not such a computation."""
    if depth > 32:
        return None
    array = constant_array(tensor)
    if array is not None:
        return [number(v) for v in array.ravel().tolist()] if array.dtype.type in INT_TYPES else None
    if len(tensor.inputs) != 1:
        return None
    node = tensor.inputs[0]
    if node.domain not in (None, "", "ai.onnx"):
        return None
    args = [shape_value(t, shapes, depth + 1) if not t.is_empty() else None for t in node.inputs[:2]]
    if node.op == "Shape":
        dims = shapes.get(node.inputs[0].name)
        if dims is None:
            return None
        start, end = node.attrs.get("start", 0), node.attrs.get("end", None)
        return dimension_symbols(node.inputs[0].name, dims)[start:end]
    if node.op in ("Unsqueeze", "Squeeze", "Identity", "Cast"):
        return args[0]
    if node.op == "Gather" and node.attrs.get("axis", 0) == 0 and args[0] is None and args[1] is not None:
        # Shape inference stops at contrib ops, so a shape's rank may be unknown; a dimension picked
        # by a non-negative index is still that tensor's dimension.
        shape_of = producer(node.inputs[0], "Shape")
        picked = [as_int(i) for i in args[1]]
        if shape_of is None or shape_of.attrs.get("start", 0) or any(i is None or i < 0 for i in picked):
            return None
        return [(1, (Dim(shape_of.inputs[0].name, i),)) for i in picked]
    if node.op == "Gather" and node.attrs.get("axis", 0) == 0 and args[0] is not None and args[1] is not None:
        picked = [as_int(i) for i in args[1]]
        if None in picked or any(not -len(args[0]) <= i < len(args[0]) for i in picked):
            return None
        return [args[0][i] for i in picked]
    if node.op == "Concat":
        parts = [shape_value(t, shapes, depth + 1) for t in node.inputs]
        return None if any(p is None for p in parts) else [v for p in parts for v in p]
    if node.op in ("Add", "Sub", "Mul", "Div") and args[0] is not None and args[1] is not None:
        a, b = args
        if len(a) != len(b) and 1 not in (len(a), len(b)):
            return None
        n = max(len(a), len(b))
        return [_arith(node.op, a[i if len(a) > 1 else 0], b[i if len(b) > 1 else 0]) for i in range(n)]
    return None


def _arith(op: str, a: Symbol | None, b: Symbol | None) -> Symbol | None:
    if op == "Mul":
        return times(a, b)
    x, y = as_int(a), as_int(b)
    if x is None or y is None or (op == "Div" and y == 0):
        return None
    return number({"Add": x + y, "Sub": x - y, "Div": int(x / y)}[op])  # integer Div truncates
