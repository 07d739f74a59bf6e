/* RMSNorm kernel, C launch API (no TensorRT): the contract of trt_plugins/rmsnorm/README.md. */
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#include "../common/kernel_types.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Normalises `rows` dense rows of `n` values each, all tensors of storage type `dtype`:
     v = float(x) [+ float(skip)],  y = T(v / sqrt(mean(v^2) + epsilon) * float(gamma)),  sum = T(v).
   `skip` may be NULL (no residual add); `sum` may be NULL (not written); `sum` needs `skip`.
   Float32 math, one rounding on store. Inputs and outputs must not overlap.
   Returns cudaSuccess or the error of the launch (cudaErrorInvalidValue for bad arguments). */
cudaError_t qwen3vl_rmsnorm(void const* x, void const* skip, void const* gamma, void* y, void* sum, int64_t rows,
    int32_t n, float epsilon, qwen3vl_dtype dtype, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
