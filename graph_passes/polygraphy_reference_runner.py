"""A Polygraphy runner that executes an ONNX graph on the CPU with `onnx.reference` and this
project's numpy references of the TensorRT plugins and ONNX Runtime contrib ops
(plugin_reference.REFERENCE_OPS).

It stands in for TensorRT where there is none: `qwen3vl compare` puts it beside Polygraphy's
`OnnxrtRunner` under `Comparator`, so the TensorRT-target graph (`*.trt.onnx`) is checked against the
ONNX Runtime graph with Polygraphy's own comparison, tolerances and reporting. Node by node in numpy:
meant for test-sized engines.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator
from polygraphy.backend.base import BaseRunner
from polygraphy.backend.onnx import util as onnx_util

from . import plugin_reference
from .plugin_reference import REFERENCE_OPS


def int8_activations(a: np.ndarray, block_size: int) -> np.ndarray:
    """A as the int8 paths see it: each block of `block_size` along the last axis scaled by its
    amax / 127 and rounded to the nearest integer (ties to even), then scaled back."""
    k = a.shape[-1]
    padded = -(-k // block_size) * block_size
    blocks = np.pad(a.astype(np.float32), [(0, 0)] * (a.ndim - 1) + [(0, padded - k)])
    blocks = blocks.reshape(*a.shape[:-1], padded // block_size, block_size)
    scale = np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(127)
    inverse = np.divide(np.float32(1), scale, out=np.zeros_like(scale), where=scale > 0)
    codes = np.rint(blocks * inverse)
    return (codes * scale).reshape(*a.shape[:-1], padded)[..., :k].astype(a.dtype)


class MatMulNBits(plugin_reference.MatMulNBits):
    """accuracy_level=4: ONNX Runtime's CPU kernel quantizes A to int8 per block first."""

    def _run(self, a, *inputs, accuracy_level=0, block_size=None, **attributes):
        if accuracy_level == 4:
            a = int8_activations(a, block_size)
        return super()._run(a, *inputs, accuracy_level=accuracy_level, block_size=block_size, **attributes)


class Qwen3VLWeightOnlyGemm(plugin_reference.Qwen3VLWeightOnlyGemm):
    """accuracy_level=4: the plugin's dp4a paths on SM 6.1 quantize A to int8 per block first, as
    ONNX Runtime does (trt_plugins/weight_only_gemm/README.md)."""

    def _run(self, a, *inputs, accuracy_level=0, block_size=None, **attributes):
        if accuracy_level == 4:
            a = int8_activations(a, block_size)
        return super()._run(a, *inputs, block_size=block_size, **attributes)


EXTRA_OPS = (MatMulNBits, Qwen3VLWeightOnlyGemm)


class PluginReferenceRunner(BaseRunner):
    """Runs `model` (an ONNX ModelProto with its weights loaded, or a callable returning one, as
    Polygraphy's loaders are) and returns every graph output, marked intermediates included."""

    def __init__(self, model: onnx.ModelProto | Callable[[], onnx.ModelProto], name: str | None = None):
        super().__init__(name=name, prefix="plugin-reference-runner")
        self._model = model

    def activate_impl(self):
        model = self._model() if callable(self._model) else self._model
        self.input_metadata = onnx_util.get_input_metadata(model.graph)
        self._types = {name: onnx.helper.tensor_dtype_to_np_dtype(t.type.tensor_type.elem_type)
                       for name, t in ((t.name, t) for t in model.graph.input)}
        self.output_names = [o.name for o in model.graph.output]
        ops = {op.__name__: op for op in (*REFERENCE_OPS, *EXTRA_OPS)}  # the later one of a name wins
        self.evaluator = ReferenceEvaluator(model, new_ops=list(ops.values()))

    def get_input_metadata_impl(self):
        return self.input_metadata

    def infer_impl(self, feed_dict):
        start = time.perf_counter()
        feeds = {name: np.ascontiguousarray(value, dtype=self._types[name]) for name, value in feed_dict.items()
                 if name in self._types}
        outputs = self.evaluator.run(self.output_names, feeds)
        self.inference_time = time.perf_counter() - start
        return OrderedDict(zip(self.output_names, outputs))

    def deactivate_impl(self):
        del self.evaluator
