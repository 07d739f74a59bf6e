"""`qwen3vl bench`: speed and memory of an engine, optionally side by side with transformers, plus
the machine's memory bandwidth (and so decode efficiency), with --reference the engine's fidelity to
an FP32 engine, and with --profile where the time goes per op.

Each system is measured in a child process (bench/worker.py) so that peak RSS is per
system; this process only validates inputs, measures bandwidth, runs the children one at a time
and reports medians.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

DEFAULT_PROMPT = "Describe this image."
# The image shipped with the project: <repo>/assets/sample.png, beside the commands package.
SAMPLE_IMAGE = Path(__file__).resolve().parent.parent / "assets" / "sample.png"

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

Text fidelity (--text FILE), comparable with llama-perplexity --kl-divergence: FILE is tokenized as
plain text (no chat template) and cut into chunks of --ctx tokens (256; --chunks: how many, default
all that fit); each chunk starts from an empty cache and its last --score-tokens next-token
predictions (default the second half: positions ctx/2 .. ctx-2, as llama-perplexity) are scored,
teacher-forced: a prefill through the first scored position, then one decode call per position fed
the text's own token. One JSON line (--json) or a summary: mean/median/p99/max KL(P_ref || P_engine)
in nats, top-1 agreement, the reference's mean entropy, both perplexities, scored tokens, and the
engine's weight bytes read and KV bytes stored per decoded token, and its decode tok/s over the
teacher-forced decode calls (contexts ctx/2 .. ctx; llama_mean_kl: the KL summed as
llama-perplexity sums it, over the reference's log-probs above -16 nats only). --reference is an
engine folder or a file saved by an earlier run with --save-reference (like --kl-divergence-base):
the reference runs first and alone, so one slow FP32 run serves many comparisons, e.g.
  qwen3vl bench --engine eng-fp32 --text notes.txt --save-reference fp32-ctx256.npz
  qwen3vl bench --engine eng-int4 --text notes.txt --reference fp32-ctx256.npz --json
A saved reference records the token ids, --ctx, --chunks and --score-tokens (options left unset
follow it) and the model facts and tokenizer hash; a run that does not match it is refused.
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
    text = parser.add_argument_group("text fidelity (instead of the speed and image benchmark)")
    text.add_argument("--text", metavar="FILE", help="plain UTF-8 text: score --engine against --reference on it "
                                                    "(or, without --reference, report --engine's own figures)")
    text.add_argument("--ctx", type=int, help="tokens per chunk (default 256, or the saved reference's)")
    text.add_argument("--chunks", type=int, help="chunks to score (default: all that fit, or the saved reference's)")
    text.add_argument("--score-tokens", type=int,
                      help="scored positions per chunk, the last ones (default ctx - 1 - ctx/2: the second half)")
    text.add_argument("--save-reference", metavar="FILE",
                      help="save the reference's scored log-probabilities (.npz; the --engine's without --reference)")
    parser.add_argument("--profile", action="store_true",
                        help="ONNX Runtime's per-op profile of the vision encoder, the prefill and decode")
    parser.add_argument("--reuse", action="store_true",
                        help="also time a ~20-token follow-up question about the same image, cold (no cache) and "
                             "warm (prefix and image reuse), and report the cache's hits and misses")
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

    from bench.bandwidth import decoder_weight_bytes, measure, physical_cores
    from bench.inputs import parse_size, synthetic_image
    from bench.report import run_worker, summarise, table

    if args.text is not None:
        return run_text(args)
    for name in ("ctx", "chunks", "score_tokens", "save_reference"):
        if getattr(args, name) is not None:
            raise PromptError(f"--{name.replace('_', '-')} is an option of --text")
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
        if args.reuse:
            engine_args.append("--reuse")
        reports = [run_worker("engine", engine_args)]
        reports[0]["weight_bytes_per_token"] = decoder_weight_bytes(args.engine, manifest)
        if args.reference is not None:
            from bench.fidelity import compare, load

            run_worker("reference", ["--engine", str(Path(args.reference).resolve()), *common,
                                      "--fidelity-out", str(Path(scratch) / "reference.npz"),
                                      "--positions", str(args.positions)])
            reports[0]["fidelity"] = compare(load(Path(scratch) / "reference.npz"), load(Path(scratch) / "engine.npz"))
        if args.checkpoint is not None:
            reports.append(run_worker("transformers", ["--checkpoint", str(Path(args.checkpoint).resolve())] + common))
    rows = [summarise(report, bandwidth) for report in reports]

    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(table(rows, args.image_size and f"synthetic {args.image_size}" or image, args.runs,
                     [r.get("token_ids") for r in reports], bandwidth))
    if len(rows) == 2 and (rows[0]["prompt_tokens"], rows[0]["image_tokens"]) != (rows[1]["prompt_tokens"],
                                                                                   rows[1]["image_tokens"]):
        print("warning: the engine and the checkpoint turned the inputs into different token counts "
              "(was the engine built from another checkpoint?)", file=sys.stderr)
    return 0


def run_text(args) -> int:
    """`bench --text`: teacher-forced next-token fidelity over plain text (bench/text_fidelity.py)."""
    from runtime.errors import PromptError

    from bench.bandwidth import physical_cores
    from bench.text_fidelity import measure

    given = [f"--{name}" for name in ("checkpoint", "image", "image_size", "profile") if getattr(args, name)]
    if given:
        raise PromptError(f"{', '.join(o.replace('_', '-') for o in given)}: not options of --text")
    if args.threads is not None and args.threads < 1:
        raise PromptError("--threads must be >= 1")
    if args.save_reference is not None:
        if args.reference is not None and not Path(args.reference).is_dir():
            raise PromptError("--save-reference saves a reference engine's run; --reference is already a saved file")
        if not Path(args.save_reference).resolve().parent.is_dir():
            raise PromptError(f"--save-reference {args.save_reference}: its folder does not exist")
    report = measure(args.engine, args.text, args.reference, args.ctx, args.chunks, args.score_tokens,
                     args.save_reference, args.threads or physical_cores())
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"engine {report['engine']} ({report['precision']}), {report['chunks']} chunks of {report['ctx']} tokens, "
          f"{report['scored_tokens']} scored")
    if "mean_kl" in report:
        print(f"  against {report['reference']} ({report['reference_precision']}): mean KL {report['mean_kl']:.6f} "
              f"± {report['mean_kl_stderr']:.6f} nats, median {report['median_kl']:.6f}, p99 {report['p99_kl']:.6f}, "
              f"max {report['max_kl']:.6f}; top-1 agreement {100 * report['top1_agreement']:.2f}%")
        print(f"  mean KL summed as llama-perplexity sums it (reference log-probs > -16): "
              f"{report['llama_mean_kl']:.6f}")
        print(f"  perplexity: engine {report['engine_ppl']:.3f}, reference {report['reference_ppl']:.3f}")
    else:
        print(f"  perplexity {report['reference_ppl']:.3f}")
    print(f"  reference mean entropy {report['reference_mean_entropy']:.4f} nats")
    print(f"  per decoded token: {report['weight_bytes_per_token'] / 1e6:.1f} MB of weights read, "
          f"{report['kv_bytes_per_token']} B of KV cache; {report['decode_tokens_per_s']:.2f} tok/s "
          f"({report['threads']} threads)")
    if "saved_reference" in report:
        print(f"  reference saved to {report['saved_reference']}")
    return 0

