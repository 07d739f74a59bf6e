"""Checkpoint folder -> self-contained engine folder (`qwen3vl build`).

Steps: read and check the checkpoint; trace the vision encoder and the text decoder with stand-in
weights; stream the real weights into external data files; copy the tokenizer and chat template;
write the manifest last. Everything happens in a staging folder that replaces the target only when
complete, so a failed build leaves nothing half-written (`engine_folder.py`: the swap, the lock, what
`--out` may be).
"""

from __future__ import annotations

import importlib.metadata
import shutil
import time
from collections import Counter
from dataclasses import asdict
from collections.abc import Callable
from pathlib import Path

import onnx
import torch

from model_src.checkpoint import checkpoint_shapes, open_safetensors, weight_files
from model_src.config import load_config
from model_src.checkpoint_settings import generation_settings, image_processor_settings, model_facts
from model_src.model import Qwen3VL
from model_src.text import MRotaryEmbedding
from runtime.engine_manifest import MANIFEST, Manifest, sha256_file
from runtime.memory_admission import available_memory_bytes
from runtime.errors import CheckpointError, Qwen3VLError
from runtime.prompt import load_chat_template

from graph_passes.kv_cache_dtype import GRANULARITIES as KV_SCALE_GRANULARITIES
from graph_passes.kv_cache_dtype import kv_cache_dtype
from graph_passes.pass_runner import TRT_KV_DTYPES, ort_passes, run_passes, trt_passes
from graph_passes.quantize_weights import WeightFormat

from .decoder_graph import export_decoder
from .engine_folder import EngineReplacement, check_target
from .precision_allocation import (SAMPLE_ROWS, allocate, budget_bytes, candidate_formats, format_errors,
                                   other_bytes_per_token, smallest_bytes_per_token)
from .quantization_plan import DEFAULT_SCALE_SEARCH, HEAD_WEIGHTS, body_format, head_format, weight_overrides
from .sensitivity import CALIBRATION_TOKENS, linear_sensitivities, memory_needed, most_sensitive
from .kv_calibration import calibrate_kv_scales
from .stand_in_weights import attach_weights, use_stand_in_parameters
from .trt_engine import write_graph_io
from .vision_graph import export_vision
from .vision_sensitivity import calibration_description, vision_block_sensitivities

# Graph dtype of each precision; int8/int4 keep fp32 activations with weight-only quantized linears.
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "int8": torch.float32, "int4": torch.float32}
BLOCK_SIZES = (32, 64, 128)
VISION_PRECISIONS = ("fp32", "int8")
# KV cache storage types --kv-dtype names; the TensorRT graphs take fp32/fp16 (TRT_KV_DTYPES).
KV_DTYPES = ("fp32", "fp16", "int8")
# --kv-dtype when not given, per precision (ONNX Runtime builds); otherwise the graph's own type (fp32,
# fp16 in fp16 builds). Measured on the 2B int4 engine (docs/kv_cache_dtype.md): int8 is 75% smaller,
# faster at 4k context and adds 0.055 nats against an FP32 cache, so the weight-quantized builds, which
# already trade exactness for memory, store int8; fp32 and fp16 builds keep their exact cache.
DEFAULT_KV_DTYPE: dict[str, str] = {"int4": "int8", "int8": "int8"}
# --weight-budget when not given, per precision. int4: 4.5 bits per weight, the linears' and the
# lm_head's formats placed by measured sensitivity (export/precision_allocation.py). Measured on the 2B
# synthetic checkpoint (docs/quantization.md): text KL 2.70 at 0.968 GB read per token, where every
# linear in blocks of 64 with an 8-bit head gave 3.45 at 1.114 GB and llama.cpp Q4_0 3.31 at 1.048 GB.
# The sensitivity pass adds ~6 minutes to a 2B build on 2 cores; --weight-budget none skips it. int8
# keeps every linear in the body format by default (a budget at 8 bits was not measured).
DEFAULT_WEIGHT_BUDGET: dict[str, str] = {"int4": "4.5bpw"}
# "trt" also writes TensorRT-target graphs (plugin nodes) beside the ONNX Runtime ones; both read the
# same weight files, and the ONNX Runtime graphs remain the CPU fallback.
BACKENDS = ("ort", "trt")
VERSIONED_PACKAGES = ("qwen3vl-pascal", "torch", "onnx", "onnxruntime", "tokenizers", "numpy", "pillow")


