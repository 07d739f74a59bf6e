/* Decoder attention kernels, C launch API (no TensorRT): the Qwen3VLAttention contract of
   trt_plugins/attention/README.md (q/k RMSNorm, M-RoPE rotary, KV-buffer write, grouped-query
   causal attention). */
#pragma once

#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

#include "../common/kernel_types.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Upper bound on the key chunks of one decode step (see qwen3vl_attention). */
#define QWEN3VL_ATTENTION_MAX_SPLITS 64

/* Bytes of workspace qwen3vl_attention needs for any seq_len at this batch and head shape: the
   decode step's per-chunk partial results, (batch * num_heads * MAX_SPLITS) x (head_dim + 2) floats. */
size_t qwen3vl_attention_workspace_size(int32_t batch, int32_t num_heads, int32_t head_dim);

/* Key chunks a decode step (seq_len 1) uses on the current device when decode_splits is 0: enough
   blocks to fill every SM, at most QWEN3VL_ATTENTION_MAX_SPLITS, no more than capacity / 64. */
int32_t qwen3vl_attention_decode_splits(int32_t batch, int32_t kv_num_heads, int32_t capacity);

/* One Qwen3VLAttention call. B = batch, S = seq_len, H = num_heads, KV = kv_num_heads,
   D = head_dim (64 or 128), M = capacity; H a multiple of KV.
     q (B, S, H*D), k and v (B, S, KV*D), q_norm_weight and k_norm_weight (D), cos and sin (B, S, D),
     output (B, S, H*D): storage `dtype`;
     past_key, past_value, present_key, present_value (B, KV, M, D): storage `cache_dtype`;
     seqlens_k (B) and total_sequence_length (1): int32, read on the device.
   When present_* is not past_* the past buffer is copied into it first (cudaMemcpyAsync of the
   whole buffer); with the same address only the S new positions per row are written.
   S > 1 runs the tiled prefill kernel; S == 1 the split-K decode kernel over `decode_splits` key
   chunks per (row, kv head) (0: qwen3vl_attention_decode_splits; clamped to MAX_SPLITS and to what
   `workspace` holds), then a combine kernel. `workspace` (256-byte aligned) may be NULL for
   S > 1 or one chunk. Every pointer 16-byte aligned.
   Returns cudaSuccess, cudaErrorInvalidValue for unsupported arguments, or the launch error. */
cudaError_t qwen3vl_attention(void const* q, void const* k, void const* v, void const* q_norm_weight,
    void const* k_norm_weight, void const* cos, void const* sin, void const* past_key, void const* past_value,
    int32_t const* seqlens_k, int32_t const* total_sequence_length, void* output, void* present_key,
    void* present_value, int32_t batch, int32_t seq_len, int32_t num_heads, int32_t kv_num_heads, int32_t head_dim,
    int32_t capacity, float scale, float epsilon, qwen3vl_dtype dtype, qwen3vl_dtype cache_dtype,
    int32_t decode_splits, void* workspace, size_t workspace_size, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
