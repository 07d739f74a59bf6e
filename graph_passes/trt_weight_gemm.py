"""TensorRT target: block-quantized weights keep their bytes and move to our plugins.

    com.microsoft.MatMulNBits(A, B, scales[, zero_points][, g_idx][, bias])
        -> Qwen3VLWeightOnlyGemm(A, B', scales[, zero_points'][, bias])
           K, N, bits, block_size, accuracy_level, has_zero_points, has_bias
    com.microsoft.GatherBlockQuantized(data, indices, scales[, zero_points])   gather_axis 0, quantize_axis 1
        -> Qwen3VLQuantizedGather(data', Cast(indices, int32), scales[, zero_points'])
           bits, block_size, has_zero_points

The bytes stay MatMulNBits' (trt_plugins/weight_only_gemm/README.md), but TensorRT 8.6 takes no uint8
plugin input (`addConstant` has no UINT8, and the parser widens a uint8 initializer byte by byte into
int32). So in this graph only, the packed tensors are *typed* int32 over the same bytes, which the
plugins reinterpret:
  B' / data'      int32 (N, k_blocks, blob / 4), the same external bytes (blob is 8-64 bytes: block
                  sizes >= 16); the embedding table and the tied lm_head's B are one initializer
                  (the parser shares Constant layers by name only: two names would be two copies)
  zero_points'    int32 (ceil(N * zp_row / 4)), flat: the uint8 (N, zp_row) bytes, zero-padded to a
                  whole word; the same external bytes when N * zp_row is a multiple of 4 (almost
                  always), else this graph's own inline initializer
  indices         int32 whatever the graph's type (8.6 narrows int64 anyway; 10.x would not)
The ONNX Runtime graph keeps its uint8 tensors and shares the weight file. Absent optional inputs
are dropped rather than left as empty names, and `has_*` attributes say which are there: the parser
asks a plugin for its outputs before it sees the inputs, and a kernel should not guess what input 3
is. Nodes with forms the plugins do not take (g_idx, float zero points, other axes) are left as they are.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .external_data import read_tensor
from .onnx_helpers import (MS_DOMAIN, PLUGIN_DOMAIN, all_names, attribute, drop_unused, is_op, replace_with_plugin,
                           tensor_types, unique_name, use_domain)

UINT8, INT32 = TensorProto.UINT8, TensorProto.INT32


class TrtWeightGemm:
    name = "trt_weight_gemm"

    def __call__(self, model: onnx.ModelProto, folder: Path) -> bool:
        types = {t.name: t.data_type for t in model.graph.initializer}
        ranks = {t.name: len(t.dims) for t in model.graph.initializer}
        converted = []
        for node in model.graph.node:
            if is_op(node, "MatMulNBits", MS_DOMAIN) and _gemm(node, types):
                converted.append(node)
            elif is_op(node, "GatherBlockQuantized", MS_DOMAIN) and _gather(node, types, ranks):
                converted.append(node)
        if not converted:
            return False
        use_domain(model, PLUGIN_DOMAIN)
        _as_words(model, Path(folder), converted)
        gathers = {n.output[0] for n in converted if n.op_type == "Qwen3VLQuantizedGather"}
        # (drop_unused rebuilt the node list: find the nodes again)
        _int32_indices(model, [n for n in model.graph.node if n.output and n.output[0] in gathers])
        return True


trt_weight_gemm = TrtWeightGemm()


def _optional(node: onnx.NodeProto, index: int) -> str:
    return node.input[index] if len(node.input) > index else ""


def _gemm(node: onnx.NodeProto, types: dict[str, int]) -> bool:
    a, b, scales = node.input[:3]
    zero_points, g_idx, bias = (_optional(node, i) for i in (3, 4, 5))
    bits = attribute(node, "bits", 4)
    if g_idx or bits not in (4, 8) or types.get(b) != UINT8:
        return False
    if zero_points and types.get(zero_points) != UINT8:
        return False  # float zero points (or computed ones, type unknown here): not in the contract
    inputs = [a, b, scales] + [name for name in (zero_points, bias) if name]
    replace_with_plugin(node, "Qwen3VLWeightOnlyGemm", inputs, [node.output[0]],
                        K=attribute(node, "K"), N=attribute(node, "N"), bits=bits,
                        block_size=attribute(node, "block_size"), accuracy_level=attribute(node, "accuracy_level", 0),
                        has_zero_points=int(bool(zero_points)), has_bias=int(bool(bias)))
    return True


def _gather(node: onnx.NodeProto, types: dict[str, int], ranks: dict[str, int]) -> bool:
    data, indices, scales = node.input[:3]
    zero_points = _optional(node, 3)
    bits = attribute(node, "bits", 4)
    if attribute(node, "gather_axis", 0) != 0 or attribute(node, "quantize_axis", 1) not in (1, -1):
        return False
    if ranks.get(data) != 2 or ranks.get(scales) != 2:
        return False  # a (rows, packed columns) table with (rows, k_blocks) scales is the contract
    if bits not in (4, 8) or types.get(data) != UINT8 or (zero_points and types.get(zero_points) != UINT8):
        return False
    inputs = [data, indices, scales] + ([zero_points] if zero_points else [])
    replace_with_plugin(node, "Qwen3VLQuantizedGather", inputs, [node.output[0]], bits=bits,
                        block_size=attribute(node, "block_size", 128), has_zero_points=int(bool(zero_points)))
    return True


# -- uint8 bytes as int32 words ----------------------------------------------------------------------

def _as_words(model: onnx.ModelProto, folder: Path, plugins: list[onnx.NodeProto]) -> None:
    """Retypes the converted plugins' packed weights and zero points as int32 over the same bytes."""
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    ours = {id(n) for n in plugins}
    foreign = {name for node in graph.node if id(node) not in ours for name in node.input}  # read by others too
    taken = all_names(graph)
    words: dict[str, str] = {}  # uint8 name -> its int32 tensor's name
    by_bytes: dict[tuple, str] = {}  # (location, offset, length) -> the int32 tensor over those bytes
    replaced: set[str] = set()

    def convert(name: str, shape_of) -> str:
        if name not in words:
            source = initializers[name]
            key = _bytes_key(source)
            if key is not None and key in by_bytes:
                words[name] = by_bytes[key]  # the same bytes under another name: the tied embedding
            else:
                target = source if name not in foreign else _copy(source, unique_name(f"{name}.int32", taken), graph)
                _retype(target, shape_of(source), folder)
                words[name] = target.name
                if key is not None:
                    by_bytes[key] = target.name
            replaced.add(name)
        return words[name]

    # GEMMs first: a tied table keeps the name of the lm_head's (N, k_blocks, blob) weight.
    for node in sorted(plugins, key=lambda n: n.op_type == "Qwen3VLQuantizedGather"):
        gather = node.op_type == "Qwen3VLQuantizedGather"
        packed_at = 0 if gather else 1
        if gather:
            rows, k_blocks = (int(d) for d in initializers[node.input[2]].dims)  # scales (rows, k_blocks)
        else:
            rows, k_blocks = attribute(node, "N"), -(-attribute(node, "K") // attribute(node, "block_size"))
        node.input[packed_at] = convert(node.input[packed_at], lambda t: _packed_shape(t, rows, k_blocks))
        if attribute(node, "has_zero_points", 0):
            node.input[3] = convert(node.input[3], _zero_point_shape)
    drop_unused(graph, replaced - set(words.values()))


def _packed_shape(tensor: TensorProto, rows: int, k_blocks: int) -> tuple[int, int, int]:
    size = int(np.prod(tensor.dims))
    blob = size // (rows * k_blocks)
    if tensor.dims[0] != rows or size != rows * k_blocks * blob or blob % 4:
        raise ValueError(f"{tensor.name}: {list(tensor.dims)} is not (N, k_blocks, blob) packed codes with "
                         f"N={rows}, k_blocks={k_blocks} and blob a multiple of 4 bytes")
    return rows, k_blocks, blob // 4


def _zero_point_shape(tensor: TensorProto) -> tuple[int]:
    return (-(-int(np.prod(tensor.dims)) // 4),)


def _retype(tensor: TensorProto, shape: tuple, folder: Path) -> None:
    """`tensor` (uint8) becomes int32 of `shape`: the same external bytes when they fill the words
    exactly, else inline bytes zero-padded to a whole word."""
    size = int(np.prod(tensor.dims))
    external = tensor.data_location == TensorProto.EXTERNAL
    if external and size == 4 * int(np.prod(shape)):
        tensor.data_type = INT32
        del tensor.dims[:]
        tensor.dims.extend(shape)
        return
    data = np.ascontiguousarray(read_tensor(tensor, folder), dtype=np.uint8).reshape(-1)
    padded = np.zeros(4 * int(np.prod(shape)), np.uint8)
    padded[:size] = data
    replacement = numpy_helper.from_array(padded.view("<i4").reshape(shape), tensor.name)
    tensor.CopyFrom(replacement)


def _copy(source: TensorProto, name: str, graph: onnx.GraphProto) -> TensorProto:
    copy = graph.initializer.add()
    copy.CopyFrom(source)
    copy.name = name
    return copy


def _bytes_key(tensor: TensorProto) -> tuple | None:
    if tensor.data_location != TensorProto.EXTERNAL:
        return None
    entries = {e.key: e.value for e in tensor.external_data}
    return entries["location"], int(entries.get("offset", 0)), int(entries["length"])


def _int32_indices(model: onnx.ModelProto, gathers: list[onnx.NodeProto]) -> None:
    """Casts each gather's indices to int32 (one Cast per source tensor), placed before its first reader."""
    if not gathers:
        return
    types = tensor_types(model)
    graph = model.graph
    taken = all_names(graph)
    casts: dict[str, onnx.NodeProto] = {}
    for node in gathers:
        source = node.input[1]
        if types.get(source, (None,))[0] == INT32:
            continue
        if source not in casts:
            out = unique_name(f"{source}_int32", taken)
            casts[source] = helper.make_node("Cast", [source], [out], name=unique_name(f"{out}/Cast", taken), to=INT32)
        node.input[1] = casts[source].output[0]
    if not casts:
        return
    nodes = []
    pending = dict(casts)
    for node in graph.node:
        for name in [n for n in pending if pending[n].output[0] in node.input]:
            nodes.append(pending.pop(name))
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
