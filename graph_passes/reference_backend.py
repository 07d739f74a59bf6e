"""The TensorRT-target graphs (`vision.trt.onnx`, `decoder.trt.onnx`) as a Backend, run on the CPU
with the plugins' numpy references (plugin_reference.py).

Through the same Pipeline as ONNX Runtime, this proves the TensorRT graphs plus the runtime's host
logic (prompt, positions, visual token placement, KV bookkeeping, sampling) before any GPU sees
them. onnx.reference evaluates node by node in numpy: meant for test-sized engines.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator

from runtime.backend import ArrayKVCache, DecoderChunk, ImageFeatures, VisionBatch
from runtime.engine_manifest import EngineError, Manifest
from runtime.graph_io import VISION_INPUTS, past_names, present_names

from .plugin_reference import REFERENCE_OPS


class _Graph:
    def __init__(self, path: Path):
        if not path.is_file():
            raise EngineError(f"{path}: missing")
        model = onnx.load(str(path))  # with its external data: the evaluator holds the weights
        self.types = {i.name: onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
                      for i in model.graph.input}
        self.outputs = [o.name for o in model.graph.output]
        self.evaluator = ReferenceEvaluator(model, new_ops=list(REFERENCE_OPS))

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        typed = {name: np.ascontiguousarray(value, dtype=self.types[name]) for name, value in feeds.items()}
        return dict(zip(self.outputs, self.evaluator.run(None, typed), strict=True))


class ReferenceBackend:
    name = "trt-graphs-on-numpy-reference"

    def __init__(self, engine_dir: str | Path, manifest: Manifest):
        folder = Path(engine_dir)
        if "decoder_trt" not in manifest.files or "vision_trt" not in manifest.files:
            raise EngineError(f"{folder}: has no TensorRT-target graphs (build it with --backend trt)")
        self.manifest = manifest
        self.vision = _Graph(folder / manifest.files["vision_trt"])
        self.decoder = _Graph(folder / manifest.files["decoder_trt"])
        self.decoder_dtype = np.dtype(self.decoder.types["visual_embeds"])
        layers = manifest.model.num_hidden_layers
        self.past_names, self.present_names = past_names(layers), present_names(layers)

    def encode_images(self, images: VisionBatch) -> ImageFeatures:
        host = images.host
        values = (images.pixel_values, host.pos_indices, host.pos_weights, host.rotary_cos, host.rotary_sin,
                  host.frame_patch_index, host.frame_patch_mask, host.patch_frame_slot)
        out = self.vision.run({name: value for name, value in zip(VISION_INPUTS, values) if name in self.vision.types})
        return ImageFeatures(out["image_embeds"], out["deepstack_embeds"])

    def new_cache(self, batch: int, capacity: int) -> ArrayKVCache:
        m = self.manifest.model
        shape = (batch, m.num_key_value_heads, capacity, m.head_dim)
        dtype = self.decoder.types[self.past_names[0]]
        return ArrayKVCache([np.zeros(shape, dtype=dtype) for _ in range(2 * m.num_hidden_layers)])

    def prefill(self, cache: ArrayKVCache, chunk: DecoderChunk) -> np.ndarray:
        m, (b, s) = self.manifest.model, chunk.input_ids.shape
        feeds = {
            "input_ids": chunk.input_ids,
            "visual_embeds": (np.zeros((b, s, m.hidden_size)) if chunk.visual_embeds is None
                              else chunk.visual_embeds),
            "deepstack_embeds": (np.zeros((m.num_deepstack, b, s, m.hidden_size)) if chunk.deepstack_embeds is None
                                 else chunk.deepstack_embeds),
            "position_ids": chunk.position_ids,
            "seqlens_k": chunk.seqlens_k,
            "total_sequence_length": np.asarray([chunk.total_sequence_length]),
            "logits_index": chunk.logits_index,
            **dict(zip(self.past_names, cache.buffers)),
        }
        out = self.decoder.run(feeds)
        for buffer, name in zip(cache.buffers, self.present_names):
            buffer[...] = out[name]  # writes through a row view into the batch's cache
        return out["logits"].astype(np.float32, copy=False)

    def decode(self, cache: ArrayKVCache, tokens: np.ndarray, positions: np.ndarray, past_lengths: np.ndarray
               ) -> np.ndarray:
        return self.prefill(cache, DecoderChunk.decode_step(tokens, positions, past_lengths))

    def close(self) -> None:
        self.vision = self.decoder = None
