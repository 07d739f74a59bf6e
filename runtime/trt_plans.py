"""TensorRT plans of an engine folder: what they are built from, how, and when one may be loaded.

A plan (`trt/<role>.plan`) is compiled from a TensorRT-target graph (`decoder.trt.onnx`,
`vision.trt.onnx`) on the machine that runs it, because a plan holds kernels chosen for one GPU and
one TensorRT version. Beside it, `trt/<role>.plan.json` records the cache key and what went into it:
TensorRT version, GPU name / compute capability / SM count, the plugin library's hash, the graph's
and its weight files' hashes (from the manifest), the optimization profiles and the builder flags.
A plan whose record does not match this machine and engine, or whose bytes do not match the record,
is never loaded: it is rebuilt, or refused with one line saying what changed.

The graphs' inputs (names, dtypes, symbolic dims) come from `trt_io.json`, written at build time from
the ONNX graphs (export/trt_engine.py), so nothing here needs the onnx package. Everything that does
not need TensorRT or a GPU is a pure function: profiles, binding plan, builder flags, cache key,
chunk schedule. `compile_plan` is the builder, written against the TensorRT Python API of 8.6
(Pascal) and 10/11: name-based tensors, `build_serialized_network`, memory pools, timing cache.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .cuda_runtime import CudaError, CudaRuntime, GpuInfo
from .engine_manifest import EngineError, Manifest, sha256_file
from .errors import Qwen3VLError

PLAN_DIR = "trt"
TRT_IO = "trt_io.json"
TRT_IO_FORMAT = 1
KEY_FORMAT = 1  # bump when the plan record or what the key covers changes
ROLES = ("decoder", "vision")
GRAPH_FILES = {"decoder": "decoder_trt", "vision": "vision_trt"}  # role -> manifest.files key
PLUGIN_LIBRARY = "libqwen3vl_plugins.so"
PLUGIN_ENV = "QWEN3VL_TRT_PLUGINS"
DECODER_PROFILES = ("prefill", "decode")  # optimization profile 0 and 1 of the decoder plan
LINEAR_KV_PREFIXES = ("past_", "present_")


class TrtUnavailable(Qwen3VLError):
    """This machine cannot build or run TensorRT plans (no TensorRT, GPU, CUDA runtime or plugin library)."""


class TrtPlanError(EngineError):
    """A plan that is missing, stale, foreign or failed to build."""


# -- the graphs' inputs and outputs ------------------------------------------------------------------

@dataclass(frozen=True)
class GraphTensor:
    name: str
    dtype: str  # numpy name: float32, float16, int64, int32, bool
    dims: tuple  # ints for static dims, strings for symbolic ones


@dataclass(frozen=True)
class GraphIO:
    """One TensorRT-target graph: its file, the weight files it reads, its plugin op types, its I/O."""

    role: str
    file: str
    data_files: tuple[str, ...]
    plugins: tuple[str, ...]
    inputs: tuple[GraphTensor, ...]
    outputs: tuple[GraphTensor, ...]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "GraphIO":
        tensors = lambda items: tuple(GraphTensor(t["name"], t["dtype"], tuple(t["dims"])) for t in items)  # noqa: E731
        return cls(raw["role"], raw["file"], tuple(raw["data_files"]), tuple(raw["plugins"]),
                   tensors(raw["inputs"]), tensors(raw["outputs"]))


def write_trt_io(path: Path, graphs: list[GraphIO]) -> None:
    body = {"format": TRT_IO_FORMAT, "graphs": {g.role: g.to_dict() for g in graphs}}
    atomic_write(path, json.dumps(body, indent=1).encode())


def read_trt_io(engine_dir: str | Path, manifest: Manifest) -> dict[str, GraphIO]:
    folder = Path(engine_dir)
    name = manifest.files.get("trt_io")
    if name is None or not all(key in manifest.files for key in GRAPH_FILES.values()):
        raise TrtPlanError(f"{folder}: has no TensorRT graphs with their input list (build it with --backend trt)")
    try:
        raw = json.loads((folder / name).read_text())
        if raw.get("format") != TRT_IO_FORMAT:
            raise ValueError(f"format {raw.get('format')}")
        return {role: GraphIO.from_dict(graph) for role, graph in raw["graphs"].items()}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TrtPlanError(f"{folder / name}: unreadable ({exc}); rebuild the engine with --backend trt") from None


# -- optimization profiles and the binding plan -------------------------------------------------------

@dataclass(frozen=True)
class PlanSettings:
    """What the plans are built for: the optimization profiles' ranges and the builder's limits."""

    max_batch: int = 4  # rows per decode step (more rows decode in groups)
    prefill_batch: int = 1  # rows per prefill call: activations grow with rows x chunk; more go row by row
    prefill_chunk: int = 256  # tokens per prefill call; longer chunks are split by the backend
    max_capacity: int | None = None  # KV capacity per row; None: the engine's max_context
    opt_capacity: int = 2048
    vision_patches: int = 4096  # patches per vision call (a 1024x1024 image); more images are split
    vision_opt_patches: int = 1024
    vision_frames: int = 8
    fp16: bool | None = None  # the FP16 builder flag; None: only where FP16 math is fast, for fp16 graphs
    workspace: int = 256 << 20  # bytes TensorRT's tactics may use beside the activations


def _range(low: int, opt: int, high: int) -> tuple[int, int, int]:
    high = max(int(high), int(low))
    return int(low), min(max(int(opt), int(low)), high), high


def profile_ranges(role: str, settings: PlanSettings, max_context: int) -> dict[str, dict[str, tuple[int, int, int]]]:
    """Profile name -> symbolic dim -> (min, opt, max). The decoder has a prefill profile (up to
    `prefill_batch` rows of `prefill_chunk` tokens: TensorRT sizes the activation memory for that) and
    a decode profile (up to `max_batch` rows of one token: its kernels are chosen for S = 1, and its
    activations are small); both take KV capacity 1..max_capacity (the buffers the runtime allocates)."""
    capacity = _range(1, settings.opt_capacity, settings.max_capacity or max_context)
    if role == "decoder":
        chunk = _range(1, settings.prefill_chunk, settings.prefill_chunk)
        return {"prefill": {"batch": _range(1, 1, settings.prefill_batch), "sequence": chunk, "capacity": capacity},
                "decode": {"batch": _range(1, 1, settings.max_batch), "sequence": (1, 1, 1), "capacity": capacity}}
    if role == "vision":
        patches = _range(1, settings.vision_opt_patches, settings.vision_patches)
        return {"vision": {"patches": patches, "frames": _range(1, 1, settings.vision_frames),
                           "frame_length": patches}}
    raise ValueError(f"unknown plan role {role!r}")


def profile_shapes(inputs: tuple[GraphTensor, ...], ranges: dict[str, tuple[int, int, int]]
                   ) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """Input name -> (min, opt, max) shapes: static dims as they are, symbolic ones from `ranges`."""
    shapes = {}
    for tensor in inputs:
        unknown = [d for d in tensor.dims if isinstance(d, str) and d not in ranges]
        if unknown:
            raise TrtPlanError(f"graph input {tensor.name} has a dimension {unknown[0]!r} no profile sets")
        shapes[tensor.name] = tuple(tuple(ranges[d][i] if isinstance(d, str) else int(d) for d in tensor.dims)
                                    for i in range(3))
    return shapes


@dataclass(frozen=True)
class Binding:
    """How the runtime binds one I/O tensor of a plan."""

    name: str
    kind: str  # "input" (per call, staged through pinned host memory), "cache" (the KV slab), "output"
    dtype: str  # the graph's dtype (TensorRT 8.6 narrows int64 inputs to int32: the engine says)
    max_shape: tuple[int, ...]  # largest shape over the profiles; -1 where only the engine knows
    shares_with: str | None = None  # present_* -> the past_* whose address it is bound to


def binding_plan(io: GraphIO, profiles: dict[str, dict[str, tuple[int, int, int]]]) -> list[Binding]:
    """Every input and output of the graph, in graph order: per-call inputs, the KV cache (past and
    present bound to one address, so the plugin writes in place), and the other outputs."""
    largest = {}
    for ranges in profiles.values():
        for dim, (_, _, high) in ranges.items():
            largest[dim] = max(largest.get(dim, 0), high)
    max_of = lambda t: tuple(largest.get(d, -1) if isinstance(d, str) else int(d) for d in t.dims)  # noqa: E731
    inputs = {t.name: t for t in io.inputs}
    plan = [Binding(t.name, "cache" if t.name.startswith("past_") else "input", t.dtype, max_of(t)) for t in io.inputs]
    for t in io.outputs:
        if t.name.startswith("present_"):
            past = "past_" + t.name[len("present_"):]
            if past not in inputs:
                raise TrtPlanError(f"graph output {t.name} has no input {past} to share its buffer with")
            plan.append(Binding(t.name, "cache", t.dtype, max_of(inputs[past]), shares_with=past))
        else:
            plan.append(Binding(t.name, "output", t.dtype, max_of(t)))
    return plan


# -- chunk schedule -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Piece:
    """Rows [row_start, row_stop) of a chunk, its columns [col_start, col_stop): one decoder call."""

    row_start: int
    row_stop: int
    col_start: int
    col_stop: int


def chunk_schedule(past_lengths, lengths, max_tokens: int, max_batch: int) -> list[Piece]:
    """Splits a chunk (rows with `lengths` new tokens after `past_lengths`) into decoder calls of at
    most `max_tokens` columns and `max_batch` rows, in an order that keeps every row's tokens in order.

    The attention plugin places a call's S tokens at `valid - S` (valid = past + length) unless the
    call is a prompt (`total == S`): a call of several rows is right only when no row has a past or
    every row fills all S columns. A column window that allows it goes batched (in runs of
    consecutive rows, which share one cache view); otherwise row by row."""
    past, lengths = np.asarray(past_lengths, dtype=np.int64), np.asarray(lengths, dtype=np.int64)
    if max_tokens < 1 or max_batch < 1:
        raise ValueError("max_tokens and max_batch must be positive")
    pieces, longest = [], int(lengths.max())
    for start in range(0, longest, max_tokens):
        stop = min(start + max_tokens, longest)
        active = np.flatnonzero(lengths > start)
        batched = (start == 0 and not past.any()) or bool((lengths[active] >= stop).all())
        if not batched:
            pieces += [Piece(int(r), int(r) + 1, start, min(stop, int(lengths[r]))) for r in active]
            continue
        runs = np.split(active, np.flatnonzero(np.diff(active) != 1) + 1)
        for run in runs:
            for first in range(0, len(run), max_batch):
                rows = run[first:first + max_batch]
                pieces.append(Piece(int(rows[0]), int(rows[-1]) + 1, start, min(stop, int(lengths[rows].max()))))
    return pieces


# -- builder flags and compatibility --------------------------------------------------------------------

def trt_major_minor(version: str) -> tuple[int, int]:
    parts = (version.split(".") + ["0"])[:2]
    return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)


def check_compatibility(trt_version: str, gpu: GpuInfo) -> None:
    """TensorRT 10+ refuses Pascal ("Unsupported SM: 0x601"); the runtime is written for 8.6+."""
    major, minor = trt_major_minor(trt_version)
    if (major, minor) < (8, 6):
        raise TrtUnavailable(f"TensorRT {trt_version} is too old: the TensorRT backend needs 8.6 or newer")
    if major >= 10 and gpu.compute_capability < (7, 0):
        raise TrtUnavailable(f"SM {gpu.sm} ({gpu.name}) needs TensorRT 8.6, found {trt_version}")


@dataclass(frozen=True)
class BuildFlags:
    fp16: bool  # BuilderFlag.FP16: lets TensorRT pick FP16 kernels (weakly typed networks only)
    strongly_typed: bool  # NetworkDefinitionCreationFlag.STRONGLY_TYPED: the graph's types rule (10+)
    direct_io: bool  # BuilderFlag.DIRECT_IO: no reformat between a KV buffer and its plugin (8.6-10.x)
    workspace: int
    max_aux_streams: int = 0  # one stream: the decode step is captured as one CUDA graph
    kv_formats: str = "linear"


def build_flags(trt_version: str, gpu: GpuInfo, settings: PlanSettings, graph_precision: str,
                available: set[str]) -> BuildFlags:
    """`available`: the names the installed TensorRT defines (BuilderFlag / NetworkDefinitionCreationFlag).

    FP16 arithmetic on SM 6.x runs at 1/64 rate, so the FP16 flag is off there unless asked for; FP16
    is a storage type on Pascal. TensorRT 10+ builds strongly typed networks (11 has nothing else),
    where types come from the graph and the FP16 flag does not exist."""
    major, _ = trt_major_minor(trt_version)
    strongly_typed = major >= 10 and "STRONGLY_TYPED" in available
    if strongly_typed:
        if settings.fp16:
            raise TrtPlanError(f"TensorRT {trt_version} builds strongly typed networks: FP16 comes from an fp16 "
                               f"engine (--precision fp16), not from a builder flag")
        fp16 = False
    elif settings.fp16 is not None:
        fp16 = settings.fp16
    else:
        fp16 = graph_precision == "fp16" and gpu.compute_capability >= (7, 0)
    if fp16 and "FP16" not in available:
        raise TrtPlanError(f"TensorRT {trt_version} has no FP16 builder flag")
    return BuildFlags(fp16=fp16, strongly_typed=strongly_typed, direct_io="DIRECT_IO" in available,
                      workspace=int(settings.workspace))


# -- cache key ------------------------------------------------------------------------------------------

def plan_components(role: str, trt_version: str, gpu: GpuInfo, plugin_hash: str, manifest: Manifest, io: GraphIO,
                    profiles: dict, flags: BuildFlags) -> dict:
    """Everything a plan depends on; its sha256 is the cache key."""
    hashes = manifest.hashes
    missing = [name for name in (io.file, *io.data_files) if not hashes.get(name)]
    if missing:
        raise TrtPlanError(f"the manifest records no hash for {missing[0]}; rebuild the engine")
    return {
        "format": KEY_FORMAT,
        "role": role,
        "tensorrt": trt_version,
        "gpu": {"name": gpu.name, "compute_capability": gpu.sm, "sm_count": gpu.sm_count},
        "plugins": plugin_hash,
        "graph": {io.file: hashes[io.file]},
        "weights": {name: hashes[name] for name in io.data_files},
        "profiles": {name: {dim: list(r) for dim, r in sorted(ranges.items())} for name, ranges in profiles.items()},
        "flags": asdict(flags),
    }


def plan_key(components: dict) -> str:
    return hashlib.sha256(json.dumps(components, sort_keys=True).encode()).hexdigest()


_WHAT = {"tensorrt": "TensorRT version", "gpu": "GPU", "plugins": "plugin library", "graph": "graph",
         "weights": "weights", "profiles": "optimization profiles", "flags": "builder flags",
         "format": "plan record format", "role": "role"}


def describe_difference(recorded: dict, expected: dict) -> str:
    """What changed between a plan's record and this machine/engine, for one line."""
    parts = []
    for key, label in _WHAT.items():
        old, new = recorded.get(key), expected.get(key)
        if old == new:
            continue
        if key == "tensorrt":
            parts.append(f"built with TensorRT {old}, this is {new}")
        elif key == "gpu" and isinstance(old, dict) and isinstance(new, dict):
            parts.append(f"built for {old.get('name')} (SM {old.get('compute_capability')}, "
                         f"{old.get('sm_count')} SMs), this is {new['name']} (SM {new['compute_capability']}, "
                         f"{new['sm_count']} SMs)")
        else:
            parts.append(f"{label} changed")
    return "; ".join(parts) or "record differs"


