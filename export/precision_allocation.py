"""Each decoder linear's format under a budget of bytes read per decoded token (`qwen3vl build
--precision int4 --weight-budget SIZE`): the formats go where the output is most sensitive to them.
Unless --head-bits fixes it, the lm_head (the tied embedding) is one more weight to place.

Inputs: each linear's measured sensitivity at the build's body format (export/sensitivity.py: KL of
the output when that linear alone is quantized), and each linear's relative squared error in every
candidate format, measured on a sample of its rows. A linear's KL in another format is estimated as
its measured KL scaled by the ratio of the two formats' errors (for small perturbations KL grows with
the squared error of the weights). Then the cheapest format everywhere, and upgrades bought in order
of estimated KL saved per byte, while the budget lasts: the greedy answer to a knapsack whose items'
options lie on their lower convex hulls.

The candidates are the formats ONNX Runtime's MatMulNBits runs on the CPU with the build's symmetry and
scale search: 4 bits in blocks of 128, 64 or 32, and 8 bits in blocks of 128. Bytes are those the
quantizer stores: codes, one float32 scale per block, packed zero points when asymmetric.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from graph_passes.quantize_weights import WeightFormat, round_trip, stored_block_size
from model_src.checkpoint import checkpoint_name, iter_tensors, weight_files
from runtime.errors import Qwen3VLError

SAMPLE_ROWS = 256  # rows of each linear on which the formats' errors are measured


def candidate_formats(body: WeightFormat) -> list[WeightFormat]:
    """The body's format and the ladder, with the body's symmetry and scale search."""
    ladder = [replace(body, bits=4, block_size=128), replace(body, bits=4, block_size=64),
              replace(body, bits=4, block_size=32), replace(body, bits=8, block_size=128)]
    return ladder + ([body] if body not in ladder else [])


def stored_bytes(shape: tuple[int, int], form: WeightFormat) -> int:
    """Bytes the quantizer stores for an (out, in) linear in `form`."""
    n, k = shape
    block_size = stored_block_size(form.block_size, k)
    blocks = -(-k // block_size)
    codes = n * blocks * block_size * form.bits // 8
    zero_points = 0 if form.symmetric else n * -(-blocks * form.bits // 8)
    return codes + n * blocks * 4 + zero_points


def other_bytes_per_token(text_config, head: WeightFormat | None, kv_dtype: str | None = None,
                          kv_scales: str = "per_channel") -> int:
    """What the decoder reads per token besides the allocated weights: the lm_head in `head`'s format
    (None: the allocation places it), the float32 norms (two per layer, the q/k norms, the final one)
    and an int8 KV cache's scales."""
    t = text_config
    scales = 0
    if kv_dtype == "int8":
        scales = 4 * t.num_hidden_layers * 2 * (t.num_key_value_heads * t.head_dim if kv_scales == "per_channel" else 1)
    head_bytes = 0 if head is None else stored_bytes((t.vocab_size, t.hidden_size), head)
    return head_bytes + scales + 4 * (t.num_hidden_layers * 2 * (t.hidden_size + t.head_dim) + t.hidden_size)


def linear_shapes(text_config) -> dict[str, tuple[int, int]]:
    """(out, in) of each linear of one decoder layer, by its name in the layer."""
    t = text_config
    q, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    return {"self_attn.q_proj": (q, t.hidden_size), "self_attn.k_proj": (kv, t.hidden_size),
            "self_attn.v_proj": (kv, t.hidden_size), "self_attn.o_proj": (t.hidden_size, q),
            "mlp.gate_proj": (t.intermediate_size, t.hidden_size), "mlp.up_proj": (t.intermediate_size, t.hidden_size),
            "mlp.down_proj": (t.hidden_size, t.intermediate_size)}


def smallest_bytes_per_token(text_config, body: WeightFormat, head_placed: bool) -> int:
    """The allocated weights' bytes in the cheapest candidate everywhere: the least a budget can give them."""
    cheapest = candidate_formats(body)[0]
    t = text_config
    layers = t.num_hidden_layers * sum(stored_bytes(shape, cheapest) for shape in linear_shapes(t).values())
    return layers + (stored_bytes((t.vocab_size, t.hidden_size), cheapest) if head_placed else 0)


def placed_parameters(text_config, head_placed: bool) -> int:
    """How many weights the allocation places: every linear of every layer, and the lm_head's."""
    t = text_config
    layers = t.num_hidden_layers * sum(n * k for n, k in linear_shapes(t).values())
    return layers + (t.vocab_size * t.hidden_size if head_placed else 0)


