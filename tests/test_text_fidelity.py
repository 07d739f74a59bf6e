"""`qwen3vl bench --text`: teacher-forced next-token fidelity over plain text on tiny engines. The
decode path's positions and cache are checked against fresh prefills, saved references against
direct runs, and mismatched references and bad text are refused with one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench.bandwidth import decoder_weight_bytes
from bench.fidelity import FILLER
from bench.text_fidelity import (chunk_logprobs, layout, load, log_softmax, measure,
                                 text_tokens)
from runtime.backend import DecoderChunk
from runtime.backends import open_backend
from runtime.engine_manifest import load_manifest
from runtime.errors import PromptError, Qwen3VLError
from conftest import assert_one_line_error, qwen3vl

CTX = 48


@pytest.fixture(scope="module")
def fp32(tiny_engine):
    return tiny_engine("gqa2-tied", max_context=512)


@pytest.fixture(scope="module")
def int4(tiny_engine):
    return tiny_engine("gqa2-tied", precision="int4", max_context=1024)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """Plain English, about 10 chunks of CTX tokens."""
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(" ".join(FILLER[i % len(FILLER)] for i in range(40)) + "\n")
    return path


@pytest.fixture(scope="module")
def direct(fp32, int4, text, tmp_path_factory):
    """int4 against the fp32 engine folder, the reference's log-probs saved on the way."""
    saved = tmp_path_factory.mktemp("reference") / "fp32.npz"
    report = measure(int4, text, reference=fp32, ctx=CTX, chunks=2, save_reference=saved, threads=1)
    return report, saved


def figures(report: dict) -> dict:
    """The measured figures of a report, without where they came from or how long they took."""
    return {k: v for k, v in report.items()
            if k not in ("reference", "seconds", "saved_reference", "decode_tokens_per_s")}


