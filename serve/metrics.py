"""Prometheus text exposition of the server's counters (no client library: a handful of lines)."""

from __future__ import annotations

import collections
import threading
import time


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests = 0
        self.completion_tokens = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.ttft_sum = 0.0
        self.ttft_count = 0
        self._recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens) of the last minute

    def request(self) -> None:
        with self._lock:
            self.requests += 1

    def error(self, kind: str) -> None:
        with self._lock:
            self.errors[kind] += 1

    def finished(self, tokens: int, ttft_s: float) -> None:
        now = time.monotonic()
        with self._lock:
            self.completion_tokens += tokens
            self.ttft_sum += ttft_s
            self.ttft_count += 1
            self._recent.append((now, tokens))

    def render(self, queue_depth: int, running: int, reuse: dict | None = None) -> str:
        """`reuse`: the pipeline's prefix cache counts (Pipeline.reuse_stats), None when it has none."""
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - 60:
                self._recent.popleft()
            rate = sum(t for _, t in self._recent) / 60.0
            lines = [
                "# HELP qwen3vl_requests_total Chat completion requests accepted.",
                "# TYPE qwen3vl_requests_total counter",
                f"qwen3vl_requests_total {self.requests}",
                "# HELP qwen3vl_queue_depth Requests waiting for a batch.",
                "# TYPE qwen3vl_queue_depth gauge",
                f"qwen3vl_queue_depth {queue_depth}",
                "# HELP qwen3vl_running_requests Requests in the batch now generating.",
                "# TYPE qwen3vl_running_requests gauge",
                f"qwen3vl_running_requests {running}",
                "# HELP qwen3vl_completion_tokens_total Tokens generated.",
                "# TYPE qwen3vl_completion_tokens_total counter",
                f"qwen3vl_completion_tokens_total {self.completion_tokens}",
                "# HELP qwen3vl_tokens_per_second Tokens generated per second over the last minute.",
                "# TYPE qwen3vl_tokens_per_second gauge",
                f"qwen3vl_tokens_per_second {rate:.3f}",
                "# HELP qwen3vl_time_to_first_token_seconds Time to first token of finished requests.",
                "# TYPE qwen3vl_time_to_first_token_seconds summary",
                f"qwen3vl_time_to_first_token_seconds_sum {self.ttft_sum:.6f}",
                f"qwen3vl_time_to_first_token_seconds_count {self.ttft_count}",
                "# HELP qwen3vl_errors_total Errors by kind.",
                "# TYPE qwen3vl_errors_total counter",
            ]
            lines += [f'qwen3vl_errors_total{{kind="{kind}"}} {n}' for kind, n in sorted(self.errors.items())]
        if reuse is not None:
            lines += _reuse_lines(reuse)
        return "\n".join(lines) + "\n"


def _reuse_lines(reuse: dict) -> list[str]:
    lines = [
        "# HELP qwen3vl_prefix_cache_lookups_total Prompt rows looked up in the prefix cache, by input type and result.",
        "# TYPE qwen3vl_prefix_cache_lookups_total counter",
    ]
    for kind in ("text", "image"):
        lines += [f'qwen3vl_prefix_cache_lookups_total{{input="{kind}",result="{result}"}} {reuse[kind][key]}'
                  for result, key in (("hit", "hits"), ("miss", "misses"))]
    lines += ["# HELP qwen3vl_prefix_cache_cached_tokens_total Prompt tokens served from the prefix cache.",
              "# TYPE qwen3vl_prefix_cache_cached_tokens_total counter"]
    lines += [f'qwen3vl_prefix_cache_cached_tokens_total{{input="{kind}"}} {reuse[kind]["cached_tokens"]}'
              for kind in ("text", "image")]
    lines += ["# HELP qwen3vl_image_feature_cache_lookups_total Images looked up in the vision feature cache.",
              "# TYPE qwen3vl_image_feature_cache_lookups_total counter"]
    lines += [f'qwen3vl_image_feature_cache_lookups_total{{result="{result}"}} {reuse["image_features"][key]}'
              for result, key in (("hit", "hits"), ("miss", "misses"))]
    lines += ["# HELP qwen3vl_prefix_cache_bytes Bytes held by the prefix and image cache.",
              "# TYPE qwen3vl_prefix_cache_bytes gauge",
              f"qwen3vl_prefix_cache_bytes {reuse['bytes']}",
              "# HELP qwen3vl_prefix_cache_evictions_total Entries evicted to stay within the budget.",
              "# TYPE qwen3vl_prefix_cache_evictions_total counter",
              f"qwen3vl_prefix_cache_evictions_total {reuse['evictions']}"]
    return lines
