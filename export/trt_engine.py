"""The build side of TensorRT plans: the graphs' input list at export time, plans at build time.

`qwen3vl build --backend trt` writes `trt_io.json` beside the TensorRT-target graphs (their inputs,
outputs, symbolic dims, weight files and plugin op types, read with onnx without the weights), so
that plans can be compiled later where no onnx package is installed: by `qwen3vl build --engine E
--compile-only` on the target machine, or by the runtime on first use. Then, where TensorRT and a
GPU are present, it compiles the plans (`runtime.trt_plans`); elsewhere it says in one line that
they will be compiled on the target machine.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from runtime.engine_manifest import load_manifest
from runtime.errors import Qwen3VLError
from runtime.trt_plans import (GRAPH_FILES, PLAN_DIR, ROLES, TRT_IO, GraphIO, GraphTensor, PlanSettings, TrtUnavailable,
                               ensure_plan, open_tensorrt, read_trt_io, write_trt_io)


def _tensor(value) -> GraphTensor:
    import onnx

    kind = value.type.tensor_type
    dims = tuple(d.dim_param if d.dim_param else int(d.dim_value) if d.HasField("dim_value") else "?"
                 for d in kind.shape.dim)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(kind.elem_type)
    return GraphTensor(value.name, str(dtype), dims)


def graph_io(path: str | Path, role: str) -> GraphIO:
    """A TensorRT-target graph's inputs, outputs, weight files and plugin op types (weights not read)."""
    import onnx  # the build side's: compiling plans from trt_io.json needs no onnx

    from graph_passes.onnx_helpers import PLUGIN_DOMAIN

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    data_files = sorted({entry.value for tensor in graph.initializer for entry in tensor.external_data
                         if entry.key == "location"})
    plugins = sorted({node.op_type for node in graph.node if node.domain == PLUGIN_DOMAIN})
    initializers = {t.name for t in graph.initializer}
    return GraphIO(role, path.name, tuple(data_files), tuple(plugins),
                   tuple(_tensor(v) for v in graph.input if v.name not in initializers),
                   tuple(_tensor(v) for v in graph.output))


def write_graph_io(folder: str | Path, files: dict[str, str]) -> str:
    """Writes trt_io.json for the TensorRT graphs named in `files` (manifest roles); returns its name."""
    folder = Path(folder)
    write_trt_io(folder / TRT_IO, [graph_io(folder / files[GRAPH_FILES[role]], role) for role in ROLES])
    return TRT_IO


def compile_plans(engine_dir: str | Path, progress: Callable[[str], None], plugins: str | Path | None = None,
                  settings: PlanSettings | None = None, required: bool = False, force: bool = False) -> bool:
    """Compiles (or finds up to date) every TensorRT plan of an engine folder built with --backend trt.

    Without TensorRT, a GPU or the plugin library: with `required` (--compile-only) an error, else one
    line saying the plans will be compiled on the target machine. Returns whether plans are ready."""
    folder = Path(engine_dir)
    manifest = load_manifest(folder)
    if not all(key in manifest.files for key in GRAPH_FILES.values()):
        raise Qwen3VLError(f"{folder}: has no TensorRT graphs (build it with --backend trt)")
    if "trt_io" in manifest.files:
        ios = read_trt_io(folder, manifest)
    else:  # an engine from before trt_io.json: read the graphs here (the build side has onnx)
        ios = {role: graph_io(folder / manifest.files[GRAPH_FILES[role]], role) for role in ROLES}
    try:
        env = open_tensorrt(plugins, tuple(sorted({p for io in ios.values() for p in io.plugins})))
    except TrtUnavailable as exc:
        if required:
            raise Qwen3VLError(f"cannot compile TensorRT plans here: {exc}") from None
        progress(f"TensorRT plans will be compiled on the target machine (`qwen3vl build --engine {folder} "
                 f"--compile-only`, or on first run): {exc}")
        return False
    for role in ROLES:
        ensure_plan(folder, manifest, env, ios[role], settings or PlanSettings(), True, progress, force)
    progress(f"TensorRT {env.version} plans for {env.gpu.name} (SM {env.gpu.sm}) ready in {folder / PLAN_DIR}")
    return True