def build_engine(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    backend: str = "ort",
    precision: str = "fp32",
    max_context: int = 8192,
    progress: Callable[[str], None] = lambda message: None,
    block_size: int = 64,
    symmetric: bool = True,
    accuracy_level: int = 4,
    apply_graph_passes: bool = True,
    vision_precision: str | None = None,
    kv_dtype: str | None = None,
    kv_scales: str = "per_channel",
    keep_sensitive_vision: int = 0,
    head_bits: int | None = None,
    scale_search: str = DEFAULT_SCALE_SEARCH,
    keep_sensitive: int = 0,
    weight_budget: int | str | None = "default",
) -> Path:
    """`apply_graph_passes=False` keeps the graphs as exported (tests compare passes against them).
    `vision_precision` "fp32" or "int8"; default int8 for int8/int4 builds, else the graph's dtype.
    `keep_sensitive_vision` N: int8/int4 builds with an int8 vision encoder keep the N vision blocks
    whose INT8 compute alone moves the output most in FP32 (export/vision_sensitivity.py).
    `kv_dtype` the KV cache's storage type; default the graph's (fp32, fp16 for fp16 builds).
    `kv_scales` of an int8 cache: "per_channel" (per KV head and dimension) or "per_tensor".
    int8/int4: `head_bits` of the tied embedding/lm_head (default 8), `scale_search` "clip" or "none"
    (max-abs), `keep_sensitive` N decoder linears at 8 bits (int4; export/quantization_plan.py), or
    `weight_budget` bytes read per decoded token (or "4.5bpw": bits per weight) shared out by sensitivity
    (export/precision_allocation.py); "default": DEFAULT_WEIGHT_BUDGET's for the precision, unless
    keep_sensitive chooses instead; None or "none": every linear in the body format."""
    checkpoint_dir, out = Path(checkpoint_dir), Path(out_dir)
    if block_size not in BLOCK_SIZES:
        raise Qwen3VLError(f"unsupported block size {block_size} (choose from {', '.join(map(str, BLOCK_SIZES))})")
    if backend not in BACKENDS:
        raise Qwen3VLError(f"unsupported backend {backend!r} (choose from {', '.join(BACKENDS)})")
    if precision not in PRECISIONS:
        raise Qwen3VLError(f"unsupported precision {precision!r} (choose from {', '.join(PRECISIONS)})")
    vision_precision = vision_precision or ("int8" if precision in ("int8", "int4") else "fp32")
    if vision_precision not in VISION_PRECISIONS:
        raise Qwen3VLError(f"unsupported vision precision {vision_precision!r} "
                           f"(choose from {', '.join(VISION_PRECISIONS)})")
    if vision_precision == "int8" and precision == "fp16":
        raise Qwen3VLError("--vision-precision int8 needs FP32 activations: use it with --precision fp32, int8 or int4")
    if keep_sensitive_vision < 0:
        raise Qwen3VLError(f"--keep-sensitive-vision {keep_sensitive_vision}: give a count of vision blocks, 0 or more")
    if keep_sensitive_vision and (precision not in ("int8", "int4") or vision_precision != "int8"):
        raise Qwen3VLError(f"--keep-sensitive-vision keeps blocks of an INT8 vision encoder in FP32: use it with "
                           f"--precision int8 or int4 and vision int8 (this build: --precision {precision}, "
                           f"vision {vision_precision})")
    if max_context < 16:
        raise Qwen3VLError(f"--max-context {max_context} is too small")
    kv_dtype = _check_kv_dtype(kv_dtype, backend, precision)
    if kv_scales not in KV_SCALE_GRANULARITIES:
        raise Qwen3VLError(f"unsupported KV scale granularity {kv_scales!r} "
                           f"(choose from {', '.join(KV_SCALE_GRANULARITIES)})")
    body = body_format(precision, block_size, symmetric, scale_search)
    weight_overrides(precision, body, head_bits)  # its refusals, before any work
    if head_bits is not None and precision not in ("int8", "int4"):
        raise Qwen3VLError(f"--head-bits quantizes the lm_head of int8/int4 builds, not {precision}")
    if keep_sensitive and precision != "int4":
        raise Qwen3VLError(f"--keep-sensitive keeps int4 linears at 8 bits: use it with --precision int4, "
                           f"not {precision}")
    if keep_sensitive < 0:
        raise Qwen3VLError(f"--keep-sensitive {keep_sensitive}: give a count of linears, 0 or more")
    default_budget = weight_budget == "default"
    if default_budget:
        weight_budget = None if keep_sensitive or not apply_graph_passes else DEFAULT_WEIGHT_BUDGET.get(precision)
    elif isinstance(weight_budget, str) and weight_budget.strip().lower() == "none":
        weight_budget = None
    if weight_budget is not None:
        if precision not in ("int8", "int4"):
            raise Qwen3VLError(f"--weight-budget shares out the formats of int8/int4 builds, not {precision}")
        if keep_sensitive:
            raise Qwen3VLError("--weight-budget already chooses which linears get 8 bits: drop --keep-sensitive")
        if isinstance(weight_budget, int) and weight_budget <= 0:
            raise Qwen3VLError(f"--weight-budget {weight_budget}: give a size, e.g. 1.1GB")
    check_target(out, checkpoint_dir)

    config = load_config(checkpoint_dir)
    if keep_sensitive_vision > config.vision.depth:
        raise Qwen3VLError(f"--keep-sensitive-vision {keep_sensitive_vision}: the vision encoder has "
                           f"{config.vision.depth} blocks")
    if max_context > config.text.max_position_embeddings:
        raise Qwen3VLError(f"--max-context {max_context} exceeds the model's "
                           f"{config.text.max_position_embeddings} positions")
    if (keep_sensitive or weight_budget is not None) and not _memory_for_sensitivities(
            config, body, weight_budget is not None, default_budget, progress):
        weight_budget = None  # the default's fallback: every linear in the body format
    fixed, requested_budget = None, weight_budget  # with a weight budget: the bytes read outside what it places
    if weight_budget is not None:
        # Without --head-bits the allocation places the lm_head too.
        head = None if head_bits is None else head_format(precision, body, head_bits)
        fixed = other_bytes_per_token(config.text, head, kv_dtype, kv_scales)
        weight_budget = budget_bytes(weight_budget, config.text, fixed, head_placed=head is None)
        least = fixed + smallest_bytes_per_token(config.text, body, head_placed=head is None)
        if weight_budget < least and default_budget:
            weight_budget = least  # small inputs pad their blocks: the default then is the cheapest layout
        if weight_budget < least:
            raise Qwen3VLError(f"--weight-budget {weight_budget / 1e9:.3f} GB is under the {least / 1e9:.3f} GB this "
                               f"model reads per token with every linear{' and the lm_head' if head is None else ''} "
                               f"in 4-bit blocks of 128")
    dtype = PRECISIONS[precision]
    _check_weights(checkpoint_dir, config)
    # The checkpoint's other settings are read before minutes of export, so their errors come first.
    facts, image_settings = model_facts(checkpoint_dir, config), image_processor_settings(checkpoint_dir)
    generation_defaults = generation_settings(checkpoint_dir).defaults

    replacement = EngineReplacement(out, checkpoint_dir, progress)  # takes the lock: one build per folder
    staging = replacement.staging
    try:
        applied = []
        quantization = _plan_quantization(checkpoint_dir, precision, body, head_bits, keep_sensitive,
                                          (requested_budget, weight_budget, fixed), progress)
        vision_float, vision_record = _plan_vision_islands(checkpoint_dir, keep_sensitive_vision, backend,
                                                           block_size, symmetric, progress)
        if vision_record:
            quantization["record"]["vision_sensitivity"] = vision_record
        for part, export in (("vision", export_vision), ("decoder", export_decoder)):
            _export_part(part, export, config, checkpoint_dir, staging, dtype, progress)
            passes = []
            if apply_graph_passes:
                overrides = quantization["overrides"] if part == "decoder" and quantization else None
                passes = ort_passes(part, precision, block_size, symmetric, accuracy_level, vision_precision, backend,
                                    scale_search=scale_search, overrides=overrides, vision_keep_float=vision_float)
            applied += [f"{part}:{name}" for name in _apply_passes(part, staging, passes, progress)]
            records = {name: record for p in passes for name, record in getattr(p, "records", {}).items()}
            if records and quantization:
                quantization["record"]["tensors"][part] = records
            if backend == "trt":
                applied += [f"{part}.trt:{name}" for name in _write_trt_graph(part, staging, kv_dtype, progress)]
        files = {
            "vision": "vision.onnx",
            "decoder": "decoder.onnx",
            "tokenizer": "tokenizer.json",
            "chat_template": "chat_template.jinja",
        }
        if backend == "trt":
            files.update({"vision_trt": "vision.trt.onnx", "decoder_trt": "decoder.trt.onnx"})
            files["trt_io"] = write_graph_io(staging, files)  # the graphs' inputs, for compiling plans later
        tokenizer = checkpoint_dir / "tokenizer.json"
        if not tokenizer.is_file():
            raise CheckpointError(f"{tokenizer}: missing")
        shutil.copyfile(tokenizer, staging / files["tokenizer"])
        (staging / files["chat_template"]).write_text(load_chat_template(checkpoint_dir))
        if kv_dtype != _graph_kv_dtype(precision):
            # The ONNX Runtime decoder's cache type (the TensorRT graph, written above, has its own pass).
            float_engine = Manifest(model=facts, image_processor=image_settings, backend=backend, precision=precision,
                                    max_context=max_context, files=files)
            applied += _store_kv_cache(staging, float_engine, kv_dtype, kv_scales, progress)

        progress("hashing engine files")
        names = sorted(p.name for p in staging.iterdir())
        manifest = Manifest(
            model=facts,
            image_processor=image_settings,
            backend=backend,
            precision=precision,
            max_context=max_context,
            files=files,
            hashes={name: sha256_file(staging / name) for name in names},
            sizes={name: (staging / name).stat().st_size for name in names},
            versions=_versions(),
            graph_passes=["decoder:fused_attention:GroupQueryAttention", *applied],
            generation_defaults=generation_defaults,
            kv_dtype=kv_dtype,
            quantization=quantization["record"] if quantization else None,
        )
        (staging / MANIFEST).write_text(manifest.to_json())
        replacement.commit()
    except BaseException:
        replacement.abort()
        raise
    return out


