"""Prefix and image reuse between requests: the KV of recent conversations and the vision features of
recent images, kept under one memory budget, least recently used evicted first.

A follow-up question re-sends the whole conversation; its prompt starts with the tokens (and images)
of the previous turn, whose keys and values are already known. `PrefixCache` keeps, per finished
row, a host copy of the row's KV (prompt + generated tokens) with the row's `SequenceKey`; a new row
looks for the stored key with the longest common prefix, that prefix's KV is copied into the new
cache row, and only the rest of the prompt goes through the decoder.

Keys cover content, not only token ids: every image's placeholder tokens have the same id, so each
image span of a key carries a digest of the image's preprocessed pixels, its grid and the pixel
budget it was resized under; a prefix stops at the first image whose digest differs. Positions need
no key of their own: M-RoPE positions of a prefix depend only on the tokens and image grids in it,
and the tokens after a reused prefix get the positions `prepare` computed for the whole prompt.

Vision features are kept per image digest: an image seen before (same pixels and budget) skips the
vision encoder, and an image wholly inside a reused prefix needs no features at all.

Not thread-safe: the Pipeline touches it only under its lock, one request at a time.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from .backend import Backend, ImageFeatures, KVCache, VisionBatch
from .engine_manifest import ModelFacts
from .prepare import PreparedBatch
from .vision_positions import vision_inputs

DEFAULT_CACHE_MEMORY = 1 << 30
# A shorter common prefix is not worth a row-by-row prefill: every chat shares its first few
# template tokens ("<|im_start|>user\n"), which would turn batched prefills into row-by-row ones.
MIN_REUSED_TOKENS = 8


def default_cache_memory(available: int | None) -> int:
    """1 GiB (about 4,700 tokens of the 2B model's FP32 KV at 224 KiB per token: a few image
    conversations), or an eighth of the available memory where that is less."""
    return DEFAULT_CACHE_MEMORY if available is None else min(DEFAULT_CACHE_MEMORY, available // 8)


@dataclass(frozen=True)
class ImageSpan:
    start: int  # first placeholder token of the image in the row
    stop: int
    digest: bytes  # image_digest: pixels, grid and pixel budget


@dataclass(frozen=True)
class SequenceKey:
    """What decides a row's KV: its token ids and the content of the images among them."""

    tokens: np.ndarray  # (n,) int64
    images: tuple[ImageSpan, ...] = ()

    def __len__(self) -> int:
        return len(self.tokens)

    def common_prefix(self, other: "SequenceKey") -> int:
        """How many leading tokens of the two keys have the same KV: equal ids, and equal images for
        every image span that starts inside the prefix."""
        n = min(len(self.tokens), len(other.tokens))
        differ = np.flatnonzero(self.tokens[:n] != other.tokens[:n])
        n = int(differ[0]) if len(differ) else n
        theirs = {span.start: span.digest for span in other.images}
        for span in self.images:
            if span.start < n and theirs.get(span.start) != span.digest:
                n = span.start
        return n

    def extended(self, tokens: list[int]) -> "SequenceKey":
        return SequenceKey(np.concatenate([self.tokens, np.asarray(tokens, dtype=np.int64)]), self.images)


def image_digest(pixel_values: np.ndarray, grid_thw: np.ndarray, min_pixels: int, max_pixels: int) -> bytes:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(np.asarray([min_pixels, max_pixels, *grid_thw], dtype=np.int64).tobytes())
    digest.update(str(pixel_values.dtype).encode())
    digest.update(np.ascontiguousarray(pixel_values).data)
    return digest.digest()


@dataclass
class _KVEntry:
    key: SequenceKey
    arrays: list[np.ndarray]  # KVCache.read_prefix of one row: token axis 2
    nbytes: int


@dataclass
class _FeatureEntry:
    image_embeds: np.ndarray  # (tokens, hidden)
    deepstack_embeds: np.ndarray  # (num_deepstack, tokens, hidden)
    nbytes: int


@dataclass
class _Counts:
    hits: int = 0
    misses: int = 0
    cached_tokens: int = 0
    prompt_tokens: int = 0


