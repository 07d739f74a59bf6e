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
row chunks and appended to a new data file, so peak memory stays near one chunk, not one model.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MS_DOMAIN = "com.microsoft"
_ALIGN = 4096  # external data offsets aligned for memory mapping, as the exporter writes them
_CHUNK_BYTES = 64 << 20  # float32 bytes quantized per step


# -- numpy reference quantizer ---------------------------------------------------------------------

def quantize_blockwise(weight: np.ndarray, bits: int = 4, block_size: int = 64, symmetric: bool = True,
                       rows: bool = False, scale_dtype=np.float32
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Quantizes a (K, N) MatMul weight (or, with rows=True, an (N, K) table such as an embedding or
    a Gemm transB weight) along K; returns (packed, scales, zero_points) in MatMulNBits' layout.

    Symmetric: scale = max|w| / (2**(bits-1) - 1), so q - 2**(bits-1) spans [-7, 7] (4 bit) and the
    error is at most scale / 2; the one unused code (0) buys exact sign symmetry. Asymmetric: the
    block's [min, max] widened to include 0 (so 0 is exact and the zero point is in range) over
    2**bits - 1 steps.
    """
    _check_format(bits, block_size)
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
        q, s, z = _quantize_rows(table[start:stop], bits, block_size, symmetric, scale_dtype)
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


def _check_format(bits: int, block_size: int) -> None:
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")


def _quantize_rows(table: np.ndarray, bits: int, block_size: int, symmetric: bool, scale_dtype):
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
    divisor = np.where(scale == 0, 1, scale).astype(np.float32)  # all-zero block: any scale is exact
    if not symmetric:
        zero = np.clip(np.rint(-low / divisor), 0, top)
    codes = np.clip(np.rint(blocks / divisor[..., None]) + zero[..., None], 0, top)
    return codes.astype(np.uint8).reshape(n, -1), scale, zero.astype(np.uint8)


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