def _memory_for_sensitivities(config, body, budget: bool, default_budget: bool, progress) -> bool:
    """Whether this machine has the memory to measure sensitivities. Where it has not: an explicit
    --weight-budget or --keep-sensitive is refused; the int4 default's budget falls back to every
    linear in the body format, said in the log (False)."""
    need, free = memory_needed(config), available_memory_bytes()
    if free is None or need <= free:
        return True
    message = (f"measuring the decoder's sensitivities needs ~{need / 2**30:.1f} GiB of memory and "
               f"{free / 2**30:.1f} GiB is available")
    if budget and default_budget:
        progress(f"weight budget: skipped ({message}): every linear at {body.label}, as with --weight-budget none")
        return False
    alternative = "--weight-budget none" if budget else "no --keep-sensitive"
    raise Qwen3VLError(f"{message}: build on a machine with more memory, or with {alternative}")


def _plan_quantization(checkpoint_dir: Path, precision: str, body, head_bits: int | None, keep_sensitive: int,
                       budget: tuple, progress) -> dict | None:
    """int8/int4: {"overrides": the decoder weights that do not get `body`, "record": the manifest's
    `quantization` (tensors filled in as the passes run; the sensitivities and the budget's
    allocation, when measured)}. `budget`: (--weight-budget as given, in bytes, the bytes per token
    outside the weights it places), all None without one."""
    if precision not in ("int8", "int4"):
        return None
    record: dict = {"default": asdict(body), "tensors": {}}
    sensitive, allocated = [], None
    requested, weight_budget, fixed = budget
    if keep_sensitive or weight_budget is not None:
        start = time.perf_counter()
        progress(f"sensitivity: each decoder linear alone at {body.label} on {CALIBRATION_TOKENS} calibration tokens")
        sensitivities = linear_sensitivities(checkpoint_dir, body, progress=progress,
                                             include_head=weight_budget is not None and head_bits is None)
        progress(f"sensitivity: done in {time.perf_counter() - start:.0f} s")
        record["sensitivity"] = {"metric": "mean KL(fp32 || this linear alone quantized), nats",
                                 "calibration_tokens": CALIBRATION_TOKENS, "kl": sensitivities}
    if keep_sensitive:
        sensitive = most_sensitive(sensitivities, keep_sensitive)  # linears only: the head is 8-bit already
        ranked = ", ".join(f"{_short(name)} {sensitivities[name]:.2e}" for name in sensitive)
        progress(f"sensitivity: kept at 8 bits: {ranked}")
        record["sensitivity"]["kept"] = sensitive
    if weight_budget is not None:
        allocated, record["budget"] = _allocate(checkpoint_dir, body, sensitivities, requested, weight_budget, fixed,
                                                progress)
    return {"overrides": weight_overrides(precision, body, head_bits, sensitive, allocated), "record": record}


