"""What every graph pass is, and `run_passes`, which applies passes to one engine graph in place.

A pass is a callable with a `name`: `pass_(model, folder) -> bool`. `model` is the ModelProto loaded
*without* external data, so large initializers stay as references into files in `folder` (the
graph's own folder); the pass rewrites `model` in place and returns whether it changed anything.
Every pass is idempotent (a second run changes nothing and returns False) and returns False when
its pattern is absent. A pass that creates large tensors writes them into a new external data file
in `folder` (`append_external_data`), never into the graph file or into a file it did not create.

Passes built on onnx-graphsurgeon use `import_graph` / `export_graph`: graphsurgeon keeps an
external initializer as the original TensorProto (lazy values) and exports it unchanged, so the
weights are never read.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import onnx
import onnx_graphsurgeon as gs
from onnx.external_data_helper import set_external_data

# Offsets of appended tensors; page-aligned data can be memory-mapped.
EXTERNAL_DATA_ALIGNMENT = 4096


class GraphPass(Protocol):
    name: str

    def __call__(self, model: onnx.ModelProto, folder: Path) -> bool: ...


def run_passes(model_path: str | Path, passes: Sequence[GraphPass]) -> list[str]:
    """Applies `passes` in order to the graph at `model_path`, saves it back in place (only if one
    changed it) and returns the names of the passes that changed something."""
    path = Path(model_path)
    model = onnx.load(str(path), load_external_data=False)
    changed = []
    for graph_pass in passes:
        if graph_pass(model, path.parent):
            changed.append(graph_pass.name)
    if changed:
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


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    return gs.import_onnx(model)


def export_graph(graph: gs.Graph, model: onnx.ModelProto) -> None:
    """Writes `graph` back into `model` (cleaned up, topologically sorted). The model's own fields
    (IR version, producer, metadata) stay; opset imports are kept and gain any domain a new node uses."""
    graph.cleanup().toposort()
    exported = gs.export_onnx(graph)
    model.graph.CopyFrom(exported.graph)
    imported = {opset.domain for opset in model.opset_import}
    for opset in exported.opset_import:
        if opset.domain not in imported:
            model.opset_import.append(opset)
            imported.add(opset.domain)
    for domain in sorted({node.domain for node in model.graph.node} - imported - {"ai.onnx"}):
        model.opset_import.append(onnx.helper.make_opsetid(domain, 1))


def append_external_data(tensor: onnx.TensorProto, folder: Path, file_name: str) -> None:
    """Moves `tensor`'s raw data to the end of `folder/file_name` (created if missing) and points the
    tensor there, so the graph file stays small."""
    with open(Path(folder) / file_name, "ab") as data:
        end = data.tell()
        offset = -(-end // EXTERNAL_DATA_ALIGNMENT) * EXTERNAL_DATA_ALIGNMENT
        data.write(b"\0" * (offset - end))
        data.write(tensor.raw_data)
    set_external_data(tensor, file_name, offset, len(tensor.raw_data))
    tensor.ClearField("raw_data")
