"""The GPU memory plan of an engine: what is resident on the card, and the decisions that make it fit.

Arithmetic only (no numpy, no GPU): `plan_memory(EngineFacts, gpu_memory)` counts, for one request
row,
- the CUDA context and TensorRT runtime (an assumed figure, `TENSORRT_OVERHEAD`),
- the decoder's weights as the engine stores them (the tied embedding once),
- the KV cache: layers x 2 x kv_heads x head_dim x bytes per token (2 B: 224 KiB fp32, 112 KiB fp16),
- the decoder's activations for one prefill chunk,
- when the vision encoder is on the GPU, its weights and its working set for one image (the
  attention scores of a frame, heads x L^2 floats, plus per-patch activations),
and decides: KV dtype, prefill chunk, vision on the GPU or the CPU, the longest context and the
largest image that fit. `qwen3vl plan` prints it; the GPU backends can call `plan_memory` with the
free memory they see.

Every figure is an estimate from shapes, not a measurement; the assumptions are named constants.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace

from .errors import Qwen3VLError

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

# CUDA context + TensorRT runtime with lazy module loading (CUDA_MODULE_LOADING=LAZY) and the
# cuBLAS/cuDNN tactic sources off: the TensorRT 8.6 audit's estimate, not measured.
TENSORRT_OVERHEAD = 150 * MiB
# Kept free of the card: the driver, a display, allocator rounding and fragmentation.
RESERVE_FRACTION, RESERVE_MIN = 0.10, 128 * MiB
DEFAULT_CONTEXT = 2048  # the plan's context unless asked: a few images and a long answer
CONTEXT_STEP = 256  # contexts are planned in steps of this many tokens
PREFILL_CHUNKS = (256, 128, 64, 32)  # the largest that fits is chosen
TARGET_IMAGE_PIXELS = 448 * 448  # the vision encoder goes on the GPU only if this image fits there
TEXT_TOKENS = 256  # of a context, kept for text and answer when the image budget is derived from it
KV_BYTES = {"fp32": 4, "fp16": 2, "int8": 1}  # int8: its per-block scales are not counted
SCALE_BYTES = 4  # block-quantized weights carry one float32 scale per block
FLOAT = 4  # activations are float32 (int4/int8 builds and Pascal's FP32 math alike)


def weight_bytes_per_parameter(precision: str, block_size: int = 64, symmetric: bool = True) -> float:
    """Bytes per weight as stored: fp32 4, fp16 2, block-quantized width/8 + a float32 scale per block
    (+ a packed zero point per block when asymmetric)."""
    if precision in ("fp32", "fp16"):
        return 4.0 if precision == "fp32" else 2.0
    bits = {"int8": 8, "int4": 4}[precision]
    return bits / 8 + SCALE_BYTES / block_size + (0 if symmetric else bits / 8 / block_size)


def _recorded_decoder_parameters(manifest, decoder_bytes: int) -> int | None:
    """Quantized weights from their records (shape), the rest of the decoder's bytes as float32."""
    records = (getattr(manifest, "quantization", None) or {}).get("tensors", {}).get("decoder")
    if not records:
        return None
    quantized = sum(r["shape"][0] * r["shape"][1] for r in records.values())
    return quantized + max(0, decoder_bytes - sum(r["bytes"] for r in records.values())) // FLOAT


