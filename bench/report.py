"""Running one bench child process per system, and turning their reports into rows and a table."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

FIGURES = ("vision_ms", "prefill_ms", "ttft_ms", "decode_tokens_per_s", "peak_rss_mb")
EXTRA_KEYS = ("threads", "image_tokens", "prompt_tokens", "new_tokens")
FIDELITY_KEYS = ("top1_agreement", "mean_kl", "max_kl", "positions", "image_positions")
PROFILE_TOP = 6  # op types shown per graph in the table (--json has them all)


def run_worker(system: str, worker_args: list[str]) -> dict:
    from runtime.engine_manifest import EngineError
    from runtime.errors import CheckpointError, ImageError, PromptError, Qwen3VLError

    # -m needs the project importable; it is when installed, and the repo root covers a plain checkout.
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-m", "bench.worker", system] + worker_args,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    try:
        report = json.loads(lines[-1]) if lines else None
    except ValueError:
        report = None
    if isinstance(report, dict) and "error" not in report and proc.returncode == 0:
        return report
    known = isinstance(report, dict) and report.get("type") not in (None, "internal")
    if not known and proc.stderr.strip():  # a crash or a bug: its traceback helps; a user error is one line
        sys.stderr.write(proc.stderr if proc.stderr.endswith("\n") else proc.stderr + "\n")
    if not isinstance(report, dict) or "error" not in report:
        if proc.returncode < 0:
            raise Qwen3VLError(f"the {system} benchmark process was killed by signal {-proc.returncode}"
                               + (" (out of memory?)" if proc.returncode == -9 else ""))
        raise Qwen3VLError(f"the {system} benchmark process failed (exit status {proc.returncode})")
    kinds = {"EngineError": EngineError, "CheckpointError": CheckpointError, "ImageError": ImageError,
             "PromptError": PromptError}
    if report.get("type") == "MemoryError":
        raise MemoryError
    if report.get("type") == "internal":
        raise Qwen3VLError(f"the {system} benchmark failed: {report['error']}")
    raise kinds.get(report.get("type"), Qwen3VLError)(report["error"])


def summarise(report: dict, bandwidth: dict) -> dict:
    """Median of each timed figure over the runs, plus the facts about the inputs, the machine's
    bandwidth and what follows from it, and fidelity and profile when measured."""
    row = {"system": report["system"]}
    for key in FIGURES[:-1]:
        row[key] = round(statistics.median(run[key] for run in report["runs"]), 3)
    row["peak_rss_mb"] = round(report["peak_rss_mb"], 1)
    for key in EXTRA_KEYS + ("backend", "precision", "load_ms"):
        row[key] = round(report[key], 1) if key == "load_ms" else report[key]
    row.update(bandwidth)
    row["weight_bytes_per_token"] = report["weight_bytes_per_token"]
    if "kv_bytes_per_token" in report:  # the engine's, in its stored type (qwen3vl build --kv-dtype)
        row["kv_bytes_per_token"] = report["kv_bytes_per_token"]
    # Bytes per second the decode loop pulls from memory, as a fraction of what memory delivers.
    efficiency = row["weight_bytes_per_token"] * row["decode_tokens_per_s"] / (bandwidth["bandwidth_gb_s"] * 1e9)
    row["decode_efficiency"] = float(f"{efficiency:.4g}")
    if "fidelity" in report:
        fidelity = report["fidelity"]
        row.update({key: round(fidelity[key], 6) if isinstance(fidelity[key], float) else fidelity[key]
                    for key in FIDELITY_KEYS})
    if "profile" in report:
        row["profile"] = report["profile"]
    if "reuse" in report:
        row["reuse"] = report["reuse"]
    return row


def table(rows: list[dict], image: str, runs: int, token_ids: list, bandwidth: dict) -> str:
    first = rows[0]
    lines = [f"image {image}: {first['image_tokens']} image tokens, {first['prompt_tokens']} prompt tokens, "
             f"{first['new_tokens']} new tokens (greedy), {first['threads']} threads, "
             f"median of {runs} run{'s' if runs != 1 else ''} after a warm-up",
             f"memory read bandwidth {bandwidth['bandwidth_gb_s']:.1f} GB/s with {first['threads']} thread(s), "
             f"{bandwidth['bandwidth_1thread_gb_s']:.1f} GB/s with one"]
    header = [""] + [row["system"] for row in rows]
    sub = [""] + [f"{row['backend']} {row['precision']}" for row in rows]
    body = [[key] + [_number(row[key]) for row in rows] for key in FIGURES]
    body.append(["weight_mb_per_token"] + [_number(row["weight_bytes_per_token"] / 1e6) for row in rows])
    body.append(["decode_efficiency"] + [f"{row['decode_efficiency']:.3f}" for row in rows])
    body.append(["kv_bytes_per_token"] + [str(row["kv_bytes_per_token"]) if "kv_bytes_per_token" in row else "-"
                                          for row in rows])
    if "top1_agreement" in first:
        body.append(["top1_agreement"] + [f"{row['top1_agreement']:.4f}" if "top1_agreement" in row else "-"
                                          for row in rows])
        body.append(["mean_kl"] + [f"{row['mean_kl']:.3g}" if "mean_kl" in row else "-" for row in rows])
    table = [header, sub] + body
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for r in table:
        lines.append("  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i])
                               for i, cell in enumerate(r)).rstrip())
    if "top1_agreement" in first:
        lines.append(f"fidelity vs the reference: {first['positions']} teacher-forced positions "
                     f"({first['image_positions']} of them image tokens), max KL {first['max_kl']:.3g}")
    if len(token_ids) == 2:
        a, b = token_ids
        differ = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        lines.append("greedy tokens: identical" if differ is None and len(a) == len(b)
                     else f"greedy tokens: differ from new token {differ if differ is not None else min(len(a), len(b))}")
    if "reuse" in first:
        from bench.reuse import reuse_line

        lines.append(reuse_line(first["reuse"]))
    if "profile" in first:
        for graph, summary in first["profile"].items():
            per = "per step" if graph == "decode" else "one run"
            ops = ", ".join(f"{op['op']} {100 * op['share']:.1f}%" for op in summary["ops"][:PROFILE_TOP])
            lines.append(f"profile {graph} ({per}: {summary['run_ms']:.1f} ms, kernels {summary['kernel_ms']:.1f} ms): "
                         f"{ops}")
    return "\n".join(lines)


def _number(value: float) -> str:
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"
