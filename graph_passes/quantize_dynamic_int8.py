"""INT8 weights with INT8 compute: linear layers -> com.microsoft DynamicQuantizeMatMul.

For compute-bound graphs on the CPU (the vision encoder: ~800 patches per 448x448 image). Weight-only
MatMulNBits dequantizes its weights and so computes at FP32 speed or slower; DynamicQuantizeMatMul
quantizes the activations per call (uint8, one scale per tensor) and runs ONNX Runtime's integer
GEMM, about twice the FP32 GEMM's speed on an AVX2 CPU (`qwen3vl bench --profile`).

Layout: weight int8 (K, N), scale float32 (N,) per output column, symmetric (no zero point),
w = q * scale.

Codes are limited to [-63, 63] (7 bits), not [-127, 127]. CPUs without VNNI (AVX2, e.g. every
Pascal-era laptop) multiply uint8 x int8 pairs with `vpmaddubsw`, whose int16 pair sums saturate
above 32767: 255 * 127 * 2 overflows, 255 * 63 * 2 = 32130 does not. Full-range weights gave
wrong results on this machine's AVX2 CPU; tests/test_pass_quantize_dynamic.py checks the extreme case.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
from onnx import helper

from .external_data import append_tensor
from .onnx_helpers import MS_DOMAIN, unique_name
from .quantize_weights import QuantizeWeights, WeightFormat, _Stored, _Use

WEIGHT_LEVELS = 63  # largest code magnitude; see the module docstring
_CHUNK_BYTES = 64 << 20


def quantize_columns(weight: np.ndarray, rows: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A (K, N) weight (or (N, K) with rows=True) -> int8 codes (K, N) and float32 scales (N,), round
    to nearest: every element within scale / 2 of its value."""
    w = np.asarray(weight)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {w.shape}")
    k = w.shape[1] if rows else w.shape[0]
    n = w.shape[0] if rows else w.shape[1]
    step = max(1, _CHUNK_BYTES // (4 * n))
    peak = np.zeros(n, dtype=np.float32)
    for start in range(0, k, step):
        part = w[:, start:start + step] if rows else w[start:start + step]
        peak = np.maximum(peak, np.abs(part).max(axis=1 if rows else 0).astype(np.float32))
    scales = (peak / WEIGHT_LEVELS).astype(np.float32)
    divisor = np.where(scales == 0, 1, scales)  # an all-zero column: any scale is exact
    codes = np.empty((k, n), dtype=np.int8)
    for start in range(0, k, step):
        part = (w[:, start:start + step].T if rows else w[start:start + step]).astype(np.float32)
        codes[start:start + step] = np.clip(np.rint(part / divisor), -WEIGHT_LEVELS, WEIGHT_LEVELS)
    return codes, scales


def dynamic_int8_weights(keep_float: Iterable[str] = ()) -> "DynamicInt8Weights":
    """The pass: MatMul(x, W (K, N)) and Gemm(x, W, bias[, transB]) over float weight initializers
    -> DynamicQuantizeMatMul(x, W.int8, W.scales[, bias]). Gathers (embedding tables) are left alone,
    and so are the weights `keep_float` names (weight names or prefixes, e.g. "visual.blocks.3")."""
    return DynamicInt8Weights(keep_float)


class DynamicInt8Weights(QuantizeWeights):
    """QuantizeWeights' search, streaming and rewriting, with DynamicQuantizeMatMul's format. Tables
    read by a Gather stay float (include_embedding=False), with any MatMul tied to them."""

    def __init__(self, keep_float: Iterable[str] = ()):
        super().__init__(WeightFormat(8, 64, True), accuracy_level=0, include_embedding=False, overrides={},
                         keep_float=keep_float)
        self.name = "dynamic_int8_weights:per_column:7bit" + (":keep_float" if self.keep_float else "")

    def _store(self, source: np.ndarray, name: str, layout: str, out, location: str, taken: set[str]):
        if source.dtype != np.float32:
            raise ValueError(f"{name}: DynamicQuantizeMatMul needs float32 activations, the weight is {source.dtype}")
        codes, scales = quantize_columns(source, rows=layout == "nk")
        stored = _Stored(k=codes.shape[0], n=codes.shape[1], bits=8, block_size=codes.shape[0],
                         nbytes=codes.nbytes + scales.nbytes)  # one 7-bit scale per column: a block of K
        stored.quant = append_tensor(out, codes, unique_name(f"{name}.int8", taken), location)
        stored.scales = append_tensor(out, scales, unique_name(f"{name}.scales", taken), location)
        return stored

    def _rewrite(self, use: _Use, stored: _Stored, taken: set[str], added: list[onnx.TensorProto]):
        node = use.node
        inputs = [node.input[0], stored.need(stored.quant, added), stored.need(stored.scales, added)]
        if use.bias and not use.drop_bias:
            inputs += ["", use.bias]  # the empty slot is the weight's zero point (symmetric: none)
        return [helper.make_node("DynamicQuantizeMatMul", inputs, list(node.output), name=node.name,
                                 domain=MS_DOMAIN)]