@dataclass(frozen=True)
class EngineFacts:
    """What the plan needs of an engine: built from a manifest, or stated (tests, planning a build)."""

    model: object  # runtime.engine_manifest.ModelFacts, or anything with its attributes
    precision: str  # the decoder's: fp32, fp16, int8, int4
    decoder_weight_bytes: int  # as stored, the tied embedding once
    vision_weight_bytes: int
    max_context: int = 8192  # what the engine was built for
    max_pixels: int = 16777216  # the engine's image pixel budget
    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    kv_dtype: str | None = None  # the engine's KV storage type when its graphs fix one; None: the plan picks
    block_size: int = 64
    symmetric: bool = True
    vision_precision: str = "fp32"  # fp32, fp16 or int8 (the default of int8/int4 builds)
    # Decoder weights counted from the manifest's per-weight quantization record (mixed-precision
    # builds: an 8-bit head in an int4 build); None: derived from the bytes and the precision.
    decoder_parameter_count: int | None = None

    @classmethod
    def from_manifest(cls, manifest) -> "EngineFacts":
        """Weights from the engine's file sizes: each part's graph file plus its weight files
        (`<part>.*.data`, which the ONNX Runtime and TensorRT graphs share)."""
        sizes, files, passes = manifest.sizes, manifest.files, list(manifest.graph_passes)

        def part_bytes(part: str) -> int:
            data = sum(size for name, size in sizes.items() if name.startswith(f"{part}.") and ".data" in name)
            return data + sizes.get(files.get(part, ""), 0)

        quantized = next((p for p in passes if p.startswith("decoder:quantize_weights:")), "")
        block = re.search(r":b(\d+)", quantized)
        # The KV storage type: recorded by the build, else set by the TensorRT KV pass, else the
        # exported graph's (fp16 in fp16 builds, fp32 otherwise).
        kv = getattr(manifest, "kv_dtype", None) or next(
            (p.rsplit(":", 1)[1] for p in passes if "kv_cache:" in p), None)
        kv = kv or ("fp16" if manifest.precision == "fp16" else "fp32")
        vision_int8 = any(p.startswith("vision:") and "int8" in p for p in passes)
        vision = "int8" if vision_int8 else "fp16" if manifest.precision == "fp16" else "fp32"
        image = manifest.image_processor
        return cls(manifest.model, manifest.precision, part_bytes("decoder"), part_bytes("vision"),
                   manifest.max_context, image.max_pixels, image.patch_size, image.temporal_patch_size,
                   image.merge_size, kv, int(block.group(1)) if block else 64, ":asym" not in quantized, vision,
                   _recorded_decoder_parameters(manifest, part_bytes("decoder")))

    # -- shapes ----------------------------------------------------------------------------------

    @property
    def attention_heads(self) -> int:
        m = self.model
        return getattr(m, "num_attention_heads", None) or m.hidden_size // m.head_dim

    @property
    def intermediate_size(self) -> int:
        return getattr(self.model, "intermediate_size", None) or 3 * self.model.hidden_size  # Qwen3-VL: 3x

    @property
    def bytes_per_parameter(self) -> float:
        return weight_bytes_per_parameter(self.precision, self.block_size, self.symmetric)

    @property
    def decoder_parameters(self) -> int:
        if self.decoder_parameter_count is not None:
            return self.decoder_parameter_count
        return round(self.decoder_weight_bytes / self.bytes_per_parameter)

    @property
    def vision_parameters(self) -> int:
        return round(self.vision_weight_bytes / weight_bytes_per_parameter(self.vision_precision, self.block_size))

    def rebuilt(self, precision: str) -> "EngineFacts":
        """The same model built at another precision, as `qwen3vl build --precision` would store it
        (int8/int4: INT8 vision weights; fp16: an fp16 vision encoder)."""
        vision = "int8" if precision in ("int8", "int4") else precision
        per = weight_bytes_per_parameter
        return replace(self, precision=precision, symmetric=True, kv_dtype=None, vision_precision=vision,
                       decoder_parameter_count=self.decoder_parameters,
                       decoder_weight_bytes=round(self.decoder_parameters * per(precision, self.block_size)),
                       vision_weight_bytes=round(self.vision_parameters * per(vision, self.block_size)))

    @property
    def embedding_bytes(self) -> int:
        """The tied embedding's share of the decoder weights (stored once, read by gather and lm_head)."""
        return round(self.model.vocab_size * self.model.hidden_size * self.bytes_per_parameter)

    def kv_bytes_per_token(self, kv_dtype: str) -> int:
        m = self.model
        return m.num_hidden_layers * 2 * m.num_key_value_heads * m.head_dim * KV_BYTES[kv_dtype]

    def prefill_activation_bytes(self, chunk: int) -> int:
        """Live float32 tensors of one decoder layer for a chunk of tokens (TensorRT reuses them
        layer to layer): embeddings in (token, visual, deepstack), residual, norm, q/k/v, attention
        and projection outputs, gate/up/act of the MLP; plus one row of logits."""
        m = self.model
        per_token = (m.hidden_size * (6 + 1 + m.num_deepstack)
                     + (self.attention_heads + 2 * m.num_key_value_heads) * m.head_dim
                     + 3 * self.intermediate_size)
        return chunk * per_token * FLOAT + m.vocab_size * FLOAT

    @property
    def pixels_per_visual_token(self) -> int:
        return (self.patch_size * self.merge_size) ** 2

    def vision_working_set(self, pixels: int) -> int:
        """One image of `pixels` (one frame of L = pixels / patch^2 patches): the frame's attention
        scores (heads x L^2 float32; an upper bound: the plugin's tiled kernel keeps none of them) plus
        per-patch activations (input row, residual, norm, q/k/v and rotary copies, MLP at 4x width:
        Qwen3-VL's 4096 for 1024) and the merged outputs with their deepstack copies."""
        m = self.model
        patches = pixels // self.patch_size ** 2
        width = m.vision_num_heads * m.vision_head_dim
        per_patch = 3 * self.temporal_patch_size * self.patch_size ** 2 + 8 * width + 2 * 4 * width
        tokens = patches // self.merge_size ** 2
        scores = m.vision_num_heads * patches * patches * FLOAT
        return scores + patches * per_patch * FLOAT + (1 + m.num_deepstack) * tokens * m.hidden_size * FLOAT


