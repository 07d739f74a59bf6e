"""`qwen3vl bench`: speed and memory of an engine, optionally side by side with transformers, plus
the machine's memory bandwidth (and so decode efficiency), with --reference the engine's fidelity to
an FP32 engine, and with --profile where the time goes per op.

Each system is measured in a child process (commands/bench_worker.py) so that peak RSS is per
system; this process only validates inputs, measures bandwidth, runs the children one at a time
and reports medians.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

FIGURES = ("vision_ms", "prefill_ms", "ttft_ms", "decode_tokens_per_s", "peak_rss_mb")
EXTRA_KEYS = ("threads", "image_tokens", "prompt_tokens", "new_tokens")
FIDELITY_KEYS = ("top1_agreement", "mean_kl", "max_kl", "positions", "image_positions")
DEFAULT_PROMPT = "Describe this image."
# The image shipped with the project: <repo>/assets/sample.png, beside the commands package.
SAMPLE_IMAGE = Path(__file__).resolve().parent.parent / "assets" / "sample.png"
PROFILE_TOP = 6  # op types shown per graph in the table (--json has them all)

EPILOG = """Comparing builds: build one engine per precision from the same checkpoint and run bench once per
engine, each against the FP32 engine, e.g.
  qwen3vl build --checkpoint CK --out eng-fp32
  qwen3vl build --checkpoint CK --out eng-int4 --precision int4
  qwen3vl bench --engine eng-int4 --reference eng-fp32 --image-size 448x448 --threads 2 --profile --json
