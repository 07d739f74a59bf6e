/* Weight-only block-quantized GEMM and gather, C launch API (no TensorRT).
   Weight layout and maths: trt_plugins/weight_only_gemm/README.md (MatMulNBits' layout). */
#pragma once

#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

#include "../common/kernel_types.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Launch flags of qwen3vl_weight_only_gemm. */
enum
{
    /* accuracy_level 4: A may be quantized to int8 per block (symmetric, one float scale per
       block_size values of a row) and multiplied with __dp4a. Taken on SM 6.1/6.2, where FP32
       dequantization would make the decode GEMV compute bound; elsewhere the exact path runs. */
    QWEN3VL_GEMM_INT8_ACTIVATIONS = 1,
    /* The dp4a path on any GPU (tests, and Pascal behaviour on a newer GPU). */
    QWEN3VL_GEMM_FORCE_DP4A = 2,
    /* Never the GEMV path, even for M <= 4 (tests). */
    QWEN3VL_GEMM_FORCE_TILED = 4
};

/* What qwen3vl_weight_only_gemm_path reports. */
enum
{
    QWEN3VL_GEMM_PATH_GEMV = 1, /* else the tiled GEMM */
    QWEN3VL_GEMM_PATH_DP4A = 2  /* else exact float32 dequantization */
};

/* Bytes of workspace qwen3vl_weight_only_gemm needs for these flags (0 unless they allow dp4a):
   the int8 activations and their scales. */
size_t qwen3vl_weight_only_gemm_workspace_size(int64_t m, int32_t k, int32_t block_size, int32_t flags);

/* The path qwen3vl_weight_only_gemm takes on the current device for these arguments. */
int32_t qwen3vl_weight_only_gemm_path(int64_t m, int32_t bits, int32_t block_size, int32_t flags);

/* y (m, n) = T(float(a) (m, k) @ W (k, n) [+ bias (n)]) with float32 accumulation, where
     W[k, n] = (code(n, k) - zero_point(n, k / block_size)) * scales(n, k / block_size),
   b: uint8 (n, k_blocks, block_size * bits / 8), 4 bit: lower k in the low nibble;
   scales: T (n, k_blocks); zero_points: uint8 (n, ceil(k_blocks * bits / 8)) packed like b, or NULL
   for 2^(bits-1); bias: T (n) or NULL; k_blocks = ceil(k / block_size). bits 4 or 8, block_size a
   power of two >= 16. `b` must be 16-byte aligned. M <= 4 runs a GEMV (one warp per output column
   group, streaming B), larger M a tiled GEMM; the dp4a variants (see the flags) need `workspace`
   of qwen3vl_weight_only_gemm_workspace_size bytes, 256-byte aligned. */
cudaError_t qwen3vl_weight_only_gemm(void const* a, uint8_t const* b, void const* scales, uint8_t const* zero_points,
    void const* bias, void* y, int64_t m, int32_t n, int32_t k, int32_t bits, int32_t block_size, qwen3vl_dtype dtype,
    int32_t flags, void* workspace, size_t workspace_size, cudaStream_t stream);

/* y (count, k_blocks * block_size) = the rows `indices` (count values, int32 or int64 as
   index_bits says; negative ones count from the end) of the quantized table `data`
   (rows, k_blocks * block_size * bits / 8), dequantized with scales (rows, k_blocks) and
   zero_points (rows, ceil(k_blocks * bits / 8)) or NULL. Out-of-range indices give zero rows. */
cudaError_t qwen3vl_quantized_gather(uint8_t const* data, void const* indices, int32_t index_bits, int64_t count,
    void const* scales, uint8_t const* zero_points, void* y, int64_t rows, int32_t k_blocks, int32_t bits,
    int32_t block_size, qwen3vl_dtype dtype, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