@dataclass
class PlanItem:
    what: str
    bytes: int


@dataclass
class MemoryPlan:
    gpu_memory: int
    usable: int  # gpu_memory less the reserve
    overhead: int
    context: int  # the context the resident figures are for
    fits: bool
    kv_dtype: str
    prefill_chunk: int | None  # None: not even the smallest chunk fits
    vision_on_gpu: bool
    max_context: int  # the longest context that fits with these decisions (0: none)
    max_pixels: int  # the largest image the decisions allow at `context`
    items: list[PlanItem] = field(default_factory=list)
    kv_by_context: dict[int, dict[str, int]] = field(default_factory=dict)  # tokens -> dtype -> bytes
    activations_by_chunk: dict[int, int] = field(default_factory=dict)  # prefill chunk -> bytes
    notes: list[str] = field(default_factory=list)  # assumptions and advice
    suggestions: list[str] = field(default_factory=list)  # what would fit, when this does not

    @property
    def total(self) -> int:
        return sum(item.bytes for item in self.items)

    @property
    def spare(self) -> int:
        return self.usable - self.total

    def verdict(self) -> str:
        where = "vision on the GPU" if self.vision_on_gpu else "vision on the CPU"
        if self.fits:
            return (f"fits: {format_bytes(self.total)} of {format_bytes(self.gpu_memory)} at {self.context} tokens "
                    f"({where}, {format_bytes(self.spare)} to spare)")
        return (f"does not fit: needs {format_bytes(self.total)} at {self.context} tokens, "
                f"{format_bytes(self.usable)} usable of {format_bytes(self.gpu_memory)}")

    def to_dict(self) -> dict:
        body = asdict(self)
        body.update(total=self.total, spare=self.spare, verdict=self.verdict())
        return body

    def lines(self) -> list[str]:
        """The plan as text, one fact per line."""
        out = [self.verdict(), ""]
        width = max(len(item.what) for item in self.items)
        out += [f"  {item.what:<{width}}  {format_bytes(item.bytes):>10}" for item in self.items]
        out += [f"  {'total':<{width}}  {format_bytes(self.total):>10}",
                f"  {'usable (card less reserve)':<{width}}  {format_bytes(self.usable):>10}", ""]
        side = int(self.max_pixels ** 0.5)
        out += ["decisions:" if self.fits else "decisions (none holds: the decoder does not fit):",
                f"  KV cache dtype   {self.kv_dtype}",
                f"  prefill chunk    {f'{self.prefill_chunk} tokens' if self.prefill_chunk else '-'}",
                f"  vision encoder   {'GPU' if self.vision_on_gpu else 'CPU (ONNX Runtime)'}",
                f"  max context      {f'{self.max_context} tokens' if self.fits else '-'}",
                f"  max pixels       {f'{self.max_pixels} (about {side}x{side})' if self.fits else '-'}", ""]
        out.append("KV cache by context: " + ", ".join(
            f"{tokens}: {' / '.join(f'{format_bytes(b)} {dtype}' for dtype, b in by_dtype.items())}"
            for tokens, by_dtype in self.kv_by_context.items()))
        out.append("prefill activations by chunk: " + ", ".join(
            f"{chunk}: {format_bytes(b)}" for chunk, b in self.activations_by_chunk.items()))
        if self.suggestions:
            out += ["", "what would fit:"] + [f"  - {s}" for s in self.suggestions]
        if self.notes:
            out += ["", "notes:"] + [f"  - {n}" for n in self.notes]
        return out


def format_bytes(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / MiB:.0f} MiB"