@dataclass
class PrefixCache:
    """Stored KV prefixes and image features within `budget` bytes, oldest use evicted first."""

    budget: int
    nbytes: int = 0
    evictions: int = 0
    _entries: OrderedDict = field(default_factory=OrderedDict)  # ("kv", n) | ("image", digest) -> entry; LRU first
    _next_id: int = 0
    _counts: dict = field(default_factory=lambda: {"text": _Counts(), "image": _Counts(), "image_features": _Counts()})

    # -- KV prefixes ------------------------------------------------------------------------------

    def longest_prefix(self, key: SequenceKey, limit: int) -> tuple[_KVEntry | None, int]:
        """The stored entry sharing the longest prefix with `key` (counted up to `limit` tokens), and
        that prefix's length; (None, 0) below MIN_REUSED_TOKENS. The entry found counts as used."""
        best, best_n = None, 0
        for name, entry in self._entries.items():
            if name[0] == "kv":
                n = min(key.common_prefix(entry.key), limit)
                if n > best_n:
                    best, best_n = (name, entry), n
        if best is None or best_n < MIN_REUSED_TOKENS:
            return None, 0
        self._entries.move_to_end(best[0])
        return best[1], best_n

    def covers(self, key: SequenceKey) -> bool:
        """Whether `key` is stored already, whole or as the start of a longer sequence (that entry
        then counts as used)."""
        for name, entry in self._entries.items():
            if name[0] == "kv" and key.common_prefix(entry.key) == len(key):
                self._entries.move_to_end(name)
                return True
        return False

    def store_prefix(self, key: SequenceKey, arrays: list[np.ndarray]) -> None:
        """Keeps `arrays` (a row's KV for `key`); stored sequences that `key` continues are dropped."""
        nbytes = sum(a.nbytes for a in arrays)
        if nbytes > self.budget or self.covers(key):
            return
        for name, entry in list(self._entries.items()):
            if name[0] == "kv" and key.common_prefix(entry.key) == len(entry.key):
                self._remove(name)
        self._next_id += 1
        self._add(("kv", self._next_id), _KVEntry(key, arrays, nbytes))

    # -- image features ---------------------------------------------------------------------------

    def features(self, digest: bytes) -> _FeatureEntry | None:
        entry = self._entries.get(("image", digest))
        counts = self._counts["image_features"]
        if entry is None:
            counts.misses += 1
            return None
        counts.hits += 1
        self._entries.move_to_end(("image", digest))
        return entry

    def store_features(self, digest: bytes, image_embeds: np.ndarray, deepstack_embeds: np.ndarray) -> None:
        nbytes = image_embeds.nbytes + deepstack_embeds.nbytes
        if nbytes <= self.budget and ("image", digest) not in self._entries:  # copies: not views of a batch's
            self._add(("image", digest), _FeatureEntry(image_embeds.copy(), deepstack_embeds.copy(), nbytes))

    # -- bookkeeping ------------------------------------------------------------------------------

    def record(self, input_type: str, cached_tokens: int, prompt_tokens: int) -> None:
        """One row's lookup: input_type "text" (no images) or "image"."""
        counts = self._counts[input_type]
        counts.hits += cached_tokens > 0
        counts.misses += cached_tokens == 0
        counts.cached_tokens += cached_tokens
        counts.prompt_tokens += prompt_tokens

    def stats(self) -> dict:
        """Hit/miss counts by input type ("text", "image": prompt prefixes per row; "image_features":
        vision features per image), bytes held and the budget."""
        counts = {name: dict(vars(c)) for name, c in self._counts.items()}
        counts["image_features"] = {k: counts["image_features"][k] for k in ("hits", "misses")}
        return {**counts, "entries": len(self._entries), "bytes": self.nbytes, "budget": self.budget,
                "evictions": self.evictions}

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0

    def _add(self, name, entry) -> None:
        self._entries[name] = entry
        self.nbytes += entry.nbytes
        while self.nbytes > self.budget:
            self._remove(next(iter(self._entries)))
            self.evictions += 1

    def _remove(self, name) -> None:
        self.nbytes -= self._entries.pop(name).nbytes


def offers_kv_reuse(cache: KVCache) -> bool:
    return callable(getattr(cache, "read_prefix", None)) and callable(getattr(cache, "write_prefix", None))


