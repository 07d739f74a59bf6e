"""The text decoder as one ONNX graph that serves prefill and decode."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from model_src.model import Qwen3VL
from runtime.graph_io import DECODER_INPUTS, DECODER_OUTPUTS, past_names, present_names

from .fused_attention_op import use_fused_attention

OPSET = 17


class DecoderStep(nn.Module):
    """Embeds tokens (visual tokens arrive dense), runs the decoder, returns logits at one position
    per row. Attribute names match Qwen3VL's so graph inputs map straight onto checkpoint tensors."""

    def __init__(self, model: Qwen3VL):
        super().__init__()
        self.language_model = model.language_model
        self.lm_head = model.lm_head
        self.image_token_id = model.config.image_token_id

    def forward(self, input_ids, visual_embeds, deepstack_embeds, position_ids, seqlens_k, total_sequence_length,
                logits_index, past_keys, past_values):
        embeds = self.language_model.embed_tokens(input_ids)
        embeds = torch.where((input_ids == self.image_token_id)[..., None], visual_embeds.to(embeds.dtype), embeds)
        hidden, keys, values = self.language_model(embeds, position_ids, seqlens_k, total_sequence_length,
                                                    past_keys, past_values, deepstack_embeds)
        index = logits_index[:, None, None].expand(-1, 1, hidden.shape[-1])
        last = torch.gather(hidden, 1, index)[:, 0]
        weight = self.language_model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        # With a bias the exporter emits Gemm(transB=1): a tied embedding is then stored once, as is,
        # instead of also as a transposed copy.
        bias = torch.zeros(weight.shape[0], dtype=weight.dtype)
        return (F.linear(last, weight, bias).float(), *keys, *values)


def export_decoder(model: Qwen3VL, path: Path, dtype: torch.dtype) -> dict[str, str]:
    """Traces the decoder (stand-in weights) to `path`; returns graph input -> parameter name."""
    cfg = model.config.text
    layers = cfg.num_hidden_layers
    use_fused_attention(model.language_model)
    step = DecoderStep(model).eval()
    batch, seq, capacity = 2, 3, 8  # sizes > 1 so no axis is specialised
    buffer = (batch, cfg.num_key_value_heads, capacity, cfg.head_dim)
    args = (
        torch.full((batch, seq), 5, dtype=torch.int64),
        torch.zeros(batch, seq, cfg.hidden_size, dtype=dtype),
        torch.zeros(model.config.num_deepstack, batch, seq, cfg.hidden_size, dtype=dtype),
        torch.zeros(3, batch, seq, dtype=torch.int64),
        torch.full((batch,), seq - 1, dtype=torch.int32),
        torch.tensor([seq], dtype=torch.int32),
        torch.full((batch,), seq - 1, dtype=torch.int64),
        [torch.zeros(buffer, dtype=dtype) for _ in range(layers)],
        [torch.zeros(buffer, dtype=dtype) for _ in range(layers)],
    )
    kv_axes = {0: "batch", 2: "capacity"}
    dynamic_axes = {
        "input_ids": {0: "batch", 1: "sequence"},
        "visual_embeds": {0: "batch", 1: "sequence"},
        "deepstack_embeds": {1: "batch", 2: "sequence"},
        "position_ids": {1: "batch", 2: "sequence"},
        "seqlens_k": {0: "batch"},
        "logits_index": {0: "batch"},
        "logits": {0: "batch"},
        **{name: kv_axes for name in past_names(layers) + present_names(layers)},
    }
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            step, args, str(path), dynamo=False, export_params=False, do_constant_folding=False,
            opset_version=OPSET, input_names=[*DECODER_INPUTS, *past_names(layers)],
            output_names=[*DECODER_OUTPUTS, *present_names(layers)], dynamic_axes=dynamic_axes,
        )
    return {name: name for name, _ in step.named_parameters()}
