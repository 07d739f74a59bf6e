"""The GPU memory plan on stated cards (2, 4, 6 GiB) with the real 2 B shapes, stated as a manifest
would state them (no 2 B engine is built): an INT4 engine fits an MX250 with room to spare and the
vision encoder on the CPU; an FP32 engine does not fit and the plan names builds that would."""

from __future__ import annotations

import dataclasses
import json

import pytest

from conftest import qwen3vl
from runtime.engine_manifest import ModelFacts, load_manifest
from runtime.errors import Qwen3VLError
from runtime.memory_plan import (GiB, KiB, MiB, TARGET_IMAGE_PIXELS, EngineFacts, parse_size, plan_memory,
                                 weight_bytes_per_parameter)

# Qwen3-VL-2B-Instruct (docs: model-facts): text 2048 x 28 layers, 16 heads / 8 KV heads of 128,
# MLP 6144, vocab 151936; vision 16 heads of 64.
QWEN3VL_2B = dict(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                  intermediate_size=6144, head_dim=128, vocab_size=151936, num_deepstack=3, vision_head_dim=64,
                  vision_num_heads=16, num_position_embeddings=2304, spatial_merge_size=2,
                  vision_rope_theta=10000.0, image_token_id=151655, vision_start_token_id=151652,
                  vision_end_token_id=151653, eos_token_ids=(151645, 151643), pad_token_id=151643)
MODEL_2B = ModelFacts(**{f.name: QWEN3VL_2B[f.name] for f in dataclasses.fields(ModelFacts)})
TEXT_PARAMETERS, VISION_PARAMETERS = 1_720_600_000, 407_000_000

# As the engine folders store them: int4 block 64 decoder with INT8 vision weights, and fp32.
INT4 = EngineFacts(MODEL_2B, "int4", decoder_weight_bytes=970_000_000, vision_weight_bytes=430_000_000,
                   vision_precision="int8")
FP32 = EngineFacts(MODEL_2B, "fp32", decoder_weight_bytes=6_900_000_000, vision_weight_bytes=1_600_000_000)


def test_kv_cache_per_token_of_the_2b_model():
    assert INT4.kv_bytes_per_token("fp32") == 224 * KiB
    assert INT4.kv_bytes_per_token("fp16") == 112 * KiB
    assert plan_memory(INT4, 2 * GiB).kv_by_context[2048] == {"fp16": 224 * MiB, "fp32": 448 * MiB}


def test_stated_weight_bytes_agree_with_the_parameter_counts():
    assert weight_bytes_per_parameter("int4", 64) == 0.5 + 4 / 64
    int4_bytes = TEXT_PARAMETERS * weight_bytes_per_parameter("int4", 64)
    assert int4_bytes == pytest.approx(INT4.decoder_weight_bytes, rel=0.01)
    assert TEXT_PARAMETERS * 4 == pytest.approx(FP32.decoder_weight_bytes, rel=0.01)
    assert VISION_PARAMETERS * 4 == pytest.approx(FP32.vision_weight_bytes, rel=0.02)
    assert INT4.decoder_parameters == pytest.approx(TEXT_PARAMETERS, rel=0.01)
    assert INT4.embedding_bytes == pytest.approx(151936 * 2048 * 0.5625, rel=1e-6)


def test_int4_fits_an_mx250_with_room_to_spare_and_vision_on_the_cpu():
    plan = plan_memory(INT4, 2 * GiB, context=2048)
    assert plan.fits and plan.kv_dtype == "fp16" and plan.prefill_chunk == 256
    assert 1.3e9 <= plan.total <= 1.5e9  # ~1.4 GB: 150 MiB + 0.97 GB + 224 MiB + ~43 MiB
    assert plan.spare >= 400 * MiB
    assert not plan.vision_on_gpu and plan.max_context >= 4096
    assert "vision encoder on the CPU" in "\n".join(plan.notes)
    assert plan.verdict().startswith("fits: 1.31 GiB of 2.00 GiB at 2048 tokens (vision on the CPU")
    # The longest context it offers fits with these decisions; one step more needs a smaller chunk.
    assert plan_memory(INT4, 2 * GiB, context=plan.max_context).prefill_chunk == 256
    longer = plan_memory(INT4, 2 * GiB, context=plan.max_context + 256)
    assert not longer.fits or longer.prefill_chunk < 256


@pytest.mark.parametrize("gib", [4, 6])
def test_int4_on_larger_cards_puts_vision_on_the_gpu(gib):
    plan = plan_memory(INT4, gib * GiB)
    assert plan.fits and plan.vision_on_gpu and plan.context == 2048
    assert plan.max_context == 8192  # the engine's own limit
    assert plan.max_pixels >= TARGET_IMAGE_PIXELS
    whats = [item.what for item in plan.items]
    assert any(w.startswith("vision weights") for w in whats) and any(w.startswith("vision working set") for w in whats)


def test_larger_cards_allow_larger_images():
    assert plan_memory(INT4, 4 * GiB).max_pixels < plan_memory(INT4, 6 * GiB).max_pixels
    # Bounded by the context: image tokens leave 256 tokens of a 2048 context for text.
    assert plan_memory(INT4, 6 * GiB).max_pixels == (2048 - 256) * 32 * 32


@pytest.mark.parametrize("gib, fitting", [(2, ["int4"]), (4, ["int4", "int8", "fp16"]), (6, ["int4", "int8", "fp16"])])
def test_fp32_does_not_fit_and_the_plan_says_what_would(gib, fitting):
    plan = plan_memory(FP32, gib * GiB)
    assert not plan.fits and plan.prefill_chunk is None
    assert plan.verdict().startswith("does not fit: needs")
    builds = [s.split(" build")[0].removeprefix("an ") for s in plan.suggestions if " build:" in s]
    assert builds == fitting
    assert any("--precision int4" in s for s in plan.suggestions)
    assert any(s.startswith("a GPU with at least") for s in plan.suggestions)
    assert any("--backend ort" in s for s in plan.suggestions)
    assert "what would fit:" in plan.lines()


def test_an_engine_with_an_fp32_kv_cache_is_planned_as_built_and_told_to_rebuild():
    fixed = dataclasses.replace(INT4, kv_dtype="fp32")
    plan = plan_memory(fixed, 2 * GiB, context=2048)
    assert plan.kv_dtype == "fp32" and plan.fits
    assert plan.total - plan_memory(INT4, 2 * GiB, context=2048).total == 224 * MiB
    assert any("--kv-dtype fp16" in note for note in plan.notes)
    asked = plan_memory(fixed, 2 * GiB, context=2048, kv_dtype="fp16")
    assert asked.kv_dtype == "fp16" and any("build it with --kv-dtype fp16" in n for n in asked.notes)


def test_a_tight_card_gets_a_smaller_prefill_chunk():
    roomy = plan_memory(INT4, 2 * GiB, context=2048)
    one_byte_short = 2 * GiB - (roomy.total - 1)  # a reserve that leaves one byte less than the 256-token plan
    plan = plan_memory(INT4, 2 * GiB, context=2048, reserve=one_byte_short)
    assert roomy.prefill_chunk == 256 and plan.fits and plan.prefill_chunk == 128


def test_a_context_beyond_the_engine_is_refused():
    with pytest.raises(Qwen3VLError, match="built for 1 to 8192"):
        plan_memory(INT4, 2 * GiB, context=16384)


@pytest.mark.parametrize("text, expected", [("2GiB", 2 * GiB), ("2 GB", 2_000_000_000), ("2048MiB", 2 * GiB),
                                            ("2G", 2 * GiB), ("1.5GiB", 3 * GiB // 2), ("4096", 4096)])
def test_memory_sizes(text, expected):
    assert parse_size(text) == expected


def test_bad_memory_size_is_refused():
    with pytest.raises(Qwen3VLError, match="not a memory size"):
        parse_size("two gigs")


def test_facts_come_from_an_engine_folder(tiny_engine):
    engine = tiny_engine("gqa2-tied", backend="trt")
    manifest = load_manifest(engine)
    facts = EngineFacts.from_manifest(manifest)
    assert facts.decoder_weight_bytes == manifest.sizes["decoder.onnx.data"] + manifest.sizes["decoder.onnx"]
    assert facts.vision_weight_bytes == manifest.sizes["vision.onnx.data"] + manifest.sizes["vision.onnx"]
    assert facts.kv_dtype == "fp32" and facts.max_context == manifest.max_context
    assert facts.max_pixels == manifest.image_processor.max_pixels


def test_plan_command(tiny_engine):
    engine = str(tiny_engine("gqa2-tied", backend="trt"))
    text = qwen3vl("plan", "--engine", engine, "--gpu-memory", "2GiB")
    assert text.returncode == 0, text.stderr
    assert "fits:" in text.stdout and "decisions:" in text.stdout and "KV cache by context" in text.stdout
    out = qwen3vl("plan", "--engine", engine, "--gpu-memory", "2GiB", "--context", "1024", "--kv-dtype", "fp16",
                  "--json")
    body = json.loads(out.stdout)
    assert out.returncode == 0 and body["fits"] and body["context"] == 1024 and body["kv_dtype"] == "fp16"
    assert body["total"] == sum(item["bytes"] for item in body["items"])
    small = qwen3vl("plan", "--engine", engine, "--gpu-memory", "100MiB")
    assert small.returncode == 1 and "does not fit" in small.stdout
    bad = qwen3vl("plan", "--engine", engine, "--gpu-memory", "lots")
    assert bad.returncode == 1 and bad.stderr.startswith("error: not a memory size")
