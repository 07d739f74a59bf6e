// RMSNorm over the last axis, with the optional residual add in front of it.
//
// A row is handled by one group of `blockDim.x` threads (a whole block for hidden-size rows, one
// warp for head_dim rows, several rows per block then). The row is read once: each thread keeps
// the first kCachedVectors of its vectors in registers between the sum of squares and the scaling,
// and re-reads only beyond that (rows longer than 4 * 1024 vectors). Loads and stores are 16-byte
// vectors whenever every pointer and the row length allow it.
#include "rmsnorm_kernel.h"

#include "../common/device_utils.cuh"

namespace qwen3vl
{
namespace
{

constexpr int kCachedVectors = 4;
constexpr int kThreadsPerBlock = 256; // rows per block = kThreadsPerBlock / threads per row, for short rows

// v = x (+ skip) for vector `index`; writes T(v) to `sum` when given.
template <typename T, int V>
__device__ __forceinline__ void loadRow(T const* __restrict__ x, T const* __restrict__ skip, T* __restrict__ sum,
    int64_t index, float (&v)[V])
{
    loadVector<T, V>(x, index, v);
    if (skip != nullptr)
    {
        float s[V];
        loadVector<T, V>(skip, index, s);
#pragma unroll
        for (int i = 0; i < V; ++i)
        {
            v[i] += s[i];
        }
        if (sum != nullptr)
        {
            storeVector<T, V>(sum, index, v);
        }
    }
}

template <int V>
__device__ __forceinline__ float sumOfSquares(float const (&v)[V])
{
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < V; ++i)
    {
        s = fmaf(v[i], v[i], s);
    }
    return s;
}

// Sum over the threadIdx.x group of one row (threadIdx.y). Every thread of the block must call it.
__device__ __forceinline__ float rowSum(float v, float* partial)
{
    v = warpSum(v);
    if (blockDim.x == 32)
    {
        return v; // a warp per row: nothing to combine
    }
    int const warps = blockDim.x / 32;
    int const warp = threadIdx.x / 32;
    int const lane = threadIdx.x % 32;
    float* rowPartial = partial + threadIdx.y * warps;
    if (lane == 0)
    {
        rowPartial[warp] = v;
    }
    __syncthreads();
    return warpSum(lane < warps ? rowPartial[lane] : 0.f);
}

template <typename T, int V>
__global__ void __launch_bounds__(1024) rmsNormKernel(T const* __restrict__ x, T const* __restrict__ skip,
    T const* __restrict__ gamma, T* __restrict__ y, T* __restrict__ sum, int64_t rows, int n, float epsilon)
{
    __shared__ float partial[32]; // one per warp of the block
    int64_t const row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
    bool const active = row < rows;
    int const vectors = n / V;
    int64_t const base = row * vectors; // in vectors
    int const stride = blockDim.x;

    float cache[kCachedVectors][V];
    float squares = 0.f;
    if (active)
    {
#pragma unroll
        for (int c = 0; c < kCachedVectors; ++c)
        {
            int const i = threadIdx.x + c * stride;
            if (i < vectors)
            {
                loadRow<T, V>(x, skip, sum, base + i, cache[c]);
                squares += sumOfSquares(cache[c]);
            }
        }
        for (int i = threadIdx.x + kCachedVectors * stride; i < vectors; i += stride)
        {
            float v[V];
            loadRow<T, V>(x, skip, sum, base + i, v);
            squares += sumOfSquares(v);
        }
    }
    float const total = rowSum(squares, partial);
    if (!active)
    {
        return;
    }
    // As the reference: mean in float32, then 1 / sqrt (not rsqrtf, whose error is a few ulp).
    float const invRms = 1.f / sqrtf(total / static_cast<float>(n) + epsilon);

#pragma unroll
    for (int c = 0; c < kCachedVectors; ++c)
    {
        int const i = threadIdx.x + c * stride;
        if (i < vectors)
        {
            float g[V];
            loadVector<T, V>(gamma, i, g);
#pragma unroll
            for (int j = 0; j < V; ++j)
            {
                cache[c][j] = cache[c][j] * invRms * g[j];
            }
            storeVector<T, V>(y, base + i, cache[c]);
        }
    }
    for (int i = threadIdx.x + kCachedVectors * stride; i < vectors; i += stride)
    {
        float v[V];
        float g[V];
        loadRow<T, V>(x, skip, nullptr, base + i, v);
        loadVector<T, V>(gamma, i, g);
#pragma unroll
        for (int j = 0; j < V; ++j)
        {
            v[j] = v[j] * invRms * g[j];
        }
        storeVector<T, V>(y, base + i, v);
    }
}

template <typename T, int V>
cudaError_t launch(void const* x, void const* skip, void const* gamma, void* y, void* sum, int64_t rows, int n,
    float epsilon, cudaStream_t stream)
{
    int const vectors = n / V;
    // About two vectors per thread: enough work per thread, and all of a row in registers.
    int threads = ((vectors + 1) / 2 + 31) / 32 * 32;
    threads = threads < 32 ? 32 : (threads > 1024 ? 1024 : threads);
    int const rowsPerBlock = threads >= kThreadsPerBlock ? 1 : kThreadsPerBlock / threads;
    int64_t const blocks = (rows + rowsPerBlock - 1) / rowsPerBlock;
    if (blocks > 0x7fffffff)
    {
        return cudaErrorInvalidValue;
    }
    dim3 const block(threads, rowsPerBlock);
    rmsNormKernel<T, V><<<static_cast<unsigned>(blocks), block, 0, stream>>>(static_cast<T const*>(x),
        static_cast<T const*>(skip), static_cast<T const*>(gamma), static_cast<T*>(y), static_cast<T*>(sum), rows, n,
        epsilon);
    return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch(void const* x, void const* skip, void const* gamma, void* y, void* sum, int64_t rows, int n,
    float epsilon, cudaStream_t stream)
{
    constexpr int kWide = 16 / sizeof(T);
    bool const wide = n % kWide == 0 && isAligned(x, 16) && isAligned(gamma, 16) && isAligned(y, 16)
        && (skip == nullptr || isAligned(skip, 16)) && (sum == nullptr || isAligned(sum, 16));
    if (wide)
    {
        return launch<T, kWide>(x, skip, gamma, y, sum, rows, n, epsilon, stream);
    }
    return launch<T, 1>(x, skip, gamma, y, sum, rows, n, epsilon, stream);
}

} // namespace
} // namespace qwen3vl

extern "C" cudaError_t qwen3vl_rmsnorm(void const* x, void const* skip, void const* gamma, void* y, void* sum,
    int64_t rows, int32_t n, float epsilon, qwen3vl_dtype dtype, cudaStream_t stream)
{
    if (rows < 0 || n <= 0 || x == nullptr || gamma == nullptr || y == nullptr || (sum != nullptr && skip == nullptr))
    {
        return cudaErrorInvalidValue;
    }
    if (rows == 0)
    {
        return cudaSuccess;
    }
    switch (dtype)
    {
    case QWEN3VL_FLOAT32: return qwen3vl::dispatch<float>(x, skip, gamma, y, sum, rows, n, epsilon, stream);
    case QWEN3VL_FLOAT16: return qwen3vl::dispatch<__half>(x, skip, gamma, y, sum, rows, n, epsilon, stream);
    }
    return cudaErrorInvalidValue;
}
