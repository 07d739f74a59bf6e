"""`qwen3vl run`: answer a prompt about images."""

from __future__ import annotations

import json
import sys


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("run", help="answer a prompt about images")
    parser.add_argument("--checkpoint", required=True, help="Hugging Face checkpoint folder (PyTorch reference path)")
    parser.add_argument("--image", action="append", default=[], help="image file; repeat for several")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the text")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from model_src.generate import ReferencePipeline

    pipe = ReferencePipeline(args.checkpoint)
    answer = pipe.answer(args.prompt, images=args.image, max_new_tokens=args.max_new_tokens)
    if args.json:
        print(json.dumps({"text": answer.text, "token_ids": answer.token_ids,
                          "prompt_tokens": answer.prompt_tokens, "timings": answer.timings}))
    else:
        print(answer.text)
    return 0
