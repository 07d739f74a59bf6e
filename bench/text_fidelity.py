"""Text fidelity (`qwen3vl bench --text FILE`): how closely an engine's next-token distributions over
plain text follow a reference's, measured the way llama.cpp's `llama-perplexity --kl-divergence` does.

The text is tokenized as plain text (no chat template) and cut into chunks of `ctx` tokens. Each
chunk starts from an empty cache; its last `score_tokens` next-token predictions are scored (by
default the second half, as llama-perplexity does: the logits at positions ctx/2 .. ctx-2, each
predicting the token after it). Per scored position: KL(P_ref || P_engine) in nats, whether the two
agree on the most likely token, and the reference's entropy.

The decoder graph returns logits at one position per call, so a chunk goes in as the runtime feeds
a prompt and its answer: one prefill through the first scored position (its logits are that
position's), then one decode call per later position fed the text's own token (teacher forcing).

The reference runs first and its log-probabilities can be saved (`save`, like llama-perplexity's
`--kl-divergence-base`), so one slow full-precision run serves many comparisons and two large
engines never need to fit in memory together. The saved file records the token ids, the chunk
layout, the model facts and the tokenizer's hash, and `compare_engine` refuses an engine or a
layout that does not match it.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from runtime.backend import DecoderChunk
from runtime.errors import PromptError, Qwen3VLError

# llama-perplexity keeps the base log-probs in 16 bits over [max - 16, max] and sums its KL only
# over those above -16 nats; `llama_mean_kl` sums the same way, to show what that leaves out.
LLAMA_LOG_PROB_FLOOR = -16.0
FORMAT = "qwen3vl-text-reference"
FORMAT_VERSION = 1


def default_score_tokens(ctx: int) -> int:
    """llama-perplexity's window: the logits at positions ctx/2 .. ctx-2 (the last position has no
    next token in the chunk)."""
    return ctx - 1 - ctx // 2


@dataclass
class ChunkLayout:
    token_ids: np.ndarray  # (chunks, ctx) int64: chunk i is tokens [i*ctx, (i+1)*ctx) of the text
    score_tokens: int  # scored positions per chunk: the last score_tokens next-token predictions

    @property
    def ctx(self) -> int:
        return self.token_ids.shape[1]

    @property
    def chunks(self) -> int:
        return self.token_ids.shape[0]

    @property
    def first_scored(self) -> int:
        """Position (in a chunk) of the first scored logits; they predict the token after it."""
        return self.ctx - 1 - self.score_tokens

    def targets(self, chunk: int) -> np.ndarray:
        """The tokens the scored positions of `chunk` predict."""
        return self.token_ids[chunk, self.first_scored + 1:]


def layout(tokens: np.ndarray, ctx: int, chunks: int | None = None, score_tokens: int | None = None) -> ChunkLayout:
    """Whole chunks of `ctx` tokens from the start of `tokens`, up to `chunks` of them (all: None)."""
    if ctx < 2:
        raise PromptError(f"--ctx {ctx}: a chunk needs at least 2 tokens")
    score_tokens = default_score_tokens(ctx) if score_tokens is None else score_tokens
    if not 1 <= score_tokens <= ctx - 1:
        raise PromptError(f"--score-tokens {score_tokens}: between 1 and ctx - 1 = {ctx - 1} for --ctx {ctx}")
    if chunks is not None and chunks < 1:
        raise PromptError(f"--chunks {chunks}: must be >= 1")
    available = len(tokens) // ctx
    if available == 0:
        raise PromptError(f"the text is {len(tokens)} tokens; one chunk of --ctx {ctx} needs {ctx} "
                          f"(give a longer text or a smaller --ctx)")
    if chunks is not None and chunks > available:
        raise PromptError(f"--chunks {chunks} of {ctx} tokens need {chunks * ctx} tokens; the text is {len(tokens)}")
    n = available if chunks is None else chunks
    return ChunkLayout(np.asarray(tokens[: n * ctx], dtype=np.int64).reshape(n, ctx), score_tokens)


def text_tokens(tokenizer_file: str | Path, path: str | Path) -> np.ndarray:
    """The file's text as the engine's tokenizer reads plain text: no chat template, no added
    special tokens, special-token strings in the text kept as text (as the runtime reads a user's text)."""
    from tokenizers import Tokenizer

    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PromptError(f"--text {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptError(f"--text {path}: not a readable UTF-8 text file ({exc})") from None
    if not text.strip():
        raise PromptError(f"--text {path}: the file is empty")
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    tokenizer.encode_special_tokens = True
    return np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)


def engine_identity(engine_dir: str | Path, manifest) -> dict:
    """What two engines must share for their distributions to be comparable: the model facts
    (vocabulary size included) and the tokenizer file's hash."""
    tokenizer = Path(engine_dir) / manifest.files["tokenizer"]
    model = json.loads(json.dumps(asdict(manifest.model)))  # as saved: tuples become lists
    return {"model": model, "tokenizer_sha256": hashlib.sha256(tokenizer.read_bytes()).hexdigest()}


def check_same_model(reference: dict, engine: dict, what: str) -> None:
    if reference["tokenizer_sha256"] != engine["tokenizer_sha256"]:
        raise Qwen3VLError(f"{what} has another tokenizer than --engine (not the same checkpoint)")
    ref_model, eng_model = reference["model"], engine["model"]
    if ref_model != eng_model:
        differ = sorted(k for k in set(ref_model) | set(eng_model) if ref_model.get(k) != eng_model.get(k))
        raise Qwen3VLError(f"{what} is another model than --engine (they differ in {', '.join(differ)})")


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float32)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def chunk_logprobs(backend, token_ids: np.ndarray, score_tokens: int, prefill_chunk: int | None = 512,
                   clock: "DecodeClock | None" = None) -> np.ndarray:
    """(score_tokens, vocab) float32 next-token log-probabilities at the last `score_tokens`
    predicting positions of one chunk (positions ctx-1-score_tokens .. ctx-2), from an empty cache.

    Text-only input: every M-RoPE axis holds the token's index in the chunk. The prefill runs
    through the first scored position (in pieces of `prefill_chunk`, as the Pipeline prefills), then
    each later position is one decode call fed the chunk's own token at that position (timed by
    `clock` when given)."""
    ctx = len(token_ids)
    first = ctx - 1 - score_tokens
    cache = backend.new_cache(1, ctx)
    step = prefill_chunk or first + 1
    logits = None
    for start in range(0, first + 1, step):
        stop = min(first + 1, start + step)
        positions = np.arange(start, stop, dtype=np.int64)
        logits = backend.prefill(cache, DecoderChunk(
            input_ids=token_ids[None, start:stop],
            position_ids=np.broadcast_to(positions[None, None, :], (3, 1, stop - start)),
            past_lengths=np.array([start], dtype=np.int64),
            lengths=np.array([stop - start], dtype=np.int64)))
    out = np.empty((score_tokens, logits.shape[-1]), dtype=np.float32)
    out[0] = log_softmax(logits[0])
    for k in range(1, score_tokens):
        position = first + k  # the token at `position` goes in; its logits predict position + 1
        started = time.perf_counter()
        logits = backend.decode(cache, token_ids[position:position + 1], np.array([position], dtype=np.int64),
                                np.array([position], dtype=np.int64))
        if clock is not None:
            clock.add(time.perf_counter() - started)
        out[k] = log_softmax(logits[0])
    return out