--reference runs the reference in a process of its own after the engine's, so the two need not fit
in memory together. Fidelity: the bench image and prompt plus filler text, fed one token per
decoder call after a prefill up to the token before the image, so the measured positions start
with the image tokens; top-1 agreement and mean KL(P_ref || P_engine) in nats over --positions.
Decode efficiency = weight bytes read per token x decode tok/s / memory read bandwidth (measured
in the same run with --threads threads streaming a 1 GiB array; 1.0 = at the memory's speed).
"""


def add_parser(subparsers) -> None:
    import argparse

    parser = subparsers.add_parser("bench", help="measure an engine's speed and memory (optionally vs transformers)",
                                   epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", required=True, help="engine folder from `qwen3vl build`")
    parser.add_argument("--checkpoint", help="also measure transformers (fp32, CPU) on this checkpoint folder")
    image = parser.add_mutually_exclusive_group()
    image.add_argument("--image", help=f"image file (default: the bundled {SAMPLE_IMAGE.name})")
    image.add_argument("--image-size", metavar="WxH",
                       help="instead of a file, a deterministic synthetic picture of this size, e.g. 448x448")
    parser.add_argument("--min-pixels", type=int, help="override the engine's image pixel budget (both systems)")
    parser.add_argument("--max-pixels", type=int)
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--reference", metavar="ENGINE_DIR",
                        help="an FP32 engine of the same checkpoint: report --engine's top-1 agreement and mean KL "
                             "against it over teacher-forced positions")
    parser.add_argument("--positions", type=int, default=256,
                        help="teacher-forced positions for --reference (default 256)")
    parser.add_argument("--profile", action="store_true",
                        help="ONNX Runtime's per-op profile of the vision encoder, the prefill and decode")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens to decode, greedy (default 32)")
    parser.add_argument("--threads", type=int, help="CPU threads for both systems (default: one per physical core)")
    parser.add_argument("--runs", type=int, default=1, help="timed runs after one warm-up; medians are reported")
    parser.add_argument("--json", action="store_true", help="one JSON object per system, one per line (all "
                                                                  "figures, the full profiles included)")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from runtime.engine_manifest import load_manifest
    from runtime.errors import ImageError, PromptError, Qwen3VLError
    from runtime.image_processing import load_image

    from .bench_bandwidth import decoder_weight_bytes, measure

    if args.max_new_tokens < 2:
        raise PromptError("--max-new-tokens must be >= 2 (decode speed needs a token after the first)")
    if args.runs < 1:
        raise PromptError("--runs must be >= 1")
    if args.threads is not None and args.threads < 1:
        raise PromptError("--threads must be >= 1")
    if args.positions < 1:
        raise PromptError("--positions must be >= 1")
    # Fail fast, before minutes of loading, on what can be checked cheaply here.
    manifest = load_manifest(args.engine)
    manifest.image_processor.with_budget(args.min_pixels, args.max_pixels)  # raises on a bad budget
    if args.reference is not None:
        reference = load_manifest(args.reference)
        if reference.model != manifest.model:
            raise Qwen3VLError(f"--reference {args.reference} is an engine of another model than --engine")
        if reference.precision != "fp32":
            print(f"warning: the reference engine is {reference.precision}, not fp32", file=sys.stderr)
    if args.checkpoint is not None:
        from model_src.config import load_config

        load_config(args.checkpoint)

    with tempfile.TemporaryDirectory(prefix="qwen3vl-bench-") as scratch:
        image = args.image
        if args.image_size is not None:
            image = str(Path(scratch) / f"synthetic-{args.image_size}.png")
            synthetic_image(*parse_size(args.image_size)).save(image)
        elif image is None:
            if not SAMPLE_IMAGE.is_file():
                raise ImageError(f"no --image given and the bundled sample image is missing ({SAMPLE_IMAGE})")
            image = str(SAMPLE_IMAGE)
        load_image(image).close()

        # Both systems get the same explicit thread count, so neither wins by using more cores.
        threads = args.threads or physical_cores()
        # Measured first, while nothing else runs; the array is freed before any model loads.
        bandwidth = measure(threads)
        # "--opt=value" so that a prompt starting with "-" is not taken for an option by the child.
        common = [f"--image={Path(image).resolve()}", f"--prompt={args.prompt}",
                  "--max-new-tokens", str(args.max_new_tokens), "--threads", str(threads), "--runs", str(args.runs)]
        common += [f"--{name}-pixels={value}" for name, value in (("min", args.min_pixels), ("max", args.max_pixels))
                   if value is not None]
        engine_args = ["--engine", str(Path(args.engine).resolve())] + common
        if args.reference is not None:
            engine_args += ["--fidelity-out", str(Path(scratch) / "engine.npz"), "--positions", str(args.positions)]
        if args.profile:
            engine_args.append("--profile")
        reports = [_run_worker("engine", engine_args)]
        reports[0]["weight_bytes_per_token"] = decoder_weight_bytes(args.engine, manifest)
        if args.reference is not None:
            from .bench_fidelity import compare, load

            _run_worker("reference", ["--engine", str(Path(args.reference).resolve()), *common,
                                      "--fidelity-out", str(Path(scratch) / "reference.npz"),
                                      "--positions", str(args.positions)])
            reports[0]["fidelity"] = compare(load(Path(scratch) / "reference.npz"), load(Path(scratch) / "engine.npz"))
        if args.checkpoint is not None:
            reports.append(_run_worker("transformers", ["--checkpoint", str(Path(args.checkpoint).resolve())] + common))
    rows = [_summarise(report, bandwidth) for report in reports]

    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(_table(rows, args.image_size and f"synthetic {args.image_size}" or image, args.runs,
                     [r.get("token_ids") for r in reports], bandwidth))
    if len(rows) == 2 and (rows[0]["prompt_tokens"], rows[0]["image_tokens"]) != (rows[1]["prompt_tokens"],
                                                                                   rows[1]["image_tokens"]):
        print("warning: the engine and the checkpoint turned the inputs into different token counts "
              "(was the engine built from another checkpoint?)", file=sys.stderr)
    return 0


def parse_size(text: str) -> tuple[int, int]:
    from runtime.errors import ImageError

    width, sep, height = text.lower().partition("x")
    if not (sep and width.isdigit() and height.isdigit() and int(width) > 0 and int(height) > 0):
        raise ImageError(f"--image-size must be WIDTHxHEIGHT in pixels, e.g. 448x448, got {text!r}")
    if int(width) * int(height) > 100_000_000:
        raise ImageError(f"--image-size {text} is over 100 MP")
    return int(width), int(height)


def synthetic_image(width: int, height: int):
    """The same picture for a given size on every run and machine: colour ramps, a grid of discs
    and fixed-seed noise, so that resizing, patches and attention all see varied content."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = x / max(1, width - 1), y / max(1, height - 1)
    red, green, blue = 255 * u, 255 * v, 255 * (1 - u) * (1 - v)
    cell = max(8, min(width, height) // 6)
    disc = ((x % cell - cell / 2) ** 2 + (y % cell - cell / 2) ** 2) < (cell / 3) ** 2
    noise = np.random.default_rng(0).normal(0, 12, size=(height, width, 3)).astype(np.float32)
    rgb = np.stack([np.where(disc, 255 - red, red), np.where(disc, 240.0, green), np.where(disc, 40.0, blue)], -1)
    return Image.fromarray(np.clip(rgb + noise, 0, 255).astype(np.uint8))


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


def _summarise(report: dict, bandwidth: dict) -> dict:
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
    # Bytes per second the decode loop pulls from memory, as a fraction of what memory delivers.
    efficiency = row["weight_bytes_per_token"] * row["decode_tokens_per_s"] / (bandwidth["bandwidth_gb_s"] * 1e9)
    row["decode_efficiency"] = float(f"{efficiency:.4g}")
    if "fidelity" in report:
        fidelity = report["fidelity"]
        row.update({key: round(fidelity[key], 6) if isinstance(fidelity[key], float) else fidelity[key]
                    for key in FIDELITY_KEYS})
    if "profile" in report:
        row["profile"] = report["profile"]
    return row


def _table(rows: list[dict], image: str, runs: int, token_ids: list, bandwidth: dict) -> str:
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
    if "profile" in first:
        for graph, summary in first["profile"].items():
            per = "per step" if graph == "decode" else "one run"
            ops = ", ".join(f"{op['op']} {100 * op['share']:.1f}%" for op in summary["ops"][:PROFILE_TOP])
            lines.append(f"profile {graph} ({per}: {summary['run_ms']:.1f} ms, kernels {summary['kernel_ms']:.1f} ms): "
                         f"{ops}")
    return "\n".join(lines)


def _number(value: float) -> str:
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"