class BatchReuse:
    """One batch's use of a PrefixCache: what each row reuses, the image features it still needs, and
    what it leaves behind (`keep`, after decoding).

    `store` is cleared when the rows' caches stop holding a full run's KV (a KV window that dropped
    tokens): such rows are then not kept for reuse.
    """

    def __init__(self, cache: PrefixCache, batch: PreparedBatch, model: ModelFacts, min_pixels: int, max_pixels: int):
        self.cache, self.batch, self.model = cache, batch, model
        self.store = True
        self.reused = np.zeros(batch.batch, dtype=np.int64)
        self._fed: list[list[int]] = [[] for _ in range(batch.batch)]
        self._pending = None
        vision = batch.vision
        self.image_rows: list[int] = []  # per image of the batch, in order: its row, first and last+1 column
        self.image_columns: list[tuple[int, int]] = []
        self.digests: list[bytes] = []
        spans: list[list[ImageSpan]] = [[] for _ in range(batch.batch)]
        if vision is not None:
            grids = vision.grid_thw
            patches = np.prod(grids, axis=1)
            tokens = patches // model.spatial_merge_size ** 2
            patch_offsets, token_offsets = np.concatenate([[0], np.cumsum(patches)]), np.concatenate([[0], np.cumsum(tokens)])
            # feature_index numbers image tokens row-major, so the flat positions are in image order.
            flat = np.flatnonzero(batch.feature_index.ravel() >= 0)
            for i, grid in enumerate(grids):
                digest = image_digest(vision.pixel_values[patch_offsets[i]:patch_offsets[i + 1]], grid,
                                      min_pixels, max_pixels)
                first, last = flat[token_offsets[i]], flat[token_offsets[i + 1] - 1]
                row, start = divmod(int(first), batch.longest)
                self.image_rows.append(row)
                self.image_columns.append((start, int(last) % batch.longest + 1))
                self.digests.append(digest)
                spans[row].append(ImageSpan(start, int(last) % batch.longest + 1, digest))
            self._patch_offsets, self._token_offsets = patch_offsets, token_offsets
        self.keys = [SequenceKey(batch.row(r).copy(), tuple(spans[r])) for r in range(batch.batch)]

    def restore(self, kv: KVCache) -> np.ndarray:
        """Copies each row's longest stored prefix (at least MIN_REUSED_TOKENS, at most all prompt
        tokens but the last, whose logits are needed) into `kv`; returns the tokens reused per row."""
        offered = offers_kv_reuse(kv)
        for r, key in enumerate(self.keys):
            entry, n = self.cache.longest_prefix(key, len(key) - 1) if offered else (None, 0)
            if entry is not None:
                kv.row(r).write_prefix([a[:, :, :n] for a in entry.arrays])
            self.reused[r] = n
            self.cache.record("image" if key.images else "text", n, len(key))
        return self.reused

    def image_features(self, backend: Backend) -> ImageFeatures | None:
        """Features of the images a prefill still reads (those not wholly inside a row's reused
        prefix): stored ones from the cache, the rest from the vision encoder (then stored)."""
        needed = [i for i, (row, (_, stop)) in enumerate(zip(self.image_rows, self.image_columns))
                  if stop > self.reused[row]]
        if not needed:
            return None
        found = {i: self.cache.features(self.digests[i]) for i in needed}
        missing = [i for i in needed if found[i] is None]
        if missing:
            encoded = backend.encode_images(self._vision_of(missing))
            offset = 0
            for i in missing:
                n = int(self._token_offsets[i + 1] - self._token_offsets[i])
                found[i] = _FeatureEntry(encoded.image_embeds[offset:offset + n],
                                         encoded.deepstack_embeds[:, offset:offset + n], 0)
                self.cache.store_features(self.digests[i], found[i].image_embeds, found[i].deepstack_embeds)
                offset += n
        sample = found[needed[0]]
        total = int(self._token_offsets[-1])
        image_embeds = np.zeros((total, sample.image_embeds.shape[-1]), dtype=sample.image_embeds.dtype)
        deepstack = np.zeros((sample.deepstack_embeds.shape[0], *image_embeds.shape), dtype=sample.deepstack_embeds.dtype)
        for i in needed:  # features of images no chunk reads stay zero
            span = slice(self._token_offsets[i], self._token_offsets[i + 1])
            image_embeds[span] = found[i].image_embeds
            deepstack[:, span] = found[i].deepstack_embeds
        return ImageFeatures(image_embeds, deepstack)

    def saw(self, step) -> None:
        """A decode step went out; the one before it has now been fed to the decoder (its keys are
        in the cache)."""
        if self._pending is not None:
            for r in np.flatnonzero(self._pending.active):
                self._fed[r].append(int(self._pending.tokens[r]))
        self._pending = step

    def keep(self, kv: KVCache) -> None:
        """Stores every row's KV: its prompt and the generated tokens that went through the decoder."""
        if not self.store or not offers_kv_reuse(kv):
            return
        bytes_per_token = kv.nbytes // (kv.batch * kv.capacity)
        for r, key in enumerate(self.keys):
            key = key.extended(self._fed[r])
            # Checked before copying: a row already stored, or too large to keep, costs no copy.
            if bytes_per_token * len(key) <= self.cache.budget and not self.cache.covers(key):
                self.cache.store_prefix(key, kv.row(r).read_prefix(len(key)))

    def _vision_of(self, images: list[int]) -> VisionBatch:
        vision = self.batch.vision
        if len(images) == len(vision.grid_thw):
            return vision
        m = self.model
        grids = vision.grid_thw[images]
        pixels = np.concatenate([vision.pixel_values[self._patch_offsets[i]:self._patch_offsets[i + 1]] for i in images])
        return VisionBatch(pixels, grids, vision_inputs(grids, m.num_position_embeddings, m.spatial_merge_size,
                                                        m.vision_head_dim, m.vision_rope_theta))
