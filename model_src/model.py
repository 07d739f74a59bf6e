"""Qwen3-VL: vision encoder + text decoder + lm_head, and the glue between them.

`VisionEncoder` and `TextDecoder` are the units that get exported. `Qwen3VL.forward` shows how one
prompt flows through them: visual tokens replace the image placeholders, deepstack features become
a dense tensor that is zero at text positions, and 3-D position ids come from the host.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from runtime.vision_positions import vision_inputs

from .config import ModelConfig, load_config
from .text import TextDecoder
from .vision import VisionEncoder


class Qwen3VL(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.visual = VisionEncoder(config.vision)
        self.language_model = TextDecoder(config.text)
        # A tied checkpoint stores no lm_head: the embedding is reused.
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(
            config.text.hidden_size, config.text.vocab_size, bias=False
        )

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path, dtype: torch.dtype = torch.float32) -> "Qwen3VL":
        from .checkpoint import load_weights

        config = load_config(checkpoint_dir)
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(load_weights(checkpoint_dir, model, dtype), assign=True, strict=True)
        # Non-persistent buffers (rotary tables) were created on the meta device: rebuild them.
        model.language_model.rotary_emb = type(model.language_model.rotary_emb)(config.text)
        return model.eval()

    def lm_head_weight(self) -> torch.Tensor:
        return self.language_model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def encode_images(self, pixel_values: torch.Tensor, image_grid_thw: np.ndarray):
        """Visual tokens (n, hidden) and deepstack features (k, n, hidden) for packed images."""
        v = self.config.vision
        host = vision_inputs(np.asarray(image_grid_thw), v.num_position_embeddings, v.spatial_merge_size, v.head_dim,
                             v.rope_theta)
        return self.visual(
            pixel_values,
            torch.from_numpy(host.pos_indices),
            torch.from_numpy(host.pos_weights),
            torch.from_numpy(host.rotary_cos),
            torch.from_numpy(host.rotary_sin),
            torch.from_numpy(host.frame_patch_index),
            torch.from_numpy(host.frame_patch_mask),
            torch.from_numpy(host.patch_frame_slot),
        )

    def embed(self, input_ids: torch.Tensor, image_embeds=None, deepstack=None):
        """Token embeddings with visual tokens in place, and the dense deepstack tensor."""
        embeds = self.language_model.embed_tokens(input_ids)
        b, s, h = embeds.shape
        dense = embeds.new_zeros((self.config.num_deepstack, b, s, h))
        if image_embeds is not None:
            is_image = (input_ids == self.config.image_token_id)[..., None]
            if int(is_image.sum()) != image_embeds.shape[0]:
                raise ValueError(
                    f"{int(is_image.sum())} image tokens in the prompt but {image_embeds.shape[0]} visual tokens"
                )
            embeds = embeds.masked_scatter(is_image, image_embeds.to(embeds.dtype))
            dense = torch.stack([d.masked_scatter(is_image, f.to(d.dtype)) for d, f in zip(dense, deepstack)])
        return embeds, dense

    def new_cache(self, batch: int, capacity: int, dtype: torch.dtype | None = None):
        """Zeroed key/value buffers, one pair per layer, for up to `capacity` tokens per row."""
        t = self.config.text
        dtype = dtype or self.lm_head_weight().dtype
        shape = (batch, t.num_key_value_heads, capacity, t.head_dim)
        return ([torch.zeros(shape, dtype=dtype) for _ in range(t.num_hidden_layers)],
                [torch.zeros(shape, dtype=dtype) for _ in range(t.num_hidden_layers)])

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, S), rows right-padded
        position_ids: torch.Tensor,  # (3, B, S)
        seqlens_k: torch.Tensor,  # (B,) int32: valid keys after this step - 1
        total_sequence_length: torch.Tensor,  # (1,) int32
        past_keys: list[torch.Tensor],
        past_values: list[torch.Tensor],
        image_embeds: torch.Tensor | None = None,
        deepstack: torch.Tensor | None = None,
    ):
        """Logits (B, S, vocab) and the KV buffers with this step's keys written."""
        embeds, dense = self.embed(input_ids, image_embeds, deepstack)
        hidden, keys, values = self.language_model(embeds, position_ids, seqlens_k, total_sequence_length,
                                                   past_keys, past_values, dense)
        return hidden @ self.lm_head_weight().T, keys, values
