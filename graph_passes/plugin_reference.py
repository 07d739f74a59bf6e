"""Numpy references of the TensorRT plugin ops, so that a TensorRT-target graph runs on the CPU.

The TensorRT passes (`trt_rmsnorm`, `trt_attention`, `trt_weight_gemm`, `trt_vision_attention`)
replace ONNX Runtime contrib ops and op patterns with plugin nodes of domain "qwen3vl.trt". Each
plugin's contract is written in trt_plugins/<name>/README.md; the functions here *are* those
contracts in numpy, and `run_reference` evaluates a whole graph with them through
`onnx.reference.ReferenceEvaluator`. The contrib ops that a partly converted graph may still hold
(SimplifiedLayerNormalization, SkipSimplifiedLayerNormalization, GroupQueryAttention, MatMulNBits,
GatherBlockQuantized) have references here too, written from ONNX Runtime's documented contracts;
onnx.reference knows none of them.

Every kernel computes in float32 and rounds once to the storage type on the way out, as the plugins
must (FP16 arithmetic on Pascal runs at 1/64 rate).

The plugin ops take exactly what TensorRT 8.6's parser hands the plugins, and refuse anything else:
packed weights, tables and zero points as int32 words (reinterpreted as the uint8 bytes of
MatMulNBits' layout, as the plugins reinterpret their pointers), int32 indices, no bool input, and
the KV cache in its `kv_cache_type` (float16 storage with float32 math). The kernels below
(`weight_only_gemm`, `quantized_gather`, `vision_attention`, ...) work on the bytes and masks
themselves, as the CUDA kernels' C API does.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from .onnx_helpers import MS_DOMAIN, PLUGIN_DOMAIN

F32 = np.float32


# -- kernels ---------------------------------------------------------------------------------------

def rms_norm(x: np.ndarray, gamma: np.ndarray, epsilon: float, skip: np.ndarray | None = None
             ) -> tuple[np.ndarray, np.ndarray | None]:
    """RMSNorm over the last axis; with `skip`, of `x + skip`, whose sum is returned too (in x's type)."""
    v = x.astype(F32) if skip is None else x.astype(F32) + skip.astype(F32)
    inv = 1.0 / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + F32(epsilon))
    y = (v * inv * gamma.astype(F32)).astype(x.dtype)
    return y, None if skip is None else v.astype(x.dtype)


