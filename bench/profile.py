"""Where the engine's time goes per op type: ONNX Runtime's profiler over the vision encoder, the
prefill and a few decode steps of the bench's own inputs (`qwen3vl bench --profile`)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path


from runtime.generate import decode_one_token, encode_images, prefill
from runtime.ort_backend import OrtBackend
from runtime.prepare import PreparedBatch


def profile_engine(engine_dir: Path, manifest, batch: PreparedBatch, threads: int | None,
                   decode_steps: int = 8) -> dict:
    """Per-op time of the vision encoder and the prefill (each on the run after a warm-up run:
    first-run allocations are not kernel time) and of `decode_steps` greedy decode steps, on a
    backend of its own with profiling on (profiling is a session option)."""
    with tempfile.TemporaryDirectory(prefix="qwen3vl-profile-") as folder:
        backend = OrtBackend(engine_dir, manifest, threads, profile_prefix=str(Path(folder) / "profile-"))
        for _ in range(2):
            features = encode_images(backend, batch)
            cache = backend.new_cache(batch.batch, batch.longest + decode_steps)
            logits = prefill(backend, cache, batch, features)
        past_lengths = batch.lengths.copy()
        for _ in range(decode_steps):
            logits = decode_one_token(backend, cache, batch, logits.argmax(-1), past_lengths)
            past_lengths = past_lengths + 1
        files = backend.end_profiling()
        backend.close()
        vision_runs = _runs(_read_profile(files["vision"]))
        decoder_runs = _runs(_read_profile(files["decoder"]))
    return {
        "vision": _op_summary(vision_runs[-1:]),
        "prefill": _op_summary(decoder_runs[1:2]),
        "decode": _op_summary(decoder_runs[2:]),
    }


def _read_profile(path: str) -> list:
    with open(path) as f:
        return json.load(f)


def _runs(events: list) -> list[list[dict]]:
    """The profile's kernel events grouped by session run (model_run), in time order."""
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    kernels = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    grouped = []
    for run in runs:
        begin, end = run["ts"], run["ts"] + run["dur"]
        grouped.append({"run_us": run["dur"],
                        "kernels": [e for e in kernels if begin <= e["ts"] <= end]})
    return grouped


def _op_summary(runs: list[dict]) -> dict:
    """Time per op type over the given runs: ms per run, share of all kernel time, node executions."""
    totals: dict[str, list] = {}
    for run in runs:
        for event in run["kernels"]:
            entry = totals.setdefault(event.get("args", {}).get("op_name", "?"), [0, 0])
            entry[0] += event["dur"]
            entry[1] += 1
    kernel_us = sum(us for us, _ in totals.values())
    count = max(1, len(runs))
    ops = [{"op": op, "ms": round(us / 1000 / count, 3), "share": round(us / kernel_us, 4) if kernel_us else 0.0,
            "calls": calls // count}
           for op, (us, calls) in sorted(totals.items(), key=lambda item: -item[1][0])]
    return {"runs": len(runs), "run_ms": round(sum(r["run_us"] for r in runs) / 1000 / count, 3),
            "kernel_ms": round(kernel_us / 1000 / count, 3), "ops": ops}


