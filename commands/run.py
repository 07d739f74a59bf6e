"""`qwen3vl run`: answer a prompt about images with an engine (or a checkpoint, in PyTorch)."""

from __future__ import annotations

import json
import sys

from . import backend_choice, generation_options


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("run", help="answer a prompt about images")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--engine", help="engine folder from `qwen3vl build`")
    source.add_argument("--checkpoint", help="Hugging Face checkpoint folder (the PyTorch model: --backend torch)")
    backend_choice.add_arguments(parser)
    parser.add_argument("--image", action="append", default=[], help="image file; repeat for several")
    parser.add_argument("--prompt", required=True)
    generation_options.add_arguments(parser)
    parser.add_argument("--logprobs", type=int, default=0, metavar="K", help="report the top K per token")
    parser.add_argument("--threads", type=int, help="CPU threads (default: one per core)")
    parser.add_argument("--kv-window", type=int, metavar="W",
                        help="answer conversations longer than the engine's context with a bounded KV cache: the "
                             "system prompt and images plus the most recent W tokens (default: refuse them)")
    parser.add_argument("--verify", action="store_true",
                        help="check every engine file against the manifest's SHA-256 hashes before loading")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from runtime.errors import PromptError

    options = generation_options.options(args)
    if not 0 <= args.logprobs <= 20:
        raise PromptError(f"--logprobs must be from 0 to 20, got {args.logprobs}")
    pipe = backend_choice.open_pipeline(args, engine=args.engine, checkpoint=args.checkpoint)
    if args.kv_window is not None:
        pipe.use_kv_window(args.kv_window)
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

