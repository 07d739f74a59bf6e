// Device helpers shared by the kernels: storage <-> float32, warp reductions, vector loads.
// No TensorRT here: the kernels build and run without it.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <stdint.h>

namespace qwen3vl
{

__device__ __forceinline__ float toFloat(float v)
{
    return v;
}

__device__ __forceinline__ float toFloat(__half v)
{
    return __half2float(v);
}

template <typename T>
__device__ __forceinline__ T fromFloat(float v);

template <>
__device__ __forceinline__ float fromFloat<float>(float v)
{
    return v;
}

// Round to nearest even, as numpy's astype(float16) does.
template <>
__device__ __forceinline__ __half fromFloat<__half>(float v)
{
    return __float2half_rn(v);
}

__device__ __forceinline__ float warpSum(float v)
{
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1)
    {
        v += __shfl_xor_sync(0xffffffffu, v, offset);
    }
    return v;
}

__device__ __forceinline__ float warpMax(float v)
{
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1)
    {
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    }
    return v;
}

// The integer type one aligned load of `Bytes` bytes moves, so that V values of T travel as one
// 16-, 8-, 4- or 2-byte transaction.
template <int Bytes>
struct RawVector;
template <>
struct RawVector<16>
{
    using Type = uint4;
};
template <>
struct RawVector<8>
{
    using Type = uint2;
};
template <>
struct RawVector<4>
{
    using Type = uint32_t;
};
template <>
struct RawVector<2>
{
    using Type = uint16_t;
};

// Loads the V consecutive values p[index * V .. index * V + V) as float32; p + index * V must be
// aligned to V * sizeof(T).
template <typename T, int V>
__device__ __forceinline__ void loadVector(T const* p, int64_t index, float (&out)[V])
{
    using Raw = typename RawVector<sizeof(T) * V>::Type;
    Raw const raw = reinterpret_cast<Raw const*>(p)[index];
    T values[V];
    memcpy(values, &raw, sizeof(raw));
#pragma unroll
    for (int i = 0; i < V; ++i)
    {
        out[i] = toFloat(values[i]);
    }
}

template <typename T, int V>
__device__ __forceinline__ void storeVector(T* p, int64_t index, float const (&in)[V])
{
    using Raw = typename RawVector<sizeof(T) * V>::Type;
    T values[V];
#pragma unroll
    for (int i = 0; i < V; ++i)
    {
        values[i] = fromFloat<T>(in[i]);
    }
    Raw raw;
    memcpy(&raw, values, sizeof(raw));
    reinterpret_cast<Raw*>(p)[index] = raw;
}

inline bool isAligned(void const* p, uintptr_t bytes)
{
    return (reinterpret_cast<uintptr_t>(p) % bytes) == 0;
}

} // namespace qwen3vl
