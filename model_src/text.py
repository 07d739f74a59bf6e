"""Qwen3-VL text decoder, written for export.

The KV cache is explicit data: every layer takes a preallocated key/value buffer and returns it with
this step's keys written (`KVCacheAttention`, the contract of the fused attention node). Rotary cos/sin are derived inside the graph from 3-D (T, H, W) position ids with a
constant gather, not with slice assignment (which exports as ScatterND). Deepstack visual features
come in as one dense additive tensor (zero at text positions) added after the first layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import TextConfig
from .kv_cache_attention import KVCacheAttention
from .vision import rotate_half


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def mrope_axis_of_frequency(head_dim: int, mrope_section: tuple[int, int, int]) -> torch.Tensor:
    """Which position axis (0=T, 1=H, 2=W) drives each rotary frequency, interleaved layout.

    T everywhere, then H at 1, 4, 7, .. and W at 2, 5, 8, .. for section[1] and section[2] entries.
    """
    axis = torch.zeros(head_dim // 2, dtype=torch.int64)
    for dim, offset in ((1, 1), (2, 2)):
        axis[offset : mrope_section[dim] * 3 : 3] = dim
    return axis


class MRotaryEmbedding(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        dim = config.head_dim
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("axis", mrope_axis_of_frequency(dim, config.mrope_section), persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids: (3, B, S) -> per-frequency position (B, S, head_dim/2) -> cos/sin (B, S, head_dim)
        positions = position_ids.float().index_select(0, self.axis).permute(1, 2, 0)
        freqs = positions * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


class Attention(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.core = KVCacheAttention(self.num_heads, self.num_kv_heads, self.head_dim)

    def forward(self, x, cos, sin, past_key, past_value, seqlens_k, total_sequence_length):
        # x: (B, S, hidden); cos/sin: (B, S, head_dim); past_*: (B, kv_heads, M, head_dim)
        # (B, S) from cos, one tensor for all layers: in the exported graph every layer's reshapes then
        # read the same Shape/Gather nodes, which ONNX Runtime merges, instead of computing their own.
        b, s = cos.shape[:2]
        q = self.q_norm(self.q_proj(x).view(b, s, self.num_heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim))
        cos, sin = cos[:, :, None], sin[:, :, None]
        half = self.head_dim // 2
        q = (q * cos + rotate_half(q, half) * sin).reshape(b, s, -1)
        k = (k * cos + rotate_half(k, half) * sin).reshape(b, s, -1)
        out, key, value = self.core(q, k, self.v_proj(x), past_key, past_value, seqlens_k, total_sequence_length)
        return self.o_proj(out), key, value


class MLP(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, past_key, past_value, seqlens_k, total_sequence_length):
        attn, key, value = self.self_attn(self.input_layernorm(x), cos, sin, past_key, past_value, seqlens_k,
                                          total_sequence_length)
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, key, value


class TextDecoder(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = MRotaryEmbedding(config)

    def forward(
        self,
        inputs_embeds: torch.Tensor,  # (B, S, hidden), rows right-padded
        position_ids: torch.Tensor,  # (3, B, S) int64
        seqlens_k: torch.Tensor,  # (B,) int32: valid keys after this step - 1
        total_sequence_length: torch.Tensor,  # (1,) int32
        past_keys: list[torch.Tensor],  # per layer (B, kv_heads, M, head_dim) buffers
        past_values: list[torch.Tensor],
        deepstack_embeds: torch.Tensor,  # (num_deepstack, B, S, hidden), zero at text positions
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Returns the final-normed hidden states and the KV buffers with this step's keys written."""
        x = inputs_embeds
        cos, sin = self.rotary_emb(position_ids, x.dtype)
        present_keys, present_values = [], []
        for index, layer in enumerate(self.layers):
            x, key, value = layer(x, cos, sin, past_keys[index], past_values[index], seqlens_k, total_sequence_length)
            present_keys.append(key)
            present_values.append(value)
            if index < deepstack_embeds.shape[0]:
                x = x + deepstack_embeds[index].to(x.dtype)
        return self.norm(x), present_keys, present_values
