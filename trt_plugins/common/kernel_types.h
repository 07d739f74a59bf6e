/* Types shared by the kernels' C launch API (usable from ctypes) and the TensorRT plugins. */
#pragma once

/* Storage type of a kernel's floating-point tensors. The math is always float32: FP16 arithmetic
   runs at 1/64 rate on SM 6.1, so float16 is only ever a storage format here. */
typedef enum qwen3vl_dtype
{
    QWEN3VL_FLOAT32 = 0,
    QWEN3VL_FLOAT16 = 1
} qwen3vl_dtype;
