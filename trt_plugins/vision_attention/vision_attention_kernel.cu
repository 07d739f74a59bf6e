// Qwen3VLVisionAttention: bidirectional attention inside each frame of the packed patches
// (contract: trt_plugins/vision_attention/README.md).
//
// One block per (query tile of a frame's slots, head, frame) runs the decoder's tile
// (../attention/attention_tile.cuh): the frame's keys and values are gathered through
// frame_patch_index a tile at a time into shared memory, with an online softmax, so memory grows
// with the patch count and never with frames * longest^2. Blocks past a frame's last patch exit at
// once, and a short frame's tiles visit only its own keys: nothing is computed across frames or
// for padding. Float32 math, storage float32 or float16.
#include "vision_attention_kernel.h"

#include <climits>

#include "../attention/attention_tile.cuh"

namespace qwen3vl
{
namespace
{

template <typename I>
__device__ __forceinline__ bool isPatch(uint8_t const* mask, I const* index, int64_t patches, int l)
{
    return (mask == nullptr || mask[l] != 0) && index[l] >= 0 && index[l] < patches;
}

template <int D, typename T, typename I>
struct VisionProblem
{
    int rows;
    int keyEnd;
    T const* keys;
    T const* values;
    T const* q;
    T* out;
    I const* index;        // this frame's row of frame_patch_index
    uint8_t const* mask;   // this frame's row of frame_patch_mask, or nullptr (padding by index alone)
    int64_t patches;       // N: an index outside [0, N) is a padding slot
    int64_t tokenStride;   // H * D
    int64_t headOffset;    // h * D
    int l0;                // first slot of the tile
    float qScale;

