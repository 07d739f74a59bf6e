"""Weight-only block quantization: linear layers -> com.microsoft MatMulNBits, embeddings ->
com.microsoft GatherBlockQuantized, both as ONNX Runtime's CPU kernels define them.

Layout (checked numerically against ONNX Runtime 1.32 CPU in tests/test_pass_quantize.py), for a
weight with K inputs and N outputs, quantized along K in blocks of `block_size`:
  packed       uint8 (N, k_blocks, block_size * bits / 8), k_blocks = ceil(K / block_size); 4-bit
               values two per byte, the lower K index in the low nibble. The last block is padded.
  scales       (N, k_blocks), the activations' float type.
  zero_points  uint8 (N, ceil(k_blocks * bits / 8)), packed like the weights; absent when symmetric,
               where both ops imply 2**(bits-1) (8 or 128).
  w = (q - zero_point) * scale.
An embedding table (vocab, hidden) is already N rows of K values, so the same bytes viewed as
(vocab, k_blocks * blob) are GatherBlockQuantized's uint8 `data` (gather_axis 0, quantize_axis 1).

Large tensors are streamed: each weight is memory-mapped from its external data file, quantized in
row chunks and appended to a new data file, so the pass holds one weight's mapped pages plus one
chunk of temporaries (2 B decoder: ~1.6 GB peak RSS, 1.2 GB of it the mapped fp32 embedding).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .external_data import append_array, append_tensor, external_tensor, new_data_file, read_tensor
from .onnx_helpers import FLOAT_TYPES, MS_DOMAIN, all_names, attribute, drop_unused, unique_name, use_domain

_CHUNK_BYTES = 1 << 20  # float32 bytes quantized per step (cache-sized: the scale search is ~3x faster than at 64 MB)


# -- numpy reference quantizer ---------------------------------------------------------------------

SCALE_SEARCHES = ("none", "clip")
# Clipping ratios tried per block by scale_search="clip": a block's largest values are rare, so a
# range a little narrower than them rounds the many small ones more finely (the squared error of
# every ratio is measured; 1.0 is max-abs itself, so no block gets worse).
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def quantize_blockwise(weight: np.ndarray, bits: int = 4, block_size: int = 64, symmetric: bool = True,
                       rows: bool = False, scale_dtype=np.float32, scale_search: str = "none"
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Quantizes a (K, N) MatMul weight (or, with rows=True, an (N, K) table such as an embedding or
    a Gemm transB weight) along K; returns (packed, scales, zero_points) in MatMulNBits' layout.

    scale_search "none" (max-abs): round to nearest, so every element is within scale / 2 of its
    value. Symmetric: scale = max|w| / (2**(bits-1) - 1), so q - 2**(bits-1) spans [-7, 7] (4 bit);
    the one unused code (0) buys exact sign symmetry. Asymmetric: the block's [min, max] widened to
    include 0 (so 0 is exact and the zero point is in range) over 2**bits - 1 steps.

    scale_search "clip": per block, the scale (and zero point) of least squared reconstruction error
    among max-abs, the clipping ratios CLIP_RATIOS of it, (symmetric) the same ratios of the scale
    that puts the block's largest-magnitude value on the extra code -2**(bits-1) (a negative scale
    when that value is positive: all 2**bits codes in use), and a least-squares refit of the best
    scale to its rounded codes. No block's error exceeds max-abs's.
    """
    _check_format(bits, block_size)
    if scale_search not in SCALE_SEARCHES:
        raise ValueError(f"scale_search must be one of {', '.join(SCALE_SEARCHES)}, got {scale_search!r}")
    w = np.asarray(weight)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {w.shape}")
    table = w if rows else w.T  # (N, K) either way; a view, copied chunk by chunk below
    n, k = table.shape
    k_blocks = -(-k // block_size)
    packed = np.empty((n, k_blocks, block_size * bits // 8), dtype=np.uint8)
    scales = np.empty((n, k_blocks), dtype=scale_dtype)
    zero_points = None if symmetric else np.empty((n, -(-k_blocks * bits // 8)), dtype=np.uint8)
    step = max(1, _CHUNK_BYTES // (4 * k_blocks * block_size))
    for start in range(0, n, step):
        stop = min(n, start + step)
        q, s, z = _quantize_rows(table[start:stop], bits, block_size, symmetric, scale_dtype, scale_search)
        packed[start:stop] = _pack(q, bits).reshape(stop - start, k_blocks, -1)
        scales[start:stop] = s
        if zero_points is not None:
            zero_points[start:stop] = _pack(z, bits)
    return packed, scales, zero_points


def dequantize_blockwise(packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, k: int,
                         bits: int = 4, block_size: int = 64, rows: bool = False) -> np.ndarray:
    """The inverse: float32 (K, N), or (N, K) with rows=True."""
    _check_format(bits, block_size)
    n = scales.shape[0]
    k_blocks = -(-k // block_size)
    q = _unpack(np.asarray(packed).reshape(n, -1), bits).reshape(n, k_blocks, block_size).astype(np.float32)
    if zero_points is None:
        z = np.full((n, k_blocks), 1 << (bits - 1), dtype=np.float32)
    else:
        z = _unpack(np.asarray(zero_points), bits)[:, :k_blocks].astype(np.float32)
    w = ((q - z[..., None]) * np.asarray(scales, dtype=np.float32)[..., None]).reshape(n, -1)[:, :k]
    return w if rows else np.ascontiguousarray(w.T)


def stored_block_size(block_size: int, k: int) -> int:
    """The block a weight of input size `k` is stored in: a block longer than K holds K values and
    padding, and a shorter block (a power of two, at least 16) quantizes identically without it."""
    return min(block_size, max(16, 1 << (k - 1).bit_length()))


def round_trip(weight: np.ndarray, form: "WeightFormat") -> np.ndarray:
    """An (out, in) weight quantized along `in` in `form` as the pass stores it (stored_block_size's
    block) and dequantized back: what a quantized graph computes with."""
    k = weight.shape[1]
    block_size = stored_block_size(form.block_size, k)
    packed = quantize_blockwise(weight, form.bits, block_size, form.symmetric, rows=True,
                                scale_search=form.scale_search)
    return dequantize_blockwise(*packed, k, form.bits, block_size, rows=True)


def _check_format(bits: int, block_size: int) -> None:
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")


def _quantize_rows(table: np.ndarray, bits: int, block_size: int, symmetric: bool, scale_dtype,
                   scale_search: str = "none"):
    """(n, K) float -> codes (n, k_blocks * block_size), scales (n, k_blocks), zero points (n, k_blocks)."""
    n, k = table.shape
    k_blocks = -(-k // block_size)
    blocks = np.zeros((n, k_blocks * block_size), dtype=np.float32)
    blocks[:, :k] = table  # zero padding quantizes to the zero point: exact, and ignored by the ops
    blocks = blocks.reshape(n, k_blocks, block_size)
    top = (1 << bits) - 1
    if symmetric:
        zero = np.full((n, k_blocks), 1 << (bits - 1), dtype=np.float32)
        scale = np.abs(blocks).max(axis=2) / ((1 << (bits - 1)) - 1)
    else:
        low = np.minimum(blocks.min(axis=2), 0)
        high = np.maximum(blocks.max(axis=2), 0)
        scale = (high - low) / top
    # Quantize against the scale as stored (fp16 engines round it), so dequantization is consistent.
    scale = scale.astype(scale_dtype)
    if symmetric:
        if scale_search == "clip":
            scale = _searched_symmetric_scale(blocks, scale, bits, scale_dtype)
    else:
        zero = _zero_point(low, scale, top)
        if scale_search == "clip":
            scale, zero = _searched_asymmetric_scale(blocks, scale, zero, low, high, top, scale_dtype)
    codes = _codes(blocks, scale, zero, top)
    return codes.astype(np.uint8).reshape(n, -1), scale, zero.astype(np.uint8)


def _codes(blocks: np.ndarray, scale: np.ndarray, zero: np.ndarray, top: int) -> np.ndarray:
    """Round to nearest against the stored scale, clipped to the codes."""
    divisor = np.where(scale == 0, 1, scale).astype(np.float32)  # all-zero block: any scale is exact
    return np.clip(np.rint(blocks / divisor[..., None]) + zero[..., None], 0, top)


def _zero_point(low: np.ndarray, scale: np.ndarray, top: int) -> np.ndarray:
    divisor = np.where(scale == 0, 1, scale).astype(np.float32)
    return np.clip(np.rint(-low / divisor), 0, top).astype(np.float32)


def _squared_error(blocks, scale, zero, top) -> tuple[np.ndarray, np.ndarray]:
    """Each block's squared reconstruction error with this scale and zero point, and its centred codes
    (the codes of `_codes`, minus the zero point; computed in place: this is the search's inner loop)."""
    divisor = np.where(scale == 0, 1, scale).astype(np.float32)
    centred = np.divide(blocks, divisor[..., None])
    np.rint(centred, out=centred)
    np.clip(centred, -zero[..., None], top - zero[..., None], out=centred)
    difference = centred * scale.astype(np.float32)[..., None]
    difference -= blocks
    return np.einsum("ijk,ijk->ij", difference, difference), centred


def _refit(blocks: np.ndarray, centred: np.ndarray, fallback: np.ndarray, scale_dtype) -> np.ndarray:
    """The least-squares scale for fixed centred codes: sum(w q) / sum(q q)."""
    norm = np.square(centred).sum(axis=2)
    fitted = (blocks * centred).sum(axis=2) / np.where(norm == 0, 1, norm)
    return np.where(norm == 0, fallback, fitted).astype(scale_dtype)


def _searched_symmetric_scale(blocks: np.ndarray, max_abs_scale: np.ndarray, bits: int, scale_dtype) -> np.ndarray:
    top = (1 << bits) - 1
    zero = np.full(max_abs_scale.shape, 1 << (bits - 1), dtype=np.float32)
    # The value of largest magnitude, sign kept: on code 0 (q - zero = -2**(bits-1)) it gets the
    # code range's longer side.
    index = np.abs(blocks).argmax(axis=2)[..., None]
    extreme = np.take_along_axis(blocks, index, axis=2)[..., 0]
    full_range = extreme / -(1 << (bits - 1))
    candidates = [max_abs_scale.astype(np.float32) * r for r in CLIP_RATIOS]
    candidates += [full_range * r for r in CLIP_RATIOS]
    best, best_error = max_abs_scale, None
    for candidate in candidates:
        best, best_error = _keep_better(blocks, candidate.astype(scale_dtype), zero, top, best, best_error)
    _, centred = _squared_error(blocks, best, zero, top)
    best, _ = _keep_better(blocks, _refit(blocks, centred, best, scale_dtype), zero, top, best, best_error)
    return best


def _keep_better(blocks, candidate, zero, top, best, best_error):
    error, _ = _squared_error(blocks, candidate, zero, top)
    if best_error is None:
        return candidate, error
    better = error < best_error
    return np.where(better, candidate, best), np.where(better, error, best_error)


def _searched_asymmetric_scale(blocks, scale, zero, low, high, top, scale_dtype):
    """Ranges [r low, r high] for each clipping ratio r (0 stays inside, so the zero point stays in
    range), then a least-squares refit of the best scale to its codes, zero point kept."""
    best_scale, best_zero = scale, zero
    best_error, _ = _squared_error(blocks, scale, zero, top)
    for r in CLIP_RATIOS[1:]:
        candidate = ((high - low) * r / top).astype(scale_dtype)
        candidate_zero = _zero_point(low * r, candidate, top)
        error, _ = _squared_error(blocks, candidate, candidate_zero, top)
        better = error < best_error
        best_scale = np.where(better, candidate, best_scale)
        best_zero = np.where(better, candidate_zero, best_zero)
        best_error = np.where(better, error, best_error)
    _, centred = _squared_error(blocks, best_scale, best_zero, top)
    fitted = _refit(blocks, centred, best_scale, scale_dtype)
    error, _ = _squared_error(blocks, fitted, best_zero, top)
    return np.where(error < best_error, fitted, best_scale).astype(scale_dtype), best_zero


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """(n, m) codes -> (n, ceil(m * bits / 8)) bytes; 4-bit: even index in the low nibble."""
    if bits == 8:
        return codes
    if codes.shape[1] % 2:
        codes = np.concatenate([codes, np.zeros((codes.shape[0], 1), dtype=np.uint8)], axis=1)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def _unpack(data: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return data
    out = np.empty((data.shape[0], data.shape[1] * 2), dtype=np.uint8)
    out[:, 0::2] = data & 0x0F
    out[:, 1::2] = data >> 4
    return out


# -- the pass --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WeightFormat:
    """How one weight is quantized: bits, block size along K, zero points or not, and how each
    block's scale is chosen (quantize_blockwise's scale_search)."""

    bits: int = 4
    block_size: int = 64
    symmetric: bool = True
    scale_search: str = "none"

    def __post_init__(self):
        _check_format(self.bits, self.block_size)
        if self.scale_search not in SCALE_SEARCHES:
            raise ValueError(f"scale_search must be one of {', '.join(SCALE_SEARCHES)}, got {self.scale_search!r}")

    @property
    def label(self) -> str:
        return f"int{self.bits}:b{self.block_size}:{'sym' if self.symmetric else 'asym'}:{self.scale_search}"


def quantize_weights(bits: int = 4, block_size: int = 64, symmetric: bool = True, accuracy_level: int = 0,
                     include_embedding: bool = True, scale_search: str = "none",
                     overrides: dict[str, tuple[WeightFormat, str]] | None = None,
                     keep_float: Iterable[str] = ()) -> "QuantizeWeights":
    """The pass: MatMul/Gemm over a 2-D float weight initializer -> MatMulNBits and, with
    include_embedding, Gather over one -> GatherBlockQuantized (see QuantizeWeights). Without
    include_embedding a table keeps all its uses in float, the lm_head tied to it included; an
    untied lm_head is an ordinary linear layer either way.

    Every weight gets (bits, block_size, symmetric, scale_search) unless `overrides` names it:
    weight initializer name -> (its WeightFormat, the reason, e.g. "head" or "sensitive"). Weights
    `keep_float` names stay float (an entry is a weight name or a prefix of names, e.g.
    "visual.blocks.3": the weights under it). After a run, the pass's `records` say what each
    quantized weight got (QuantizeWeights.records).

    accuracy_level 0 computes exactly on the dequantized weights but is ORT CPU's slow path (2 B
    decode step on 2 cores: int4 ~2x and int8 ~20x slower than fp32); 4 quantizes activations to
    int8 per block, the fast path (int4 0.7x, int8 0.4x of the fp32 step time)."""
    return QuantizeWeights(WeightFormat(bits, block_size, symmetric, scale_search), accuracy_level, include_embedding,
                           overrides or {}, keep_float)


class QuantizeWeights:
    """Rewrites, in place:
      MatMul(x, W (K, N))                -> MatMulNBits(x, W.quant, W.scales[, W.zero_points])
      Gemm(x, W (N, K), bias, transB=1)  -> MatMulNBits(x, ..., bias); an all-zero Constant bias is dropped
      Gather(E (V, H), ids)              -> GatherBlockQuantized(E.quant_table, ids, E.scales[, E.zero_points])
    Other nodes, and weights of other shapes or types, are left as they are.

    A tied embedding (one table read by the Gather and by the lm_head Gemm) is quantized once.
    MatMulNBits checks at load that B is exactly (N, k_blocks, blob), while GatherBlockQuantized
    wants the table as (V, k_blocks * blob); so `E.quant` and `E.quant_table` are two initializers
    whose external data entries point at the same bytes, stored once in the file. Scales and zero
    points have the same shape for both ops and are shared as they are. (A Reshape node instead
    would be constant-folded into a second copy at load; a rank-3 Gather on E.quant works but
    needs rank-3 scales, i.e. a copy of those.) When the hidden size is not a multiple of
    block_size the table rows keep the last block's padding and a Slice trims the gathered rows.
    """

    def __init__(self, default: WeightFormat, accuracy_level: int, include_embedding: bool,
                 overrides: dict[str, tuple[WeightFormat, str]], keep_float: Iterable[str] = ()):
        if accuracy_level not in (0, 1, 2, 3, 4):
            raise ValueError(f"accuracy_level must be 0-4, got {accuracy_level}")
        self.default, self.overrides = default, dict(overrides)
        self.accuracy_level, self.include_embedding = accuracy_level, include_embedding
        self.keep_float = tuple(keep_float)
        label = default.label if default.scale_search != "none" else default.label.removesuffix(":none")
        self.name = f"quantize_weights:{label}" + (":mixed" if self.overrides else "")  # the manifest has each weight's
        if self.keep_float:
            self.name += ":keep_float"  # the manifest says which (quantization.vision_sensitivity)
        # Filled by a run: weight name -> {bits, block_size, symmetric, scale_search, reason, bytes}.
        self.records: dict[str, dict] = {}

    def kept_float(self, name: str) -> bool:
        return any(name == kept or name.startswith(f"{kept}.") for kept in self.keep_float)

    def format_of(self, name: str) -> tuple[WeightFormat, str]:
        return self.overrides.get(name, (self.default, "default"))

    def __call__(self, model: onnx.ModelProto, folder: Path) -> bool:
        folder = Path(folder)
        graph = model.graph
        initializers = {t.name: t for t in graph.initializer}
        constants = {n.output[0]: n for n in graph.node if n.op_type == "Constant" and len(n.output) == 1}
        uses = self._find_uses(graph, initializers, constants)
        if not uses:
            return False

        taken = all_names(graph)
        location = new_data_file(model, folder, initializers[next(iter(uses))], f"int{self.default.bits}")
        path = folder / location
        replacements: dict[str, list[onnx.NodeProto]] = {}  # by first output
        added: list[TensorProto] = []
        try:
            with open(path, "wb") as out:
                for name, node_uses in uses.items():
                    source = read_tensor(initializers[name], folder)
                    for layout in dict.fromkeys(u.layout for u in node_uses):
                        stored = self._store(source, name, layout, out, location, taken)
                        self._record(name, stored)
                        for use in node_uses:
                            if use.layout == layout:
                                replacements[use.node.output[0]] = self._rewrite(use, stored, taken, added)
                    del source  # closes the memory map before the next weight
        except BaseException:
            path.unlink(missing_ok=True)
            raise

        nodes = [new for node in graph.node for new in replacements.get(node.output[0], [node])]
        del graph.node[:]
        graph.node.extend(nodes)
        graph.initializer.extend(added)
        dropped_biases = {u.bias for node_uses in uses.values() for u in node_uses if u.drop_bias}
        drop_unused(graph, set(uses) | dropped_biases)
        use_domain(model, MS_DOMAIN)
        return True

    def _find_uses(self, graph, initializers, constants) -> dict[str, list["_Use"]]:
        """Weight name -> the nodes to rewrite that read it."""
        weights = {name for name, t in initializers.items() if _is_float_matrix(t) and not self.kept_float(name)}
        uses: dict[str, list[_Use]] = {}
        for node in graph.node:
            if node.domain not in ("", "ai.onnx"):
                continue
            if node.op_type == "MatMul" and node.input[1] in weights and node.input[0] not in initializers:
                weight, use = node.input[1], _Use(node, "kn")
            elif node.op_type == "Gemm" and len(node.input) > 1 and node.input[1] in weights:
                weight, use = node.input[1], _gemm_use(node, initializers, constants)
            elif node.op_type == "Gather" and node.input[0] in weights and attribute(node, "axis", 0) == 0:
                weight, use = node.input[0], _Use(node, "nk", gather=True)
            else:
                continue
            if use is not None:
                uses.setdefault(weight, []).append(use)
        if not self.include_embedding:  # tables stay float, with the lm_head tied to them
            uses = {name: us for name, us in uses.items() if not any(u.gather for u in us)}
        return uses

    def _store(self, source: np.ndarray, name: str, layout: str, out, location: str, taken: set[str]) -> "_Stored":
        """Quantizes one weight into `out`; returns the tensors that describe it (not yet in the graph)."""
        rows = layout == "nk"
        k = source.shape[1] if rows else source.shape[0]
        form, reason = self.format_of(name)
        block_size = stored_block_size(form.block_size, k)
        packed, scales, zero_points = quantize_blockwise(source, form.bits, block_size, form.symmetric,
                                                         rows=rows, scale_dtype=source.dtype,
                                                         scale_search=form.scale_search)
        n, k_blocks, blob = packed.shape
        stored = _Stored(k=k, n=n, bits=form.bits, block_size=block_size, symmetric=form.symmetric,
                         scale_search=form.scale_search, reason=reason,
                         nbytes=packed.nbytes + scales.nbytes + (0 if zero_points is None else zero_points.nbytes))
        offset = append_array(out, packed)
        stored.quant = external_tensor(unique_name(f"{name}.quant", taken), packed.shape, TensorProto.UINT8, location,
                                       offset, packed.nbytes)
        # The same bytes, as GatherBlockQuantized's (n, k_blocks * blob) table.
        stored.table = external_tensor(unique_name(f"{name}.quant_table", taken), (n, k_blocks * blob),
                                       TensorProto.UINT8, location, offset, packed.nbytes)
        stored.scales = append_tensor(out, scales, unique_name(f"{name}.scales", taken), location)
        if zero_points is not None:
            stored.zero_points = append_tensor(out, zero_points, unique_name(f"{name}.zero_points", taken), location)
        return stored

    def _record(self, name: str, stored: "_Stored") -> None:
        self.records[name] = {"bits": stored.bits, "block_size": stored.block_size, "symmetric": stored.symmetric,
                              "scale_search": stored.scale_search, "reason": stored.reason,
                              "shape": [stored.n, stored.k], "bytes": stored.nbytes}

    def _rewrite(self, use: "_Use", stored: "_Stored", taken: set[str],
                 added: list[TensorProto]) -> list[onnx.NodeProto]:
        """The nodes replacing use.node; appends to `added` the initializers they need first."""
        node = use.node
        zero_points = stored.need(stored.zero_points, added) if stored.zero_points else ""
        scales = stored.need(stored.scales, added)
        if not use.gather:
            inputs = [node.input[0], stored.need(stored.quant, added), scales, zero_points]
            if use.bias and not use.drop_bias:
                inputs += ["", use.bias]  # the empty slot is the deprecated g_idx
            while inputs[-1] == "":
                inputs.pop()
            return [helper.make_node("MatMulNBits", inputs, list(node.output), name=node.name, domain=MS_DOMAIN,
                                     K=stored.k, N=stored.n, bits=stored.bits, block_size=stored.block_size,
                                     accuracy_level=self.accuracy_level)]

        inputs = [stored.need(stored.table, added), node.input[1], scales] + ([zero_points] if zero_points else [])
        padded = stored.k % stored.block_size != 0
        output = unique_name(f"{node.output[0]}_padded", taken) if padded else node.output[0]
        gather = helper.make_node("GatherBlockQuantized", inputs, [output], name=node.name, domain=MS_DOMAIN,
                                  bits=stored.bits, block_size=stored.block_size, gather_axis=0, quantize_axis=1)
        if not padded:
            return [gather]
        prefix = node.name or node.output[0]
        bounds = []
        for suffix, value in (("trim_starts", 0), ("trim_ends", stored.k), ("trim_axes", -1)):
            name = unique_name(f"{prefix}_{suffix}", taken)
            added.append(numpy_helper.from_array(np.array([value], dtype=np.int64), name))
            bounds.append(name)
        return [gather, helper.make_node("Slice", [output, *bounds], [node.output[0]],
                                         name=unique_name(f"{prefix}_trim", taken))]


class _Use:
    """A node to rewrite and how it reads its weight: "kn" (MatMul's B, (K, N)) or "nk" (rows: a
    Gemm transB weight or a Gather table, (N, K))."""

    def __init__(self, node: onnx.NodeProto, layout: str, gather: bool = False, bias: str = "",
                 drop_bias: bool = False):
        self.node, self.layout, self.gather, self.bias, self.drop_bias = node, layout, gather, bias, drop_bias


class _Stored:
    """One quantized weight's tensors; each enters the graph when a rewritten node first needs it."""

    def __init__(self, k: int, n: int, bits: int, block_size: int, symmetric: bool = True, scale_search: str = "none",
                 reason: str = "default", nbytes: int = 0):
        self.k, self.n, self.bits, self.block_size = k, n, bits, block_size
        self.symmetric, self.scale_search, self.reason, self.nbytes = symmetric, scale_search, reason, nbytes
        self.quant = self.table = self.scales = self.zero_points = None
        self._added: set[str] = set()

    def need(self, tensor: TensorProto, added: list[TensorProto]) -> str:
        if tensor.name not in self._added:
            self._added.add(tensor.name)
            added.append(tensor)
        return tensor.name


def _gemm_use(node, initializers, constants) -> _Use | None:
    """A Gemm is a linear layer when it computes x @ W (or W^T) + bias, bias absent, zero or (N,)."""
    if attribute(node, "transA", 0) or attribute(node, "alpha", 1.0) != 1.0:
        return None
    rows, cols = initializers[node.input[1]].dims
    layout = "nk" if attribute(node, "transB", 0) else "kn"
    out_features = rows if layout == "nk" else cols
    bias = node.input[2] if len(node.input) > 2 else ""
    if not bias:
        return _Use(node, layout)
    if bias in constants:
        value = attribute(constants[bias], "value", None)
        if value is None:
            return None
        value = numpy_helper.to_array(value)
        if not value.any():
            return _Use(node, layout, bias=bias, drop_bias=True)
        shape = value.shape
    elif bias in initializers:
        shape = tuple(initializers[bias].dims)
    else:
        return None  # a computed bias: its shape is not known here
    if attribute(node, "beta", 1.0) != 1.0 or tuple(shape) != (out_features,):
        return None
    return _Use(node, layout, bias=bias)


def _is_float_matrix(tensor: TensorProto) -> bool:
    return len(tensor.dims) == 2 and min(tensor.dims) > 0 and tensor.data_type in FLOAT_TYPES