# -- plan files -------------------------------------------------------------------------------------------

def atomic_write(path: Path, data: bytes) -> None:
    """Writes `path` whole or not at all: a temporary file in the same folder, fsynced, renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.writing")
    try:
        with open(temporary, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    try:  # the rename itself survives a crash once the folder is synced
        folder = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(folder)
    except OSError:
        pass
    finally:
        os.close(folder)


def plan_paths(engine_dir: str | Path, role: str) -> tuple[Path, Path]:
    folder = Path(engine_dir) / PLAN_DIR
    return folder / f"{role}.plan", folder / f"{role}.plan.json"


class StalePlan(Exception):
    """Internal: a plan that exists but must not be loaded (the message says why)."""


def read_plan(engine_dir: str | Path, role: str, components: dict) -> bytes | None:
    """The plan's bytes when its record matches `components` and its bytes match the record; None when
    there is no plan; StalePlan otherwise."""
    plan, record = plan_paths(engine_dir, role)
    if not record.is_file() and not plan.is_file():
        return None
    try:
        recorded = json.loads(record.read_text())
        data = plan.read_bytes()
    except (OSError, ValueError) as exc:
        raise StalePlan(f"its files are unreadable ({exc.__class__.__name__})") from None
    if not isinstance(recorded, dict) or recorded.get("key") != plan_key(components):
        raise StalePlan(describe_difference(recorded.get("components", {}) if isinstance(recorded, dict) else {},
                                            components))
    if len(data) != recorded.get("plan_bytes") or hashlib.sha256(data).hexdigest() != recorded.get("plan_sha256"):
        raise StalePlan("the plan file is incomplete or changed")
    return data


def write_plan(engine_dir: str | Path, role: str, data: bytes, components: dict,
               settings: PlanSettings | None = None) -> Path:
    """Plan first, record second: a crash between them leaves a record that does not match the plan's
    bytes, which `read_plan` refuses. The record keeps the settings, so a runtime given none uses the
    ones the plans were built with (`recorded_settings`)."""
    plan, record = plan_paths(engine_dir, role)
    atomic_write(plan, data)
    body = {"key": plan_key(components), "plan_bytes": len(data), "plan_sha256": hashlib.sha256(data).hexdigest(),
            "built": time.strftime("%Y-%m-%dT%H:%M:%S"), "components": components,
            "settings": asdict(settings) if settings is not None else None}
    atomic_write(record, json.dumps(body, indent=1).encode())
    return plan


def recorded_settings(engine_dir: str | Path, role: str = "decoder") -> PlanSettings | None:
    """The settings the engine's plan was compiled with, or None (no plan, or an unreadable record)."""
    try:
        raw = json.loads(plan_paths(engine_dir, role)[1].read_text())["settings"]
        return PlanSettings(**raw)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def timing_cache_path(engine_dir: str | Path, trt_version: str, gpu: GpuInfo) -> Path:
    """One timing cache per TensorRT version and GPU, beside the plans."""
    slug = "".join(c if c.isalnum() else "-" for c in gpu.name).strip("-").lower()
    major, minor = gpu.compute_capability
    return Path(engine_dir) / PLAN_DIR / f"timing-{trt_version}-{slug}-sm{major}{minor}.cache"


