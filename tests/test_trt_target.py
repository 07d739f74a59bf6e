"""The TensorRT-target passes: plugin nodes replace the ONNX Runtime-target ops, each pass is
idempotent, and the graph they make, run on the numpy plugin references, computes what the
ONNX Runtime-target graph computes on ONNX Runtime CPU."""

from __future__ import annotations

import collections
import json
import shutil

import numpy as np
import onnx
import onnx.defs
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.build_engine import build_engine
from graph_passes.onnx_helpers import PLUGIN_DOMAIN
from graph_passes.pass_runner import run_passes
from graph_passes.plugin_reference import PLUGIN_OPS, run_reference
from graph_passes.trt_attention import trt_attention
from graph_passes.trt_kv_cache import trt_kv_cache
from graph_passes.trt_rmsnorm import trt_rmsnorm
from graph_passes.trt_vision_attention import trt_vision_attention
from graph_passes.trt_weight_gemm import trt_weight_gemm
from model_src.synthetic_checkpoint import PRESETS, write_preset
from runtime.errors import Qwen3VLError
from runtime.graph_io import past_names, present_names
from runtime.vision_positions import vision_inputs

CONFIG = PRESETS["tiny"][0]
TEXT, VISION = CONFIG["text_config"], CONFIG["vision_config"]
LAYERS, DEPTH = TEXT["num_hidden_layers"], VISION["depth"]
ALL_PASSES = [trt_attention, trt_rmsnorm, trt_weight_gemm, trt_vision_attention]
PLUGIN_NAMES = [op.__name__ for op in PLUGIN_OPS]

# Max |difference| of TensorRT-target graph on the references vs ORT-target graph on ONNX Runtime,
# (logits or vision outputs, KV buffers). Measured: fp32 1.5e-5 / 2.7e-6, int4 1.7e-5 / 3.1e-6 (both
# sides dequantize exactly), vision 2.4e-6; fp16 decoder 5.1e-2 / 1.2e-2 with logits up to 17 and
# keys up to 2 (float16 spacing there 1.6e-2 and 2e-3), fp16 vision 2.9e-3 with outputs up to 2.9. The fp16 gap is the
# ORT graph rounding to float16 between nodes, which the references (like the plugins) do not; the
# ORT-target graph run on the references is as far from ONNX Runtime.
TOLERANCE = {"fp32": (1e-4, 1e-4), "int4": (1e-4, 1e-4), "fp16": (8e-2, 2e-2)}
VISION_TOLERANCE = {"fp32": 1e-4, "int4": 1e-4, "fp16": 1e-2}

# Op types TensorRT's ONNX parser imports itself (a plugin of such a name would never be called):
# besides every standard ONNX op, the ones deployment-facts.md lists and the parser's own TRT_* and
# legacy importers (onnx-tensorrt's op importer table).
TRT_PARSER_OPS = {
    "Attention", "RotaryEmbedding", "RMSNormalization", "TRT_Attention", "TRT_KVCacheUpdate",
    "TRT_QuantizedAttention", "TRT_PluginV2", "TRT_Scale", "TRT_Shuffle", "TRT_TopK_Min", "TRT_MatMul",
    "TRT_RaggedSoftmax", "TRT_MaxAverageBlendPool", "TRT_FP8QuantizeLinear", "TRT_FP8DequantizeLinear",
    "TRT_INT4QuantizeLinear", "TRT_INT4DequantizeLinear", "TRT_AveragePool", "TRT_MaxPool", "TRT_Conv",
    "TRT_Deconv", "TRT_Gather", "TRT_Slice", "TRT_Resize", "TRT_FloorDiv", "ImageScaler", "ParametricSoftplus",
    "ScaledTanh",
}