    // A patch slot: masked in (when there is a mask), and an index in range (the TensorRT plugin
    // marks padding with -1 instead of a mask; its timing runs pass arbitrary data).
    __device__ bool active(int l) const
    {
        return isPatch(mask, index, patches, l);
    }
    __device__ int64_t rowOffset(int j) const
    {
        return (active(j) ? static_cast<int64_t>(index[j]) : 0) * tokenStride + headOffset;
    }
    __device__ bool keyOk(int j) const
    {
        return active(j);
    }
    __device__ int lastKey(int r) const
    {
        return active(l0 + r) ? INT_MAX : -1; // a padding slot sees nothing (and stores nothing)
    }
    __device__ void loadQuery(int r, float (&x)[D / 32], int lane) const
    {
        T const* row = q + rowOffset(l0 + r);
#pragma unroll
        for (int e = 0; e < D / 32; ++e)
        {
            x[e] = toFloat(row[lane + 32 * e]) * qScale;
        }
    }
    __device__ void store(int r, int d, float const (&o)[4]) const
    {
        if (active(l0 + r))
        {
            storeVector<T, 4>(out + rowOffset(l0 + r) + d, 0, o);
        }
    }
};

template <int D, typename T, typename I>
__global__ void __launch_bounds__(tile::kThreads) visionAttentionKernel(T const* __restrict__ q,
    T const* __restrict__ k, T const* __restrict__ v, I const* __restrict__ frameIndex,
    uint8_t const* __restrict__ frameMask, T* __restrict__ out, int64_t patches, int longest, int heads,
    float qScale)
{
    constexpr int kBM = tile::TileShape<D>::kBM;
    __shared__ __align__(16) float smem[tile::TileSmem<D>::kFloats];
    __shared__ int keyFlags[tile::TileShape<D>::kBN];
    __shared__ int frameEnd;

    int const f = blockIdx.z;
    uint8_t const* mask = frameMask == nullptr ? nullptr : frameMask + static_cast<int64_t>(f) * longest;
    I const* index = frameIndex + static_cast<int64_t>(f) * longest;
    // The frame's extent: one past its last patch (frame_layout fills a prefix; any layout works).
    if (threadIdx.x == 0)
    {
        frameEnd = 0;
    }
    __syncthreads();
    int end = 0;
    for (int l = threadIdx.x; l < longest; l += tile::kThreads)
    {
        end = isPatch(mask, index, patches, l) ? l + 1 : end;
    }
    atomicMax(&frameEnd, end);
    __syncthreads();

    int const l0 = blockIdx.x * kBM;
    if (l0 >= frameEnd)
    {
        return; // the whole block: a tile of padding slots
    }
    VisionProblem<D, T, I> pb;
    pb.l0 = l0;
    pb.rows = min(kBM, frameEnd - l0);
    pb.keyEnd = frameEnd;
    pb.keys = k;
    pb.values = v;
    pb.q = q;
    pb.out = out;
    pb.index = index;
    pb.mask = mask;
    pb.patches = patches;
    pb.tokenStride = static_cast<int64_t>(heads) * D;
    pb.headOffset = static_cast<int64_t>(blockIdx.y) * D;
    pb.qScale = qScale;
    tile::attend<D, T>(pb, smem, keyFlags);
}

template <int D, typename T, typename I>
cudaError_t launch(void const* q, void const* k, void const* v, void const* index, uint8_t const* mask, void* out,
    int64_t patches, int frames, int longest, int heads, float scale, cudaStream_t stream)
{
    constexpr int kBM = tile::TileShape<D>::kBM;
    dim3 const grid((longest + kBM - 1) / kBM, heads, frames);
    visionAttentionKernel<D, T, I><<<grid, tile::kThreads, 0, stream>>>(static_cast<T const*>(q),
        static_cast<T const*>(k), static_cast<T const*>(v), static_cast<I const*>(index), mask, static_cast<T*>(out),
        patches, longest, heads, scale * tile::kLog2e);
    return cudaGetLastError();
}

template <typename T, typename I>
cudaError_t dispatchHeadDim(void const* q, void const* k, void const* v, void const* index, uint8_t const* mask,
    void* out, int64_t patches, int frames, int longest, int heads, int headDim, float scale, cudaStream_t stream)
{
    switch (headDim)
    {
    case 64: return launch<64, T, I>(q, k, v, index, mask, out, patches, frames, longest, heads, scale, stream);
    case 128: return launch<128, T, I>(q, k, v, index, mask, out, patches, frames, longest, heads, scale, stream);
    }
    return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t dispatchIndex(void const* q, void const* k, void const* v, void const* index, uint8_t const* mask,
    void* out, int64_t patches, int frames, int longest, int heads, int headDim, float scale, int indexBits,
    cudaStream_t stream)
{
    if (indexBits == 64)
    {
        return dispatchHeadDim<T, int64_t>(
            q, k, v, index, mask, out, patches, frames, longest, heads, headDim, scale, stream);
    }
    return dispatchHeadDim<T, int32_t>(
        q, k, v, index, mask, out, patches, frames, longest, heads, headDim, scale, stream);
}

} // namespace
} // namespace qwen3vl

extern "C" cudaError_t qwen3vl_vision_attention(void const* q, void const* k, void const* v,
    void const* frame_patch_index, uint8_t const* frame_patch_mask, void* output, int64_t patches, int32_t frames,
    int32_t longest, int32_t num_heads, int32_t head_dim, float scale, qwen3vl_dtype dtype, int32_t index_bits,
    cudaStream_t stream)
{
    if (patches < 0 || frames < 0 || longest < 0 || num_heads <= 0 || num_heads > 65535 || frames > 65535
        || (head_dim != 64 && head_dim != 128) || (index_bits != 32 && index_bits != 64)
        || (dtype != QWEN3VL_FLOAT32 && dtype != QWEN3VL_FLOAT16))
    {
        return cudaErrorInvalidValue;
    }
    if (patches == 0 || frames == 0 || longest == 0)
    {
        return cudaSuccess;
    }
    if (q == nullptr || k == nullptr || v == nullptr || frame_patch_index == nullptr || output == nullptr)
    {
        return cudaErrorInvalidValue;
    }
    if (dtype == QWEN3VL_FLOAT16)
    {
        return qwen3vl::dispatchIndex<__half>(q, k, v, frame_patch_index, frame_patch_mask, output, patches, frames,
            longest, num_heads, head_dim, scale, index_bits, stream);
    }
    return qwen3vl::dispatchIndex<float>(q, k, v, frame_patch_index, frame_patch_mask, output, patches, frames,
        longest, num_heads, head_dim, scale, index_bits, stream);
}
