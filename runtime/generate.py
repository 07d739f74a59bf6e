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
from .prefix_cache import BatchReuse
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
    cached_tokens: list[int] = field(default_factory=list)  # per row: prompt tokens whose KV came from the prefix cache
    _start: float = field(default_factory=time.perf_counter, repr=False)
    _decode_start: float | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return {key: getattr(self, key) for key in ("vision_ms", "prefill_ms", "ttft_ms", "decode_tokens_per_s")}


def encode_images(backend: Backend, batch: PreparedBatch) -> ImageFeatures | None:
    return backend.encode_images(batch.vision) if batch.vision is not None else None


def prefill(backend: Backend, cache: KVCache, batch: PreparedBatch, features: ImageFeatures | None,
            chunk_size: int | None = None, reused: np.ndarray | None = None) -> np.ndarray:
    """Writes every row's prompt into the cache; float32 logits (B, vocab) at each row's last token.

    With `chunk_size`, at most that many tokens go through the decoder per call (bounding attention
    scratch): the first chunk batched, the rest row by row (see runtime/backend.py). Rows whose first
    `reused` tokens are already in the cache (a reused prefix) continue row by row after them."""
    chunk_size = chunk_size or batch.longest
    if reused is None or not reused.any():
        first = min(chunk_size, batch.longest)
        logits = backend.prefill(cache, batch.chunk(features, backend.decoder_dtype, 0, first)).copy()
        starts = np.full(batch.batch, first)
    else:  # a row continues a stored prefix: every row goes alone from its own start (< its length)
        logits, starts = None, reused
    for r in np.flatnonzero(batch.lengths > starts):
        row_cache = cache.row(int(r))
        # Chunks end where a cold run's do (multiples of chunk_size): the same shapes, the same sums.
        start, length = int(starts[r]), int(batch.lengths[r])
        bounds = [start, *range((start // chunk_size + 1) * chunk_size, length, chunk_size), length]
        for start, stop in zip(bounds, bounds[1:]):
            chunk = batch.chunk(features, backend.decoder_dtype, start, stop, rows=int(r))
            row_logits = backend.prefill(row_cache, chunk)
        if logits is None:
            logits = np.empty((batch.batch, row_logits.shape[-1]), dtype=np.float32)
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
             timings: Timings | None = None, kv_window: KVWindow | None = None,
             reuse: BatchReuse | None = None) -> Iterator[Step]:
    """Vision, prefill and decoding of one batch; `timings` (if given) is filled in as it goes. With a
    `kv_window` that the conversation outgrows, the cache keeps its sinks and recent tokens only.
    With `reuse`, rows start from their longest stored prefix and are stored when done
    (runtime/prefix_cache.py)."""
    timings = timings if timings is not None else Timings()
    window = (WindowedCache(backend, batch, kv_window) if kv_window is not None
              and not kv_window.fits(batch, max_new_tokens) else None)
    cache = window.cache if window is not None else backend.new_cache(batch.batch, batch.longest + max_new_tokens)
    if reuse is not None and window is not None:
        reuse.store = False  # a windowed cache neither takes nor leaves a full run's prefix
    reused = reuse.restore(cache) if reuse is not None and window is None else np.zeros(batch.batch, dtype=np.int64)
    timings.cached_tokens = reused.tolist()
    start = time.perf_counter()
    features = reuse.image_features(backend) if reuse is not None else encode_images(backend, batch)
    timings.vision_ms = 1000 * (time.perf_counter() - start) if features is not None else 0.0
    start = time.perf_counter()
    logits = (window.prefill(backend, batch, features) if window is not None
              else prefill(backend, cache, batch, features, prefill_chunk, reused))
    timings.prefill_ms = 1000 * (time.perf_counter() - start)
    del features
    done = False
    try:
        for count, step in enumerate(decode_n_tokens(backend, cache, batch, logits, max_new_tokens, sampling,
                                                     eos_token_ids, logprobs, window=window)):
            now = time.perf_counter()
            if count == 0:
                timings.ttft_ms = 1000 * (now - timings._start)
                timings._decode_start = now
            else:
                timings.decode_tokens_per_s = count / max(now - timings._decode_start, 1e-9)
            if reuse is not None:
                reuse.saw(step)
            yield step
        done = True
    except GeneratorExit:  # the caller stopped early (a stop string, a client gone): the cache is whole
        done = True
        raise
    finally:
        if reuse is not None and done:
            reuse.keep(cache)
