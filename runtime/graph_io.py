"""Names of the engine graphs' inputs and outputs: the contract between export and runtime.

Vision encoder (N = patches of all images, packed; n = N / merge**2 visual tokens):
  pixel_values (N, C*T*P*P) float, pos_indices (N, 4) int64, pos_weights (N, 4) float,
  rotary_cos / rotary_sin (N, head_dim) float, frame_patch_index (F, L) int64,
  frame_patch_mask (F, L) bool, patch_frame_slot (N,) int64 (the block-diagonal layout, F frames of
  at most L patches)
  -> image_embeds (n, hidden), deepstack_embeds (num_deepstack, n, hidden)

Text decoder, one graph for prefill and decode (rows right-padded; KV buffers (B, kv_heads, M, D)):
  input_ids (B, S) int64, visual_embeds (B, S, hidden) (zero at text positions),
  deepstack_embeds (num_deepstack, B, S, hidden), position_ids (3, B, S) int64,
  seqlens_k (B,) int32 (valid keys after the step - 1), total_sequence_length (1,) int32,
  logits_index (B,) int64 (which position of each row gets logits), past_key.i / past_value.i
  -> logits (B, vocab) float32, present_key.i / present_value.i (the same buffers, updated)
"""

VISION_INPUTS = ("pixel_values", "pos_indices", "pos_weights", "rotary_cos", "rotary_sin", "frame_patch_index",
                 "frame_patch_mask", "patch_frame_slot")
VISION_OUTPUTS = ("image_embeds", "deepstack_embeds")

DECODER_INPUTS = ("input_ids", "visual_embeds", "deepstack_embeds", "position_ids", "seqlens_k",
                  "total_sequence_length", "logits_index")
DECODER_OUTPUTS = ("logits",)


def past_names(num_layers: int) -> list[str]:
    return [f"past_key.{i}" for i in range(num_layers)] + [f"past_value.{i}" for i in range(num_layers)]


def present_names(num_layers: int) -> list[str]:
    return [f"present_key.{i}" for i in range(num_layers)] + [f"present_value.{i}" for i in range(num_layers)]
