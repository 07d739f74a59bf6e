"""The vision encoder as one ONNX graph over packed images (any sizes within the pixel budget)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from model_src.model import Qwen3VL
from runtime.graph_io import VISION_INPUTS, VISION_OUTPUTS

from .decoder_graph import OPSET


class VisionStep(nn.Module):
    """Attribute named like Qwen3VL's so graph inputs map straight onto checkpoint tensors."""

    def __init__(self, model: Qwen3VL):
        super().__init__()
        self.visual = model.visual

    def forward(self, pixel_values, pos_indices, pos_weights, rotary_cos, rotary_sin, frame_patch_index,
                frame_patch_mask, patch_frame_slot):
        return self.visual(pixel_values, pos_indices, pos_weights, rotary_cos, rotary_sin, frame_patch_index,
                           frame_patch_mask, patch_frame_slot)


def export_vision(model: Qwen3VL, path: Path, dtype: torch.dtype) -> dict[str, str]:
    """Traces the vision encoder (stand-in weights) to `path`; returns graph input -> parameter name."""
    v = model.config.vision
    step = VisionStep(model).eval()
    # Two frames of different lengths (8 and 4 patches) so no axis is specialised.
    lengths = (2 * v.spatial_merge_size**2, v.spatial_merge_size**2)
    patches, longest = sum(lengths), max(lengths)
    mask = torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]
    index = torch.where(mask, torch.arange(longest)[None, :] + torch.tensor([0, lengths[0]])[:, None], 0)
    slot = torch.cat([torch.arange(lengths[0]), longest + torch.arange(lengths[1])])
    args = (
        torch.zeros(patches, v.patch_dim, dtype=dtype),
        torch.zeros(patches, 4, dtype=torch.int64),
        torch.full((patches, 4), 0.25, dtype=dtype),
        torch.ones(patches, v.head_dim, dtype=torch.float32),
        torch.zeros(patches, v.head_dim, dtype=torch.float32),
        index,
        mask,
        slot,
    )
    dynamic_axes = {name: {0: "patches"} for name in VISION_INPUTS[:5] + ("patch_frame_slot",)}
    dynamic_axes.update({"frame_patch_index": {0: "frames", 1: "frame_length"},
                         "frame_patch_mask": {0: "frames", 1: "frame_length"},
                         "image_embeds": {0: "tokens"}, "deepstack_embeds": {1: "tokens"}})
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            step, args, str(path), dynamo=False, export_params=False, do_constant_folding=False,
            opset_version=OPSET, input_names=list(VISION_INPUTS), output_names=list(VISION_OUTPUTS),
            dynamic_axes=dynamic_axes,
        )
    return {name: name for name, _ in step.named_parameters()}