# -- fixtures ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """ORT-target engines: fp32, fp16, and INT4 decoder / INT8 vision with zero points and exact
    (accuracy_level=0) maths, so that the references can match them closely. The int4 one is built for
    the TensorRT backend, whose vision INT8 is weight-only (MatMulNBits, the plugin's format); its
    decoder is mixed: the tied head (default) and the 2 most sensitive linears at 8 bits."""
    root = tmp_path_factory.mktemp("trt_target")
    checkpoint = write_preset("tiny", root / "checkpoint", seed=3)
    return {
        "fp32": build_engine(checkpoint, root / "fp32", precision="fp32"),
        "fp16": build_engine(checkpoint, root / "fp16", precision="fp16"),
        "int4": build_engine(checkpoint, root / "int4", backend="trt", precision="int4", symmetric=False,
                             accuracy_level=0, vision_precision="int8", keep_sensitive=2),
    }


@pytest.fixture(scope="module")
def convert(engines, tmp_path_factory):
    """convert(precision, part, passes) -> (graph path, passes that changed it), cached."""
    cache = {}

    def run(precision: str, part: str, passes: list):
        key = (precision, part, tuple(p.name for p in passes))
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"{precision}-{part}")
            for file in engines[precision].glob(f"{part}.onnx*"):
                shutil.copyfile(file, folder / file.name)
            cache[key] = (folder / f"{part}.onnx", run_passes(folder / f"{part}.onnx", passes))
        return cache[key]

    return run


def op_counts(path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def plugin_nodes(path, op_type: str) -> list[onnx.NodeProto]:
    return [n for n in onnx.load(str(path), load_external_data=False).graph.node if n.op_type == op_type]


def attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def input_types(path) -> dict[str, np.dtype]:
    model = onnx.load(str(path), load_external_data=False)
    return {i.name: helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type) for i in model.graph.input}


def on_ort(path, feeds) -> dict[str, np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph as written
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def prefill_feeds(path) -> dict[str, np.ndarray]:
    """Batch 2, 5 positions, rows of 5 and 3 valid tokens, zero KV buffers of capacity 8."""
    types = input_types(path)
    rng = np.random.default_rng(0)
    batch, seq, capacity, hidden = 2, 5, 8, TEXT["hidden_size"]
    image = np.zeros((batch, seq), bool)
    image[:, 1:3] = True
    input_ids = rng.integers(0, 1000, size=(batch, seq))
    input_ids[image] = CONFIG["image_token_id"]
    visual = np.where(image[..., None], rng.standard_normal((batch, seq, hidden)), 0)
    deepstack = rng.standard_normal((len(VISION["deepstack_visual_indexes"]), batch, seq, hidden)) * image[..., None]
    buffer = np.zeros((batch, TEXT["num_key_value_heads"], capacity, TEXT["head_dim"]))
    feeds = {
        "input_ids": input_ids, "visual_embeds": visual, "deepstack_embeds": deepstack,
        "position_ids": np.broadcast_to(np.arange(seq), (3, batch, seq)),
        "seqlens_k": np.array([4, 2]), "total_sequence_length": np.array([5]), "logits_index": np.array([4, 2]),
        **{name: buffer for name in past_names(LAYERS)},
    }
    return {name: np.ascontiguousarray(value, dtype=types[name]) for name, value in feeds.items()}


def decode_feeds(path, presents: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The next token of both rows (valid keys 5 -> 6 and 3 -> 4) on the buffers the prefill returned."""
    types = input_types(path)
    hidden = TEXT["hidden_size"]
    feeds = {
        "input_ids": np.array([[11], [12]]), "visual_embeds": np.zeros((2, 1, hidden)),
        "deepstack_embeds": np.zeros((len(VISION["deepstack_visual_indexes"]), 2, 1, hidden)),
        "position_ids": np.broadcast_to(np.array([[5], [3]]), (3, 2, 1)),
        "seqlens_k": np.array([5, 3]), "total_sequence_length": np.array([6]), "logits_index": np.array([0, 0]),
    }
    feeds = {name: np.ascontiguousarray(value, dtype=types[name]) for name, value in feeds.items()}
    for past, present in zip(past_names(LAYERS), present_names(LAYERS)):
        feeds[past] = presents[present]
    return feeds


def vision_feeds(path) -> dict[str, np.ndarray]:
    """Two images of different grids (4x6 and 8x4 patches): frames of 24 and 32 patches."""
    grids = np.array([[1, 4, 6], [1, 8, 4]])
    layout = vision_inputs(grids, VISION["num_position_embeddings"], VISION["spatial_merge_size"],
                           VISION["hidden_size"] // VISION["num_heads"])
    patches = int(np.prod(grids, axis=1).sum())
    patch_dim = VISION["in_channels"] * VISION["temporal_patch_size"] * VISION["patch_size"] ** 2
    feeds = {"pixel_values": np.random.default_rng(1).standard_normal((patches, patch_dim)),
             **{name: getattr(layout, name) for name in ("pos_indices", "pos_weights", "rotary_cos", "rotary_sin",
                                                         "frame_patch_index", "frame_patch_mask", "patch_frame_slot")}}
    types = input_types(path)
    return {name: np.ascontiguousarray(value, dtype=types[name]) for name, value in feeds.items()}


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).max())


