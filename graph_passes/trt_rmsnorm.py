"""TensorRT target: every fused RMSNorm of the ONNX Runtime graph becomes the `Qwen3VLRMSNorm` plugin.

    SimplifiedLayerNormalization(X, gamma)                 -> Qwen3VLRMSNorm(X, gamma)            has_skip=0
    com.microsoft.SkipSimplifiedLayerNormalization(X, skip, gamma) -> Y[, "", "", sum]
                                                           -> Qwen3VLRMSNorm(X, skip, gamma) -> Y[, sum]
                                                              has_skip=1, emit_sum=1 when the sum is read

TensorRT's ONNX parser turns a node whose op type it does not import into a plugin of that name
(domain ignored) and asks the plugin for its output count before it sees the inputs, so the count
is an attribute (`emit_sum`), and the plugin node has no empty-named outputs. Contract:
trt_plugins/rmsnorm/README.md; numpy reference: graph_passes/plugin_reference.py.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from .onnx_helpers import MS_DOMAIN, PLUGIN_DOMAIN, attribute, is_op, replace_with_plugin, use_domain


class TrtRMSNorm:
    name = "trt_rmsnorm"

    def __call__(self, model: onnx.ModelProto, folder: Path) -> bool:
        graph = model.graph
        # Empty names mark absent optional inputs, not a tensor.
        read = ({name for node in graph.node for name in node.input} | {o.name for o in graph.output}) - {""}
        changed = 0
        for node in graph.node:
            if is_op(node, "SimplifiedLayerNormalization"):
                changed += _plain(node, read)
            elif is_op(node, "SkipSimplifiedLayerNormalization", MS_DOMAIN):
                changed += _with_skip(node, read)
        if changed:
            use_domain(model, PLUGIN_DOMAIN)
        return bool(changed)


trt_rmsnorm = TrtRMSNorm()


def _plain(node: onnx.NodeProto, read: set[str]) -> bool:
    if len(node.input) != 2 or attribute(node, "axis", -1) != -1 or attribute(node, "stash_type", 1) != 1:
        return False  # fuse_rmsnorm emits axis=-1, float32 math; anything else is not this plugin
    if any(name in read for name in node.output[1:]):
        return False  # inv_std_var is never produced by the plugin
    replace_with_plugin(node, "Qwen3VLRMSNorm", list(node.input), [node.output[0]],
                        epsilon=float(attribute(node, "epsilon", 1e-5)), has_skip=0, emit_sum=0)
    return True


def _with_skip(node: onnx.NodeProto, read: set[str]) -> bool:
    if len(node.input) > 3 and node.input[3]:
        return False  # a bias input: the exporter never emits one
    outputs = list(node.output) + [""] * (4 - len(node.output))
    if outputs[1] in read or outputs[2] in read:
        return False  # mean / inv_std_var are not plugin outputs
    emit_sum = bool(outputs[3]) and outputs[3] in read
    replace_with_plugin(node, "Qwen3VLRMSNorm", list(node.input[:3]), [outputs[0], *([outputs[3]] if emit_sum else [])],
                        epsilon=float(attribute(node, "epsilon", 1e-5)), has_skip=1, emit_sum=int(emit_sum))
    return True
