"""`qwen3vl bench` end to end on a tiny engine: figures for both systems, bandwidth and decode
efficiency, fidelity against a reference engine, per-op profiles, and one-line errors."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from bench import bandwidth
from bench.bandwidth import decoder_weight_bytes, measure, read_bandwidth
from bench.fidelity import fidelity, fidelity_prompt, teacher_forced_logits
from bench.inputs import synthetic_image
from export.build_engine import build_engine
from runtime import Pipeline
from runtime.engine_manifest import load_manifest
from runtime.image_processing import preprocess_images

KEYS = ("system", "vision_ms", "prefill_ms", "ttft_ms", "decode_tokens_per_s", "peak_rss_mb",
        "threads", "image_tokens", "prompt_tokens", "new_tokens", "precision", "bandwidth_gb_s",
        "bandwidth_1thread_gb_s", "weight_bytes_per_token", "decode_efficiency")
FIDELITY_KEYS = ("top1_agreement", "mean_kl", "max_kl", "positions", "image_positions")
PROMPT = "Describe this image."


@pytest.fixture(scope="module")
def tiny(tiny_checkpoints, tiny_engine):
    return tiny_checkpoints["gqa2-tied"], tiny_engine("gqa2-tied", max_context=512)


@pytest.fixture(scope="module")
def tiny_int4(tiny_engine):
    return tiny_engine("gqa2-tied", precision="int4", max_context=1024)


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("picture") / "picture.png"
    synthetic_image(160, 128).save(path)
    return str(path)


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "commands", "bench", *args], capture_output=True, text=True,
                          timeout=300)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_json_figures_for_engine_and_transformers(tiny):
    checkpoint, engine = tiny
    proc = bench("--engine", str(engine), "--checkpoint", str(checkpoint), "--json", "--max-new-tokens", "4",
                 "--threads", "2")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert [row["system"] for row in rows] == ["engine", "transformers"]
    for row in rows:
        assert set(KEYS) <= set(row), row
        for key in KEYS[1:]:
            assert key == "precision" or row[key] > 0, (key, row)
        assert row["peak_rss_mb"] > 50, row
        assert row["threads"] == 2 and row["new_tokens"] == 4, row
        assert row["bandwidth_gb_s"] == rows[0]["bandwidth_gb_s"]  # one machine measurement for both
        assert row["decode_efficiency"] == pytest.approx(
            row["weight_bytes_per_token"] * row["decode_tokens_per_s"] / (row["bandwidth_gb_s"] * 1e9), rel=1e-3)
        assert not set(FIDELITY_KEYS) & set(row) and "profile" not in row, row  # only when asked for
    assert rows[0]["precision"] == rows[1]["precision"] == "fp32"
    # The engine's first token comes after its vision encoder and prefill, in the same generate call
    # (one run: the figures are that run's). transformers' ttft comes from a separate generate() call,
    # and on a loaded machine separately timed figures need not add up: no relation is asserted there.
    engine_row = rows[0]
    assert engine_row["ttft_ms"] >= engine_row["vision_ms"] + engine_row["prefill_ms"] - 0.01, engine_row
    # Bytes per token: the engine's decoder weights as stored, and the same fp32 weights in PyTorch
    # (the tied head counted once on both sides).
    assert engine_row["weight_bytes_per_token"] == decoder_weight_bytes(engine, load_manifest(engine))
    assert rows[1]["weight_bytes_per_token"] == engine_row["weight_bytes_per_token"]
    # Identical preprocessing and prompt building on both sides.
    assert rows[0]["prompt_tokens"] == rows[1]["prompt_tokens"] and rows[0]["image_tokens"] == rows[1]["image_tokens"]
    assert rows[0]["prompt_tokens"] > rows[0]["image_tokens"] > 0


def test_missing_engine_is_a_one_line_error(tmp_path):
    assert "engine folder not found" in one_line_error(bench("--engine", str(tmp_path / "nope")))


def test_missing_checkpoint_and_bad_image_are_one_line_errors(tiny, tmp_path):
    checkpoint, engine = tiny
    assert "checkpoint folder not found" in one_line_error(
        bench("--engine", str(engine), "--checkpoint", str(tmp_path / "nope")))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a picture")
    assert "not an image file" in one_line_error(bench("--engine", str(engine), "--image", str(bad)))


def test_failure_inside_the_child_becomes_a_one_line_error(tiny, tmp_path):
    """A well-formed graph that ONNX Runtime cannot run (an operator nobody implements) passes the
    parent's checks; the child's ONNX Runtime refuses it and the parent must report that as the
    engine's own error."""
    import onnx
    from onnx import TensorProto, helper

    _, engine = tiny
    broken = tmp_path / "engine"
    shutil.copytree(engine, broken)
    vision = broken / "vision.onnx"
    graph = helper.make_graph([helper.make_node("NoSuchOp", ["x"], ["y"], domain="nowhere")], "broken",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                      helper.make_opsetid("nowhere", 1)]), str(vision))
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["sizes"]["vision.onnx"] = vision.stat().st_size
    (broken / "manifest.json").write_text(json.dumps(manifest))
    assert "ONNX Runtime could not load the engine" in one_line_error(bench("--engine", str(broken)))