# -- structure ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_rmsnorm_pass_converts_every_norm(convert, precision):
    path, changed = convert(precision, "decoder", [trt_rmsnorm])
    assert changed == ["trt_rmsnorm"]
    counts = op_counts(path)
    assert counts["SimplifiedLayerNormalization"] == counts["SkipSimplifiedLayerNormalization"] == 0
    norms = plugin_nodes(path, "Qwen3VLRMSNorm")
    assert len(norms) == LAYERS * 4 + 1  # input, post-attention, q and k per layer; the final norm
    forms = collections.Counter((attrs(n)["has_skip"], attrs(n)["emit_sum"], len(n.input), len(n.output))
                                for n in norms)
    # Residual-fed norms: all but layer 0's input norm; each passes its sum on, except the final norm.
    assert forms == {(0, 0, 2, 1): 2 * LAYERS + 1, (1, 1, 3, 2): 2 * LAYERS - 1, (1, 0, 3, 1): 1}
    for node in norms:
        assert node.domain == PLUGIN_DOMAIN and all(node.output)
        assert attrs(node)["plugin_version"] == b"1" and attrs(node)["plugin_namespace"] == b""
        assert attrs(node)["epsilon"] == pytest.approx(TEXT["rms_norm_eps"])


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_attention_pass_makes_one_plugin_per_layer(convert, engines, precision):
    path, changed = convert(precision, "decoder", [trt_attention])
    assert changed == ["trt_attention"]
    before, after = op_counts(engines[precision] / "decoder.onnx"), op_counts(path)
    assert after["GroupQueryAttention"] == 0
    assert after["Neg"] == after["Slice"] == 0  # the rotary's rotate_half is gone from every layer
    # q and k norms folded in; the residual norms and layer 0's input norm stay.
    assert after["SimplifiedLayerNormalization"] == before["SimplifiedLayerNormalization"] - 2 * LAYERS == 1
    nodes = plugin_nodes(path, "Qwen3VLAttention")
    assert len(nodes) == LAYERS
    head_dim = TEXT["head_dim"]
    for layer, node in enumerate(nodes):
        assert attrs(node) == {
            "num_heads": TEXT["num_attention_heads"], "kv_num_heads": TEXT["num_key_value_heads"],
            "head_dim": head_dim, "scale": pytest.approx(head_dim**-0.5),
            "epsilon": pytest.approx(TEXT["rms_norm_eps"]),
            "kv_cache_type": precision.encode(), "plugin_version": b"1", "plugin_namespace": b""}
        q, k, v, q_weight, k_weight, cos, sin, past_key, past_value, seqlens, total = node.input
        assert (q, k, v) == tuple(f"/language_model/layers.{layer}/self_attn/{p}_proj/MatMul_output_0" for p in "qkv")
        assert (q_weight, k_weight) == tuple(f"language_model.layers.{layer}.self_attn.{p}_norm.weight" for p in "qk")
        assert (past_key, past_value, seqlens, total) == (f"past_key.{layer}", f"past_value.{layer}", "seqlens_k",
                                                          "total_sequence_length")
        assert list(node.output[1:]) == [f"present_key.{layer}", f"present_value.{layer}"]
    assert len({(n.input[5], n.input[6]) for n in nodes}) == 1  # one cos/sin pair, computed once


def external_bytes(tensor: onnx.TensorProto) -> tuple | None:
    entries = {e.key: e.value for e in tensor.external_data}
    return (entries["location"], int(entries.get("offset", 0)), int(entries["length"])) if entries else None


def test_weight_gemm_pass_retypes_the_packed_bytes_as_int32_words(convert, engines):
    """TensorRT 8.6 takes no uint8 plugin input: B, the table and the zero points become int32 over
    the very bytes the ONNX Runtime graph reads (nothing copied), the tied embedding one tensor."""
    for part in ("decoder", "vision"):
        path, changed = convert("int4", part, [trt_weight_gemm])
        assert changed == ["trt_weight_gemm"]
        before, after = onnx.load(str(engines["int4"] / f"{part}.onnx"), load_external_data=False), \
            onnx.load(str(path), load_external_data=False)
        old = [n for n in before.graph.node if n.op_type == "MatMulNBits"]
        new = [n for n in after.graph.node if n.op_type == "Qwen3VLWeightOnlyGemm"]
        assert len(new) == len(old) > 0 and not any(n.op_type == "MatMulNBits" for n in after.graph.node)
        was = {t.name: t for t in before.graph.initializer}
        now = {t.name: t for t in after.graph.initializer}
        for o, n in zip(old, new):
            a, b = attrs(o), attrs(n)
            assert {key: b[key] for key in ("K", "N", "bits", "block_size", "accuracy_level")} == \
                {key: a[key] for key in ("K", "N", "bits", "block_size", "accuracy_level")}
            assert b["has_zero_points"] == 1  # asymmetric build
            assert b["has_bias"] == (part == "vision")  # the vision linears have biases
            weight, scales, zero_points = o.input[1], o.input[2], o.input[3]
            assert list(n.input) == [name for name in o.input if name]  # same names, empty slots dropped
            packed, words = was[weight], now[weight]
            assert words.data_type == TensorProto.INT32 and list(words.dims) == [*packed.dims[:2], packed.dims[2] // 4]
            assert external_bytes(words) == external_bytes(packed)
            zp_words = now[zero_points]
            assert zp_words.data_type == TensorProto.INT32 and len(zp_words.dims) == 1
            assert zp_words.dims[0] == -(-int(np.prod(was[zero_points].dims)) // 4)
            assert external_bytes(zp_words) == external_bytes(was[zero_points])  # whole words: shared
            assert now[scales] == was[scales]
        assert not [t.name for t in after.graph.initializer if t.data_type == TensorProto.UINT8]
    path, _ = convert("int4", "decoder", [trt_weight_gemm])
    model = onnx.load(str(path), load_external_data=False)
    gathers = plugin_nodes(path, "Qwen3VLQuantizedGather")
    assert len(gathers) == 1 and op_counts(path)["GatherBlockQuantized"] == 0
    assert attrs(gathers[0])["bits"] == 8 and attrs(gathers[0])["has_zero_points"] == 1  # the 8-bit head
    # Each plugin node keeps its own weight's format: 4 bits, and 8 for the head and the sensitive two.
    formats = collections.Counter(attrs(n)["bits"] for n in plugin_nodes(path, "Qwen3VLWeightOnlyGemm"))
    assert formats == {4: 7 * LAYERS - 2, 8: 3}
    table = gathers[0].input[0]
    lm_head = [n for n in model.graph.node if n.op_type == "Qwen3VLWeightOnlyGemm" and n.input[1] == table]
    assert len(lm_head) == 1  # the tied lm_head reads the same initializer: one Constant layer in TensorRT
    locations = collections.Counter(external_bytes(t) for t in model.graph.initializer if external_bytes(t))
    assert max(locations.values()) == 1  # no two initializers over the same bytes
    cast = [n for n in model.graph.node if n.output[0] == gathers[0].input[1]]
    assert cast[0].op_type == "Cast" and attrs(cast[0])["to"] == TensorProto.INT32 and cast[0].input[0] == "input_ids"


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_vision_attention_pass_makes_one_plugin_per_block(convert, precision):
    path, changed = convert(precision, "vision", [trt_vision_attention])
    assert changed == ["trt_vision_attention"]
    counts = op_counts(path)
    assert counts["Softmax"] == counts["Transpose"] == counts["MatMul"] == 0
    nodes = plugin_nodes(path, "Qwen3VLVisionAttention")
    assert len(nodes) == DEPTH
    model = onnx.load(str(path), load_external_data=False)
    made = {n.output[0]: n for n in model.graph.node}
    where = made["frame_patch_index_marked"]
    assert where.op_type == "Where" and where.input[0] == "frame_patch_mask"
    assert made[where.input[1]].op_type == "Cast" and made[where.input[1]].input[0] == "frame_patch_index"
    assert made["patch_frame_slot_int32"].op_type == "Cast"
    heads = VISION["num_heads"]
    for node in nodes:
        # No bool plugin input: padding slots carry index -1; int32 indices whatever the graph's type.
        assert list(node.input[3:]) == ["frame_patch_index_marked", "patch_frame_slot_int32"]
        assert attrs(node) == {"num_heads": heads, "head_dim": VISION["hidden_size"] // heads,
                               "scale": pytest.approx((VISION["hidden_size"] // heads) ** -0.5),
                               "plugin_version": b"1", "plugin_namespace": b""}


def test_attention_pass_leaves_a_layer_whose_normed_q_is_read_elsewhere(engines, tmp_path):
    """Folding layer 0 in would drop a tensor something else reads: that layer keeps its ORT ops."""
    for file in engines["fp32"].glob("decoder.onnx*"):
        shutil.copyfile(file, tmp_path / file.name)
    path = tmp_path / "decoder.onnx"
    model = onnx.load(str(path), load_external_data=False)
    q_norm = next(n for n in model.graph.node
                  if n.name.endswith("layers.0/self_attn/q_norm/SimplifiedLayerNormalization"))
    model.graph.output.append(helper.make_tensor_value_info(q_norm.output[0], TensorProto.FLOAT, None))
    onnx.save(model, str(path))
    assert run_passes(path, [trt_attention]) == ["trt_attention"]
    counts = op_counts(path)
    assert counts["Qwen3VLAttention"] == LAYERS - 1 and counts["GroupQueryAttention"] == 1
    feeds = prefill_feeds(path)
    expected, got = on_ort(engines["fp32"] / "decoder.onnx", feeds), run_reference(path, feeds)
    assert max_diff(expected["logits"], got["logits"]) <= TOLERANCE["fp32"][0]


@pytest.mark.parametrize("graph_pass", ALL_PASSES, ids=lambda p: p.name)
def test_second_run_changes_nothing(convert, graph_pass):
    part = "vision" if graph_pass is trt_vision_attention else "decoder"
    path, changed = convert("int4", part, [graph_pass])
    assert changed == [graph_pass.name]
    model = onnx.load(str(path), load_external_data=False)
    before = model.SerializeToString()
    assert graph_pass(model, path.parent) is False
    assert model.SerializeToString() == before


@pytest.mark.parametrize("graph_pass,part", [(trt_attention, "vision"), (trt_vision_attention, "decoder"),
                                             (trt_rmsnorm, "vision"), (trt_weight_gemm, "decoder")],
                         ids=lambda x: getattr(x, "name", x))
def test_pass_without_its_pattern_returns_false(convert, graph_pass, part):
    path, _ = convert("fp32", part, [])
    model = onnx.load(str(path), load_external_data=False)
    before = model.SerializeToString()
    assert graph_pass(model, path.parent) is False
    assert model.SerializeToString() == before


def test_all_passes_leave_only_plugins_and_standard_ops_in_any_order(convert):
    for part in ("decoder", "vision"):
        path, _ = convert("int4", part, ALL_PASSES)
        model = onnx.load(str(path), load_external_data=False)
        custom = collections.Counter((n.domain, n.op_type) for n in model.graph.node if n.domain not in ("", "ai.onnx"))
        assert {domain for domain, _ in custom} == {PLUGIN_DOMAIN}, custom
        assert not any(n.op_type == "SimplifiedLayerNormalization" for n in model.graph.node)
        onnx.checker.check_model(str(path))  # unlike the ORT target, whose norms sit unregistered in domain ""
        # trt_attention also folds in q/k norms that trt_rmsnorm already turned into plugins.
        reversed_path, _ = convert("int4", part, ALL_PASSES[::-1])
        assert op_counts(reversed_path) == op_counts(path)


def test_plugin_names_do_not_collide_with_what_parsers_import():
    standard = {schema.name for schema in onnx.defs.get_all_schemas_with_history()}
    contrib = {schema.name for schema in ort.capi.onnxruntime_pybind11_state.get_all_operator_schema()}
    for name in PLUGIN_NAMES:
        assert name not in standard | TRT_PARSER_OPS | contrib, name
        assert not name.startswith("TRT_"), name  # the parser's own prefix
    assert len(set(PLUGIN_NAMES)) == len(PLUGIN_NAMES)


# -- numerics ----------------------------------------------------------------------------------------

DECODER_CASES = [("fp32", [trt_rmsnorm]), ("fp32", [trt_attention]), ("fp32", ALL_PASSES),
                 ("int4", [trt_weight_gemm]), ("int4", ALL_PASSES), ("fp16", ALL_PASSES)]


@pytest.mark.parametrize("precision,passes", DECODER_CASES,
                         ids=[f"{p}-{'+'.join(x.name for x in ps)}" for p, ps in DECODER_CASES])
def test_decoder_on_references_matches_ort_target(convert, engines, precision, passes):
    path, _ = convert(precision, "decoder", passes)
    reference = engines[precision] / "decoder.onnx"
    logits_tol, kv_tol = TOLERANCE[precision]
    feeds = prefill_feeds(reference)
    expected, got = on_ort(reference, feeds), run_reference(path, feeds)
    for step in ("prefill", "decode"):
        assert max_diff(expected["logits"], got["logits"]) <= logits_tol, step
        # Buffer positions at or past a row's valid keys are unspecified: ONNX Runtime with separate
        # past/present memory leaves them zero, an in-place buffer keeps what was there.
        valid = feeds["seqlens_k"] + 1
        for name in present_names(LAYERS):
            for row, keys in enumerate(valid):
                assert max_diff(expected[name][row, :, :keys], got[name][row, :, :keys]) <= kv_tol, (step, name, row)
        if step == "prefill":  # each side goes on with the buffers it returned, as the runtime would
            feeds = decode_feeds(reference, expected)
            expected = on_ort(reference, feeds)
            got = run_reference(path, decode_feeds(reference, got))


VISION_CASES = [("fp32", [trt_vision_attention]), ("int4", [trt_weight_gemm]), ("int4", ALL_PASSES),
                ("fp16", ALL_PASSES)]


@pytest.mark.parametrize("precision,passes", VISION_CASES,
                         ids=[f"{p}-{'+'.join(x.name for x in ps)}" for p, ps in VISION_CASES])
def test_vision_on_references_matches_ort_target(convert, engines, precision, passes):
    path, _ = convert(precision, "vision", passes)
    reference = engines[precision] / "vision.onnx"
    feeds = vision_feeds(reference)
    expected, got = on_ort(reference, feeds), run_reference(path, feeds)
    for name, value in expected.items():
        assert max_diff(value, got[name]) <= VISION_TOLERANCE[precision], name


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """(rows, m) codes -> bytes, 4 bit: even index in the low nibble (ONNX Runtime's layout)."""
    if bits == 8:
        return codes.astype(np.uint8)
    if codes.shape[1] % 2:
        codes = np.concatenate([codes, np.zeros((codes.shape[0], 1), codes.dtype)], axis=1)
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)


@pytest.mark.parametrize("bits,n", [(4, 24), (8, 24), (4, 23), (8, 23)])
def test_hand_packed_weights_match_ort_kernels(tmp_path, bits, n):
    """MatMulNBits with K not a multiple of the block (padded last block), zero points and a bias, and
    GatherBlockQuantized, packed here by hand: ORT's kernels vs the converted graph on the references.
    With N = 23 the zero points (2 or 3 bytes a row) do not fill whole int32 words: the TensorRT
    graph's own copy is zero-padded to the next word."""
    rng = np.random.default_rng(bits + n)
    k, block, vocab = 80, 32, 10
    k_blocks = -(-k // block)
    top = (1 << bits) - 1
    codes = rng.integers(0, top + 1, size=(n, k_blocks * block))
    weight = _pack(codes, bits).reshape(n, k_blocks, -1)
    scales = rng.uniform(0.01, 0.1, size=(n, k_blocks)).astype(np.float32)
    zero_points = _pack(rng.integers(0, top + 1, size=(n, k_blocks)), bits)
    bias = rng.standard_normal(n).astype(np.float32)
    table = _pack(rng.integers(0, top + 1, size=(vocab, k_blocks * block)), bits)
    table_scales = rng.uniform(0.01, 0.1, size=(vocab, k_blocks)).astype(np.float32)
    table_zero_points = _pack(rng.integers(0, top + 1, size=(vocab, k_blocks)), bits)
    initializers = [numpy_helper.from_array(a, name) for a, name in (
        (weight, "w"), (scales, "w_scales"), (zero_points, "w_zero_points"), (bias, "bias"),
        (table, "table"), (table_scales, "t_scales"), (table_zero_points, "t_zero_points"))]
    nodes = [
        helper.make_node("MatMulNBits", ["a", "w", "w_scales", "w_zero_points", "", "bias"], ["y"],
                         domain="com.microsoft", K=k, N=n, bits=bits, block_size=block, accuracy_level=0),
        helper.make_node("MatMulNBits", ["a", "w", "w_scales"], ["y_symmetric"], domain="com.microsoft",
                         K=k, N=n, bits=bits, block_size=block),
        helper.make_node("GatherBlockQuantized", ["table", "ids", "t_scales", "t_zero_points"], ["rows"],
                         domain="com.microsoft", bits=bits, block_size=block, gather_axis=0, quantize_axis=1),
    ]
    graph = helper.make_graph(
        nodes, "weights",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [3, k]),
         helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 3])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("y", "y_symmetric", "rows")],
        initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9
    path = tmp_path / "weights.onnx"
    onnx.save(model, path)
    feeds = {"a": rng.standard_normal((3, k)).astype(np.float32), "ids": np.array([[0, 9, 3], [3, 5, 1]])}
    expected = on_ort(path, feeds)

    assert run_passes(path, [trt_weight_gemm]) == ["trt_weight_gemm"]
    assert op_counts(path) == {"Qwen3VLWeightOnlyGemm": 2, "Qwen3VLQuantizedGather": 1, "Cast": 1}
    words = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    for name, packed in (("w", weight), ("table", table), ("w_zero_points", zero_points),
                         ("t_zero_points", table_zero_points)):
        assert words[name].dtype == np.int32
        raw = words[name].view(np.uint8).reshape(-1)
        assert raw.size == -(-packed.size // 4) * 4 and not raw[packed.size:].any()
        assert np.array_equal(raw[:packed.size], packed.reshape(-1)), name
    assert words["w"].shape == (n, k_blocks, block * bits // 32)
    assert words["table"].shape == (vocab, k_blocks, block * bits // 32)
    got = run_reference(path, feeds)
    for name in expected:
        assert max_diff(expected[name], got[name]) <= 1e-5 * max(1.0, float(np.abs(expected[name]).max())), name


def test_build_with_trt_backend_writes_both_targets_sharing_one_weight_file(tmp_path):
    """`qwen3vl build --backend trt`: the TensorRT graphs run (via the references) like the ORT ones."""
    checkpoint = write_preset("tiny", tmp_path / "ck", seed=1)
    engine = build_engine(checkpoint, tmp_path / "engine", backend="trt", precision="int4", accuracy_level=0)
    manifest = json.loads((engine / "manifest.json").read_text())
    assert manifest["files"]["decoder_trt"] == "decoder.trt.onnx"
    assert {"decoder.trt:trt_attention", "decoder.trt:trt_rmsnorm", "vision.trt:trt_vision_attention"} <= set(
        manifest["graph_passes"])
    for part in ("vision", "decoder"):
        trt = onnx.load(str(engine / f"{part}.trt.onnx"), load_external_data=False)
        locations = {e.value for t in trt.graph.initializer for e in t.external_data if e.key == "location"}
        assert locations == {f"{part}.onnx.data"}
        assert not [n for n in trt.graph.node if n.domain == "com.microsoft"]
    feeds = prefill_feeds(engine / "decoder.onnx")
    reference = on_ort(engine / "decoder.onnx", feeds)
    plugins = run_reference(engine / "decoder.trt.onnx", feeds)
    assert np.abs(plugins["logits"] - reference["logits"]).max() <= 1e-4


# -- the KV cache's storage type (--kv-dtype) ----------------------------------------------------------

def test_kv_cache_pass_stores_the_cache_in_the_chosen_type(convert, engines, tmp_path):
    """fp16 storage of an fp32 decoder's cache: past/present typed float16, kv_cache_type "fp16", the
    activations still float32; against the ORT graph's fp32 cache within the float16 rounding of
    the cached keys and values (measured: logits 1.2e-2 with values up to 18, buffers 1.8e-3 with
    values up to 3.8, float16 spacing there 2e-3)."""
    source, _ = convert("fp32", "decoder", ALL_PASSES)
    for file in source.parent.glob("decoder.onnx*"):
        shutil.copyfile(file, tmp_path / file.name)
    path = tmp_path / "decoder.onnx"
    assert run_passes(path, [trt_kv_cache("fp16")]) == ["trt_kv_cache:fp16"]
    assert run_passes(path, [trt_kv_cache("fp16")]) == []  # idempotent
    model = onnx.load(str(path), load_external_data=False)
    types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)}
    for name in (*past_names(LAYERS), *present_names(LAYERS)):
        assert types[name] == TensorProto.FLOAT16, name
    assert types["visual_embeds"] == types["logits"] == TensorProto.FLOAT
    assert {attrs(n)["kv_cache_type"] for n in plugin_nodes(path, "Qwen3VLAttention")} == {b"fp16"}

    reference = engines["fp32"] / "decoder.onnx"
    feeds = prefill_feeds(reference)
    expected = on_ort(reference, feeds)
    got = run_reference(path, {**feeds, **{n: feeds[n].astype(np.float16) for n in past_names(LAYERS)}})
    valid = feeds["seqlens_k"] + 1
    for step in ("prefill", "decode"):
        assert max_diff(expected["logits"], got["logits"]) <= 3e-2, step
        for name in present_names(LAYERS):
            assert got[name].dtype == np.float16
            for row, keys in enumerate(valid):
                assert max_diff(expected[name][row, :, :keys], got[name][row, :, :keys]) <= 4e-3, (step, name)
        if step == "prefill":
            expected = on_ort(reference, decode_feeds(reference, expected))
            got = run_reference(path, decode_feeds(path, got))
            valid = valid + 1


def test_kv_cache_pass_refuses_what_the_plugin_does_not_store():
    with pytest.raises(Qwen3VLError, match="int8 is not implemented"):
        trt_kv_cache("int8")


@pytest.mark.parametrize("backend,precision,kv_dtype,message", [
    ("trt", "int4", "int8", "--kv-dtype int8: the TensorRT attention plugin stores its KV cache as fp32 or fp16"),
    ("ort", "fp32", "int4", "unsupported KV cache type 'int4' (choose from fp32, fp16, int8)"),
])
def test_build_refuses_a_kv_dtype_the_graphs_do_not_take_in_one_line(tmp_path, backend, precision, kv_dtype,
                                                                      message):
    with pytest.raises(Qwen3VLError) as refused:
        build_engine(tmp_path / "no-checkpoint-needed", tmp_path / "engine", backend=backend, precision=precision,
                     kv_dtype=kv_dtype)
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value)
    assert not (tmp_path / "engine").exists()


# Greedy tokens of the TensorRT graphs with an FP16 cache (the Pascal mode) through the reference
# backend against ONNX Runtime's FP32 cache. Logprobs differ by the float16 rounding of the cached
# keys and values: measured up to 7.5e-3 over 8 tokens on the tiny configurations.
FP16_KV_LOGPROB_TOLERANCE = 2e-2


@pytest.mark.parametrize("config_name", ["gqa2-tied", "gqa6-untied"])
def test_fp16_kv_tensorrt_graphs_on_the_reference_backend_give_onnx_runtime_fp32_tokens(tiny_engine, config_name):
    from conftest import random_image
    from graph_passes.reference_backend import ReferenceBackend
    from runtime import Pipeline
    from runtime.engine_manifest import load_manifest

    engine = tiny_engine(config_name, backend="trt", kv_dtype="fp16")
    manifest = load_manifest(engine)
    assert manifest.kv_dtype == "fp16" and "decoder.trt:trt_kv_cache:fp16" in manifest.graph_passes
    backend = ReferenceBackend(engine, manifest)
    assert backend.new_cache(1, 4).buffers[0].dtype == np.float16
    reference = Pipeline(engine, manifest, backend)
    ort = Pipeline.load(engine, backend="ort")
    assert ort.backend.new_cache(1, 4).buffers[0].dtype == np.float16  # --kv-dtype holds for both targets
    prompts = ["Describe this image.", "Hi"]
    images = [[random_image(64, 96, seed=1)], []]
    greedy = dict(do_sample=False, logprobs=5, max_new_tokens=8)
    for got, expected in zip(reference.generate(prompts, images=images, **greedy),
                             ort.generate(prompts, images=images, **greedy)):
        assert got.token_ids == expected.token_ids
        for step_got, step_expected in zip(got.logprobs, expected.logprobs):
            theirs = {entry["token_id"]: entry["logprob"] for entry in step_expected}
            for entry in step_got:
                if entry["token_id"] in theirs:
                    assert abs(entry["logprob"] - theirs[entry["token_id"]]) <= FP16_KV_LOGPROB_TOLERANCE