# -- TensorRT, the GPU and the plugin library ------------------------------------------------------------

@dataclass
class TrtEnvironment:
    trt: object  # the tensorrt module
    version: str
    cuda: CudaRuntime
    gpu: GpuInfo
    plugin_path: Path
    plugin_hash: str
    plugin_library: object = field(repr=False)

    @property
    def available(self) -> set[str]:
        """The builder flag / network flag names this TensorRT defines."""
        names = set()
        for enum in (getattr(self.trt, "BuilderFlag", None), getattr(self.trt, "NetworkDefinitionCreationFlag", None)):
            members = getattr(enum, "__members__", None)  # pybind11 and Python enums both have it
            names |= set(members) if members is not None else {n for n in dir(enum) if n.isupper()}
        return names


def find_plugin_library(explicit: str | Path | None = None) -> Path:
    """--plugins, else $QWEN3VL_TRT_PLUGINS, else build/plugins/ of the project or the current folder."""
    if explicit is not None:
        candidates = [Path(explicit)]
    elif os.environ.get(PLUGIN_ENV):
        candidates = [Path(os.environ[PLUGIN_ENV])]
    else:
        candidates = [Path(__file__).resolve().parents[1] / "build" / "plugins" / PLUGIN_LIBRARY,
                      Path.cwd() / "build" / "plugins" / PLUGIN_LIBRARY]
    for path in candidates:
        if path.is_file():
            return path
    where = candidates[0] if len(candidates) == 1 else candidates[0].parent
    raise TrtUnavailable(f"no plugin library ({where}): run `make plugins` (or give --plugins / ${PLUGIN_ENV})")


_LOADED: dict[str, object] = {}
# Kernel launches a library without code for this GPU fails with (cudaGetErrorName).
_WRONG_ARCHITECTURE = {"cudaErrorNoKernelImageForDevice", "cudaErrorInvalidDeviceFunction",
                       "cudaErrorUnsupportedPtxVersion", "cudaErrorInvalidKernelImage", "cudaErrorInvalidPtx"}


def _dlopen(path: str):
    return ctypes.CDLL(path, mode=getattr(os, "RTLD_GLOBAL", 0) | getattr(os, "RTLD_NOW", 0))


def load_plugin_library(path: Path, trt, cuda: CudaRuntime, gpu: GpuInfo, plugins: tuple[str, ...]) -> object:
    """Loads the plugin library (its creators register themselves; TensorRT must be imported first) and
    checks that it registered every plugin the graphs use and that its kernels run on this GPU: it
    exports the kernels' C API, so one tiny RMSNorm launch says whether the library has code for this
    architecture (CUDA reports no kernel image otherwise)."""
    key = str(Path(path).resolve())
    if key not in _LOADED:
        try:
            library = _dlopen(key)
        except OSError as exc:
            raise TrtUnavailable(f"the plugin library {path} does not load ({str(exc).splitlines()[0]}); "
                                 f"rebuild it with `make plugins` against this TensorRT") from None
        _probe_architecture(library, path, cuda, gpu)
        _LOADED[key] = library
    registry = trt.get_plugin_registry()
    lookup = getattr(registry, "get_creator", None) or registry.get_plugin_creator
    for name in plugins:
        if lookup(name, "1", "") is None:
            raise TrtUnavailable(f"the plugin library {path} registered no {name} plugin with TensorRT "
                                 f"{trt.__version__}: rebuild it with `make plugins` against this TensorRT")
    return _LOADED[key]


def _probe_architecture(library, path: Path, cuda: CudaRuntime, gpu: GpuInfo) -> None:
    probe = getattr(library, "qwen3vl_rmsnorm", None)
    if probe is None:
        return  # an older library without the kernels' C API: TensorRT will tell at the first launch
    n = 8
    buffers = [cuda.malloc(n * 4) for _ in range(3)]
    try:
        for ptr in buffers:
            cuda.memset(ptr, 0, n * 4, 0)
        cuda.synchronize(0)
        cuda.clear_error()  # the launch API returns cudaGetLastError(): only this launch's error may count
        probe.restype = ctypes.c_int
        code = probe(ctypes.c_void_p(buffers[0]), None, ctypes.c_void_p(buffers[1]), ctypes.c_void_p(buffers[2]),
                     None, ctypes.c_int64(1), ctypes.c_int32(n), ctypes.c_float(1e-6), 0, None)
        if code == 0:
            cuda.synchronize(0)
    finally:
        for ptr in buffers:
            cuda.free(ptr)
    if code != 0:
        name = cuda.error_name(code)
        if name in _WRONG_ARCHITECTURE:
            raise TrtUnavailable(f"the plugin library {path} has no kernels for this GPU ({gpu.name}, SM {gpu.sm}): "
                                 f"rebuild it here with `make plugins` (CMAKE_CUDA_ARCHITECTURES="
                                 f"{gpu.compute_capability[0]}{gpu.compute_capability[1]})")
        raise TrtUnavailable(f"the plugin library's kernels do not run here ({name})")


