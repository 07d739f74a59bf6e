"""ONNX Runtime backend: runs the engine's two graphs (on the CPU unless given other providers).

The KV cache is one buffer pair per layer, allocated once per generation and bound (IOBinding) as
both the past input and the present output of the fused attention nodes, which write new keys in
place: no step copies the cache.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from .backend import ArrayKVCache, DecoderChunk, ImageFeatures, VisionBatch
from .engine_manifest import EngineError, Manifest
from .graph_io import past_names, present_names
from .memory_admission import OutOfMemoryError

_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int8)": np.int8}


class OrtKVCache(ArrayKVCache):
    """Per-layer key/value buffers (B, kv_heads, capacity, head_dim) and their OrtValues."""

    def __init__(self, buffers: list[np.ndarray]):
        import onnxruntime as ort

        super().__init__(buffers)
        self.values = [ort.OrtValue.ortvalue_from_numpy(b) for b in buffers]
        self.steps: DecodeSteps | None = None  # the decode loop's binding, made on first use


class OrtBackend:
    """The engine's ONNX Runtime graphs (vision.onnx, decoder.onnx) on the given execution providers."""

    def __init__(self, engine_dir: str | Path, manifest: Manifest, threads: int | None = None,
                 providers: list[str] | None = None, profile_prefix: str | None = None):
        """`profile_prefix`: ONNX Runtime's per-op profiling on, files `<prefix>vision_*.json` and
        `<prefix>decoder_*.json` (see `end_profiling`)."""
        import onnxruntime as ort

        providers = list(providers or ["CPUExecutionProvider"])
        missing = [p for p in providers if p not in ort.get_available_providers()]
        if missing:
            raise EngineError(f"ONNX Runtime {ort.__version__} has no {', '.join(missing)} here (available: "
                              f"{', '.join(ort.get_available_providers())}); onnxruntime-gpu brings "
                              f"CUDAExecutionProvider")
        self.manifest, self.providers = manifest, providers
        self.name = "onnxruntime-" + ("cpu" if providers == ["CPUExecutionProvider"] else
                                      providers[0].removesuffix("ExecutionProvider").lower())
        folder = Path(engine_dir)
        sessions = {}
        for role in ("vision", "decoder"):
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads or 0  # 0: one per physical core
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            if profile_prefix is not None:
                options.enable_profiling = True
                options.profile_file_prefix = f"{profile_prefix}{role}"
            try:
                sessions[role] = ort.InferenceSession(str(folder / manifest.files[role]), options, providers=providers)
            except Exception as exc:  # ORT raises its own exception types for unreadable models
                raise EngineError(f"{folder}: ONNX Runtime could not load the engine ({str(exc).splitlines()[0]})")
        self.vision, self.decoder = sessions["vision"], sessions["decoder"]
        self.vision_dtype = _NUMPY_TYPES[self.vision.get_inputs()[0].type]
        types = {i.name: i.type for i in self.decoder.get_inputs()}
        self.decoder_dtype = _NUMPY_TYPES[types["visual_embeds"]]
        layers = manifest.model.num_hidden_layers
        self.past_names, self.present_names = past_names(layers), present_names(layers)
        # The cache's storage type is the graph's (`qwen3vl build --kv-dtype`): fp32, fp16 or int8.
        self.kv_dtype = np.dtype(_NUMPY_TYPES[types[self.past_names[0]]])

    def end_profiling(self) -> dict[str, str]:
        """Ends profiling (backends made with `profile_prefix`): role -> profile file."""
        return {"vision": self.vision.end_profiling(), "decoder": self.decoder.end_profiling()}

    def encode_images(self, images: VisionBatch) -> ImageFeatures:
        host = images.host
        feeds = {
            "pixel_values": images.pixel_values.astype(self.vision_dtype, copy=False),
            "pos_indices": host.pos_indices,
            "pos_weights": host.pos_weights.astype(self.vision_dtype, copy=False),
            "rotary_cos": host.rotary_cos,
            "rotary_sin": host.rotary_sin,
            "frame_patch_index": host.frame_patch_index,
            "frame_patch_mask": host.frame_patch_mask,
            "patch_frame_slot": host.patch_frame_slot,
        }
        with ort_errors("the vision encoder"):
            image_embeds, deepstack = self.vision.run(None, feeds)
        return ImageFeatures(image_embeds, deepstack)

    def new_cache(self, batch: int, capacity: int) -> OrtKVCache:
        m = self.manifest.model
        shape = (batch, m.num_key_value_heads, capacity, m.head_dim)
        return OrtKVCache([np.zeros(shape, dtype=self.kv_dtype) for _ in range(2 * m.num_hidden_layers)])

    def prefill(self, cache: OrtKVCache, chunk: DecoderChunk) -> np.ndarray:
        m, (b, s) = self.manifest.model, chunk.input_ids.shape
        visual, deepstack = chunk.visual_embeds, chunk.deepstack_embeds
        feeds = {
            "input_ids": np.ascontiguousarray(chunk.input_ids, dtype=np.int64),
            "visual_embeds": (np.zeros((b, s, m.hidden_size), self.decoder_dtype) if visual is None
                              else np.ascontiguousarray(visual, dtype=self.decoder_dtype)),
            "deepstack_embeds": (np.zeros((m.num_deepstack, b, s, m.hidden_size), self.decoder_dtype)
                                 if deepstack is None else np.ascontiguousarray(deepstack, dtype=self.decoder_dtype)),
            "position_ids": np.ascontiguousarray(chunk.position_ids, dtype=np.int64),
            "seqlens_k": chunk.seqlens_k,
            "total_sequence_length": np.asarray([chunk.total_sequence_length], dtype=np.int32),
            "logits_index": chunk.logits_index,
        }
        binding = self.decoder.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        binding.bind_output("logits")  # first bound, so first in get_outputs()
        for past, present, value in zip(self.past_names, self.present_names, cache.values):
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
        with ort_errors("the decoder"):
            self.decoder.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()

    def decode(self, cache: OrtKVCache, tokens: np.ndarray, positions: np.ndarray, past_lengths: np.ndarray
               ) -> np.ndarray:
        if cache.steps is None:
            cache.steps = DecodeSteps(self, cache)
        return cache.steps(tokens, positions, past_lengths)

    def close(self) -> None:
        self.vision = self.decoder = None


