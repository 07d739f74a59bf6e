"""Decode speed with a long context in the cache, engines side by side (`python -m bench.decode_at_context`).

Each engine's cache holds `--context` tokens, then `--steps` decode steps are timed (after two
untimed ones); the engines take turns, round after round (A B A B ...), so a change in the machine's
load falls on all of them alike. The context is written straight into the cache as random values
of the cache's type (int8 caches: random int8): a decode step's cost depends on how many keys it
reads, not on their values, and a real prefill of 4k tokens would take minutes per engine on a
laptop's cores. Fidelity at that context is measured separately (`qwen3vl bench --text --ctx`).

  python -m bench.decode_at_context --engine E1 --engine E2 --context 4000 --steps 32 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np


def fill(cache, context: int, rng: np.random.Generator) -> None:
    for buffer in cache.buffers:
        part = buffer[:, :, :context]
        if buffer.dtype == np.int8:
            part[...] = rng.integers(-100, 101, size=part.shape, dtype=np.int8)
        else:
            part[...] = rng.standard_normal(part.shape, dtype=np.float32).astype(buffer.dtype)


def decode_tokens_per_s(pipe, context: int, steps: int, seed: int = 0) -> float:
    backend = pipe.backend
    cache = backend.new_cache(1, context + steps + 2)
    fill(cache, context, np.random.default_rng(seed))
    token = np.array([pipe.prompts.tokenizer.token_to_id("The") or 0], dtype=np.int64)
    start = None
    for i in range(steps + 2):
        if i == 2:
            start = time.perf_counter()
        past = np.array([context + i], dtype=np.int64)
        backend.decode(cache, token, past, past)
    return steps / (time.perf_counter() - start)


def kv_bytes_per_token(pipe) -> int:
    m = pipe.manifest.model
    itemsize = np.dtype(getattr(pipe.backend, "kv_dtype", None) or pipe.backend.decoder_dtype).itemsize
    return 2 * m.num_hidden_layers * m.num_key_value_heads * m.head_dim * itemsize


def main(argv: list[str] | None = None) -> int:
    from runtime import Pipeline
    from runtime.errors import Qwen3VLError

    parser = argparse.ArgumentParser(prog="python -m bench.decode_at_context", description=__doc__.splitlines()[0])
    parser.add_argument("--engine", action="append", required=True, help="engine folder (repeat for each engine)")
    parser.add_argument("--context", type=int, default=4000, help="tokens in the cache before the timed steps")
    parser.add_argument("--steps", type=int, default=32, help="timed decode steps per run")
    parser.add_argument("--rounds", type=int, default=3, help="runs per engine, taking turns; medians are reported")
    parser.add_argument("--threads", type=int, help="CPU threads (default: one per physical core)")
    parser.add_argument("--json", action="store_true", help="one JSON object per engine")
    args = parser.parse_args(argv)
    try:
        if args.context < 1 or args.steps < 1 or args.rounds < 1:
            raise Qwen3VLError("--context, --steps and --rounds must be >= 1")
        pipes = [Pipeline.load(engine, backend="ort", threads=args.threads) for engine in args.engine]
        for engine, pipe in zip(args.engine, pipes):
            if args.context + args.steps + 2 > pipe.manifest.max_context:
                raise Qwen3VLError(f"{engine}: --context {args.context} + steps exceed its context of "
                                   f"{pipe.manifest.max_context}")
    except Qwen3VLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    speeds = [[] for _ in pipes]
    for round_ in range(args.rounds):
        for i, pipe in enumerate(pipes):
            speeds[i].append(decode_tokens_per_s(pipe, args.context, args.steps, seed=round_))
            print(f"round {round_ + 1}: {args.engine[i]} {speeds[i][-1]:.2f} tok/s", file=sys.stderr, flush=True)
    rows = [{"engine": engine, "precision": pipe.manifest.precision, "kv_dtype": pipe.manifest.kv_dtype or "fp32",
             "kv_bytes_per_token": kv_bytes_per_token(pipe), "context": args.context, "steps": args.steps,
             "decode_tokens_per_s": round(statistics.median(s), 3), "runs": [round(x, 3) for x in s]}
            for engine, pipe, s in zip(args.engine, pipes, speeds)]
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(f"decode at {args.context} tokens of context, {args.steps} steps, median of {args.rounds} "
              f"interleaved runs")
        for row in rows:
            print(f"  {row['engine']}: {row['decode_tokens_per_s']:.2f} tok/s (runs {row['runs']}), KV "
                  f"{row['kv_dtype']} {row['kv_bytes_per_token']} B/token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
