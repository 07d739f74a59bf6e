"""Qwen3-VL vision encoder, written for export.

Several images (or video frames) are packed into one sequence of patches. Everything that depends
on the image sizes -- which rows of the learned position table to blend, the 2-D rotary angles and
which patches belong to which image -- is computed on the host (`runtime.vision_positions`) and
passed in as tensors, so the traced graph has no data-dependent control flow: attention is one
masked attention over the packed sequence, kept block-diagonal by the segment ids.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # x: (N, hidden); cos/sin: (N, 1, head_dim); mask: (1, N, N) additive, 0 inside an image.
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)  # each (N, heads, head_dim)
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(x.dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(x.dtype)
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # (heads, N, head_dim)
        scores = torch.matmul(q, k.transpose(1, 2)) * self.head_dim**-0.5 + mask
        probs = torch.softmax(scores.float(), dim=-1).to(x.dtype)
        out = torch.matmul(probs, v).transpose(0, 1).reshape(n, -1)
        return self.proj(out)


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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, mask)
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
        segment_ids: torch.Tensor,  # (N,) int64: which image/frame each patch belongs to
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns visual tokens (N/4, out_hidden) and deepstack features (num_deepstack, N/4, out_hidden)."""
        dtype = self.patch_embed.proj.weight.dtype
        x = self.patch_embed(pixel_values.to(dtype))
        x = x + (self.pos_embed(pos_indices) * pos_weights.to(dtype)[:, :, None]).sum(1)

        cos = rotary_cos.float()[:, None, :]
        sin = rotary_sin.float()[:, None, :]
        same_image = segment_ids[:, None] == segment_ids[None, :]
        mask = torch.where(same_image, 0.0, torch.finfo(dtype).min).to(dtype)[None]

        deepstack = []
        for index, block in enumerate(self.blocks):
            x = block(x, cos, sin, mask)
            if index in self.config.deepstack_visual_indexes:
                merger = self.deepstack_merger_list[self.config.deepstack_visual_indexes.index(index)]
                deepstack.append(merger(x))
        merged = self.merger(x)
        if not deepstack:
            return merged, merged.new_zeros((0, *merged.shape))
        return merged, torch.stack(deepstack)
