"""A Backend that wraps a real one, for tests that need to see or steer each step's logits.

`Pipeline(engine_dir, manifest, backend)` takes any object with the Backend methods, so a test can
run the real engine and still record what generation saw, or make a row pick a chosen token (an
end-of-turn token, bytes of a split character) that a random tiny model would rarely pick itself.
"""

from __future__ import annotations

import numpy as np

from runtime import Pipeline


class StepBackend:
    """Delegates to `inner`. Step 0 is the prefill's logits, step n the n-th decode call's (one
    prefill call per request: no prefill_chunk). `forced[step][row] = token` lifts that token's
    logit in that row 20 above the row's largest, so greedy decoding picks it. `logprobs[step]` is
    the (B, vocab) float64 log-softmax of the logits generation got; `decode_calls` counts decodes."""

    def __init__(self, inner, forced: dict[int, dict[int, int]] | None = None):
        self.inner, self.forced = inner, forced or {}
        self.name, self.decoder_dtype = inner.name, inner.decoder_dtype
        self.logprobs: list[np.ndarray] = []

    @property
    def decode_calls(self) -> int:
        return max(0, len(self.logprobs) - 1)

    def encode_images(self, images):
        return self.inner.encode_images(images)

    def new_cache(self, batch, capacity):
        self.logprobs = []
        return self.inner.new_cache(batch, capacity)

    def prefill(self, cache, chunk):
        return self._step(self.inner.prefill(cache, chunk))

    def decode(self, cache, tokens, positions, past_lengths):
        return self._step(self.inner.decode(cache, tokens, positions, past_lengths))

    def close(self):
        self.inner.close()

    def _step(self, logits: np.ndarray) -> np.ndarray:
        logits = np.array(logits, dtype=np.float32, copy=True)
        for row, token in self.forced.get(len(self.logprobs), {}).items():
            logits[row, token] = logits[row].max() + 20
        shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
        self.logprobs.append(shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True)))
        return logits


def wrapped(pipe: Pipeline, forced: dict[int, dict[int, int]] | None = None) -> Pipeline:
    """`pipe`'s engine and backend, seen through a StepBackend (as `.backend`)."""
    return Pipeline(pipe.engine_dir, pipe.manifest, StepBackend(pipe.backend, forced))
