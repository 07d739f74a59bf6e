// One tile of queries against a run of keys, shared by the decoder's prefill kernel and the vision
// kernel (vision_attention_kernel.cu includes this file). Keys and values pass through shared memory
// in tiles of BN rows, an online softmax keeps each query row's running max and sum, and no score
// matrix ever reaches global memory. Float32 math whatever the storage type (FP16 arithmetic on
// SM 6.1 runs at 1/64 rate). Static shared memory stays under 48 KiB, Pascal's per-block limit.
#pragma once

#include <math_constants.h>

#include "../common/device_utils.cuh"

namespace qwen3vl
{
namespace tile
{

// Scores are computed in base 2 (exp2f): queries come pre-multiplied by scale * log2(e).
constexpr float kLog2e = 1.4426950408889634f;
constexpr int kThreads = 128;

// Thread (ty, tx) owns 4 query rows (ty * 4 ..), the score columns tx, tx + TX, .. of a key tile
// and the output columns tx * 4 + {0, 4 * TX} (8 per row). The TX threads of a row are adjacent
// lanes, so row max and sum are xor shuffles. D=128 halves BM to stay within 48 KiB.
template <int D>
struct TileShape;
template <>
struct TileShape<64>
{
    static constexpr int kBM = 64;
    static constexpr int kBN = 32;
    static constexpr int kTX = 8;
};
template <>
struct TileShape<128>
{
    static constexpr int kBM = 32;
    static constexpr int kBN = 32;
    static constexpr int kTX = 16;
};

template <int D>
struct TileSmem
{
    // Row stride of query/key rows: float4-aligned, and consecutive rows start in different 16-byte
    // bank groups, so 8 lanes reading 8 rows' float4 at the same column do not conflict.
    static constexpr int kRowStride = D + 4;
    // Probability rows: ty steps 4 rows, 4 * 33 = 132 lands on another bank.
    static constexpr int kProbStride = TileShape<D>::kBN + 1;
    static constexpr int kFloats
        = (TileShape<D>::kBM + TileShape<D>::kBN) * kRowStride + TileShape<D>::kBM * kProbStride;
};

// A Problem describes one block's tile of queries:
//   int rows;                          queries in the tile (<= BM); rows beyond it are padding
//   int keyEnd;                        keys [0, keyEnd) are visited
//   C const* keys; C const* values;    key/value row j starts at keys + rowOffset(j)
//   int64_t rowOffset(int j) const;
//   bool keyOk(int j) const;           per key: padding slots, invalid positions
//   int lastKey(int r) const;          query r sees keys j <= lastKey(r) (causality); -1: none
//   void loadQuery(int r, float (&x)[D / 32], int lane) const;
//                                      called by a whole warp; lane holds elements lane + 32 * e,
//                                      already multiplied by scale * log2(e)
//   void store(int r, int d, float const (&o)[4]) const;   output row r, columns d .. d + 3
// Every thread of the block calls attend() (it synchronises).

template <int D, int BN, typename C, class Problem>
__device__ __forceinline__ void loadRows(float* dst, C const* base, Problem const& pb, int j0)
{
    constexpr int kVectors = D / 4;
    constexpr int kStride = TileSmem<D>::kRowStride;
    for (int idx = threadIdx.x; idx < BN * kVectors; idx += kThreads)
    {
        int const row = idx / kVectors;
        int const c4 = idx - row * kVectors;
        int const j = j0 + row;
        float v[4] = {0.f, 0.f, 0.f, 0.f}; // rows past the end are masked; zeros keep them finite
        if (j < pb.keyEnd)
        {
            loadVector<C, 4>(base + pb.rowOffset(j), c4, v);
        }
        *reinterpret_cast<float4*>(dst + row * kStride + c4 * 4) = make_float4(v[0], v[1], v[2], v[3]);
    }
}

template <int D, typename C, class Problem>
__device__ void attend(Problem const& pb, float* smem, int* keyFlags)
{
    constexpr int kBM = TileShape<D>::kBM;
    constexpr int kBN = TileShape<D>::kBN;
    constexpr int kTX = TileShape<D>::kTX;
    constexpr int kCols = kBN / kTX; // score columns per thread
    constexpr int kStride = TileSmem<D>::kRowStride;
    constexpr int kProbStride = TileSmem<D>::kProbStride;
    constexpr int kE = D / 32;
    static_assert(kBM / 4 * kTX == kThreads, "4 query rows per thread");
    static_assert(D == 8 * kTX, "8 output columns per thread");

    float* qs = smem;
    float* kv = qs + kBM * kStride; // the keys, then the values, of the current tile
    float* ps = kv + kBN * kStride;
    int const tid = threadIdx.x;
    int const lane = tid & 31;
    int const warp = tid >> 5;
    int const tx = tid % kTX;
    int const ty = tid / kTX;

    for (int r = warp; r < kBM; r += kThreads / 32)
    {
        float x[kE];
        if (r < pb.rows)
        {
            pb.loadQuery(r, x, lane);
        }
        else
        {
#pragma unroll
            for (int e = 0; e < kE; ++e)
            {
                x[e] = 0.f;
            }
        }
#pragma unroll
        for (int e = 0; e < kE; ++e)
        {
            qs[r * kStride + lane + 32 * e] = x[e];
        }
    }

    float m[4];
    float l[4];
    float acc[4][8];
    int last[4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
    {
        m[i] = -CUDART_INF_F;
        l[i] = 0.f;
        last[i] = ty * 4 + i < pb.rows ? pb.lastKey(ty * 4 + i) : -1;
#pragma unroll
        for (int c = 0; c < 8; ++c)
        {
            acc[i][c] = 0.f;
        }
    }

    for (int j0 = 0; j0 < pb.keyEnd; j0 += kBN)
    {
        __syncthreads(); // queries stored; the previous tile's values and probabilities consumed
        loadRows<D, kBN>(kv, pb.keys, pb, j0);
        if (tid < kBN)
        {
            keyFlags[tid] = j0 + tid < pb.keyEnd && pb.keyOk(j0 + tid);
        }
        __syncthreads();

        float s[4][kCols];
#pragma unroll
        for (int i = 0; i < 4; ++i)
        {
#pragma unroll
            for (int j = 0; j < kCols; ++j)
            {
                s[i][j] = 0.f;
            }
        }
#pragma unroll 4
        for (int d = 0; d < D; d += 4)
        {
            float4 a[4];
            float4 b[kCols];
#pragma unroll
            for (int i = 0; i < 4; ++i)
            {
                a[i] = *reinterpret_cast<float4 const*>(qs + (ty * 4 + i) * kStride + d);
            }
#pragma unroll
            for (int j = 0; j < kCols; ++j)
            {
                b[j] = *reinterpret_cast<float4 const*>(kv + (tx + kTX * j) * kStride + d);
            }
#pragma unroll
            for (int i = 0; i < 4; ++i)
            {
#pragma unroll
                for (int j = 0; j < kCols; ++j)
                {
                    float const sum = fmaf(a[i].y, b[j].y, fmaf(a[i].x, b[j].x, s[i][j]));
                    s[i][j] = fmaf(a[i].w, b[j].w, fmaf(a[i].z, b[j].z, sum));
                }
            }
        }

#pragma unroll
        for (int i = 0; i < 4; ++i)
        {
            float tileMax = -CUDART_INF_F;
#pragma unroll
            for (int j = 0; j < kCols; ++j)
            {
                int const c = tx + kTX * j;
                if (!keyFlags[c] || j0 + c > last[i])
                {
                    s[i][j] = -CUDART_INF_F;
                }
                tileMax = fmaxf(tileMax, s[i][j]);
            }
#pragma unroll
            for (int offset = kTX / 2; offset > 0; offset >>= 1)
            {
                tileMax = fmaxf(tileMax, __shfl_xor_sync(0xffffffffu, tileMax, offset));
            }
            float const mNew = fmaxf(m[i], tileMax);
            // A row that has seen no visible key keeps m = -inf: exp2(-inf - -inf) would be NaN.
            bool const none = mNew == -CUDART_INF_F;
            float const corr = none ? 1.f : exp2f(m[i] - mNew);
            float rowSum = 0.f;
#pragma unroll
            for (int j = 0; j < kCols; ++j)
            {
                float const p = none ? 0.f : exp2f(s[i][j] - mNew);
                rowSum += p;
                ps[(ty * 4 + i) * kProbStride + tx + kTX * j] = p;
            }
            // Each thread keeps its share of the row sum (the whole row shares m); summed at the end.
            l[i] = l[i] * corr + rowSum;
            m[i] = mNew;
#pragma unroll
            for (int c = 0; c < 8; ++c)
            {
                acc[i][c] *= corr;
            }
        }
        __syncthreads(); // every score has read the keys before the values replace them
        loadRows<D, kBN>(kv, pb.values, pb, j0);
        __syncthreads();

#pragma unroll 4
        for (int c = 0; c < kBN; ++c)
        {
            float p[4];
#pragma unroll
            for (int i = 0; i < 4; ++i)
            {
                p[i] = ps[(ty * 4 + i) * kProbStride + c];
            }
#pragma unroll
            for (int seg = 0; seg < 2; ++seg)
            {
                float4 const v = *reinterpret_cast<float4 const*>(kv + c * kStride + tx * 4 + seg * kTX * 4);
#pragma unroll
                for (int i = 0; i < 4; ++i)
                {
                    acc[i][seg * 4 + 0] = fmaf(p[i], v.x, acc[i][seg * 4 + 0]);
                    acc[i][seg * 4 + 1] = fmaf(p[i], v.y, acc[i][seg * 4 + 1]);
                    acc[i][seg * 4 + 2] = fmaf(p[i], v.z, acc[i][seg * 4 + 2]);
                    acc[i][seg * 4 + 3] = fmaf(p[i], v.w, acc[i][seg * 4 + 3]);
                }
            }
        }
    }

#pragma unroll
    for (int i = 0; i < 4; ++i)
    {
        float sum = l[i];
#pragma unroll
        for (int offset = kTX / 2; offset > 0; offset >>= 1)
        {
            sum += __shfl_xor_sync(0xffffffffu, sum, offset);
        }
        float const inv = sum > 0.f ? 1.f / sum : 0.f; // a row that saw no key writes zeros
        int const r = ty * 4 + i;
        if (r < pb.rows)
        {
#pragma unroll
            for (int seg = 0; seg < 2; ++seg)
            {
                float const o[4] = {acc[i][seg * 4] * inv, acc[i][seg * 4 + 1] * inv, acc[i][seg * 4 + 2] * inv,
                    acc[i][seg * 4 + 3] * inv};
                pb.store(r, tx * 4 + seg * kTX * 4, o);
            }
        }
    }
}

} // namespace tile
} // namespace qwen3vl
