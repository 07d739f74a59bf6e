"""TensorRT target: block-quantized weights keep their bytes and move to our plugins.

    com.microsoft.MatMulNBits(A, B, scales[, zero_points][, g_idx][, bias])
        -> Qwen3VLWeightOnlyGemm(A, B, scales[, zero_points][, bias])
           K, N, bits, block_size, accuracy_level, has_zero_points, has_bias
    com.microsoft.GatherBlockQuantized(data, indices, scales[, zero_points])   gather_axis 0, quantize_axis 1
        -> Qwen3VLQuantizedGather(data, indices, scales[, zero_points])
           bits, block_size, has_zero_points

The initializers are untouched (same names, same external data), so the weight layout is exactly
MatMulNBits' (trt_plugins/weight_only_gemm/README.md). Absent optional inputs are dropped rather
than left as empty names, and `has_*` attributes say which are there: the parser asks a plugin for
its outputs before it sees the inputs, and a kernel should not guess what input 3 is. Nodes with
forms the plugins do not take (g_idx, float zero points, other axes) are left as they are.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from .onnx_helpers import MS_DOMAIN, PLUGIN_DOMAIN, attribute, is_op, replace_with_plugin, use_domain

UINT8 = onnx.TensorProto.UINT8


class TrtWeightGemm:
    name = "trt_weight_gemm"

    def __call__(self, model: onnx.ModelProto, folder: Path) -> bool:
        types = {t.name: t.data_type for t in model.graph.initializer}
        ranks = {t.name: len(t.dims) for t in model.graph.initializer}
        changed = 0
        for node in model.graph.node:
            if is_op(node, "MatMulNBits", MS_DOMAIN):
                changed += _gemm(node, types)
            elif is_op(node, "GatherBlockQuantized", MS_DOMAIN):
                changed += _gather(node, types, ranks)
        if changed:
            use_domain(model, PLUGIN_DOMAIN)
        return bool(changed)


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
    if ranks.get(data) != 2:
        return False  # a (rows, packed columns) table is the contract
    if bits not in (4, 8) or types.get(data) != UINT8 or (zero_points and types.get(zero_points) != UINT8):
        return False
    inputs = [data, indices, scales] + ([zero_points] if zero_points else [])
    replace_with_plugin(node, "Qwen3VLQuantizedGather", inputs, [node.output[0]], bits=bits,
                        block_size=attribute(node, "block_size", 128), has_zero_points=int(bool(zero_points)))
    return True
