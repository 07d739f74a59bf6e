"""A bounded KV cache for long chats (`--kv-window W`): attention sinks plus the most recent W tokens.

Without a window a prompt that does not fit the engine's context is refused. With one, each row keeps
its **sinks** and its most recent tokens, and every query attends to the sinks plus at least W and
at most W + slack of the latest tokens (itself included).

Sinks are a prefix of the row's prompt: through the end of its system message (if the chat starts
with one) and through the last image's visual tokens (its <|vision_end|>), and at least the first
`MIN_SINKS` tokens, which soak up the attention mass the model puts on a sequence's start whatever
they say. Sinks longer than W are refused: memory would then be bounded by the images, not the window.

One row's cache is [sinks | recent tokens | free]. When the next chunk of S <= slack tokens does not
fit, the oldest recent tokens are evicted by moving the newest W down to just after the sinks
(`KVCache.move`): one move of W tokens per `slack` new tokens, so a decode step pays W/slack token
copies. Rotary is applied before keys enter the cache, so a moved key keeps the rotary of its
original position, and new tokens take the positions of a full run: a key's slot is not its position.
Memory per row: max sinks + W + slack slots, whatever the length of the conversation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .backend import Backend, ImageFeatures, KVCache
from .engine_manifest import ModelFacts
from .errors import PromptError
from .prepare import PreparedBatch
from .prompt import PromptBuilder

MIN_SINKS = 4  # leading tokens always kept (StreamingLLM's observation: a few initial tokens suffice)


@dataclass(frozen=True)
class KVWindow:
    window: int  # W: recent tokens every query sees at least
    slack: int  # tokens evicted at once beyond W; also the longest prompt chunk under a window
    vision_end_id: int  # <|vision_end|>: the last image's visual tokens end there
    system_prefix: tuple[int, ...] = ()  # the tokens a system message starts with (<|im_start|>system)
    im_end_id: int | None = None  # <|im_end|>: a message ends there

    @classmethod
    def for_engine(cls, window: int, prompts: PromptBuilder, model: ModelFacts, slack: int | None = None
                   ) -> "KVWindow":
        """W with the default slack: a quarter of W (16 to 512 tokens), a 25% memory margin that makes a
        decode step copy 4 tokens' keys on average."""
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise PromptError(f"--kv-window must be a positive number of tokens, got {window!r}")
        slack = slack if slack is not None else min(512, max(16, window // 4))
        if slack < 1:
            raise PromptError(f"the KV window's slack must be at least 1 token, got {slack}")
        tokenizer = prompts.tokenizer
        return cls(window, slack, model.vision_end_token_id,
                   tuple(tokenizer.encode("<|im_start|>system", add_special_tokens=False).ids),
                   tokenizer.token_to_id("<|im_end|>"))

    def sinks(self, batch: PreparedBatch) -> np.ndarray:
        return sink_lengths(batch.input_ids, batch.lengths, self.vision_end_id,
                            np.asarray(self.system_prefix, dtype=np.int64), self.im_end_id)

    def capacity(self, sinks: np.ndarray) -> int:
        return int(np.max(sinks)) + self.window + self.slack

    def fits(self, batch: PreparedBatch, max_new_tokens: int) -> bool:
        """Whether the whole conversation fits without evicting: then the window changes nothing."""
        return batch.longest + max_new_tokens <= self.capacity(self.sinks(batch))

    def check_sinks(self, sinks: np.ndarray) -> None:
        if int(np.max(sinks)) > self.window:
            raise PromptError(f"the conversation's attention sinks (system prompt and everything through the last "
                              f"image) are {int(np.max(sinks))} tokens, more than the KV window of {self.window}: "
                              f"use a larger --kv-window, fewer or smaller images (--max-pixels)")


def sink_lengths(input_ids: np.ndarray, lengths: np.ndarray, vision_end_id: int,
                 system_prefix: np.ndarray | None = None, im_end_id: int | None = None) -> np.ndarray:
    """Sink tokens per row (see the module docstring): `system_prefix` is the token ids a system message
    starts with (<|im_start|>system), `im_end_id` the token that ends a message."""
    sinks = np.minimum(lengths, MIN_SINKS).astype(np.int64)
    for r, length in enumerate(lengths):
        ids = input_ids[r, :length]
        ends = np.flatnonzero(ids == vision_end_id)
        if len(ends):
            sinks[r] = max(sinks[r], int(ends[-1]) + 1)
        if system_prefix is not None and len(system_prefix) and im_end_id is not None \
                and len(ids) >= len(system_prefix) and np.array_equal(ids[:len(system_prefix)], system_prefix):
            closes = np.flatnonzero(ids == im_end_id)
            sinks[r] = max(sinks[r], int(closes[0]) + 1 if len(closes) else int(length))
    return sinks


class WindowedCache:
    """A backend's KV cache of `window.capacity(sinks)` slots per row and its bookkeeping: `slots`
    (B,) slots in use and `tokens` (B, capacity) which token of the conversation (0-based, prompt then
    answer) each slot holds, -1 when free."""

    def __init__(self, backend: Backend, batch: PreparedBatch, window: KVWindow):
        self.window, self.sinks = window, window.sinks(batch)
        window.check_sinks(self.sinks)
        self.capacity = window.capacity(self.sinks)
        self.cache: KVCache = backend.new_cache(batch.batch, self.capacity)
        self.slots = np.zeros(batch.batch, dtype=np.int64)
        self.tokens = np.full((batch.batch, self.capacity), -1, dtype=np.int64)
        self.evictions = 0  # moves made, over all rows

    def make_room(self, r: int, new: int) -> None:
        """Evicts row r's oldest non-sink tokens, if `new` more would not fit, keeping the newest W."""
        if self.slots[r] + new <= self.capacity:
            return
        if new > self.window.slack:
            raise ValueError(f"a chunk of {new} tokens under a KV window of slack {self.window.slack}")
        sinks, used, keep = int(self.sinks[r]), int(self.slots[r]), self.window.window
        self.cache.row(r).move(used - keep, used, sinks)
        self.tokens[r, sinks:sinks + keep] = self.tokens[r, used - keep:used].copy()
        self.tokens[r, sinks + keep:] = -1
        self.slots[r] = sinks + keep
        self.evictions += 1

    def _appended(self, r: int, first_token: int, count: int) -> None:
        used = int(self.slots[r])
        self.tokens[r, used:used + count] = np.arange(first_token, first_token + count)
        self.slots[r] = used + count

    def prefill(self, backend: Backend, batch: PreparedBatch, features: ImageFeatures | None) -> np.ndarray:
        """runtime.generate.prefill under the window: chunks of at most `slack` tokens, the first batched,
        the rest row by row with evictions between them; float32 logits (B, vocab) at each row's last token."""
        step = self.window.slack
        first = min(step, batch.longest)
        logits = backend.prefill(self.cache, batch.chunk(features, backend.decoder_dtype, 0, first)).copy()
        for r in range(batch.batch):
            self._appended(r, 0, min(first, int(batch.lengths[r])))
        for r in np.flatnonzero(batch.lengths > first):
            r = int(r)
            row_cache = self.cache.row(r)
            for start in range(first, int(batch.lengths[r]), step):
                chunk = batch.chunk(features, backend.decoder_dtype, start, start + step, rows=r)
                count = int(chunk.lengths[0])
                self.make_room(r, count)
                # Slots, not tokens, say where the chunk goes; its positions stay those of a full run.
                chunk = dataclasses.replace(chunk, past_lengths=self.slots[r:r + 1].copy())
                row_logits = backend.prefill(row_cache, chunk)
                self._appended(r, start, count)
            logits[r] = row_logits[0]
        return logits

    def decode(self, backend: Backend, tokens: np.ndarray, positions: np.ndarray, token_counts: np.ndarray
               ) -> np.ndarray:
        """One decode step (Backend.decode) after evicting the rows that are full; `token_counts` (B,)
        tokens of each row's conversation before this one (the new token's index)."""
        for r in range(len(tokens)):
            self.make_room(r, 1)
        logits = backend.decode(self.cache, tokens, positions, self.slots.copy())
        for r in range(len(tokens)):
            self._appended(r, int(token_counts[r]), 1)
        return logits