def _allocate(checkpoint_dir: Path, body, sensitivities: dict[str, float], requested: int | str, weight_budget: int,
              fixed: int, progress) -> tuple[dict, dict]:
    """--weight-budget: (weight name -> format, the manifest's record of the allocation)."""
    formats = candidate_formats(body)
    errors, shapes = format_errors(checkpoint_dir, list(sensitivities), formats, progress=progress)
    allocation = allocate(sensitivities, body, errors, shapes, weight_budget - fixed)
    head = next((name for name in allocation.formats if name in HEAD_WEIGHTS), None)
    counts = Counter(form.label for name, form in allocation.formats.items() if name != head)
    progress(f"weight budget: {(allocation.bytes + fixed) / 1e9:.3f} GB per token of {weight_budget / 1e9:.3f} GB; "
             + ", ".join(f"{count} linears {label}" for label, count in sorted(counts.items()))
             + (f"; the lm_head {allocation.formats[head].label}" if head else ""))
    return allocation.formats, {
        "requested": requested, "bytes_per_token": weight_budget, "planned_bytes_per_token": allocation.bytes + fixed,
        "other_bytes_per_token": fixed, "linear_formats": dict(sorted(counts.items())),
        "estimated_kl_sum": sum(allocation.estimated_kl.values()),
        "format_errors": "relative squared error of each candidate format on "
                         f"{SAMPLE_ROWS} rows of each linear; estimated KL = sensitivity x error ratio"}


