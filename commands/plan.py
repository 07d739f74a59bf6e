"""`qwen3vl plan`: will this engine fit the GPU, and how (runtime/memory_plan.py)."""

from __future__ import annotations

import json

EPILOG = """The plan counts, for one request row: CUDA context + TensorRT (assumed 150 MiB), the decoder's
weights as stored (tied embedding once), the KV cache at --context, one prefill chunk's activations
and, when it goes on the GPU, the vision encoder's weights and working set for a 448x448 image.
It decides the KV dtype, prefill chunk, vision on GPU or CPU, and the longest context and largest
image that fit. Exit status 1 when the engine does not fit (the plan then says what would)."""


def add_parser(subparsers) -> None:
    import argparse

    parser = subparsers.add_parser("plan", help="GPU memory plan of an engine: what fits, and how",
                                   epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", required=True, help="engine folder from `qwen3vl build`")
    parser.add_argument("--gpu-memory", metavar="SIZE",
                        help="GPU memory to plan for, e.g. 2GiB (default: the GPU present)")
    parser.add_argument("--context", type=int, help="tokens of context to plan for (default: min(2048, the engine's))")
    parser.add_argument("--kv-dtype", choices=("fp16", "fp32"),
                        help="KV cache storage (default: the engine's, else fp16)")
    parser.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from runtime.engine_manifest import load_manifest
    from runtime.errors import Qwen3VLError
    from runtime.memory_plan import EngineFacts, parse_size, plan_memory

    manifest = load_manifest(args.engine)
    if args.gpu_memory is not None:
        gpu_memory, source = parse_size(args.gpu_memory), f"{args.gpu_memory} (given)"
    else:
        from runtime.environment import probe_gpu

        gpu = probe_gpu()
        if gpu is None:
            raise Qwen3VLError("no NVIDIA GPU found here: give --gpu-memory (e.g. 2GiB for an MX250)")
        gpu_memory, source = gpu.memory_bytes, f"{gpu.name} (SM {gpu.sm})"
    if gpu_memory <= 0:
        raise Qwen3VLError("--gpu-memory must be positive")
    plan = plan_memory(EngineFacts.from_manifest(manifest), gpu_memory, context=args.context, kv_dtype=args.kv_dtype)
    if args.json:
        print(json.dumps({"engine": str(args.engine), "gpu": source, **plan.to_dict()}))
    else:
        print(f"engine {args.engine} ({manifest.precision}), GPU memory {source}")
        print("\n".join(plan.lines()))
    return 0 if plan.fits else 1
