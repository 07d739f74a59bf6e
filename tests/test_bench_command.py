"""`qwen3vl bench` end to end on a tiny engine: figures for both systems, and one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from export.build_engine import build_engine
from model_src.synthetic_checkpoint import write_preset

KEYS = ("system", "vision_ms", "prefill_ms", "ttft_ms", "decode_tokens_per_s", "peak_rss_mb",
        "threads", "image_tokens", "prompt_tokens", "new_tokens")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    checkpoint = write_preset("tiny", root / "checkpoint")
    engine = build_engine(checkpoint, root / "engine", max_context=512)
    return checkpoint, engine


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
            assert row[key] > 0, (key, row)
        assert row["peak_rss_mb"] > 50, row
        assert row["threads"] == 2 and row["new_tokens"] == 4, row
        # The first token comes after the image is encoded and the prompt prefilled.
        assert row["ttft_ms"] >= row["prefill_ms"], row
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
    """A graph with the right size but garbage content passes the parent's checks; the child's
    ONNX Runtime refuses it and the parent must report that as the engine's own error."""
    _, engine = tiny
    broken = tmp_path / "engine"
    shutil.copytree(engine, broken)
    vision = broken / "vision.onnx"
    vision.write_bytes(b"\0" * vision.stat().st_size)
    assert "ONNX Runtime could not load the engine" in one_line_error(bench("--engine", str(broken)))
