"""`qwen3vl build`: checkpoint folder -> self-contained engine folder."""

from __future__ import annotations

import sys
import time


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("build", help="export a checkpoint to an engine folder")
    parser.add_argument("--checkpoint", help="Hugging Face checkpoint folder (required unless --compile-only)")
    parser.add_argument("--out", help="engine folder to create (replaced if it is an engine)")
    parser.add_argument("--engine", help="with --compile-only: the engine folder (built with --backend trt) whose "
                                         "TensorRT plans to compile on this machine")
    parser.add_argument("--compile-only", action="store_true",
                        help="compile (or check) the TensorRT plans of --engine for this GPU; no export")
    parser.add_argument("--plugins", help="the TensorRT plugin library (default: $QWEN3VL_TRT_PLUGINS, else "
                                          "build/plugins/libqwen3vl_plugins.so from `make plugins`)")
    parser.add_argument("--trt-fp16", action="store_true",
                        help="let TensorRT 8.6 pick FP16 kernels (off by default on SM 6.x, where FP16 math is slow)")
    parser.add_argument("--backend", choices=("ort", "trt"), default="ort",
                        help="trt: also write TensorRT-target graphs (plugin nodes) beside the ONNX Runtime ones")
    parser.add_argument("--precision", choices=("fp32", "fp16", "int8", "int4"), default="fp32",
                        help="int8/int4: weight-only quantized decoder with fp32 activations, INT8 vision encoder")
    parser.add_argument("--block-size", type=int, choices=(32, 64, 128), default=64,
                        help="quantization block size along the input dimension (int8/int4)")
    parser.add_argument("--asymmetric", action="store_true", help="quantize with zero points (int8/int4)")
    parser.add_argument("--head-bits", type=int, choices=(4, 8), default=None,
                        help="bits of the tied embedding/lm_head (int8/int4; default: placed by the weight budget, "
                             "or 8 with --weight-budget none: it is read whole for every token and its errors land "
                             "on the logits)")
    parser.add_argument("--scale-search", choices=("clip", "none"), default="clip",
                        help="per-block scales: clip (default) searches clipping ratios and refits for the least "
                             "squared error; none is plain max-abs")
    parser.add_argument("--keep-sensitive", type=int, default=0, metavar="N",
                        help="int4: measure each decoder linear's effect on the output (KL on a built-in text, a few "
                             "minutes on 2B) and keep the N most sensitive at 8 bits")
    parser.add_argument("--weight-budget", metavar="SIZE",
                        help="int4/int8: bytes of weights read per decoded token (e.g. 1.1GB, as `qwen3vl bench` "
                             "reports them) or bits per weight (e.g. 4.5bpw): measures each decoder linear's "
                             "sensitivity (a few minutes on 2B) and gives the most sensitive 8 bits or smaller "
                             "blocks, the rest 4-bit blocks of 128, to fit; the lm_head too unless --head-bits. "
                             "Default for int4: 4.5bpw; none: every linear at --block-size, no measurement")
    parser.add_argument("--vision-precision", choices=("fp32", "int8"), default=None,
                        help="vision encoder weights; int8 (default for int8/int4 builds) also computes in INT8 "
                             "on the CPU, ~1.5x faster than fp32 (the default for fp32/fp16 builds)")
    parser.add_argument("--keep-sensitive-vision", type=int, default=0, metavar="N",
                        help="int8/int4 with vision int8: measure each vision block's INT8 effect on the output "
                             "(KL on a built-in picture and question, a few minutes on 2B) and keep the N most "
                             "sensitive blocks in FP32")
    parser.add_argument("--kv-dtype", choices=("fp32", "fp16", "int8"), default=None,
                        help="KV cache storage type (default: int8 for ort int8/int4 builds, else the graph's: fp32, or fp16 for "
                             "fp16 builds); int8: "
                             "ONNX Runtime only, static per-channel scales calibrated during the build (4x smaller "
                             "than fp32); --backend trt: fp16 storage with fp32 math is the Pascal mode")
    parser.add_argument("--max-context", type=int, default=8192,
                        help="longest prompt + answer in tokens (default 8192: a laptop's budget)")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from export.trt_engine import compile_plans  # needs neither torch nor onnx: --compile-only on the target
    from runtime.errors import Qwen3VLError
    from runtime.trt_plans import PlanSettings

    start = time.perf_counter()

    def progress(message: str) -> None:
        print(f"build [{time.perf_counter() - start:6.1f} s] {message}", file=sys.stderr, flush=True)

    settings = PlanSettings(fp16=True if args.trt_fp16 else None)
    if args.compile_only:
        if not args.engine or args.checkpoint or args.out:
            raise Qwen3VLError("--compile-only compiles the TensorRT plans of an existing engine: give --engine E "
                               "(and no --checkpoint or --out)")
        compile_plans(args.engine, progress, plugins=args.plugins, settings=settings, required=True)
        return 0
    if args.engine or not args.checkpoint or not args.out:
        raise Qwen3VLError("build needs --checkpoint and --out (or --engine E --compile-only)")
    from export.build_engine import build_engine

    out = build_engine(args.checkpoint, args.out, backend=args.backend, precision=args.precision,
                       max_context=args.max_context, progress=progress, block_size=args.block_size,
                       symmetric=not args.asymmetric, vision_precision=args.vision_precision,
                       kv_dtype=args.kv_dtype, head_bits=args.head_bits, scale_search=args.scale_search,
                       keep_sensitive_vision=args.keep_sensitive_vision,
                       keep_sensitive=args.keep_sensitive,
                       weight_budget=_weight_budget(args.weight_budget))
    progress(f"engine written to {out}")
    if args.backend == "trt":
        compile_plans(out, progress, plugins=args.plugins, settings=settings)
    return 0


def _weight_budget(text: str | None) -> int | str | None:
    """--weight-budget: not given -> "default"; "none" -> None; bits per weight ("4.5bpw") as given;
    else a size in bytes."""
    from runtime.memory_plan import parse_size

    if text is None:
        return "default"
    if text.strip().lower() == "none":
        return None
    if text.strip().lower().endswith("bpw"):
        return text
    return parse_size(text)
