"""Causal grouped-query attention over a preallocated KV buffer: the decoder's fusable core.

The contract is that of ONNX Runtime's `com.microsoft.GroupQueryAttention` without its built-in
rotary (M-RoPE needs three position axes, so q and k arrive already rotated):

- q (B, S, heads*D), k and v (B, S, kv_heads*D): the new tokens, right-padded per row.
- past_key / past_value (B, kv_heads, M, D): one buffer per generation, M = its capacity.
- seqlens_k (B,) int32: per row, the number of valid keys after this step, minus one.
- total_sequence_length (1,) int32: the longest row's valid keys after this step. When it equals S
  the call is the prompt: every row starts at position 0.
- outputs: attention (B, S, heads*D) and present_key / present_value, the buffers with the new keys
  written at positions seqlens_k + 1 - S .. seqlens_k (0 .. S-1 for the prompt).

Exported as one ONNX function per layer; the graph pass `fuse_attention` swaps each for the fused
node, which writes the buffer in place. This module is the reference those nodes are checked against.
"""

from __future__ import annotations

import torch
from torch import nn


class KVCacheAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        past_key: torch.Tensor,
        past_value: torch.Tensor,
        seqlens_k: torch.Tensor,
        total_sequence_length: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, s, _ = q.shape
        d, kv, group = self.head_dim, self.num_kv_heads, self.num_heads // self.num_kv_heads
        capacity = past_key.shape[2]
        q = q.view(b, s, kv, group, d).permute(0, 2, 3, 1, 4)  # (B, kv, group, S, D)
        k = k.view(b, s, kv, d).transpose(1, 2)  # (B, kv, S, D)
        v = v.view(b, s, kv, d).transpose(1, 2)

        # Where each row's new tokens go: after its valid keys, or from 0 for the prompt.
        valid = seqlens_k.to(torch.int64) + 1  # (B,)
        is_prompt = total_sequence_length.to(torch.int64).reshape(()) == s
        start = torch.where(is_prompt, torch.zeros_like(valid), valid - s)
        query_pos = start[:, None] + torch.arange(s, device=q.device)  # (B, S)
        index = query_pos.clamp(max=capacity - 1)[:, None, :, None].expand(b, kv, s, d)
        present_key = past_key.scatter(2, index, k)
        present_value = past_value.scatter(2, index, v)

        key_pos = torch.arange(capacity, device=q.device)
        allowed = (key_pos[None, None, :] <= query_pos[:, :, None]) & (key_pos[None, None, :] < valid[:, None, None])
        mask = torch.where(allowed, 0.0, torch.finfo(q.dtype).min).to(q.dtype)  # (B, S, M)

        scores = torch.matmul(q, present_key[:, :, None].transpose(3, 4)) * d**-0.5 + mask[:, None, None]
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        out = torch.matmul(probs, present_value[:, :, None])  # (B, kv, group, S, D)
        return out.permute(0, 3, 1, 2, 4).reshape(b, s, self.num_heads * d), present_key, present_value
