"""int8/int4 engines against their exact oracle: an FP32 engine built from a checkpoint whose decoder
linears and embedding are replaced by numpy's quantize -> dequantize of the originals (same bits,
block size and symmetry as the quantized build).

Weight-only quantization is then the *only* difference between the two engines, so:
- at accuracy level 0 (MatMulNBits computes in fp32 on the dequantized weights) the engines differ
  by fp32 summation order alone: identical greedy tokens and logprobs within 1e-4 nats;
- at accuracy level 4 (the default: activations quantized to int8 per block) the remaining
  difference is the activation rounding, bounded by a small KL.
Both sides run the same vision encoder (the int8 builds' dynamic-int8 one; the oracle is built with
vision_precision="int8" too), which the tests check is bit-identical, so it confounds nothing.
How far quantization moves the model from the original FP32 one is tests/test_engine_precisions.py.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from bench.fidelity import fidelity
from conftest import random_image
from export.build_engine import build_engine
from graph_passes.quantize_weights import dequantize_blockwise, quantize_blockwise
from runtime import Pipeline
from wrapper_backends import wrapped

BLOCK = 32
BITS = {"int8": 8, "int4": 4}
PROMPT = "Describe this image."
NEW_TOKENS = 16
# Level 0: the same fp32 weights and fp32 arithmetic, summed in another order. Logits here are of
# size ~10, so rounding leaves ~1e-5 nats after four layers (measured: at most 2.1e-5 over the
# whole vocabulary and 16 steps, int8 and int4).
LEVEL0_LOGPROB_ATOL = 1e-4
# Level 4: each activation block of 32 is rounded to int8 (steps of max|x| / 127, ~0.4% of the
# block's largest value) before every linear, noise this random model amplifies about as much as
# int8 weights. Measured against the oracle over 48 positions (16 of them image tokens): mean KL
# 0.004-0.005, max 0.03 nats, top-1 agreement 0.90-0.94. The bounds leave ~4x for other CPUs'
# integer kernels; an engine that rounds anything else (weights differently, a wrong scale) is far
# outside them, and level 0 above pins the weights exactly.
LEVEL4_MEAN_KL, LEVEL4_MAX_KL, LEVEL4_TOP1 = 0.02, 0.12, 0.75


def is_quantized_by_the_build(name: str, tensor: torch.Tensor) -> bool:
    """The decoder's 2-D weights: q/k/v/o, gate/up/down, the embedding (and an untied lm_head)."""
    return tensor.ndim == 2 and (name.startswith("model.language_model.") or name == "lm_head.weight")


def dequantized_checkpoint(source, out, bits: int, block_size: int):
    """A copy of `source` whose decoder linears hold dequantize(quantize(W)) in float32, quantized
    along the input dimension (checkpoint layout (out, in)), as the build quantizes them."""
    shutil.copytree(source, out)
    tensors = load_file(str(out / "model.safetensors"))
    for name, tensor in tensors.items():
        if is_quantized_by_the_build(name, tensor):
            w = tensor.float().numpy()
            packed = quantize_blockwise(w, bits, block_size, symmetric=True, rows=True)
            tensors[name] = torch.from_numpy(dequantize_blockwise(*packed, w.shape[1], bits, block_size, rows=True))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def oracles(tiny_checkpoints, tmp_path_factory):
    """precision -> (dequantized checkpoint, a Pipeline on its FP32 engine)."""
    root = tmp_path_factory.mktemp("dequantized")
    built = {}
    for precision, bits in BITS.items():
        source = tiny_checkpoints["gqa2-tied"]
        checkpoint = dequantized_checkpoint(source, root / f"checkpoint-{precision}", bits, BLOCK)
        engine = build_engine(checkpoint, root / f"engine-{precision}", vision_precision="int8")
        built[precision] = checkpoint, Pipeline.load(engine)
    return built


def quantized_pipeline(tiny_engine, precision: str, accuracy_level: int) -> Pipeline:
    # accuracy_level 4 is the build's default: that engine is the one tests/test_engine_precisions.py uses.
    options = {} if accuracy_level == 4 else {"accuracy_level": accuracy_level}
    return Pipeline.load(tiny_engine("gqa2-tied", precision=precision, block_size=BLOCK, **options))


@pytest.mark.parametrize("precision", list(BITS))
def test_dequantized_weights_keep_the_precisions_resolution(tiny_checkpoints, oracles, precision):
    """The oracle itself: every weight within half a step of its block's symmetric grid, max|block|
    / (2**(bits-1) - 1), of the original (an int8 quantizer with int4's coarseness fails here), and
    no weight outside the decoder touched."""
    bits = BITS[precision]
    original = load_file(str(tiny_checkpoints["gqa2-tied"] / "model.safetensors"))
    restored = load_file(str(oracles[precision][0] / "model.safetensors"))
    replaced = 0
    for name, tensor in original.items():
        if not is_quantized_by_the_build(name, tensor):
            assert torch.equal(restored[name], tensor), name
            continue
        replaced += 1
        w = tensor.float().numpy()
        assert w.shape[1] % BLOCK == 0
        blocks = w.reshape(w.shape[0], -1, BLOCK)
        step = np.abs(blocks).max(axis=2, keepdims=True) / ((1 << (bits - 1)) - 1)
        error = np.abs(restored[name].numpy().reshape(blocks.shape) - blocks)
        assert (error <= step * (0.5 + 1e-5) + 1e-12).all(), name
        assert error.max() > step.max() / 16, name  # it was quantized, not copied
    assert replaced == 7 * 4 + 1  # 4 layers of q k v o gate up down, and the tied embedding


@pytest.mark.parametrize("precision", list(BITS))
def test_level0_gives_the_dequantized_fp32_tokens_and_logprobs(tiny_engine, oracles, precision):
    oracle = oracles[precision][1]
    quantized = quantized_pipeline(tiny_engine, precision, accuracy_level=0)
    images = [random_image(128, 128, 3)]
    # The vision encoders are the same graph on the same weights: their outputs are bit-identical.
    batch = oracle.prepare([PROMPT], [images])
    ours, theirs = quantized.backend.encode_images(batch.vision), oracle.backend.encode_images(batch.vision)
    np.testing.assert_array_equal(ours.image_embeds, theirs.image_embeds)
    np.testing.assert_array_equal(ours.deepstack_embeds, theirs.deepstack_embeds)

    oracle, quantized = wrapped(oracle), wrapped(quantized)  # to see every step's logits
    expected = oracle.generate(PROMPT, images=images, max_new_tokens=NEW_TOKENS, do_sample=False)
    result = quantized.generate(PROMPT, images=images, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert len(expected.token_ids) == NEW_TOKENS  # no early stop: all 16 steps are compared
    assert result.token_ids == expected.token_ids
    # Every step's log-probabilities over the whole vocabulary.
    difference = np.abs(np.stack(quantized.backend.logprobs) - np.stack(oracle.backend.logprobs))
    assert difference.max() <= LEVEL0_LOGPROB_ATOL, difference.max(axis=(1, 2))


@pytest.mark.parametrize("precision", list(BITS))
def test_level4_int8_activations_stay_within_a_small_kl_of_the_dequantized_fp32(tiny_engine, oracles, precision):
    oracle = oracles[precision][1]
    quantized = quantized_pipeline(tiny_engine, precision, accuracy_level=4)
    result = fidelity(quantized, oracle, PROMPT, random_image(128, 128, 3), positions=48)
    assert result["image_positions"] >= 16, result
    assert result["mean_kl"] < LEVEL4_MEAN_KL and result["max_kl"] < LEVEL4_MAX_KL, result
    assert result["top1_agreement"] >= LEVEL4_TOP1, result
