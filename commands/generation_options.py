"""The flags that shape an answer, shared by the commands that answer (`run`, `chat`): new tokens,
sampling, and the image pixel budget."""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=256)
    sampling = parser.add_argument_group("sampling (default: the checkpoint's generation_config.json)")
    sampling.add_argument("--greedy", action="store_true", help="pick the most likely token")
    sampling.add_argument("--temperature", type=float, help="sample, with this temperature")
    sampling.add_argument("--top-p", type=float, help="sample, from the smallest set of tokens with this mass")
    sampling.add_argument("--top-k", type=int, help="sample, from the K most likely tokens")
    sampling.add_argument("--seed", type=int)
    parser.add_argument("--min-pixels", type=int, help="override the engine's image pixel budget")
    parser.add_argument("--max-pixels", type=int)


def options(args) -> dict:
    """The keyword arguments of Pipeline.generate / stream that the flags give."""
    from runtime.errors import PromptError

    sampled = any(v is not None for v in (args.temperature, args.top_p, args.top_k))
    if args.greedy and sampled:
        raise PromptError("--greedy cannot be combined with --temperature/--top-p/--top-k")
    return dict(
        max_new_tokens=args.max_new_tokens,
        do_sample=False if args.greedy else True if sampled else None,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        min_pixels=args.min_pixels,
        max_pixels=args.max_pixels,
    )
