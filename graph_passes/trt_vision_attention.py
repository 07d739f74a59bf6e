"""TensorRT target: each vision block's block-diagonal attention becomes one `Qwen3VLVisionAttention`
plugin node.

The exporter writes `model_src.vision.VisionAttention`'s core, for q, k, v (N, heads, D) after
rotary, as a padded per-frame batch:
    per_frame(t) = Reshape(Gather(t, Reshape(frame_patch_index, [-1])), (F, L, heads, D))
    scores = Transpose(per_frame(q), 0213) @ Transpose(per_frame(k), 0231) * scale
             + Unsqueeze(Where(frame_patch_mask, 0, -big), 1, 2)
    out = Gather(Reshape(Transpose(Softmax(scores) @ Transpose(per_frame(v), 0213), 0213), (F*L, heads*D)),
                 patch_frame_slot)
(with float Casts around the Softmax), and this pass rewrites it to
    marked = Where(frame_patch_mask, Cast(frame_patch_index, int32), -1)        # once per graph
    out = Qwen3VLVisionAttention(Reshape(q, (-1, heads*D)), Reshape(k, ..), Reshape(v, ..),
                                 marked, Cast(patch_frame_slot, int32))
The reshapes only relabel (N, heads, D) as (N, heads*D). The mask does not reach the plugin
(TensorRT 8.6 plugins take no bool input): padding slots carry the index -1 instead, which the
plugin treats as padding like any index outside [0, N); the index tensors are int32 whatever the
graph's type (8.6 narrows int64 anyway; 10.x would pass int64 on). The match starts at each Softmax
and follows data edges; reshape targets are evaluated symbolically against frame_patch_index's shape.
Contract: trt_plugins/vision_attention/README.md; numpy reference: graph_passes/plugin_reference.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .onnx_helpers import (FLOAT_TYPES, PLUGIN_DOMAIN, dies_with, export_graph, import_graph, is_node, is_op,
                           only_reader, plugin_attrs, producer, scalar, tensor_types)
from .symbolic_shapes import as_int, dimension_symbols, known_shapes, number, shape_value, times
# A mask value at or below this is "excluded" (exp underflows to 0 against any real score).
MASKED_AT_MOST = -1e4


class TrtVisionAttention:
    name = "trt_vision_attention"

    def __call__(self, model: onnx.ModelProto, folder: Path) -> bool:
        if not any(is_op(n, "Softmax") for n in model.graph.node):
            return False
        types = tensor_types(model)
        graph = import_graph(model)
        flat_shapes: dict[int, gs.Constant] = {}  # one (-1, heads*D) shape constant per width
        layouts: dict[tuple, tuple] = {}  # (index, mask, slot) -> the plugin's (marked index, slot), made once
        fused = sum(_fuse(graph, node, types, flat_shapes, layouts) for node in list(graph.nodes)
                    if is_node(node, "Softmax"))
        if not fused:
            return False
        export_graph(graph, model)
        return True


trt_vision_attention = TrtVisionAttention()


def _fuse(graph: gs.Graph, softmax: gs.Node, types: dict, flat_shapes: dict, layouts: dict) -> bool:
    shapes = known_shapes(types)
    if softmax.attrs.get("axis", -1) not in (-1, 3):
        return False
    chain = [softmax]

    # Backwards: scores = MatMul(q', k') [* scale] + bias
    pre_cast = _float_cast(softmax.inputs[0])
    add = producer(pre_cast.inputs[0] if pre_cast else softmax.inputs[0], "Add")
    if add is None:
        return False
    for scaled, bias in (add.inputs, add.inputs[::-1]):
        mask = _mask_of(bias, shapes)
        if mask is not None:
            break
    else:
        return False
    scale, scale_node, scores = _scale_of(scaled)
    matmul = producer(scores, "MatMul")
    if matmul is None:
        return False
    chain += [n for n in (pre_cast, add, scale_node, matmul) if n is not None]

    q_side = _per_frame(matmul.inputs[0], (0, 2, 1, 3), shapes)
    k_side = _per_frame(matmul.inputs[1], (0, 2, 3, 1), shapes)
    if q_side is None or k_side is None:
        return False

    # Forwards: Softmax [-> Cast] -> MatMul(probs, v') -> Transpose -> Reshape (F*L, heads*D) -> Gather(slot)
    post_cast = only_reader(softmax.outputs[0], "Cast", graph)
    if post_cast is not None and post_cast.attrs.get("to") not in FLOAT_TYPES:
        return False
    context = only_reader((post_cast or softmax).outputs[0], "MatMul", graph)
    if context is None or context.inputs[0] is not (post_cast or softmax).outputs[0]:
        return False
    v_side = _per_frame(context.inputs[1], (0, 2, 1, 3), shapes)
    back = only_reader(context.outputs[0], "Transpose", graph)
    merge = back and only_reader(back.outputs[0], "Reshape", graph)
    scatter = merge and only_reader(merge.outputs[0], "Gather", graph)
    if v_side is None or scatter is None or back.attrs.get("perm") != [0, 2, 1, 3]:
        return False
    if scatter.inputs[0] is not merge.outputs[0] or scatter.attrs.get("axis", 0) != 0:
        return False
    chain += [n for n in (post_cast, context, back, merge, scatter) if n is not None]

    sources = {id(side[1]) for side in (q_side, k_side, v_side)}
    (q, index, heads, head_dim, q_nodes), (k, _, k_heads, k_dim, k_nodes), (v, _, v_heads, v_dim, v_nodes) = (
        q_side, k_side, v_side)
    if len(sources) != 1 or (heads, head_dim) != (k_heads, k_dim) or (heads, head_dim) != (v_heads, v_dim):
        return False  # all three gathered with the one frame layout, one head shape
    frames, longest = dimension_symbols(index.name, shapes[index.name])
    merge_to = shape_value(merge.inputs[1], shapes)
    if merge.attrs.get("allowzero", 0) or merge_to is None or len(merge_to) != 2:
        return False
    if merge_to[1] != number(heads * head_dim) and merge_to != [times(frames, longest), number(-1)]:
        return False
    slot = scatter.inputs[1]
    if shapes.get(slot.name) is not None and len(shapes[slot.name]) != 1:
        return False
    if shapes.get(mask.name) is not None and shapes[mask.name] != shapes[index.name]:
        return False  # the mask must describe the same (F, L) slots as the index
    chain += q_nodes + k_nodes + v_nodes
    output = scatter.outputs[0]
    if not dies_with(chain, [output], graph):
        return False

    scope = softmax.name.rpartition("/")[0] or softmax.name
    width = heads * head_dim
    if width not in flat_shapes:
        flat_shapes[width] = gs.Constant(f"qwen3vl_vision_attention_flat_{width}", np.array([-1, width], np.int64))
    flat = [_flatten(graph, t, flat_shapes[width], f"{scope}/{name}_flat")
            for t, name in ((q, "q"), (k, "k"), (v, "v"))]
    key = (id(index), id(mask), id(slot))
    if key not in layouts:
        layouts[key] = _plugin_layout(graph, index, mask, slot)
    scatter.outputs.clear()
    graph.nodes.append(gs.Node(
        "Qwen3VLVisionAttention", name=f"{scope}/Qwen3VLVisionAttention", domain=PLUGIN_DOMAIN,
        attrs=plugin_attrs(num_heads=int(heads), head_dim=int(head_dim), scale=float(scale)),
        inputs=[*flat, *layouts[key]], outputs=[output],
    ))
    return True


def _plugin_layout(graph: gs.Graph, index: gs.Tensor, mask: gs.Tensor, slot: gs.Tensor) -> tuple[gs.Tensor, gs.Tensor]:
    """(Where(mask, int32 index, -1), int32 slot): the layout as the plugin takes it, shared by every block."""
    index32, slot32 = _int32(graph, index), _int32(graph, slot)
    marked = gs.Variable(f"{index.name}_marked", dtype=np.int32, shape=index.shape)
    padding = gs.Constant(f"{index.name}_padding", np.array(-1, np.int32))
    graph.nodes.append(gs.Node("Where", name=f"{index.name}_marked/Where", inputs=[mask, index32, padding],
                               outputs=[marked]))
    return marked, slot32


def _int32(graph: gs.Graph, tensor: gs.Tensor) -> gs.Tensor:
    out = gs.Variable(f"{tensor.name}_int32", dtype=np.int32, shape=tensor.shape)
    graph.nodes.append(gs.Node("Cast", name=f"{tensor.name}_int32/Cast", attrs={"to": onnx.TensorProto.INT32},
                               inputs=[tensor], outputs=[out]))
    return out


def _per_frame(tensor: gs.Tensor, perm: tuple, shapes: dict):
    """Transpose(Reshape(Gather(t, Reshape(index, [-1])), (F, L, heads, D)), perm) ->
    (t, index, heads, D, nodes), or None."""
    transpose = producer(tensor, "Transpose")
    if transpose is None or tuple(transpose.attrs.get("perm", ())) != perm:
        return None
    split = producer(transpose.inputs[0], "Reshape")
    gather = split and producer(split.inputs[0], "Gather")
    if gather is None or gather.attrs.get("axis", 0) != 0 or split.attrs.get("allowzero", 0):
        return None
    flatten = producer(gather.inputs[1], "Reshape")
    if flatten is None or shape_value(flatten.inputs[1], shapes) != [number(-1)]:
        return None
    index = flatten.inputs[0]
    if index.name not in shapes or len(shapes[index.name]) != 2:
        return None
    frames, longest = dimension_symbols(index.name, shapes[index.name])
    split_to = shape_value(split.inputs[1], shapes)
    if split_to is None or len(split_to) != 4 or split_to[:2] != [frames, longest]:
        return None
    heads, head_dim = as_int(split_to[2]), as_int(split_to[3])
    if heads is None or head_dim is None or heads <= 0 or head_dim <= 0:
        return None
    source = shapes.get(gather.inputs[0].name)
    if source is not None and isinstance(source[-1], int) and source[-1] not in (head_dim, heads * head_dim):
        return None
    # The flatten of the index is shared by every block: not part of this chain.
    return gather.inputs[0], index, heads, head_dim, [transpose, split, gather]


def _float_cast(tensor: gs.Tensor) -> gs.Node | None:
    cast = producer(tensor, "Cast")
    return cast if cast is not None and cast.attrs.get("to") in FLOAT_TYPES else None


def _scale_of(tensor: gs.Tensor):
    """(scale, node, scores) for scores * c, c * scores or scores / c; (1.0, None, tensor) otherwise."""
    for op in ("Mul", "Div"):
        node = producer(tensor, op)
        if node is None:
            continue
        pairs = (node.inputs, node.inputs[::-1]) if op == "Mul" else (node.inputs,)
        for scores, factor in pairs:
            c = scalar(factor)
            if c is not None and not isinstance(scores, gs.Constant):
                return (c if op == "Mul" else 1.0 / c), node, scores
    return 1.0, None, tensor


def _mask_of(bias: gs.Tensor, shapes: dict) -> gs.Tensor | None:
    """The (F, L) bool mask when `bias` is Where(mask, 0, -big) cast and unsqueezed to (F, 1, 1, L)."""
    steps = []
    tensor = bias
    while True:
        node = producer(tensor, "Unsqueeze") or producer(tensor, "Cast")
        if node is None:
            break
        steps.append(node)
        tensor = node.inputs[0]
    where = producer(tensor, "Where")
    if where is None:
        return None
    mask, kept, dropped = where.inputs
    keep, drop = scalar(kept), scalar(dropped)
    if keep != 0.0 or drop is None or not drop <= MASKED_AT_MOST:
        return None
    if shapes.get(mask.name) is not None and len(shapes[mask.name]) != 2:
        return None
    labels = ["F", "L"]
    for node in reversed(steps):
        if node.op == "Cast":
            if node.attrs.get("to") not in FLOAT_TYPES:
                return None
            continue
        axes = shape_value(node.inputs[1], shapes) if len(node.inputs) > 1 else [number(a) for a in node.attrs["axes"]]
        axes = [as_int(a) for a in axes or [None]]
        if any(a is None for a in axes):
            return None
        rank = len(labels) + len(axes)
        for axis in sorted(a % rank for a in axes):
            labels.insert(axis, "1")
    return mask if labels == ["F", "1", "1", "L"] else None


def _flatten(graph: gs.Graph, tensor: gs.Tensor, shape: gs.Constant, name: str) -> gs.Tensor:
    """(N, heads, D) -> (N, heads*D), the plugin's layout (same memory)."""
    out = gs.Variable(name, dtype=tensor.dtype)
    graph.nodes.append(gs.Node("Reshape", name=name, inputs=[tensor, shape], outputs=[out]))
    return out
