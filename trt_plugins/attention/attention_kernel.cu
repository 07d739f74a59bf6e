// Qwen3VLAttention: q/k RMSNorm + M-RoPE rotary, the KV-buffer write and grouped-query causal
// attention over the buffer (contract: trt_plugins/attention/README.md).
//
// Three launches per call:
//  1. writeKv: one block per new token normalises and rotates its keys and writes keys and values
//     into the buffer at their positions (storage rounding happens here, once).
//  2a. S > 1, prefill: one block per (query tile, head, row) runs attention_tile.cuh over the
//     buffer; the queries are normalised and rotated as the tile loads them.
//  2b. S == 1, decode: split-K. Each (row, kv head) gets `splits` blocks, each streaming a chunk of
//     the keys with 16-byte loads and an online softmax per lane group, for all the query heads of
//     the group at once (the keys are read once per kv head, not once per query head). Chunk
//     partials (max, sum, unnormalised output) go to the workspace and a combine kernel merges them,
//     so one long context spreads over the whole GPU.
// Float32 math everywhere (FP16 is storage only: 1/64-rate arithmetic on SM 6.1). Positions and
// validity come from seqlens_k / total_sequence_length on the device: no host synchronisation.
#include "attention_kernel.h"

#include "attention_tile.cuh"

namespace qwen3vl
{
namespace
{

constexpr int kThreads = 128;
constexpr int kChunkAlign = 64; // decode chunks are multiples of this many keys

// Per-head RMSNorm then rotate-half rotary, on one head vector spread over a warp: lane holds the
// elements lane + 32 * e. The rotate-half partner of element e is e +- D/64 in the same lane.
template <int D, typename T>
__device__ __forceinline__ void normRope(float (&x)[D / 32], T const* __restrict__ weight, T const* __restrict__ cosRow,
    T const* __restrict__ sinRow, float epsilon, int lane)
{
    constexpr int kE = D / 32;
    constexpr int kHalf = kE / 2;
    float squares = 0.f;
#pragma unroll
    for (int e = 0; e < kE; ++e)
    {
        squares = fmaf(x[e], x[e], squares);
    }
    // As the reference: mean in float32, then 1 / sqrt.
    float const invRms = 1.f / sqrtf(warpSum(squares) / static_cast<float>(D) + epsilon);
    float n[kE];
#pragma unroll
    for (int e = 0; e < kE; ++e)
    {
        n[e] = x[e] * invRms * toFloat(weight[lane + 32 * e]);
    }
#pragma unroll
    for (int e = 0; e < kE; ++e)
    {
        float const rotated = e < kHalf ? -n[e + kHalf] : n[e - kHalf];
        int const i = lane + 32 * e;
        x[e] = n[e] * toFloat(cosRow[i]) + rotated * toFloat(sinRow[i]);
    }
}

// Keys of a row after this step, seqlens_k + 1, clamped so that no position arithmetic overflows
// (TensorRT's timing runs pass arbitrary values).
__device__ __forceinline__ int validKeys(int32_t seqlen)
{
    return seqlen < 0 ? 0 : (seqlen == INT32_MAX ? INT32_MAX : seqlen + 1);
}

// Where a row's new tokens go: position of token s = start + s.
__device__ __forceinline__ int rowStart(int valid, bool prompt, int seqLen)
{
    return prompt ? 0 : valid - seqLen;
}

template <int D, typename T, typename C>
__global__ void __launch_bounds__(kThreads) writeKvKernel(T const* __restrict__ k, T const* __restrict__ v,
    T const* __restrict__ kNormWeight, T const* __restrict__ cos, T const* __restrict__ sin,
    int32_t const* __restrict__ seqlensK, int32_t const* __restrict__ totalLength, C* __restrict__ presentKey,
    C* __restrict__ presentValue, int seqLen, int kvHeads, int capacity, float epsilon)
{
    constexpr int kE = D / 32;
    int const token = blockIdx.x; // b * S + s
    int const b = token / seqLen;
    int const s = token - b * seqLen;
    int const valid = validKeys(seqlensK[b]);
    int const p = rowStart(valid, *totalLength == seqLen, seqLen) + s;
    if (p < 0 || p >= capacity)
    {
        return; // positions past the buffer are dropped
    }
    int const lane = threadIdx.x & 31;
    for (int hv = threadIdx.x >> 5; hv < 2 * kvHeads; hv += kThreads / 32)
    {
        bool const isKey = hv < kvHeads;
        int const h = isKey ? hv : hv - kvHeads;
        T const* src = (isKey ? k : v) + (static_cast<int64_t>(token) * kvHeads + h) * D;
        float x[kE];
#pragma unroll
        for (int e = 0; e < kE; ++e)
        {
            x[e] = toFloat(src[lane + 32 * e]);
        }
        if (isKey)
        {
            normRope<D>(x, kNormWeight, cos + static_cast<int64_t>(token) * D, sin + static_cast<int64_t>(token) * D,
                epsilon, lane);
        }
        C* dst = (isKey ? presentKey : presentValue) + ((static_cast<int64_t>(b) * kvHeads + h) * capacity + p) * D;
#pragma unroll
        for (int e = 0; e < kE; ++e)
        {
            dst[lane + 32 * e] = fromFloat<C>(x[e]);
        }
    }
}

// ---- prefill ------------------------------------------------------------------------------------

template <int D, typename T, typename C>
struct PrefillProblem
{
    int rows;
    int keyEnd;
    C const* keys; // this (row, kv head)'s buffer, position 0
    C const* values;
    T const* q;    // query row 0 of the tile, this head
    T const* weight;
    T const* cosRow; // (b, first query of the tile)
    T const* sinRow;
    T* out;
    int64_t tokenStride; // H * D
    int pos0;            // position of the tile's first query
    float epsilon;
    float qScale;

    __device__ int64_t rowOffset(int j) const
    {
        return static_cast<int64_t>(j) * D;
    }
    __device__ bool keyOk(int) const
    {
        return true; // keyEnd already stops at the row's valid keys
    }
    __device__ int lastKey(int r) const
    {
        return pos0 + r;
    }
    __device__ void loadQuery(int r, float (&x)[D / 32], int lane) const
    {
        T const* row = q + r * tokenStride;
#pragma unroll
        for (int e = 0; e < D / 32; ++e)
        {
            x[e] = toFloat(row[lane + 32 * e]);
        }
        normRope<D>(x, weight, cosRow + static_cast<int64_t>(r) * D, sinRow + static_cast<int64_t>(r) * D, epsilon,
            lane);
#pragma unroll
        for (int e = 0; e < D / 32; ++e)
        {
            x[e] *= qScale;
        }
    }
    __device__ void store(int r, int d, float const (&o)[4]) const
    {
        storeVector<T, 4>(out + r * tokenStride + d, 0, o);
    }
};

template <int D, typename T, typename C>
__global__ void __launch_bounds__(tile::kThreads) prefillKernel(T const* __restrict__ q,
    T const* __restrict__ qNormWeight, T const* __restrict__ cos, T const* __restrict__ sin,
    C const* __restrict__ keys, C const* __restrict__ values, int32_t const* __restrict__ seqlensK,
    int32_t const* __restrict__ totalLength, T* __restrict__ out, int seqLen, int heads, int kvHeads, int capacity,
    float epsilon, float qScale)
{
    constexpr int kBM = tile::TileShape<D>::kBM;
    __shared__ __align__(16) float smem[tile::TileSmem<D>::kFloats];
    __shared__ int keyFlags[tile::TileShape<D>::kBN];

    int const b = blockIdx.z;
    int const h = blockIdx.y;
    int const q0 = blockIdx.x * kBM;
    int const valid = validKeys(seqlensK[b]);
    int const start = rowStart(valid, *totalLength == seqLen, seqLen);
    int const kvValid = min(valid, capacity);
    int const kvh = h / (heads / kvHeads);
    int64_t const firstToken = static_cast<int64_t>(b) * seqLen + q0;

    PrefillProblem<D, T, C> pb;
    pb.rows = min(kBM, seqLen - q0);
    pb.pos0 = start + q0;
    pb.keyEnd = max(0, min(kvValid, pb.pos0 + pb.rows)); // the tile's last query sees keys < pos0 + rows
    int64_t const cacheBase = (static_cast<int64_t>(b) * kvHeads + kvh) * capacity * D;
    pb.keys = keys + cacheBase;
    pb.values = values + cacheBase;
    pb.tokenStride = static_cast<int64_t>(heads) * D;
    pb.q = q + firstToken * pb.tokenStride + static_cast<int64_t>(h) * D;
    pb.out = out + firstToken * pb.tokenStride + static_cast<int64_t>(h) * D;
    pb.weight = qNormWeight;
    pb.cosRow = cos + firstToken * D;
    pb.sinRow = sin + firstToken * D;
    pb.epsilon = epsilon;
    pb.qScale = qScale;
    tile::attend<D, C>(pb, smem, keyFlags);
}

// ---- decode -------------------------------------------------------------------------------------

// The keys a decode query sees (n) and the chunk length per split, identical in both kernels.
__device__ __forceinline__ void decodeSpan(int seqlen, int total, int capacity, int splits, int& n, int& chunk)
{
    int const valid = validKeys(seqlen);
    int const p = rowStart(valid, total == 1, 1); // the query's own position
    n = max(0, min(min(valid, p + 1), capacity));
    chunk = (n + splits - 1) / splits;
    chunk = (chunk + kChunkAlign - 1) / kChunkAlign * kChunkAlign;
}

// Online-softmax state merge: (m, l, acc) absorbs (om, ol, oacc); an empty state has m = -inf.
template <int N>
__device__ __forceinline__ void mergeState(
    float& m, float& l, float (&acc)[N], float om, float ol, float const (&oacc)[N])
{
    float const mNew = fmaxf(m, om);
    if (mNew == -CUDART_INF_F)
    {
        return;
    }
    float const a = exp2f(m - mNew);
    float const c = exp2f(om - mNew);
    l = l * a + ol * c;
#pragma unroll
    for (int i = 0; i < N; ++i)
    {
        acc[i] = acc[i] * a + oacc[i] * c;
    }
    m = mNew;
}

// Grid (splits, kvHeads * subgroups, B); G query heads of one kv head per block. A group of
// kLanes lanes reads one key row (16 bytes per lane); each group keeps its own softmax state over
// the keys it visits, merged across groups, warps and finally chunks.
template <int D, typename T, typename C, int G>
__global__ void __launch_bounds__(kThreads) decodeKernel(T const* __restrict__ q, T const* __restrict__ qNormWeight,
    T const* __restrict__ cos, T const* __restrict__ sin, C const* __restrict__ keys, C const* __restrict__ values,
    int32_t const* __restrict__ seqlensK, int32_t const* __restrict__ totalLength, T* __restrict__ out,
    float* __restrict__ partialMl, float* __restrict__ partialAcc, int heads, int kvHeads, int capacity,
    int subgroups, int splits, float epsilon, float qScale)
{
    constexpr int kE = D / 32;
    constexpr int kPerLane = 16 / static_cast<int>(sizeof(C)); // one 16-byte load
    constexpr int kLanes = D / kPerLane;                        // lanes per key row
    constexpr int kGroupsPerWarp = 32 / kLanes;
    constexpr int kGroups = kThreads / 32 * kGroupsPerWarp;
    // Keys in flight per group; fewer where the per-head registers are many.
    constexpr int kUnroll = G * kPerLane >= 32 ? 2 : 4;
    constexpr int kWarps = kThreads / 32;

    __shared__ __align__(16) float qs[G * D];
    __shared__ float warpM[kWarps][G];
    __shared__ float warpL[kWarps][G];
    __shared__ __align__(16) float warpAcc[kWarps][G * D];

    int const b = blockIdx.z;
    int const kvh = blockIdx.y / subgroups;
    int const h0 = kvh * (heads / kvHeads) + (blockIdx.y - kvh * subgroups) * G;
    int const split = blockIdx.x;
    int n;
    int chunk;
    decodeSpan(seqlensK[b], *totalLength, capacity, splits, n, chunk);
    int const c0 = split * chunk;
    int const c1 = min(c0 + chunk, n);
    if (splits > 1 && c0 >= n)
    {
        return; // an unused chunk: the combine kernel reads only the used ones
    }

    int const tid = threadIdx.x;
    int const lane = tid & 31;
    int const warp = tid >> 5;
    for (int g = warp; g < G; g += kWarps)
    {
        T const* row = q + (static_cast<int64_t>(b) * heads + h0 + g) * D;
        float x[kE];
#pragma unroll
        for (int e = 0; e < kE; ++e)
        {
            x[e] = toFloat(row[lane + 32 * e]);
        }
        normRope<D>(
            x, qNormWeight, cos + static_cast<int64_t>(b) * D, sin + static_cast<int64_t>(b) * D, epsilon, lane);
#pragma unroll
        for (int e = 0; e < kE; ++e)
        {
            qs[g * D + lane + 32 * e] = x[e] * qScale;
        }
    }
    __syncthreads();

    int const group = warp * kGroupsPerWarp + lane / kLanes;
    int const d0 = (lane % kLanes) * kPerLane;
    float qr[G][kPerLane];
#pragma unroll
    for (int g = 0; g < G; ++g)
    {
#pragma unroll
        for (int e = 0; e < kPerLane; ++e)
        {
            qr[g][e] = qs[g * D + d0 + e];
        }
    }
    int64_t const cacheBase = (static_cast<int64_t>(b) * kvHeads + kvh) * capacity * D + d0;
    C const* keyBase = keys + cacheBase;
    C const* valueBase = values + cacheBase;

    float m[G];
    float l[G];
    float acc[G][kPerLane];
#pragma unroll
    for (int g = 0; g < G; ++g)
    {
        m[g] = -CUDART_INF_F;
        l[g] = 0.f;
#pragma unroll
        for (int e = 0; e < kPerLane; ++e)
        {
            acc[g][e] = 0.f;
        }
    }

    // The loop bound is block-uniform so that every lane reaches the shuffles; keys past the chunk
    // are masked per group. Slab u of an iteration covers kGroups consecutive keys, so a warp reads
    // kGroupsPerWarp consecutive rows per load: contiguous memory.
    for (int base = c0; base < c1; base += kGroups * kUnroll)
    {
        float kf[kUnroll][kPerLane];
        float vf[kUnroll][kPerLane];
        bool ok[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
        {
            int const j = base + u * kGroups + group;
            ok[u] = j < c1;
            if (ok[u])
            {
                loadVector<C, kPerLane>(keyBase + static_cast<int64_t>(j) * D, 0, kf[u]);
                loadVector<C, kPerLane>(valueBase + static_cast<int64_t>(j) * D, 0, vf[u]);
            }
            else
            {
#pragma unroll
                for (int e = 0; e < kPerLane; ++e)
                {
                    kf[u][e] = 0.f;
                    vf[u][e] = 0.f;
                }
            }
        }
        float s[kUnroll][G];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
        {
#pragma unroll
            for (int g = 0; g < G; ++g)
            {
                float dot = 0.f;
#pragma unroll
                for (int e = 0; e < kPerLane; ++e)
                {
                    dot = fmaf(qr[g][e], kf[u][e], dot);
                }
#pragma unroll
                for (int offset = kLanes / 2; offset > 0; offset >>= 1)
                {
                    dot += __shfl_xor_sync(0xffffffffu, dot, offset);
                }
                s[u][g] = dot;
            }
        }
#pragma unroll
        for (int g = 0; g < G; ++g)
        {
            float tileMax = -CUDART_INF_F;
#pragma unroll
            for (int u = 0; u < kUnroll; ++u)
            {
                tileMax = ok[u] ? fmaxf(tileMax, s[u][g]) : tileMax;
            }
            if (tileMax == -CUDART_INF_F)
            {
                continue; // no key for this group in this iteration
            }
            float const mNew = fmaxf(m[g], tileMax);
            float const corr = exp2f(m[g] - mNew);
            l[g] *= corr;
#pragma unroll
            for (int e = 0; e < kPerLane; ++e)
            {
                acc[g][e] *= corr;
            }
#pragma unroll
            for (int u = 0; u < kUnroll; ++u)
            {
                float const p = ok[u] ? exp2f(s[u][g] - mNew) : 0.f;
                l[g] += p;
#pragma unroll
                for (int e = 0; e < kPerLane; ++e)
                {
                    acc[g][e] = fmaf(p, vf[u][e], acc[g][e]);
                }
            }
            m[g] = mNew;
        }
    }

    // Merge the groups of a warp (lanes kLanes apart hold the same columns), then the warps.
#pragma unroll
    for (int offset = kLanes; offset < 32; offset <<= 1)
    {
#pragma unroll
        for (int g = 0; g < G; ++g)
        {
            float const om = __shfl_xor_sync(0xffffffffu, m[g], offset);
            float const ol = __shfl_xor_sync(0xffffffffu, l[g], offset);
            float oacc[kPerLane];
#pragma unroll
            for (int e = 0; e < kPerLane; ++e)
            {
                oacc[e] = __shfl_xor_sync(0xffffffffu, acc[g][e], offset);
            }
            mergeState(m[g], l[g], acc[g], om, ol, oacc);
        }
    }
    if (lane < kLanes)
    {
#pragma unroll
        for (int g = 0; g < G; ++g)
        {
#pragma unroll
            for (int e = 0; e < kPerLane; ++e)
            {
                warpAcc[warp][g * D + d0 + e] = acc[g][e];
            }
            if (lane == 0)
            {
                warpM[warp][g] = m[g];
                warpL[warp][g] = l[g];
            }
        }
    }
    __syncthreads();

    for (int idx = tid; idx < G * D; idx += kThreads)
    {
        int const g = idx / D;
        int const d = idx - g * D;
        float mMax = -CUDART_INF_F;
#pragma unroll
        for (int w = 0; w < kWarps; ++w)
        {
            mMax = fmaxf(mMax, warpM[w][g]);
        }
        float sum = 0.f;
        float o = 0.f;
        if (mMax != -CUDART_INF_F)
        {
#pragma unroll
            for (int w = 0; w < kWarps; ++w)
            {
                float const scale = exp2f(warpM[w][g] - mMax);
                sum = fmaf(warpL[w][g], scale, sum);
                o = fmaf(warpAcc[w][idx], scale, o);
            }
        }
        int64_t const head = static_cast<int64_t>(b) * heads + h0 + g;
        if (splits == 1)
        {
            out[head * D + d] = fromFloat<T>(sum > 0.f ? o / sum : 0.f);
        }
        else
        {
            int64_t const slot = head * splits + split;
            partialAcc[slot * D + d] = o;
            if (d == 0)
            {
                partialMl[2 * slot] = mMax;
                partialMl[2 * slot + 1] = sum;
            }
        }
    }
}

// One block per (row, head), one thread per column: out = sum_c w_c acc_c / sum_c w_c l_c with
// w_c = exp2(m_c - max m).
template <typename T>
__global__ void combineKernel(float const* __restrict__ partialMl, float const* __restrict__ partialAcc,
    int32_t const* __restrict__ seqlensK, int32_t const* __restrict__ totalLength, T* __restrict__ out, int heads,
    int headDim, int capacity, int splits)
{
    int const head = blockIdx.x; // b * H + h
    int const b = head / heads;
    int const d = threadIdx.x;
    int n;
    int chunk;
    decodeSpan(seqlensK[b], *totalLength, capacity, splits, n, chunk);
    int const used = chunk > 0 ? (n + chunk - 1) / chunk : 0;
    int64_t const slot0 = static_cast<int64_t>(head) * splits;
    float mMax = -CUDART_INF_F;
    for (int c = 0; c < used; ++c)
    {
        mMax = fmaxf(mMax, partialMl[2 * (slot0 + c)]);
    }
    float sum = 0.f;
    float o = 0.f;
    if (mMax != -CUDART_INF_F)
    {
        for (int c = 0; c < used; ++c)
        {
            float const scale = exp2f(partialMl[2 * (slot0 + c)] - mMax);
            sum = fmaf(partialMl[2 * (slot0 + c) + 1], scale, sum);
            o = fmaf(partialAcc[(slot0 + c) * headDim + d], scale, o);
        }
    }
    out[static_cast<int64_t>(head) * headDim + d] = fromFloat<T>(sum > 0.f ? o / sum : 0.f);
}

// ---- host ---------------------------------------------------------------------------------------

struct Args
{
    void const* q;
    void const* k;
    void const* v;
    void const* qNormWeight;
    void const* kNormWeight;
    void const* cos;
    void const* sin;
    int32_t const* seqlensK;
    int32_t const* totalLength;
    void* out;
    void* presentKey;
    void* presentValue;
    int batch;
    int seqLen;
    int heads;
    int kvHeads;
    int capacity;
    float scale;
    float epsilon;
    int splits;
    float* workspace;
};

template <int D, typename T, typename C, int G>
cudaError_t launchDecode(Args const& a, cudaStream_t stream)
{
    int const subgroups = a.heads / a.kvHeads / G;
    dim3 const grid(a.splits, a.kvHeads * subgroups, a.batch);
    float* partialMl = a.workspace;
    float* partialAcc
        = a.workspace == nullptr ? nullptr : a.workspace + static_cast<int64_t>(a.batch) * a.heads * a.splits * 2;
    decodeKernel<D, T, C, G><<<grid, kThreads, 0, stream>>>(static_cast<T const*>(a.q),
        static_cast<T const*>(a.qNormWeight),
        static_cast<T const*>(a.cos), static_cast<T const*>(a.sin), static_cast<C const*>(a.presentKey),
        static_cast<C const*>(a.presentValue), a.seqlensK, a.totalLength, static_cast<T*>(a.out), partialMl,
        partialAcc, a.heads, a.kvHeads, a.capacity, subgroups, a.splits, a.epsilon, a.scale * tile::kLog2e);
    if (a.splits > 1)
    {
        combineKernel<T><<<a.batch * a.heads, D, 0, stream>>>(partialMl, partialAcc, a.seqlensK, a.totalLength,
            static_cast<T*>(a.out), a.heads, D, a.capacity, a.splits);
    }
    return cudaGetLastError();
}

template <int D, typename T, typename C>
cudaError_t launchTyped(Args const& a, cudaStream_t stream)
{
    writeKvKernel<D, T, C><<<a.batch * a.seqLen, kThreads, 0, stream>>>(static_cast<T const*>(a.k),
        static_cast<T const*>(a.v), static_cast<T const*>(a.kNormWeight), static_cast<T const*>(a.cos),
        static_cast<T const*>(a.sin), a.seqlensK, a.totalLength, static_cast<C*>(a.presentKey),
        static_cast<C*>(a.presentValue), a.seqLen, a.kvHeads, a.capacity, a.epsilon);
    cudaError_t status = cudaGetLastError();
    if (status != cudaSuccess)
    {
        return status;
    }
    if (a.seqLen > 1)
    {
        constexpr int kBM = tile::TileShape<D>::kBM;
        dim3 const grid((a.seqLen + kBM - 1) / kBM, a.heads, a.batch);
        prefillKernel<D, T, C><<<grid, tile::kThreads, 0, stream>>>(static_cast<T const*>(a.q),
            static_cast<T const*>(a.qNormWeight), static_cast<T const*>(a.cos), static_cast<T const*>(a.sin),
            static_cast<C const*>(a.presentKey), static_cast<C const*>(a.presentValue), a.seqlensK, a.totalLength,
            static_cast<T*>(a.out), a.seqLen, a.heads, a.kvHeads, a.capacity, a.epsilon, a.scale * tile::kLog2e);
        return cudaGetLastError();
    }
    // Query heads per block: the largest of 8/4/2/1 dividing the group, so any GQA ratio runs
    // (ratios that are not powers of two re-read the keys once per subgroup).
    int const group = a.heads / a.kvHeads;
    switch (group % 8 == 0 ? 8 : group % 4 == 0 ? 4 : group % 2 == 0 ? 2 : 1)
    {
    case 8: return launchDecode<D, T, C, 8>(a, stream);
    case 4: return launchDecode<D, T, C, 4>(a, stream);
    case 2: return launchDecode<D, T, C, 2>(a, stream);
    default: return launchDecode<D, T, C, 1>(a, stream);
    }
}

template <typename T, typename C>
cudaError_t dispatchHeadDim(Args const& a, int headDim, cudaStream_t stream)
{
    switch (headDim)
    {
    case 64: return launchTyped<64, T, C>(a, stream);
    case 128: return launchTyped<128, T, C>(a, stream);
    }
    return cudaErrorInvalidValue;
}

size_t elementSize(qwen3vl_dtype t)
{
    return t == QWEN3VL_FLOAT16 ? 2 : 4;
}

bool validType(qwen3vl_dtype t)
{
    return t == QWEN3VL_FLOAT32 || t == QWEN3VL_FLOAT16;
}

int64_t splitBytes(int batch, int heads, int headDim)
{
    return static_cast<int64_t>(batch) * heads * (headDim + 2) * static_cast<int64_t>(sizeof(float));
}

} // namespace
} // namespace qwen3vl

extern "C" size_t qwen3vl_attention_workspace_size(int32_t batch, int32_t num_heads, int32_t head_dim)
{
    if (batch <= 0 || num_heads <= 0 || head_dim <= 0)
    {
        return 0;
    }
    return static_cast<size_t>(qwen3vl::splitBytes(batch, num_heads, head_dim)) * QWEN3VL_ATTENTION_MAX_SPLITS;
}

extern "C" int32_t qwen3vl_attention_decode_splits(int32_t batch, int32_t kv_num_heads, int32_t capacity)
{
    int device = 0;
    int sms = 1;
    if (cudaGetDevice(&device) != cudaSuccess
        || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
    {
        sms = 1;
    }
    int64_t const blocks = static_cast<int64_t>(batch > 0 ? batch : 1) * (kv_num_heads > 0 ? kv_num_heads : 1);
    // About four blocks per SM: each streams 16 bytes per lane per key in flight, so a few blocks
    // per SM cover the memory latency.
    int64_t splits = (4 * static_cast<int64_t>(sms) + blocks - 1) / blocks;
    int64_t const byCapacity = (static_cast<int64_t>(capacity) + qwen3vl::kChunkAlign - 1) / qwen3vl::kChunkAlign;
    splits = splits < byCapacity ? splits : byCapacity;
    splits = splits > QWEN3VL_ATTENTION_MAX_SPLITS ? QWEN3VL_ATTENTION_MAX_SPLITS : splits;
    return static_cast<int32_t>(splits < 1 ? 1 : splits);
}

extern "C" cudaError_t qwen3vl_attention(void const* q, void const* k, void const* v, void const* q_norm_weight,
    void const* k_norm_weight, void const* cos, void const* sin, void const* past_key, void const* past_value,
    int32_t const* seqlens_k, int32_t const* total_sequence_length, void* output, void* present_key,
    void* present_value, int32_t batch, int32_t seq_len, int32_t num_heads, int32_t kv_num_heads, int32_t head_dim,
    int32_t capacity, float scale, float epsilon, qwen3vl_dtype dtype, qwen3vl_dtype cache_dtype,
    int32_t decode_splits, void* workspace, size_t workspace_size, cudaStream_t stream)
{
    using namespace qwen3vl;
    if (batch < 0 || seq_len < 0 || num_heads <= 0 || kv_num_heads <= 0 || num_heads % kv_num_heads != 0
        || capacity <= 0 || (head_dim != 64 && head_dim != 128) || !validType(dtype) || !validType(cache_dtype)
        || batch > 65535 || static_cast<int64_t>(batch) * seq_len > 0x7fffffff)
    {
        return cudaErrorInvalidValue;
    }
    if (batch == 0 || seq_len == 0)
    {
        return cudaSuccess;
    }
    if (q == nullptr || k == nullptr || v == nullptr || q_norm_weight == nullptr || k_norm_weight == nullptr
        || cos == nullptr || sin == nullptr || past_key == nullptr || past_value == nullptr || seqlens_k == nullptr
        || total_sequence_length == nullptr || output == nullptr || present_key == nullptr || present_value == nullptr)
    {
        return cudaErrorInvalidValue;
    }

    // Separate past/present memory: present starts as a copy of past. The runtime binds one buffer
    // to both, and then nothing is copied.
    size_t const cacheBytes
        = static_cast<size_t>(batch) * kv_num_heads * capacity * head_dim * elementSize(cache_dtype);
    if (present_key != past_key)
    {
        cudaError_t const status = cudaMemcpyAsync(present_key, past_key, cacheBytes, cudaMemcpyDeviceToDevice, stream);
        if (status != cudaSuccess)
        {
            return status;
        }
    }
    if (present_value != past_value)
    {
        cudaError_t const status
            = cudaMemcpyAsync(present_value, past_value, cacheBytes, cudaMemcpyDeviceToDevice, stream);
        if (status != cudaSuccess)
        {
            return status;
        }
    }

    Args a{};
    a.q = q;
    a.k = k;
    a.v = v;
    a.qNormWeight = q_norm_weight;
    a.kNormWeight = k_norm_weight;
    a.cos = cos;
    a.sin = sin;
    a.seqlensK = seqlens_k;
    a.totalLength = total_sequence_length;
    a.out = output;
    a.presentKey = present_key;
    a.presentValue = present_value;
    a.batch = batch;
    a.seqLen = seq_len;
    a.heads = num_heads;
    a.kvHeads = kv_num_heads;
    a.capacity = capacity;
    a.scale = scale;
    a.epsilon = epsilon;
    int64_t splits = decode_splits > 0 ? decode_splits : qwen3vl_attention_decode_splits(batch, kv_num_heads, capacity);
    splits = splits > QWEN3VL_ATTENTION_MAX_SPLITS ? QWEN3VL_ATTENTION_MAX_SPLITS : splits;
    int64_t const fits
        = workspace == nullptr ? 1 : static_cast<int64_t>(workspace_size) / splitBytes(batch, num_heads, head_dim);
    a.splits = static_cast<int>(seq_len > 1 || fits < 1 ? 1 : (splits < fits ? splits : fits));
    a.workspace = static_cast<float*>(workspace);

    bool const half = dtype == QWEN3VL_FLOAT16;
    bool const halfCache = cache_dtype == QWEN3VL_FLOAT16;
    if (half)
    {
        return halfCache ? dispatchHeadDim<__half, __half>(a, head_dim, stream)
                         : dispatchHeadDim<__half, float>(a, head_dim, stream);
    }
    return halfCache ? dispatchHeadDim<float, __half>(a, head_dim, stream)
                     : dispatchHeadDim<float, float>(a, head_dim, stream);
}
