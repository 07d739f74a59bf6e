"""What the KV window (`--kv-window W`, runtime/kv_window.py) costs in fidelity: teacher-forced
KL of an engine under a window against the same engine with full attention, on a long text.

    python -m bench.kv_window_fidelity --engine E --text FILE --ctx 2048 --score-tokens 256 --windows 256,512,1024

The text is cut as `qwen3vl bench --text` cuts it (plain text, chunks of `ctx` tokens, the last
`score_tokens` next-token predictions of each scored). The full-attention side is that bench's own
chunk run; the windowed side prefills the chunk through the first scored position under the window
(chunks of `slack` tokens, evicting between them) and then feeds the text's own tokens one decode
step at a time, evicting as a chat would. Plain text has no system message or image: its sinks are
the first MIN_SINKS tokens. Same engine on both sides, so the figures are the window's loss alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from runtime.kv_window import KVWindow, WindowedCache
from runtime.prepare import PreparedBatch

from .text_fidelity import PositionScores, chunk_logprobs, layout, log_softmax, text_tokens


def text_batch(token_ids: np.ndarray) -> PreparedBatch:
    """One row of plain text as a prompt: every M-RoPE axis is the token's index."""
    n = len(token_ids)
    return PreparedBatch(input_ids=np.asarray(token_ids, dtype=np.int64)[None], lengths=np.array([n]),
                         position_ids=np.broadcast_to(np.arange(n, dtype=np.int64), (3, 1, n)).copy(),
                         rope_deltas=np.zeros(1, dtype=np.int64), feature_index=np.full((1, n), -1, dtype=np.int64),
                         vision=None, texts=[""])


def windowed_chunk_logprobs(backend, window: KVWindow, token_ids: np.ndarray, score_tokens: int
                            ) -> tuple[np.ndarray, int]:
    """`chunk_logprobs` under the window: (score_tokens, vocab) log-probabilities and the cache's bytes."""
    first = len(token_ids) - 1 - score_tokens
    batch = text_batch(token_ids[:first + 1])
    cache = WindowedCache(backend, batch, window)
    logits = cache.prefill(backend, batch, None)
    out = np.empty((score_tokens, logits.shape[-1]), dtype=np.float32)
    out[0] = log_softmax(logits[0])
    for k in range(1, score_tokens):
        position = np.array([first + k], dtype=np.int64)  # the token there goes in; it predicts the next
        logits = cache.decode(backend, token_ids[first + k:first + k + 1], position, position)
        out[k] = log_softmax(logits[0])
    return out, cache.cache.nbytes


def measure(engine_dir: str | Path, text: str | Path, ctx: int, score_tokens: int, windows: list[int],
            chunks: int = 1, threads: int | None = None, progress=lambda message: None) -> dict:
    from runtime.backends import open_backend
    from runtime.engine_manifest import load_manifest

    manifest = load_manifest(engine_dir)
    pieces = layout(text_tokens(Path(engine_dir) / manifest.files["tokenizer"], text), ctx, chunks, score_tokens)
    m = manifest.model
    backend = open_backend("ort", engine_dir, manifest, threads)
    rows, started = [], time.perf_counter()
    try:
        full = []
        for i in range(pieces.chunks):
            progress(f"full attention, chunk {i + 1}/{pieces.chunks} ({time.perf_counter() - started:.0f} s)")
            full.append(chunk_logprobs(backend, pieces.token_ids[i], score_tokens))
        full_bytes = backend.new_cache(1, ctx).nbytes
        rows.append({"window": None, "kv_bytes": full_bytes, "seconds": round(time.perf_counter() - started, 1)})
        for w in windows:
            window = KVWindow(w, min(512, max(16, w // 4)), m.vision_end_token_id)
            start, parts = time.perf_counter(), []
            for i in range(pieces.chunks):
                progress(f"window {w}, chunk {i + 1}/{pieces.chunks} ({time.perf_counter() - started:.0f} s)")
                logprobs, nbytes = windowed_chunk_logprobs(backend, window, pieces.token_ids[i], score_tokens)
                parts.append(PositionScores.of(full[i], logprobs, pieces.targets(i)))
            summary = PositionScores.concatenate(parts).summary()
            rows.append({"window": w, "slack": window.slack, "kv_bytes": nbytes,
                         "seconds": round(time.perf_counter() - start, 1), **summary})
    finally:
        backend.close()
    return {"engine": str(engine_dir), "precision": manifest.precision, "text": str(text), "ctx": ctx,
            "score_tokens": score_tokens, "chunks": pieces.chunks, "threads": threads, "rows": rows}


def markdown(report: dict) -> str:
    lines = ["| window W (slack) | KV cache | mean KL (nats) | p99 KL | top-1 agreement | PPL full | PPL windowed | s |",
             "|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        mib = f"{row['kv_bytes'] / 2**20:.1f} MiB" if row["kv_bytes"] >= 2**20 else f"{row['kv_bytes'] >> 10} KiB"
        if row["window"] is None:
            lines.append(f"| full ({report['ctx']}) | {mib} | - | - | - | - | - | {row['seconds']} |")
        else:
            lines.append(f"| {row['window']} ({row['slack']}) | {mib} | {row['mean_kl']:.4f} ± "
                         f"{row['mean_kl_stderr']:.4f} | {row['p99_kl']:.4f} | {row['top1_agreement']:.3f} | "
                         f"{row['reference_ppl']:.1f} | {row['engine_ppl']:.1f} | {row['seconds']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kv_window_fidelity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", required=True)
    parser.add_argument("--text", required=True, help="a long UTF-8 text file")
    parser.add_argument("--ctx", type=int, default=2048, help="tokens per chunk")
    parser.add_argument("--score-tokens", type=int, default=256, help="scored predictions at the end of each chunk")
    parser.add_argument("--windows", default="256,512,1024", help="comma-separated window sizes W")
    parser.add_argument("--chunks", type=int, default=1)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--json", help="also write the report as JSON to this file")
    args = parser.parse_args(argv)
    from runtime.errors import Qwen3VLError

    try:
        windows = [int(w) for w in args.windows.split(",") if w.strip()]
        report = measure(args.engine, args.text, args.ctx, args.score_tokens, windows, args.chunks, args.threads,
                         progress=lambda message: print(f"kv window fidelity: {message}", file=sys.stderr, flush=True))
    except (Qwen3VLError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