@dataclass
class DecodeClock:
    """Time spent in decode calls: decode speed of the teacher-forced steps (one token per call,
    contexts ctx/2 .. ctx), measured in the same run as the fidelity."""

    seconds: float = 0.0
    steps: int = 0

    def add(self, seconds: float) -> None:
        self.seconds += seconds
        self.steps += 1

    @property
    def tokens_per_s(self) -> float:
        return self.steps / self.seconds if self.seconds > 0 else 0.0


@dataclass
class ReferenceLogprobs:
    """The reference side of a comparison, as saved with --save-reference."""

    logprobs: np.ndarray  # (chunks * score_tokens, vocab) float32, chunk-major
    layout: ChunkLayout
    identity: dict  # engine_identity() of the engine that produced them
    engine: str  # its folder, for the report
    precision: str

    def chunk(self, i: int) -> np.ndarray:
        n = self.layout.score_tokens
        return self.logprobs[i * n:(i + 1) * n]


def save(reference: ReferenceLogprobs, path: str | Path) -> None:
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "score_tokens": reference.layout.score_tokens,
            "identity": reference.identity, "engine": reference.engine, "precision": reference.precision}
    path = Path(path)
    # np.savez appends .npz to other names; write to the exact name asked for, whole or not at all.
    temporary = path.with_name(f".{path.name}.writing")
    with open(temporary, "wb") as f:
        np.savez(f, logprobs=reference.logprobs, token_ids=reference.layout.token_ids, meta=np.array(json.dumps(meta)))
    temporary.replace(path)


