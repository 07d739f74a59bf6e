"""`qwen3vl run`: answer a prompt about images with an engine (or a checkpoint, in PyTorch)."""

from __future__ import annotations

import json
import sys


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("run", help="answer a prompt about images")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--engine", help="engine folder from `qwen3vl build`")
    source.add_argument("--checkpoint", help="Hugging Face checkpoint folder (PyTorch reference path, greedy)")
    parser.add_argument("--image", action="append", default=[], help="image file; repeat for several")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    sampling = parser.add_argument_group("sampling (default: greedy)")
    sampling.add_argument("--greedy", action="store_true", help="pick the most likely token (the default)")
    sampling.add_argument("--temperature", type=float)
    sampling.add_argument("--top-p", type=float)
    sampling.add_argument("--top-k", type=int)
    sampling.add_argument("--seed", type=int)
    parser.add_argument("--logprobs", type=int, default=0, metavar="K", help="report the top K per token")
    parser.add_argument("--min-pixels", type=int, help="override the engine's image pixel budget")
    parser.add_argument("--max-pixels", type=int)
    parser.add_argument("--threads", type=int, help="CPU threads (default: one per core)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    parser.set_defaults(handler=run)


def run(args) -> int:
    if args.checkpoint:
        return _run_checkpoint(args)
    from runtime import Pipeline
    from runtime.errors import PromptError

    sampled = any(v is not None for v in (args.temperature, args.top_p, args.top_k))
    if args.greedy and sampled:
        raise PromptError("--greedy cannot be combined with --temperature/--top-p/--top-k")
    if args.logprobs < 0:
        raise PromptError("--logprobs must be >= 0")
    options = dict(
        max_new_tokens=args.max_new_tokens,
        do_sample=sampled,
        temperature=args.temperature if args.temperature is not None else 1.0,
        top_p=args.top_p if args.top_p is not None else 1.0,
        top_k=args.top_k or 0,
        seed=args.seed,
        min_pixels=args.min_pixels,
        max_pixels=args.max_pixels,
    )
    pipe = Pipeline.load(args.engine, threads=args.threads)
    if args.json:
        result = pipe.generate(args.prompt, images=args.image, logprobs=args.logprobs, **options)
        print(json.dumps(result.to_dict()))
        return 0
    for piece in pipe.stream(args.prompt, images=args.image, **options):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _run_checkpoint(args) -> int:
    from model_src.generate import ReferencePipeline

    answer = ReferencePipeline(args.checkpoint).answer(args.prompt, images=args.image,
                                                        max_new_tokens=args.max_new_tokens)
    if args.json:
        print(json.dumps({"text": answer.text, "token_ids": answer.token_ids,
                          "prompt_tokens": answer.prompt_tokens, "timings": answer.timings}))
    else:
        print(answer.text)
    return 0
