"""Static scales of an INT8 KV cache, calibrated at build time on the engine being built.

ONNX Runtime's GroupQueryAttention stores an INT8 cache with constant scales (graph inputs, not
computed per token), so the build measures the range the cache must hold: the just-written engine
(its FP32-cache ONNX Runtime graphs, after weight quantization) prefills a built-in calibration set,
a text paragraph and an image with a question, and the cache buffers are read back. Per layer, per
KV head and per dimension:
- values: the largest |v| seen, times MARGIN;
- keys: the cache holds them after rotary, which turns each pair of dimensions (d, d + head_dim/2)
  by a position-dependent angle. A short calibration prompt sees few angles of the slow pairs, so
  the bound is the pair's largest norm sqrt(k_d^2 + k_{d+half}^2), which holds at every position,
  times MARGIN.
A scale is bound / 127 (the kernel rounds x / scale half to even and saturates to [-128, 127]).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from runtime.engine_manifest import Manifest
from runtime.generate import encode_images, prefill
from runtime.graph_io import past_names
from runtime.ort_backend import OrtBackend
from runtime.pipeline import Pipeline

MARGIN = 1.2  # head room over the calibration's range: later text reaches a little further
QMAX = 127
FLOOR = 1e-6  # a channel that stayed zero still gets a positive scale

CALIBRATION_TEXT = (
    "The old lighthouse keeper kept a notebook of every ship that passed the point. In the spring of that "
    "year he wrote down forty-one sailing boats, six fishing trawlers and a single steamer that burned coal "
    "so black the gulls avoided its wake. He measured the tide twice a day, at six and at eighteen hours, and "
    "noted the wind in knots beside each reading. When the harbour master asked why he bothered, he answered "
    "that numbers are how a quiet place remembers itself. Later, a student from the city copied the notebook "
    "into a spreadsheet, plotted the tides against the phases of the moon, and found the keeper had been "
    "right about the storm of 1911: the water rose 2.4 metres above the mark, exactly as he had predicted in "
    "a margin note. Summarise the story in three sentences, then list the numbers it mentions."
)
IMAGE_QUESTION = "Describe the colours and shapes in this picture, and say where the brightest part is."
IMAGE_SIDE = 448


def calibration_image(side: int = IMAGE_SIDE) -> np.ndarray:
    """A deterministic RGB picture with smooth gradients, hard edges and texture."""
    y, x = np.mgrid[0:side, 0:side] / side
    rng = np.random.default_rng(1234)
    red = 255 * x
    green = 255 * (0.5 + 0.5 * np.sin(12 * np.pi * y))
    blue = 255 * ((x + y) > 1)
    picture = np.stack([red, green, blue], axis=-1) + rng.normal(0, 20, (side, side, 3))
    return np.clip(picture, 0, 255).astype(np.uint8)


def calibrate_kv_scales(engine_dir: Path, manifest: Manifest, progress: Callable[[str], None] = lambda m: None
                        ) -> dict[str, np.ndarray]:
    """past_key.i / past_value.i -> (kv_heads, head_dim) float32 dequantization scales, from the
    engine folder's ONNX Runtime graphs (whose cache must still be float)."""
    backend = OrtBackend(engine_dir, manifest)
    try:
        pipeline = Pipeline(engine_dir, manifest, backend)
        layers = manifest.model.num_hidden_layers
        names = past_names(layers)
        bounds = {name: np.zeros((manifest.model.num_key_value_heads, manifest.model.head_dim), np.float32)
                  for name in names}
        for prompt, images in ((CALIBRATION_TEXT, []), (IMAGE_QUESTION, [calibration_image()])):
            batch = pipeline.prepare([prompt], [images])
            cache = backend.new_cache(1, batch.longest)
            prefill(backend, cache, batch, encode_images(backend, batch), pipeline.prefill_chunk)
            for name, buffer in zip(names, cache.buffers):
                seen = buffer[0, :, : int(batch.lengths[0])].astype(np.float32)  # (kv_heads, tokens, head_dim)
                if name.startswith("past_key."):
                    half = seen.shape[-1] // 2
                    pair = np.sqrt(seen[..., :half] ** 2 + seen[..., half:] ** 2).max(axis=1)
                    bound = np.concatenate([pair, pair], axis=-1)
                else:
                    bound = np.abs(seen).max(axis=1)
                np.maximum(bounds[name], bound, out=bounds[name])
            progress(f"decoder: KV calibration on {int(batch.lengths[0])} tokens"
                     f"{' with an image' if images else ''}")
    finally:
        backend.close()
    return {name: np.maximum(bound * MARGIN / QMAX, FLOOR).astype(np.float32) for name, bound in bounds.items()}
