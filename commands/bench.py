"""`qwen3vl bench`: speed and memory of an engine, optionally side by side with transformers.

Each system is measured in a child process (commands/bench_worker.py) so that peak RSS is per
system; this process only validates inputs, runs the children and reports medians.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

FIGURES = ("vision_ms", "prefill_ms", "ttft_ms", "decode_tokens_per_s", "peak_rss_mb")
EXTRA_KEYS = ("threads", "image_tokens", "prompt_tokens", "new_tokens")
DEFAULT_PROMPT = "Describe this image."
# The image shipped with the project: <repo>/assets/sample.png, beside the commands package.
SAMPLE_IMAGE = Path(__file__).resolve().parent.parent / "assets" / "sample.png"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="measure an engine's speed and memory (optionally vs transformers)")
    parser.add_argument("--engine", required=True, help="engine folder from `qwen3vl build`")
    parser.add_argument("--checkpoint", help="also measure transformers (fp32, CPU) on this checkpoint folder")
    parser.add_argument("--image", help=f"image file (default: the bundled {SAMPLE_IMAGE.name})")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens to decode, greedy (default 32)")
    parser.add_argument("--threads", type=int, help="CPU threads for both systems (default: one per physical core)")
    parser.add_argument("--runs", type=int, default=1, help="timed runs after one warm-up; medians are reported")
    parser.add_argument("--json", action="store_true", help="one JSON object per system, one per line")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from runtime.engine_manifest import load_manifest
    from runtime.errors import ImageError, PromptError
    from runtime.image_processing import load_image

    if args.max_new_tokens < 2:
        raise PromptError("--max-new-tokens must be >= 2 (decode speed needs a token after the first)")
    if args.runs < 1:
        raise PromptError("--runs must be >= 1")
    if args.threads is not None and args.threads < 1:
        raise PromptError("--threads must be >= 1")
    # Fail fast, before minutes of loading, on what can be checked cheaply here.
    load_manifest(args.engine)
    if args.checkpoint is not None:
        from model_src.config import load_config

        load_config(args.checkpoint)
    image = args.image
    if image is None:
        if not SAMPLE_IMAGE.is_file():
            raise ImageError(f"no --image given and the bundled sample image is missing ({SAMPLE_IMAGE})")
        image = str(SAMPLE_IMAGE)
    load_image(image).close()

    # Both systems get the same explicit thread count, so neither wins by using more cores.
    threads = args.threads or physical_cores()
    # "--opt=value" so that a prompt starting with "-" is not taken for an option by the child.
    common = [f"--image={Path(image).resolve()}", f"--prompt={args.prompt}",
              "--max-new-tokens", str(args.max_new_tokens), "--threads", str(threads), "--runs", str(args.runs)]
    reports = [_run_worker("engine", ["--engine", str(Path(args.engine).resolve())] + common)]
    if args.checkpoint is not None:
        reports.append(_run_worker("transformers", ["--checkpoint", str(Path(args.checkpoint).resolve())] + common))
    rows = [_summarise(report) for report in reports]

    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(_table(rows, image, args.runs, [r.get("token_ids") for r in reports]))
    if len(rows) == 2 and (rows[0]["prompt_tokens"], rows[0]["image_tokens"]) != (rows[1]["prompt_tokens"],
                                                                                   rows[1]["image_tokens"]):
        print("warning: the engine and the checkpoint turned the inputs into different token counts "
              "(was the engine built from another checkpoint?)", file=sys.stderr)
    return 0


def physical_cores() -> int:
    """Distinct (package, core) pairs in /proc/cpuinfo: hyper-threads do not speed up these kernels."""
    try:
        cores, package = set(), None
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "physical id":
                    package = value.strip()
                elif key == "core id":
                    cores.add((package, value.strip()))
        if cores:
            return len(cores)
    except OSError:
        pass
    return os.cpu_count() or 1


def _run_worker(system: str, worker_args: list[str]) -> dict:
    from runtime.engine_manifest import EngineError
    from runtime.errors import CheckpointError, ImageError, PromptError, Qwen3VLError

    # -m needs the project importable; it is when installed, and the repo root covers a plain checkout.
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-m", "commands.bench_worker", system] + worker_args,
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


def _summarise(report: dict) -> dict:
    """Median of each timed figure over the runs, plus the facts about the inputs."""
    row = {"system": report["system"]}
    for key in FIGURES[:-1]:
        row[key] = round(statistics.median(run[key] for run in report["runs"]), 3)
    row["peak_rss_mb"] = round(report["peak_rss_mb"], 1)
    for key in EXTRA_KEYS + ("backend", "precision", "load_ms"):
        row[key] = round(report[key], 1) if key == "load_ms" else report[key]
    return row


def _table(rows: list[dict], image: str, runs: int, token_ids: list) -> str:
    first = rows[0]
    lines = [f"image {image}: {first['image_tokens']} image tokens, {first['prompt_tokens']} prompt tokens, "
             f"{first['new_tokens']} new tokens (greedy), {first['threads']} threads, "
             f"median of {runs} run{'s' if runs != 1 else ''} after a warm-up"]
    header = [""] + [row["system"] for row in rows]
    sub = [""] + [f"{row['backend']} {row['precision']}" for row in rows]
    body = [[key] + [_number(row[key]) for row in rows] for key in FIGURES]
    table = [header, sub] + body
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for r in table:
        lines.append("  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i])
                               for i, cell in enumerate(r)).rstrip())
    if len(token_ids) == 2:
        a, b = token_ids
        differ = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        lines.append("greedy tokens: identical" if differ is None and len(a) == len(b)
                     else f"greedy tokens: differ from new token {differ if differ is not None else min(len(a), len(b))}")
    return "\n".join(lines)


def _number(value: float) -> str:
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"
