"""`qwen3vl bench`: speed and memory of an engine, optionally side by side with transformers, plus
the machine's memory bandwidth (and so decode efficiency), with --reference the engine's fidelity to
an FP32 engine, and with --profile where the time goes per op.

Each system is measured in a child process (bench/worker.py) so that peak RSS is per
system; this process only validates inputs, measures bandwidth, runs the children one at a time
and reports medians.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

DEFAULT_PROMPT = "Describe this image."
# The image shipped with the project: <repo>/assets/sample.png, beside the commands package.
SAMPLE_IMAGE = Path(__file__).resolve().parent.parent / "assets" / "sample.png"

EPILOG = """Comparing builds: build one engine per precision from the same checkpoint and run bench once per
engine, each against the FP32 engine, e.g.
  qwen3vl build --checkpoint CK --out eng-fp32
  qwen3vl build --checkpoint CK --out eng-int4 --precision int4
  qwen3vl bench --engine eng-int4 --reference eng-fp32 --image-size 448x448 --threads 2 --profile --json
--reference runs the reference in a process of its own after the engine's, so the two need not fit
in memory together. Fidelity: the bench image and prompt plus filler text, fed one token per
decoder call after a prefill up to the token before the image, so the measured positions start
with the image tokens; top-1 agreement and mean KL(P_ref || P_engine) in nats over --positions.
Decode efficiency = weight bytes read per token x decode tok/s / memory read bandwidth (measured
in the same run with --threads threads streaming a 1 GiB array; 1.0 = at the memory's speed).
"""


def add_parser(subparsers) -> None:
    import argparse

    parser = subparsers.add_parser("bench", help="measure an engine's speed and memory (optionally vs transformers)",
                                   epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", required=True, help="engine folder from `qwen3vl build`")
    parser.add_argument("--checkpoint", help="also measure transformers (fp32, CPU) on this checkpoint folder")
    image = parser.add_mutually_exclusive_group()
    image.add_argument("--image", help=f"image file (default: the bundled {SAMPLE_IMAGE.name})")
    image.add_argument("--image-size", metavar="WxH",
                       help="instead of a file, a deterministic synthetic picture of this size, e.g. 448x448")
    parser.add_argument("--min-pixels", type=int, help="override the engine's image pixel budget (both systems)")
    parser.add_argument("--max-pixels", type=int)
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--reference", metavar="ENGINE_DIR",
                        help="an FP32 engine of the same checkpoint: report --engine's top-1 agreement and mean KL "
                             "against it over teacher-forced positions")
    parser.add_argument("--positions", type=int, default=256,
                        help="teacher-forced positions for --reference (default 256)")
    parser.add_argument("--profile", action="store_true",
                        help="ONNX Runtime's per-op profile of the vision encoder, the prefill and decode")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens to decode, greedy (default 32)")
    parser.add_argument("--threads", type=int, help="CPU threads for both systems (default: one per physical core)")
    parser.add_argument("--runs", type=int, default=1, help="timed runs after one warm-up; medians are reported")
    parser.add_argument("--json", action="store_true", help="one JSON object per system, one per line (all "
                                                                  "figures, the full profiles included)")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from runtime.engine_manifest import load_manifest
    from runtime.errors import ImageError, PromptError, Qwen3VLError
    from runtime.image_processing import load_image

    from bench.bandwidth import decoder_weight_bytes, measure, physical_cores
    from bench.inputs import parse_size, synthetic_image
    from bench.report import run_worker, summarise, table

    if args.max_new_tokens < 2:
        raise PromptError("--max-new-tokens must be >= 2 (decode speed needs a token after the first)")
    if args.runs < 1:
        raise PromptError("--runs must be >= 1")
    if args.threads is not None and args.threads < 1:
        raise PromptError("--threads must be >= 1")
    if args.positions < 1:
        raise PromptError("--positions must be >= 1")
    # Fail fast, before minutes of loading, on what can be checked cheaply here.
    manifest = load_manifest(args.engine)
    manifest.image_processor.with_budget(args.min_pixels, args.max_pixels)  # raises on a bad budget
    if args.reference is not None:
        reference = load_manifest(args.reference)
        if reference.model != manifest.model:
            raise Qwen3VLError(f"--reference {args.reference} is an engine of another model than --engine")
        if reference.precision != "fp32":
            print(f"warning: the reference engine is {reference.precision}, not fp32", file=sys.stderr)
    if args.checkpoint is not None:
        from model_src.config import load_config

        load_config(args.checkpoint)

    with tempfile.TemporaryDirectory(prefix="qwen3vl-bench-") as scratch:
        image = args.image
        if args.image_size is not None:
            image = str(Path(scratch) / f"synthetic-{args.image_size}.png")
            synthetic_image(*parse_size(args.image_size)).save(image)
        elif image is None:
            if not SAMPLE_IMAGE.is_file():
                raise ImageError(f"no --image given and the bundled sample image is missing ({SAMPLE_IMAGE})")
            image = str(SAMPLE_IMAGE)
        load_image(image).close()

        # Both systems get the same explicit thread count, so neither wins by using more cores.
        threads = args.threads or physical_cores()
        # Measured first, while nothing else runs; the array is freed before any model loads.
        bandwidth = measure(threads)
        # "--opt=value" so that a prompt starting with "-" is not taken for an option by the child.
        common = [f"--image={Path(image).resolve()}", f"--prompt={args.prompt}",
                  "--max-new-tokens", str(args.max_new_tokens), "--threads", str(threads), "--runs", str(args.runs)]
        common += [f"--{name}-pixels={value}" for name, value in (("min", args.min_pixels), ("max", args.max_pixels))
                   if value is not None]
        engine_args = ["--engine", str(Path(args.engine).resolve())] + common
        if args.reference is not None:
            engine_args += ["--fidelity-out", str(Path(scratch) / "engine.npz"), "--positions", str(args.positions)]
        if args.profile:
            engine_args.append("--profile")
        reports = [run_worker("engine", engine_args)]
        reports[0]["weight_bytes_per_token"] = decoder_weight_bytes(args.engine, manifest)
        if args.reference is not None:
            from bench.fidelity import compare, load

            run_worker("reference", ["--engine", str(Path(args.reference).resolve()), *common,
                                      "--fidelity-out", str(Path(scratch) / "reference.npz"),
                                      "--positions", str(args.positions)])
            reports[0]["fidelity"] = compare(load(Path(scratch) / "reference.npz"), load(Path(scratch) / "engine.npz"))
        if args.checkpoint is not None:
            reports.append(run_worker("transformers", ["--checkpoint", str(Path(args.checkpoint).resolve())] + common))
    rows = [summarise(report, bandwidth) for report in reports]

    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(table(rows, args.image_size and f"synthetic {args.image_size}" or image, args.runs,
                     [r.get("token_ids") for r in reports], bandwidth))
    if len(rows) == 2 and (rows[0]["prompt_tokens"], rows[0]["image_tokens"]) != (rows[1]["prompt_tokens"],
                                                                                   rows[1]["image_tokens"]):
        print("warning: the engine and the checkpoint turned the inputs into different token counts "
              "(was the engine built from another checkpoint?)", file=sys.stderr)
    return 0


