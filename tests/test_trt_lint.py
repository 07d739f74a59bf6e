"""Every `*.trt.onnx` a build writes is a graph TensorRT 8.6's ONNX parser accepts, as far as a
reading of the parser can tell without TensorRT (no TensorRT runs here):

- every op is one the 8.6 parser imports itself (graph_passes/tensorrt86_onnx_ops.txt, derived from
  onnx-tensorrt's `release/8.6-GA` importer source) or one of our plugins, in an opset it reads (<= 17);
- no plugin input of a type an 8.6 plugin cannot take: only FLOAT, FLOAT16 and INT32 (no UINT8 - the
  parser would widen packed bytes into int32 one by one -, no INT8 without scales, BOOL or INT64);
- plugin attributes only of the kinds the parser's fallback importer turns into plugin fields
  (INT, FLOAT, STRING, INTS, FLOATS, TENSOR of FLOAT/INT8/INT16/INT32/FLOAT16/DOUBLE);
- the KV cache tensors typed as the attention plugin's `kv_cache_type`;
- no two initializers over the same bytes (the parser shares Constant layers by name only: the tied
  embedding is one initializer, read by the gather and the lm_head), and no uint8 initializer at all.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import AttributeProto, TensorProto, helper, numpy_helper

from graph_passes.onnx_helpers import PLUGIN_DOMAIN
from graph_passes.plugin_reference import PLUGIN_OPS

ROOT = Path(__file__).resolve().parents[1]
OP_LIST = ROOT / "graph_passes" / "tensorrt86_onnx_ops.txt"
PLUGINS = {op.__name__ for op in PLUGIN_OPS}

PLUGIN_INPUT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT32}
FIELD_KINDS = {AttributeProto.INT, AttributeProto.FLOAT, AttributeProto.STRING, AttributeProto.INTS,
               AttributeProto.FLOATS, AttributeProto.TENSOR}
FIELD_TENSOR_TYPES = {TensorProto.FLOAT, TensorProto.INT8, TensorProto.INT16, TensorProto.INT32, TensorProto.FLOAT16,
                      TensorProto.DOUBLE}
KV_CACHE_TYPES = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16}


def parser_ops() -> tuple[set[str], int]:
    """(op types the 8.6 parser imports, its highest default-domain opset) from the committed list."""
    ops, max_opset = set(), None
    for line in OP_LIST.read_text().splitlines():
        if line.startswith("# max_opset:"):
            max_opset = int(line.split(":")[1])
        elif line and not line.startswith("#"):
            ops.add(line.strip())
    return ops, max_opset


# -- the lint --------------------------------------------------------------------------------------

def _type_name(elem_type: int | None) -> str:
    return TensorProto.DataType.Name(elem_type) if elem_type else "unknown"


def _plugin_output_types(node: onnx.NodeProto, types: dict[str, int]) -> list[int | None]:
    """The plugins' output types, as their contracts (trt_plugins/*/README.md) give them."""
    first = types.get(node.input[0])
    if node.op_type == "Qwen3VLAttention":
        return [first, types.get(node.input[7]), types.get(node.input[8])]
    if node.op_type == "Qwen3VLQuantizedGather":
        return [types.get(node.input[2])]  # the scales' type
    return [first] * len(node.output)  # RMSNorm (y and the sum), weight-only GEMM, vision attention


