"""External data: the files beside a graph that hold its weights.

Tensors are appended at page-aligned offsets (so the files can be memory-mapped), read back
memory-mapped, and after a pass replaced weights, compacted into one file that holds only what the
graph still refers to. Everything streams one tensor at a time: a 2 B model's weights never sit in
memory whole.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import set_external_data

ALIGNMENT = 4096  # bytes; tensor offsets are multiples of it


def append_array(out: BinaryIO, array: np.ndarray) -> int:
    """Writes `array`'s bytes at the next aligned offset of the open file `out`; returns the offset."""
    offset = _align(out)
    out.write(np.ascontiguousarray(array).data)
    return offset


def external_tensor(name: str, dims, data_type: int, location: str, offset: int, length: int) -> TensorProto:
    """A tensor whose `length` bytes are at `offset` of the file `location` (beside the graph)."""
    tensor = TensorProto(name=name, data_type=data_type, dims=list(dims), data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def append_tensor(out: BinaryIO, array: np.ndarray, name: str, location: str) -> TensorProto:
    """append_array, and the tensor `name` that refers to what it wrote (`out` is the file `location`)."""
    return external_tensor(name, array.shape, helper.np_dtype_to_tensor_dtype(array.dtype), location,
                           append_array(out, array), array.nbytes)


def append_external_data(tensor: TensorProto, folder: Path, file_name: str) -> None:
    """Moves `tensor`'s raw data to the end of `folder/file_name` (created if missing) and points the
    tensor there, so the graph file stays small."""
    with open(Path(folder) / file_name, "ab") as data:
        offset = append_array(data, np.frombuffer(tensor.raw_data, dtype=np.uint8))
    set_external_data(tensor, file_name, offset, len(tensor.raw_data))
    tensor.ClearField("raw_data")


def read_tensor(tensor: TensorProto, folder: Path) -> np.ndarray:
    """A tensor's values: memory-mapped when external (nothing is read until used)."""
    if not _is_external(tensor):
        return numpy_helper.to_array(tensor)
    entries = _entries(tensor)
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    return np.memmap(folder / entries["location"], dtype=dtype, mode="r", offset=int(entries.get("offset", 0)),
                     shape=tuple(tensor.dims))


def external_data_files(model: onnx.ModelProto) -> set[str]:
    """The external data file names the model's tensors refer to."""
    return {_entries(t)["location"] for t in _all_tensors(model.graph) if _is_external(t)}


def new_data_file(model: onnx.ModelProto, folder: Path, near: TensorProto, tag: str) -> str:
    """A name for a new data file beside `near`'s: `decoder.onnx.data` -> `decoder.onnx.<tag>.data`,
    numbered if that name is taken, so that a file another model in the folder refers to is never
    overwritten."""
    base = _entries(near)["location"] if _is_external(near) else "weights.data"
    stem = base[: -len(".data")] if base.endswith(".data") else base
    referenced = external_data_files(model)
    name, index = f"{stem}.{tag}.data", 1
    while name in referenced or (folder / name).exists():
        name, index = f"{stem}.{tag}.{index}.data", index + 1
    return name


def compact_external_data(model: onnx.ModelProto, folder: Path, data_name: str | None = None,
                          stale: Iterable[str] = ()) -> Path:
    """Rewrites every external tensor the model still refers to into one fresh file `data_name`
    (default: the shortest referenced name, i.e. the exporter's file that passes derive theirs from)
    and deletes the files it referred to before, plus `stale` (names of files the model stopped
    referring to earlier, e.g. external_data_files() taken before the passes). Bytes that several
    tensors share are written once. Streams one tensor at a time. Save the model right after: the
    file on disk refers to the old layout until then.
    """
    folder = Path(folder)
    tensors = [t for t in _all_tensors(model.graph) if _is_external(t)]
    before = {_entries(t)["location"] for t in tensors}
    if data_name is None:
        if not before:
            raise ValueError("the model has no external data to compact")
        data_name = min(before, key=lambda name: (len(name), name))
    temporary = folder / f".{data_name}.compacting"
    written: dict[tuple[str, int, int], int] = {}
    try:
        with open(temporary, "wb") as out:
            for tensor in tensors:
                entries = _entries(tensor)
                key = (entries["location"], int(entries.get("offset", 0)), int(entries["length"]))
                if key not in written:
                    written[key] = _copy_range(folder / key[0], key[1], key[2], out)
                del tensor.external_data[:]
                for name, value in (("location", data_name), ("offset", str(written[key])), ("length", str(key[2]))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = name, value
        os.replace(temporary, folder / data_name)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    for name in (before | set(stale)) - {data_name}:
        (folder / name).unlink(missing_ok=True)
    return folder / data_name


def _align(out: BinaryIO) -> int:
    """Pads `out` with zeros to the next aligned offset and returns it."""
    out.write(b"\0" * ((-out.tell()) % ALIGNMENT))
    return out.tell()


def _copy_range(path: Path, offset: int, length: int, out: BinaryIO, chunk: int = 16 << 20) -> int:
    start = _align(out)
    with open(path, "rb") as f:
        f.seek(offset)
        left = length
        while left:
            block = f.read(min(chunk, left))
            if not block:
                raise ValueError(f"{path}: ends before offset {offset} + length {length}")
            out.write(block)
            left -= len(block)
    return start


def _entries(tensor: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def _is_external(tensor: TensorProto) -> bool:
    return tensor.data_location == TensorProto.EXTERNAL


def _all_tensors(graph: onnx.GraphProto) -> Iterator[TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                yield a.t
            yield from a.tensors
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                yield from _all_tensors(sub)
