/* Vision block-diagonal attention kernel, C launch API (no TensorRT): the Qwen3VLVisionAttention
   contract of trt_plugins/vision_attention/README.md. */
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#include "../common/kernel_types.h"

#ifdef __cplusplus
extern "C" {
#endif

/* output[n, h] = sum_m softmax_m(q[n, h] . k[m, h] * scale) v[m, h] over the patches m of n's frame.
   q, k, v, output: (patches, num_heads * head_dim), storage `dtype`; head_dim 64 or 128.
   frame_patch_index (frames, longest): int32 or int64 (index_bits 32 or 64), the packed row of each
   slot; frame_patch_mask (frames, longest): bool bytes, the slots that hold a patch, or NULL (the
   TensorRT plugin: padding slots then hold an index outside the range, -1). A slot whose index is
   outside [0, patches) counts as padding either way (never read or written out of bounds).
   The result of slot (f, l) is written to row frame_patch_index[f, l], so the layout must be one
   where patch_frame_slot is the inverse of the index over the masked slots (what
   runtime/vision_positions.frame_layout builds); patch_frame_slot itself is not needed here.
   Nothing is computed across frames or for padding slots. Float32 math. Pointers 16-byte aligned.
   Returns cudaSuccess, cudaErrorInvalidValue for unsupported arguments, or the launch error. */
cudaError_t qwen3vl_vision_attention(void const* q, void const* k, void const* v, void const* frame_patch_index,
    uint8_t const* frame_patch_mask, void* output, int64_t patches, int32_t frames, int32_t longest,
    int32_t num_heads, int32_t head_dim, float scale, qwen3vl_dtype dtype, int32_t index_bits, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
