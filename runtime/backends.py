"""The runtime's own backends by name: `auto` and `ort`. Backends that need the build extras
(`reference`, `torch`) are made by the command line and handed to `Pipeline` (the runtime imports no
build stage)."""

from __future__ import annotations

from pathlib import Path

from .backend import Backend
from .engine_manifest import Manifest
from .errors import Qwen3VLError

RUNTIME_BACKENDS = ("auto", "ort")


def open_backend(name: str, engine_dir: str | Path, manifest: Manifest, threads: int | None = None,
                 providers: list[str] | None = None) -> Backend:
    """`auto` is the fastest backend present: today ONNX Runtime on the providers given (CPU by default)."""
    if name not in RUNTIME_BACKENDS:
        raise Qwen3VLError(f"unknown backend {name!r} (the runtime opens {', '.join(RUNTIME_BACKENDS)})")
    from .ort_backend import OrtBackend

    return OrtBackend(engine_dir, manifest, threads, providers)
