"""Load against a running `qwen3vl serve`: N streamed requests at each concurrency, reporting
requests/s, generated tokens/s, time to first token and latency p50/p95, and errors.

    python -m serve.load_test --url http://127.0.0.1:8000 [--requests 16] [--concurrency 1,4,8]
        [--max-tokens 32] [--image assets/sample.png] [--api-key K] [--json]
"""

from __future__ import annotations

import argparse
import base64
import json
import time
from concurrent.futures import ThreadPoolExecutor


def one_request(url: str, body: dict, headers: dict) -> dict:
    import httpx

    start, first, tokens = time.perf_counter(), None, 0
    try:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=headers, timeout=600) as r:
            if r.status_code != 200:
                r.read()
                return {"error": f"HTTP {r.status_code}"}
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"error": chunk["error"].get("code") or "error"}
                choice = (chunk.get("choices") or [{}])[0]
                if first is None and choice.get("delta", {}).get("content"):
                    first = time.perf_counter()
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except Exception as exc:  # a refused or dropped connection counts as an error, the run goes on
        return {"error": type(exc).__name__}
    end = time.perf_counter()
    return {"latency": end - start, "ttft": (first or end) - start, "tokens": tokens}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")


def run(url: str, requests: int, concurrency: int, body: dict, headers: dict) -> dict:
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda _: one_request(url, body, headers), range(requests)))
    wall = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    return {"concurrency": concurrency, "requests": requests, "wall_s": wall,
            "requests_per_s": len(ok) / wall, "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
            "ttft_p50_s": percentile([r["ttft"] for r in ok], 0.5), "ttft_p95_s": percentile([r["ttft"] for r in ok], 0.95),
            "latency_p50_s": percentile([r["latency"] for r in ok], 0.5),
            "latency_p95_s": percentile([r["latency"] for r in ok], 0.95),
            "errors": len(results) - len(ok)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--concurrency", default="1,4,8")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompt", default="Describe this image.")
    parser.add_argument("--image", help="an image file sent with every request (as a data: URL)")
    parser.add_argument("--api-key")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    content = [{"type": "text", "text": args.prompt}]
    if args.image:
        with open(args.image, "rb") as f:
            content.insert(0, {"type": "image_url",
                               "image_url": {"url": "data:image/png;base64," + base64.b64encode(f.read()).decode()}})
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": args.max_tokens, "temperature": 0,
            "stream": True}
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    rows = [run(args.url, args.requests, int(c), body, headers) for c in args.concurrency.split(",")]
    if args.json:
        print(json.dumps(rows))
        return 0
    print("| concurrency | requests/s | tokens/s | TTFT p50 | TTFT p95 | latency p50 | latency p95 | errors |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | {r['ttft_p50_s']:.2f} s | "
              f"{r['ttft_p95_s']:.2f} s | {r['latency_p50_s']:.2f} s | {r['latency_p95_s']:.2f} s | {r['errors']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
