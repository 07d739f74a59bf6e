"""TensorRT backend: the engine's TensorRT plans on one CUDA stream, behind `runtime.backend.Backend`.

- **Plans** come from `runtime.trt_plans`: loaded when their record matches this machine and engine,
  otherwise compiled here on first run (or refused with one line when `compile_missing=False`).
  TensorRT is imported lazily; nothing here needs torch.
- **One KV slab.** All layers' key and value buffers (B, kv_heads, capacity, head_dim) live in one
  device allocation, buffer after buffer; a buffer is bound as both `past_*` and `present_*`, so the
  attention plugin writes the new keys in place. `cache.row(r)` is a view: the same buffers offset
  by r rows, which are contiguous within each buffer. The plans are built with linear formats and
  direct I/O on those tensors so TensorRT puts no copy between the slab and the plugin.
- **Per-call inputs** go through pinned host buffers (in the dtype the plan declares: TensorRT 8.6
  takes int64 graph inputs as int32) into device buffers bound once.
- **Prefill** runs on the prefill profile; chunks longer than the plan's, or batched where the
  plugin needs rows one at a time, are split (`trt_plans.chunk_schedule`).
- **Decode** runs on the decode profile (one token per row) in its own execution context; after one
  plain step it is captured as a CUDA graph (copies in, `execute_async_v3`, logits out) and replayed
  with new values in the pinned inputs. Where capture fails the steps run uncaptured.
- **Vision** runs on the GPU (its own plan, sharing the decoder's activation memory) or on the CPU
  with ONNX Runtime (`vision.onnx`), as `vision_on_gpu` says.
"""

from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .backend import DecoderChunk, ImageFeatures, VisionBatch
from .cuda_runtime import CudaRuntime, DeviceBuffer, PinnedArray
from .engine_manifest import Manifest, ModelFacts
from .errors import ImageError, Qwen3VLError
from .graph_io import VISION_INPUTS, past_names, present_names
from .trt_plans import (DECODER_PROFILES, GraphIO, PlanSettings, TrtPlanError, chunk_schedule, ensure_plan,
                        open_tensorrt, profile_ranges, read_trt_io, recorded_settings)
from .vision_positions import VisionInputs, frame_layout

# The KV window (runtime/kv_window.py) moves keys inside the cache: not written for device memory yet.
KV_WINDOW_REFUSAL = ("--kv-window is not available on the TensorRT backend yet (its KV cache is in GPU memory): "
                     "use --backend ort")
# GPU memory left free beside a new KV cache: CUDA's own allocations, the decode graph, fragmentation.
KV_RESERVE_BYTES = 64 << 20
_NUMPY_OF_TRT = {"FLOAT": np.float32, "HALF": np.float16, "INT32": np.int32, "INT64": np.int64, "BOOL": np.bool_,
                 "INT8": np.int8, "UINT8": np.uint8}


# -- pure helpers -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class KVLayout:
    """Where each layer's key/value buffer and each row of it sit in the slab."""

    buffers: int  # 2 * layers: every layer's keys, then every layer's values (graph_io.past_names order)
    batch: int
    kv_heads: int
    capacity: int
    head_dim: int
    itemsize: int

    @property
    def row_bytes(self) -> int:
        return self.kv_heads * self.capacity * self.head_dim * self.itemsize

    @property
    def buffer_bytes(self) -> int:
        return self.batch * self.row_bytes

    @property
    def nbytes(self) -> int:
        return self.buffers * self.buffer_bytes

    def addresses(self, base: int, first_row: int = 0) -> list[int]:
        """The address of row `first_row` in every buffer."""
        return [base + i * self.buffer_bytes + first_row * self.row_bytes for i in range(self.buffers)]


def kv_bytes_per_token(facts: ModelFacts, itemsize: int) -> int:
    return 2 * facts.num_hidden_layers * facts.num_key_value_heads * facts.head_dim * itemsize


