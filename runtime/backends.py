"""The runtime's own backends by name: `auto`, `trt` and `ort`. Backends that need the build extras
(`reference`, `torch`) are made by the command line and handed to `Pipeline` (the runtime imports no
build stage).

`auto` follows `runtime.environment.choose_backend`: TensorRT -> ONNX Runtime CUDA -> ONNX Runtime
CPU, each step skipped with one line saying why (`Selection.fallbacks`); a backend that was chosen
but fails to open is skipped the same way. `trt` is TensorRT or an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .backend import Backend
from .engine_manifest import Manifest
from .environment import Environment, cuda_problem, probe_environment, tensorrt_problem
from .errors import Qwen3VLError
from .memory_plan import EngineFacts, plan_memory

RUNTIME_BACKENDS = ("auto", "trt", "ort")
CUDA_PROVIDERS = ["CUDAExecutionProvider", "CPUExecutionProvider"]


@dataclass
class Selection:
    requested: str  # auto, trt or ort
    backend: Backend
    fallbacks: list[str] = field(default_factory=list)  # one line per backend passed over

    def to_dict(self) -> dict:
        return {"requested": self.requested, "backend": self.backend.name, "fallbacks": list(self.fallbacks)}


def open_backend(name: str, engine_dir: str | Path, manifest: Manifest, threads: int | None = None,
                 providers: list[str] | None = None) -> Backend:
    """The backend `name` asks for (see `select_backend`); the reasons for any fallback are dropped."""
    return select_backend(name, engine_dir, manifest, threads, providers).backend


def select_backend(name: str, engine_dir: str | Path, manifest: Manifest, threads: int | None = None,
                   providers: list[str] | None = None, env: Environment | None = None) -> Selection:
    """Opens a backend by name. With `providers` (ONNX Runtime's), `auto` is `ort` on those providers.
    `env` stands in for probing the machine (tests)."""
    if name not in RUNTIME_BACKENDS:
        raise Qwen3VLError(f"unknown backend {name!r} (the runtime opens {', '.join(RUNTIME_BACKENDS)})")
    if name == "ort" or (name == "auto" and providers):
        return Selection(name, _open_ort(engine_dir, manifest, threads, providers))
    if name == "trt" and providers:
        raise Qwen3VLError("--providers applies to ONNX Runtime, not to --backend trt")
    env = env if env is not None else probe_environment(engine_dir, manifest)
    if name == "trt":
        problem = tensorrt_problem(env)
        if problem is not None:
            raise Qwen3VLError(f"TensorRT cannot run here: {problem}")
        return Selection(name, _open_trt(engine_dir, manifest, threads, env))

    fallbacks = []
    steps = (("tensorrt", tensorrt_problem, lambda: _open_trt(engine_dir, manifest, threads, env)),
             ("onnxruntime-cuda", cuda_problem, lambda: _open_cuda(engine_dir, manifest, threads)))
    for label, problem_of, open_ in steps:
        problem = problem_of(env)
        if problem is None:
            try:
                return Selection(name, open_(), fallbacks)
            except Exception as exc:  # a chosen backend that fails to open is one more fallback, said once
                problem = f"failed to open ({(str(exc).splitlines() or [type(exc).__name__])[0]})"
        fallbacks.append(f"{label} skipped: {problem}")
    return Selection(name, _open_ort(engine_dir, manifest, threads, ["CPUExecutionProvider"]), fallbacks)


def _open_ort(engine_dir, manifest, threads, providers) -> Backend:
    from .ort_backend import OrtBackend

    return OrtBackend(engine_dir, manifest, threads, providers)


def _open_cuda(engine_dir, manifest, threads) -> Backend:
    backend = _open_ort(engine_dir, manifest, threads, CUDA_PROVIDERS)
    loaded = backend.decoder.get_providers()
    if not loaded or loaded[0] != "CUDAExecutionProvider":
        backend.close()
        # ONNX Runtime drops a provider whose libraries do not load and carries on on the CPU.
        raise Qwen3VLError("CUDAExecutionProvider did not load: check the CUDA 12 and cuDNN libraries "
                           "onnxruntime-gpu needs")
    return backend


def _open_trt(engine_dir, manifest, threads, env: Environment) -> Backend:
    """runtime.trt_backend.TrtBackend, imported only now (TensorRT loads its libraries on import), with
    the vision encoder where the memory plan puts it for this GPU."""
    try:
        from .trt_backend import TrtBackend
    except ModuleNotFoundError as exc:
        if exc.name != f"{__package__}.trt_backend":
            raise
        raise Qwen3VLError("this installation has no TensorRT runtime backend (runtime/trt_backend.py)") from None
    gpu = env.gpu
    plan = plan_memory(EngineFacts.from_manifest(manifest), gpu.free_bytes or gpu.memory_bytes)
    return TrtBackend(engine_dir, manifest, plugins=env.plugin_library, vision_on_gpu=plan.vision_on_gpu,
                      threads=threads)