def element_types(model: onnx.ModelProto) -> dict[str, int]:
    """The element type of every tensor: ONNX type inference for standard ops, the contracts for the
    plugin nodes (which inference skips), repeated until nothing new is learnt."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    known: dict[str, int] = {}
    while True:
        inferred = onnx.shape_inference.infer_shapes(model).graph
        for info in (*inferred.input, *inferred.value_info, *inferred.output):
            if info.type.tensor_type.elem_type:
                known[info.name] = info.type.tensor_type.elem_type
        known.update({t.name: t.data_type for t in graph.initializer})
        for node in graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].type == AttributeProto.TENSOR:
                known.setdefault(node.output[0], node.attribute[0].t.data_type)
        learnt = False
        declared = {v.name for v in graph.value_info} | {o.name for o in graph.output}
        for node in graph.node:
            if node.domain != PLUGIN_DOMAIN:
                continue
            for name, elem_type in zip(node.output, _plugin_output_types(node, known)):
                if elem_type and name not in declared:
                    graph.value_info.append(helper.make_tensor_value_info(name, elem_type, None))
                    known[name] = elem_type
                    learnt = True
        if not learnt:
            return known


def lint(model: onnx.ModelProto) -> list[str]:
    """What TensorRT 8.6's parser would refuse (or waste memory on) in a TensorRT-target graph."""
    ops, max_opset = parser_ops()
    problems = []
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version > max_opset:
            problems.append(f"opset {opset.version} (the 8.6 parser reads up to {max_opset})")
    types = element_types(model)
    graph_io = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)}
    for node in model.graph.node:
        where = f"{node.op_type} {node.name}"
        if node.domain == PLUGIN_DOMAIN:
            if node.op_type not in PLUGINS:
                problems.append(f"{where}: not one of our plugins")
            if node.op_type in ops:
                problems.append(f"{where}: the parser imports this op type itself; the plugin would never be called")
        elif node.op_type not in ops or node.domain not in ("", "ai.onnx"):
            problems.append(f"{where}: domain {node.domain!r} op the 8.6 parser does not import")
            continue
        else:
            continue
        for index, name in enumerate(node.input):
            if not name:
                problems.append(f"{where}: input {index} is empty (the plugin would see a different input count)")
            elif types.get(name) not in PLUGIN_INPUT_TYPES:
                problems.append(f"{where}: input {index} {name} is {_type_name(types.get(name))}; an 8.6 plugin "
                                f"takes FLOAT, FLOAT16 or INT32")
        for a in node.attribute:
            if a.type not in FIELD_KINDS:
                problems.append(f"{where}: attribute {a.name} of kind {AttributeProto.AttributeType.Name(a.type)}")
            elif a.type == AttributeProto.TENSOR and a.t.data_type not in FIELD_TENSOR_TYPES:
                problems.append(f"{where}: tensor attribute {a.name} of type {_type_name(a.t.data_type)}")
        if node.op_type == "Qwen3VLAttention":
            cache = helper.get_attribute_value(next(a for a in node.attribute if a.name == "kv_cache_type")).decode()
            for name in (*node.input[7:9], *node.output[1:3]):
                if graph_io.get(name) != KV_CACHE_TYPES.get(cache):
                    problems.append(f"{where}: {name} is {_type_name(graph_io.get(name))}, kv_cache_type {cache}")
    seen: dict[tuple, str] = {}
    for tensor in model.graph.initializer:
        if tensor.data_type == TensorProto.UINT8:
            problems.append(f"initializer {tensor.name} is UINT8 (the parser widens it byte by byte)")
        entries = {e.key: e.value for e in tensor.external_data}
        if entries:
            key = (entries["location"], int(entries.get("offset", 0)), int(entries["length"]))
            if key in seen:
                problems.append(f"initializers {seen[key]} and {tensor.name} hold the same bytes: two Constant "
                                f"layers in TensorRT")
            seen.setdefault(key, tensor.name)
    return problems


# -- every graph a build writes --------------------------------------------------------------------

# Tiny engines over the forms the TensorRT passes write: float and FP16 graphs, weight-only INT8/INT4
# (symmetric and with zero points, every block size; vision INT8 too), an FP16 KV cache, the tied
# embedding (gqa2-tied) and an untied one (gqa6-untied).
BUILDS = {
    "fp32": ("gqa2-tied", {}),
    "fp16": ("gqa2-tied", {"precision": "fp16"}),
    "fp32-kv-fp16": ("gqa2-tied", {"kv_dtype": "fp16"}),
    "int8-sym-b32": ("gqa2-tied", {"precision": "int8", "block_size": 32}),
    "int4-asym-b64": ("gqa2-tied", {"precision": "int4", "symmetric": False}),
    "int4-sym-b128-kv-fp16": ("gqa2-tied", {"precision": "int4", "block_size": 128, "kv_dtype": "fp16"}),
    "int8-asym-b128-untied": ("gqa6-untied", {"precision": "int8", "block_size": 128, "symmetric": False}),
}


