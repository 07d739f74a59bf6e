"""TensorRT target: the KV cache's storage type, a build option (`qwen3vl build --kv-dtype`).

Each `Qwen3VLAttention` node (trt_attention) reads its layer's `past_key`/`past_value` graph inputs
and writes `present_key`/`present_value` graph outputs in the cache type `kv_cache_type`, which
trt_attention takes from the exported graph (fp32, fp16 in fp16 engines). This pass sets that type:
the attribute, and the element type of those four graph tensors, so the runtime binds buffers of
the type the plugin stores. The activations keep their type; the math stays float32 either way.
FP16 storage with FP32 math is the Pascal mode: it halves the cache and the traffic that bounds
decode, while FP16 arithmetic on SM 6.1 runs at 1/64 rate. The plugin stores fp32 or fp16; int8
(with scales) is not implemented, and asking for it is an error.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from runtime.errors import Qwen3VLError

from .onnx_helpers import PLUGIN_DOMAIN, attribute, is_op

# kv_cache_type value -> ONNX element type: what the attention plugin stores.
PLUGIN_KV_TYPES = {"fp32": onnx.TensorProto.FLOAT, "fp16": onnx.TensorProto.FLOAT16}


def trt_kv_cache(kv_dtype: str) -> "TrtKVCache":
    if kv_dtype not in PLUGIN_KV_TYPES:
        raise Qwen3VLError(f"--kv-dtype {kv_dtype}: the TensorRT attention plugin stores its KV cache as "
                           f"{' or '.join(PLUGIN_KV_TYPES)} ({kv_dtype} is not implemented)")
    return TrtKVCache(kv_dtype)


class TrtKVCache:
    def __init__(self, kv_dtype: str):
        self.kv_dtype = kv_dtype
        self.name = f"trt_kv_cache:{kv_dtype}"

    def __call__(self, model: onnx.ModelProto, folder: Path) -> bool:
        graph = model.graph
        nodes = [n for n in graph.node if is_op(n, "Qwen3VLAttention", PLUGIN_DOMAIN)]
        if not nodes:
            return False
        want = PLUGIN_KV_TYPES[self.kv_dtype]
        inputs, outputs = {i.name: i for i in graph.input}, {o.name: o for o in graph.output}
        readers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                readers.setdefault(name, []).append(node)
        changed = False
        for node in nodes:
            cache = [inputs.get(name) for name in node.input[7:9]] + [outputs.get(name) for name in node.output[1:3]]
            if any(t is None for t in cache):
                raise Qwen3VLError(f"{node.name}: its KV cache is not the graph's past/present tensors; "
                                   f"cannot store it as {self.kv_dtype}")
            for past in node.input[7:9]:
                if any(r is not node and r.op_type != "Shape" for r in readers[past]):
                    raise Qwen3VLError(f"{past} is read by more than its attention node; cannot store it as "
                                       f"{self.kv_dtype}")
            if attribute(node, "kv_cache_type", b"") == self.kv_dtype.encode() and all(
                    t.type.tensor_type.elem_type == want for t in cache):
                continue
            for t in cache:
                t.type.tensor_type.elem_type = want
            for a in node.attribute:
                if a.name == "kv_cache_type":
                    a.s = self.kv_dtype.encode()
                    break
            else:
                node.attribute.append(onnx.helper.make_attribute("kv_cache_type", self.kv_dtype))
            changed = True
        return changed