def _short(name: str) -> str:
    return name.removeprefix("language_model.").removesuffix(".weight")


def _plan_vision_islands(checkpoint_dir: Path, keep: int, backend: str, block_size: int, symmetric: bool,
                         progress) -> tuple[list[str], dict | None]:
    """--keep-sensitive-vision N: (the N vision blocks whose INT8 alone moves the output most, kept
    FP32; the manifest's `quantization.vision_sensitivity`). The sensitivity is measured in the form
    this backend's vision graph quantizes: DynamicQuantizeMatMul (ort), weight-only INT8 (trt)."""
    if not keep:
        return [], None
    weight_only = WeightFormat(8, block_size, symmetric) if backend == "trt" else None
    form = "weight-only INT8" if weight_only else "INT8 compute (DynamicQuantizeMatMul)"
    start = time.perf_counter()
    progress(f"vision sensitivity: each vision block alone at {form} on {calibration_description()}")
    kl = vision_block_sensitivities(checkpoint_dir, weight_only, progress=progress)
    ranking = most_sensitive(kl, len(kl))
    progress(f"vision sensitivity: done in {time.perf_counter() - start:.0f} s; ranking: "
             + ", ".join(f"{name.removeprefix('visual.')} {kl[name]:.2e}" for name in ranking))
    kept = ranking[:keep]
    progress(f"vision sensitivity: kept in FP32: {', '.join(name.removeprefix('visual.') for name in kept)}")
    return kept, {"metric": f"mean KL(fp32 || this block's linears alone at {form}), nats",
                  "calibration": calibration_description(), "kl": kl, "kept": kept}


