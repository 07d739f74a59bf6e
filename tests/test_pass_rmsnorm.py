"""The RMSNorm fusion pass: every norm fused, residual adds folded in, same logits and keys on ORT CPU."""

from __future__ import annotations

import collections
import hashlib
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from export.build_engine import build_engine
from graph_passes.external_data import append_external_data
from graph_passes.fuse_rmsnorm import fuse_rmsnorm
from graph_passes.pass_runner import run_passes
from model_src.synthetic_checkpoint import PRESETS, write_preset
from runtime.graph_io import past_names

CONFIG = PRESETS["tiny"][0]
TEXT = CONFIG["text_config"]
LAYERS = TEXT["num_hidden_layers"]
NORM_OPS = ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization")
# Max |difference| fused vs unfused, (logits, present keys/values). Measured: fp32 9e-6 / 3e-6;
# fp16 2.1e-2 / 4.9e-3, with logits up to 17 (float16 spacing 1.6e-2 there). The gap is float16
# storage, not the fused maths: ORT CPU has no float16 Mul/MatMul, so it runs the unfused graph's
# norm tail and the projections after it in float32 and skips the float16 rounding that the
# fused node (float16 in and out, correctly rounded) keeps, as a GPU would.
TOLERANCE = {"fp32": (1e-4, 1e-4), "fp16": (5e-2, 1e-2)}


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    root = tmp_path_factory.mktemp("rmsnorm")
    checkpoint = write_preset("tiny", root / "checkpoint", seed=3)
    return {precision: build_engine(checkpoint, root / precision, precision=precision, apply_graph_passes=False) for precision in TOLERANCE}


@pytest.fixture(scope="module")
def fused(engines, tmp_path_factory):
    """Per precision: (unfused decoder path, fused decoder path, names the pass run returned)."""
    out = {}
    for precision, engine in engines.items():
        folder = tmp_path_factory.mktemp(f"fused-{precision}")
        for name in ("decoder.onnx", "decoder.onnx.data"):
            shutil.copyfile(engine / name, folder / name)
        changed = run_passes(folder / "decoder.onnx", [fuse_rmsnorm])
        out[precision] = (engine / "decoder.onnx", folder / "decoder.onnx", changed)
    return out


def op_counts(path) -> collections.Counter:
    return collections.Counter(node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node)


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prefill(path, precision: str, optimize: bool) -> dict[str, np.ndarray]:
    """One prefill step: batch 2, 5 positions, rows of 5 and 3 valid tokens, KV buffers of 8."""
    options = ort.SessionOptions()
    # The reference runs unoptimised, so ORT's own norm fusions cannot make both sides alike.
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    dtype = np.float16 if precision == "fp16" else np.float32
    rng = np.random.default_rng(0)
    batch, seq, capacity, hidden = 2, 5, 8, TEXT["hidden_size"]
    input_ids = rng.integers(0, 1000, size=(batch, seq))
    input_ids[:, 1:3] = CONFIG["image_token_id"]
    visual = np.where((input_ids == CONFIG["image_token_id"])[..., None],
                      rng.standard_normal((batch, seq, hidden)), 0)
    deepstack = rng.standard_normal((len(CONFIG["vision_config"]["deepstack_visual_indexes"]),
                                     batch, seq, hidden)) * (visual != 0)
    buffer = np.zeros((batch, TEXT["num_key_value_heads"], capacity, TEXT["head_dim"]), dtype)
    feeds = {
        "input_ids": input_ids.astype(np.int64),
        "visual_embeds": visual.astype(dtype),
        "deepstack_embeds": deepstack.astype(dtype),
        "position_ids": np.broadcast_to(np.arange(seq), (3, batch, seq)).astype(np.int64),
        "seqlens_k": np.array([4, 2], np.int32),
        "total_sequence_length": np.array([5], np.int32),
        "logits_index": np.array([4, 2], np.int64),
        **{name: buffer.copy() for name in past_names(LAYERS)},
    }
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds)))


@pytest.mark.parametrize("precision", list(TOLERANCE))
def test_every_norm_fused_and_residual_adds_folded_in(fused, precision):
    unfused, path, changed = fused[precision]
    assert changed == ["fuse_rmsnorm"]
    before, after = op_counts(unfused), op_counts(path)
    # input + post-attention + q + k norm per layer, and the final norm.
    assert sum(after[op] for op in NORM_OPS) == LAYERS * 4 + 1
    # Residual-fed: post-attention norms, input norms after layer 0, the final norm.
    assert after["SkipSimplifiedLayerNormalization"] == LAYERS * 2
    assert after["Add"] == before["Add"] - before["ReduceMean"] - LAYERS * 2
    for op in ("Pow", "ReduceMean", "Sqrt"):
        assert after[op] == 0, op
    model = onnx.load(str(path), load_external_data=False)
    assert {(o.domain, o.version) for o in model.opset_import} == {("", 17), ("com.microsoft", 1)}
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


@pytest.mark.parametrize("precision", list(TOLERANCE))
def test_second_run_changes_nothing(fused, engines, precision):
    _, path, _ = fused[precision]
    graph, data = sha256(path), sha256(path.with_name("decoder.onnx.data"))
    assert run_passes(path, [fuse_rmsnorm]) == []
    assert sha256(path) == graph
    # The pass never rewrites weights: the data file is the engine's, byte for byte.
    assert data == sha256(engines[precision] / "decoder.onnx.data")


@pytest.mark.parametrize("precision", list(TOLERANCE))
def test_fused_logits_and_kv_match_unfused(fused, precision):
    unfused, path, _ = fused[precision]
    reference, result = prefill(unfused, precision, optimize=False), prefill(path, precision, optimize=True)
    assert reference.keys() == result.keys()
    logits_tolerance, kv_tolerance = TOLERANCE[precision]
    for name, expected in reference.items():
        diff = np.abs(result[name].astype(np.float32) - expected.astype(np.float32)).max()
        assert diff <= (logits_tolerance if name == "logits" else kv_tolerance), (name, diff)


def test_fused_fp16_logits_stay_close_to_fp32(fused):
    """The fused float16 graph is still the model: within float16 noise of the float32 engine."""
    fp32 = prefill(fused["fp32"][0], "fp32", optimize=False)["logits"]
    fp16 = prefill(fused["fp16"][1], "fp16", optimize=True)["logits"]
    assert np.abs(fp16 - fp32).max() <= TOLERANCE["fp16"][0]


def test_vision_graph_has_no_rmsnorm_and_is_left_alone(engines, tmp_path):
    for name in ("vision.onnx", "vision.onnx.data"):
        shutil.copyfile(engines["fp32"] / name, tmp_path / name)
    before = sha256(tmp_path / "vision.onnx")
    assert run_passes(tmp_path / "vision.onnx", [fuse_rmsnorm]) == []
    assert sha256(tmp_path / "vision.onnx") == before


def handmade_norm_model(weight_first: bool) -> onnx.ModelProto:
    """r = a + b; out = r + RMSNorm(r), the norm written node for node as the exporter writes it
    (float32 build: its leading Cast is a copy that the residual add also reads)."""
    h, FLOAT = onnx.helper, onnx.TensorProto.FLOAT
    scalar = lambda name, value: h.make_node("Constant", [], [name], value=h.make_tensor(name, FLOAT, [], [value]))
    nodes = [
        h.make_node("Add", ["a", "b"], ["r"]),
        h.make_node("Cast", ["r"], ["r32"], to=FLOAT),
        scalar("two", 2.0), scalar("one", 1.0),
        h.make_node("Pow", ["r32", "two"], ["squares"]),
        h.make_node("ReduceMean", ["squares"], ["mean"], axes=[-1], keepdims=1),
        h.make_node("Add", ["mean", "eps"], ["var"]),
        h.make_node("Sqrt", ["var"], ["rms"]),
        h.make_node("Div", ["one", "rms"], ["inv"]),
        h.make_node("Mul", ["r32", "inv"], ["normed"]),
        h.make_node("Cast", ["normed"], ["normed_t"], to=FLOAT),
        h.make_node("Mul", ["weight", "normed_t"] if weight_first else ["normed_t", "weight"], ["y"]),
        h.make_node("Add", ["r32", "y"], ["out"]),
    ]
    shape = [2, 3, 8]
    graph = h.make_graph(
        nodes, "norm", [h.make_tensor_value_info(n, FLOAT, shape) for n in "ab"],
        [h.make_tensor_value_info("out", FLOAT, shape)],
        initializer=[onnx.numpy_helper.from_array(np.linspace(0.5, 1.5, 8, dtype=np.float32), "weight"),
                     onnx.numpy_helper.from_array(np.array(1e-5, np.float32), "eps")],
    )
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("weight_first", [True, False])
def test_handmade_norm_with_residual_becomes_one_skip_node(tmp_path, weight_first):
    path = tmp_path / "norm.onnx"
    onnx.save(handmade_norm_model(weight_first), path)
    rng = np.random.default_rng(1)
    feeds = {name: rng.standard_normal((2, 3, 8)).astype(np.float32) for name in "ab"}
    run = lambda: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    expected = run()
    assert run_passes(path, [fuse_rmsnorm]) == ["fuse_rmsnorm"]
    nodes = onnx.load(str(path)).graph.node
    assert [n.op_type for n in nodes] == ["SkipSimplifiedLayerNormalization", "Add"]
    skip = nodes[0]
    assert (skip.domain, list(skip.input), list(skip.output)) == ("com.microsoft", ["a", "b", "weight"],
                                                                  ["y", "", "", "r"])
    assert onnx.helper.get_attribute_value(skip.attribute[0]) == pytest.approx(1e-5)
    np.testing.assert_allclose(run(), expected, atol=1e-5)
    assert run_passes(path, [fuse_rmsnorm]) == []


def test_append_external_data_writes_aligned_tensors_that_load_back(tmp_path):
    (tmp_path / "extra.data").write_bytes(b"x" * 10)
    tensors = [onnx.numpy_helper.from_array(np.arange(n, dtype=np.float32), f"t{n}") for n in (3, 5000)]
    for tensor in tensors:
        append_external_data(tensor, tmp_path, "extra.data")
        assert not tensor.HasField("raw_data")
        assert int(dict((e.key, e.value) for e in tensor.external_data)["offset"]) % 4096 == 0
    graph = onnx.helper.make_graph([], "g", [], [], initializer=tensors)
    onnx.save(onnx.helper.make_model(graph), tmp_path / "m.onnx")
    loaded = onnx.load(str(tmp_path / "m.onnx"))
    for tensor, n in zip(loaded.graph.initializer, (3, 5000)):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(tensor), np.arange(n, dtype=np.float32))
