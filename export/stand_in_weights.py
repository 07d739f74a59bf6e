"""Tracing without the weights in memory, then attaching them from the checkpoint one at a time.

The graph is traced with stand-in parameters (zero-stride views: the right shape and dtype, no
storage) and exported with the parameters as named graph inputs. `attach_weights` then turns each of
those inputs into an initializer read from the safetensors checkpoint and appended to one external
data file, folding the exporter's weight transposes on the way. Peak memory is one tensor, so the
2 B model builds on a machine that could not hold two copies of it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch

from graph_passes.external_data import append_tensor
from model_src.checkpoint import checkpoint_name, iter_tensors, weight_files
from runtime.errors import CheckpointError


def use_stand_in_parameters(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Replaces every parameter by a storage-free stand-in of its shape and `dtype`."""
    for index, (name, param) in enumerate(list(module.named_parameters())):
        owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
        # A distinct value each: the exporter merges parameters that compare equal.
        stand_in = torch.full((), index + 1, dtype=dtype).expand(param.shape)
        setattr(owner, name.rsplit(".", 1)[-1], torch.nn.Parameter(stand_in, requires_grad=False))


def _numpy_dtype(dtype: torch.dtype):
    return {torch.float32: np.float32, torch.float16: np.float16}[dtype]


def attach_weights(
    model_proto: onnx.ModelProto,
    checkpoint_dir: str | Path,
    param_names: dict[str, str],
    dtype: torch.dtype,
    data_path: Path,
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> None:
    """Moves the weight inputs named in `param_names` (graph input -> our parameter name) into
    initializers stored in `data_path`, converted to `dtype`."""
    graph = model_proto.graph
    weight_inputs = {i.name for i in graph.input if i.name in param_names}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    files = weight_files(checkpoint_dir)
    by_checkpoint = {checkpoint_name(param_names[name]): name for name in weight_inputs}
    missing = [key for key in by_checkpoint if key not in files]
    if missing:
        raise CheckpointError(f"{checkpoint_dir}: missing tensor {missing[0]}")

    initializers, removed_nodes = [], set()
    np_dtype = _numpy_dtype(dtype)
    with open(data_path, "wb") as data:
        for count, (key, tensor) in enumerate(iter_tensors(files, list(by_checkpoint)), start=1):
            input_name = by_checkpoint[key]
            array = tensor.to(torch.float32).numpy()
            if param_names[input_name].endswith("patch_embed.proj.weight"):
                array = array.reshape(array.shape[0], -1)  # Conv3d -> Linear
            users = consumers.get(input_name, [])
            # A weight consumed only through 2-D transposes is stored transposed instead.
            if users and all(_is_plain_transpose(n) for n in users):
                array = np.ascontiguousarray(array.T)
                for node in users:
                    removed_nodes.add(id(node))
                    _rename_input(graph, node.output[0], input_name)
            initializers.append(append_tensor(data, array.astype(np_dtype), input_name, data_path.name))
            progress(count, len(by_checkpoint))
            del array, tensor

    kept = [n for n in graph.node if id(n) not in removed_nodes]
    del graph.node[:]
    graph.node.extend(kept)
    kept_inputs = [i for i in graph.input if i.name not in weight_inputs]
    del graph.input[:]
    graph.input.extend(kept_inputs)
    graph.initializer.extend(initializers)


def _is_plain_transpose(node: onnx.NodeProto) -> bool:
    if node.op_type != "Transpose":
        return False
    perm = [list(a.ints) for a in node.attribute if a.name == "perm"]
    return not perm or perm[0] == [1, 0]


def _rename_input(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
