"""`qwen3vl build --kv-dtype fp16|int8` on the ONNX Runtime graphs: the cache the runtime allocates,
what the manifest records, memory admission, and fidelity against the FP32-cache engine."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from bench.fidelity import compare, teacher_forced_logits
from conftest import assert_one_line_error, qwen3vl, random_image
from export.kv_calibration import calibrate_kv_scales
from graph_passes.kv_cache_dtype import kv_cache_dtype
from graph_passes.pass_runner import run_passes, update_engine_manifest
from runtime import Pipeline
from runtime.engine_manifest import load_manifest

ITEMSIZE = {"fp32": 4, "fp16": 2, "int8": 1}
PROMPT = "Describe the picture in detail, please."
POSITIONS = 64  # teacher-forced positions: the image's tokens, then text
# Mean KL(P_fp32-cache || P_engine) in nats over 96 positions on the tiny configurations (random
# weights, nearly flat distributions), measured: fp16 1.2e-6..1.4e-6, int8 per-channel 2.0e-3
# (gqa2-tied) and 5.3e-3 (gqa6-untied), top-1 agreement 0.90..1.0 (near ties flip). The bounds keep
# a margin of 4x and more; scales 100x too small (most values saturate) or too large (most round to
# zero) measure 6.9..8.4 nats and fail them.
MEAN_KL_BOUND = {"fp16": 1e-5, "int8": 2e-2}


def _teacher_forced(engine):
    pipe = Pipeline.load(engine, backend="ort")
    try:
        return teacher_forced_logits(pipe, PROMPT, random_image(64, 48, seed=3), POSITIONS)
    finally:
        pipe.close()


@pytest.fixture(scope="module")
def fp32_logits(tiny_engine):
    return {name: _teacher_forced(tiny_engine(name)) for name in ("gqa2-tied", "gqa6-untied")}


@pytest.mark.parametrize("kv_dtype", ["fp16", "int8"])
def test_a_kv_dtype_engine_allocates_its_cache_in_that_type_and_records_it(tiny_engine, kv_dtype):
    engine = tiny_engine("gqa2-tied", kv_dtype=kv_dtype)
    manifest = load_manifest(engine)
    passes = [p for p in manifest.graph_passes if p.startswith("decoder:kv_cache_dtype:")]
    assert manifest.kv_dtype == kv_dtype
    assert passes == [f"decoder:kv_cache_dtype:{kv_dtype}" + (":per_channel" if kv_dtype == "int8" else "")]
    pipe = Pipeline.load(engine, backend="ort")
    m = manifest.model
    cache = pipe.backend.new_cache(2, 16)
    assert len(cache.buffers) == 2 * m.num_hidden_layers
    assert all(b.dtype == np.dtype({"fp16": np.float16, "int8": np.int8}[kv_dtype]) for b in cache.buffers)
    assert cache.nbytes == 2 * m.num_hidden_layers * 2 * m.num_key_value_heads * 16 * m.head_dim * ITEMSIZE[kv_dtype]
    result = pipe.generate("Hi", max_new_tokens=6, do_sample=False)
    assert len(result.token_ids) >= 1


@pytest.mark.parametrize("config_name,kv_dtype", [("gqa2-tied", "fp16"), ("gqa2-tied", "int8"),
                                                   ("gqa6-untied", "int8")])
def test_a_kv_dtype_engine_follows_the_fp32_cache_engine(tiny_engine, fp32_logits, config_name, kv_dtype):
    got = compare(fp32_logits[config_name], _teacher_forced(tiny_engine(config_name, kv_dtype=kv_dtype)))
    assert got["mean_kl"] <= MEAN_KL_BOUND[kv_dtype], got
    assert got["top1_agreement"] >= 0.8, got


def test_fp16_kv_gives_the_fp32_cache_greedy_tokens(tiny_engine):
    image = random_image(64, 96, seed=1)
    answers = [Pipeline.load(engine, backend="ort").generate("Describe this image.", [image], max_new_tokens=12,
                                                             do_sample=False)
               for engine in (tiny_engine("gqa2-tied"), tiny_engine("gqa2-tied", kv_dtype="fp16"))]
    assert answers[0].token_ids == answers[1].token_ids


def _int8_copy(engine, folder, scale_factor: float):
    """The FP32-cache engine with an INT8 cache whose calibrated scales are multiplied by `scale_factor`."""
    copy = shutil.copytree(engine, folder)
    manifest = load_manifest(copy)
    scales = {name: s * scale_factor for name, s in calibrate_kv_scales(copy, manifest).items()}
    changed = run_passes(copy / manifest.files["decoder"], [kv_cache_dtype("int8", scales)])
    update_engine_manifest(copy, [f"decoder:{name}" for name in changed])
    return copy, changed, scales


@pytest.mark.parametrize("scale_factor", [0.01, 100.0])
def test_the_kv_fidelity_bound_fails_for_wrong_int8_scales(tiny_engine, fp32_logits, tmp_path, scale_factor):
    """Scales 100x too small (most values saturate) or too large (most round to zero) break the bound."""
    engine, changed, _ = _int8_copy(tiny_engine("gqa2-tied"), tmp_path / "engine", scale_factor)
    assert changed == ["kv_cache_dtype:int8:per_channel"]
    got = compare(fp32_logits["gqa2-tied"], _teacher_forced(engine))
    assert got["mean_kl"] > MEAN_KL_BOUND["int8"], got


def test_the_kv_cache_pass_is_idempotent(tiny_engine, tmp_path):
    engine, _, scales = _int8_copy(tiny_engine("gqa2-tied"), tmp_path / "engine", 1.0)
    decoder = engine / load_manifest(engine).files["decoder"]
    before = decoder.read_bytes()
    assert run_passes(decoder, [kv_cache_dtype("int8", scales)]) == []
    assert decoder.read_bytes() == before
    # Other scales or granularity change the graph once, then nothing.
    halved = {name: s / 2 for name, s in scales.items()}
    assert run_passes(decoder, [kv_cache_dtype("int8", halved, "per_tensor")]) == ["kv_cache_dtype:int8:per_tensor"]
    assert run_passes(decoder, [kv_cache_dtype("int8", halved, "per_tensor")]) == []
    fp16 = tiny_engine("gqa2-tied", kv_dtype="fp16")
    assert run_passes(fp16 / "decoder.onnx", [kv_cache_dtype("fp16")], out_path=tmp_path / "again.onnx") == []


@pytest.mark.parametrize("kv_dtype", ["fp32", "fp16", "int8"])
def test_memory_admission_counts_the_cache_in_its_stored_type(tiny_engine, monkeypatch, kv_dtype):
    import runtime.pipeline

    engine = tiny_engine("gqa2-tied", **({} if kv_dtype == "fp32" else {"kv_dtype": kv_dtype}))
    pipe = Pipeline.load(engine, backend="ort")
    seen = []
    monkeypatch.setattr(runtime.pipeline, "admit", lambda estimate, **kw: seen.append(estimate))
    result = pipe.generate(["Hi", "Hello there"], max_new_tokens=4, do_sample=False)
    m = pipe.manifest.model
    capacity = max(r.prompt_tokens for r in result) + 4
    assert seen[0].parts["KV cache"] == (2 * m.num_hidden_layers * 2 * m.num_key_value_heads * capacity * m.head_dim
                                         * ITEMSIZE[kv_dtype])


def test_tensorrt_builds_refuse_an_int8_kv_cache_in_one_line(tiny_checkpoints, tmp_path):
    result = qwen3vl("build", "--checkpoint", tiny_checkpoints["gqa2-tied"], "--out", tmp_path / "engine",
                     "--backend", "trt", "--kv-dtype", "int8")
    assert_one_line_error(result, "--kv-dtype int8", "TensorRT", "fp32 or fp16")
    assert not (tmp_path / "engine").exists()


def test_bench_reports_the_kv_bytes_per_token_of_the_stored_type(tiny_engine):
    import json

    engine = tiny_engine("gqa2-tied", kv_dtype="int8")
    result = qwen3vl("bench", "--engine", engine, "--json", "--max-new-tokens", "2", "--threads", "1",
                     "--image-size", "64x48")
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout.splitlines()[0])
    m = load_manifest(engine).model
    assert row["kv_bytes_per_token"] == 2 * m.num_hidden_layers * m.num_key_value_heads * m.head_dim  # 1 B each


def test_the_memory_plan_counts_an_int8_cache_from_the_manifest(tiny_engine):
    from runtime.memory_plan import EngineFacts, plan_memory

    facts = EngineFacts.from_manifest(load_manifest(tiny_engine("gqa2-tied", kv_dtype="int8")))
    m = facts.model
    assert facts.kv_dtype == "int8"
    plan = plan_memory(facts, 1 << 30, context=256)
    kv_item = next(item for item in plan.items if item.what.startswith("KV cache"))
    assert plan.kv_dtype == "int8" and kv_item.bytes == 256 * 2 * m.num_hidden_layers * m.num_key_value_heads * m.head_dim


def test_a_derived_kv_variant_equals_the_built_one(tiny_engine, tmp_path):
    from export.kv_variant import derive_kv_variant
    from runtime.errors import Qwen3VLError

    built = tiny_engine("gqa2-tied", kv_dtype="int8")
    derived = derive_kv_variant(tiny_engine("gqa2-tied"), tmp_path / "derived", "int8")
    manifest = load_manifest(derived, verify_hashes=True)
    assert manifest.kv_dtype == "int8" and manifest.graph_passes == load_manifest(built).graph_passes
    assert (derived / "decoder.onnx").read_bytes() == (built / "decoder.onnx").read_bytes()
    assert (tiny_engine("gqa2-tied") / "decoder.onnx").read_bytes() != (built / "decoder.onnx").read_bytes()
    with pytest.raises(Qwen3VLError, match="already int8"):
        derive_kv_variant(derived, tmp_path / "again", "fp16")
