"""`qwen3vl build --precision int8|int4`: quantized engines that build small, load, answer, and stay
as close to the FP32 engine as their precision allows.

The closeness bounds are per precision, so an int8 engine that lost int8's resolution fails. That
the engines add nothing beyond the weights' rounding (and the activations' at accuracy level 4) is
tests/test_quantized_vs_dequantized.py, against FP32 engines on the dequantized weights.
"""

from __future__ import annotations

import json

import pytest

from bench.fidelity import fidelity
from conftest import random_image
from runtime import Pipeline

# Mean KL(P_fp32 || P_engine) in nats over 48 teacher-forced positions (the image's 6, then text),
# for the default builds (int8 vision, accuracy level 4). Measured on this random tiny model, which
# amplifies weight noise several-fold: int8 0.018 (top-1 0.96), int4 1.6 (top-1 0.17). Block-wise
# int8 keeps ~0.4% of each block's range per weight, int4 ~7%: the bound for int8 fails an int8
# engine with int4's resolution by a factor of ~30, and the int4 bound only catches a broken engine.
MAX_MEAN_KL = {"int8": 0.05, "int4": 3.0}
MIN_TOP1 = {"int8": 0.8, "int4": 0.05}


# int4: the tied embedding/lm_head, most of this tiny decoder's weights, is 8-bit by default (1.0625
# bytes a weight at its block of 64, against 4 in fp32).
@pytest.mark.parametrize("precision,decoder_ratio", [("int8", 0.40), ("int4", 0.30)])
def test_quantized_engine_builds_small_and_stays_close_to_fp32(tiny_engine, precision, decoder_ratio):
    fp32 = tiny_engine("gqa2-tied")
    quantized = tiny_engine("gqa2-tied", precision=precision, block_size=32)
    manifest = json.loads((quantized / "manifest.json").read_text())
    bits = precision[3:]
    assert manifest["precision"] == precision
    assert "decoder:fuse_rmsnorm" in manifest["graph_passes"]
    assert any(name.startswith(f"decoder:quantize_weights:int{bits}:b32:sym:clip")
               for name in manifest["graph_passes"]), manifest["graph_passes"]
    assert "vision:dynamic_int8_weights:per_column:7bit" in manifest["graph_passes"]  # the default
    # Only the graphs' own data files remain: the replaced float weights are gone.
    assert sorted(p.name for p in quantized.iterdir() if p.name.endswith(".data")) == [
        "decoder.onnx.data", "vision.onnx.data"]
    ratio = (quantized / "decoder.onnx.data").stat().st_size / (fp32 / "decoder.onnx.data").stat().st_size
    assert ratio < decoder_ratio, ratio

    pipe = Pipeline.load(quantized, verify=True)
    image = random_image(64, 96, 1)
    result = pipe.generate("Describe this image.", images=[image], max_new_tokens=6, do_sample=False)
    assert len(result.token_ids) == 6

    closeness = fidelity(pipe, Pipeline.load(fp32), "Describe this image.", image, positions=48)
    assert closeness["image_positions"] > 0, closeness
    assert closeness["mean_kl"] < MAX_MEAN_KL[precision], closeness
    assert closeness["top1_agreement"] >= MIN_TOP1[precision], closeness
