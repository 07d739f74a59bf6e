"""`--backend` for the commands that run a model: the runtime's own backends (auto, trt, ort) and the
build-side ones (reference: the TensorRT-target graphs on numpy plugin references; torch: the
PyTorch model of a checkpoint), all behind the same Pipeline. `auto` says on stderr what it chose and
why it passed over the backends before it (runtime/environment.py); `--json` output carries the same."""

from __future__ import annotations

import sys

BACKENDS = ("auto", "trt", "ort", "reference", "torch")
HELP = ("auto (default: TensorRT, else ONNX Runtime CUDA, else ONNX Runtime CPU, saying why it passed one over), "
        "trt (TensorRT or an error), ort (ONNX Runtime; --providers), reference "
        "(the TensorRT-target graphs of a --backend trt build on the CPU, numpy plugin references; slow, for "
        "checking), torch (the PyTorch model; with --checkpoint)")


def add_arguments(parser) -> None:
    parser.add_argument("--backend", choices=BACKENDS, default="auto", help=HELP)
    parser.add_argument("--providers", help="ONNX Runtime execution providers in order, comma-separated "
                                            "(default CPUExecutionProvider)")


def open_pipeline(args, engine: str | None = None, checkpoint: str | None = None):
    """A Pipeline over the engine folder (or checkpoint) with the backend `args` ask for."""
    from runtime import Pipeline
    from runtime.errors import Qwen3VLError

    backend, threads = args.backend, getattr(args, "threads", None)
    providers = [p.strip() for p in args.providers.split(",") if p.strip()] if args.providers else None
    if providers and backend not in ("auto", "ort"):
        raise Qwen3VLError("--providers applies to the ort backend only")
    if checkpoint is not None:
        if backend not in ("auto", "torch"):
            raise Qwen3VLError(f"--checkpoint runs the PyTorch model: --backend {backend} needs an --engine")
        from model_src.torch_backend import checkpoint_pipeline

        return checkpoint_pipeline(checkpoint, threads)
    if backend == "torch":
        raise Qwen3VLError("--backend torch runs a checkpoint folder: give --checkpoint instead of --engine")
    verify = getattr(args, "verify", False)
    if backend == "reference":
        from graph_passes.reference_backend import ReferenceBackend
        from runtime.engine_manifest import load_manifest

        manifest = load_manifest(engine, verify_hashes=verify)
        return Pipeline(engine, manifest, ReferenceBackend(engine, manifest))
    from runtime.backends import select_backend
    from runtime.engine_manifest import load_manifest

    manifest = load_manifest(engine, verify_hashes=verify)
    selection = select_backend(backend, engine, manifest, threads, providers)
    args.backend_fallbacks = selection.fallbacks
    return Pipeline(engine, manifest, selection.backend)


def announce(args, pipe) -> None:
    """With --backend auto, one line on stderr per backend passed over (why), then one naming the
    backend chosen; called once the request has been accepted, so that a refused request's error
    stays the only line."""
    if args.backend == "auto":
        for line in getattr(args, "backend_fallbacks", []):
            print(f"backend: {line}", file=sys.stderr)
        print(f"backend: {pipe.backend.name} (auto)", file=sys.stderr, flush=True)


def report(args, pipe) -> dict:
    """The backend for `--json` output: asked for, chosen, and each fallback's reason."""
    return {"backend": {"requested": args.backend, "chosen": pipe.backend.name,
                        "fallbacks": list(getattr(args, "backend_fallbacks", []))}}
