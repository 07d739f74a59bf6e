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

    def forward(self, pixel_values, pos_indices, pos_weights, rotary_cos, rotary_sin, segment_ids):
        return self.visual(pixel_values, pos_indices, pos_weights, rotary_cos, rotary_sin, segment_ids)


def export_vision(model: Qwen3VL, path: Path, dtype: torch.dtype) -> dict[str, str]:
    """Traces the vision encoder (stand-in weights) to `path`; returns graph input -> parameter name."""
    v = model.config.vision
    step = VisionStep(model).eval()
    patches = 2 * v.spatial_merge_size**2 * 2  # two images of 2x2 merged blocks; N > 1 and not special
    args = (
        torch.zeros(patches, v.patch_dim, dtype=dtype),
        torch.zeros(patches, 4, dtype=torch.int64),
        torch.full((patches, 4), 0.25, dtype=dtype),
        torch.ones(patches, v.head_dim, dtype=torch.float32),
        torch.zeros(patches, v.head_dim, dtype=torch.float32),
        torch.arange(patches, dtype=torch.int64) // (patches // 2),
    )
    dynamic_axes = {name: {0: "patches"} for name in VISION_INPUTS}
    dynamic_axes.update({"image_embeds": {0: "tokens"}, "deepstack_embeds": {1: "tokens"}})
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            step, args, str(path), dynamo=False, export_params=False, do_constant_folding=False,
            opset_version=OPSET, input_names=list(VISION_INPUTS), output_names=list(VISION_OUTPUTS),
            dynamic_axes=dynamic_axes,
        )
    return {name: name for name, _ in step.named_parameters()}