def test_an_engine_against_itself_has_zero_kl(fp32, text, direct):
    report = measure(fp32, text, reference=direct[1], threads=1)  # its own log-probs, saved by `direct`
    assert report["mean_kl"] == report["max_kl"] == report["llama_mean_kl"] == 0.0
    assert report["top1_agreement"] == 1.0
    assert report["engine_ppl"] == report["reference_ppl"]
    assert report["chunks"] == 2 and report["ctx"] == CTX
    assert report["scored_tokens"] == 2 * (CTX - 1 - CTX // 2)  # llama-perplexity's second half
    assert report["reference_mean_entropy"] > 0
    assert report["decode_tokens_per_s"] > 0


def test_int4_against_its_fp32_sibling_loses_something(fp32, int4, direct):
    report = direct[0]
    assert report["mean_kl"] > 1e-3 and report["max_kl"] >= report["p99_kl"] >= report["median_kl"] > 0
    assert report["top1_agreement"] < 1.0
    # llama-perplexity's sum leaves out the reference's tokens below e^-16: a sliver of the mass.
    assert report["llama_mean_kl"] != report["mean_kl"]
    assert report["llama_mean_kl"] == pytest.approx(report["mean_kl"], rel=0.05)
    assert report["precision"] == "int4" and report["reference_precision"] == "fp32"
    assert report["scored_tokens"] == 2 * (CTX - 1 - CTX // 2)
    # Bytes per token are the engine's: int4 reads far less than fp32 (an 8-bit head or not).
    assert report["weight_bytes_per_token"] == decoder_weight_bytes(int4, load_manifest(int4))
    assert report["weight_bytes_per_token"] < decoder_weight_bytes(fp32, load_manifest(fp32)) / 2
    manifest = load_manifest(int4)
    m, stored = manifest.model, {"fp32": 4, "fp16": 2, "int8": 1}[manifest.kv_dtype]  # int4 stores int8 by default
    assert manifest.kv_dtype == "int8"
    assert report["kv_bytes_per_token"] == m.num_hidden_layers * 2 * m.num_key_value_heads * m.head_dim * stored


def test_a_saved_reference_reproduces_the_direct_result_exactly(fp32, int4, text, direct, tmp_path):
    report, saved = direct
    again = measure(int4, text, reference=saved, threads=1)  # ctx and chunks from the file
    assert figures(again) == figures(report)
    # The reference engine run alone (no comparison) saves the same log-probs, bit for bit.
    alone = tmp_path / "alone.npz"
    own = measure(fp32, text, ctx=CTX, chunks=2, save_reference=alone, threads=1)
    assert own["reference_ppl"] == report["reference_ppl"] and "mean_kl" not in own
    a, b = load(alone), load(saved)
    assert np.array_equal(a.logprobs, b.logprobs) and np.array_equal(a.layout.token_ids, b.layout.token_ids)
    assert a.logprobs.shape == (report["scored_tokens"], load_manifest(fp32).model.vocab_size)


def test_decode_steps_score_the_positions_a_prefill_ending_there_does(fp32, text):
    """Row k of a chunk's log-probs must equal the logits of a fresh prefill that ends at position
    first + k: the same tokens, the same positions, the same cache contents. A decode step fed the
    wrong position (off by one) must fail this comparison."""
    backend = open_backend("ort", fp32, load_manifest(fp32), 1)
    ids = layout(text_tokens(fp32 / "tokenizer.json", text), CTX, 1).token_ids[0]
    score = 20
    first = CTX - 1 - score

    def prefilled(position: int) -> np.ndarray:
        cache = backend.new_cache(1, CTX)
        n = position + 1
        logits = backend.prefill(cache, DecoderChunk(
            input_ids=ids[None, :n], position_ids=np.broadcast_to(np.arange(n)[None, None], (3, 1, n)),
            past_lengths=np.zeros(1, dtype=np.int64), lengths=np.array([n])))
        return log_softmax(logits[0])

    expected = np.stack([prefilled(first + k) for k in range(score)])
    got = chunk_logprobs(backend, ids, score, prefill_chunk=7)  # a prefill of several pieces too
    np.testing.assert_allclose(got, expected, atol=2e-4)

    class OffByOne:  # decode told the position after the right one
        def __init__(self, backend):
            self.backend = backend

        def __getattr__(self, name):
            return getattr(self.backend, name)

        def decode(self, cache, tokens, positions, past_lengths):
            return self.backend.decode(cache, tokens, positions + 1, past_lengths)

    wrong = chunk_logprobs(OffByOne(backend), ids, score)
    assert np.abs(wrong[1:] - expected[1:]).max(axis=-1).min() > 1e-2  # every decoded row is off
    backend.close()


def test_a_mismatched_saved_reference_is_refused(fp32, int4, tiny_engine, text, direct, tmp_path):
    saved = direct[1]
    with pytest.raises(Qwen3VLError, match="--ctx 48, this run asks for 32"):
        measure(int4, text, reference=saved, ctx=32, threads=1)
    with pytest.raises(Qwen3VLError, match="--chunks 2, this run asks for 3"):
        measure(int4, text, reference=saved, chunks=3, threads=1)
    with pytest.raises(Qwen3VLError, match="--score-tokens 23, this run asks for 10"):
        measure(int4, text, reference=saved, score_tokens=10, threads=1)
    other_text = tmp_path / "other.txt"
    other_text.write_text(" ".join(reversed([FILLER[i % len(FILLER)] for i in range(40)])))
    with pytest.raises(Qwen3VLError, match="another text"):
        measure(int4, other_text, reference=saved, threads=1)
    other_model = tiny_engine("gqa6-untied")
    with pytest.raises(Qwen3VLError, match="another model than --engine"):
        measure(other_model, text, reference=saved, threads=1)
    with pytest.raises(Qwen3VLError, match="another model than --engine"):
        measure(other_model, text, reference=fp32, ctx=CTX, threads=1)
    not_a_reference = tmp_path / "junk.npz"
    np.savez(not_a_reference, x=np.zeros(3))
    with pytest.raises(Qwen3VLError, match="not a reference file saved by"):
        measure(int4, text, reference=not_a_reference, threads=1)
    # From the command line: one line, before any engine runs.
    assert_one_line_error(qwen3vl("bench", "--engine", int4, "--text", text, "--reference", saved, "--ctx", "32"),
                          "saved with --ctx 48")


def test_bad_text_and_layouts_are_refused(fp32, text, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(PromptError, match="empty"):
        measure(fp32, empty, threads=1)
    short = tmp_path / "short.txt"
    short.write_text(FILLER[0])
    with pytest.raises(PromptError, match="one chunk of --ctx 256 needs 256"):
        measure(fp32, short, threads=1)
    with pytest.raises(PromptError, match="no such file"):
        measure(fp32, tmp_path / "missing.txt", threads=1)
    with pytest.raises(PromptError, match="larger than the engine's context of 512"):
        measure(fp32, text, ctx=1024, threads=1)
    with pytest.raises(PromptError, match="--score-tokens"):
        measure(fp32, text, ctx=CTX, score_tokens=CTX, threads=1)
    with pytest.raises(PromptError, match="--chunks 99 of 48 tokens need"):
        measure(fp32, text, ctx=CTX, chunks=99, threads=1)


def test_cli_prints_one_json_line_with_progress_on_stderr(int4, text, direct):
    result = qwen3vl("bench", "--engine", int4, "--text", text, "--reference", direct[1], "--json", "--threads", 1)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    report = json.loads(lines[0])
    for key in ("mean_kl", "median_kl", "p99_kl", "max_kl", "top1_agreement", "reference_mean_entropy", "chunks",
                "scored_tokens", "ctx", "weight_bytes_per_token", "kv_bytes_per_token"):
        assert key in report, key
    assert figures(report) == {**figures(direct[0]), "threads": 1}
    assert "engine chunk 2/2" in result.stderr
