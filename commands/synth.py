"""`qwen3vl synth`: write a synthetic checkpoint (random weights, real layout and tokenizer)."""

from __future__ import annotations

import sys
import time


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("synth", help="write a synthetic checkpoint in the Hugging Face layout")
    parser.add_argument("--preset", choices=("tiny", "small", "2b"), default="small")
    parser.add_argument("--out", required=True, help="checkpoint folder to create")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="replace an existing folder")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from model_src.synthetic_checkpoint import write_preset

    start = time.perf_counter()
    out = write_preset(args.preset, args.out, seed=args.seed, overwrite=args.force,
                       progress=lambda message: print(f"synth: {message}", file=sys.stderr, flush=True))
    print(f"synth: wrote {args.preset} checkpoint to {out} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0
