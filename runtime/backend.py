"""The executor boundary: what `Pipeline` asks of whatever runs the engine's graphs.

A backend runs two things: the vision encoder over packed image patches, and the text decoder
over a KV cache it owns. Everything else (chat template, tokens, M-RoPE positions, where visual
tokens go, sampling, stopping, text) is host logic on the Pipeline side and is the same for every
backend. Backends: `runtime.ort_backend` (ONNX Runtime), `runtime.trt_backend` (TensorRT plans),
`graph_passes.reference_backend` (the TensorRT-target graphs on the CPU with the plugins' numpy
references) and `model_src.torch_backend` (the PyTorch model); `runtime.backends` picks among the
runtime's own by name (`auto`: the fastest present).

One decoder call is a chunk of S tokens per row (rows right-padded) appended to each row's cache.
ONNX Runtime's CPU attention continues a cache that already holds a past with more than one new
token only for one row at a time, so the host sends a batched chunk only as the first one (no
past) or for one-token decode steps, and continues longer prompts row by row over `cache.row(r)`
(backends may accept more; none may require less).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from .vision_positions import VisionInputs


@dataclass
class VisionBatch:
    """Packed patches of every image of a batch and their host-computed position inputs."""

    pixel_values: np.ndarray  # (N, C*T*P*P) float32
    grid_thw: np.ndarray  # (images, 3) int64
    host: VisionInputs


@dataclass
class ImageFeatures:
    image_embeds: np.ndarray  # (n, hidden): one row per visual token, images in order
    deepstack_embeds: np.ndarray  # (num_deepstack, n, hidden)


@dataclass
class DecoderChunk:
    """The decoder's inputs for one call: S new tokens per row, appended after `past_lengths`."""

    input_ids: np.ndarray  # (B, S) int64, rows right-padded
    position_ids: np.ndarray  # (3, B, S) int64
    past_lengths: np.ndarray  # (B,) tokens already in each row's cache
    lengths: np.ndarray  # (B,) valid tokens of this chunk per row (1..S); logits come from the last
    visual_embeds: np.ndarray | None = None  # (B, S, hidden), zero at text positions; None: text only
    deepstack_embeds: np.ndarray | None = None  # (num_deepstack, B, S, hidden); None: text only

    def __post_init__(self):
        # Attention places a chunk at (total_sequence_length - S): S must be the longest row's length.
        if self.input_ids.shape[1] != int(np.max(self.lengths)):
            raise ValueError(f"a chunk of {self.input_ids.shape[1]} columns for rows of at most "
                             f"{int(np.max(self.lengths))} tokens")

    @classmethod
    def decode_step(cls, tokens: np.ndarray, positions: np.ndarray, past_lengths: np.ndarray) -> "DecoderChunk":
        """One new token per row, at M-RoPE position `positions` (B,) on every axis: the arguments of
        `Backend.decode` as a chunk, for backends whose decode step is a one-token prefill."""
        b = len(tokens)
        return cls(input_ids=np.asarray(tokens, dtype=np.int64).reshape(b, 1),
                   position_ids=np.broadcast_to(np.asarray(positions, dtype=np.int64).reshape(1, b, 1), (3, b, 1)),
                   past_lengths=np.asarray(past_lengths), lengths=np.ones(b, dtype=np.int64))

    @property
    def batch(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seqlens_k(self) -> np.ndarray:
        """GroupQueryAttention's convention: valid keys per row after this call, minus one."""
        return (np.asarray(self.past_lengths) + np.asarray(self.lengths) - 1).astype(np.int32)

    @property
    def total_sequence_length(self) -> int:
        return int((np.asarray(self.past_lengths) + np.asarray(self.lengths)).max())

    @property
    def logits_index(self) -> np.ndarray:
        return (np.asarray(self.lengths) - 1).astype(np.int64)


@runtime_checkable
class KVCache(Protocol):
    batch: int
    capacity: int

    @property
    def nbytes(self) -> int: ...

    def row(self, r: int) -> "KVCache":
        """A one-row cache that shares row r's storage (writes through to this cache)."""

    # Optional (prefix reuse, runtime/prefix_cache.py; a cache without them is never reused):
    def read_prefix(self, n: int) -> list[np.ndarray]:
        """Host copies of token positions [0, n) of every buffer of a one-row cache, in the cache's
        own dtype (and any per-token scales), the token axis at 2."""

    def write_prefix(self, arrays: list[np.ndarray]) -> None:
        """Writes `read_prefix` arrays (possibly cut shorter on axis 2) into positions [0, n) of a
        one-row cache."""

    def move(self, start: int, stop: int, to: int) -> None:
        """Copies slots [start, stop) of every row, layer, key and value to [to, to + stop - start);
        the ranges may overlap (to < start). The KV window's eviction (runtime/kv_window.py)."""


class ArrayKVCache:
    """A KVCache in host memory: per-layer key/value numpy buffers (B, kv_heads, capacity, head_dim),
    keys of every layer, then values. `row` views share the storage."""

    def __init__(self, buffers: list[np.ndarray]):
        self.buffers = buffers
        self.batch, self.capacity = buffers[0].shape[0], buffers[0].shape[2]

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers)

    def row(self, r: int) -> "ArrayKVCache":
        return type(self)([b[r:r + 1] for b in self.buffers])  # views: a leading-axis slice stays contiguous

    def read_prefix(self, n: int) -> list[np.ndarray]:
        return [b[:, :, :n].copy() for b in self.buffers]

    def write_prefix(self, arrays: list[np.ndarray]) -> None:
        for buffer, stored in zip(self.buffers, arrays, strict=True):
            buffer[:, :, :stored.shape[2]] = stored

    def move(self, start: int, stop: int, to: int) -> None:
        for b in self.buffers:  # in place (bindings to this memory stay valid); numpy copies overlaps right
            b[:, :, to:to + stop - start] = b[:, :, start:stop]


@runtime_checkable
class Backend(Protocol):
    name: str  # e.g. "onnxruntime-cpu": shown to users and in timings
    decoder_dtype: np.dtype  # the dtype the decoder takes its visual/deepstack embeddings in
    # Optional: `kv_dtype`, the cache's stored type where it differs from decoder_dtype (`--kv-dtype`);
    # the Pipeline's memory admission counts KV bytes in it.

    def encode_images(self, images: VisionBatch) -> ImageFeatures: ...

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        """An empty cache for `batch` rows of up to `capacity` tokens each."""

    def prefill(self, cache: KVCache, chunk: DecoderChunk) -> np.ndarray:
        """Appends the chunk to the cache; float32 logits (B, vocab) at each row's last valid token."""

    def decode(self, cache: KVCache, tokens: np.ndarray, positions: np.ndarray, past_lengths: np.ndarray
               ) -> np.ndarray:
        """One new token per row (tokens (B,), M-RoPE position (B,) on every axis, past_lengths (B,)):
        float32 logits (B, vocab). The array may be reused by the next call."""

    def close(self) -> None: ...
