"""int8/int4 engines against their exact oracle: an FP32 engine built from a checkpoint whose decoder
linears and embedding are replaced by numpy's quantize -> dequantize of the originals, each in the
format the quantized build's manifest records for it (bits, block size, symmetry, scale search: the
int4 build is mixed, its tied embedding/lm_head and its two most sensitive linears at 8 bits).

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

import json
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
# The int4 build also keeps its 2 most sensitive linears at 8 bits: three formats in one graph.
OPTIONS = {"int8": {}, "int4": {"keep_sensitive": 2}}
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


def checkpoint_weight(graph_name: str) -> str:
    """The graph's weight name -> the checkpoint's (model.language_model.*, lm_head.weight)."""
    return graph_name if graph_name.startswith("lm_head.") else f"model.{graph_name}"


def recorded_formats(engine) -> dict[str, dict]:
    """Checkpoint tensor name -> the decoder quantization the engine's manifest records for it."""
    manifest = json.loads((engine / "manifest.json").read_text())
    return {checkpoint_weight(name): record for name, record in manifest["quantization"]["tensors"]["decoder"].items()}


def fake_quantized(w: np.ndarray, record: dict) -> np.ndarray:
    """dequantize(quantize(W)) of a checkpoint (out, in) weight along `in`, in the recorded format."""
    bits, block = record["bits"], record["block_size"]
    packed = quantize_blockwise(w, bits, block, record["symmetric"], rows=True, scale_search=record["scale_search"])
    return dequantize_blockwise(*packed, w.shape[1], bits, block, rows=True)


def dequantized_checkpoint(source, out, formats: dict[str, dict]):
    """A copy of `source` whose quantized weights hold fake_quantized(W) in float32."""
    shutil.copytree(source, out)
    tensors = load_file(str(out / "model.safetensors"))
    for name, record in formats.items():
        tensors[name] = torch.from_numpy(fake_quantized(tensors[name].float().numpy(), record))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def quantized_pipeline(tiny_engine, precision: str, accuracy_level: int) -> Pipeline:
    return Pipeline.load(quantized_engine(tiny_engine, precision, accuracy_level))


def quantized_engine(tiny_engine, precision: str, accuracy_level: int):
    # accuracy_level 4 is the build's default. The KV cache is pinned to FP32 (quantized builds store
    # int8 by default): the oracle's engine keeps an FP32 cache, so the weights are the only difference.
    options = {} if accuracy_level == 4 else {"accuracy_level": accuracy_level}
    return tiny_engine("gqa2-tied", precision=precision, block_size=BLOCK, kv_dtype="fp32", **OPTIONS[precision],
                       **options)


@pytest.fixture(scope="module")
def oracles(tiny_checkpoints, tiny_engine, tmp_path_factory):
    """precision -> (dequantized checkpoint, a Pipeline on its FP32 engine, the recorded formats)."""
    root = tmp_path_factory.mktemp("dequantized")
    built = {}
    for precision in BITS:
        formats = recorded_formats(quantized_engine(tiny_engine, precision, accuracy_level=0))
        source = tiny_checkpoints["gqa2-tied"]
        checkpoint = dequantized_checkpoint(source, root / f"checkpoint-{precision}", formats)
        engine = build_engine(checkpoint, root / f"engine-{precision}", vision_precision="int8")
        built[precision] = checkpoint, Pipeline.load(engine), formats
    return built


@pytest.mark.parametrize("precision", list(BITS))
def test_the_manifest_records_every_weight_and_the_oracle_follows_it(tiny_checkpoints, tiny_engine, oracles,
                                                                     precision):
    """Every decoder weight has a record, both accuracy levels quantized the same, the int4 build is
    mixed as asked (8-bit head, 2 sensitive linears at 8 bits, the rest 4 bits at block 32), every
    block of the oracle is no worse than max-abs would make it, and no weight outside the decoder
    was touched."""
    checkpoint, _, formats = oracles[precision]
    assert formats == recorded_formats(quantized_engine(tiny_engine, precision, accuracy_level=4))
    assert len(formats) == 7 * 4 + 1  # 4 layers of q k v o gate up down, and the tied embedding
    reasons = {name: record["reason"] for name, record in formats.items()}
    bits = {name: record["bits"] for name, record in formats.items()}
    head = "model.language_model.embed_tokens.weight"
    if precision == "int4":
        assert reasons[head] == "head" and bits[head] == 8
        sensitive = [name for name, reason in reasons.items() if reason == "sensitive"]
        assert len(sensitive) == 2 and all(bits[name] == 8 for name in sensitive)
        assert {bits[name] for name, reason in reasons.items() if reason == "default"} == {4}
    else:
        assert set(reasons.values()) == {"default"} and set(bits.values()) == {8}
    original = load_file(str(tiny_checkpoints["gqa2-tied"] / "model.safetensors"))
    restored = load_file(str(checkpoint / "model.safetensors"))
    for name, tensor in original.items():
        if name not in formats:
            assert torch.equal(restored[name], tensor), name
            continue
        record, w = formats[name], tensor.float().numpy()
        block = record["block_size"]
        assert record["scale_search"] == "clip" and w.shape[1] % block == 0
        plain = {**record, "scale_search": "none"}
        searched_error = np.square(restored[name].numpy() - w).reshape(w.shape[0], -1, block).sum(axis=2)
        plain_error = np.square(fake_quantized(w, plain) - w).reshape(w.shape[0], -1, block).sum(axis=2)
        assert (searched_error <= plain_error * (1 + 1e-6) + 1e-12).all(), name
        assert searched_error.sum() < plain_error.sum(), name  # the search changed something


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
