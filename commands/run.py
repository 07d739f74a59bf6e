"""`qwen3vl run`: answer a prompt about images with an engine (or a checkpoint, in PyTorch)."""

from __future__ import annotations

import json
import sys

from . import backend_choice


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("run", help="answer a prompt about images")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--engine", help="engine folder from `qwen3vl build`")
    source.add_argument("--checkpoint", help="Hugging Face checkpoint folder (the PyTorch model: --backend torch)")
    backend_choice.add_arguments(parser)
    parser.add_argument("--image", action="append", default=[], help="image file; repeat for several")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    sampling = parser.add_argument_group("sampling (default: the checkpoint's generation_config.json)")
    sampling.add_argument("--greedy", action="store_true", help="pick the most likely token")
    sampling.add_argument("--temperature", type=float, help="sample, with this temperature")
    sampling.add_argument("--top-p", type=float, help="sample, from the smallest set of tokens with this mass")
    sampling.add_argument("--top-k", type=int, help="sample, from the K most likely tokens")
    sampling.add_argument("--seed", type=int)
    parser.add_argument("--logprobs", type=int, default=0, metavar="K", help="report the top K per token")
    parser.add_argument("--min-pixels", type=int, help="override the engine's image pixel budget")
    parser.add_argument("--max-pixels", type=int)
    parser.add_argument("--threads", type=int, help="CPU threads (default: one per core)")
    parser.add_argument("--verify", action="store_true",
                        help="check every engine file against the manifest's SHA-256 hashes before loading")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from runtime.errors import PromptError

    sampled = any(v is not None for v in (args.temperature, args.top_p, args.top_k))
    if args.greedy and sampled:
        raise PromptError("--greedy cannot be combined with --temperature/--top-p/--top-k")
    if not 0 <= args.logprobs <= 20:
        raise PromptError(f"--logprobs must be from 0 to 20, got {args.logprobs}")
    options = dict(
        max_new_tokens=args.max_new_tokens,
        do_sample=False if args.greedy else True if sampled else None,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        min_pixels=args.min_pixels,
        max_pixels=args.max_pixels,
    )
    pipe = backend_choice.open_pipeline(args, engine=args.engine, checkpoint=args.checkpoint)
    if args.json:
        result = pipe.generate(args.prompt, images=args.image, logprobs=args.logprobs, **options)
        backend_choice.announce(args, pipe)
        print(json.dumps({**result.to_dict(), **backend_choice.report(args, pipe)}))
        return 0
    pieces = pipe.stream(args.prompt, images=args.image, **options)
    first = next(pieces, "")  # the request is checked and prefilled before the first piece
    backend_choice.announce(args, pipe)
    sys.stdout.write(first)
    sys.stdout.flush()
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0

