"""ONNX Runtime target: the KV cache's storage type, a build option (`qwen3vl build --kv-dtype`).

Each decoder layer's `com.microsoft.GroupQueryAttention` node reads `past_key.i`/`past_value.i` and
writes `present_key.i`/`present_value.i`, bound by the runtime to one buffer per tensor. The node's
cache type (T_CACHE) is independent of its activations (T): this pass retypes those four graph
tensors, so the runtime allocates the cache in that type, and the math stays float32.

- fp16: the cache stored as float16.
- int8: the cache stored as int8 with static scales (`k_scale`, `v_scale`, GroupQueryAttention's
  inputs 12 and 13, float32), `kv_cache_bit_width` 8 and `k_quant_type`/`v_quant_type`. ONNX
  Runtime 1.32's CPU kernel writes each new key as saturate(round_half_even(x / scale)) into
  [-128, 127] and reads q * scale; the scales are constants of the graph (calibrated at build time,
  export/kv_calibration.py), not computed per token. PER_CHANNEL scales have shape
  (1, kv_heads, 1, head_dim), PER_TENSOR (1,).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from runtime.errors import Qwen3VLError

from .onnx_helpers import MS_DOMAIN, attribute, is_op

# --kv-dtype -> the ONNX element type the cache is stored in.
ORT_KV_TYPES = {"fp32": onnx.TensorProto.FLOAT, "fp16": onnx.TensorProto.FLOAT16, "int8": onnx.TensorProto.INT8}
GRANULARITIES = ("per_channel", "per_tensor")  # of the int8 scales
K_SCALE, V_SCALE = 12, 13  # GroupQueryAttention's input indexes of the int8 scales


def kv_cache_dtype(kv_dtype: str, scales: dict[str, np.ndarray] | None = None,
                   granularity: str = "per_channel") -> "KVCacheDtype":
    """`scales` (int8 only): graph tensor name (past_key.i / past_value.i) -> dequantization scale,
    (kv_heads, head_dim) per channel or a scalar per tensor."""
    if kv_dtype not in ORT_KV_TYPES:
        raise Qwen3VLError(f"unsupported KV cache type {kv_dtype!r} (choose from {', '.join(ORT_KV_TYPES)})")
    if kv_dtype == "int8":
        if granularity not in GRANULARITIES:
            raise Qwen3VLError(f"unsupported KV scale granularity {granularity!r} (choose from "
                               f"{', '.join(GRANULARITIES)})")
        if not scales:
            raise Qwen3VLError("--kv-dtype int8 needs calibrated scales")
    return KVCacheDtype(kv_dtype, scales or {}, granularity)


class KVCacheDtype:
    def __init__(self, kv_dtype: str, scales: dict[str, np.ndarray], granularity: str):
        self.kv_dtype, self.scales, self.granularity = kv_dtype, scales, granularity
        self.name = f"kv_cache_dtype:{kv_dtype}" + (f":{granularity}" if kv_dtype == "int8" else "")

    def __call__(self, model: onnx.ModelProto, folder: Path) -> bool:
        graph = model.graph
        nodes = [n for n in graph.node if is_op(n, "GroupQueryAttention", MS_DOMAIN)]
        if not nodes:
            return False
        want = ORT_KV_TYPES[self.kv_dtype]
        inputs, outputs = {i.name: i for i in graph.input}, {o.name: o for o in graph.output}
        readers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                readers.setdefault(name, []).append(node)
        initializers = {t.name: t for t in graph.initializer}
        changed = False
        for node in nodes:
            cache = [inputs.get(name) for name in node.input[3:5]] + [outputs.get(name) for name in node.output[1:3]]
            if any(t is None for t in cache):
                raise Qwen3VLError(f"{node.name}: its KV cache is not the graph's past/present tensors; "
                                   f"cannot store it as {self.kv_dtype}")
            for past in node.input[3:5]:
                if any(r is not node and r.op_type != "Shape" for r in readers[past]):
                    raise Qwen3VLError(f"{past} is read by more than its attention node; cannot store it as "
                                       f"{self.kv_dtype}")
            for t in cache:
                if t.type.tensor_type.elem_type != want:
                    t.type.tensor_type.elem_type = want
                    changed = True
            if self.kv_dtype == "int8":
                changed |= self._quantized(node, graph, initializers)
        return changed

    def _quantized(self, node: onnx.NodeProto, graph: onnx.GraphProto, initializers: dict) -> bool:
        """Scale inputs and quantization attributes of one node; True if anything changed."""
        changed = False
        kind = self.granularity.upper()
        for name, value in (("kv_cache_bit_width", 8), ("k_quant_type", kind), ("v_quant_type", kind)):
            current = attribute(node, name)
            if current != (value.encode() if isinstance(value, str) else value):
                for i, a in enumerate(node.attribute):
                    if a.name == name:
                        del node.attribute[i]
                        break
                node.attribute.append(onnx.helper.make_attribute(name, value))
                changed = True
        while len(node.input) <= V_SCALE:
            node.input.append("")
        for index, past in ((K_SCALE, node.input[3]), (V_SCALE, node.input[4])):
            if past not in self.scales:
                raise Qwen3VLError(f"no calibrated scale for {past}")
            scale = self._scale_array(np.asarray(self.scales[past], dtype=np.float32), past)
            name = f"kv_scale.{past}"
            existing = initializers.get(name)
            if existing is not None and np.array_equal(numpy_helper.to_array(existing), scale):
                if node.input[index] != name:
                    node.input[index] = name
                    changed = True
                continue
            if existing is not None:
                graph.initializer.remove(existing)
            tensor = numpy_helper.from_array(scale, name)
            graph.initializer.append(tensor)
            initializers[name] = tensor
            node.input[index] = name
            changed = True
        return changed

    def _scale_array(self, scale: np.ndarray, past: str) -> np.ndarray:
        if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            raise Qwen3VLError(f"the KV scale of {past} is not finite and positive")
        if self.granularity == "per_tensor":
            return np.asarray([scale.max()], dtype=np.float32)
        if scale.ndim != 2:
            raise Qwen3VLError(f"per-channel KV scale of {past} must be (kv_heads, head_dim), got {scale.shape}")
        return scale[None, :, None, :].astype(np.float32)
