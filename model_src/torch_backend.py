"""The PyTorch model as a Backend: a checkpoint folder answers through the same Pipeline as an engine.

`checkpoint_pipeline(folder)` is `qwen3vl run --checkpoint`: the host logic (prompt, images,
positions, sampling, stopping) is the runtime's, so only the forward passes are PyTorch's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from runtime.backend import DecoderChunk, ImageFeatures, VisionBatch
from runtime.engine_manifest import Manifest
from runtime.pipeline import Pipeline

from .checkpoint_settings import generation_settings, image_processor_settings, model_facts
from .config import load_config
from .model import Qwen3VL


class TorchKVCache:
    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        self.keys, self.values = keys, values
        self.batch, self.capacity = keys[0].shape[0], keys[0].shape[2]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def row(self, r: int) -> "TorchKVCache":
        return TorchKVCache([k[r:r + 1] for k in self.keys], [v[r:r + 1] for v in self.values])

    def read_prefix(self, n: int) -> list[np.ndarray]:
        return [t[:, :, :n].numpy().copy() for t in self.keys + self.values]

    def write_prefix(self, arrays: list[np.ndarray]) -> None:
        for buffer, stored in zip(self.keys + self.values, arrays, strict=True):
            buffer[:, :, :stored.shape[2]].copy_(torch.from_numpy(stored))

    def move(self, start: int, stop: int, to: int) -> None:
        for t in self.keys + self.values:
            t[:, :, to:to + stop - start] = t[:, :, start:stop].clone()  # torch refuses overlapping copies


class TorchBackend:
    name = "pytorch-cpu"

    def __init__(self, model: Qwen3VL, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.model = model
        self.dtype = model.lm_head_weight().dtype
        self.decoder_dtype = np.dtype(str(self.dtype).removeprefix("torch."))

    @torch.no_grad()
    def encode_images(self, images: VisionBatch) -> ImageFeatures:
        embeds, deepstack = self.model.encode_images(torch.from_numpy(images.pixel_values).to(self.dtype),
                                                     images.grid_thw)
        return ImageFeatures(embeds.float().numpy(), deepstack.float().numpy())

    def new_cache(self, batch: int, capacity: int) -> TorchKVCache:
        return TorchKVCache(*self.model.new_cache(batch, capacity))

    def prefill(self, cache: TorchKVCache, chunk: DecoderChunk) -> np.ndarray:
        return self.logits(cache, chunk, chunk.logits_index[:, None])[:, 0]

    @torch.no_grad()
    def logits(self, cache: TorchKVCache, chunk: DecoderChunk, positions: np.ndarray | None = None) -> np.ndarray:
        """A prefill that returns the next-token logits at `positions` of each row ((B, P) column
        indexes into the chunk; default every column): (B, P, vocab) float32. The cache gets the
        chunk's keys as in `prefill`."""
        model, (b, s) = self.model, chunk.input_ids.shape
        input_ids = torch.from_numpy(np.ascontiguousarray(chunk.input_ids, dtype=np.int64))
        embeds = model.language_model.embed_tokens(input_ids)
        if chunk.visual_embeds is not None:
            is_image = (input_ids == model.config.image_token_id)[..., None]
            embeds = torch.where(is_image, torch.from_numpy(chunk.visual_embeds).to(embeds.dtype), embeds)
        deepstack = (embeds.new_zeros((model.config.num_deepstack, b, s, embeds.shape[-1]))
                     if chunk.deepstack_embeds is None else torch.from_numpy(chunk.deepstack_embeds).to(embeds.dtype))
        hidden, keys, values = model.language_model(
            embeds, torch.from_numpy(np.ascontiguousarray(chunk.position_ids, dtype=np.int64)),
            torch.from_numpy(chunk.seqlens_k), torch.tensor([chunk.total_sequence_length], dtype=torch.int32),
            cache.keys, cache.values, deepstack)
        for buffer, new in zip(cache.keys + cache.values, keys + values):
            buffer.copy_(new)  # the cache (or a row view of it) holds the new keys
        columns = torch.arange(s).expand(b, s) if positions is None else torch.from_numpy(
            np.ascontiguousarray(positions, dtype=np.int64))
        picked = hidden[torch.arange(b)[:, None], columns]
        return (picked @ model.lm_head_weight().T).float().numpy()

    def decode(self, cache: TorchKVCache, tokens: np.ndarray, positions: np.ndarray, past_lengths: np.ndarray
               ) -> np.ndarray:
        return self.prefill(cache, DecoderChunk.decode_step(tokens, positions, past_lengths))

    def close(self) -> None:
        self.model = None


def checkpoint_manifest(checkpoint_dir: str | Path, config=None) -> Manifest:
    """What an engine's manifest would say about this checkpoint (no graph files)."""
    folder = Path(checkpoint_dir)
    config = config or load_config(folder)
    return Manifest(
        model=model_facts(folder, config),
        image_processor=image_processor_settings(folder),
        backend="torch",
        precision=str(torch.get_default_dtype()).removeprefix("torch."),
        max_context=config.text.max_position_embeddings,
        files={"tokenizer": "tokenizer.json"},
        generation_defaults=generation_settings(folder).defaults,
    )


def checkpoint_pipeline(checkpoint_dir: str | Path, threads: int | None = None,
                        dtype: torch.dtype = torch.float32) -> Pipeline:
    folder = Path(checkpoint_dir)
    manifest = checkpoint_manifest(folder)
    manifest.precision = str(dtype).removeprefix("torch.")
    return Pipeline(folder, manifest, TorchBackend(Qwen3VL.from_checkpoint(folder, dtype), threads))
