"""Qwen3-VL vision encoder, written for export.

Several images (or video frames) are packed into one sequence of patches. Everything that depends
on the image sizes -- which rows of the learned position table to blend, the 2-D rotary angles and
which patches belong to which image -- is computed on the host (`runtime.vision_positions`) and
passed in as tensors, so the traced graph has no data-dependent control flow. Attention is
block-diagonal: each frame's patches are gathered into a padded per-frame batch, so nothing is
computed across images.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig


class FrameLayout(NamedTuple):
    """Block-diagonal attention layout (see runtime.vision_positions.frame_layout)."""

    index: torch.Tensor  # (F, L) packed row of each slot
    bias: torch.Tensor  # (F, 1, 1, L) additive: 0 for patches, -inf-like for padding slots
    slot: torch.Tensor  # (N,) flat slot of each packed patch


def rotate_half(x: torch.Tensor, half: int) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the last axis of size 2 * half. `half` is a Python int so the
    export's slices have constant bounds (x.chunk would compute them from the shape, per layer)."""
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: "FrameLayout") -> torch.Tensor:
        # x: (N, hidden); cos/sin: (N, 1, head_dim)
        n = cos.shape[0]  # cos is one tensor for all layers: the exported shape arithmetic is shared
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)  # each (N, heads, head_dim)
        half = self.head_dim // 2
        q = (q.float() * cos + rotate_half(q.float(), half) * sin).to(x.dtype)
        k = (k.float() * cos + rotate_half(k.float(), half) * sin).to(x.dtype)
        # Block-diagonal: each frame's patches form one row of a padded batch; nothing across frames.
        frames, longest = layout.index.shape
        flat = layout.index.reshape(-1)

        def per_frame(t: torch.Tensor) -> torch.Tensor:  # (N, heads, D) -> (F, heads, L, D)
            return t.index_select(0, flat).view(frames, longest, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = per_frame(q), per_frame(k), per_frame(v)
        scores = torch.matmul(q, k.transpose(2, 3)) * self.head_dim**-0.5 + layout.bias
        probs = torch.softmax(scores.float(), dim=-1).to(x.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(frames * longest, -1)
        return self.proj(out.index_select(0, layout.slot))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.linear_fc1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.linear_fc2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(F.gelu(self.linear_fc1(x), approximate="tanh"))


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.attn = VisionAttention(config)
        self.mlp = VisionMLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: "FrameLayout") -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, layout)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Groups each 2x2 block of patches into one visual token of the text model's width.

    The final merger normalises each patch before grouping; the deepstack mergers normalise the
    grouped vector (`norm_after_grouping`).
    """

    def __init__(self, config: VisionConfig, norm_after_grouping: bool):
        super().__init__()
        self.merged_dim = config.merged_dim
        self.norm_after_grouping = norm_after_grouping
        self.norm = nn.LayerNorm(config.merged_dim if norm_after_grouping else config.hidden_size, eps=1e-6)
        self.linear_fc1 = nn.Linear(config.merged_dim, config.merged_dim, bias=True)
        self.linear_fc2 = nn.Linear(config.merged_dim, config.out_hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_after_grouping:
            x = self.norm(x.reshape(-1, self.merged_dim))
        else:
            x = self.norm(x).reshape(-1, self.merged_dim)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


class PatchEmbed(nn.Module):
    """The checkpoint's Conv3d with kernel == stride is a matrix product on each flattened patch row."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.proj = nn.Linear(config.patch_dim, config.hidden_size, bias=True)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.proj(pixel_values)


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.pos_embed = nn.Embedding(config.num_position_embeddings, config.hidden_size)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.depth))
        self.merger = PatchMerger(config, norm_after_grouping=False)
        self.deepstack_merger_list = nn.ModuleList(
            PatchMerger(config, norm_after_grouping=True) for _ in config.deepstack_visual_indexes
        )

    def forward(
        self,
        pixel_values: torch.Tensor,  # (N, C*T*P*P), patches in merge-block order
        pos_indices: torch.Tensor,  # (N, 4) int64: bilinear taps into the learned position table
        pos_weights: torch.Tensor,  # (N, 4)
        rotary_cos: torch.Tensor,  # (N, head_dim)
        rotary_sin: torch.Tensor,  # (N, head_dim)
        frame_patch_index: torch.Tensor,  # (F, L) int64: packed row of each slot of each frame
        frame_patch_mask: torch.Tensor,  # (F, L) bool: slots that hold a patch
        patch_frame_slot: torch.Tensor,  # (N,) int64: flat slot of each packed patch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns visual tokens (N/4, out_hidden) and deepstack features (num_deepstack, N/4, out_hidden)."""
        dtype = self.patch_embed.proj.weight.dtype
        x = self.patch_embed(pixel_values.to(dtype))
        x = x + (self.pos_embed(pos_indices) * pos_weights.to(dtype)[:, :, None]).sum(1)

        cos = rotary_cos.float()[:, None, :]
        sin = rotary_sin.float()[:, None, :]
        bias = torch.where(frame_patch_mask, 0.0, torch.finfo(dtype).min).to(dtype)[:, None, None, :]
        layout = FrameLayout(frame_patch_index, bias, patch_frame_slot)

        deepstack = []
        for index, block in enumerate(self.blocks):
            x = block(x, cos, sin, layout)
            if index in self.config.deepstack_visual_indexes:
                merger = self.deepstack_merger_list[self.config.deepstack_visual_indexes.index(index)]
                deepstack.append(merger(x))
        merged = self.merger(x)
        if not deepstack:
            return merged, merged.new_zeros((0, *merged.shape))
        return merged, torch.stack(deepstack)
