"""Generation over any Backend, in a few short functions: prefill, decode_one_token, decode_n_tokens, generate.

The data is explicit: a PreparedBatch (host inputs), a KV cache the backend made, logits as numpy.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from .backend import Backend, ImageFeatures, KVCache
from .kv_window import KVWindow, WindowedCache
from .prepare import PreparedBatch
from .sampling import SamplingConfig, log_softmax, next_tokens, next_tokens_per_row, top_logprobs


@dataclass
class Step:
    """One decode step's outcome: a token for every row that was still running."""

    tokens: np.ndarray  # (B,) the sampled token of every row (meaningless for rows not in `active`)
    active: np.ndarray  # (B,) bool: rows that took this token
    finished: np.ndarray  # (B,) bool: rows that have now produced an end-of-turn token
    logprobs: list[list[dict]] | None  # per row, the top-k alternatives of this step
    token_logprobs: np.ndarray | None = None  # (B,) log-probability of each row's token (with logprobs)


@dataclass
class Timings:
    vision_ms: float = 0.0
    prefill_ms: float = 0.0
    ttft_ms: float = 0.0
    decode_tokens_per_s: float = 0.0
    _start: float = field(default_factory=time.perf_counter, repr=False)
    _decode_start: float | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return {key: getattr(self, key) for key in ("vision_ms", "prefill_ms", "ttft_ms", "decode_tokens_per_s")}


def encode_images(backend: Backend, batch: PreparedBatch) -> ImageFeatures | None:
    return backend.encode_images(batch.vision) if batch.vision is not None else None


def prefill(backend: Backend, cache: KVCache, batch: PreparedBatch, features: ImageFeatures | None,
            chunk_size: int | None = None) -> np.ndarray:
    """Writes every row's prompt into the cache; float32 logits (B, vocab) at each row's last token.

    With `chunk_size`, at most that many tokens go through the decoder per call (bounding attention
    scratch): the first chunk batched, the rest row by row (see runtime/backend.py)."""
    first = batch.longest if not chunk_size else min(chunk_size, batch.longest)
    logits = backend.prefill(cache, batch.chunk(features, backend.decoder_dtype, 0, first)).copy()
    for r in np.flatnonzero(batch.lengths > first):
        row_cache = cache.row(int(r))
        for start in range(first, int(batch.lengths[r]), chunk_size):
            chunk = batch.chunk(features, backend.decoder_dtype, start, start + chunk_size, rows=int(r))
            row_logits = backend.prefill(row_cache, chunk)
        logits[r] = row_logits[0]
    return logits


def decode_one_token(backend: Backend, cache: KVCache, batch: PreparedBatch, tokens: np.ndarray,
                     past_lengths: np.ndarray) -> np.ndarray:
    return backend.decode(cache, tokens, batch.decode_positions(past_lengths), past_lengths)


def decode_n_tokens(backend: Backend, cache: KVCache, batch: PreparedBatch, logits: np.ndarray, n: int,
                    sampling: SamplingConfig | list[SamplingConfig], eos_token_ids: tuple[int, ...],
                    logprobs: int = 0, rng: np.random.Generator | None = None,
                    window: WindowedCache | None = None) -> Iterator[Step]:
    """Up to n steps from the prefill's logits; stops early once every row has ended its turn.
    `sampling` is one config for every row, or a list: one config (and generator from its seed) per row.
    Under a KV `window`, the cache's slots are not the conversation's tokens (runtime/kv_window.py)."""
    per_row = isinstance(sampling, (list, tuple))
    if per_row:
        rngs = [np.random.default_rng(config.seed) for config in sampling]
    else:
        rng = rng if rng is not None else np.random.default_rng(sampling.seed)
    finished = np.zeros(batch.batch, dtype=bool)
    past_lengths = batch.lengths.copy()
    eos = np.asarray(eos_token_ids, dtype=np.int64)
    for step in range(n):
        tokens = next_tokens_per_row(logits, sampling, rngs) if per_row else next_tokens(logits, sampling, rng)
        active = ~finished
        top = top_logprobs(logits, logprobs) if logprobs else None
        chosen = log_softmax(logits)[np.arange(len(tokens)), tokens] if logprobs else None
        finished = finished | (active & np.isin(tokens, eos))
        yield Step(tokens, active, finished.copy(), top, chosen)
        if finished.all() or step == n - 1:
            return
        if window is None:
            logits = decode_one_token(backend, cache, batch, tokens, past_lengths)
        else:
            logits = window.decode(backend, tokens, batch.decode_positions(past_lengths), past_lengths)
        past_lengths = past_lengths + 1


def generate(backend: Backend, batch: PreparedBatch, max_new_tokens: int, sampling: SamplingConfig | list[SamplingConfig],
             eos_token_ids: tuple[int, ...], logprobs: int = 0, prefill_chunk: int | None = None,
             timings: Timings | None = None, kv_window: KVWindow | None = None) -> Iterator[Step]:
    """Vision, prefill and decoding of one batch; `timings` (if given) is filled in as it goes. With a
    `kv_window` that the conversation outgrows, the cache keeps its sinks and recent tokens only."""
    timings = timings if timings is not None else Timings()
    start = time.perf_counter()
    features = encode_images(backend, batch)
    timings.vision_ms = 1000 * (time.perf_counter() - start) if features is not None else 0.0
    window = (WindowedCache(backend, batch, kv_window) if kv_window is not None
              and not kv_window.fits(batch, max_new_tokens) else None)
    cache = window.cache if window is not None else backend.new_cache(batch.batch, batch.longest + max_new_tokens)
    start = time.perf_counter()
    logits = (window.prefill(backend, batch, features) if window is not None
              else prefill(backend, cache, batch, features, prefill_chunk))
    timings.prefill_ms = 1000 * (time.perf_counter() - start)
    del features
    for count, step in enumerate(decode_n_tokens(backend, cache, batch, logits, max_new_tokens, sampling,
                                                 eos_token_ids, logprobs, window=window)):
        now = time.perf_counter()
        if count == 0:
            timings.ttft_ms = 1000 * (now - timings._start)
            timings._decode_start = now
        else:
            timings.decode_tokens_per_s = count / max(now - timings._decode_start, 1e-9)
        yield step
