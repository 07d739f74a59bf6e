"""Child process of `qwen3vl bench`: measures one system and prints one JSON line on stdout.

Each system runs in a process of its own so that its peak RSS is its own (and the engine's child
never imports torch). Usage: python -m commands.bench_worker engine|reference|transformers
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
    import dataclasses

    from runtime import Pipeline
    from runtime.image_processing import preprocess_images

    start = time.perf_counter()
    pipe = Pipeline.load(args.engine, threads=args.threads)
    load_ms = 1000 * (time.perf_counter() - start)
    # Decode exactly N tokens, as transformers does with min_new_tokens=N: random (synthetic) weights
    # may pick an end-of-turn token early, which would make decode tok/s meaningless.
    pipe.manifest.model = dataclasses.replace(pipe.manifest.model, eos_token_ids=())
    settings = pipe.manifest.image_processor.with_budget(args.min_pixels, args.max_pixels)
    image_tokens = sum(preprocess_images([args.image], settings).tokens_per_image)

    runs, result = [], None
    for _ in range(args.runs + 1):  # the first is a warm-up, not counted
        result = pipe.generate(args.prompt, images=[args.image], max_new_tokens=args.max_new_tokens, do_sample=False,
                               min_pixels=args.min_pixels, max_pixels=args.max_pixels)
        t = result.timings
        runs.append({key: float(t[key]) for key in ("vision_ms", "prefill_ms", "ttft_ms", "decode_tokens_per_s")})
    report = {
        "system": "engine",
        "backend": pipe.backend.name,
        "precision": pipe.manifest.precision,
        "threads": args.threads,
        "image_tokens": image_tokens,
        "prompt_tokens": result.prompt_tokens,
        "new_tokens": len(result.token_ids),
        "token_ids": result.token_ids,
        "load_ms": load_ms,
        "runs": runs[1:],
        # Taken now: what follows (fidelity logits, profiling sessions) is measurement, not the engine.
        "peak_rss_mb": peak_rss_mb(),
    }
    if args.fidelity_out:
        report["fidelity"] = _fidelity_logits(pipe, args)
    if args.profile:
        report["profile"] = profile_engine(pipe, args)
    return report


def bench_reference(args) -> dict:
    """The reference engine of `bench --reference`: only its teacher-forced logits, no timings."""
    from runtime import Pipeline

    pipe = Pipeline.load(args.engine, threads=args.threads)
    return {"system": "reference", "precision": pipe.manifest.precision, "fidelity": _fidelity_logits(pipe, args)}


def _fidelity_logits(pipe, args) -> dict:
    from commands.bench_fidelity import save, teacher_forced_logits

    start = time.perf_counter()
    result = teacher_forced_logits(pipe, args.prompt, args.image, args.positions, args.min_pixels, args.max_pixels)
    save(result, args.fidelity_out)
    return {"file": args.fidelity_out, "positions": result.positions, "image_positions": result.image_positions,
            "ms": 1000 * (time.perf_counter() - start)}


def profile_engine(pipe, args, decode_steps: int = 8) -> dict:
    """Per-op time of the vision encoder, the prefill and `decode_steps` decode steps, from ONNX
    Runtime's profiler, on the bench's own inputs; vision and prefill are measured on the run after
    a warm-up run (first-run allocations are not kernel time).

    Profiling needs sessions created with it on, so the pipeline's sessions are replaced by
    profiling ones made with the very same SessionOptions (threads, optimisation level, ...).
    """
    import gc
    import tempfile

    import numpy as np
    import onnxruntime as ort

    from runtime.rope_index import rope_index
    from runtime.vision_positions import vision_inputs

    m, backend = pipe.manifest.model, pipe.backend
    request = pipe._prepare([args.prompt], [[args.image]], args.min_pixels, args.max_pixels)[0]
    processed = request.processed
    host = vision_inputs(processed.image_grid_thw, m.num_position_embeddings, m.spatial_merge_size,
                         m.vision_head_dim, m.vision_rope_theta)
    input_ids = request.input_ids[None]
    length = input_ids.shape[1]
    positions, deltas = rope_index(input_ids, processed.image_grid_thw, np.ones_like(input_ids), m.image_token_id,
                                   m.spatial_merge_size)

    def profiling_session(role: str, folder: str):
        old = getattr(backend, role)
        options, providers = old.get_session_options(), old.get_providers()
        setattr(backend, role, None)
        del old
        gc.collect()  # frees the old session's weights before the new one loads its own
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(folder) / role)
        session = ort.InferenceSession(str(pipe.engine_dir / pipe.manifest.files[role]), options,
                                       providers=providers)
        setattr(backend, role, session)
        return session

    with tempfile.TemporaryDirectory(prefix="qwen3vl-profile-") as folder:
        vision = profiling_session("vision", folder)
        for _ in range(2):  # warm-up, then the measured run
            image_embeds, deep_embeds = backend.encode_images(processed.pixel_values, host)
        vision_runs = _runs(_read_profile(vision.end_profiling()))

        visual = np.zeros((1, length, m.hidden_size), dtype=backend.decoder_dtype)
        deepstack = np.zeros((m.num_deepstack, 1, length, m.hidden_size), dtype=backend.decoder_dtype)
        is_image = input_ids == m.image_token_id
        visual[is_image] = image_embeds
        deepstack[:, is_image] = deep_embeds
        decoder = profiling_session("decoder", folder)
        last = np.array([length - 1])
        for _ in range(2):  # warm-up, then the measured prefill, as Pipeline._run calls it
            cache = backend.new_cache(1, length + decode_steps)
            logits = backend.decode(cache, input_ids, visual, deepstack, positions, last, length, last)
        step_visual = np.zeros((1, 1, m.hidden_size), dtype=backend.decoder_dtype)
        step_deepstack = np.zeros((m.num_deepstack, 1, 1, m.hidden_size), dtype=backend.decoder_dtype)
        for step in range(decode_steps):
            cache_len = length + step
            token = logits.argmax(-1)[:, None]
            step_positions = np.full((3, 1, 1), cache_len + deltas[0, 0], dtype=np.int64)
            logits = backend.decode(cache, token, step_visual, step_deepstack, step_positions, np.array([cache_len]),
                                    cache_len + 1, np.array([0]))
        decoder_runs = _runs(_read_profile(decoder.end_profiling()))
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
    from runtime.image_processing import ImageProcessorSettings, preprocess_images
    from runtime.prompt import PromptBuilder, user_message

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
    preprocessor = folder / "preprocessor_config.json"
    settings = ImageProcessorSettings.from_preprocessor_config(
        json.loads(preprocessor.read_text()) if preprocessor.is_file() else {}
    ).with_budget(args.min_pixels, args.max_pixels)
    prompts = PromptBuilder.from_folder(folder, config.image_token_id)

    start = time.perf_counter()
    model = Qwen3VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    load_ms = 1000 * (time.perf_counter() - start)

    n = args.max_new_tokens
    runs, generated, prompt_tokens, image_tokens = [], [], 0, 0
    for _ in range(args.runs + 1):  # the first is a warm-up, not counted
        with torch.inference_mode():
            start = time.perf_counter()
            processed = preprocess_images([args.image], settings)
            ids = prompts.encode(user_message(args.prompt, 1), processed.tokens_per_image).input_ids
            input_ids = torch.from_numpy(ids[None])
            inputs = dict(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                image_grid_thw=torch.from_numpy(processed.image_grid_thw),
                mm_token_type_ids=(input_ids == config.image_token_id).long(),
            )
            pixel_values = torch.from_numpy(processed.pixel_values)
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
        prompt_tokens, image_tokens = len(ids), sum(processed.tokens_per_image)
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
    parser = argparse.ArgumentParser(prog="python -m commands.bench_worker")
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