def budget_bytes(budget: int | str, text_config, fixed: int, head_placed: bool) -> int:
    """A --weight-budget in bytes read per token: bytes as given, or "4.5bpw" (the placed weights at
    that many bits each on average, scales included) plus the `fixed` bytes read besides them."""
    if isinstance(budget, int):
        return budget
    text = budget.strip().lower()
    try:
        bits = float(text.removesuffix("bpw")) if text.endswith("bpw") else None
    except ValueError:
        bits = None
    if bits is None or not 0 < bits <= 32:
        raise Qwen3VLError(f"--weight-budget {budget!r}: give bytes read per token (e.g. 1.1GB) or bits per "
                           f"weight (e.g. 4.5bpw)")
    return fixed + int(bits * placed_parameters(text_config, head_placed) / 8)


def format_errors(checkpoint_dir: str | Path, names: list[str], formats: list[WeightFormat],
                  rows: int = SAMPLE_ROWS, progress: Callable[[str], None] = lambda message: None
                  ) -> tuple[dict[str, dict[WeightFormat, float]], dict[str, tuple[int, int]]]:
    """(weight name -> {format: relative squared error on `rows` evenly spaced rows}, weight name ->
    (out, in) shape), for the graph's weight names (language_model.layers.N.<linear>.weight)."""
    files = weight_files(checkpoint_dir)
    theirs = {checkpoint_name(name): name for name in names}
    errors, shapes = {}, {}
    for count, (their_name, tensor) in enumerate(iter_tensors(files, list(theirs)), 1):
        name = theirs[their_name]
        shapes[name] = tuple(tensor.shape)
        picked = np.linspace(0, tensor.shape[0] - 1, min(rows, tensor.shape[0])).round().astype(np.int64)
        sample = tensor[picked].float().numpy()
        energy = float(np.square(sample, dtype=np.float64).sum()) or 1.0
        errors[name] = {}
        for form in formats:
            restored = round_trip(sample, form)
            errors[name][form] = float(np.square(restored - sample, dtype=np.float64).sum()) / energy
        if count % 28 == 0 or count == len(theirs):
            progress(f"format errors: {count}/{len(theirs)} weights")
    return errors, shapes


@dataclass
class Allocation:
    formats: dict[str, WeightFormat]  # weight name -> its format
    bytes: int  # the linears' stored bytes
    estimated_kl: dict[str, float]  # weight name -> estimated KL in its format


def allocate(sensitivities: dict[str, float], measured_at: WeightFormat, errors: dict[str, dict[WeightFormat, float]],
             shapes: dict[str, tuple[int, int]], budget: int) -> Allocation:
    """The formats of least estimated total KL whose bytes fit `budget` (the linears' bytes only)."""
    options = {name: _hull(sensitivities[name], measured_at, errors[name], shapes[name]) for name in sensitivities}
    chosen = {name: 0 for name in options}  # index into each linear's hull: its cheapest format first
    spent = sum(hull[0][0] for hull in options.values())
    if spent > budget:
        raise Qwen3VLError(f"the weight budget leaves {budget / 1e6:,.0f} MB for the decoder's linears; the "
                           f"smallest format everywhere needs {spent / 1e6:,.0f} MB")
    queue = [(-_saving_per_byte(options[name], 0), name) for name in options if len(options[name]) > 1]
    heapq.heapify(queue)
    while queue:
        _, name = heapq.heappop(queue)
        hull, at = options[name], chosen[name]
        extra = hull[at + 1][0] - hull[at][0]
        if spent + extra > budget:
            continue  # this upgrade does not fit; cheaper ones of other linears may
        spent += extra
        chosen[name] = at + 1
        if at + 2 < len(hull):
            heapq.heappush(queue, (-_saving_per_byte(hull, at + 1), name))
    return Allocation({name: options[name][i][2] for name, i in chosen.items()}, spent,
                      {name: options[name][i][1] for name, i in chosen.items()})


def _hull(sensitivity: float, measured_at: WeightFormat, errors: dict[WeightFormat, float],
          shape: tuple[int, int]) -> list[tuple[int, float, WeightFormat]]:
    """(bytes, estimated KL, format) of the formats on the lower convex hull, by bytes ascending:
    every step costs more bytes for less KL, at a falling KL saved per byte."""
    base = errors[measured_at] or 1e-30
    points = sorted(((stored_bytes(shape, form), sensitivity * errors[form] / base, form) for form in errors),
                    key=lambda point: point[:2])
    hull: list[tuple[int, float, WeightFormat]] = []
    for point in points:
        if hull and point[1] >= hull[-1][1]:
            continue  # dearer and no better
        while len(hull) >= 2 and _saving(hull[-2], hull[-1]) <= _saving(hull[-2], point):
            hull.pop()  # the middle point saves less per byte than going straight past it
        hull.append(point)
    return hull


def _saving(a, b) -> float:
    return (a[1] - b[1]) / max(1, b[0] - a[0])


def _saving_per_byte(hull, at: int) -> float:
    return _saving(hull[at], hull[at + 1])