def test_teacher_forcing_matches_a_full_prefill(tiny, picture):
    """Each teacher-forced position's logits equal those of a prefill of the prompt up to it, at an
    image position as at text positions."""
    _, engine = tiny
    pipe = Pipeline.load(engine, threads=2)
    forced = teacher_forced_logits(pipe, PROMPT, picture, positions=40)
    _, batch = fidelity_prompt(pipe, PROMPT, picture, 40)
    m, backend = pipe.manifest.model, pipe.backend
    ids = batch.row(0)
    assert np.array_equal(ids, forced.input_ids)
    is_image = ids == m.image_token_id
    assert forced.start == np.flatnonzero(is_image)[0] - 1 and 0 < forced.image_positions < 40
    features = backend.encode_images(batch.vision)
    for i in (0, 1, forced.image_positions, 39):  # before, inside and after the image
        t = forced.start + i
        cache = backend.new_cache(1, t + 1)
        logits = backend.prefill(cache, batch.chunk(features, backend.decoder_dtype, 0, t + 1))[0]
        np.testing.assert_allclose(forced.logits[i], logits, atol=1e-4)


def test_fidelity_of_an_engine_against_itself(tiny, picture):
    _, engine = tiny
    result = fidelity(Pipeline.load(engine, threads=2), Pipeline.load(engine, threads=2), PROMPT, picture)
    assert result["top1_agreement"] == 1.0 and abs(result["mean_kl"]) < 1e-6, result
    assert result["positions"] == 256 and result["image_positions"] > 0, result


def test_int4_against_fp32_with_profile(tiny, tiny_int4):
    """The whole --reference --profile path through the command: fidelity figures (those of
    bench.fidelity for the same engines and inputs, so the command keeps the reference and the
    engine apart), op profiles."""
    _, engine = tiny
    proc = bench("--engine", str(tiny_int4), "--reference", str(engine), "--profile", "--json",
                 "--image-size", "448x448", "--positions", "64", "--max-new-tokens", "4", "--threads", "2")
    assert proc.returncode == 0, proc.stderr
    (row,) = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert set(KEYS + FIDELITY_KEYS + ("profile",)) <= set(row), row
    assert row["precision"] == "int4"
    expected = fidelity(Pipeline.load(tiny_int4, threads=2), Pipeline.load(engine, threads=2), PROMPT,
                        synthetic_image(448, 448), positions=64)
    assert row["positions"] == 64 and row["image_positions"] == expected["image_positions"] > 0, row
    assert row["top1_agreement"] == pytest.approx(expected["top1_agreement"]), (row, expected)
    assert row["mean_kl"] == pytest.approx(expected["mean_kl"], rel=1e-3), (row, expected)
    assert row["max_kl"] == pytest.approx(expected["max_kl"], rel=1e-3), (row, expected)
    assert 0 < row["mean_kl"] <= row["max_kl"] and row["top1_agreement"] < 1, row  # int4 is not fp32
    # Weight-only int4 reads about an eighth of the fp32 weights per token (plus scales), except its
    # 8-bit tied head (a quarter), which is most of this tiny decoder: ~0.26 of fp32 in all.
    fp32_bytes = decoder_weight_bytes(engine, load_manifest(engine))
    assert 0.1 * fp32_bytes < row["weight_bytes_per_token"] < 0.3 * fp32_bytes, row
    layers = load_manifest(engine).model.num_hidden_layers
    for graph in ("vision", "prefill", "decode"):
        summary = row["profile"][graph]
        ops = {op["op"]: op for op in summary["ops"]}
        # int builds: the vision encoder computes in INT8 (DynamicQuantizeMatMul), the decoder is int4.
        assert 0 < summary["kernel_ms"] <= summary["run_ms"] and ("MatMulNBits" in ops) == (graph != "vision"), summary
        assert ("DynamicQuantizeMatMul" in ops) == (graph == "vision"), summary
        assert sum(op["share"] for op in summary["ops"]) == pytest.approx(1, abs=0.01)
    # Per decode step, every linear once: q k v o gate up down per layer, and the tied lm_head.
    decode_ops = {op["op"]: op for op in row["profile"]["decode"]["ops"]}
    assert decode_ops["MatMulNBits"]["calls"] == 7 * layers + 1, decode_ops["MatMulNBits"]
    assert decode_ops["GroupQueryAttention"]["calls"] == layers, decode_ops["GroupQueryAttention"]
    assert "GroupQueryAttention" in [op["op"] for op in row["profile"]["prefill"]["ops"]]


def test_profile_and_fidelity_in_the_table(tiny):
    _, engine = tiny
    proc = bench("--engine", str(engine), "--reference", str(engine), "--profile", "--positions", "16",
                 "--max-new-tokens", "2", "--threads", "1", "--reuse")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for text in ("memory read bandwidth", "decode_efficiency", "top1_agreement", "16 teacher-forced positions",
                 "profile vision", "profile prefill", "profile decode", "MatMul"):
        assert text in out, out
    # --reuse: the follow-up question reuses the first turn (image included) and answers as cold
    reuse = re.search(r"follow-up question \((\d+) new tokens after (\d+) from the cache\): TTFT cold [\d.]+ ms, "
                      r"warm [\d.]+ ms \([\d.]+x\), first token the same; cache hits/misses text 0/0, image 1/1", out)
    assert reuse and int(reuse[1]) >= 20 and int(reuse[2]) > 20, out


def test_bandwidth_is_bytes_over_the_best_pass_time_in_gb_per_s(monkeypatch):
    """On a clock that makes the passes take 1 s (the warm-up), then 0.5, 0.25 and 0.4 s: the bytes
    of the array over the best pass, in 10**9 bytes per second."""
    ends = iter(np.cumsum([0, 1.0, 0, 0.5, 0, 0.25, 0, 0.4]))  # (start, end) of each pass
    monkeypatch.setattr(bandwidth, "time", SimpleNamespace(perf_counter=lambda: float(next(ends))))
    array = np.ones(1 << 20, dtype=np.float32)
    assert read_bandwidth(2, passes=3, array=array) == pytest.approx(array.nbytes / 0.25 / 1e9)


def test_bandwidth_measurement_is_plausible_and_one_thread_is_one_thread():
    gb_s = read_bandwidth(1, size_bytes=32 << 20, passes=2)
    assert 0.1 < gb_s < 10_000, gb_s  # a real memory, in GB/s (not bytes/s, not bits)
    single = measure(1, size_bytes=32 << 20, passes=2)
    assert single["bandwidth_1thread_gb_s"] == single["bandwidth_gb_s"] > 0.1, single


def test_image_size_and_pixel_budget_reach_both_systems(tiny):
    checkpoint, engine = tiny
    budget = 64 * 64
    proc = bench("--engine", str(engine), "--checkpoint", str(checkpoint), "--image-size", "200x100",
                 "--max-pixels", str(budget), "--min-pixels", "1024", "--json", "--max-new-tokens", "2")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    settings = load_manifest(engine).image_processor.with_budget(1024, budget)
    expected = sum(preprocess_images([synthetic_image(200, 100)], settings).tokens_per_image)
    assert [row["image_tokens"] for row in rows] == [expected, expected]
    assert np.array_equal(np.asarray(synthetic_image(200, 100)), np.asarray(synthetic_image(200, 100)))


def test_bad_image_size_and_a_reference_of_another_model_are_one_line_errors(tiny, tiny_checkpoints, tmp_path):
    _, engine = tiny
    assert "--image-size must be" in one_line_error(bench("--engine", str(engine), "--image-size", "448"))
    assert "--image-size must be" in one_line_error(bench("--engine", str(engine), "--image-size", "0x10"))
    other = build_engine(tiny_checkpoints["gqa6-untied"], tmp_path / "other", max_context=512)
    assert "engine of another model" in one_line_error(bench("--engine", str(engine), "--reference", str(other)))
