"""What a graph pass is, `run_passes`, which applies passes to one graph file, and the plans: which
passes each engine graph gets for a precision and backend (`qwen3vl build` follows them).

A pass is a callable with a `name`: `pass_(model, folder) -> bool`. `model` is the ModelProto loaded
*without* external data, so large initializers stay as references into files in `folder` (the
graph's own folder); the pass rewrites `model` in place and returns whether it changed anything.
Every pass is idempotent (a second run changes nothing and returns False) and returns False when
its pattern is absent. A pass that creates large tensors writes them into a new external data file
in `folder` (graph_passes/external_data.py), never into the graph file or into a file it did not create.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Protocol

import onnx

from runtime.engine_manifest import MANIFEST, sha256_file, update_manifest
from runtime.errors import Qwen3VLError

from .external_data import compact_external_data, external_data_files
from .fuse_rmsnorm import fuse_rmsnorm
from .quantize_dynamic_int8 import dynamic_int8_weights
from .quantize_weights import WeightFormat, quantize_weights
from .trt_attention import trt_attention
from .trt_kv_cache import PLUGIN_KV_TYPES, trt_kv_cache
from .trt_rmsnorm import trt_rmsnorm
from .trt_vision_attention import trt_vision_attention
from .trt_weight_gemm import trt_weight_gemm


class GraphPass(Protocol):
    name: str

    def __call__(self, model: onnx.ModelProto, folder: Path) -> bool: ...


# -- the plans -------------------------------------------------------------------------------------

# The TensorRT target: a copy of each ONNX Runtime graph with its fused nodes turned into plugin
# nodes, sharing its weight file.
TRT_PASSES = (trt_attention, trt_rmsnorm, trt_weight_gemm, trt_vision_attention)
# KV cache storage types the TensorRT graphs can be built with (the attention plugin's).
TRT_KV_DTYPES = tuple(PLUGIN_KV_TYPES)


def trt_passes(kv_dtype: str | None = None) -> list[GraphPass]:
    """The TensorRT target's passes; with `kv_dtype` (fp32/fp16) the KV cache is stored in that type
    whatever the graph's activations (trt_kv_cache runs after trt_attention made the plugin nodes)."""
    return [*TRT_PASSES, *([trt_kv_cache(kv_dtype)] if kv_dtype is not None else [])]


def ort_passes(part: str, precision: str, block_size: int, symmetric: bool, accuracy_level: int,
               vision_precision: str = "fp32", backend: str = "ort", scale_search: str = "none",
               overrides: dict[str, tuple[WeightFormat, str]] | None = None,
               vision_keep_float: Iterable[str] = ()) -> list[GraphPass]:
    """The ONNX Runtime target's passes for one graph (the decoder's attention is fused at export).
    The decoder's weights get (bits of the precision, block_size, symmetric, scale_search) except
    those `overrides` names (weight name -> (WeightFormat, reason): the head, sensitive layers).
    An int8 vision graph keeps float the weights `vision_keep_float` names (names or prefixes: the
    sensitive blocks of --keep-sensitive-vision)."""
    if part == "vision":
        if vision_precision != "int8":
            return []
        if backend == "trt":
            # The TensorRT graph is derived from this one and shares its weights: weight-only INT8 in
            # the layout the weight-only GEMM plugin reads.
            return [quantize_weights(bits=8, block_size=block_size, symmetric=symmetric,
                                     accuracy_level=accuracy_level, include_embedding=False,
                                     keep_float=vision_keep_float)]
        # Compute-bound: INT8 weights *and* INT8 compute (ONNX Runtime's integer GEMM), ~2x its FP32
        # GEMM on AVX2, where weight-only INT8 (MatMulNBits) was slower than FP32.
        return [dynamic_int8_weights(vision_keep_float)]
    passes = [fuse_rmsnorm]
    if precision in ("int8", "int4"):
        # Decoder linears and the tied embedding at the chosen width.
        passes.append(quantize_weights(bits=4 if precision == "int4" else 8, block_size=block_size,
                                       symmetric=symmetric, accuracy_level=accuracy_level, include_embedding=True,
                                       scale_search=scale_search, overrides=overrides))
    return passes


# -- the runner ------------------------------------------------------------------------------------

def run_passes(model_path: str | Path, passes: Sequence[GraphPass], out_path: str | Path | None = None,
               on_pass: Callable[[str, float], None] | None = None) -> list[str]:
    """Applies `passes` in order to the graph at `model_path` and returns the names of those that
    changed something (`on_pass(name, seconds)` hears of each as it finishes).

    Without `out_path` the graph is saved back in place, only if a pass changed it; when a pass wrote
    a new weight file, the graph's weights are first compacted back into the one file it used
    before. With `out_path` the result is always saved there, beside the source, and must share the
    source's weight files: a pass that writes weights of its own is an error.
    """
    path = Path(model_path)
    out = path if out_path is None else Path(out_path)
    model = onnx.load(str(path), load_external_data=False)
    data_files = external_data_files(model)
    changed = []
    for graph_pass in passes:
        start = time.perf_counter()
        if graph_pass(model, path.parent):
            changed.append(graph_pass.name)
            if on_pass is not None:
                on_pass(graph_pass.name, time.perf_counter() - start)
    if out != path:
        if external_data_files(model) - data_files:
            raise Qwen3VLError(f"{out.name}: a pass wrote weights of its own; the graph must share {path.name}'s")
        save_atomically(model, out)
    elif changed:
        if external_data_files(model) != data_files:
            # Quantization wrote a new file and left the replaced float weights in the old one.
            data_name = next(iter(data_files)) if len(data_files) == 1 else None
            compact_external_data(model, path.parent, data_name=data_name)
        save_atomically(model, path)
    return changed


def save_atomically(model: onnx.ModelProto, path: Path) -> None:
    """Writes `model` next to `path` and renames it over `path`: a reader never sees half a graph.
    The temporary file sits in the same folder so relative external-data locations stay valid."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        onnx.save(model, tmp)
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)  # mkstemp made it private
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def update_engine_manifest(engine_dir: str | Path, applied_passes: Iterable[str] = ()) -> None:
    """After passes rewrote files of an engine folder: records every file's current size and hash
    (dropping files that are gone) and appends `applied_passes` to the manifest's graph_passes."""
    folder = Path(engine_dir)
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST
                   and not p.name.startswith("."))

    def record(manifest: dict) -> None:
        manifest["sizes"] = {name: (folder / name).stat().st_size for name in names}
        manifest["hashes"] = {name: sha256_file(folder / name) for name in names}
        manifest["graph_passes"] = [*manifest.get("graph_passes", []), *applied_passes]

    update_manifest(folder, record)
