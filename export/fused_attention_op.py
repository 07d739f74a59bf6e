"""Emits the decoder's attention core as one `com.microsoft.GroupQueryAttention` node.

`model_src.kv_cache_attention.KVCacheAttention` is written to GroupQueryAttention's contract (rotary
applied outside, one preallocated KV buffer per layer, right-padded rows). At export time each core
is swapped for `ExportedKVCacheAttention`, which computes the same thing in PyTorch while tracing
but is recorded in the graph as the single fused node, so no pattern matching is needed to find it.
ONNX Runtime's CPU provider runs that node and, with past and present bound to the same buffer,
writes the new keys in place.
"""

from __future__ import annotations

import torch

from model_src.kv_cache_attention import KVCacheAttention

MS_DOMAIN = "com.microsoft"


class _GroupQueryAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, core, q, k, v, past_key, past_value, seqlens_k, total_sequence_length):
        return KVCacheAttention.forward(core, q, k, v, past_key, past_value, seqlens_k, total_sequence_length)

    @staticmethod
    def symbolic(g, core, q, k, v, past_key, past_value, seqlens_k, total_sequence_length):
        out, present_key, present_value = g.op(
            f"{MS_DOMAIN}::GroupQueryAttention",
            q, k, v, past_key, past_value, seqlens_k, total_sequence_length,
            num_heads_i=core.num_heads,
            kv_num_heads_i=core.num_kv_heads,
            scale_f=core.head_dim**-0.5,
            do_rotary_i=0,
            outputs=3,
        )
        # Shapes for the rest of the trace: output like q, presents like the buffers.
        out.setType(q.type())
        present_key.setType(past_key.type())
        present_value.setType(past_value.type())
        return out, present_key, present_value


class ExportedKVCacheAttention(KVCacheAttention):
    def forward(self, q, k, v, past_key, past_value, seqlens_k, total_sequence_length):
        if not torch.onnx.is_in_onnx_export():
            return super().forward(q, k, v, past_key, past_value, seqlens_k, total_sequence_length)
        return _GroupQueryAttention.apply(self, q, k, v, past_key, past_value, seqlens_k, total_sequence_length)


def use_fused_attention(decoder: torch.nn.Module) -> None:
    """Swaps every KVCacheAttention in the decoder for the exportable, fused one."""
    for layer in decoder.layers:
        core = layer.self_attn.core
        layer.self_attn.core = ExportedKVCacheAttention(core.num_heads, core.num_kv_heads, core.head_dim)
