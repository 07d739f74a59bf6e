"""TensorRT target: each decoder layer's q/k norms, M-RoPE rotary and GroupQueryAttention become
one `Qwen3VLAttention` plugin node.

The ONNX Runtime graph (after fuse_rmsnorm) computes, for q and likewise for k:
    x  = SimplifiedLayerNormalization(Reshape(q_proj, (B, S, heads, D)), q_norm.weight)
    qr = Reshape(x * Unsqueeze(cos, 2) + Concat(-x[..., D/2:], x[..., :D/2]) * Unsqueeze(sin, 2), (B, S, heads*D))
    out, present_key, present_value = GroupQueryAttention(qr, kr, v, past_key, past_value, seqlens_k, total_len)
and becomes
    out, present_key, present_value = Qwen3VLAttention(q_proj, k_proj, v, q_norm.weight, k_norm.weight, cos, sin,
                                                       past_key, past_value, seqlens_k, total_len)
The match follows data edges backwards from the attention node's q and k inputs, never node names;
the slice bounds and reshape targets (computed from Shape nodes in the exported graph) are evaluated
symbolically and must be the halves of the head and the (B, S, heads, D) split. A layer whose q or
k side has another form, or whose intermediate tensors are read elsewhere, is left as it is. The
norm may already be a `Qwen3VLRMSNorm` plugin (trt_rmsnorm first), so the passes run in any order.
Contract: trt_plugins/attention/README.md; numpy reference: graph_passes/plugin_reference.py.

Also here: the shape-computation evaluator and the dead-subgraph check that trt_vision_attention uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx.external_data_helper import uses_external_data

from .driver import export_graph, import_graph
from .fuse_rmsnorm import _tensor_types
from .trt_rmsnorm import MS_DOMAIN, PLUGIN_DOMAIN, plugin_attrs

KV_CACHE_TYPES = {onnx.TensorProto.FLOAT: "fp32", onnx.TensorProto.FLOAT16: "fp16"}
INT_TYPES = (np.int64, np.int32)


class TrtAttention:
    name = "trt_attention"

    def __call__(self, model: onnx.ModelProto, folder: Path) -> bool:
        if not any(n.op_type == "GroupQueryAttention" and n.domain == MS_DOMAIN for n in model.graph.node):
            return False  # cheap exit: no shape inference on graphs without the pattern
        types = _tensor_types(model)
        graph = import_graph(model)
        fused = sum(_fuse(graph, node, types) for node in list(graph.nodes)
                    if is_node(node, "GroupQueryAttention", MS_DOMAIN))
        if not fused:
            return False
        export_graph(graph, model)
        return True


trt_attention = TrtAttention()


@dataclass
class _Side:
    """One of q / k: what the plugin reads, and the nodes it replaces."""

    projection: gs.Tensor
    weight: gs.Constant
    epsilon: float
    cos: gs.Tensor
    sin: gs.Tensor
    nodes: list[gs.Node]


def _fuse(graph: gs.Graph, gqa: gs.Node, types: dict) -> bool:
    attrs = gqa.attrs
    if (attrs.get("do_rotary", 0) or attrs.get("local_window_size", -1) != -1 or attrs.get("softcap", 0.0)
            or attrs.get("smooth_softmax", 0) or attrs.get("qk_output", 0)):
        return False
    if len(gqa.inputs) < 7 or any(not t.is_empty() for t in gqa.inputs[7:]):
        return False  # cos/sin caches, position ids, attention bias: not the decoder's form
    if len(gqa.outputs) < 3 or any(t.outputs or _is_graph_output(t, graph) for t in gqa.outputs[3:]):
        return False
    heads, kv_heads = attrs.get("num_heads"), attrs.get("kv_num_heads")
    q, k, v, past_key, past_value, seqlens_k, total_length = gqa.inputs[:7]
    kv_type = types.get(past_key.name, (None,))[0]
    if kv_type not in KV_CACHE_TYPES or types.get(past_value.name, (None,))[0] != kv_type:
        return False  # an INT8 cache is a future option of the plugin, not of this pass
    q_side, k_side = _match_side(q, heads, types), _match_side(k, kv_heads, types)
    if q_side is None or k_side is None:
        return False
    head_dim = q_side.weight.shape[0]
    if (k_side.weight.shape[0] != head_dim or q_side.cos is not k_side.cos or q_side.sin is not k_side.sin
            or np.float32(q_side.epsilon) != np.float32(k_side.epsilon)):
        return False
    outputs = list(gqa.outputs[:3])
    if not dies_with([gqa, *q_side.nodes, *k_side.nodes], outputs, graph):
        return False

    gqa.outputs.clear()  # the GroupQueryAttention and the rotary/norm nodes are now dead; cleanup drops them
    graph.nodes.append(gs.Node(
        "Qwen3VLAttention", name=f"{gqa.name.rpartition('/')[0] or gqa.name}/Qwen3VLAttention", domain=PLUGIN_DOMAIN,
        attrs=plugin_attrs(num_heads=int(heads), kv_num_heads=int(kv_heads), head_dim=int(head_dim),
                           scale=float(attrs.get("scale") or head_dim**-0.5), epsilon=float(q_side.epsilon),
                           kv_cache_type=KV_CACHE_TYPES[kv_type]),
        inputs=[q_side.projection, k_side.projection, v, q_side.weight, k_side.weight, q_side.cos, q_side.sin,
                past_key, past_value, seqlens_k, total_length],
        outputs=outputs,
    ))
    return True


def _match_side(rotated: gs.Tensor, heads: int, types: dict) -> _Side | None:
    """Reshape(x*cos + rotate_half(x)*sin) with x = RMSNorm(Reshape(projection)), walked backwards."""
    merge = producer(rotated, "Reshape")
    add = merge and producer(merge.inputs[0], "Add")
    if add is None:
        return None
    muls = [producer(t, "Mul") for t in add.inputs]
    if any(m is None for m in muls):
        return None
    for rot_mul, cos_mul in (muls, muls[::-1]):
        for half_swapped, sin_u in (rot_mul.inputs, rot_mul.inputs[::-1]):
            concat = producer(half_swapped, "Concat")
            if concat is not None:
                break
        else:
            continue
        for x, cos_u in (cos_mul.inputs, cos_mul.inputs[::-1]):
            if _norm_of(x) is not None:
                side = _finish_side(merge, add, rot_mul, cos_mul, concat, x, cos_u, sin_u, heads, types)
                if side is not None:
                    return side
    return None


def _finish_side(merge, add, rot_mul, cos_mul, concat, x, cos_u, sin_u, heads, types) -> _Side | None:
    norm = _norm_of(x)
    weight = norm.inputs[-1]
    if not isinstance(weight, gs.Constant) or len(weight.shape) != 1 or weight.shape[0] % 2:
        return None
    d = int(weight.shape[0])
    split = producer(norm.inputs[0], "Reshape")
    if split is None or split.attrs.get("allowzero", 0) or merge.attrs.get("allowzero", 0):
        return None
    shapes = dict(symbolic_shapes(types))
    shapes[x.name] = (None, None, heads, d)  # what the split makes of it; Shape(x) nodes read this
    split_to = shape_value(split.inputs[1], shapes)
    merge_to = shape_value(merge.inputs[1], shapes)
    if split_to is None or merge_to is None or len(split_to) != 4 or len(merge_to) != 3:
        return None
    if split_to[3] != number(d) or split_to[2] not in (number(heads), number(-1)):
        return None
    if not (_is_dim_or_copy(split_to[0], 0) and _is_dim_or_copy(split_to[1], 1)):
        return None
    if merge_to[:2] != split_to[:2] or merge_to[2] not in (number(heads * d), number(-1)):
        return None  # the merge must undo the split: same (B, S), heads*D last

    if concat.attrs.get("axis") not in (-1, 3) or len(concat.inputs) != 2:
        return None
    neg = producer(concat.inputs[0], "Neg")
    upper = neg and producer(neg.inputs[0], "Slice")
    lower = producer(concat.inputs[1], "Slice")
    if upper is None or lower is None or upper.inputs[0] is not x or lower.inputs[0] is not x:
        return None
    if _slice_range(lower, d, shapes) != (0, d // 2) or _slice_range(upper, d, shapes) != (d // 2, d):
        return None

    cos, sin = _unsqueezed_at_heads(cos_u, shapes), _unsqueezed_at_heads(sin_u, shapes)
    if cos is None or sin is None:
        return None
    for table in (cos, sin):
        shape = shapes.get(table.name)
        if shape is not None and (len(shape) != 3 or isinstance(shape[2], int) and shape[2] != d):
            return None  # the plugin reads (B, S, D) tables
    return _Side(projection=split.inputs[0], weight=weight, epsilon=float(norm.attrs.get("epsilon", 1e-5)),
                 cos=cos, sin=sin, nodes=[merge, add, rot_mul, cos_mul, concat, neg, upper, lower, norm, split])


def _norm_of(x: gs.Tensor) -> gs.Node | None:
    """The RMSNorm producing `x`: fuse_rmsnorm's node or trt_rmsnorm's plugin, without a residual."""
    norm = producer(x, "SimplifiedLayerNormalization")
    if norm is not None:
        if len(norm.inputs) != 2 or norm.attrs.get("axis", -1) not in (-1, 3) or norm.attrs.get("stash_type", 1) != 1:
            return None
        return norm if len(norm.outputs) == 1 or not norm.outputs[1].outputs else None
    norm = producer(x, "Qwen3VLRMSNorm", PLUGIN_DOMAIN)
    return norm if norm is not None and not norm.attrs.get("has_skip", 0) and len(norm.inputs) == 2 else None


def _is_dim_or_copy(value, axis: int) -> bool:
    """A reshape target entry that keeps an input dimension: 0 (copy) or some tensor's dim `axis`."""
    return value == number(0) or (value is not None and value[0] == 1 and len(value[1]) == 1
                                  and value[1][0].axis == axis)