def rotate_half(x: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def kv_cache_attention(q, k, v, past_key, past_value, seqlens_k, total_sequence_length, num_heads: int,
                       kv_num_heads: int, scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GroupQueryAttention without rotary over one preallocated buffer (model_src/kv_cache_attention.py).

    q (B, S, H*D), k/v (B, S, KV*D), any float type or float32 already; past (B, KV, M, D).
    Returns the attention output (B, S, H*D) in float32 and the buffers with the new rows written
    (in past's type, rows past the capacity dropped)."""
    b, s, _ = q.shape
    capacity, d = past_key.shape[2], past_key.shape[3]
    group = num_heads // kv_num_heads
    q = q.astype(F32).reshape(b, s, kv_num_heads, group, d).transpose(0, 2, 3, 1, 4)  # (B, KV, G, S, D)
    k = k.reshape(b, s, kv_num_heads, d).transpose(0, 2, 1, 3)  # (B, KV, S, D)
    v = v.reshape(b, s, kv_num_heads, d).transpose(0, 2, 1, 3)

    valid = seqlens_k.astype(np.int64) + 1  # keys per row after this step
    is_prompt = int(np.asarray(total_sequence_length).reshape(-1)[0]) == s
    start = np.zeros_like(valid) if is_prompt else valid - s  # where this step's rows go
    query_pos = start[:, None] + np.arange(s)  # (B, S)
    present_key, present_value = past_key.copy(), past_value.copy()
    for row in range(b):
        for i in range(s):
            if 0 <= query_pos[row, i] < capacity:
                present_key[row, :, query_pos[row, i]] = k[row, :, i]
                present_value[row, :, query_pos[row, i]] = v[row, :, i]

    key_pos = np.arange(capacity)
    allowed = (key_pos[None, None, :] <= query_pos[:, :, None]) & (key_pos[None, None, :] < valid[:, None, None])
    scores = np.einsum("bkgsd,bkmd->bkgsm", q, present_key.astype(F32)) * F32(scale)
    scores = np.where(allowed[:, None, None], scores, -np.inf)
    scores -= scores.max(axis=-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    out = np.einsum("bkgsm,bkmd->bkgsd", probs, present_value.astype(F32))
    return out.transpose(0, 3, 1, 2, 4).reshape(b, s, num_heads * d), present_key, present_value


def qwen3vl_attention(q, k, v, q_norm_weight, k_norm_weight, cos, sin, past_key, past_value, seqlens_k,
                      total_sequence_length, num_heads: int, kv_num_heads: int, head_dim: int, scale: float,
                      epsilon: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The Qwen3VLAttention plugin: per-head RMSNorm of q and k, M-RoPE rotary with the given
    cos/sin (B, S, D), then kv_cache_attention. Keys enter the cache rounded to its type."""
    b, s, _ = q.shape
    qn, _ = rms_norm(q.astype(F32).reshape(b, s, num_heads, head_dim), q_norm_weight, epsilon)
    kn, _ = rms_norm(k.astype(F32).reshape(b, s, kv_num_heads, head_dim), k_norm_weight, epsilon)
    c, sn = cos.astype(F32)[:, :, None], sin.astype(F32)[:, :, None]
    q_rot = (qn * c + rotate_half(qn) * sn).reshape(b, s, -1)
    k_rot = (kn * c + rotate_half(kn) * sn).reshape(b, s, -1).astype(past_key.dtype)
    out, present_key, present_value = kv_cache_attention(
        q_rot, k_rot, v.astype(past_value.dtype), past_key, past_value, seqlens_k, total_sequence_length,
        num_heads, kv_num_heads, scale)
    return out.astype(q.dtype), present_key, present_value


def unpack_codes(data: np.ndarray, bits: int) -> np.ndarray:
    """uint8 rows -> codes; 4 bit: two per byte, the lower index in the low nibble."""
    data = np.asarray(data, dtype=np.uint8)
    if bits == 8:
        return data
    out = np.empty((*data.shape[:-1], data.shape[-1] * 2), dtype=np.uint8)
    out[..., 0::2] = data & 0x0F
    out[..., 1::2] = data >> 4
    return out


def dequantize_rows(data: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, bits: int,
                    block_size: int) -> np.ndarray:
    """Block-quantized rows (R, k_blocks * block_size * bits / 8) uint8 -> float32 (R, k_blocks * block_size).
    Scales (R, k_blocks); zero points uint8 packed like the data (R, ceil(k_blocks * bits / 8)) or
    absent, meaning 2**(bits-1)."""
    rows = data.shape[0]
    codes = unpack_codes(data.reshape(rows, -1), bits).astype(F32)
    k_blocks = codes.shape[1] // block_size
    scales = np.asarray(scales, dtype=F32).reshape(rows, k_blocks)
    if zero_points is None:
        zero = np.full((rows, k_blocks), 1 << (bits - 1), dtype=F32)
    else:
        zero = unpack_codes(np.asarray(zero_points).reshape(rows, -1), bits)[:, :k_blocks].astype(F32)
    return ((codes.reshape(rows, k_blocks, block_size) - zero[..., None]) * scales[..., None]).reshape(rows, -1)


def weight_only_gemm(a, b, scales, zero_points, bias, K: int, N: int, bits: int, block_size: int) -> np.ndarray:
    """MatMulNBits / Qwen3VLWeightOnlyGemm: a (..., K) @ dequantized W (K, N) [+ bias], in a's type."""
    w = dequantize_rows(np.asarray(b).reshape(N, -1), scales, zero_points, bits, block_size)[:, :K]  # (N, K)
    y = a.astype(F32) @ w.T
    if bias is not None:
        y = y + bias.astype(F32)
    return y.astype(a.dtype)


def quantized_gather(data, indices, scales, zero_points, bits: int, block_size: int) -> np.ndarray:
    """GatherBlockQuantized (gather_axis 0, quantize_axis last) / Qwen3VLQuantizedGather: the rows
    `indices` of the table, dequantized, (*indices.shape, k_blocks * block_size), in scales' type.
    Only the gathered rows are dequantized, as a kernel would."""
    flat = np.asarray(indices).reshape(-1).astype(np.int64)
    rows = data.shape[0]
    flat = np.where(flat < 0, flat + rows, flat)
    table = np.asarray(data).reshape(rows, -1)
    z = None if zero_points is None else np.asarray(zero_points).reshape(rows, -1)[flat]
    values = dequantize_rows(table[flat], np.asarray(scales).reshape(rows, -1)[flat], z, bits, block_size)
    return values.reshape(*np.shape(indices), -1).astype(scales.dtype)


def vision_attention(q, k, v, frame_patch_index, frame_patch_mask, patch_frame_slot, num_heads: int,
                     head_dim: int, scale: float) -> np.ndarray:
    """Block-diagonal attention over packed patches: q/k/v (N, H*D); patch n attends to the patches
    of its own frame (the slots of row patch_frame_slot[n] // L of frame_patch_index that hold a
    patch). A slot holds a patch when its index is in [0, N) and, if a mask is given (the kernel's
    optional bool mask), the mask is set; the plugin gets no mask and padding slots hold -1."""
    frames, longest = frame_patch_index.shape
    raw = frame_patch_index.reshape(frames, longest).astype(np.int64)
    present = (raw >= 0) & (raw < q.shape[0])
    if frame_patch_mask is not None:
        present &= np.asarray(frame_patch_mask).astype(bool)
    frame_patch_mask = present
    index = np.where(present, raw, 0).reshape(-1)

    def per_frame(t):  # (N, H*D) -> (F, H, L, D)
        return t.astype(F32)[index].reshape(frames, longest, num_heads, head_dim).transpose(0, 2, 1, 3)

    scores = np.einsum("fhqd,fhkd->fhqk", per_frame(q), per_frame(k)) * F32(scale)
    scores = np.where(frame_patch_mask.astype(bool)[:, None, None, :], scores, -np.inf)
    scores -= scores.max(axis=-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    out = np.einsum("fhqk,fhkd->fqhd", probs, per_frame(v)).reshape(frames * longest, num_heads * head_dim)
    return out[patch_frame_slot.astype(np.int64)].astype(q.dtype)


# -- ONNX Runtime contrib ops (what the ORT-target graph holds) ------------------------------------

class SimplifiedLayerNormalization(OpRun):
    """ORT registers this one in the ONNX domain."""

    op_domain = ""

    def _run(self, x, scale, bias=None, axis=-1, epsilon=1e-5, stash_type=1):
        if axis not in (-1, x.ndim - 1):
            raise NotImplementedError("SimplifiedLayerNormalization over an axis other than the last")
        return (rms_norm(x, scale, epsilon)[0],)


class SkipSimplifiedLayerNormalization(OpRun):
    op_domain = MS_DOMAIN

    def _run(self, x, skip, gamma, bias=None, epsilon=1e-5):
        if bias is not None:
            skip = skip.astype(F32) + bias.astype(F32)
        y, total = rms_norm(x, gamma, epsilon, skip=skip)
        unused = np.empty(0, F32)  # mean and inv_std_var: the graphs never read them
        return y, unused, unused, total


class GroupQueryAttention(OpRun):
    op_domain = MS_DOMAIN

    def _run(self, q, k, v, past_key, past_value, seqlens_k, total_sequence_length, *rest, num_heads=None,
             kv_num_heads=None, scale=None, do_rotary=0, local_window_size=-1, softcap=0.0, rotary_interleaved=0,
             smooth_softmax=0, **unused):
        if do_rotary or any(r is not None for r in rest) or local_window_size not in (-1, None) or softcap:
            raise NotImplementedError("GroupQueryAttention reference: only the decoder's form (no rotary, "
                                      "no window, no softcap, no extra inputs)")
        d = past_key.shape[-1]
        out, present_key, present_value = kv_cache_attention(
            q, k, v, past_key, past_value, seqlens_k, total_sequence_length, num_heads, kv_num_heads,
            scale if scale else d**-0.5)
        return out.astype(q.dtype), present_key, present_value


class MatMulNBits(OpRun):
    op_domain = MS_DOMAIN

    def _run(self, a, b, scales, zero_points=None, g_idx=None, bias=None, K=None, N=None, bits=4, block_size=None,
             accuracy_level=0, **unused):
        if g_idx is not None:
            raise NotImplementedError("MatMulNBits reference: g_idx")
        if zero_points is not None and zero_points.dtype != np.uint8:
            raise NotImplementedError("MatMulNBits reference: float zero points")
        return (weight_only_gemm(a, b, scales, zero_points, bias, K, N, bits, block_size),)


class GatherBlockQuantized(OpRun):
    op_domain = MS_DOMAIN

    def _run(self, data, indices, scales, zero_points=None, bits=4, block_size=128, gather_axis=0, quantize_axis=1,
             **unused):
        if gather_axis != 0 or quantize_axis not in (1, -1) or data.dtype != np.uint8:
            raise NotImplementedError("GatherBlockQuantized reference: uint8 table, gather_axis 0, quantize_axis 1")
        return (quantized_gather(data, indices, scales, zero_points, bits, block_size),)


# -- the plugins (contracts: trt_plugins/*/README.md) ----------------------------------------------

class Qwen3VLRMSNorm(OpRun):
    """(X, gamma) -> Y, or with has_skip=1 (X, skip, gamma) -> Y[, X + skip when emit_sum=1]."""

    op_domain = PLUGIN_DOMAIN

    def _run(self, x, *rest, epsilon=1e-6, has_skip=0, emit_sum=0, **plugin):
        skip, gamma = (rest[0], rest[1]) if has_skip else (None, rest[0])
        y, total = rms_norm(x, gamma, epsilon, skip=skip)
        return (y, total) if emit_sum else (y,)


# What the plugins' tensors may be: the types TensorRT 8.6 offers a plugin (FLOAT, HALF, INT32).
_ACTIVATIONS = (np.float32, np.float16)
_KV_TYPES = {"fp32": np.float32, "fp16": np.float16}


def expect_type(plugin: str, name: str, array: np.ndarray, *types) -> None:
    """Refuses an input of a type the plugin is not handed (uint8, bool, int64 never are in 8.6)."""
    if np.asarray(array).dtype not in [np.dtype(t) for t in types]:
        raise TypeError(f"{plugin}: input {name} is {np.asarray(array).dtype}, the plugin takes "
                        f"{' or '.join(np.dtype(t).name for t in types)}")


def word_bytes(words: np.ndarray) -> np.ndarray:
    """int32 words -> their little-endian bytes, last axis 4x longer: the plugin's pointer cast."""
    words = np.ascontiguousarray(words, dtype="<i4")
    return words.view(np.uint8).reshape(*words.shape[:-1], words.shape[-1] * 4)


def zero_point_bytes(words: np.ndarray, rows: int, k_blocks: int, bits: int) -> np.ndarray:
    """Flat int32 zero points -> MatMulNBits' uint8 (rows, ceil(k_blocks * bits / 8)), padding dropped."""
    row = -(-k_blocks * bits // 8)
    data = word_bytes(np.asarray(words).reshape(-1))
    if data.size < rows * row or data.size - rows * row >= 4:
        raise ValueError(f"zero points: {data.size} bytes for {rows} rows of {row} (padded to a whole word)")
    return data[: rows * row].reshape(rows, row)


class Qwen3VLAttention(OpRun):
    op_domain = PLUGIN_DOMAIN

    def _run(self, q, k, v, q_norm_weight, k_norm_weight, cos, sin, past_key, past_value, seqlens_k,
             total_sequence_length, num_heads=None, kv_num_heads=None, head_dim=None, scale=None, epsilon=None,
             kv_cache_type="fp32", **plugin):
        if kv_cache_type not in _KV_TYPES:
            raise NotImplementedError(f"Qwen3VLAttention reference: kv_cache_type {kv_cache_type!r}")
        expect_type("Qwen3VLAttention", "q", q, *_ACTIVATIONS)
        for name, value in (("k", k), ("v", v), ("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight),
                            ("cos", cos), ("sin", sin)):
            expect_type("Qwen3VLAttention", name, value, q.dtype)
        for name, value in (("past_key", past_key), ("past_value", past_value)):
            expect_type("Qwen3VLAttention", name, value, _KV_TYPES[kv_cache_type])
        for name, value in (("seqlens_k", seqlens_k), ("total_sequence_length", total_sequence_length)):
            expect_type("Qwen3VLAttention", name, value, np.int32)
        return qwen3vl_attention(q, k, v, q_norm_weight, k_norm_weight, cos, sin, past_key, past_value, seqlens_k,
                                 total_sequence_length, num_heads, kv_num_heads, head_dim, scale, epsilon)


class Qwen3VLWeightOnlyGemm(OpRun):
    """(A, B, scales[, zero_points if has_zero_points][, bias if has_bias]) -> Y; B int32
    (N, k_blocks, blob / 4) and zero points flat int32 words over MatMulNBits' bytes."""

    op_domain = PLUGIN_DOMAIN

    def _run(self, a, b, scales, *rest, K=None, N=None, bits=4, block_size=None, has_zero_points=0, has_bias=0,
             **plugin):
        rest = list(rest)
        zero_points = rest.pop(0) if has_zero_points else None
        bias = rest.pop(0) if has_bias else None
        expect_type("Qwen3VLWeightOnlyGemm", "A", a, *_ACTIVATIONS)
        expect_type("Qwen3VLWeightOnlyGemm", "B", b, np.int32)
        k_blocks = -(-K // block_size)
        if b.shape != (N, k_blocks, block_size * bits // 32):
            raise ValueError(f"Qwen3VLWeightOnlyGemm: B {b.shape}, expected {(N, k_blocks, block_size * bits // 32)}")
        if zero_points is not None:
            expect_type("Qwen3VLWeightOnlyGemm", "zero_points", zero_points, np.int32)
            zero_points = zero_point_bytes(zero_points, N, k_blocks, bits)
        return (weight_only_gemm(a, word_bytes(b), scales, zero_points, bias, K, N, bits, block_size),)


class Qwen3VLQuantizedGather(OpRun):
    """(data, indices, scales[, zero_points]) -> Y; data int32 (V, k_blocks, blob / 4), indices int32."""

    op_domain = PLUGIN_DOMAIN

    def _run(self, data, indices, scales, zero_points=None, bits=4, block_size=None, has_zero_points=0, **plugin):
        expect_type("Qwen3VLQuantizedGather", "data", data, np.int32)
        expect_type("Qwen3VLQuantizedGather", "indices", indices, np.int32)
        expect_type("Qwen3VLQuantizedGather", "scales", scales, *_ACTIVATIONS)
        rows, k_blocks = scales.shape
        if data.shape != (rows, k_blocks, block_size * bits // 32):
            raise ValueError(f"Qwen3VLQuantizedGather: data {data.shape}, expected "
                             f"{(rows, k_blocks, block_size * bits // 32)}")
        if has_zero_points:
            expect_type("Qwen3VLQuantizedGather", "zero_points", zero_points, np.int32)
            zero_points = zero_point_bytes(zero_points, rows, k_blocks, bits)
        else:
            zero_points = None
        return (quantized_gather(word_bytes(data).reshape(rows, -1), indices, scales, zero_points, bits,
                                 block_size),)


class Qwen3VLVisionAttention(OpRun):
    """(q, k, v, frame_patch_index, patch_frame_slot) -> output; indices int32, padding slots hold an
    index outside [0, N) (the graph writes -1 where the mask is unset)."""

    op_domain = PLUGIN_DOMAIN

    def _run(self, q, k, v, frame_patch_index, patch_frame_slot, num_heads=None, head_dim=None, scale=None, **plugin):
        for name, value in (("q", q), ("k", k), ("v", v)):
            expect_type("Qwen3VLVisionAttention", name, value, *_ACTIVATIONS)
        expect_type("Qwen3VLVisionAttention", "frame_patch_index", frame_patch_index, np.int32)
        expect_type("Qwen3VLVisionAttention", "patch_frame_slot", patch_frame_slot, np.int32)
        return (vision_attention(q, k, v, frame_patch_index, None, patch_frame_slot, num_heads, head_dim, scale),)


class GatherElements(OpRun):
    """onnx.reference's own GatherElements goes through np.choose, which takes at most 64 choices: it
    fails on any axis longer than 64 (the decoder picks each row's logits position from S tokens)."""

    op_domain = ""

    def _run(self, data, indices, axis=0):
        indices = np.where(indices < 0, indices + data.shape[axis], indices)
        return (np.take_along_axis(data, indices.astype(np.int64), axis=axis),)


PLUGIN_OPS = (Qwen3VLRMSNorm, Qwen3VLAttention, Qwen3VLWeightOnlyGemm, Qwen3VLQuantizedGather, Qwen3VLVisionAttention)
CONTRIB_OPS = (SimplifiedLayerNormalization, SkipSimplifiedLayerNormalization, GroupQueryAttention, MatMulNBits,
               GatherBlockQuantized)
REFERENCE_OPS = PLUGIN_OPS + CONTRIB_OPS + (GatherElements,)


def run_reference(model_path: str | Path, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Runs the graph at `model_path` (plugin nodes, contrib ops, standard ops) on the CPU with the
    references above; returns every graph output by name. Loads the weights into memory: meant
    for test-sized graphs."""
    model = onnx.load(str(model_path))  # with external data: the evaluator reads initializers itself
    evaluator = ReferenceEvaluator(model, new_ops=list(REFERENCE_OPS))
    names = [o.name for o in model.graph.output]
    return dict(zip(names, evaluator.run(None, dict(feeds)), strict=True))
