"""graph_passes/quantize_dynamic_int8.py: INT8 weights with INT8 compute (DynamicQuantizeMatMul)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import random_image
from export.build_engine import build_engine
from graph_passes.quantize_dynamic_int8 import WEIGHT_LEVELS, dynamic_int8_weights, quantize_columns
from runtime import Pipeline


def test_quantize_columns_rounds_to_nearest_within_seven_bits():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((96, 40)).astype(np.float32) * rng.uniform(0.01, 3, size=40).astype(np.float32)
    w[:, 3] = 0  # an all-zero column stays exact
    codes, scales = quantize_columns(w)
    assert codes.dtype == np.int8 and codes.shape == (96, 40) and scales.shape == (40,)
    assert np.abs(codes.astype(int)).max() == WEIGHT_LEVELS == 63
    error = np.abs(codes * scales - w)
    assert (error <= scales / 2 * (1 + 1e-5) + 1e-12).all()
    assert (codes[:, 3] == 0).all()
    # rows=True reads the same weight stored transposed (a Gemm transB weight).
    codes_t, scales_t = quantize_columns(np.ascontiguousarray(w.T), rows=True)
    assert np.array_equal(codes_t, codes) and np.array_equal(scales_t, scales)


def _linear_graph(folder, rng):
    """x -> MatMul(W1) -> Gemm(W2 transB, bias) -> Gemm(W3, zero Constant bias): float weights."""
    w1 = rng.standard_normal((64, 48)).astype(np.float32)
    w2 = rng.standard_normal((32, 48)).astype(np.float32)  # (N, K): transB
    w3 = rng.standard_normal((32, 16)).astype(np.float32)
    bias = rng.standard_normal(32).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h1"], name="mm"),
        helper.make_node("Gemm", ["h1", "w2", "bias"], ["h2"], name="gemm_t", transB=1),
        helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.zeros(16, np.float32))),
        helper.make_node("Gemm", ["h2", "w3", "zero"], ["y"], name="gemm"),
    ]
    graph = helper.make_graph(nodes, "linears", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (w2, "w2"), (w3, "w3"),
                                                                          (bias, "bias"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "linears.onnx"
    onnx.save(model, path, save_as_external_data=True, location="linears.onnx.data", size_threshold=0)
    return path, (w1, w2, w3, bias)


def _run(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _dynamic_quantize_matmul(x, codes, scales, bias=None):
    """numpy model of the op: x quantized to uint8 over [min(x, 0), max(x, 0)], integer product."""
    low, high = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    step = (high - low) / 255 if high > low else 1.0
    zero = np.clip(np.rint(-low / step), 0, 255)
    q = np.clip(np.rint(x / step) + zero, 0, 255)
    y = ((q - zero) @ codes.astype(np.float64)) * step * scales
    return (y + (bias if bias is not None else 0)).astype(np.float32)


def test_pass_rewrites_matmul_and_gemm_and_matches_the_integer_product(tmp_path):
    rng = np.random.default_rng(1)
    path, (w1, w2, w3, bias) = _linear_graph(tmp_path, rng)
    x = rng.standard_normal((5, 64)).astype(np.float32)
    reference = _run(path, x)

    model = onnx.load(str(path), load_external_data=False)
    graph_pass = dynamic_int8_weights()
    assert graph_pass(model, tmp_path)
    assert not graph_pass(model, tmp_path)  # idempotent
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("DynamicQuantizeMatMul") == 3 and "Gemm" not in ops and "MatMul" not in ops
    assert {t.name for t in model.graph.initializer} >= {"w1.int8", "w1.scales", "bias"}
    assert not {"w1", "w2", "w3"} & {t.name for t in model.graph.initializer}  # float weights dropped
    onnx.save(model, tmp_path / "quantized.onnx")
    ours = _run(tmp_path / "quantized.onnx", x)

    # The same integer arithmetic in numpy, layer by layer, on our codes: the op and layout are right.
    (c1, s1), (c2, s2), (c3, s3) = quantize_columns(w1), quantize_columns(w2, rows=True), quantize_columns(w3)
    h1 = _dynamic_quantize_matmul(x, c1, s1)
    h2 = _dynamic_quantize_matmul(h1, c2, s2, bias)
    expected = _dynamic_quantize_matmul(h2, c3, s3)
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    # And close to the float graph: 7-bit weights, 8-bit activations.
    assert np.sqrt(((ours - reference) ** 2).mean()) < 0.05 * reference.std()


def test_extreme_codes_do_not_saturate(tmp_path):
    """Largest activations against largest same-sign weights: the int16 pair sums of CPUs without VNNI
    would overflow with full-range (127) codes; 63 keeps every product exact here."""
    k, n = 256, 8
    w = np.ones((k, n), dtype=np.float32)
    w[:, 1::2] = -1
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert dynamic_int8_weights()(model, tmp_path)
    onnx.save(model, tmp_path / "extreme.onnx")
    x = np.full((3, k), 4.0, dtype=np.float32)  # every activation quantizes to 255
    np.testing.assert_allclose(_run(tmp_path / "extreme.onnx", x), x @ w, rtol=1e-5)


def test_int4_engine_computes_vision_in_int8_by_default(tiny_checkpoints, tmp_path):
    checkpoint = tiny_checkpoints["gqa2-tied"]
    fp32 = build_engine(checkpoint, tmp_path / "fp32")
    int4 = build_engine(checkpoint, tmp_path / "int4", precision="int4", block_size=32)
    manifest = json.loads((int4 / "manifest.json").read_text())
    assert "vision:dynamic_int8_weights:per_column:7bit" in manifest["graph_passes"]
    vision = onnx.load(str(int4 / "vision.onnx"), load_external_data=False)
    ops = [n.op_type for n in vision.graph.node]
    assert "DynamicQuantizeMatMul" in ops and "Gemm" not in ops
    # The float linears are gone (tiny tensors are padded to 4 KiB, and the position table stays float).
    assert (int4 / "vision.onnx.data").stat().st_size < 0.6 * (fp32 / "vision.onnx.data").stat().st_size

    ours, reference = Pipeline.load(int4, verify=True), Pipeline.load(fp32)
    batch = reference.prepare(["Describe this image."], [[random_image(96, 128, seed=2)]])
    got, expected = ours.backend.encode_images(batch.vision), reference.backend.encode_images(batch.vision)
    for a, b in ((got.image_embeds, expected.image_embeds), (got.deepstack_embeds, expected.deepstack_embeds)):
        assert np.sqrt(((a - b) ** 2).mean()) < 0.05 * b.std()
    fp32_vision = build_engine(checkpoint, tmp_path / "int4-fp32-vision", precision="int4", block_size=32,
                               vision_precision="fp32")
    vision = onnx.load(str(fp32_vision / "vision.onnx"), load_external_data=False)
    assert "DynamicQuantizeMatMul" not in [n.op_type for n in vision.graph.node]


def test_int8_vision_needs_fp32_activations(tiny_checkpoints, tmp_path):
    from runtime.errors import Qwen3VLError

    with pytest.raises(Qwen3VLError, match="FP32 activations"):
        build_engine(tiny_checkpoints["gqa2-tied"], tmp_path / "e", precision="fp16", vision_precision="int8")
