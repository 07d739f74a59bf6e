"""ONNX Runtime backend: runs the engine's two graphs on the CPU.

The KV cache is one buffer pair per layer, allocated once per generation and bound (IOBinding) as
both the past input and the present output of the fused attention nodes, which write new keys in
place: no step copies the cache.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .engine_manifest import EngineError, Manifest
from .errors import ImageError
from .graph_io import past_names, present_names
from .vision_positions import VisionInputs

_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class KVCache:
    """Per-layer key/value buffers (B, kv_heads, capacity, head_dim) and their OrtValues."""

    def __init__(self, batch: int, capacity: int, manifest: Manifest, dtype):
        import onnxruntime as ort

        m = manifest.model
        shape = (batch, m.num_key_value_heads, capacity, m.head_dim)
        self.batch, self.capacity = batch, capacity
        self.buffers = [np.zeros(shape, dtype=dtype) for _ in range(2 * m.num_hidden_layers)]
        self.values = [ort.OrtValue.ortvalue_from_numpy(b) for b in self.buffers]

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers)


class OrtBackend:
    name = "onnxruntime-cpu"

    def __init__(self, engine_dir: str | Path, manifest: Manifest, threads: int | None = None):
        import onnxruntime as ort

        self.manifest = manifest
        folder = Path(engine_dir)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or 0  # 0: one per physical core
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.vision = ort.InferenceSession(str(folder / manifest.files["vision"]), options,
                                               providers=["CPUExecutionProvider"])
            self.decoder = ort.InferenceSession(str(folder / manifest.files["decoder"]), options,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own exception types for unreadable models
            raise EngineError(f"{folder}: ONNX Runtime could not load the engine ({str(exc).splitlines()[0]})")
        self.vision_dtype = _NUMPY_TYPES[self.vision.get_inputs()[0].type]
        types = {i.name: i.type for i in self.decoder.get_inputs()}
        self.decoder_dtype = _NUMPY_TYPES[types["visual_embeds"]]
        layers = manifest.model.num_hidden_layers
        self._past, self._present = past_names(layers), present_names(layers)

    def encode_images(self, pixel_values: np.ndarray, host: VisionInputs) -> tuple[np.ndarray, np.ndarray]:
        check_vision_memory(host.frame_patch_index.shape, self.manifest.model.vision_num_heads, self.vision_dtype)
        feeds = {
            "pixel_values": pixel_values.astype(self.vision_dtype, copy=False),
            "pos_indices": host.pos_indices,
            "pos_weights": host.pos_weights.astype(self.vision_dtype, copy=False),
            "rotary_cos": host.rotary_cos,
            "rotary_sin": host.rotary_sin,
            "frame_patch_index": host.frame_patch_index,
            "frame_patch_mask": host.frame_patch_mask,
            "patch_frame_slot": host.patch_frame_slot,
        }
        image_embeds, deepstack = self.vision.run(None, feeds)
        return image_embeds, deepstack

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        return KVCache(batch, capacity, self.manifest, self.decoder_dtype)

    def decode(self, cache: KVCache, input_ids, visual_embeds, deepstack_embeds, position_ids, seqlens_k,
               total_sequence_length, logits_index) -> np.ndarray:
        """One decoder call (prefill or a decode step); returns float32 logits (B, vocab)."""
        binding = self.decoder.io_binding()
        feeds = {
            "input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
            "visual_embeds": np.ascontiguousarray(visual_embeds, dtype=self.decoder_dtype),
            "deepstack_embeds": np.ascontiguousarray(deepstack_embeds, dtype=self.decoder_dtype),
            "position_ids": np.ascontiguousarray(position_ids, dtype=np.int64),
            "seqlens_k": np.ascontiguousarray(seqlens_k, dtype=np.int32),
            "total_sequence_length": np.asarray([total_sequence_length], dtype=np.int32),
            "logits_index": np.ascontiguousarray(logits_index, dtype=np.int64),
        }
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        binding.bind_output("logits")  # first bound, so first in get_outputs()
        for past, present, value in zip(self._past, self._present, cache.values):
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
        self.decoder.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()

    def decode_steps(self, cache: KVCache) -> "DecodeSteps":
        """One-token steps over `cache`, bound once (see DecodeSteps)."""
        return DecodeSteps(self, cache)


class DecodeSteps:
    """The decode loop's decoder calls, one token per row, with every input and output bound once.

    Each step writes its token, positions and lengths into small arrays that the binding reads from
    (OrtValues over numpy memory, not copies), and the logits land in one preallocated array: a step
    costs the decoder's run and nothing else (rebinding ~60 tensors took ~1 ms per step on 2 cores).
    The returned logits array is overwritten by the next step.
    """

    def __init__(self, backend: OrtBackend, cache: KVCache):
        import onnxruntime as ort

        m, batch, dtype = backend.manifest.model, cache.batch, backend.decoder_dtype
        self._session = backend.decoder
        self.input_ids = np.zeros((batch, 1), dtype=np.int64)
        self.position_ids = np.zeros((3, batch, 1), dtype=np.int64)
        self.seqlens_k = np.zeros(batch, dtype=np.int32)
        self.total_sequence_length = np.zeros(1, dtype=np.int32)
        self.logits = np.zeros((batch, m.vocab_size), dtype=np.float32)
        arrays = {
            "input_ids": self.input_ids,
            "visual_embeds": np.zeros((batch, 1, m.hidden_size), dtype=dtype),
            "deepstack_embeds": np.zeros((m.num_deepstack, batch, 1, m.hidden_size), dtype=dtype),
            "position_ids": self.position_ids,
            "seqlens_k": self.seqlens_k,
            "total_sequence_length": self.total_sequence_length,
            "logits_index": np.zeros(batch, dtype=np.int64),
        }
        self._values = {name: ort.OrtValue.ortvalue_from_numpy(a) for name, a in arrays.items()}
        self._arrays = arrays  # the OrtValues point into these: keep them alive
        self._binding = binding = self._session.io_binding()
        for name, value in self._values.items():
            binding.bind_ortvalue_input(name, value)
        self._logits_value = ort.OrtValue.ortvalue_from_numpy(self.logits)
        binding.bind_ortvalue_output("logits", self._logits_value)
        for past, present, value in zip(backend._past, backend._present, cache.values):
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)

    def __call__(self, tokens: np.ndarray, positions: np.ndarray, seqlens_k: np.ndarray,
                 total_sequence_length: int) -> np.ndarray:
        """tokens (B,), positions (3, B) or broadcastable, seqlens_k (B,): float32 logits (B, vocab)."""
        self.input_ids[:, 0] = tokens
        self.position_ids[..., 0] = positions
        self.seqlens_k[:] = seqlens_k
        self.total_sequence_length[0] = total_sequence_length
        self._session.run_with_iobinding(self._binding)
        return self.logits


def available_memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_vision_memory(layout: tuple[int, int], heads: int, dtype) -> None:
    """Refuses, before running out of memory, a vision call whose attention would not fit.

    Attention is per frame over a padded (frames, longest frame) batch: scores and probabilities of
    (frames, heads, L, L).
    """
    frames, longest = layout
    needed = 2 * heads * frames * longest * longest * max(np.dtype(dtype).itemsize, 4)
    free = available_memory_bytes()
    if free is not None and needed > 0.8 * free:
        raise ImageError(
            f"the images make {frames} frame(s) of up to {longest} patches; the vision encoder would need about {needed / 2**30:.1f} GiB "
            f"but {free / 2**30:.1f} GiB is free: use a smaller --max-pixels or fewer images"
        )