def _slice_range(node: gs.Node, size: int, shapes: dict, rank: int = 4) -> tuple[int, int] | None:
    """(start, end) of a one-axis, unit-step Slice over the last axis (of `size`), normalised as the
    op does (negative from the end, clamped to the axis); None for any other Slice."""
    values = [shape_value(t, shapes) if not t.is_empty() else None for t in node.inputs[1:]]
    values += [None] * (4 - len(values))
    starts, ends, axes, steps = values
    if starts is None or ends is None or len(starts) != 1 or len(ends) != 1:
        return None
    if axes is None or len(axes) != 1 or axes[0] not in (number(-1), number(rank - 1)):
        return None
    if steps is not None and steps != [number(1)]:
        return None
    start, end = as_int(starts[0]), as_int(ends[0])
    if start is None or end is None:
        return None
    return tuple(min(max(i + size if i < 0 else i, 0), size) for i in (start, end))


def _unsqueezed_at_heads(tensor: gs.Tensor, shapes: dict) -> gs.Tensor | None:
    """`t` when `tensor` is Unsqueeze(t, [2]) of a rank-3 (B, S, D) table (broadcast over heads)."""
    node = producer(tensor, "Unsqueeze")
    if node is None:
        return None
    if len(node.inputs) > 1:
        axes = shape_value(node.inputs[1], shapes)
    else:
        axes = [number(a) for a in node.attrs.get("axes", [])]  # opset < 13
    return node.inputs[0] if axes in ([number(2)], [number(-2)]) else None


# -- shared with trt_vision_attention ----------------------------------------------------------------

def is_node(node: gs.Node, op: str, domain: str = "") -> bool:
    domains = (None, "", "ai.onnx") if domain == "" else (domain,)
    return node.op == op and node.domain in domains


def producer(tensor: gs.Tensor, op: str, domain: str = "") -> gs.Node | None:
    if isinstance(tensor, gs.Variable) and len(tensor.inputs) == 1 and is_node(tensor.inputs[0], op, domain):
        return tensor.inputs[0]
    return None


def only_reader(tensor: gs.Tensor, op: str, graph: gs.Graph) -> gs.Node | None:
    """The single node reading `tensor`, when it is an `op` and the tensor is not a graph output."""
    if len(tensor.outputs) == 1 and is_node(tensor.outputs[0], op) and not _is_graph_output(tensor, graph):
        return tensor.outputs[0]
    return None


def constant_array(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of an inline initializer or Constant node; None for anything else (weights in
    external data are never read)."""
    if not isinstance(tensor, gs.Constant):
        node = tensor.inputs[0] if len(tensor.inputs) == 1 else None
        if node is None or node.op != "Constant" or not isinstance(node.attrs.get("value"), gs.Constant):
            return None
        tensor = node.attrs["value"]
    proto = getattr(tensor._values, "tensor", None)  # graphsurgeon's lazy value keeps the TensorProto
    if proto is not None and uses_external_data(proto):
        return None
    return np.asarray(tensor.values)


class Dim(NamedTuple):
    """An unknown dimension: axis `axis` of the tensor named `tensor`."""

    tensor: str
    axis: int


# A value of a shape computation, element by element: (coefficient, factors), a product of an
# integer and unknown dimensions, so that F*L compares equal wherever it is computed. None: unknown.
Symbol = tuple[int, tuple[Dim, ...]]


def number(n: int) -> Symbol:
    return (int(n), ())


def as_int(value: Symbol | None) -> int | None:
    return value[0] if value is not None and not value[1] else None


def times(a: Symbol | None, b: Symbol | None) -> Symbol | None:
    if a is None or b is None:
        return None
    return a[0] * b[0], tuple(sorted(a[1] + b[1]))


def _arith(op: str, a: Symbol | None, b: Symbol | None) -> Symbol | None:
    if op == "Mul":
        return times(a, b)
    x, y = as_int(a), as_int(b)
    if x is None or y is None or (op == "Div" and y == 0):
        return None
    return number({"Add": x + y, "Sub": x - y, "Div": int(x / y)}[op])  # integer Div truncates


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
        out = [number(d) if isinstance(d, int) and d > 0 else (1, (Dim(node.inputs[0].name, i),))
               for i, d in enumerate(dims)]
        start, end = node.attrs.get("start", 0), node.attrs.get("end", None)
        return out[start:end]
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


def dies_with(chain: list[gs.Node], outputs: list[gs.Tensor], graph: gs.Graph) -> bool:
    """Whether replacing `chain` by one node that produces `outputs` leaves nothing else reading the
    chain's other tensors: each reader outside the chain must itself die with it (the Shape ->
    Gather -> Div nodes computing slice bounds do; a second consumer of a normed q would not)."""
    kept = {id(t) for t in outputs} | {id(t) for t in graph.outputs}
    dying = {id(n) for n in chain}
    memo: dict[int, bool] = {}

    def dies(node: gs.Node) -> bool:
        if id(node) in dying:
            return True
        if id(node) not in memo:
            memo[id(node)] = False  # a graph is acyclic; this only guards the recursion
            memo[id(node)] = all(id(t) not in kept and all(dies(r) for r in t.outputs) for t in node.outputs)
        return memo[id(node)]

    replaced = {id(t) for t in outputs}
    for node in chain:
        for tensor in node.outputs:
            if id(tensor) in replaced or tensor.is_empty():
                continue
            if id(tensor) in kept or not all(dies(reader) for reader in tensor.outputs):
                return False
    return True


def _is_graph_output(tensor: gs.Tensor, graph: gs.Graph) -> bool:
    return any(t is tensor for t in graph.outputs)


def symbolic_shapes(types: dict) -> dict:
    """Known shapes by tensor name, from fuse_rmsnorm._tensor_types."""
    return {name: shape for name, (_, shape) in types.items() if shape is not None}