class DecodeSteps:
    """The decode loop's decoder calls, one token per row, with every input and output bound once.

    Each step writes its token, positions and lengths into small arrays that the binding reads from
    (OrtValues over numpy memory, not copies), and the logits land in one preallocated array: a step
    costs the decoder's run and nothing else (rebinding ~60 tensors took ~1 ms per step on 2 cores).
    The returned logits array is overwritten by the next step.
    """

    def __init__(self, backend: OrtBackend, cache: OrtKVCache):
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
        for past, present, value in zip(backend.past_names, backend.present_names, cache.values):
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)

    def __call__(self, tokens: np.ndarray, positions: np.ndarray, past_lengths: np.ndarray) -> np.ndarray:
        """tokens (B,), positions (B,), past_lengths (B,): float32 logits (B, vocab)."""
        self.input_ids[:, 0] = tokens
        self.position_ids[..., 0] = positions
        self.seqlens_k[:] = past_lengths  # keys after this step (past + 1), minus one
        self.total_sequence_length[0] = int(np.max(past_lengths)) + 1
        with ort_errors("the decoder"):
            self._session.run_with_iobinding(self._binding)
        return self.logits


@contextlib.contextmanager
def ort_errors(what: str):
    """ONNX Runtime's failures as the project's one-line errors: allocation failures as out of
    memory, anything else as an engine error naming the graph."""
    try:
        yield
    except MemoryError:
        raise OutOfMemoryError(f"out of memory while running {what}: use a smaller --max-pixels, fewer images, "
                               f"fewer new tokens or a smaller batch") from None
    except Exception as exc:  # ORT raises its own pybind exception types
        if type(exc).__module__.split(".")[0] != "onnxruntime":
            raise
        message = " ".join(str(exc).split())
        if "alloc" in message.lower():
            raise OutOfMemoryError(f"out of memory while running {what} ({message[:200]}): use a smaller "
                                   f"--max-pixels, fewer images, fewer new tokens or a smaller batch") from None
        raise EngineError(f"ONNX Runtime failed while running {what}: {message[:300]}") from None
