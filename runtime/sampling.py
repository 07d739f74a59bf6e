"""Choosing the next token from fp32 logits: greedy, or temperature / top-k / top-p sampling."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import PromptError


@dataclass(frozen=True)
class SamplingConfig:
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no limit
    seed: int | None = None

    def __post_init__(self):
        def number(value) -> bool:
            return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
                and math.isfinite(value)

        def integer(value) -> bool:
            return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

        if not isinstance(self.do_sample, (bool, np.bool_)):
            raise PromptError(f"do_sample must be true or false, got {self.do_sample!r}")
        if not number(self.temperature) or self.temperature <= 0:
            raise PromptError(f"temperature must be a number > 0, got {self.temperature!r}")
        if not number(self.top_p) or not 0 < self.top_p <= 1:
            raise PromptError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if not integer(self.top_k) or self.top_k < 0:
            raise PromptError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if self.seed is not None and (not integer(self.seed) or self.seed < 0):
            raise PromptError(f"seed must be an integer >= 0, got {self.seed!r}")


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float32, copy=False)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def top_logprobs(logits: np.ndarray, k: int) -> list[list[dict]]:
    """Per row, the k most likely tokens as {"token_id", "logprob"}, most likely first."""
    logprobs = log_softmax(logits)
    if k < logprobs.shape[-1]:
        # The k largest without sorting the vocabulary (a full sort is ~75 ms a step for 152k logits),
        # then in order, ties by id as a stable sort would give.
        candidates = np.argpartition(-logprobs, k - 1, axis=-1)[:, :k]
        values = np.take_along_axis(logprobs, candidates, axis=-1)
        cut = values.min(axis=-1, keepdims=True)
        top = []
        for row, threshold in zip(logprobs, cut[:, 0]):
            ids = np.flatnonzero(row >= threshold)  # every token tied at the cut, in id order
            top.append(ids[np.argsort(-row[ids], kind="stable")][:k])
    else:
        top = np.argsort(-logprobs, axis=-1, kind="stable")[:, :k]
    return [[{"token_id": int(t), "logprob": float(row[t])} for t in ids] for row, ids in zip(logprobs, top)]


def next_tokens(logits: np.ndarray, config: SamplingConfig, rng: np.random.Generator) -> np.ndarray:
    """(B, vocab) logits -> (B,) token ids."""
    if not config.do_sample:
        return logits.argmax(axis=-1)
    scaled = logits.astype(np.float64) / config.temperature
    choices = []
    for row in scaled:
        if config.top_k and config.top_k < row.size:
            # The k largest without sorting the whole vocabulary (~10 ms a step for 152k logits), and
            # every token tied with the k-th: transformers' TopKLogitsWarper removes only smaller ones.
            kth_largest = np.partition(row, row.size - config.top_k)[row.size - config.top_k]
            candidates = np.flatnonzero(row >= kth_largest)
            order = candidates[np.lexsort((candidates, -row[candidates]))]  # by value, ties by id
        else:
            order = np.argsort(-row, kind="stable")
        probs = np.exp(row[order] - row[order[0]])
        probs /= probs.sum()
        if config.top_p < 1:
            # Keep the smallest prefix whose mass reaches top_p (always at least one token).
            keep = int(np.searchsorted(np.cumsum(probs), config.top_p) + 1)
            order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
        choices.append(order[rng.choice(len(order), p=probs)])
    return np.asarray(choices, dtype=np.int64)


def next_tokens_per_row(logits: np.ndarray, configs: list[SamplingConfig],
                        rngs: list[np.random.Generator]) -> np.ndarray:
    """(B, vocab) logits -> (B,) token ids, row r with its own settings and generator: a seeded row
    draws the same tokens alone or in any batch, and a greedy row takes its argmax as in `next_tokens`."""
    return np.asarray([next_tokens(logits[r:r + 1], config, rng)[0]
                       for r, (config, rng) in enumerate(zip(configs, rngs))], dtype=np.int64)
