"""`qwen3vl bench --reuse`: what the prefix and image cache saves on a follow-up question.

A conversation about one image: the first turn (the bench prompt and image, answered greedily),
then a follow-up question of about 20 tokens in the same conversation. The follow-up's time to first
token is measured cold (a Pipeline without the cache over the same backend: vision encoder and the
whole conversation's prefill) and warm (after the first turn was answered with the cache on), in
the same process, one right after the other.
"""

from __future__ import annotations

import statistics

FOLLOW_UP = "Looking at the same picture again, which colour covers most of it? Answer in one short sentence."


def _user(text: str, images: list) -> dict:
    return {"role": "user", "content": [{"type": "image", "image": image} for image in images]
            + [{"type": "text", "text": text}]}


def measure_reuse(pipe, image, prompt: str, runs: int, min_pixels=None, max_pixels=None, first_tokens: int = 8) -> dict:
    """Median cold and warm TTFT of the follow-up over `runs`, the cached and new prompt tokens, and
    the cache's hit/miss counts by input type."""
    from runtime import Pipeline

    if pipe.prefix_cache is None:
        raise ValueError("the pipeline has no prefix cache (cache_memory=0)")
    cold_pipe = Pipeline(pipe.engine_dir, pipe.manifest, pipe.backend, pipe.prefill_chunk, cache_memory=0)
    options = dict(do_sample=False, min_pixels=min_pixels, max_pixels=max_pixels)
    cold_ms, warm_ms, same = [], [], True
    for _ in range(runs):
        pipe.prefix_cache.clear()
        first_chat = [_user(prompt, [image])]
        first = pipe.generate(first_chat, max_new_tokens=first_tokens, **options)
        chat = first_chat + [{"role": "assistant", "content": first.text}, _user(FOLLOW_UP, [])]
        cold = cold_pipe.generate(chat, max_new_tokens=1, **options)
        warm = pipe.generate(chat, max_new_tokens=1, **options)
        same = same and warm.token_ids == cold.token_ids
        cold_ms.append(cold.timings["ttft_ms"])
        warm_ms.append(warm.timings["ttft_ms"])
    cold_ttft, warm_ttft = statistics.median(cold_ms), statistics.median(warm_ms)
    return {
        "follow_up_prompt_tokens": warm.prompt_tokens,
        "follow_up_cached_tokens": warm.cached_tokens,
        "follow_up_new_tokens": warm.prompt_tokens - warm.cached_tokens,
        "cold_ttft_ms": round(cold_ttft, 3),
        "warm_ttft_ms": round(warm_ttft, 3),
        "warm_over_cold": round(warm_ttft / cold_ttft, 4),
        "same_first_token": same,
        "cache": pipe.reuse_stats(),
    }


def reuse_line(reuse: dict) -> str:
    cache = reuse["cache"]
    counts = ", ".join(f"{kind} {cache[kind]['hits']}/{cache[kind]['misses']}"
                       for kind in ("text", "image", "image_features"))
    return (f"follow-up question ({reuse['follow_up_new_tokens']} new tokens after {reuse['follow_up_cached_tokens']} "
            f"from the cache): TTFT cold {reuse['cold_ttft_ms']:.1f} ms, warm {reuse['warm_ttft_ms']:.1f} ms "
            f"({reuse['warm_over_cold']:.3f}x), first token {'the same' if reuse['same_first_token'] else 'DIFFERENT'}; "
            f"cache hits/misses {counts}")
