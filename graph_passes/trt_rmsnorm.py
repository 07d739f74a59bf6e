"""TensorRT target: every fused RMSNorm of the ONNX Runtime graph becomes the `Qwen3VLRMSNorm` plugin.

    SimplifiedLayerNormalization(X, gamma)                 -> Qwen3VLRMSNorm(X, gamma)            has_skip=0
    com.microsoft.SkipSimplifiedLayerNormalization(X, skip, gamma) -> Y[, "", "", sum]
                                                           -> Qwen3VLRMSNorm(X, skip, gamma) -> Y[, sum]
                                                              has_skip=1, emit_sum=1 when the sum is read

TensorRT's ONNX parser turns a node whose op type it does not import into a plugin of that name
(domain ignored) and asks the plugin for its output count before it sees the inputs, so the count
is an attribute (`emit_sum`), and the plugin node has no empty-named outputs. The node's domain is
"qwen3vl.trt" so that ONNX tools do not mistake it for an ONNX Runtime op. Contract:
trt_plugins/rmsnorm/README.md; numpy reference: graph_passes/plugin_reference.py.

This module also holds what every plugin pass shares: the domain and the plugin attributes.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import helper

PLUGIN_DOMAIN = "qwen3vl.trt"
MS_DOMAIN = "com.microsoft"
# What TensorRT's parser reads to find the creator; the defaults, written out so nothing is implied.
PLUGIN_ATTRS = {"plugin_version": "1", "plugin_namespace": ""}


def plugin_attrs(**attrs) -> dict:
    """A plugin node's attributes: its own, then plugin_version and plugin_namespace."""
    return {**attrs, **PLUGIN_ATTRS}


def use_plugin_domain(model: onnx.ModelProto) -> None:
    if not any(opset.domain == PLUGIN_DOMAIN for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid(PLUGIN_DOMAIN, 1))


def attribute(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def is_op(node: onnx.NodeProto, op_type: str, domain: str) -> bool:
    domains = ("", "ai.onnx") if domain == "" else (domain,)
    return node.op_type == op_type and node.domain in domains


def replace_node(node: onnx.NodeProto, op_type: str, inputs: list[str], outputs: list[str], **attrs) -> None:
    """Turns `node` into a plugin node in place (name kept, so its position and scope stay)."""
    replacement = helper.make_node(op_type, inputs, outputs, name=node.name, domain=PLUGIN_DOMAIN,
                                   **plugin_attrs(**attrs))
    node.CopyFrom(replacement)


class TrtRMSNorm:
    name = "trt_rmsnorm"

    def __call__(self, model: onnx.ModelProto, folder: Path) -> bool:
        graph = model.graph
        # Empty names mark absent optional inputs, not a tensor.
        read = ({name for node in graph.node for name in node.input} | {o.name for o in graph.output}) - {""}
        changed = 0
        for node in graph.node:
            if is_op(node, "SimplifiedLayerNormalization", ""):
                changed += _plain(node, read)
            elif is_op(node, "SkipSimplifiedLayerNormalization", MS_DOMAIN):
                changed += _with_skip(node, read)
        if changed:
            use_plugin_domain(model)
        return bool(changed)


trt_rmsnorm = TrtRMSNorm()


def _plain(node: onnx.NodeProto, read: set[str]) -> bool:
    if len(node.input) != 2 or attribute(node, "axis", -1) != -1 or attribute(node, "stash_type", 1) != 1:
        return False  # fuse_rmsnorm emits axis=-1, float32 math; anything else is not this plugin
    if any(name in read for name in node.output[1:]):
        return False  # inv_std_var is never produced by the plugin
    replace_node(node, "Qwen3VLRMSNorm", list(node.input), [node.output[0]],
                 epsilon=float(attribute(node, "epsilon", 1e-5)), has_skip=0, emit_sum=0)
    return True


def _with_skip(node: onnx.NodeProto, read: set[str]) -> bool:
    if len(node.input) > 3 and node.input[3]:
        return False  # a bias input: the exporter never emits one
    outputs = list(node.output) + [""] * (4 - len(node.output))
    if outputs[1] in read or outputs[2] in read:
        return False  # mean / inv_std_var are not plugin outputs
    emit_sum = bool(outputs[3]) and outputs[3] in read
    replace_node(node, "Qwen3VLRMSNorm", list(node.input[:3]), [outputs[0], *([outputs[3]] if emit_sum else [])],
                 epsilon=float(attribute(node, "epsilon", 1e-5)), has_skip=1, emit_sum=int(emit_sum))
    return True
