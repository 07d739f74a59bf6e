// Weight-only block-quantized GEMM (INT4/INT8 weights in MatMulNBits' layout, float32 or float16
// activations, float32 accumulation) and the quantized embedding gather.
//
// Four GEMM kernels:
//   gemvExact      M <= 4 (decode). One warp per group of output columns streams those columns'
//                  packed rows with coalesced 16-byte loads; A is staged in shared memory, float32.
//   gemvDp4a       the same with A quantized to int8 per block and __dp4a dot products.
//   gemmTiledExact larger M (prefill, vision): 64 x 64 output tiles, 32-deep k steps, the weight
//                  tile dequantized into shared memory as float32.
//   gemmTiledDp4a  the same over int8 A and int8 weights (no dequantization in the inner loop).
// The dp4a variants exist for SM 6.1, where FP32 dequantization makes the decode GEMV compute
// bound while dp4a runs at full rate (FP16 math is 1/64 there, so nothing here computes in FP16).
#include "weight_only_gemm_kernel.h"

#include "../common/device_utils.cuh"

namespace qwen3vl
{
namespace
{

constexpr int kGemvWarps = 8;
constexpr int kGemvThreads = kGemvWarps * 32;
constexpr int kGemvTileK = 1024;                             // A values staged per step (per row)
constexpr int kGemvPaddedTileK = kGemvTileK + kGemvTileK / 8; // 4 floats of padding per 32

constexpr int kTileM = 64;
constexpr int kTileN = 64;
constexpr int kTileK = 32;
constexpr int kTileThreads = 256;

constexpr float kMagic = 8388608.f; // 2^23: the float with bits 0x4B000000

// Shared-memory index of A value k of a GEMV tile: a 16-byte read per lane, lanes 32 (INT4) or 16
// (INT8) values apart, would otherwise hit the same banks; 4 floats of padding per 32 spread them.
__device__ __forceinline__ int paddedIndex(int k)
{
    return k + (k >> 5) * 4;
}

__device__ __forceinline__ uint32_t wordOf(uint4 v, int i)
{
    return i == 0 ? v.x : (i == 1 ? v.y : (i == 2 ? v.z : v.w));
}

// int8 x int8 dot product of four byte lanes, added to c.
__device__ __forceinline__ int dot4(int a, int b, int c)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 610
    return __dp4a(a, b, c);
#else
    // No dp4a before SM 6.1 (not a target; this keeps such -arch builds compiling).
    for (int i = 0; i < 32; i += 8)
    {
        c += static_cast<int>(static_cast<int8_t>(a >> i)) * static_cast<int>(static_cast<int8_t>(b >> i));
    }
    return c;
#endif
}

template <int BITS>
__device__ __forceinline__ int zeroPoint(uint8_t const* __restrict__ zp, int64_t col, int zpStride, int block)
{
    if (zp == nullptr)
    {
        return 1 << (BITS - 1);
    }
    int const byte = __ldg(zp + col * zpStride + (BITS == 4 ? block >> 1 : block));
    return BITS == 4 ? ((block & 1) ? byte >> 4 : byte & 15) : byte;
}

// The codes of one 32-bit word of B, in k order, minus the zero point, as float32: 8 (INT4) or 4
// (INT8) values. A byte permute builds 0x4B0000cc, the float 2^23 + code, so one subtraction of
// 2^23 + zero point converts exactly without an int-to-float instruction (quarter rate on Pascal).
template <int BITS>
__device__ __forceinline__ void unpackWord(uint32_t word, float zeroBias, float (&out)[32 / BITS])
{
    if constexpr (BITS == 4)
    {
        uint32_t const lo = word & 0x0F0F0F0Fu;        // codes k, k+2, k+4, k+6
        uint32_t const hi = (word >> 4) & 0x0F0F0F0Fu; // codes k+1, k+3, k+5, k+7
#pragma unroll
        for (int j = 0; j < 4; ++j)
        {
            out[2 * j] = __uint_as_float(__byte_perm(lo, 0x4B000000u, 0x7440u + j)) - zeroBias;
            out[2 * j + 1] = __uint_as_float(__byte_perm(hi, 0x4B000000u, 0x7440u + j)) - zeroBias;
        }
    }
    else
    {
#pragma unroll
        for (int j = 0; j < 4; ++j)
        {
            out[j] = __uint_as_float(__byte_perm(word, 0x4B000000u, 0x7440u + j)) - zeroBias;
        }
    }
}

// Four INT4 codes (one per byte, 0..15) minus the zero point, as signed int8 lanes for dp4a:
// 0x80 + code - zero stays in 0x71..0x8F, so the byte subtraction never borrows across lanes.
__device__ __forceinline__ int centreNibbles(uint32_t nibbles, int zero)
{
    return static_cast<int>(((nibbles | 0x80808080u) - static_cast<uint32_t>(zero) * 0x01010101u) ^ 0x80808080u);
}

template <typename T>
__device__ __forceinline__ void storeOutput(
    T* __restrict__ y, T const* __restrict__ bias, int64_t row, int n, int col, float v)
{
    if (bias != nullptr)
    {
        v += toFloat(bias[col]);
    }
    y[row * n + col] = fromFloat<T>(v);
}

// ---------------------------------------------------------------------------------------------
// Decode: GEMV, M <= 4 rows of A, COLS output columns per warp, exact float32 dequantization.

template <typename T, int BITS, int M, int COLS>
__global__ void __launch_bounds__(kGemvThreads) gemvExact(T const* __restrict__ a, uint8_t const* __restrict__ b,
    T const* __restrict__ scales, uint8_t const* __restrict__ zp, T const* __restrict__ bias, T* __restrict__ y,
    int n, int k, int blockSize, int kBlocks)
{
    constexpr int kCodesPerWord = 32 / BITS;
    constexpr int kCodesPerChunk = 4 * kCodesPerWord; // one 16-byte load of B per lane
    __shared__ __align__(16) float aTile[M][kGemvPaddedTileK];

    int const warp = threadIdx.x / 32;
    int const lane = threadIdx.x % 32;
    int const firstCol = (blockIdx.x * kGemvWarps + warp) * COLS;
    int const kPad = kBlocks * blockSize;
    int64_t const rowBytes = static_cast<int64_t>(kPad) * BITS / 8;
    int const zpStride = (kBlocks * BITS + 7) / 8;

    float acc[COLS][M];
#pragma unroll
    for (int j = 0; j < COLS; ++j)
    {
#pragma unroll
        for (int r = 0; r < M; ++r)
        {
            acc[j][r] = 0.f;
        }
    }

    for (int t0 = 0; t0 < kPad; t0 += kGemvTileK)
    {
        __syncthreads(); // every warp is done with the previous tile
        for (int i = threadIdx.x; i < M * kGemvTileK; i += kGemvThreads)
        {
            int const r = i / kGemvTileK;
            int const kk = i % kGemvTileK;
            int const kg = t0 + kk;
            // Beyond K (the last block's padding) A is zero, so the padding codes add nothing.
            aTile[r][paddedIndex(kk)] = kg < k ? toFloat(a[static_cast<int64_t>(r) * k + kg]) : 0.f;
        }
        __syncthreads();

        int const chunks = min(kGemvTileK, kPad - t0) / kCodesPerChunk;
        for (int c = lane; c < chunks; c += 32)
        {
            int const kt = c * kCodesPerChunk;
            int const kg = t0 + kt;
            int const block = kg / blockSize; // a chunk never straddles blocks: blob % 16 == 0
            uint4 raw[COLS];
            float scale[COLS];
            float zeroBias[COLS];
#pragma unroll
            for (int j = 0; j < COLS; ++j)
            {
                int const col = firstCol + j;
                if (col < n)
                {
                    raw[j] = __ldg(reinterpret_cast<uint4 const*>(b + col * rowBytes + kg * BITS / 8));
                    scale[j] = toFloat(scales[static_cast<int64_t>(col) * kBlocks + block]);
                    zeroBias[j] = kMagic + static_cast<float>(zeroPoint<BITS>(zp, col, zpStride, block));
                }
                else
                {
                    raw[j] = make_uint4(0u, 0u, 0u, 0u);
                    scale[j] = 0.f;
                    zeroBias[j] = kMagic;
                }
            }

            float dot[COLS][M];
#pragma unroll
            for (int j = 0; j < COLS; ++j)
            {
#pragma unroll
                for (int r = 0; r < M; ++r)
                {
                    dot[j][r] = 0.f;
                }
            }
#pragma unroll
            for (int w = 0; w < 4; ++w)
            {
                float av[M][kCodesPerWord];
#pragma unroll
                for (int r = 0; r < M; ++r)
                {
#pragma unroll
                    for (int q = 0; q < kCodesPerWord; q += 4)
                    {
                        float4 const v = *reinterpret_cast<float4 const*>(
                            &aTile[r][paddedIndex(kt) + w * kCodesPerWord + q]);
                        av[r][q] = v.x;
                        av[r][q + 1] = v.y;
                        av[r][q + 2] = v.z;
                        av[r][q + 3] = v.w;
                    }
                }
#pragma unroll
                for (int j = 0; j < COLS; ++j)
                {
                    float wv[kCodesPerWord];
                    unpackWord<BITS>(wordOf(raw[j], w), zeroBias[j], wv);
#pragma unroll
                    for (int r = 0; r < M; ++r)
                    {
#pragma unroll
                        for (int i = 0; i < kCodesPerWord; ++i)
                        {
                            dot[j][r] = fmaf(wv[i], av[r][i], dot[j][r]);
                        }
                    }
                }
            }
#pragma unroll
            for (int j = 0; j < COLS; ++j)
            {
#pragma unroll
                for (int r = 0; r < M; ++r)
                {
                    acc[j][r] = fmaf(scale[j], dot[j][r], acc[j][r]);
                }
            }
        }
    }

#pragma unroll
    for (int j = 0; j < COLS; ++j)
    {
#pragma unroll
        for (int r = 0; r < M; ++r)
        {
            float const v = warpSum(acc[j][r]);
            int const col = firstCol + j;
            if (lane == 0 && col < n)
            {
                storeOutput(y, bias, r, n, col, v);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// dp4a: A quantized once per launch into the workspace, read by the dp4a GEMV and GEMM.
//
// Workspace: int8 A (m, kPad), then (256-byte aligned) float scales (m, kBlocks); one symmetric
// scale per block of a row, amax / 127, codes round-to-nearest-even in [-127, 127], zero beyond K.
// For INT4 weights each group of 8 values is stored evens first (k, k+2, k+4, k+6, k+1, ...), the
// order in which the low and high nibbles of one weight word come apart.

template <typename T, int BITS>
__global__ void __launch_bounds__(256) quantizeActivations(
    T const* __restrict__ a, int64_t m, int k, int blockSize, int kBlocks, int8_t* __restrict__ qa, float* __restrict__ qscale)
{
    int64_t const warpId = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
    int const lane = threadIdx.x % 32;
    if (warpId >= m * kBlocks)
    {
        return; // the whole warp: warpId is uniform across it
    }
    int64_t const row = warpId / kBlocks;
    int const block = static_cast<int>(warpId % kBlocks);
    int const k0 = block * blockSize;
    T const* src = a + row * k;

    float amax = 0.f;
    for (int i = lane; i < blockSize; i += 32)
    {
        amax = fmaxf(amax, fabsf(k0 + i < k ? toFloat(src[k0 + i]) : 0.f));
    }
    amax = warpMax(amax);
    float const inv = amax > 0.f ? 127.f / amax : 0.f;
    int8_t* dst = qa + row * static_cast<int64_t>(kBlocks) * blockSize + k0;
    for (int i = lane; i < blockSize; i += 32)
    {
        float const v = k0 + i < k ? toFloat(src[k0 + i]) : 0.f;
        int const q = max(-127, min(127, __float2int_rn(v * inv)));
        int const slot = BITS == 4 ? ((i & ~7) | ((i & 1) << 2) | ((i & 7) >> 1)) : i;
        dst[slot] = static_cast<int8_t>(q);
    }
    if (lane == 0)
    {
        qscale[row * kBlocks + block] = amax / 127.f;
    }
}

template <typename T, int BITS, int M, int COLS, bool ASYM8>
__global__ void __launch_bounds__(kGemvThreads) gemvDp4a(int8_t const* __restrict__ qa,
    float const* __restrict__ qscale, uint8_t const* __restrict__ b, T const* __restrict__ scales,
    uint8_t const* __restrict__ zp, T const* __restrict__ bias, T* __restrict__ y, int n, int blockSize, int kBlocks)
{
    constexpr int kCodesPerChunk = 128 / BITS;      // one 16-byte load of B
    constexpr int kActWords = kCodesPerChunk / 4;   // int8 activations per chunk, as 32-bit words
    int const warp = threadIdx.x / 32;
    int const lane = threadIdx.x % 32;
    int const firstCol = (blockIdx.x * kGemvWarps + warp) * COLS;
    int const kPad = kBlocks * blockSize;
    int64_t const rowBytes = static_cast<int64_t>(kPad) * BITS / 8;
    int const zpStride = (kBlocks * BITS + 7) / 8;
    int const chunks = kPad / kCodesPerChunk;

    float acc[COLS][M];
#pragma unroll
    for (int j = 0; j < COLS; ++j)
    {
#pragma unroll
        for (int r = 0; r < M; ++r)
        {
            acc[j][r] = 0.f;
        }
    }

    for (int c = lane; c < chunks; c += 32)
    {
        int const kg = c * kCodesPerChunk;
        int const block = kg / blockSize;
        uint4 raw[COLS];
        float scale[COLS];
        int zero[COLS];
#pragma unroll
        for (int j = 0; j < COLS; ++j)
        {
            int const col = firstCol + j;
            if (col < n)
            {
                raw[j] = __ldg(reinterpret_cast<uint4 const*>(b + col * rowBytes + kg * BITS / 8));
                scale[j] = toFloat(scales[static_cast<int64_t>(col) * kBlocks + block]);
                zero[j] = zeroPoint<BITS>(zp, col, zpStride, block);
            }
            else
            {
                raw[j] = make_uint4(0u, 0u, 0u, 0u);
                scale[j] = 0.f;
                zero[j] = 1 << (BITS - 1);
            }
        }

        int act[M][kActWords];
        float actScale[M];
        int actSum[M]; // sum of the int8 activations: the zero-point correction of INT8 weights
#pragma unroll
        for (int r = 0; r < M; ++r)
        {
#pragma unroll
            for (int h = 0; h < kActWords / 4; ++h)
            {
                uint4 const v = __ldg(reinterpret_cast<uint4 const*>(qa + static_cast<int64_t>(r) * kPad + kg) + h);
                act[r][4 * h] = static_cast<int>(v.x);
                act[r][4 * h + 1] = static_cast<int>(v.y);
                act[r][4 * h + 2] = static_cast<int>(v.z);
                act[r][4 * h + 3] = static_cast<int>(v.w);
            }
            actScale[r] = __ldg(qscale + static_cast<int64_t>(r) * kBlocks + block);
            actSum[r] = 0;
            if constexpr (ASYM8)
            {
#pragma unroll
                for (int w = 0; w < kActWords; ++w)
                {
                    actSum[r] = dot4(act[r][w], 0x01010101, actSum[r]);
                }
            }
        }

#pragma unroll
        for (int j = 0; j < COLS; ++j)
        {
            int dot[M];
#pragma unroll
            for (int r = 0; r < M; ++r)
            {
                dot[r] = 0;
            }
#pragma unroll
            for (int w = 0; w < 4; ++w)
            {
                uint32_t const word = wordOf(raw[j], w);
                if constexpr (BITS == 4)
                {
                    // Exact: code - zero fits int8 for 4-bit codes, no correction term.
                    int const even = centreNibbles(word & 0x0F0F0F0Fu, zero[j]);
                    int const odd = centreNibbles((word >> 4) & 0x0F0F0F0Fu, zero[j]);
#pragma unroll
                    for (int r = 0; r < M; ++r)
                    {
                        dot[r] = dot4(even, act[r][2 * w], dot[r]);
                        dot[r] = dot4(odd, act[r][2 * w + 1], dot[r]);
                    }
                }
                else
                {
                    // code - 128 as int8 (flip the top bit); a zero point other than 128 is
                    // corrected below with the activation sum.
                    int const centred = static_cast<int>(word ^ 0x80808080u);
#pragma unroll
                    for (int r = 0; r < M; ++r)
                    {
                        dot[r] = dot4(centred, act[r][w], dot[r]);
                    }
                }
            }
#pragma unroll
            for (int r = 0; r < M; ++r)
            {
                if constexpr (ASYM8)
                {
                    dot[r] -= (zero[j] - 128) * actSum[r];
                }
                acc[j][r] = fmaf(scale[j] * actScale[r], static_cast<float>(dot[r]), acc[j][r]);
            }
        }
    }

#pragma unroll
    for (int j = 0; j < COLS; ++j)
    {
#pragma unroll
        for (int r = 0; r < M; ++r)
        {
            float const v = warpSum(acc[j][r]);
            int const col = firstCol + j;
            if (lane == 0 && col < n)
            {
                storeOutput(y, bias, r, n, col, v);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Prefill: tiled GEMM. Loading, a thread takes 8 consecutive k of one row of A (tid % 64) and of
// one column of W; computing, a 4 x 4 block of the 64 x 64 output tile.

template <typename T>
__device__ __forceinline__ void loadA8(
    T const* __restrict__ a, int64_t row, int64_t m, int k, int kg, bool vectorA, float (&out)[8])
{
    if (vectorA && row < m && kg + 8 <= k)
    {
        T const* p = a + row * k + kg; // 16-byte aligned: k % 8 == 0 and a aligned (checked on the host)
        if constexpr (sizeof(T) == 4)
        {
            float lo[4];
            float hi[4];
            loadVector<T, 4>(p, 0, lo);
            loadVector<T, 4>(p, 1, hi);
#pragma unroll
            for (int i = 0; i < 4; ++i)
            {
                out[i] = lo[i];
                out[i + 4] = hi[i];
            }
        }
        else
        {
            loadVector<T, 8>(p, 0, out);
        }
        return;
    }
#pragma unroll
    for (int i = 0; i < 8; ++i)
    {
        out[i] = row < m && kg + i < k ? toFloat(a[row * k + kg + i]) : 0.f;
    }
}

template <typename T, int BITS>
__device__ __forceinline__ void dequantize8(uint8_t const* __restrict__ b, T const* __restrict__ scales,
    uint8_t const* __restrict__ zp, int col, int n, int k, int kg, int blockSize, int kBlocks, int64_t rowBytes,
    int zpStride, float (&out)[8])
{
    if (col >= n || kg >= k)
    {
#pragma unroll
        for (int i = 0; i < 8; ++i)
        {
            out[i] = 0.f;
        }
        return;
    }
    int const block = kg / blockSize; // 8 codes never straddle blocks: blockSize >= 16
    float const scale = toFloat(scales[static_cast<int64_t>(col) * kBlocks + block]);
    float const zeroBias = kMagic + static_cast<float>(zeroPoint<BITS>(zp, col, zpStride, block));
    uint8_t const* p = b + col * rowBytes + kg * BITS / 8;
    if constexpr (BITS == 4)
    {
        unpackWord<4>(__ldg(reinterpret_cast<uint32_t const*>(p)), zeroBias, out);
    }
    else
    {
        uint2 const raw = __ldg(reinterpret_cast<uint2 const*>(p));
        float lo[4];
        float hi[4];
        unpackWord<8>(raw.x, zeroBias, lo);
        unpackWord<8>(raw.y, zeroBias, hi);
#pragma unroll
        for (int i = 0; i < 4; ++i)
        {
            out[i] = lo[i];
            out[i + 4] = hi[i];
        }
    }
#pragma unroll
    for (int i = 0; i < 8; ++i)
    {
        out[i] = kg + i < k ? out[i] * scale : 0.f;
    }
}

template <typename T>
__device__ __forceinline__ void storeTile(T* __restrict__ y, T const* __restrict__ bias, int64_t row0, int col0,
    int ty, int tx, int64_t m, int n, float const (&acc)[4][4])
{
#pragma unroll
    for (int i = 0; i < 4; ++i)
    {
        int64_t const row = row0 + ty * 4 + i;
        if (row >= m)
        {
            break;
        }
#pragma unroll
        for (int j = 0; j < 4; ++j)
        {
            int const col = col0 + tx * 4 + j;
            if (col < n)
            {
                storeOutput(y, bias, row, n, col, acc[i][j]);
            }
        }
    }
}

template <typename T, int BITS>
__global__ void __launch_bounds__(kTileThreads) gemmTiledExact(T const* __restrict__ a, uint8_t const* __restrict__ b,
    T const* __restrict__ scales, uint8_t const* __restrict__ zp, T const* __restrict__ bias, T* __restrict__ y,
    int64_t m, int n, int k, int blockSize, int kBlocks, bool vectorA)
{
    __shared__ __align__(16) float aTile[kTileK][kTileM];
    __shared__ __align__(16) float wTile[kTileK][kTileN];
    int const tid = threadIdx.x;
    int64_t const row0 = static_cast<int64_t>(blockIdx.y) * kTileM;
    int const col0 = blockIdx.x * kTileN;
    int const lr = tid % 64;
    int const lk = (tid / 64) * 8;
    int const ty = tid / 16;
    int const tx = tid % 16;
    int64_t const rowBytes = static_cast<int64_t>(kBlocks) * blockSize * BITS / 8;
    int const zpStride = (kBlocks * BITS + 7) / 8;

    float acc[4][4] = {};
    for (int k0 = 0; k0 < k; k0 += kTileK)
    {
        // Global loads first, so that they are in flight while other warps finish the last tile.
        float av[8];
        float wv[8];
        loadA8(a, row0 + lr, m, k, k0 + lk, vectorA, av);
        dequantize8<T, BITS>(b, scales, zp, col0 + lr, n, k, k0 + lk, blockSize, kBlocks, rowBytes, zpStride, wv);
        __syncthreads();
#pragma unroll
        for (int i = 0; i < 8; ++i)
        {
            aTile[lk + i][lr] = av[i];
            wTile[lk + i][lr] = wv[i];
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < kTileK; ++kk)
        {
            float4 const ar = *reinterpret_cast<float4 const*>(&aTile[kk][ty * 4]);
            float4 const wr = *reinterpret_cast<float4 const*>(&wTile[kk][tx * 4]);
            float const as[4] = {ar.x, ar.y, ar.z, ar.w};
            float const ws[4] = {wr.x, wr.y, wr.z, wr.w};
#pragma unroll
            for (int i = 0; i < 4; ++i)
            {
#pragma unroll
                for (int j = 0; j < 4; ++j)
                {
                    acc[i][j] = fmaf(as[i], ws[j], acc[i][j]);
                }
            }
        }
    }
    storeTile(y, bias, row0, col0, ty, tx, m, n, acc);
}

template <typename T, int BITS, bool ASYM8>
__global__ void __launch_bounds__(kTileThreads) gemmTiledDp4a(int8_t const* __restrict__ qa,
    float const* __restrict__ qscale, uint8_t const* __restrict__ b, T const* __restrict__ scales,
    uint8_t const* __restrict__ zp, T const* __restrict__ bias, T* __restrict__ y, int64_t m, int n, int blockSize,
    int kBlocks)
{
    // A k step of 32 codes is 8 int8x4 words per row and column, and lies in one quantization block
    // (blockSize % 32 == 0), so each step ends with one float scaling of its integer dot products.
    __shared__ __align__(16) int aTile[8][kTileM];
    __shared__ __align__(16) int wTile[8][kTileN];
    __shared__ float aScale[kTileM];
    __shared__ float wScale[kTileN];
    __shared__ int wZero[kTileN]; // zero point - 128, INT8 weights with zero points only

    int const tid = threadIdx.x;
    int64_t const row0 = static_cast<int64_t>(blockIdx.y) * kTileM;
    int const col0 = blockIdx.x * kTileN;
    int const lr = tid % 64;
    int const lw = (tid / 64) * 2; // first of the two words this thread loads
    int const ty = tid / 16;
    int const tx = tid % 16;
    int const kPad = kBlocks * blockSize;
    int64_t const rowBytes = static_cast<int64_t>(kPad) * BITS / 8;
    int const zpStride = (kBlocks * BITS + 7) / 8;
    int64_t const loadRow = row0 + lr;
    int const loadCol = col0 + lr;

    float acc[4][4] = {};
    for (int k0 = 0; k0 < kPad; k0 += kTileK)
    {
        int const block = k0 / blockSize;
        int const kg = k0 + lw * 4;
        uint2 aw = make_uint2(0u, 0u);
        if (loadRow < m)
        {
            aw = __ldg(reinterpret_cast<uint2 const*>(qa + loadRow * kPad + kg));
        }
        uint32_t w0 = 0u;
        uint32_t w1 = 0u;
        int zero = 1 << (BITS - 1);
        if (loadCol < n)
        {
            zero = zeroPoint<BITS>(zp, loadCol, zpStride, block);
            uint8_t const* p = b + loadCol * rowBytes + kg * BITS / 8;
            if constexpr (BITS == 4)
            {
                uint32_t const word = __ldg(reinterpret_cast<uint32_t const*>(p));
                w0 = static_cast<uint32_t>(centreNibbles(word & 0x0F0F0F0Fu, zero));
                w1 = static_cast<uint32_t>(centreNibbles((word >> 4) & 0x0F0F0F0Fu, zero));
            }
            else
            {
                uint2 const raw = __ldg(reinterpret_cast<uint2 const*>(p));
                w0 = raw.x ^ 0x80808080u;
                w1 = raw.y ^ 0x80808080u;
            }
        }
        float scale = 0.f;
        if (tid < kTileM)
        {
            scale = row0 + tid < m ? qscale[(row0 + tid) * kBlocks + block] : 0.f;
        }
        else if (tid < kTileM + kTileN)
        {
            int const col = col0 + tid - kTileM;
            scale = col < n ? toFloat(scales[static_cast<int64_t>(col) * kBlocks + block]) : 0.f;
        }
        __syncthreads();
        aTile[lw][lr] = static_cast<int>(aw.x);
        aTile[lw + 1][lr] = static_cast<int>(aw.y);
        wTile[lw][lr] = static_cast<int>(w0);
        wTile[lw + 1][lr] = static_cast<int>(w1);
        if (tid < kTileM)
        {
            aScale[tid] = scale;
            wZero[lr] = zero - 128; // tid < 64: this thread loaded column lr == tid
        }
        else if (tid < kTileM + kTileN)
        {
            wScale[tid - kTileM] = scale;
        }
        __syncthreads();

        int dot[4][4] = {};
        int actSum[4] = {};
#pragma unroll
        for (int w = 0; w < 8; ++w)
        {
            int4 const ar = *reinterpret_cast<int4 const*>(&aTile[w][ty * 4]);
            int4 const wr = *reinterpret_cast<int4 const*>(&wTile[w][tx * 4]);
            int const as[4] = {ar.x, ar.y, ar.z, ar.w};
            int const ws[4] = {wr.x, wr.y, wr.z, wr.w};
#pragma unroll
            for (int i = 0; i < 4; ++i)
            {
#pragma unroll
                for (int j = 0; j < 4; ++j)
                {
                    dot[i][j] = dot4(as[i], ws[j], dot[i][j]);
                }
                if constexpr (ASYM8)
                {
                    actSum[i] = dot4(as[i], 0x01010101, actSum[i]);
                }
            }
        }
#pragma unroll
        for (int i = 0; i < 4; ++i)
        {
#pragma unroll
            for (int j = 0; j < 4; ++j)
            {
                int d = dot[i][j];
                if constexpr (ASYM8)
                {
                    d -= wZero[tx * 4 + j] * actSum[i];
                }
                acc[i][j] = fmaf(aScale[ty * 4 + i] * wScale[tx * 4 + j], static_cast<float>(d), acc[i][j]);
            }
        }
    }
    storeTile(y, bias, row0, col0, ty, tx, m, n, acc);
}

// ---------------------------------------------------------------------------------------------
// Quantized gather: one block per index, a thread per 32-bit word of the row.

template <typename T, int BITS, typename Index>
__global__ void __launch_bounds__(256) quantizedGather(uint8_t const* __restrict__ data,
    Index const* __restrict__ indices, T const* __restrict__ scales, uint8_t const* __restrict__ zp,
    T* __restrict__ y, int64_t rows, int kBlocks, int blockSize)
{
    constexpr int kCodesPerWord = 32 / BITS;
    int64_t const out = blockIdx.x;
    int64_t index = static_cast<int64_t>(indices[out]);
    index = index < 0 ? index + rows : index;
    bool const valid = index >= 0 && index < rows;
    int const width = kBlocks * blockSize;
    int64_t const rowBytes = static_cast<int64_t>(width) * BITS / 8;
    int const zpStride = (kBlocks * BITS + 7) / 8;
    T* dst = y + out * width;
    uint32_t const* src = reinterpret_cast<uint32_t const*>(data + (valid ? index : 0) * rowBytes);
    for (int w = threadIdx.x; w < rowBytes / 4; w += blockDim.x)
    {
        int const k0 = w * kCodesPerWord;
        float v[kCodesPerWord];
        if (valid)
        {
            int const block = k0 / blockSize;
            float const scale = toFloat(scales[index * kBlocks + block]);
            unpackWord<BITS>(__ldg(src + w), kMagic + static_cast<float>(zeroPoint<BITS>(zp, index, zpStride, block)), v);
#pragma unroll
            for (int i = 0; i < kCodesPerWord; ++i)
            {
                v[i] *= scale;
            }
        }
        else
        {
#pragma unroll
            for (int i = 0; i < kCodesPerWord; ++i)
            {
                v[i] = 0.f;
            }
        }
#pragma unroll
        for (int i = 0; i < kCodesPerWord; ++i)
        {
            dst[k0 + i] = fromFloat<T>(v[i]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Host side.

struct GemmArgs
{
    void const* a;
    uint8_t const* b;
    void const* scales;
    uint8_t const* zp;
    void const* bias;
    void* y;
    int64_t m;
    int n;
    int k;
    int blockSize;
    int kBlocks;
    int8_t* qa;     // dp4a only
    float* qscale;  // dp4a only
    cudaStream_t stream;
};

int64_t alignUp(int64_t v, int64_t to)
{
    return (v + to - 1) / to * to;
}

int64_t activationBytes(int64_t m, int kPad)
{
    return alignUp(m * kPad, 256);
}

bool isPowerOfTwo(int v)
{
    return v > 0 && (v & (v - 1)) == 0;
}

bool deviceIsPascalWithDp4a()
{
    int device = 0;
    int major = 0;
    int minor = 0;
    if (cudaGetDevice(&device) != cudaSuccess
        || cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess
        || cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess)
    {
        return false;
    }
    return major == 6 && minor >= 1; // SM 6.0 has no dp4a
}

bool takesDp4a(int blockSize, int flags)
{
    if (blockSize % kTileK != 0)
    {
        return false; // a dp4a k step must lie inside one block
    }
    if (flags & QWEN3VL_GEMM_FORCE_DP4A)
    {
        return true;
    }
    return (flags & QWEN3VL_GEMM_INT8_ACTIVATIONS) && deviceIsPascalWithDp4a();
}

bool takesGemv(int64_t m, int bits, int blockSize, int flags)
{
    // The GEMV reads B in 16-byte chunks that must not straddle blocks.
    return m <= 4 && !(flags & QWEN3VL_GEMM_FORCE_TILED) && (blockSize * bits / 8) % 16 == 0;
}

// Four columns per warp (A staged once for more columns, more loads in flight) for one or two
// rows, when that still leaves two blocks per SM; otherwise one column per warp, so that small
// layers fill a large GPU and three or four rows do not run out of registers.
int gemvColumnsPerWarp(int64_t m, int n)
{
    int device = 0;
    int sms = 1;
    if (cudaGetDevice(&device) != cudaSuccess
        || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
    {
        sms = 1;
    }
    return m <= 2 && (n + 4 * kGemvWarps - 1) / (4 * kGemvWarps) >= 2 * sms ? 4 : 1;
}

unsigned gemvBlocks(int n, int cols)
{
    return static_cast<unsigned>((n + kGemvWarps * cols - 1) / (kGemvWarps * cols));
}

template <typename T, int BITS, int M, int COLS>
void launchGemvExact(GemmArgs const& g)
{
    gemvExact<T, BITS, M, COLS><<<gemvBlocks(g.n, COLS), kGemvThreads, 0, g.stream>>>(static_cast<T const*>(g.a),
        g.b, static_cast<T const*>(g.scales), g.zp, static_cast<T const*>(g.bias), static_cast<T*>(g.y), g.n, g.k,
        g.blockSize, g.kBlocks);
}

template <typename T, int BITS, int M, int COLS, bool ASYM8>
void launchGemvDp4a(GemmArgs const& g)
{
    gemvDp4a<T, BITS, M, COLS, ASYM8><<<gemvBlocks(g.n, COLS), kGemvThreads, 0, g.stream>>>(g.qa, g.qscale, g.b,
        static_cast<T const*>(g.scales), g.zp, static_cast<T const*>(g.bias), static_cast<T*>(g.y), g.n, g.blockSize,
        g.kBlocks);
}

template <typename T, int BITS>
void gemvExactDispatch(GemmArgs const& g)
{
    if (gemvColumnsPerWarp(g.m, g.n) == 4)
    {
        g.m == 1 ? launchGemvExact<T, BITS, 1, 4>(g) : launchGemvExact<T, BITS, 2, 4>(g);
        return;
    }
    switch (g.m)
    {
    case 1: launchGemvExact<T, BITS, 1, 1>(g); break;
    case 2: launchGemvExact<T, BITS, 2, 1>(g); break;
    case 3: launchGemvExact<T, BITS, 3, 1>(g); break;
    default: launchGemvExact<T, BITS, 4, 1>(g); break;
    }
}

template <typename T, int BITS, bool ASYM8>
void gemvDp4aDispatch(GemmArgs const& g)
{
    if (gemvColumnsPerWarp(g.m, g.n) == 4)
    {
        g.m == 1 ? launchGemvDp4a<T, BITS, 1, 4, ASYM8>(g) : launchGemvDp4a<T, BITS, 2, 4, ASYM8>(g);
        return;
    }
    switch (g.m)
    {
    case 1: launchGemvDp4a<T, BITS, 1, 1, ASYM8>(g); break;
    case 2: launchGemvDp4a<T, BITS, 2, 1, ASYM8>(g); break;
    case 3: launchGemvDp4a<T, BITS, 3, 1, ASYM8>(g); break;
    default: launchGemvDp4a<T, BITS, 4, 1, ASYM8>(g); break;
    }
}

template <typename T, int BITS, bool ASYM8>
void dp4aDispatch(GemmArgs const& g, bool gemv, dim3 tiles)
{
    if (gemv)
    {
        gemvDp4aDispatch<T, BITS, ASYM8>(g);
        return;
    }
    gemmTiledDp4a<T, BITS, ASYM8><<<tiles, kTileThreads, 0, g.stream>>>(g.qa, g.qscale, g.b,
        static_cast<T const*>(g.scales), g.zp, static_cast<T const*>(g.bias), static_cast<T*>(g.y), g.m, g.n,
        g.blockSize, g.kBlocks);
}

template <typename T, int BITS>
cudaError_t run(GemmArgs const& g, bool gemv, bool dp4a)
{
    dim3 const tiles(
        static_cast<unsigned>((g.n + kTileN - 1) / kTileN), static_cast<unsigned>((g.m + kTileM - 1) / kTileM));
    if (!gemv && (g.m + kTileM - 1) / kTileM > 65535)
    {
        return cudaErrorInvalidValue; // more rows than one launch's grid covers (over 4 million)
    }
    if (dp4a)
    {
        int64_t const warps = g.m * g.kBlocks;
        quantizeActivations<T, BITS><<<static_cast<unsigned>((warps + 7) / 8), 256, 0, g.stream>>>(
            static_cast<T const*>(g.a), g.m, g.k, g.blockSize, g.kBlocks, g.qa, g.qscale);
        // Only INT8 weights with zero points need the activation-sum correction.
        if constexpr (BITS == 8)
        {
            if (g.zp != nullptr)
            {
                dp4aDispatch<T, BITS, true>(g, gemv, tiles);
                return cudaGetLastError();
            }
        }
        dp4aDispatch<T, BITS, false>(g, gemv, tiles);
    }
    else if (gemv)
    {
        gemvExactDispatch<T, BITS>(g);
    }
    else
    {
        bool const vectorA = g.k % 8 == 0 && isAligned(g.a, 16);
        gemmTiledExact<T, BITS><<<tiles, kTileThreads, 0, g.stream>>>(static_cast<T const*>(g.a), g.b,
            static_cast<T const*>(g.scales), g.zp, static_cast<T const*>(g.bias), static_cast<T*>(g.y), g.m, g.n, g.k,
            g.blockSize, g.kBlocks, vectorA);
    }
    return cudaGetLastError();
}

template <typename T, int BITS>
cudaError_t runGather(uint8_t const* data, void const* indices, int indexBits, int64_t count, void const* scales,
    uint8_t const* zp, void* y, int64_t rows, int kBlocks, int blockSize, cudaStream_t stream)
{
    unsigned const blocks = static_cast<unsigned>(count);
    if (indexBits == 64)
    {
        quantizedGather<T, BITS, int64_t><<<blocks, 256, 0, stream>>>(data, static_cast<int64_t const*>(indices),
            static_cast<T const*>(scales), zp, static_cast<T*>(y), rows, kBlocks, blockSize);
    }
    else
    {
        quantizedGather<T, BITS, int32_t><<<blocks, 256, 0, stream>>>(data, static_cast<int32_t const*>(indices),
            static_cast<T const*>(scales), zp, static_cast<T*>(y), rows, kBlocks, blockSize);
    }
    return cudaGetLastError();
}

} // namespace
} // namespace qwen3vl

extern "C" size_t qwen3vl_weight_only_gemm_workspace_size(int64_t m, int32_t k, int32_t block_size, int32_t flags)
{
    if (m <= 0 || k <= 0 || block_size <= 0
        || !(flags & (QWEN3VL_GEMM_INT8_ACTIVATIONS | QWEN3VL_GEMM_FORCE_DP4A)) || block_size % qwen3vl::kTileK != 0)
    {
        return 0;
    }
    int const kBlocks = (k + block_size - 1) / block_size;
    return static_cast<size_t>(qwen3vl::activationBytes(m, kBlocks * block_size) + m * kBlocks * 4);
}

extern "C" int32_t qwen3vl_weight_only_gemm_path(int64_t m, int32_t bits, int32_t block_size, int32_t flags)
{
    return (qwen3vl::takesGemv(m, bits, block_size, flags) ? QWEN3VL_GEMM_PATH_GEMV : 0)
        | (qwen3vl::takesDp4a(block_size, flags) ? QWEN3VL_GEMM_PATH_DP4A : 0);
}

extern "C" cudaError_t qwen3vl_weight_only_gemm(void const* a, uint8_t const* b, void const* scales,
    uint8_t const* zero_points, void const* bias, void* y, int64_t m, int32_t n, int32_t k, int32_t bits,
    int32_t block_size, qwen3vl_dtype dtype, int32_t flags, void* workspace, size_t workspace_size,
    cudaStream_t stream)
{
    using namespace qwen3vl;
    if (m < 0 || n <= 0 || k <= 0 || (bits != 4 && bits != 8) || block_size < 16 || !isPowerOfTwo(block_size)
        || a == nullptr || b == nullptr || scales == nullptr || y == nullptr)
    {
        return cudaErrorInvalidValue;
    }
    if (!isAligned(b, 16))
    {
        return cudaErrorMisalignedAddress;
    }
    if (m == 0)
    {
        return cudaSuccess;
    }
    int const kBlocks = (k + block_size - 1) / block_size;
    bool const gemv = takesGemv(m, bits, block_size, flags);
    bool const dp4a = takesDp4a(block_size, flags);
    GemmArgs g{a, b, scales, zero_points, bias, y, m, n, k, block_size, kBlocks, nullptr, nullptr, stream};
    if (dp4a)
    {
        if (workspace == nullptr || !isAligned(workspace, 256)
            || workspace_size < qwen3vl_weight_only_gemm_workspace_size(m, k, block_size, flags))
        {
            return cudaErrorInvalidValue;
        }
        g.qa = static_cast<int8_t*>(workspace);
        g.qscale = reinterpret_cast<float*>(static_cast<char*>(workspace) + activationBytes(m, kBlocks * block_size));
    }
    bool const half = dtype == QWEN3VL_FLOAT16;
    if (dtype != QWEN3VL_FLOAT32 && !half)
    {
        return cudaErrorInvalidValue;
    }
    if (bits == 4)
    {
        return half ? run<__half, 4>(g, gemv, dp4a) : run<float, 4>(g, gemv, dp4a);
    }
    return half ? run<__half, 8>(g, gemv, dp4a) : run<float, 8>(g, gemv, dp4a);
}

extern "C" cudaError_t qwen3vl_quantized_gather(uint8_t const* data, void const* indices, int32_t index_bits,
    int64_t count, void const* scales, uint8_t const* zero_points, void* y, int64_t rows, int32_t k_blocks,
    int32_t bits, int32_t block_size, qwen3vl_dtype dtype, cudaStream_t stream)
{
    using namespace qwen3vl;
    if (count < 0 || count > 0x7fffffff || rows <= 0 || k_blocks <= 0 || (bits != 4 && bits != 8)
        || block_size < 16 || !isPowerOfTwo(block_size) || (index_bits != 32 && index_bits != 64)
        || data == nullptr || indices == nullptr || scales == nullptr || y == nullptr)
    {
        return cudaErrorInvalidValue;
    }
    if (!isAligned(data, 4))
    {
        return cudaErrorMisalignedAddress;
    }
    if (count == 0)
    {
        return cudaSuccess;
    }
    bool const half = dtype == QWEN3VL_FLOAT16;
    if (dtype != QWEN3VL_FLOAT32 && !half)
    {
        return cudaErrorInvalidValue;
    }
    if (bits == 4)
    {
        return half ? runGather<__half, 4>(data, indices, index_bits, count, scales, zero_points, y, rows, k_blocks,
                          block_size, stream)
                    : runGather<float, 4>(data, indices, index_bits, count, scales, zero_points, y, rows, k_blocks,
                          block_size, stream);
    }
    return half ? runGather<__half, 8>(data, indices, index_bits, count, scales, zero_points, y, rows, k_blocks,
                      block_size, stream)
                : runGather<float, 8>(data, indices, index_bits, count, scales, zero_points, y, rows, k_blocks,
                      block_size, stream);
}