def load(path: str | Path) -> ReferenceLogprobs:
    try:
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(str(f["meta"]))
            if meta.get("format") != FORMAT:
                raise ValueError("not a saved text reference")
            if meta.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"format version {meta.get('format_version')}, this bench reads {FORMAT_VERSION}")
            token_ids, logprobs = f["token_ids"], f["logprobs"]
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise Qwen3VLError(f"--reference {path}: not a reference file saved by `bench --text --save-reference` "
                           f"({exc})") from None
    result = ReferenceLogprobs(logprobs, ChunkLayout(token_ids, int(meta["score_tokens"])), meta["identity"],
                               meta["engine"], meta["precision"])
    if logprobs.shape[0] != result.layout.chunks * result.layout.score_tokens:
        raise Qwen3VLError(f"--reference {path}: {logprobs.shape[0]} scored positions for "
                           f"{result.layout.chunks} chunks of {result.layout.score_tokens}: the file is damaged")
    return result


def check_layout(reference: ReferenceLogprobs, engine: ChunkLayout, path) -> None:
    ref = reference.layout
    for name, theirs, ours in (("--ctx", ref.ctx, engine.ctx), ("--chunks", ref.chunks, engine.chunks),
                               ("--score-tokens", ref.score_tokens, engine.score_tokens)):
        if theirs != ours:
            raise Qwen3VLError(f"--reference {path} was saved with {name} {theirs}, this run asks for {ours}")
    if not np.array_equal(ref.token_ids, engine.token_ids):
        raise Qwen3VLError(f"--reference {path} was saved for another text (its token ids differ from this --text)")


def progress(label: str, i: int, n: int, started: float) -> None:
    print(f"text fidelity: {label} chunk {i}/{n} ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)


def reference_logprobs(backend, chunks: ChunkLayout, identity: dict, engine: str, precision: str,
                       label: str = "reference", clock: DecodeClock | None = None) -> ReferenceLogprobs:
    """Runs `backend` over every chunk and keeps its scored log-probabilities."""
    out = np.empty((chunks.chunks * chunks.score_tokens, identity["model"]["vocab_size"]), dtype=np.float32)
    started = time.perf_counter()
    for i in range(chunks.chunks):
        progress(label, i + 1, chunks.chunks, started)
        n = chunks.score_tokens
        out[i * n:(i + 1) * n] = chunk_logprobs(backend, chunks.token_ids[i], n, clock=clock)
    return ReferenceLogprobs(out, chunks, identity, engine, precision)


@dataclass
class PositionScores:
    """Per scored position, over all chunks."""

    kl: np.ndarray  # KL(P_ref || P_engine), nats
    llama_kl: np.ndarray  # the same sum over the reference's log-probs above -16 only, as llama-perplexity sums it
    agree: np.ndarray  # bool: same most likely token
    reference_entropy: np.ndarray  # nats
    reference_nll: np.ndarray  # -log P_ref(the text's next token)
    engine_nll: np.ndarray

    @classmethod
    def of(cls, ref: np.ndarray, eng: np.ndarray, targets: np.ndarray) -> "PositionScores":
        rows = np.arange(len(targets))
        p = np.exp(ref, dtype=np.float64)
        # Summed in float64: over a 150k vocabulary fp32 rounding alone would be ~1e-6.
        terms = p * (ref.astype(np.float64) - eng)
        return cls(kl=terms.sum(-1), llama_kl=np.where(ref > LLAMA_LOG_PROB_FLOOR, terms, 0.0).sum(-1),
                   agree=ref.argmax(-1) == eng.argmax(-1),
                   reference_entropy=-(p * ref).sum(-1),
                   reference_nll=-ref[rows, targets].astype(np.float64),
                   engine_nll=-eng[rows, targets].astype(np.float64))

    @classmethod
    def concatenate(cls, parts: list["PositionScores"]) -> "PositionScores":
        return cls(*(np.concatenate([getattr(p, name) for p in parts]) for name in cls.__dataclass_fields__))

    def summary(self) -> dict:
        kl = self.kl
        return {
            "mean_kl": float(kl.mean()),
            "mean_kl_stderr": float(kl.std(ddof=1) / np.sqrt(len(kl))) if len(kl) > 1 else 0.0,
            "llama_mean_kl": float(self.llama_kl.mean()),
            "median_kl": float(np.median(kl)),
            "p99_kl": float(np.percentile(kl, 99)),
            "max_kl": float(kl.max()),
            "top1_agreement": float(self.agree.mean()),
            "reference_mean_entropy": float(self.reference_entropy.mean()),
            "reference_ppl": float(np.exp(self.reference_nll.mean())),
            "engine_ppl": float(np.exp(self.engine_nll.mean())),
            "scored_tokens": len(kl),
        }


def compare_engine(backend, reference: ReferenceLogprobs, clock: DecodeClock | None = None) -> PositionScores:
    """Runs `backend` over the reference's chunks, scoring each chunk as it comes (the engine's own
    log-probabilities are never all held at once)."""
    chunks, parts = reference.layout, []
    started = time.perf_counter()
    for i in range(chunks.chunks):
        progress("engine", i + 1, chunks.chunks, started)
        eng = chunk_logprobs(backend, chunks.token_ids[i], chunks.score_tokens, clock=clock)
        parts.append(PositionScores.of(reference.chunk(i), eng, chunks.targets(i)))
    return PositionScores.concatenate(parts)


def reference_summary(reference: ReferenceLogprobs) -> dict:
    """Figures of the reference alone (what a --save-reference run without a comparison reports)."""
    parts = []
    for i in range(reference.layout.chunks):
        ref = reference.chunk(i)
        parts.append(PositionScores.of(ref, ref, reference.layout.targets(i)))
    scores = PositionScores.concatenate(parts)
    return {"reference_mean_entropy": float(scores.reference_entropy.mean()),
            "reference_ppl": float(np.exp(scores.reference_nll.mean())), "scored_tokens": len(scores.kl)}


def measure(engine_dir: str | Path, text: str | Path, reference: str | Path | None = None, ctx: int | None = None,
            chunks: int | None = None, score_tokens: int | None = None, save_reference: str | Path | None = None,
            threads: int | None = None) -> dict:
    """`qwen3vl bench --text`: the figures of `engine_dir` against `reference` (an engine folder or
    a saved reference file), one dict. Without a reference, `engine_dir` itself is the reference and
    only its own figures are reported (with `save_reference`, to save it for later comparisons).

    One engine is loaded at a time: the reference runs first, is closed, then the engine runs."""
    import gc

    from runtime.backends import open_backend
    from runtime.engine_manifest import load_manifest

    from .bandwidth import decoder_weight_bytes

    manifest = load_manifest(engine_dir)
    identity = engine_identity(engine_dir, manifest)
    saved = None
    if reference is not None and not Path(reference).is_dir():
        if not Path(reference).is_file():
            raise Qwen3VLError(f"--reference {reference}: no such engine folder or saved reference file")
        saved = load(reference)
        check_same_model(saved.identity, identity, f"--reference {reference} (saved from {saved.engine})")
        # Unset layout options follow the saved reference; set ones must match it.
        ctx = saved.layout.ctx if ctx is None else ctx
        chunks = saved.layout.chunks if chunks is None else chunks
        score_tokens = saved.layout.score_tokens if score_tokens is None else score_tokens
    ctx = 256 if ctx is None else ctx
    if ctx > manifest.max_context:
        raise PromptError(f"--ctx {ctx} is larger than the engine's context of {manifest.max_context} tokens")
    if reference is not None and saved is None:
        ref_manifest = load_manifest(reference)
        check_same_model(engine_identity(reference, ref_manifest), identity, f"--reference {reference}")
        if ctx > ref_manifest.max_context:
            raise PromptError(f"--ctx {ctx} is larger than the reference's context of "
                              f"{ref_manifest.max_context} tokens")

    # One tokenizer for both sides (their hashes match): bad text fails before any engine loads.
    chunk_layout = layout(text_tokens(Path(engine_dir) / manifest.files["tokenizer"], text), ctx, chunks,
                          score_tokens)
    if saved is not None:
        check_layout(saved, chunk_layout, reference)

    started = time.perf_counter()
    report = {"mode": "text", "engine": str(engine_dir), "precision": manifest.precision,
              "reference": None if reference is None else str(reference)}
    if reference is not None and saved is None:
        ref_backend = open_backend("ort", reference, ref_manifest, threads)
        saved = reference_logprobs(ref_backend, chunk_layout, engine_identity(reference, ref_manifest),
                                   str(reference), ref_manifest.precision)
        ref_backend.close()
        del ref_backend
        gc.collect()  # its weights go before the engine's load
        if save_reference is not None:
            save(saved, save_reference)

    backend = open_backend("ort", engine_dir, manifest, threads)
    clock = DecodeClock()
    try:
        if reference is None:
            saved = reference_logprobs(backend, chunk_layout, identity, str(engine_dir), manifest.precision,
                                       label="engine", clock=clock)
            if save_reference is not None:
                save(saved, save_reference)
            report.update(reference_summary(saved))
        else:
            report["reference_precision"] = saved.precision
            report.update(compare_engine(backend, saved, clock).summary())
        report["kv_bytes_per_token"] = backend.new_cache(1, ctx).nbytes // ctx
        report["decode_tokens_per_s"] = round(clock.tokens_per_s, 3)
    finally:
        backend.close()
    report.update({"ctx": ctx, "chunks": chunk_layout.chunks, "score_tokens_per_chunk": chunk_layout.score_tokens,
                   "weight_bytes_per_token": decoder_weight_bytes(engine_dir, manifest),
                   "threads": threads, "seconds": round(time.perf_counter() - started, 1)})
    if save_reference is not None:
        report["saved_reference"] = str(save_reference)
    return report
