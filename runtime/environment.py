"""What this machine offers for running an engine, and which backend `--backend auto` picks.

Two halves. `choose_backend(env)` is a pure function over an `Environment` (TensorRT version, GPU,
plugin library, what the engine folder holds, ONNX Runtime's providers): it returns the backend to
open and one line per backend it passed over, saying why. `probe_environment(engine_dir, manifest)`
fills an `Environment` from the machine, every probe guarded: TensorRT is imported only when a GPU
was found, the GPU is read through the CUDA driver (libcuda via ctypes, no context made) or
`nvidia-smi`, and nothing here imports torch. Tests state environments instead of probing.

Order: TensorRT (plugin nodes, INT4 kernels with dp4a on Pascal) -> ONNX Runtime CUDA
(onnxruntime-gpu) -> ONNX Runtime CPU, which always works.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

# TensorRT 8.6 is the last release that runs on compute capability < 7 (10.x refuses SM 6.1 with
# "Unsupported SM: 0x601"); the plugins are written against 8.6 and later.
OLDEST_TENSORRT = (8, 6)
PASCAL_TENSORRT = (8, 6)

PLUGIN_LIBRARY_ENV = "QWEN3VL_TRT_PLUGINS"  # as runtime/trt_plans.py reads it
PLUGIN_LIBRARY_NAME = "qwen3vl_plugins.dll" if sys.platform == "win32" else "libqwen3vl_plugins.so"
PLAN_SUFFIXES = (".plan", ".engine")


@dataclass(frozen=True)
class Gpu:
    name: str
    compute_capability: tuple[int, int]
    memory_bytes: int  # total
    free_bytes: int | None = None  # when the probe could read it (nvidia-smi)
    sm_count: int | None = None

    @property
    def sm(self) -> str:
        return f"{self.compute_capability[0]}.{self.compute_capability[1]}"


@dataclass(frozen=True)
class Environment:
    """Everything the choice depends on. None means absent (or, for TensorRT, not probed because
    there was no GPU to run it on)."""

    gpu: Gpu | None = None
    tensorrt_version: str | None = None
    tensorrt_problem: str | None = None  # why `import tensorrt` failed, when it did
    plugin_library: str | None = None  # path of libqwen3vl_plugins.so
    trt_graphs: bool = False  # the engine holds *.trt.onnx graphs (plans can be compiled from them)
    plans_present: bool = False  # compiled TensorRT plans in the engine folder
    trt_backend_present: bool = False  # runtime/trt_backend.py is installed
    onnxruntime_providers: tuple[str, ...] = ("CPUExecutionProvider",)
    gpu_fit_problem: str | None = None  # the memory plan's verdict when the engine cannot fit the GPU


@dataclass
class Choice:
    backend: str  # "trt", "ort-cuda" or "ort-cpu"
    providers: list[str] | None = None  # ONNX Runtime's, for the ort-* choices
    fallbacks: list[str] = field(default_factory=list)  # one line per backend passed over


def parse_version(text: str) -> tuple[int, ...]:
    """"10.13.3.9.post1" -> (10, 13, 3, 9): the leading numeric fields."""
    parts = []
    for piece in text.split("."):
        digits = piece[:len(piece) - len(piece.lstrip("0123456789"))]
        if not digits:
            break
        parts.append(int(digits))
        if digits != piece:
            break
    return tuple(parts)


def tensorrt_problem(env: Environment) -> str | None:
    """Why TensorRT cannot run this engine here, or None when it can."""
    gpu = env.gpu
    if gpu is None:
        return "no NVIDIA GPU found"
    if env.tensorrt_version is None:
        detail = f" ({env.tensorrt_problem})" if env.tensorrt_problem else ""
        wanted = "8.6" if gpu.compute_capability < (7, 0) else "8.6 or later"
        return f"TensorRT is not importable{detail}: install TensorRT {wanted} (README: On a Pascal laptop)"
    version = parse_version(env.tensorrt_version)
    if gpu.compute_capability < (7, 0) and version[:2] != PASCAL_TENSORRT:
        return f"SM {gpu.sm} needs TensorRT 8.6, found {env.tensorrt_version}"
    if version[:2] < OLDEST_TENSORRT:
        return f"TensorRT {env.tensorrt_version} is older than 8.6, which the plugins need"
    if env.plugin_library is None:
        return f"no plugin library ({PLUGIN_LIBRARY_NAME}): run `make plugins` or set {PLUGIN_LIBRARY_ENV}"
    if not (env.plans_present or env.trt_graphs):
        return "the engine has no TensorRT graphs or plans: rebuild it with `qwen3vl build --backend trt`"
    if not env.trt_backend_present:
        return "this installation has no TensorRT runtime backend (runtime/trt_backend.py)"
    if env.gpu_fit_problem:
        return env.gpu_fit_problem
    return None


def cuda_problem(env: Environment) -> str | None:
    """Why ONNX Runtime's CUDA provider cannot run here, or None when it can."""
    if env.gpu is None:
        return "no NVIDIA GPU found"
    if "CUDAExecutionProvider" not in env.onnxruntime_providers:
        return "ONNX Runtime has no CUDAExecutionProvider (install onnxruntime-gpu in place of onnxruntime)"
    if env.gpu_fit_problem:
        return env.gpu_fit_problem
    return None


def choose_backend(env: Environment) -> Choice:
    """TensorRT, else ONNX Runtime CUDA, else ONNX Runtime CPU; one line per step skipped."""
    fallbacks = []
    problem = tensorrt_problem(env)
    if problem is None:
        return Choice("trt")
    fallbacks.append(f"tensorrt skipped: {problem}")
    problem = cuda_problem(env)
    if problem is None:
        return Choice("ort-cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"], fallbacks)
    fallbacks.append(f"onnxruntime-cuda skipped: {problem}")
    return Choice("ort-cpu", ["CPUExecutionProvider"], fallbacks)


# -- the real probe ------------------------------------------------------------------------------------

def probe_environment(engine_dir: str | Path, manifest) -> Environment:
    folder = Path(engine_dir)
    gpu = probe_gpu()
    version = problem = None
    if gpu is not None:
        version, problem = probe_tensorrt()
    files = set(manifest.files)
    plans = any(p.suffix in PLAN_SUFFIXES for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else False
    fit = None
    if gpu is not None:
        from .memory_plan import EngineFacts, plan_memory

        plan = plan_memory(EngineFacts.from_manifest(manifest), gpu.memory_bytes)
        fit = None if plan.fits else f"the engine does not fit this GPU: {plan.verdict()}"
    return Environment(
        gpu=gpu,
        tensorrt_version=version,
        tensorrt_problem=problem,
        plugin_library=find_plugin_library(),
        trt_graphs={"decoder_trt", "vision_trt"} <= files,
        plans_present=plans,
        trt_backend_present=importlib.util.find_spec("runtime.trt_backend") is not None,
        onnxruntime_providers=probe_onnxruntime_providers(),
        gpu_fit_problem=fit,
    )


def probe_tensorrt() -> tuple[str | None, str | None]:
    """(version, None) when `import tensorrt` works, else (None, why)."""
    if importlib.util.find_spec("tensorrt") is None:
        return None, "not installed"
    try:
        import tensorrt
    except Exception as exc:  # missing libnvinfer, a stub package, a CUDA mismatch: all mean "not usable"
        return None, (str(exc).splitlines() or [type(exc).__name__])[0]
    version = getattr(tensorrt, "__version__", None)
    return (version, None) if version else (None, "the tensorrt package has no version (a stub?)")


def probe_onnxruntime_providers() -> tuple[str, ...]:
    try:
        import onnxruntime
    except Exception:
        return ()
    return tuple(onnxruntime.get_available_providers())


def find_plugin_library() -> str | None:
    """$QWEN3VL_TRT_PLUGINS, else `make plugins`' output: build/plugins/ of the project, or of the
    current directory (where the TensorRT backend looks)."""
    explicit = os.environ.get(PLUGIN_LIBRARY_ENV)
    if explicit:
        return explicit if Path(explicit).is_file() else None
    project = Path(__file__).resolve().parent.parent
    for place in (project / "build" / "plugins", Path.cwd() / "build" / "plugins"):
        candidate = Path(place) / PLUGIN_LIBRARY_NAME
        if candidate.is_file():
            return str(candidate)
    return None


def probe_gpu() -> Gpu | None:
    """The first CUDA device, from the driver library, else from nvidia-smi; None when neither answers."""
    return _gpu_from_driver() or _gpu_from_nvidia_smi()


# CUdevice_attribute values (cuda.h, unchanged since CUDA 6).
_CU_ATTR_SM_COUNT, _CU_ATTR_MAJOR, _CU_ATTR_MINOR = 16, 75, 76


def _gpu_from_driver() -> Gpu | None:
    names = ["nvcuda.dll"] if sys.platform == "win32" else ["libcuda.so.1", "libcuda.so"]
    found = ctypes.util.find_library("cuda")
    for name in names + ([found] if found else []):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        try:
            if lib.cuInit(0) != 0:
                return None
            count, device = ctypes.c_int(0), ctypes.c_int(0)
            if lib.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value < 1:
                return None
            if lib.cuDeviceGet(ctypes.byref(device), 0) != 0:
                return None
            raw = ctypes.create_string_buffer(256)
            lib.cuDeviceGetName(raw, 256, device)

            def attribute(attr: int) -> int:
                value = ctypes.c_int(0)
                lib.cuDeviceGetAttribute(ctypes.byref(value), attr, device)
                return value.value

            total = ctypes.c_size_t(0)
            total_mem = getattr(lib, "cuDeviceTotalMem_v2", None) or lib.cuDeviceTotalMem
            total_mem(ctypes.byref(total), device)
            return Gpu(raw.value.decode(errors="replace"), (attribute(_CU_ATTR_MAJOR), attribute(_CU_ATTR_MINOR)),
                       total.value, sm_count=attribute(_CU_ATTR_SM_COUNT))
        except (AttributeError, OSError):
            return None
    return None


def _gpu_from_nvidia_smi() -> Gpu | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap,memory.total,memory.free",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0 or not out.stdout.strip():
        return None
    return parse_nvidia_smi(out.stdout)


def parse_nvidia_smi(text: str) -> Gpu | None:
    """The first line of `nvidia-smi --query-gpu=name,compute_cap,memory.total,memory.free
    --format=csv,noheader,nounits` (memory in MiB)."""
    fields = [f.strip() for f in text.strip().splitlines()[0].split(",")]
    try:
        name, cap, total, free = fields[:4]
        major, minor = (int(x) for x in cap.split("."))
        return Gpu(name, (major, minor), int(float(total)) << 20, int(float(free)) << 20)
    except ValueError:
        return None