def capacity_that_fits(free_bytes: int, batch: int, bytes_per_token: int, reserve: int = KV_RESERVE_BYTES) -> int:
    """The longest KV capacity (tokens per row) whose cache fits in `free_bytes` less `reserve`."""
    return max(0, (int(free_bytes) - int(reserve)) // max(1, batch * bytes_per_token))


def decoder_inputs(chunk: DecoderChunk) -> dict[str, np.ndarray | None]:
    """The decoder graph's per-call inputs for a chunk; None: zeros (no image tokens in it)."""
    b = chunk.batch
    return {
        "input_ids": chunk.input_ids,
        "visual_embeds": chunk.visual_embeds,
        "deepstack_embeds": chunk.deepstack_embeds,
        "position_ids": chunk.position_ids,
        "seqlens_k": chunk.seqlens_k,
        "total_sequence_length": np.asarray([chunk.total_sequence_length], dtype=np.int32),
        "logits_index": chunk.logits_index.reshape(b),
    }


def decoder_input_shapes(chunk: DecoderChunk, facts: ModelFacts) -> dict[str, tuple[int, ...]]:
    b, s = chunk.input_ids.shape
    return {"input_ids": (b, s), "visual_embeds": (b, s, facts.hidden_size),
            "deepstack_embeds": (facts.num_deepstack, b, s, facts.hidden_size), "position_ids": (3, b, s),
            "seqlens_k": (b,), "total_sequence_length": (1,), "logits_index": (b,)}


def piece_of(chunk: DecoderChunk, rows: slice, columns: slice) -> DecoderChunk:
    """Rows and columns of a chunk as a chunk of its own (cut to its longest row; `past_lengths` moved on)."""
    lengths = np.clip(np.asarray(chunk.lengths)[rows] - columns.start, 0, columns.stop - columns.start)
    width = int(lengths.max())
    cols = slice(columns.start, columns.start + width)
    cut = lambda a, axis: None if a is None else (a[rows, cols] if axis == 0 else a[:, rows, cols])  # noqa: E731
    return DecoderChunk(chunk.input_ids[rows, cols], chunk.position_ids[:, rows, cols],
                        np.asarray(chunk.past_lengths)[rows] + columns.start, lengths,
                        cut(chunk.visual_embeds, 0), cut(chunk.deepstack_embeds, 1))


def split_vision_batch(images: VisionBatch, max_patches: int, max_frames: int) -> list[VisionBatch]:
    """Consecutive images grouped into vision calls of at most `max_patches` patches and `max_frames`
    frames (the vision plan's profile); images are independent in the encoder, so the groups'
    outputs concatenate to the batch's. An image larger than the profile is refused."""
    grids = np.asarray(images.grid_thw, dtype=np.int64).reshape(-1, 3)
    patches = grids.prod(axis=1)
    too_big = np.flatnonzero((patches > max_patches) | (grids[:, 0] > max_frames))
    if too_big.size:
        i = int(too_big[0])
        raise ImageError(f"image {i + 1} makes {int(patches[i])} patches; the TensorRT vision plan takes at most "
                         f"{max_patches} per call: use a smaller --max-pixels, or run vision on the CPU")
    groups, first = [], 0
    for i in range(1, len(grids) + 1):
        if i == len(grids) or patches[first:i + 1].sum() > max_patches or grids[first:i + 1, 0].sum() > max_frames:
            groups.append((first, i))
            first = i
    if len(groups) == 1:
        return [images]
    starts = np.concatenate([[0], np.cumsum(patches)])
    out, host = [], images.host
    for a, b in groups:
        rows = slice(int(starts[a]), int(starts[b]))
        index, mask, slot = frame_layout(grids[a:b])
        out.append(VisionBatch(images.pixel_values[rows], grids[a:b], VisionInputs(
            host.pos_indices[rows], host.pos_weights[rows], host.rotary_cos[rows], host.rotary_sin[rows],
            index, mask, slot)))
    return out


def _numpy_dtype(trt_dtype) -> np.dtype:
    name = getattr(trt_dtype, "name", str(trt_dtype).rsplit(".", 1)[-1])
    if name not in _NUMPY_OF_TRT:
        raise TrtPlanError(f"a plan tensor of type {name}, which the runtime does not bind")
    return np.dtype(_NUMPY_OF_TRT[name])


# -- the KV cache -----------------------------------------------------------------------------------

class TrtKVCache:
    """Rows [first_row, first_row + batch) of a KV slab; `row(r)` is a view of one row (no copy)."""

    def __init__(self, slab: DeviceBuffer, layout: KVLayout, first_row: int = 0, batch: int | None = None,
                 stream: int = 0, dtype=None):
        self.slab, self.layout, self.first_row = slab, layout, first_row
        self.batch = layout.batch if batch is None else batch
        self.stream, self.dtype = stream, np.dtype(dtype or f"V{layout.itemsize}")  # copies for prefix reuse
        self.capacity = layout.capacity
        self.steps: _DecodeGroups | None = None  # the decode loop's bindings and CUDA graphs, made on first use

    @property
    def nbytes(self) -> int:
        return self.layout.buffers * self.batch * self.layout.row_bytes

    def addresses(self) -> list[int]:
        return self.layout.addresses(self.slab.ptr, self.first_row)

    def rows(self, start: int, stop: int) -> "TrtKVCache":
        if not 0 <= start < stop <= self.batch:
            raise IndexError(f"rows {start}:{stop} of a cache of {self.batch}")
        return TrtKVCache(self.slab, self.layout, self.first_row + start, stop - start, self.stream, self.dtype)

    def row(self, r: int) -> "TrtKVCache":
        return self.rows(r, r + 1)

    def read_prefix(self, n: int) -> list[np.ndarray]:
        """Token positions [0, n) of the first row, copied to the host (prefix reuse)."""
        arrays = [np.empty((1, self.layout.kv_heads, n, self.layout.head_dim), self.dtype)
                  for _ in range(self.layout.buffers)]
        self._copy_prefix(arrays, to_device=False)
        return arrays

    def write_prefix(self, arrays: list[np.ndarray]) -> None:
        self._copy_prefix([np.ascontiguousarray(a) for a in arrays], to_device=True)

    def _copy_prefix(self, arrays: list[np.ndarray], to_device: bool) -> None:
        """One copy per buffer and head: a head's first n tokens are contiguous in the slab."""
        layout, cuda = self.layout, self.slab.cuda
        head_bytes = layout.capacity * layout.head_dim * layout.itemsize
        for address, array in zip(self.addresses(), arrays, strict=True):
            nbytes = array.shape[2] * layout.head_dim * layout.itemsize
            for h in range(layout.kv_heads):
                host, device = array[0, h].ctypes.data, address + h * head_bytes
                if to_device:
                    cuda.copy_to_device(device, host, nbytes, self.stream)
                else:
                    cuda.copy_to_host(host, device, nbytes, self.stream)
        cuda.synchronize(self.stream)  # pageable host arrays: done before they are read or freed

    def move(self, start: int, stop: int, to: int) -> None:
        raise Qwen3VLError(KV_WINDOW_REFUSAL)

    def close(self) -> None:
        if self.steps is not None:
            self.steps.close()
            self.steps = None


# -- plans and their execution contexts ---------------------------------------------------------------

class _Staged:
    """One per-call input: a device buffer bound once and its pinned host staging buffer."""

    def __init__(self, cuda: CudaRuntime, shape: tuple[int, ...], dtype: np.dtype):
        self.dtype = dtype
        self.host = PinnedArray(cuda, shape, dtype)
        self.device = DeviceBuffer(cuda, self.host.nbytes)


class _Plan:
    """A deserialized plan: its engine, one execution context per optimization profile (all on one
    scratch allocation, given later), tensor dtypes, and the per-call inputs' buffers per context."""

    def __init__(self, backend: "TrtBackend", data: bytes, io: GraphIO, profile_names: tuple[str, ...]):
        trt = backend.trt
        self.io, self.backend, self.profile_names = io, backend, profile_names
        self.engine = backend.runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise TrtPlanError(f"TensorRT {backend.env.version} could not load the {io.role} plan; "
                               f"recompile it with `qwen3vl build --engine E --compile-only`")
        engine = self.engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        missing = [t.name for t in (*io.inputs, *io.outputs) if t.name not in names]
        if missing:
            raise TrtPlanError(f"the {io.role} plan has no tensor {missing[0]}; recompile it")
        self.dtypes = {name: _numpy_dtype(engine.get_tensor_dtype(name)) for name in names}
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        shape_io = [n for n in names if engine.is_shape_inference_io(n)]
        if shape_io:
            raise TrtPlanError(f"the {io.role} plan takes {shape_io[0]} as a shape tensor, which the runtime "
                               f"does not feed")
        self.scratch_bytes = int(getattr(engine, "device_memory_size_v2", None) or engine.device_memory_size)
        self.contexts = [self._context() for _ in profile_names]

    def _context(self):
        trt, engine = self.backend.trt, self.engine
        strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)
        if strategy is not None:  # 10+: the caller owns the activation memory
            context = engine.create_execution_context(strategy.USER_MANAGED)
        else:  # 8.6
            context = engine.create_execution_context_without_device_memory()
        if context is None:
            raise TrtPlanError(f"TensorRT could not create an execution context for the {self.io.role} plan")
        return context

    def attach(self, scratch: DeviceBuffer) -> None:
        """Gives every context the shared activation memory and selects its profile."""
        for index, context in enumerate(self.contexts):
            if hasattr(context, "set_device_memory"):  # 10.1+
                context.set_device_memory(scratch.ptr, scratch.nbytes)
            else:
                context.device_memory = scratch.ptr
            if not context.set_optimization_profile_async(index, self.backend.stream):
                raise TrtPlanError(f"could not select optimization profile {index} of the {self.io.role} plan")

    def profile_max(self, name: str, profile: int) -> tuple[int, ...]:
        return tuple(self.engine.get_tensor_profile_shape(name, profile)[2])

    def staged_inputs(self, profile: int, skip: tuple[str, ...] = ("past_",)) -> dict[str, _Staged]:
        cuda = self.backend.cuda
        return {name: _Staged(cuda, self.profile_max(name, profile), self.dtypes[name])
                for name in self.inputs if not name.startswith(skip)}

    def output_max_shapes(self, profile: int, fixed: dict[str, tuple[int, ...]] | None = None) -> dict[str, tuple]:
        """Every output's shape with every input at its profile maximum (or at `fixed`)."""
        context = self.contexts[profile]
        for name in self.inputs:
            set_shape(context, name, (fixed or {}).get(name, self.profile_max(name, profile)))
        shapes = {name: tuple(context.get_tensor_shape(name)) for name in self.outputs}
        bad = [name for name, shape in shapes.items() if any(d < 0 for d in shape)]
        if bad:
            raise TrtPlanError(f"the {self.io.role} plan cannot size its output {bad[0]}")
        return shapes

    def close(self) -> None:
        self.contexts = []
        self.engine = None


