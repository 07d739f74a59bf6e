"""Vision FP32 islands (`qwen3vl build --keep-sensitive-vision N`): the PyTorch emulation of ONNX
Runtime's DynamicQuantizeMatMul that the sensitivity measures, the sensitivity ranking (checked on a
checkpoint where one block is made sensitive on purpose), builds that keep the chosen blocks' linears
float in the ort and trt vision graphs, the manifest record, and the one-line refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from safetensors.torch import load_file, save_file

from conftest import assert_one_line_error, qwen3vl, random_image
from export.build_engine import build_engine
from export.sensitivity import most_sensitive
from export.vision_sensitivity import BLOCK_LINEARS, DynamicQuantizeLinear, vision_block_sensitivities
from graph_passes.quantize_dynamic_int8 import quantize_columns
from runtime import Pipeline
from runtime.engine_manifest import load_manifest

# The block made sensitive on purpose (see boosted_checkpoint); the tiny vision encoder has 4 blocks.
BOOSTED = "visual.blocks.1"
DEPTH = 4


def _ort_dynamic_quantize_matmul(x: np.ndarray, codes: np.ndarray, scales: np.ndarray, bias: np.ndarray):
    """One com.microsoft DynamicQuantizeMatMul node, as the pass writes it, run by ONNX Runtime."""
    node = helper.make_node("DynamicQuantizeMatMul", ["x", "w", "scales", "", "bias"], ["y"], domain="com.microsoft")
    graph = helper.make_graph([node], "one_linear",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(codes, "w"), numpy_helper.from_array(scales, "scales"),
                               numpy_helper.from_array(bias, "bias")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_the_emulation_matches_onnx_runtimes_dynamic_quantize_matmul():
    """Activations with an asymmetric range (a zero point well inside uint8) and varied column scales.
    The emulation multiplies dequantized values in fp32 where ONNX Runtime sums integer products and
    scales once; the codes are the same, so only fp32 rounding separates them (observed: max
    difference 2e-7 to 4e-7 of the output's largest magnitude over five seeds, on this machine's AVX2
    kernels; dropping the activation quantization gives 1e-2)."""
    rng = np.random.default_rng(3)
    k, n = 96, 40
    linear = torch.nn.Linear(k, n)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(rng.standard_normal((n, k)).astype(np.float32)
                                             * rng.uniform(0.05, 2, size=(n, 1)).astype(np.float32)))
    x = (rng.standard_normal((50, k)) * 2 + 1.5).astype(np.float32)
    x[3, 7] = 25.0  # one outlier sets the range: per-tensor quantization is coarse for all the rest
    codes, scales = quantize_columns(linear.weight.detach().numpy(), rows=True)
    expected = _ort_dynamic_quantize_matmul(x, codes, scales, linear.bias.detach().numpy())

    with torch.no_grad():
        ours = DynamicQuantizeLinear(linear)(torch.from_numpy(x)).numpy()
        weights_only = torch.nn.functional.linear(torch.from_numpy(x), DynamicQuantizeLinear(linear).weight,
                                                  linear.bias).numpy()
    peak = np.abs(expected).max()
    assert np.abs(ours - expected).max() < 1e-5 * peak
    # The activations' quantization is what the emulation adds over int8 weights alone: without it
    # the result is far from ONNX Runtime's.
    assert np.abs(weights_only - expected).max() > 1e-3 * peak


@pytest.fixture(scope="module")
def boosted_checkpoint(tiny_checkpoints, tmp_path_factory):
    """The tiny checkpoint with one vision block whose MLP input has an outlier channel that computes
    what it did: norm2's gain and bias on channel 0 grow 1000x and linear_fc1's weights reading it
    shrink 1000x (the same product in fp32). Per-tensor uint8 activations then spend their 255 steps
    on that channel and round the others to a few levels."""
    out = tmp_path_factory.mktemp("vision-boosted") / "checkpoint"
    shutil.copytree(tiny_checkpoints["gqa2-tied"], out)
    tensors = load_file(str(out / "model.safetensors"))
    prefix = f"model.{BOOSTED}"
    for name in (f"{prefix}.norm2.weight", f"{prefix}.norm2.bias"):
        t = tensors[name].float()
        t[0] = 1000 * t[0] if name.endswith("bias") or t[0] != 0 else 1000.0
        tensors[name] = t.to(tensors[name].dtype)
    fc1 = tensors[f"{prefix}.mlp.linear_fc1.weight"].float()
    fc1[:, 0] /= 1000
    tensors[f"{prefix}.mlp.linear_fc1.weight"] = fc1.to(tensors[f"{prefix}.mlp.linear_fc1.weight"].dtype)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_sensitivity_covers_every_block_and_ranks_the_boosted_one_first(tiny_checkpoints, boosted_checkpoint):
    lines = []
    plain = vision_block_sensitivities(tiny_checkpoints["gqa2-tied"], progress=lines.append)
    assert set(plain) == {f"visual.blocks.{i}" for i in range(DEPTH)}
    assert all(np.isfinite(v) and v > 0 for v in plain.values()), plain
    assert f"vision sensitivity: block {DEPTH - 1} done ({DEPTH}/{DEPTH} blocks" in lines[-1]
    boosted = vision_block_sensitivities(boosted_checkpoint)
    assert most_sensitive(plain, 1) != [BOOSTED]
    assert most_sensitive(boosted, 1) == [BOOSTED]
    assert boosted[BOOSTED] > 5 * plain[BOOSTED]
    # The other blocks compute what they did: their sensitivities barely move.
    for name in ("visual.blocks.0", "visual.blocks.3"):
        assert boosted[name] == pytest.approx(plain[name], rel=0.2)


def _vision_ops(engine, graph="vision.onnx") -> dict[str, str]:
    """Weight name -> op type of the node that reads it (float Gemm or the quantized op)."""
    model = onnx.load(str(engine / graph), load_external_data=False)
    return {node.input[1].removesuffix(".int8").removesuffix(".quant"): node.op_type
            for node in model.graph.node if len(node.input) > 1}


def test_keep_sensitive_vision_leaves_the_boosted_block_float(boosted_checkpoint, tmp_path):
    engine = tmp_path / "engine"
    result = qwen3vl("build", "--checkpoint", str(boosted_checkpoint), "--out", str(engine), "--precision", "int4",
                     "--block-size", "32", "--keep-sensitive-vision", "1")
    assert result.returncode == 0, result.stderr
    assert f"vision sensitivity: block {DEPTH - 1} done ({DEPTH}/{DEPTH} blocks" in result.stderr
    assert "ranking: blocks.1 " in result.stderr and "kept in FP32: blocks.1\n" in result.stderr
    ops = _vision_ops(engine)
    for i in range(DEPTH):
        for linear in BLOCK_LINEARS:
            want = "Gemm" if f"visual.blocks.{i}" == BOOSTED else "DynamicQuantizeMatMul"
            assert ops[f"visual.blocks.{i}.{linear}.weight"] == want, (i, linear, ops)
    assert ops["visual.merger.linear_fc1.weight"] == "DynamicQuantizeMatMul"  # only blocks are kept
    manifest = load_manifest(engine)
    record = manifest.quantization["vision_sensitivity"]
    assert record["kept"] == [BOOSTED] and set(record["kl"]) == {f"visual.blocks.{i}" for i in range(DEPTH)}
    assert "DynamicQuantizeMatMul" in record["metric"] and "synthetic_image(224x224)" in record["calibration"]
    assert "vision:dynamic_int8_weights:per_column:7bit:keep_float" in manifest.graph_passes
    assert not any(name.startswith(f"{BOOSTED}.") for name in manifest.quantization["tensors"]["vision"])
    raw = json.loads((engine / "manifest.json").read_text())
    assert raw["quantization"]["vision_sensitivity"]["kept"] == [BOOSTED]

    # The engine answers, and its image features are far closer to FP32 vision than all-INT8's.
    run = qwen3vl("run", "--engine", str(engine), "--prompt", "Describe this image.", "--image",
                  _save_image(tmp_path), "--max-new-tokens", "3", "--greedy", "--json")
    assert run.returncode == 0, run.stderr
    int8 = build_engine(boosted_checkpoint, tmp_path / "int8-vision", precision="int4", block_size=32)
    fp32 = build_engine(boosted_checkpoint, tmp_path / "fp32-vision", precision="int4", block_size=32,
                        vision_precision="fp32")
    reference = Pipeline.load(fp32)
    batch = reference.prepare(["Describe this image."], [[random_image(96, 128, seed=2)]])
    want = reference.backend.encode_images(batch.vision).image_embeds

    def error(folder) -> float:
        got = Pipeline.load(folder).backend.encode_images(batch.vision).image_embeds
        return float(np.sqrt(((got - want) ** 2).mean()))

    assert error(engine) < 0.5 * error(int8)


def _save_image(folder) -> str:
    path = folder / "image.png"
    random_image(96, 128, seed=2).save(path)
    return str(path)


def test_trt_vision_keeps_the_block_float_too(boosted_checkpoint, tmp_path):
    """--backend trt: weight-only INT8 vision (MatMulNBits, the weight GEMM plugin in the TensorRT
    graph); the kept block's Gemms stay float in both graphs, and the record says what was measured."""
    engine = build_engine(boosted_checkpoint, tmp_path / "trt", backend="trt", precision="int4", block_size=32,
                          keep_sensitive_vision=1)
    record = load_manifest(engine).quantization["vision_sensitivity"]
    assert "weight-only INT8" in record["metric"] and len(record["kept"]) == 1
    kept = record["kept"][0]
    for graph in ("vision.onnx", "vision.trt.onnx"):
        ops = _vision_ops(engine, graph)
        for i in range(DEPTH):
            for linear in BLOCK_LINEARS:
                op = ops[f"visual.blocks.{i}.{linear}.weight"]
                assert (op == "Gemm") == (f"visual.blocks.{i}" == kept), (graph, i, linear, op)


@pytest.mark.parametrize("arguments,fragments", [
    (["--precision", "fp32", "--keep-sensitive-vision", "1"], ["--keep-sensitive-vision", "--precision fp32"]),
    (["--precision", "int4", "--vision-precision", "fp32", "--keep-sensitive-vision", "1"],
     ["--keep-sensitive-vision", "vision fp32"]),
    (["--precision", "int4", "--keep-sensitive-vision", "-1"], ["--keep-sensitive-vision -1"]),
    (["--precision", "int4", "--keep-sensitive-vision", str(DEPTH + 1)],
     [f"--keep-sensitive-vision {DEPTH + 1}", f"has {DEPTH} blocks"]),
])
def test_bad_keep_sensitive_vision_is_refused_in_one_line(tiny_checkpoints, tmp_path, arguments, fragments):
    result = qwen3vl("build", "--checkpoint", str(tiny_checkpoints["gqa2-tied"]), "--out", str(tmp_path / "e"),
                     *arguments)
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "e").exists()