def open_tensorrt(plugins: str | Path | None = None, graph_plugins: tuple[str, ...] = (),
                  cuda: CudaRuntime | None = None) -> TrtEnvironment:
    """TensorRT, the CUDA runtime, the GPU and the plugin library, or TrtUnavailable with one line
    saying which is missing. The plugin library is loaded here, before any parse or deserialize."""
    try:
        import tensorrt as trt
    except ImportError:
        raise TrtUnavailable("TensorRT is not installed (pip install '.[tensorrt]'; Pascal GPUs need "
                             "TensorRT 8.6)") from None
    version = str(getattr(trt, "__version__", "0"))
    try:
        cuda = cuda or CudaRuntime.load()
        if cuda.device_count() < 1:
            raise TrtUnavailable("no CUDA GPU is visible")
        gpu = cuda.device_info(0)
    except CudaError as exc:
        raise TrtUnavailable(str(exc)) from None
    check_compatibility(version, gpu)
    path = find_plugin_library(plugins)
    library = load_plugin_library(path, trt, cuda, gpu, graph_plugins)
    return TrtEnvironment(trt, version, cuda, gpu, path, sha256_file(path), library)


# -- the builder -----------------------------------------------------------------------------------------

def _logger(trt):
    """A TensorRT logger that keeps errors (for a one-line message) and prints nothing."""

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, message):
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(str(message).strip().splitlines()[0] if str(message).strip() else "?")

    return Logger()