@pytest.mark.parametrize("build", list(BUILDS))
def test_every_tensorrt_graph_a_build_writes_passes_the_86_lint(tiny_engine, build):
    config, options = BUILDS[build]
    engine = tiny_engine(config, backend="trt", **options)
    graphs = sorted(engine.glob("*.trt.onnx"))
    assert [g.name for g in graphs] == ["decoder.trt.onnx", "vision.trt.onnx"]
    for path in graphs:
        model = onnx.load(str(path), load_external_data=False)
        assert lint(model) == [], path.name
        plugins = {n.op_type for n in model.graph.node if n.domain == PLUGIN_DOMAIN}
        expected = {"Qwen3VLRMSNorm", "Qwen3VLAttention"} if path.name.startswith("decoder") else \
            {"Qwen3VLVisionAttention"}
        if options.get("precision") in ("int8", "int4"):
            expected |= {"Qwen3VLWeightOnlyGemm"} | ({"Qwen3VLQuantizedGather"} if path.name.startswith("decoder")
                                                     else set())
        assert expected <= plugins, path.name
    decoder = onnx.load(str(engine / "decoder.trt.onnx"), load_external_data=False)
    if config == "gqa2-tied":
        assert _embedding_and_lm_head(decoder)[0] == _embedding_and_lm_head(decoder)[1]  # one tied initializer


def _embedding_and_lm_head(model: onnx.ModelProto) -> tuple[str, str]:
    """The initializer the token embedding reads and the one the lm_head reads."""
    initializers = {t.name for t in model.graph.initializer}
    embedding = next(n.input[0] for n in model.graph.node
                     if n.op_type in ("Gather", "Qwen3VLQuantizedGather") and n.input[0] in initializers)
    logits_side = [n for n in model.graph.node if n.op_type in ("Gemm", "MatMul", "Qwen3VLWeightOnlyGemm")]
    head = logits_side[-1]  # the last linear layer is the lm_head
    return embedding, next(name for name in head.input[1:2] if name in initializers)


# -- the lint itself catches what it is for --------------------------------------------------------

def test_op_list_is_the_86_importer_table():
    ops, max_opset = parser_ops()
    assert max_opset == 17 and len(ops) == 164
    assert {"MatMul", "Gather", "Where", "Cast", "LayerNormalization", "TRT_PluginV2", "Einsum"} <= ops
    # Later parsers import these themselves; 8.6 does not (our names must avoid them anyway).
    assert not {"Attention", "RMSNormalization", "RotaryEmbedding", "FallbackPluginImporter", "op"} & ops
    assert not PLUGINS & ops


def test_lint_reports_what_the_86_parser_refuses():
    def words_in_file(name: str) -> TensorProto:  # int32 (4, 1, 4) at offset 0 of w.data
        tensor = TensorProto(name=name, data_type=TensorProto.INT32, dims=(4, 1, 4))
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", "w.data"), ("offset", "0"), ("length", "64")):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        return tensor

    packed, twin = words_in_file("packed_words"), words_in_file("twin")
    uint8 = numpy_helper.from_array(np.zeros((4, 1, 16), np.uint8), "uint8_weight")
    nodes = [
        helper.make_node("Qwen3VLWeightOnlyGemm", ["a", "uint8_weight", "scales"], ["y"], domain=PLUGIN_DOMAIN,
                         K=16, N=4, bits=8, block_size=16, names=["x", "y"]),
        helper.make_node("Qwen3VLWeightOnlyGemm", ["a", "packed_words", "scales"], ["y2"], domain=PLUGIN_DOMAIN,
                         K=16, N=4, bits=8, block_size=16),
        helper.make_node("Qwen3VLWeightOnlyGemm", ["a", "twin", "scales"], ["y3"], domain=PLUGIN_DOMAIN,
                         K=16, N=4, bits=8, block_size=16),
        helper.make_node("Qwen3VLVisionAttention", ["a", "a", "a", "mask", ""], ["z"], domain=PLUGIN_DOMAIN,
                         num_heads=1, head_dim=16),
        helper.make_node("GroupQueryAttention", ["a"], ["g"], domain="com.microsoft"),
        helper.make_node("Attention", ["a"], ["h"], domain=PLUGIN_DOMAIN),
    ]
    graph = helper.make_graph(
        nodes, "bad", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 16]),
                       helper.make_tensor_value_info("mask", TensorProto.BOOL, [1, 2])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "y2", "y3", "z", "g", "h")],
        [uint8, packed, twin, numpy_helper.from_array(np.ones((4, 1), np.float32), "scales")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(PLUGIN_DOMAIN, 1),
                                                    helper.make_opsetid("com.microsoft", 1)])
    problems = "\n".join(lint(model))
    for expected in ("opset 18", "input 1 uint8_weight is UINT8", "attribute names of kind STRINGS",
                     "input 3 mask is BOOL", "input 4 is empty", "GroupQueryAttention", "Attention : not one of",
                     "initializer uint8_weight is UINT8", "packed_words and twin hold the same bytes"):
        assert expected in problems, (expected, problems)
    assert "packed_words is" not in problems  # int32 words are what the plugin takes