def parse_size(text: str) -> int:
    """"2GiB", "2 GB", "2048MiB", "2G" (binary), "1.5e9" (bytes) -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]?)(i?)(b?)\s*", text.lower())
    if not match:
        raise Qwen3VLError(f"not a memory size: {text!r} (e.g. 2GiB, 4GB, 1536MiB)")
    number, prefix, binary, b = match.groups()
    power = "kmgt".index(prefix) + 1 if prefix else 0
    base = 1000 if (prefix and b and not binary) else 1024  # "GB" decimal; "GiB" and a bare "G" binary
    return int(float(number) * base ** power)


def reserve_for(gpu_memory: int) -> int:
    return max(int(gpu_memory * RESERVE_FRACTION), RESERVE_MIN)


def plan_memory(engine: EngineFacts, gpu_memory: int, context: int | None = None, kv_dtype: str | None = None,
                overhead: int = TENSORRT_OVERHEAD, reserve: int | None = None) -> MemoryPlan:
    """The plan for one request row on a card of `gpu_memory` bytes (total, or what is free).

    Decisions, in order: the KV dtype (fp16 unless asked or fixed by the engine); the largest prefill
    chunk of PREFILL_CHUNKS that fits beside the decoder at `context`; the vision encoder on the GPU
    if a 448x448 image fits beside that, else on the CPU; then the longest context and the largest
    image those choices leave room for."""
    if kv_dtype is not None and kv_dtype not in KV_BYTES:
        raise Qwen3VLError(f"KV dtype {kv_dtype!r}: the plan knows {', '.join(KV_BYTES)}")
    context = context if context is not None else min(engine.max_context, DEFAULT_CONTEXT)
    if not 1 <= context <= engine.max_context:
        raise Qwen3VLError(f"a context of {context} tokens: the engine was built for 1 to {engine.max_context} "
                           f"(rebuild with a larger --max-context)")
    kv = kv_dtype or engine.kv_dtype or "fp16"
    usable = gpu_memory - (reserve if reserve is not None else reserve_for(gpu_memory))
    per_token = engine.kv_bytes_per_token(kv)

    def decoder_need(tokens: int, chunk: int) -> int:
        return overhead + engine.decoder_weight_bytes + tokens * per_token + engine.prefill_activation_bytes(chunk)

    chunk = next((c for c in PREFILL_CHUNKS if decoder_need(context, c) <= usable), None)
    target = min(TARGET_IMAGE_PIXELS, engine.max_pixels)
    vision_need = engine.vision_weight_bytes + engine.vision_working_set(target)
    vision_on_gpu = chunk is not None and decoder_need(context, chunk) + vision_need <= usable
    planned_chunk = chunk or PREFILL_CHUNKS[-1]

    items = [PlanItem("CUDA context + TensorRT (assumed)", overhead),
             PlanItem(f"decoder weights ({_weights_label(engine)}; tied embedding once: "
                      f"{format_bytes(engine.embedding_bytes)})", engine.decoder_weight_bytes),
             PlanItem(f"KV cache ({context} tokens x {per_token // KiB} KiB, {kv})", context * per_token),
             PlanItem(f"prefill activations ({planned_chunk}-token chunk)",
                      engine.prefill_activation_bytes(planned_chunk))]
    if vision_on_gpu:
        items += [PlanItem("vision weights", engine.vision_weight_bytes),
                  PlanItem(f"vision working set ({target} pixels: {target // engine.patch_size ** 2} patches)",
                           engine.vision_working_set(target))]
    vision_resident = vision_need if vision_on_gpu else 0

    max_context = 0
    if chunk is not None:
        room = usable - decoder_need(0, chunk) - vision_resident
        max_context = min(engine.max_context, (room // per_token) // CONTEXT_STEP * CONTEXT_STEP)
        max_context = max(max_context, context)  # the planned context fits by construction
    token_cap = max(context - TEXT_TOKENS, 1) * engine.pixels_per_visual_token
    max_pixels = min(engine.max_pixels, token_cap)
    if vision_on_gpu:
        room = usable - decoder_need(context, chunk) - engine.vision_weight_bytes
        max_pixels = _largest_image(engine, room, max_pixels)

    plan = MemoryPlan(gpu_memory, usable, overhead, context, chunk is not None, kv, chunk, vision_on_gpu,
                      max_context, max_pixels, items)
    contexts = sorted({c for c in (1024, 2048, 4096, 8192, context) if c <= engine.max_context})
    plan.kv_by_context = {c: {d: c * engine.kv_bytes_per_token(d) for d in ("fp16", "fp32")} for c in contexts}
    plan.activations_by_chunk = {c: engine.prefill_activation_bytes(c) for c in sorted(PREFILL_CHUNKS)}
    plan.notes += _notes(engine, plan, vision_need, target)
    if not plan.fits:
        plan.suggestions += _suggestions(engine, plan, overhead, reserve)
    return plan


def _weights_label(engine: EngineFacts) -> str:
    if engine.precision in ("int8", "int4"):
        return f"{engine.precision} b{engine.block_size}{'' if engine.symmetric else ' asym'}"
    return engine.precision


def _largest_image(engine: EngineFacts, room: int, cap: int) -> int:
    """The most pixels (whole visual tokens) up to `cap` whose vision working set fits in `room`."""
    step = engine.pixels_per_visual_token
    low, high = 0, cap // step
    while low < high:
        mid = (low + high + 1) // 2
        if engine.vision_working_set(mid * step) <= room:
            low = mid
        else:
            high = mid - 1
    return low * step


def _notes(engine: EngineFacts, plan: MemoryPlan, vision_need: int, target: int) -> list[str]:
    notes = [f"assumed: CUDA context + TensorRT {format_bytes(plan.overhead)} (lazy module loading, "
             f"cuBLAS/cuDNN tactics off); {format_bytes(plan.gpu_memory - plan.usable)} of the card kept free; "
             f"one request row; estimates from shapes, not measured"]
    if plan.kv_dtype == "fp16":
        notes.append("KV cache in fp16: storage only, the math stays fp32 (FP16 arithmetic on SM 6.x runs at "
                     "1/64 rate); half the bytes of fp32 per token")
    if engine.kv_dtype is not None and engine.kv_dtype != plan.kv_dtype:
        notes.append(f"this engine stores its KV cache as {engine.kv_dtype}: build it with --kv-dtype "
                     f"{plan.kv_dtype} for this plan")
    elif plan.kv_dtype == "fp32":
        extra = plan.context * engine.kv_bytes_per_token("fp32") // 2
        notes.append(f"an fp16 KV cache (--kv-dtype fp16) would free {format_bytes(extra)} at this context")
    if plan.fits and not plan.vision_on_gpu:
        short = vision_need - (plan.usable - plan.total)
        notes.append(f"vision encoder on the CPU: on the GPU it needs {format_bytes(vision_need)} for a "
                     f"{target}-pixel image, {format_bytes(short)} more than is left; a shorter --context "
                     f"or a lighter vision build frees it")
    if plan.vision_on_gpu:
        notes.append("vision working set counts a frame's full attention scores (heads x L^2 float32): an "
                     "upper bound, the vision attention plugin keeps none of them")
    return notes


def _suggestions(engine: EngineFacts, plan: MemoryPlan, overhead: int, reserve: int | None) -> list[str]:
    out = []
    smallest = PREFILL_CHUNKS[-1]
    base = overhead + engine.decoder_weight_bytes + engine.prefill_activation_bytes(smallest)
    per_token = engine.kv_bytes_per_token(plan.kv_dtype)
    if base + CONTEXT_STEP * per_token <= plan.usable:
        tokens = min(engine.max_context, (plan.usable - base) // per_token // CONTEXT_STEP * CONTEXT_STEP)
        out.append(f"a context of {tokens} tokens (--context {tokens})")
    order = ("int4", "int8", "fp16", "fp32")
    lighter = [p for p in order if weight_bytes_per_parameter(p, engine.block_size) < engine.bytes_per_parameter]
    for precision in lighter:
        other = engine.rebuilt(precision)
        trial = plan_memory(other, plan.gpu_memory, plan.context, None, overhead, reserve)
        if trial.fits:
            caveat = " (FP16 math runs at 1/64 rate on SM 6.x: prefer int4/int8 there)" if precision == "fp16" else ""
            out.append(f"an {precision} build: decoder {format_bytes(other.decoder_weight_bytes)}, "
                       f"{format_bytes(trial.total)} in all at "
                       f"{plan.context} tokens, vision on the {'GPU' if trial.vision_on_gpu else 'CPU'} "
                       f"(qwen3vl build --backend trt --precision {precision} --kv-dtype fp16){caveat}")
    need = base + plan.context * per_token
    card = max(int(need / (1 - RESERVE_FRACTION)), need + RESERVE_MIN)
    out.append(f"a GPU with at least {format_bytes(card)} for this engine at {plan.context} tokens")
    out.append("the CPU: --backend ort runs every engine")
    return out
