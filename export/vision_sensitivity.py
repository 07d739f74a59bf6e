"""How much each vision block's INT8 compute alone moves the model's output, for `qwen3vl build
--keep-sensitive-vision N` (the N most sensitive blocks keep FP32 compute).

On the checkpoint in PyTorch, fp32, over one built-in request (a deterministic synthetic picture and
a short question, prepared as the runtime prepares requests): one full-precision pass gives the
reference next-token distributions at the image tokens and the text after them (one prefill that
returns the logits of all those positions); then, for each block, only that block's four linears
compute as the build's vision graph would (`DynamicQuantizeLinear` below: ONNX Runtime's
DynamicQuantizeMatMul, or the TensorRT path's weight-only INT8) and the whole model re-runs. The
sensitivity is the mean over those positions of KL(P_fp32 || P_that_block_int8) in nats.

Only the transformer blocks are ranked: the patch embedding and the mergers stay INT8 in every
build (they are ~5% of the encoder's weights).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from graph_passes.quantize_dynamic_int8 import quantize_columns
from graph_passes.quantize_weights import WeightFormat, round_trip

# The linears of one vision block, as the graph names their weights (visual.blocks.N.<this>.weight).
BLOCK_LINEARS = ("attn.qkv", "attn.proj", "mlp.linear_fc1", "mlp.linear_fc2")
CALIBRATION_IMAGE_SIZE = (224, 224)  # bench.inputs.synthetic_image; the image processor may resize it
CALIBRATION_QUESTION = ("Describe this picture: which colours fade into which, how many discs there are "
                        "and how they are arranged.")
UINT8_LEVELS = 255


def block_prefix(index: int) -> str:
    return f"visual.blocks.{index}"


def calibration_description() -> str:
    width, height = CALIBRATION_IMAGE_SIZE
    return f"synthetic_image({width}x{height}) + {CALIBRATION_QUESTION!r}, chat template, image and text positions"


def fake_quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """x as DynamicQuantizeMatMul sees it: quantized per tensor to uint8, asymmetric, over the range
    [min(x, 0), max(x, 0)] (0 exact), scale = range / 255, zero point rounded half to even; then
    dequantized: (q - zero_point) * scale."""
    low, high = torch.clamp(x.min(), max=0), torch.clamp(x.max(), min=0)
    scale = (high - low) / UINT8_LEVELS if high > low else torch.tensor(1.0)
    zero_point = torch.round(torch.clamp(-low / scale, 0, UINT8_LEVELS))  # torch.round: half to even
    codes = torch.clamp(torch.round(x / scale) + zero_point, 0, UINT8_LEVELS)
    return (codes - zero_point) * scale


def int8_column_weight(weight: np.ndarray) -> np.ndarray:
    """An (out, in) weight as the DynamicQuantizeMatMul pass stores it (7-bit codes, one scale per
    output column), dequantized back to (out, in)."""
    codes, scales = quantize_columns(weight, rows=True)  # codes (in, out)
    return np.ascontiguousarray((codes.astype(np.float32) * scales).T)


class DynamicQuantizeLinear(nn.Module):
    """An nn.Linear computed as the build's INT8 vision graph computes it. Default: ONNX Runtime's
    DynamicQuantizeMatMul (weights per output column, activations per tensor per call; the integer
    GEMM's int32 sums are exact, so dequantize-then-multiply in fp32 differs only by fp32 rounding).
    With `weight_only`: the TensorRT path's weight-only INT8 blocks, float activations."""

    def __init__(self, linear: nn.Linear, weight_only: WeightFormat | None = None):
        super().__init__()
        weight = linear.weight.detach().float().numpy()
        stored = int8_column_weight(weight) if weight_only is None else round_trip(weight, weight_only)
        self.weight = torch.from_numpy(stored)
        self.bias = linear.bias
        self.quantize_activations = weight_only is None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(fake_quantize_activations(x) if self.quantize_activations else x, self.weight, self.bias)


@torch.no_grad()
def vision_block_sensitivities(checkpoint_dir: str | Path, weight_only: WeightFormat | None = None,
                               progress: Callable[[str], None] = lambda message: None) -> dict[str, float]:
    """Block prefix ("visual.blocks.N") -> mean KL (nats) of the next-token distributions at the
    calibration request's image and text positions when that block alone computes in INT8."""
    from bench.fidelity import window_start
    from bench.inputs import synthetic_image
    from model_src.torch_backend import checkpoint_pipeline

    pipe = checkpoint_pipeline(checkpoint_dir, threads=None)
    try:
        backend, image_token = pipe.backend, pipe.manifest.model.image_token_id
        batch = pipe.prepare([CALIBRATION_QUESTION], [[synthetic_image(*CALIBRATION_IMAGE_SIZE)]])
        ids = batch.row(0)
        positions = np.arange(window_start(ids, image_token), len(ids))[None]  # the image's tokens and after
        cache = backend.new_cache(1, len(ids))

        def log_probs() -> torch.Tensor:
            features = backend.encode_images(batch.vision)
            logits = backend.logits(cache, batch.chunk(features, backend.decoder_dtype, 0, len(ids)), positions)
            return torch.log_softmax(torch.from_numpy(logits[0]).double(), dim=-1)

        start = time.perf_counter()
        reference = log_probs()
        reference_p = reference.exp()
        blocks = backend.model.visual.blocks
        progress(f"vision sensitivity: {positions.shape[1]} positions ({int((ids == image_token).sum())} image "
                 f"tokens), reference in {time.perf_counter() - start:.0f} s")
        found: dict[str, float] = {}
        for index, block in enumerate(blocks):
            originals = {name: block.get_submodule(name) for name in BLOCK_LINEARS}
            try:
                for name, linear in originals.items():
                    block.set_submodule(name, DynamicQuantizeLinear(linear, weight_only))
                found[block_prefix(index)] = float((reference_p * (reference - log_probs())).sum(-1).mean())
            finally:
                for name, linear in originals.items():
                    block.set_submodule(name, linear)
            progress(f"vision sensitivity: block {index} done ({index + 1}/{len(blocks)} blocks, "
                     f"{time.perf_counter() - start:.0f} s); KL {found[block_prefix(index)]:.2e}")
        return found
    finally:
        pipe.close()
