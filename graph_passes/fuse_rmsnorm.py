"""Fuses every RMSNorm of the decoder into one node, and the residual add in front of it too.

The exporter writes `model_src.text.RMSNorm` as nine nodes:
    x32 = Cast(x, float32);  inv = 1 / Sqrt(ReduceMean(Pow(x32, 2), axes=[-1]) + eps)
    out = Mul(weight, Cast(x32 * inv, dtype of x))
Each becomes `SimplifiedLayerNormalization(x, weight)` (axis=-1, epsilon, stash_type=1: float32
math whatever the storage type). Where an `Add(a, b)` of the residual stream feeds one, the pair
becomes `com.microsoft.SkipSimplifiedLayerNormalization(a, b, weight)`, whose fourth output is the
sum that the next residual add reads. ONNX Runtime's CPU provider runs both for float32 and float16;
for TensorRT, `trt_rmsnorm` turns both into the `Qwen3VLRMSNorm` plugin node (trt_plugins/rmsnorm/README.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .onnx_helpers import (FLOAT_TYPES, MS_DOMAIN, constant, constant_array, export_graph, import_graph,
                           is_graph_output, is_node, producer, scalar, tensor_types)

FLOAT = onnx.TensorProto.FLOAT
# ORT's SkipSimplifiedLayerNormalization takes (tokens, hidden) or (batch, sequence, hidden) only.
SKIP_RANKS = (2, 3)


class FuseRMSNorm:
    name = "fuse_rmsnorm"

    def __call__(self, model: onnx.ModelProto, folder: Path) -> bool:
        types = tensor_types(model)
        graph = import_graph(model)
        norms = sum(_fuse_norm(graph, node, types) for node in list(graph.nodes))
        graph.cleanup()  # drop the unfused nodes, so only live readers count below
        residuals = sum(_fuse_residual(graph, node, types) for node in list(graph.nodes))
        if not norms and not residuals:
            return False
        export_graph(graph, model)
        return True


fuse_rmsnorm = FuseRMSNorm()


def _fuse_norm(graph: gs.Graph, mul: gs.Node, types: dict) -> bool:
    """Replaces the RMSNorm ending at `mul` (if it is one) by SimplifiedLayerNormalization."""
    if not is_node(mul, "Mul"):
        return False
    weight, normed = _split_weight(mul)
    if weight is None:
        return False
    cast_back = producer(normed, "Cast")
    times = producer(cast_back.inputs[0] if cast_back else normed, "Mul")
    if times is None:
        return False
    for x32, inv in (times.inputs, times.inputs[::-1]):
        div = producer(inv, "Div")
        if div is not None and scalar(div.inputs[0]) == 1.0:
            break
    else:
        return False
    sqrt = producer(div.inputs[1], "Sqrt")
    add = sqrt and producer(sqrt.inputs[0], "Add")
    if add is None:
        return False
    for mean_of_squares, eps in (add.inputs, add.inputs[::-1]):
        mean, epsilon = producer(mean_of_squares, "ReduceMean"), scalar(eps)
        if mean is not None and epsilon is not None:
            break
    else:
        return False
    square = producer(mean.inputs[0], "Pow")
    if square is None or square.inputs[0] is not x32 or scalar(square.inputs[1]) != 2.0:
        return False
    if not _reduces_last_axis(mean, types.get(x32.name)):
        return False
    chain = [square, mean, add, sqrt, div, times, *([cast_back] if cast_back else []), mul]
    if not all(_feeds_only(a.outputs[0], b, graph) for a, b in zip(chain, chain[1:])):
        return False

    upcast = producer(x32, "Cast")
    if upcast is not None and upcast.attrs.get("to") != FLOAT:
        upcast = None
    x = upcast.inputs[0] if upcast else x32
    # RMSNorm casts back to x's own type; the fused node takes x, weight and output in that one type.
    dtype = cast_back.attrs.get("to") if cast_back else _elem_type(types, x32.name)
    if dtype not in FLOAT_TYPES or _elem_type(types, x.name, dtype) != dtype:
        return False
    if np.dtype(weight.dtype) != onnx.helper.tensor_dtype_to_np_dtype(dtype):
        return False

    if upcast is not None and dtype == FLOAT and not is_graph_output(x32, graph):
        # A float32 -> float32 Cast is a copy; its other readers (the residual add) read x itself,
        # which exposes the Add -> norm edge that the residual fusion looks for.
        for reader in list(x32.outputs):
            for i, tensor in enumerate(reader.inputs):
                if tensor is x32:
                    reader.inputs[i] = x  # item by item: graphsurgeon's lists do not sync slices
    out = mul.outputs[0]
    mul.outputs.clear()  # the unfused nodes are now dead; cleanup drops them
    graph.nodes.append(gs.Node(
        "SimplifiedLayerNormalization", name=f"{_scope(mul, out)}/SimplifiedLayerNormalization",
        attrs={"axis": -1, "epsilon": float(epsilon), "stash_type": 1},
        inputs=[x, weight], outputs=[out],
    ))
    return True


def _fuse_residual(graph: gs.Graph, norm: gs.Node, types: dict) -> bool:
    """Folds an `Add(a, b)` that feeds `norm` into SkipSimplifiedLayerNormalization(a, b, weight)."""
    if not is_node(norm, "SimplifiedLayerNormalization") or len(norm.outputs) != 1:
        return False
    x, weight = norm.inputs[:2]
    add = producer(x, "Add")
    if add is None or any(constant(t) is not None for t in add.inputs):
        return False
    a, b = add.inputs
    dtype = _elem_type(types, x.name)
    if dtype not in FLOAT_TYPES or any(_elem_type(types, t.name) != dtype for t in (a, b)):
        return False
    shape = types[x.name][1]
    if shape is None or len(shape) not in SKIP_RANKS or norm.attrs.get("axis", -1) not in (-1, len(shape) - 1):
        return False
    if any(not _same_shape(types[t.name][1], shape) for t in (a, b)):  # the op does not broadcast
        return False

    out = norm.outputs[0]
    norm.inputs.clear()
    norm.outputs.clear()
    add.outputs.clear()
    # The sum is an output only when something besides the norm reads it (the next residual add).
    keeps_sum = len(x.outputs) > 0 or is_graph_output(x, graph)
    outputs = [out, gs.Variable.empty(), gs.Variable.empty(), x] if keeps_sum else [out]
    graph.nodes.append(gs.Node(
        "SkipSimplifiedLayerNormalization", domain=MS_DOMAIN,
        name=f"{_scope(norm, out)}/SkipSimplifiedLayerNormalization",
        attrs={"epsilon": float(norm.attrs.get("epsilon", 1e-5))},
        inputs=[a, b, weight], outputs=outputs,
    ))
    return True


def _feeds_only(tensor: gs.Tensor, reader: gs.Node, graph: gs.Graph) -> bool:
    return len(tensor.outputs) == 1 and tensor.outputs[0] is reader and not is_graph_output(tensor, graph)


def _split_weight(mul: gs.Node) -> tuple[gs.Constant | None, gs.Tensor | None]:
    """(weight, normed) when one input of `mul` is a 1-D initializer; its values are never read
    (they stay in the external data file)."""
    for weight, other in (mul.inputs, mul.inputs[::-1]):
        if isinstance(weight, gs.Constant) and len(weight.shape) == 1 and isinstance(other, gs.Variable):
            return weight, other
    return None, None


def _reduces_last_axis(mean: gs.Node, x32_type: tuple | None) -> bool:
    axes = mean.attrs.get("axes")
    if axes is None and len(mean.inputs) > 1:  # opset 18+: axes is an input
        values = constant_array(mean.inputs[1])
        axes = None if values is None else values.ravel().tolist()
    if axes is None or len(axes) != 1 or mean.attrs.get("keepdims", 1) != 1:
        return False
    rank = None if x32_type is None or x32_type[1] is None else len(x32_type[1])
    return axes[0] == -1 or (rank is not None and axes[0] == rank - 1)


def _scope(node: gs.Node, out: gs.Tensor) -> str:
    """The module path of the exported node ('/language_model/layers.0/input_layernorm')."""
    return node.name.rpartition("/")[0] or node.name or out.name


def _elem_type(types: dict, name: str, unknown: int | None = None) -> int | None:
    return types[name][0] if name in types else unknown


def _same_shape(a: tuple | None, b: tuple) -> bool:
    """Same rank and no two known dimensions that differ (symbolic ones cannot be compared)."""
    return a is not None and len(a) == len(b) and all(
        not (isinstance(p, int) and isinstance(q, int) and p != q) for p, q in zip(a, b))