def set_shape(context, name: str, shape: tuple[int, ...]) -> None:
    if not context.set_input_shape(name, tuple(int(d) for d in shape)):
        raise TrtPlanError(f"TensorRT refused shape {tuple(shape)} for {name}: outside the plan's optimization profile")


def _stage(cuda: CudaRuntime, stream: int, staged: _Staged, value: np.ndarray | None, shape: tuple[int, ...]) -> None:
    nbytes = int(np.prod(shape, dtype=np.int64)) * staged.dtype.itemsize
    if value is None:
        cuda.memset(staged.device.ptr, 0, nbytes, stream)
        return
    host = staged.host.view(shape)
    np.copyto(host, np.broadcast_to(value, shape), casting="unsafe")  # int64 -> int32 for 8.6 plans
    cuda.copy_to_device(staged.device.ptr, staged.host.ptr, nbytes, stream)


class _CpuVision:
    """The vision encoder on ONNX Runtime CPU (vision.onnx): when the memory plan keeps it off the GPU."""

    def __init__(self, engine_dir: Path, manifest: Manifest, threads: int | None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or 0
        self.manifest = manifest
        self.session = ort.InferenceSession(str(engine_dir / manifest.files["vision"]), options,
                                            providers=["CPUExecutionProvider"])
        self.types = {i.name: i.type for i in self.session.get_inputs()}
        self.dtype = np.float16 if self.types["pixel_values"] == "tensor(float16)" else np.float32

    def encode_images(self, images: VisionBatch) -> ImageFeatures:
        from .ort_backend import ort_errors

        host = images.host
        values = (images.pixel_values, host.pos_indices, host.pos_weights, host.rotary_cos, host.rotary_sin,
                  host.frame_patch_index, host.frame_patch_mask, host.patch_frame_slot)
        floats = {"pixel_values", "pos_weights", "rotary_cos", "rotary_sin"}
        feeds = {name: (value.astype(self.dtype, copy=False) if name in floats else value)
                 for name, value in zip(VISION_INPUTS, values) if name in self.types}
        with ort_errors("the vision encoder"):
            image_embeds, deepstack = self.session.run(None, feeds)
        return ImageFeatures(image_embeds, deepstack)

    def close(self) -> None:
        self.session = None


# -- the backend ----------------------------------------------------------------------------------------

def _stderr(message: str) -> None:
    print(f"tensorrt: {message}", file=sys.stderr, flush=True)


class TrtBackend:
    """The engine's TensorRT plans (`decoder.trt.onnx`, and `vision.trt.onnx` when `vision_on_gpu`)."""

    kv_window_refusal = KV_WINDOW_REFUSAL  # Pipeline refuses a KV window up front with this

    def __init__(self, engine_dir: str | Path, manifest: Manifest, settings: PlanSettings | None = None,
                 plugins: str | Path | None = None, vision_on_gpu: bool = True, compile_missing: bool = True,
                 cuda_graphs: bool = True, threads: int | None = None, progress=_stderr,
                 cuda: CudaRuntime | None = None):
        folder = Path(engine_dir)
        # By default the settings the plans were compiled with, so that they are not stale.
        self.manifest, self.settings = manifest, settings or recorded_settings(folder) or PlanSettings()
        ios = read_trt_io(folder, manifest)
        roles = ("decoder", "vision") if vision_on_gpu else ("decoder",)
        env = open_tensorrt(plugins, tuple(sorted({p for r in roles for p in ios[r].plugins})), cuda)
        self.env, self.trt, self.cuda = env, env.trt, env.cuda
        self.name = f"tensorrt-{env.version}"
        self.cuda_graphs = cuda_graphs
        self._closed = False
        self.stream = self.cuda.stream_create()
        self._trt_logger = self.trt.Logger(self.trt.Logger.WARNING)
        self.runtime = self.trt.Runtime(self._trt_logger)
        plans = {role: ensure_plan(folder, manifest, env, ios[role], self.settings, compile_missing, progress)
                 for role in roles}

        m = manifest.model
        self.decoder = _Plan(self, plans.pop("decoder"), ios["decoder"], DECODER_PROFILES)
        self.vision = (_Plan(self, plans.pop("vision"), ios["vision"], ("vision",)) if vision_on_gpu
                       else _CpuVision(folder, manifest, threads))
        gpu_plans = [p for p in (self.decoder, self.vision) if isinstance(p, _Plan)]
        # One activation scratch for every context: they run one after another on one stream.
        self.scratch = DeviceBuffer(self.cuda, max(p.scratch_bytes for p in gpu_plans))
        for plan in gpu_plans:
            plan.attach(self.scratch)

        decoder_io = {t.name: t for t in ios["decoder"].inputs}
        self.decoder_dtype = np.dtype(decoder_io["visual_embeds"].dtype)
        self.past_names, self.present_names = past_names(m.num_hidden_layers), present_names(m.num_hidden_layers)
        self.kv_dtype = self.decoder.dtypes[self.past_names[0]]
        prefill = DECODER_PROFILES.index("prefill")
        self.prefill_batch, self.max_chunk = self.decoder.profile_max("input_ids", prefill)
        self.max_batch = self.decoder.profile_max("input_ids", DECODER_PROFILES.index("decode"))[0]
        self.max_capacity = self.decoder.profile_max(self.past_names[0], prefill)[2]
        self._prefill_inputs = self.decoder.staged_inputs(prefill)
        logits_shape = self.decoder.output_max_shapes(prefill)["logits"]
        self._prefill_logits_host = PinnedArray(self.cuda, logits_shape, self.decoder.dtypes["logits"])
        self._prefill_logits = DeviceBuffer(self.cuda, self._prefill_logits_host.nbytes)
        self._decode_owner = lambda: None  # the decode steps whose bindings the decode context holds
        if isinstance(self.vision, _Plan):
            ranges = profile_ranges("vision", self.settings, manifest.max_context)["vision"]
            self.vision_max_patches, self.vision_max_frames = ranges["patches"][2], ranges["frames"][2]
            self._vision_inputs = self.vision.staged_inputs(0, skip=())
            self._vision_outputs = {}
            for name, shape in self.vision.output_max_shapes(0).items():
                dtype = self.vision.dtypes[name]
                self._vision_outputs[name] = (DeviceBuffer(self.cuda, int(np.prod(shape)) * dtype.itemsize),
                                              PinnedArray(self.cuda, shape, dtype))

    # -- KV cache --------------------------------------------------------------------------------------

    def kv_layout(self, batch: int, capacity: int) -> KVLayout:
        m = self.manifest.model
        return KVLayout(2 * m.num_hidden_layers, batch, m.num_key_value_heads, capacity, m.head_dim,
                        self.kv_dtype.itemsize)

    def max_capacity_for(self, batch: int) -> int:
        """The longest KV capacity a new cache of `batch` rows can have now (plan limit and free memory)."""
        free, _ = self.cuda.mem_get_info()
        per_token = kv_bytes_per_token(self.manifest.model, self.kv_dtype.itemsize)
        return min(self.max_capacity, capacity_that_fits(free, batch, per_token))

    def new_cache(self, batch: int, capacity: int) -> TrtKVCache:
        if capacity > self.max_capacity:
            raise Qwen3VLError(f"a context of {capacity} tokens is more than the TensorRT plans' {self.max_capacity}")
        layout = self.kv_layout(batch, capacity)
        fits = self.max_capacity_for(batch)
        if capacity > fits:
            raise Qwen3VLError(f"a KV cache of {capacity} tokens x {batch} row(s) needs "
                               f"{layout.nbytes / 2**20:.0f} MiB of GPU memory; {fits} tokens fit now (use a "
                               f"shorter prompt or --max-new-tokens)")
        slab = DeviceBuffer(self.cuda, layout.nbytes)
        self.cuda.memset(slab.ptr, 0, layout.nbytes, self.stream)
        return TrtKVCache(slab, layout, stream=self.stream, dtype=self.kv_dtype)

    def _bind_cache(self, context, cache: TrtKVCache) -> None:
        m, b = self.manifest.model, cache.batch
        shape = (b, m.num_key_value_heads, cache.capacity, m.head_dim)
        for past, present, address in zip(self.past_names, self.present_names, cache.addresses()):
            set_shape(context, past, shape)
            context.set_tensor_address(past, address)
            context.set_tensor_address(present, address)  # the same memory: the plugin writes in place

    # -- prefill ---------------------------------------------------------------------------------------

    def prefill(self, cache: TrtKVCache, chunk: DecoderChunk) -> np.ndarray:
        logits = None
        lengths = np.asarray(chunk.lengths)
        for piece in chunk_schedule(chunk.past_lengths, lengths, self.max_chunk, self.prefill_batch):
            rows, columns = slice(piece.row_start, piece.row_stop), slice(piece.col_start, piece.col_stop)
            out = self._prefill_call(cache.rows(piece.row_start, piece.row_stop), piece_of(chunk, rows, columns))
            if logits is None:
                logits = np.zeros((chunk.batch, out.shape[1]), dtype=np.float32)
            ends = lengths[rows] <= piece.col_stop  # rows whose last token is in this piece
            logits[rows][ends] = out[ends]
        return logits

    def _prefill_call(self, cache: TrtKVCache, chunk: DecoderChunk) -> np.ndarray:
        context = self.decoder.contexts[DECODER_PROFILES.index("prefill")]
        shapes = decoder_input_shapes(chunk, self.manifest.model)
        for name, value in decoder_inputs(chunk).items():
            staged = self._prefill_inputs.get(name)
            if staged is None:
                continue  # an input the plan does not take
            set_shape(context, name, shapes[name])
            context.set_tensor_address(name, staged.device.ptr)
            _stage(self.cuda, self.stream, staged, value, shapes[name])
        self._bind_cache(context, cache)
        context.set_tensor_address("logits", self._prefill_logits.ptr)
        shape = tuple(context.get_tensor_shape("logits"))
        if not context.execute_async_v3(self.stream):
            raise TrtPlanError("TensorRT refused to run the decoder's prefill (see its log above)")
        host = self._prefill_logits_host.view(shape)
        self.cuda.copy_to_host(self._prefill_logits_host.ptr, self._prefill_logits.ptr, host.nbytes, self.stream)
        self.cuda.synchronize(self.stream)
        return host.astype(np.float32, copy=True)

    # -- decode ----------------------------------------------------------------------------------------

    def decode(self, cache: TrtKVCache, tokens: np.ndarray, positions: np.ndarray, past_lengths: np.ndarray
               ) -> np.ndarray:
        """One token per row; rows beyond the decode profile's batch go in groups of consecutive rows,
        each with its own bindings and CUDA graph over its rows of the slab."""
        if cache.steps is None:
            cache.steps = _DecodeGroups(self, cache)
        return cache.steps(tokens, positions, past_lengths)

    # -- vision ----------------------------------------------------------------------------------------

    def encode_images(self, images: VisionBatch) -> ImageFeatures:
        if isinstance(self.vision, _CpuVision):
            return self.vision.encode_images(images)
        parts = [self._vision_call(group)
                 for group in split_vision_batch(images, self.vision_max_patches, self.vision_max_frames)]
        if len(parts) == 1:
            return parts[0]
        return ImageFeatures(np.concatenate([p.image_embeds for p in parts]),
                             np.concatenate([p.deepstack_embeds for p in parts], axis=1))

    def _vision_call(self, images: VisionBatch) -> ImageFeatures:
        context, host = self.vision.contexts[0], images.host
        values = dict(zip(VISION_INPUTS, (images.pixel_values, host.pos_indices, host.pos_weights, host.rotary_cos,
                                          host.rotary_sin, host.frame_patch_index, host.frame_patch_mask,
                                          host.patch_frame_slot)))
        for name, staged in self._vision_inputs.items():
            value = np.asarray(values[name])
            set_shape(context, name, value.shape)
            context.set_tensor_address(name, staged.device.ptr)
            _stage(self.cuda, self.stream, staged, value, value.shape)
        for name, (device, _) in self._vision_outputs.items():
            context.set_tensor_address(name, device.ptr)
        if not context.execute_async_v3(self.stream):
            raise TrtPlanError("TensorRT refused to run the vision encoder (see its log above)")
        results = {}
        for name, (device, pinned) in self._vision_outputs.items():
            view = pinned.view(tuple(context.get_tensor_shape(name)))
            self.cuda.copy_to_host(pinned.ptr, device.ptr, view.nbytes, self.stream)
            results[name] = view
        self.cuda.synchronize(self.stream)
        return ImageFeatures(results["image_embeds"].copy(), results["deepstack_embeds"].copy())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.cuda.synchronize(self.stream)
        for plan in (self.decoder, self.vision):
            plan.close()
        self.cuda.stream_destroy(self.stream)


class _DecodeGroups:
    """A cache's decode steps, in groups of at most the decode profile's batch."""

    def __init__(self, backend: TrtBackend, cache: TrtKVCache):
        size = backend.max_batch
        self.groups = [(start, min(start + size, cache.batch)) for start in range(0, cache.batch, size)]
        self.steps = [_DecodeSteps(backend, cache.rows(a, b)) for a, b in self.groups]
        self.logits = None

    def __call__(self, tokens: np.ndarray, positions: np.ndarray, past_lengths: np.ndarray) -> np.ndarray:
        if len(self.steps) == 1:
            return self.steps[0](tokens, positions, past_lengths)
        parts = [steps(tokens[a:b], np.asarray(positions)[a:b], np.asarray(past_lengths)[a:b])
                 for steps, (a, b) in zip(self.steps, self.groups)]
        if self.logits is None:
            self.logits = np.empty((self.groups[-1][1], parts[0].shape[1]), dtype=np.float32)
        for part, (a, b) in zip(parts, self.groups):
            self.logits[a:b] = part
        return self.logits

    def close(self) -> None:
        for steps in self.steps:
            steps.close()


class _DecodeSteps:
    """The decode loop of one cache (or a group of its rows): one token per row on the decode profile's
    context, every input and output bound once, captured as a CUDA graph after the first step (copies
    in, execute_async_v3, logits out) and replayed with new values in the pinned inputs."""

    CHANGING = ("input_ids", "position_ids", "seqlens_k", "total_sequence_length")

    def __init__(self, backend: TrtBackend, cache: TrtKVCache):
        # A view of the cache's rows, not the cache: the cache owns these steps, and a cycle would
        # keep its slab on the GPU until the garbage collector ran.
        self.backend, self.cache = backend, cache.rows(0, cache.batch)
        profile = DECODER_PROFILES.index("decode")
        plan, cuda, m, b = backend.decoder, backend.cuda, backend.manifest.model, cache.batch
        self.context = plan.contexts[profile]
        self.shapes = {"input_ids": (b, 1), "visual_embeds": (b, 1, m.hidden_size),
                       "deepstack_embeds": (m.num_deepstack, b, 1, m.hidden_size), "position_ids": (3, b, 1),
                       "seqlens_k": (b,), "total_sequence_length": (1,), "logits_index": (b,)}
        self.inputs = {name: _Staged(cuda, self.shapes[name], plan.dtypes[name])
                       for name in plan.inputs if not name.startswith("past_")}
        for name, staged in self.inputs.items():  # zeros: no visual features, logits at column 0
            cuda.memset(staged.device.ptr, 0, staged.host.nbytes, backend.stream)
            staged.host.array[...] = 0
        logits_shape = plan.output_max_shapes(profile, {**self.shapes, **self._kv_shapes()})["logits"]
        self.logits_host = PinnedArray(cuda, logits_shape, plan.dtypes["logits"])
        self.logits_device = DeviceBuffer(cuda, self.logits_host.nbytes)
        self.graph: int | None = None
        self.steps = 0
        self.capture = backend.cuda_graphs
        self._bind()

    def _kv_shapes(self) -> dict[str, tuple[int, ...]]:
        m = self.backend.manifest.model
        shape = (self.cache.batch, m.num_key_value_heads, self.cache.capacity, m.head_dim)
        return {name: shape for name in self.backend.past_names}

    def _bind(self) -> None:
        context = self.context
        for name, staged in self.inputs.items():
            set_shape(context, name, self.shapes[name])
            context.set_tensor_address(name, staged.device.ptr)
        self.backend._bind_cache(context, self.cache)
        context.set_tensor_address("logits", self.logits_device.ptr)
        self.backend._decode_owner = weakref.ref(self)

    def _enqueue(self) -> bool:
        cuda, stream = self.backend.cuda, self.backend.stream
        for name in self.CHANGING:
            staged = self.inputs.get(name)
            if staged is not None:
                cuda.copy_to_device(staged.device.ptr, staged.host.ptr, staged.host.nbytes, stream)
        if not self.context.execute_async_v3(stream):
            return False
        cuda.copy_to_host(self.logits_host.ptr, self.logits_device.ptr, self.logits_host.nbytes, stream)
        return True

    def __call__(self, tokens: np.ndarray, positions: np.ndarray, past_lengths: np.ndarray) -> np.ndarray:
        backend, cuda, stream = self.backend, self.backend.cuda, self.backend.stream
        past_lengths = np.asarray(past_lengths)
        values = {"input_ids": np.asarray(tokens).reshape(-1, 1),
                  "position_ids": np.broadcast_to(np.asarray(positions).reshape(1, -1, 1), self.shapes["position_ids"]),
                  "seqlens_k": past_lengths,  # keys after this step (past + 1), minus one
                  "total_sequence_length": np.asarray([int(past_lengths.max()) + 1])}
        for name, value in values.items():
            if name in self.inputs:
                np.copyto(self.inputs[name].host.array, value, casting="unsafe")
        if self.graph is not None:
            cuda.graph_launch(self.graph, stream)
        else:
            if backend._decode_owner() is not self:
                self._bind()  # another group's or cache's steps used the context since
            if not self._enqueue():
                raise TrtPlanError("TensorRT refused to run a decode step (see its log above)")
            if self.capture:
                # Right after a plain step with these shapes and addresses (TensorRT's deferred set-up
                # done, as trtexec does before capturing), record the same step for the next ones.
                cuda.synchronize(stream)
                self._capture()
        cuda.synchronize(stream)
        self.steps += 1
        logits = self.logits_host.array
        return logits if logits.dtype == np.float32 else logits.astype(np.float32)

    def _capture(self) -> None:
        """Records (does not run) one step into a CUDA graph; where TensorRT or CUDA refuse, the steps
        keep running uncaptured."""
        cuda, stream = self.backend.cuda, self.backend.stream
        self.capture = False  # one try
        cuda.begin_capture(stream)
        try:
            ok = self._enqueue()  # TensorRT returns False when something in it cannot be captured
        finally:
            graph = cuda.end_capture(stream)
        if ok and graph is not None:
            self.graph = cuda.graph_instantiate(graph)
        elif graph is not None:
            cuda.graph_discard(graph)

    def close(self) -> None:
        if self.graph is not None:
            self.backend.cuda.graph_destroy(self.graph)
            self.graph = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass
