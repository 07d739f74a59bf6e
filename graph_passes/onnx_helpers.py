"""What the passes share about ONNX itself: op domains and plugin nodes, reading attributes and tensor
types, names and dead initializers in a GraphProto, and the onnx-graphsurgeon round trip with the
small graph queries that the pattern matchers walk with.

graphsurgeon keeps an external initializer as the original TensorProto (lazy values) and exports it
unchanged, so `import_graph` / `export_graph` never read the weights; `constant_array` refuses to.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper
from onnx.external_data_helper import uses_external_data

MS_DOMAIN = "com.microsoft"  # ONNX Runtime's contrib ops
# Our TensorRT plugin nodes. TensorRT's parser ignores the domain; it keeps ONNX tools from taking
# the nodes for ONNX Runtime ops.
PLUGIN_DOMAIN = "qwen3vl.trt"
# What TensorRT's parser reads to find the creator; the defaults, written out so nothing is implied.
PLUGIN_ATTRS = {"plugin_version": "1", "plugin_namespace": ""}
# Storage types of the activations that the fused ops and the plugins take.
FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)


# -- NodeProto and GraphProto ----------------------------------------------------------------------

def is_op(node: onnx.NodeProto, op_type: str, domain: str = "") -> bool:
    domains = ("", "ai.onnx") if domain == "" else (domain,)
    return node.op_type == op_type and node.domain in domains


def attribute(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def use_domain(model: onnx.ModelProto, domain: str) -> None:
    """Adds `domain` (version 1) to the model's opset imports unless it is there."""
    if not any(opset.domain == domain for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid(domain, 1))


def plugin_attrs(**attrs) -> dict:
    """A plugin node's attributes: its own, then plugin_version and plugin_namespace."""
    return {**attrs, **PLUGIN_ATTRS}


def replace_with_plugin(node: onnx.NodeProto, op_type: str, inputs: list[str], outputs: list[str], **attrs) -> None:
    """Turns `node` into a plugin node in place (name kept, so its position and scope stay)."""
    replacement = helper.make_node(op_type, inputs, outputs, name=node.name, domain=PLUGIN_DOMAIN,
                                   **plugin_attrs(**attrs))
    node.CopyFrom(replacement)


def tensor_types(model: onnx.ModelProto) -> dict[str, tuple[int, tuple | None]]:
    """Element type and shape (int, symbolic name or None per dimension) of every tensor that ONNX
    shape inference reaches. It reads initializer headers only, and passes GroupQueryAttention
    because the exporter recorded that node's output types."""
    inferred = onnx.shape_inference.infer_shapes(model)
    found = {}
    for info in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        tensor_type = info.type.tensor_type
        if not tensor_type.elem_type:
            continue
        shape = None
        if tensor_type.HasField("shape"):
            shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                          for d in tensor_type.shape.dim)
        found[info.name] = (tensor_type.elem_type, shape)
    return found


def all_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor and node name in use."""
    names = {t.name for t in graph.initializer}
    names |= {v.name for v in (*graph.input, *graph.output, *graph.value_info)}
    for node in graph.node:
        names |= {*node.input, *node.output, node.name}
    return names


def unique_name(name: str, taken: set[str]) -> str:
    """`name`, or `name.1`, `name.2`, ... if taken; the result joins `taken`."""
    candidate, index = name, 1
    while candidate in taken:
        candidate, index = f"{name}.{index}", index + 1
    taken.add(candidate)
    return candidate


def drop_unused(graph: onnx.GraphProto, candidates: set[str]) -> None:
    """Removes the initializers and Constant nodes named in `candidates` that nothing reads any more."""
    used = {o.name for o in graph.output}
    for node in _walk_nodes(graph):
        used.update(node.input)
    gone = candidates - used
    kept = [t for t in graph.initializer if t.name not in gone]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    kept_inputs = [i for i in graph.input if i.name not in gone]  # models that list initializers as inputs
    del graph.input[:]
    graph.input.extend(kept_inputs)
    kept_nodes = [n for n in graph.node if not (n.op_type == "Constant" and n.output[0] in gone)]
    del graph.node[:]
    graph.node.extend(kept_nodes)


def _walk_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for a in node.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                yield from _walk_nodes(sub)


# -- onnx-graphsurgeon -----------------------------------------------------------------------------

def import_graph(model: onnx.ModelProto) -> gs.Graph:
    return gs.import_onnx(model)


def export_graph(graph: gs.Graph, model: onnx.ModelProto) -> None:
    """Writes `graph` back into `model` (cleaned up, topologically sorted). The model's own fields
    (IR version, producer, metadata) stay; opset imports are kept and gain any domain a new node uses."""
    graph.cleanup().toposort()
    exported = gs.export_onnx(graph)
    model.graph.CopyFrom(exported.graph)
    imported = {opset.domain for opset in model.opset_import}
    for opset in exported.opset_import:
        if opset.domain not in imported:
            model.opset_import.append(opset)
            imported.add(opset.domain)
    for domain in sorted({node.domain for node in model.graph.node} - imported - {"ai.onnx"}):
        model.opset_import.append(helper.make_opsetid(domain, 1))


def is_node(node: gs.Node, op: str, domain: str = "") -> bool:
    domains = (None, "", "ai.onnx") if domain == "" else (domain,)
    return node.op == op and node.domain in domains


def producer(tensor: gs.Tensor, op: str, domain: str = "") -> gs.Node | None:
    """The node writing `tensor`, when it is an `op` of `domain`."""
    if isinstance(tensor, gs.Variable) and len(tensor.inputs) == 1 and is_node(tensor.inputs[0], op, domain):
        return tensor.inputs[0]
    return None


def only_reader(tensor: gs.Tensor, op: str, graph: gs.Graph) -> gs.Node | None:
    """The single node reading `tensor`, when it is an `op` and the tensor is not a graph output."""
    if len(tensor.outputs) == 1 and is_node(tensor.outputs[0], op) and not is_graph_output(tensor, graph):
        return tensor.outputs[0]
    return None


def is_graph_output(tensor: gs.Tensor, graph: gs.Graph) -> bool:
    return any(t is tensor for t in graph.outputs)


def constant(tensor: gs.Tensor) -> gs.Constant | None:
    """An initializer, or the value of a Constant node (its values not read)."""
    if isinstance(tensor, gs.Constant):
        return tensor
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        value = tensor.inputs[0].attrs.get("value")
        return value if isinstance(value, gs.Constant) else None
    return None


def constant_array(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of an inline initializer or Constant node; None for anything else (weights in
    external data are never read)."""
    value = constant(tensor)
    if value is None:
        return None
    proto = getattr(value._values, "tensor", None)  # graphsurgeon's lazy value keeps the TensorProto
    if proto is not None and uses_external_data(proto):
        return None
    return np.asarray(value.values)


def scalar(tensor: gs.Tensor) -> float | None:
    """The value of a one-element inline constant."""
    array = constant_array(tensor)
    return None if array is None or array.size != 1 else float(array.reshape(()))


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
