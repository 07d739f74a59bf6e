"""`qwen3vl build --precision int8|int4`: quantized engines that build, load and answer."""

from __future__ import annotations

import json

import pytest

from conftest import random_image
from runtime import Pipeline


@pytest.mark.parametrize("precision,decoder_ratio", [("int8", 0.40), ("int4", 0.25)])
def test_quantized_engine_builds_small_and_generates(tiny_engine, precision, decoder_ratio):
    fp32 = tiny_engine("gqa2-tied")
    quantized = tiny_engine("gqa2-tied", precision=precision, block_size=32)
    manifest = json.loads((quantized / "manifest.json").read_text())
    bits = precision[3:]
    assert manifest["precision"] == precision
    assert "decoder:fuse_rmsnorm" in manifest["graph_passes"]
    assert f"decoder:quantize_weights:int{bits}:b32:sym" in manifest["graph_passes"]
    assert "vision:dynamic_int8_weights:per_column:7bit" in manifest["graph_passes"]  # the default
    # Only the graphs' own data files remain: the replaced float weights are gone.
    assert sorted(p.name for p in quantized.iterdir() if p.name.endswith(".data")) == [
        "decoder.onnx.data", "vision.onnx.data"]
    ratio = (quantized / "decoder.onnx.data").stat().st_size / (fp32 / "decoder.onnx.data").stat().st_size
    assert ratio < decoder_ratio, ratio

    pipe = Pipeline.load(quantized, verify=True)
    result = pipe.generate("Describe this image.", images=[random_image(64, 96, 1)], max_new_tokens=6, logprobs=1,
                           do_sample=False)
    assert len(result.token_ids) == 6
    reference = Pipeline.load(fp32).generate("Describe this image.", images=[random_image(64, 96, 1)],
                                             max_new_tokens=1, logprobs=1, do_sample=False)
    # Quantization moves the distribution, not wildly: the first step's top logprob stays close.
    assert abs(result.logprobs[0][0]["logprob"] - reference.logprobs[0][0]["logprob"]) < 1.0
