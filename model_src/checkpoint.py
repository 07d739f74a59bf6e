"""Reading Hugging Face safetensors checkpoints (single file or sharded with an index).

Tensors are read one at a time from memory-mapped files and converted to the chosen dtype, so the
full model never exists twice in RAM. Every problem is reported as one line naming the tensor or
file at fault.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from runtime.errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
ACCEPTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# Our module tree mirrors the checkpoint's below these prefixes.
_PREFIXES = (("visual.", "model.visual."), ("language_model.", "model.language_model."), ("lm_head.", "lm_head."))
# The checkpoint keeps the patch embedding as a Conv3d; here it is the equivalent Linear.
_PATCH_EMBED = "visual.patch_embed.proj.weight"


def checkpoint_name(name: str) -> str:
    for ours, theirs in _PREFIXES:
        if name.startswith(ours):
            return theirs + name[len(ours):]
    raise KeyError(name)


def checkpoint_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor name -> shape, in the checkpoint's layout, for the given model's config."""
    shapes = {}
    for name, tensor in model.state_dict().items():
        shape = tuple(tensor.shape)
        if name == _PATCH_EMBED:
            v = model.config.vision
            shape = (v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
        shapes[checkpoint_name(name)] = shape
    return shapes


def weight_files(checkpoint_dir: str | Path) -> dict[str, Path]:
    """Checkpoint tensor name -> the safetensors file that holds it."""
    folder = Path(checkpoint_dir)
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from None
        for shard in sorted(set(weight_map.values())):
            if not (folder / shard).is_file():
                raise CheckpointError(f"{folder / shard}: shard listed in {INDEX_FILE} is missing")
        return {name: folder / shard for name, shard in weight_map.items()}
    single = folder / SINGLE_FILE
    if not single.is_file():
        raise CheckpointError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}")
    with open_safetensors(single) as f:
        return {name: single for name in f.keys()}


def open_safetensors(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: unreadable safetensors file ({reason})") from None


def iter_tensors(files: dict[str, Path], names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (name, tensor) file by file so each shard is opened once."""
    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    for path, file_names in by_file.items():
        with open_safetensors(path) as f:
            for name in file_names:
                try:
                    yield name, f.get_tensor(name)
                except (SafetensorError, OSError, ValueError) as exc:
                    raise CheckpointError(f"{path}: tensor {name} unreadable ({exc})") from None


def load_weights(checkpoint_dir: str | Path, model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A state dict for `model` (which may live on the meta device) read from the checkpoint."""
    if dtype not in ACCEPTED_DTYPES:
        raise CheckpointError(f"unsupported dtype {dtype} (expected bfloat16, float16 or float32)")
    expected = checkpoint_shapes(model)
    files = weight_files(checkpoint_dir)
    missing = [name for name in expected if name not in files]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"{checkpoint_dir}: missing tensor {missing[0]}{more}")
    tied_extra = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    unexpected = [name for name in files if name not in expected and name not in tied_extra]
    if unexpected:
        more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{checkpoint_dir}: unexpected tensor {unexpected[0]}{more} (another model?)")

    ours = {checkpoint_name(name): name for name in model.state_dict()}
    state = {}
    for name, tensor in iter_tensors(files, list(expected)):
        if tuple(tensor.shape) != expected[name]:
            raise CheckpointError(
                f"{files[name]}: tensor {name} has shape {tuple(tensor.shape)}, expected {expected[name]}"
            )
        if tensor.dtype not in ACCEPTED_DTYPES:
            raise CheckpointError(f"{files[name]}: tensor {name} has unsupported dtype {tensor.dtype}")
        tensor = tensor.to(dtype)
        if ours[name] == _PATCH_EMBED:
            tensor = tensor.reshape(tensor.shape[0], -1)
        state[ours[name]] = tensor
    return state