def _export_part(part, export, config, checkpoint_dir, staging, dtype, progress):
    start = time.perf_counter()
    progress(f"{part}: tracing")
    with torch.device("meta"):
        model = Qwen3VL(config)
    use_stand_in_parameters(model, dtype)
    model.language_model.rotary_emb = MRotaryEmbedding(config.text)  # buffers were made on meta
    path = staging / f"{part}.onnx"
    param_names = export(model, path, dtype)
    del model

    proto = onnx.load(str(path), load_external_data=False)
    last_shown = [0.0]

    def show(done: int, total: int) -> None:
        now = time.perf_counter()
        if done == total or now - last_shown[0] > 2:
            last_shown[0] = now
            progress(f"{part}: weights {done}/{total}")

    attach_weights(proto, checkpoint_dir, param_names, dtype, staging / f"{part}.onnx.data", show)
    onnx.save(proto, str(path))
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise Qwen3VLError(f"{part} graph failed the ONNX checker: {str(exc).splitlines()[0]}") from None
    progress(f"{part}: done in {time.perf_counter() - start:.1f} s")


def _apply_passes(part: str, staging: Path, passes: list, progress) -> list[str]:
    def report(name: str, seconds: float) -> None:
        progress(f"{part}: {name} in {seconds:.1f} s")

    return run_passes(staging / f"{part}.onnx", passes, on_pass=report)


def _write_trt_graph(part: str, staging: Path, kv_dtype: str, progress) -> list[str]:
    """`<part>.trt.onnx`: the ONNX Runtime graph with fused nodes turned into plugin nodes."""
    changed = run_passes(staging / f"{part}.onnx", trt_passes(kv_dtype), out_path=staging / f"{part}.trt.onnx")
    progress(f"{part}: TensorRT graph with {', '.join(changed) or 'no plugin nodes'}")
    return changed


def _graph_kv_dtype(precision: str) -> str:
    """The KV cache type the exported graphs hold before any KV pass."""
    return "fp16" if precision == "fp16" else "fp32"


def _check_kv_dtype(kv_dtype: str | None, backend: str, precision: str) -> str:
    """The KV cache storage type a build writes; its one-line refusals."""
    default = DEFAULT_KV_DTYPE.get(precision) if backend == "ort" else None  # TensorRT: fp32/fp16 only
    kv_dtype = kv_dtype or default or _graph_kv_dtype(precision)
    if kv_dtype not in KV_DTYPES:
        raise Qwen3VLError(f"unsupported KV cache type {kv_dtype!r} (choose from {', '.join(KV_DTYPES)})")
    if backend == "trt" and kv_dtype not in TRT_KV_DTYPES:
        raise Qwen3VLError(f"--kv-dtype {kv_dtype}: the TensorRT attention plugin stores its KV cache as "
                           f"{' or '.join(TRT_KV_DTYPES)} ({kv_dtype} is not implemented)")
    return kv_dtype


def _store_kv_cache(staging: Path, float_engine: Manifest, kv_dtype: str, granularity: str, progress) -> list[str]:
    """Retypes the ONNX Runtime decoder's KV cache; int8 first calibrates its scales on the engine as
    built so far (float cache, weights already quantized)."""
    scales = calibrate_kv_scales(staging, float_engine, progress) if kv_dtype == "int8" else None
    changed = _apply_passes("decoder", staging, [kv_cache_dtype(kv_dtype, scales, granularity)], progress)
    return [f"decoder:{name}" for name in changed]


def _check_weights(checkpoint_dir: Path, config) -> None:
    """Names and shapes of every tensor (headers only), before spending minutes on a build."""
    with torch.device("meta"):
        expected = checkpoint_shapes(Qwen3VL(config))
    files = weight_files(checkpoint_dir)
    missing = [name for name in expected if name not in files]
    if missing:
        raise CheckpointError(f"{checkpoint_dir}: missing tensor {missing[0]}")
    for path in sorted(set(files.values())):
        with open_safetensors(path) as f:
            for name in f.keys():
                if name in expected and tuple(f.get_slice(name).get_shape()) != expected[name]:
                    raise CheckpointError(f"{path}: tensor {name} has shape {tuple(f.get_slice(name).get_shape())}, "
                                          f"expected {expected[name]}")


def _versions() -> dict[str, str]:
    versions = {}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions
