"""Child process of `qwen3vl bench`: measures one system and prints one JSON line on stdout.

Each system runs in a process of its own so that its peak RSS is its own (and the engine's child
never imports torch). Usage: python -m bench.worker engine|reference|transformers
--engine/--checkpoint ... `reference` only computes teacher-forced logits for `bench --reference`.

The last line of stdout is either {"runs": [...], ...} or {"error": ..., "type": ...}.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
import traceback
from pathlib import Path


def peak_rss_mb() -> float:
    """This process's peak resident set size (VmHWM), in MB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def bench_engine(args) -> dict:
    from runtime import Pipeline
    from runtime.generate import Timings, generate
    from runtime.sampling import SamplingConfig

    start = time.perf_counter()
    pipe = Pipeline.load(args.engine, backend="ort", threads=args.threads)
    load_ms = 1000 * (time.perf_counter() - start)

    runs, tokens = [], []
    for _ in range(args.runs + 1):  # the first is a warm-up, not counted
        timings = Timings()
        batch = pipe.prepare([args.prompt], [[args.image]], args.min_pixels, args.max_pixels)
        # Decode exactly N tokens, as transformers does with min_new_tokens=N: random (synthetic)
        # weights may pick an end-of-turn token early, which would make decode tok/s meaningless.
        tokens = [int(step.tokens[0]) for step in generate(pipe.backend, batch, args.max_new_tokens,
                                                           SamplingConfig(do_sample=False), (), timings=timings)]
        runs.append(timings.to_dict())
    report = {
        "system": "engine",
        "backend": pipe.backend.name,
        "precision": pipe.manifest.precision,
        "threads": args.threads,
        "image_tokens": batch.image_tokens,
        "prompt_tokens": int(batch.lengths[0]),
        "new_tokens": len(tokens),
        "token_ids": tokens,
        "load_ms": load_ms,
        "runs": runs[1:],
        "kv_bytes_per_token": _kv_bytes_per_token(pipe),
        # Taken now: what follows (fidelity logits, profiling sessions) is measurement, not the engine.
        "peak_rss_mb": peak_rss_mb(),
    }
    if args.reuse:
        from bench.reuse import measure_reuse

        report["reuse"] = measure_reuse(pipe, args.image, args.prompt, args.runs, args.min_pixels, args.max_pixels)
    if args.fidelity_out:
        report["fidelity"] = _fidelity_logits(pipe, args)
    if args.profile:
        from bench.profile import profile_engine

        pipe.close()  # frees its sessions' weights before the profiling ones load their own
        report["profile"] = profile_engine(pipe.engine_dir, pipe.manifest, batch, args.threads)
    return report


def _kv_bytes_per_token(pipe) -> int:
    """Bytes the engine's KV cache stores per token (all layers, keys and values), in its stored type."""
    import numpy as np

    m = pipe.manifest.model
    itemsize = np.dtype(getattr(pipe.backend, "kv_dtype", None) or pipe.backend.decoder_dtype).itemsize
    return 2 * m.num_hidden_layers * m.num_key_value_heads * m.head_dim * itemsize


def bench_reference(args) -> dict:
    """The reference engine of `bench --reference`: only its teacher-forced logits, no timings."""
    from runtime import Pipeline

    pipe = Pipeline.load(args.engine, backend="ort", threads=args.threads)
    return {"system": "reference", "precision": pipe.manifest.precision, "fidelity": _fidelity_logits(pipe, args)}


def _fidelity_logits(pipe, args) -> dict:
    from bench.fidelity import save, teacher_forced_logits

    start = time.perf_counter()
    result = teacher_forced_logits(pipe, args.prompt, args.image, args.positions, args.min_pixels, args.max_pixels)
    save(result, args.fidelity_out)
    return {"file": args.fidelity_out, "positions": result.positions, "image_positions": result.image_positions,
            "ms": 1000 * (time.perf_counter() - start)}


def bench_transformers(args) -> dict:
    """transformers' Qwen3VLForConditionalGeneration, fp32 on the CPU, fed by the project's own
    preprocessing and prompt building so that both systems see identical pixels and token ids.

    Per run: vision_ms times model.model.get_image_features; prefill_ms times one forward over the
    prompt with those image features passed in (mm_encoder_outputs), so it excludes the vision tower
    as the engine's prefill does. ttft_ms and decode tokens/s come from a separate generate() call
    (greedy, min_new_tokens = max_new_tokens) with a streamer that timestamps every token:
    ttft = preprocessing + time from calling generate() to the first token (its own vision and
    prefill included); decode tok/s = (N - 1) / (time between the first and the last token), the
    same definition as the engine's.
    """
    from model_src.checkpoint import weight_files
    from model_src.config import load_config
    from runtime.errors import Qwen3VLError
    from model_src.checkpoint_settings import image_processor_settings, model_facts
    from runtime.prepare import prepare
    from runtime.prompt import PromptBuilder

    folder = Path(args.checkpoint)
    # The project's checks give clearer errors than from_pretrained's.
    config = load_config(folder)
    weight_files(folder)
    try:
        import torch
        from transformers import Qwen3VLForConditionalGeneration
        from transformers.generation.streamers import BaseStreamer
    except ImportError as exc:
        raise Qwen3VLError(f"the transformers benchmark needs torch and transformers ({exc}); "
                           f"install them with pip install -e '.[test]'") from None

    class TokenClock(BaseStreamer):
        """Records when each generated token comes out of generate()."""

        def __init__(self):
            self.times, self.prompt_seen = [], False

        def put(self, value):
            if not self.prompt_seen:  # generate() first hands over the prompt itself
                self.prompt_seen = True
                return
            self.times.append(time.perf_counter())

        def end(self):
            pass

    torch.set_num_threads(args.threads)
    settings = image_processor_settings(folder).with_budget(args.min_pixels, args.max_pixels)
    facts = model_facts(folder, config)
    prompts = PromptBuilder.from_folder(folder, config.image_token_id)

    start = time.perf_counter()
    model = Qwen3VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    load_ms = 1000 * (time.perf_counter() - start)

    n = args.max_new_tokens
    runs, generated, prompt_tokens, image_tokens = [], [], 0, 0
    for _ in range(args.runs + 1):  # the first is a warm-up, not counted
        with torch.inference_mode():
            start = time.perf_counter()
            batch = prepare([args.prompt], [[args.image]], prompts, settings, facts, facts.pad_token_id)
            ids = batch.row(0)
            input_ids = torch.from_numpy(ids[None])
            inputs = dict(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                image_grid_thw=torch.from_numpy(batch.vision.grid_thw),
                mm_token_type_ids=(input_ids == config.image_token_id).long(),
            )
            pixel_values = torch.from_numpy(batch.vision.pixel_values)
            preprocess_ms = 1000 * (time.perf_counter() - start)

            start = time.perf_counter()
            features = model.model.get_image_features(pixel_values, inputs["image_grid_thw"], return_dict=True)
            vision_ms = 1000 * (time.perf_counter() - start)

            start = time.perf_counter()
            model(**inputs, mm_encoder_outputs={"image": features}, use_cache=True, logits_to_keep=1)
            prefill_ms = 1000 * (time.perf_counter() - start)
            del features

            clock = TokenClock()
            start = time.perf_counter()
            out = model.generate(**inputs, pixel_values=pixel_values, max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, streamer=clock)
        decode_s = clock.times[-1] - clock.times[0]
        runs.append({
            "vision_ms": vision_ms,
            "prefill_ms": prefill_ms,
            "ttft_ms": preprocess_ms + 1000 * (clock.times[0] - start),
            "decode_tokens_per_s": (len(clock.times) - 1) / decode_s if decode_s > 0 else 0.0,
        })
        generated = out[0, len(ids):].tolist()
        prompt_tokens, image_tokens = len(ids), batch.image_tokens
    # Every decoder weight and the lm_head once per token (a tied head is the embedding: counted
    # once); the embedding lookup itself reads one row.
    head = model.lm_head.weight
    weights = {p.data_ptr(): p.numel() * p.element_size()
               for name, p in model.model.language_model.named_parameters() if "embed_tokens" not in name}
    weights[head.data_ptr()] = head.numel() * head.element_size()
    return {
        "system": "transformers",
        "weight_bytes_per_token": sum(weights.values()),
        "backend": f"pytorch-{torch.__version__.split('+')[0]}-cpu",
        "precision": "fp32",
        "threads": args.threads,
        "image_tokens": image_tokens,
        "prompt_tokens": prompt_tokens,
        "new_tokens": len(generated),
        "token_ids": generated,
        "load_ms": load_ms,
        "runs": runs[1:],
    }


SYSTEMS = {"engine": bench_engine, "reference": bench_reference, "transformers": bench_transformers}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.worker")
    parser.add_argument("system", choices=sorted(SYSTEMS))
    parser.add_argument("--engine")
    parser.add_argument("--checkpoint")
    parser.add_argument("--image", required=True)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--runs", type=int, required=True)
    parser.add_argument("--min-pixels", type=int)
    parser.add_argument("--max-pixels", type=int)
    parser.add_argument("--fidelity-out", help="save teacher-forced logits here (.npz)")
    parser.add_argument("--positions", type=int, default=256)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--reuse", action="store_true")
    args = parser.parse_args(argv)

    from runtime.errors import Qwen3VLError

    try:
        report = SYSTEMS[args.system](args)
    except Qwen3VLError as exc:
        report = {"error": str(exc), "type": type(exc).__name__}
    except MemoryError:
        report = {"error": "out of memory", "type": "MemoryError"}
    except Exception as exc:  # a bug or a library failure: keep the traceback for the parent's stderr
        traceback.print_exc()
        report = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                  "type": "internal"}
    if "error" not in report:
        report.setdefault("peak_rss_mb", peak_rss_mb())
    sys.stdout.write("\n" + json.dumps(report) + "\n")
    sys.stdout.flush()
    return 1 if "error" in report else 0


if __name__ == "__main__":
    sys.exit(main())