def compile_plan(env: TrtEnvironment, graph_path: Path, io: GraphIO, profiles: dict[str, dict],
                 flags: BuildFlags, timing_cache: Path | None = None) -> bytes:
    """Parses the graph and builds a serialized plan: one optimization profile per entry of `profiles`
    (in order), linear formats on the KV cache I/O, direct I/O and one stream where this TensorRT
    has them, a workspace limit, the FP16 flag only when `flags` say so, and the timing cache."""
    trt = env.trt
    logger = _logger(trt)
    builder = trt.Builder(logger)
    network_flags = 0
    if trt_major_minor(env.version)[0] < 10:  # 8.6: explicit batch must be asked for (default from 10)
        network_flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    if flags.strongly_typed:
        network_flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(network_flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(graph_path)):  # reads the external weight files beside the graph
        first = parser.get_error(0) if parser.num_errors else None
        raise TrtPlanError(f"TensorRT {env.version} could not parse {graph_path.name}: "
                           f"{str(first.desc() if first is not None else 'unknown error').splitlines()[0]}")
    linear = 1 << int(trt.TensorFormat.LINEAR)
    for tensors in ([network.get_input(i) for i in range(network.num_inputs)],
                    [network.get_output(i) for i in range(network.num_outputs)]):
        for tensor in tensors:
            if tensor.name.startswith(LINEAR_KV_PREFIXES):
                tensor.allowed_formats = linear  # the runtime binds its own buffers: no reformat copies

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, flags.workspace)
    if flags.fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if flags.direct_io:
        config.set_flag(trt.BuilderFlag.DIRECT_IO)
    if hasattr(config, "max_aux_streams"):
        config.max_aux_streams = flags.max_aux_streams
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # tensor names in the engine inspector
    for ranges in profiles.values():
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in profile_shapes(io.inputs, ranges).items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)
    cache = None
    if timing_cache is not None:
        previous = timing_cache.read_bytes() if timing_cache.is_file() else b""
        cache = config.create_timing_cache(previous)
        if not config.set_timing_cache(cache, False):  # a cache from elsewhere: start afresh
            cache = config.create_timing_cache(b"")
            config.set_timing_cache(cache, False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        reason = logger.errors[-1] if logger.errors else "no reason given"
        half_kv = any(t.dtype == "float16" and t.name.startswith("past_") for t in io.inputs)
        if half_kv and not flags.fp16 and not flags.strongly_typed:
            # Unverified on a GPU: whether 8.6 offers HALF plugin I/O without the FP16 flag.
            reason += " (an fp16 KV cache on TensorRT 8.6 may need the FP16 flag: --trt-fp16)"
        raise TrtPlanError(f"TensorRT {env.version} could not build a plan from {graph_path.name}: {reason}")
    if cache is not None:
        atomic_write(timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
    return bytes(memoryview(serialized))


def kv_copy_layers(engine_information: str, kv_names: set[str]) -> list[str]:
    """Layers of a built plan (the engine inspector's JSON) that reformat or copy a KV cache tensor.
    In-place decode relies on there being none: TensorRT 8.6 cannot be told that past and present
    alias, so a copy would move the whole cache every step (correct, but slow)."""
    try:
        layers = json.loads(engine_information).get("Layers", [])
    except (ValueError, AttributeError):
        return []
    found = []
    for layer in layers:
        text = json.dumps(layer)
        name = layer.get("Name", "") if isinstance(layer, dict) else str(layer)
        kind = layer.get("LayerType", "") if isinstance(layer, dict) else ""
        is_copy = any(word in f"{kind} {name}".lower() for word in ("reformat", "copy"))
        if is_copy and any(f'"{kv}"' in text or kv in name for kv in kv_names):
            found.append(name)
    return found


def plan_components_for(env: TrtEnvironment, role: str, manifest: Manifest, io: GraphIO,
                        settings: PlanSettings) -> tuple[dict, dict, BuildFlags]:
    profiles = profile_ranges(role, settings, manifest.max_context)
    flags = build_flags(env.version, env.gpu, settings, manifest.precision, env.available)
    return plan_components(role, env.version, env.gpu, env.plugin_hash, manifest, io, profiles, flags), profiles, flags


def ensure_plan(engine_dir: str | Path, manifest: Manifest, env: TrtEnvironment, io: GraphIO, settings: PlanSettings,
                compile_missing: bool = True, progress: Callable[[str], None] = lambda message: None,
                force: bool = False) -> bytes:
    """The plan for `io.role`: loaded when its record matches this machine and engine, else compiled
    (when `compile_missing`) or refused with one line."""
    folder = Path(engine_dir)
    components, profiles, flags = plan_components_for(env, io.role, manifest, io, settings)
    reason = "none built yet"
    if not force:
        try:
            data = read_plan(folder, io.role, components)
            if data is not None:
                return data
        except StalePlan as exc:
            reason = f"stale: {exc}"
    else:
        reason = "rebuild asked for"
    if not compile_missing:
        raise TrtPlanError(f"{folder}: no usable TensorRT {io.role} plan ({reason}); compile it on this machine with "
                           f"`qwen3vl build --engine {folder} --compile-only`")
    progress(f"{io.role}: compiling a TensorRT {env.version} plan for {env.gpu.name} (SM {env.gpu.sm}) ({reason})")
    start = time.perf_counter()
    data = compile_plan(env, folder / io.file, io, profiles, flags, timing_cache_path(folder, env.version, env.gpu))
    _warn_kv_copies(env, data, io, progress)
    write_plan(folder, io.role, data, components, settings)
    progress(f"{io.role}: plan of {len(data) / 2**20:.1f} MiB in {time.perf_counter() - start:.1f} s")
    return data


def _warn_kv_copies(env: TrtEnvironment, data: bytes, io: GraphIO, progress) -> None:
    kv = {t.name for t in (*io.inputs, *io.outputs) if t.name.startswith(LINEAR_KV_PREFIXES)}
    if not kv:
        return
    trt = env.trt
    engine = trt.Runtime(_logger(trt)).deserialize_cuda_engine(data)
    if engine is None or not hasattr(engine, "create_engine_inspector"):
        return
    information = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
    copies = kv_copy_layers(information, kv)
    if copies:
        progress(f"warning: TensorRT put {len(copies)} copy/reformat layer(s) on the KV cache ({copies[0]}, ...): "
                 f"every decode step will copy the cache")
