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
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .onnx_helpers import (MS_DOMAIN, PLUGIN_DOMAIN, dies_with, export_graph, import_graph, is_graph_output, is_node,
                           is_op, plugin_attrs, producer, tensor_types)
from .symbolic_shapes import as_int, known_shapes, number, shape_value

KV_CACHE_TYPES = {onnx.TensorProto.FLOAT: "fp32", onnx.TensorProto.FLOAT16: "fp16"}


class TrtAttention:
    name = "trt_attention"

    def __call__(self, model: onnx.ModelProto, folder: Path) -> bool:
        if not any(is_op(n, "GroupQueryAttention", MS_DOMAIN) for n in model.graph.node):
            return False  # cheap exit: no shape inference on graphs without the pattern
        types = tensor_types(model)
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
    if len(gqa.outputs) < 3 or any(t.outputs or is_graph_output(t, graph) for t in gqa.outputs[3:]):
        return False
    heads, kv_heads = attrs.get("num_heads"), attrs.get("kv_num_heads")
    q, k, v, past_key, past_value, seqlens_k, total_length = gqa.inputs[:7]
    kv_type = types.get(past_key.name, (None,))[0]
    if kv_type not in KV_CACHE_TYPES or types.get(past_value.name, (None,))[0] != kv_type:
        return False  # the plugin's caches are fp32 or fp16
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
    shapes = known_shapes(types)
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
