// One small kernel per CUDA feature the emulation provides, for tests/test_cuda_emulation.py, which
// checks each against CUDA's documented behaviour. Plain CUDA: built by nvcc on a GPU, the same
// checks hold for the hardware. The kernels under CUDA_EMULATION break a rule on purpose (undefined
// behaviour on a GPU, an error in the emulation) and exist only there.
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace
{

__global__ void indicesKernel(unsigned* out)
{
    unsigned const block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    unsigned const thread = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    unsigned* o = out + 12 * (block * blockDim.x * blockDim.y * blockDim.z + thread);
    o[0] = threadIdx.x;
    o[1] = threadIdx.y;
    o[2] = threadIdx.z;
    o[3] = blockIdx.x;
    o[4] = blockIdx.y;
    o[5] = blockIdx.z;
    o[6] = blockDim.x;
    o[7] = blockDim.y;
    o[8] = blockDim.z;
    o[9] = gridDim.x;
    o[10] = gridDim.y;
    o[11] = gridDim.z;
}

// mode 0 __shfl_sync, 1 __shfl_up_sync, 2 __shfl_down_sync, 3 __shfl_xor_sync; full mask.
template <typename T>
__global__ void shuffleKernel(int mode, int width, T const* in, int const* argument, T* out)
{
    int const i = blockIdx.x * blockDim.x + threadIdx.x;
    T const v = in[i];
    int const a = argument[i];
    T r;
    switch (mode)
    {
    case 0: r = __shfl_sync(0xffffffffu, v, a, width); break;
    case 1: r = __shfl_up_sync(0xffffffffu, v, static_cast<unsigned>(a), width); break;
    case 2: r = __shfl_down_sync(0xffffffffu, v, static_cast<unsigned>(a), width); break;
    default: r = __shfl_xor_sync(0xffffffffu, v, a, width); break;
    }
    out[i] = r;
}

// Lanes outside `mask` take no part (they leave at once).
__global__ void voteKernel(unsigned mask, int const* predicate, unsigned* out)
{
    int const i = blockIdx.x * blockDim.x + threadIdx.x;
    int const lane = threadIdx.x % 32;
    if (!((mask >> lane) & 1u))
    {
        return;
    }
    int const p = predicate[i];
    out[3 * i] = __all_sync(mask, p);
    out[3 * i + 1] = __any_sync(mask, p);
    out[3 * i + 2] = __ballot_sync(mask, p);
}

// Each round stores, waits, and reads the mirrored thread's value plus one.
__global__ void reverseKernel(int const* in, int* out, int rounds)
{
    __shared__ int buffer[1024];
    int const t = threadIdx.x;
    int const n = blockDim.x;
    int v = in[blockIdx.x * n + t];
    for (int r = 0; r < rounds; ++r)
    {
        buffer[t] = v;
        __syncthreads();
        v = buffer[n - 1 - t] + 1;
        __syncthreads();
    }
    out[blockIdx.x * n + t] = v;
}

// A warp passes values round through shared memory behind __syncwarp.
__global__ void warpRotateKernel(int const* in, int* out)
{
    __shared__ int buffer[256];
    int const t = threadIdx.x;
    int const lane = t & 31;
    buffer[t] = in[blockIdx.x * blockDim.x + t];
    __syncwarp();
    out[blockIdx.x * blockDim.x + t] = buffer[(t & ~31) + ((lane + 1) & 31)];
}

__global__ void barrierReduceKernel(int const* predicate, int* out)
{
    int const p = predicate[blockIdx.x * blockDim.x + threadIdx.x];
    int const count = __syncthreads_count(p);
    int const all = __syncthreads_and(p);
    int const any = __syncthreads_or(p);
    if (threadIdx.x == 0)
    {
        out[3 * blockIdx.x] = count;
        out[3 * blockIdx.x + 1] = all;
        out[3 * blockIdx.x + 2] = any;
    }
}

// Shared variables are per block: every block sums its own blockIdx.x over its threads.
__global__ void sharedPerBlockKernel(int* out)
{
    __shared__ int value;
    __shared__ int sum;
    if (threadIdx.x == 0)
    {
        value = static_cast<int>(blockIdx.x);
        sum = 0;
    }
    __syncthreads();
    atomicAdd(&sum, value);
    __syncthreads();
    if (threadIdx.x == 0)
    {
        out[blockIdx.x] = sum;
    }
}

__global__ void dynamicSharedKernel(float* out)
{
    extern __shared__ float dynamic[];
    dynamic[threadIdx.x] = static_cast<float>(threadIdx.x + blockIdx.x);
    __syncthreads();
    out[blockIdx.x * blockDim.x + threadIdx.x] = dynamic[blockDim.x - 1 - threadIdx.x];
}

// Every thread updates the same words; the results do not depend on the order.
__global__ void atomicsKernel(int* ints, unsigned* uints, float* floats, unsigned long long* wide)
{
    int const i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
    __shared__ int local;
    if (threadIdx.x == 0)
    {
        local = 0;
    }
    __syncthreads();
    atomicAdd(&local, 2);
    atomicAdd(&ints[0], 1);
    atomicSub(&ints[1], 2);
    atomicMax(&ints[2], i);
    atomicMin(&ints[3], -i);
    int old = ints[4];
    int assumed;
    do
    {
        assumed = old;
        old = atomicCAS(&ints[4], assumed, assumed + 3);
    } while (old != assumed);
    atomicExch(&ints[5], 7);
    atomicAdd(&uints[0], 3u);
    atomicInc(&uints[1], 9u);
    atomicDec(&uints[2], 9u);
    atomicOr(&uints[3], 1u << (i % 32));
    atomicAnd(&uints[4], ~(1u << (i % 32)));
    atomicXor(&uints[5], static_cast<unsigned>(i));
    atomicMax(&uints[6], static_cast<unsigned>(i) * 3u);
    atomicAdd(&floats[0], 0.5f);
    atomicExch(&floats[1], 2.5f);
    atomicAdd(&wide[0], 1ull << 33);
    __syncthreads();
    if (threadIdx.x == 0)
    {
        atomicAdd(&ints[6], local);
    }
}

__global__ void dp4aKernel(int const* a, int const* b, int const* c, int* out, unsigned* outUnsigned, int n)
{
    int const i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n)
    {
        out[i] = __dp4a(a[i], b[i], c[i]);
        outUnsigned[i] = __dp4a(static_cast<unsigned>(a[i]), static_cast<unsigned>(b[i]), static_cast<unsigned>(c[i]));
    }
}

// float -> half (to nearest even, toward zero), half -> float, and the half2 forms.
__global__ void halfKernel(float const* in, unsigned short const* halves, unsigned short* rn, unsigned short* rz,
    float* back, float* pairs, int n)
{
    int const i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n)
    {
        rn[i] = __half_as_ushort(__float2half_rn(in[i]));
        rz[i] = __half_as_ushort(__float2half_rz(in[i]));
        back[i] = __half2float(__ushort_as_half(halves[i]));
        __half2 const pair = __floats2half2_rn(in[i], -in[i]);
        float2 const both = __half22float2(pair);
        pairs[4 * i] = __low2float(pair);
        pairs[4 * i + 1] = __high2float(pair);
        pairs[4 * i + 2] = both.x;
        pairs[4 * i + 3] = both.y;
    }
}

__global__ void bitsKernel(unsigned const* x, unsigned const* y, unsigned const* s, unsigned* out, int n)
{
    int const i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n)
    {
        unsigned* o = out + 6 * i;
        o[0] = __byte_perm(x[i], y[i], s[i]);
        o[1] = static_cast<unsigned>(__popc(x[i]));
        o[2] = static_cast<unsigned>(__clz(static_cast<int>(x[i])));
        o[3] = static_cast<unsigned>(__ffs(static_cast<int>(x[i])));
        o[4] = __brev(x[i]);
        o[5] = __float_as_uint(__uint_as_float(x[i])); // a bit cast keeps every bit, NaN payloads too
    }
}

__global__ void floatToIntKernel(float const* in, int* out, int n)
{
    int const i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n)
    {
        out[4 * i] = __float2int_rn(in[i]);
        out[4 * i + 1] = __float2int_rz(in[i]);
        out[4 * i + 2] = __float2int_rd(in[i]);
        out[4 * i + 3] = __float2int_ru(in[i]);
    }
}

// The float intrinsics and math functions device code uses, and min/max.
__global__ void mathKernel(float const* x, float const* y, float* out, int n)
{
    int const i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n)
    {
        float const a = x[i];
        float const b = y[i];
        float* o = out + 12 * i;
        o[0] = __expf(a);
        o[1] = __logf(fabsf(a) + 0.5f);
        o[2] = __fdividef(a, b);
        o[3] = rsqrtf(fabsf(b));
        o[4] = __saturatef(a);
        o[5] = __fmaf_rn(a, b, 1.f);
        o[6] = exp2f(a);
        o[7] = sqrtf(fabsf(a));
        o[8] = fmaxf(a, b);
        o[9] = fminf(a, b);
        o[10] = static_cast<float>(min(__float2int_rz(a * 10.f), __float2int_rz(b * 10.f)));
        o[11] = static_cast<float>(max(__float2int_rz(a * 10.f), __float2int_rz(b * 10.f)));
    }
}

// __ldg and 16-byte vector loads and stores through the vector types.
__global__ void vectorKernel(float4 const* in, uint2 const* words, float4* out, uint2* outWords)
{
    int const i = blockIdx.x * blockDim.x + threadIdx.x;
    float4 const v = __ldg(in + i);
    out[i] = make_float4(v.w, v.z, v.y, v.x);
    uint2 const w = __ldg(words + i);
    outWords[i] = make_uint2(w.y, w.x);
}

__global__ void emptyKernel() {}

// Missing a barrier between the store and the neighbour's read unless `synchronised`.
__global__ void racyKernel(int* out, int synchronised)
{
    __shared__ int buffer[256];
    buffer[threadIdx.x] = static_cast<int>(threadIdx.x);
    if (synchronised)
    {
        __syncthreads();
    }
    out[threadIdx.x] = buffer[(threadIdx.x + 1) % blockDim.x];
}

#ifdef CUDA_EMULATION
// Undefined behaviour on a GPU; errors in the emulation.
__global__ void badShuffleKernel(int variant, float* out)
{
    int const lane = static_cast<int>(threadIdx.x % 32);
    float v = static_cast<float>(lane);
    switch (variant)
    {
    case 0: // lanes 0-15 read lanes 16-31, outside their mask
        if (lane < 16)
        {
            v = __shfl_sync(0x0000ffffu, v, lane + 16);
        }
        break;
    case 1: // lanes 16-31 call with a mask that leaves them out
        v = __shfl_xor_sync(0x0000ffffu, v, 1);
        break;
    case 2: // the source lanes have exited
        if (lane >= 16)
        {
            return;
        }
        v = __shfl_sync(0xffffffffu, v, lane + 16);
        break;
    case 3: // two halves of a warp at different collectives under one mask
        if (lane < 16)
        {
            v = __shfl_xor_sync(0xffffffffu, v, 1);
        }
        else
        {
            v = static_cast<float>(__ballot_sync(0xffffffffu, 1));
        }
        break;
    default: // a width that is not a power of two
        v = __shfl_xor_sync(0xffffffffu, v, 1, 3);
        break;
    }
    out[threadIdx.x] = v;
}

__global__ void badBarrierKernel(int variant, float* out)
{
    float v = static_cast<float>(threadIdx.x);
    switch (variant)
    {
    case 0: // half the block waits, the other half leaves
        if (threadIdx.x < 16)
        {
            __syncthreads();
        }
        break;
    case 1: // odd and even threads at different barriers
        if (threadIdx.x % 2)
        {
            __syncthreads();
        }
        else
        {
            __syncthreads();
        }
        break;
    case 2: // lane 0 waits for a shuffle while its warp waits at the barrier
        if (threadIdx.x == 0)
        {
            v = __shfl_sync(0xffffffffu, v, 1);
        }
        __syncthreads();
        break;
    default: // the second warp leaves before a barrier
        if (threadIdx.x >= 32)
        {
            return;
        }
        __syncthreads();
        break;
    }
    out[threadIdx.x] = v;
}

__global__ void tooMuchSharedKernel(float* out)
{
    __shared__ float big[13 * 1024];
    big[threadIdx.x] = 1.f;
    out[threadIdx.x] = big[threadIdx.x];
}

__global__ void overrunKernel(float* out, int n)
{
    int const i = static_cast<int>(threadIdx.x);
    if (i <= n) // off by one
    {
        out[i] = 1.f;
    }
}

__global__ void uninitialisedKernel(float* out)
{
    __shared__ float never[64];
    out[threadIdx.x] = never[threadIdx.x];
}

__global__ void trapKernel()
{
    __trap();
}
#endif

} // namespace

extern "C" {

int prim_indices(unsigned* out, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz)
{
    indicesKernel<<<dim3(gx, gy, gz), dim3(bx, by, bz)>>>(out);
    return cudaGetLastError();
}

int prim_shuffle_float(int mode, int width, float const* in, int const* argument, float* out, int n)
{
    shuffleKernel<float><<<n / 64, 64>>>(mode, width, in, argument, out);
    return cudaGetLastError();
}

int prim_shuffle_double(int mode, int width, double const* in, int const* argument, double* out, int n)
{
    shuffleKernel<double><<<n / 64, 64>>>(mode, width, in, argument, out);
    return cudaGetLastError();
}

int prim_vote(unsigned mask, int const* predicate, unsigned* out, int n)
{
    voteKernel<<<n / 64, 64>>>(mask, predicate, out);
    return cudaGetLastError();
}

int prim_reverse(int const* in, int* out, int blocks, int threads, int rounds)
{
    reverseKernel<<<blocks, threads>>>(in, out, rounds);
    return cudaGetLastError();
}

int prim_warp_rotate(int const* in, int* out, int blocks)
{
    warpRotateKernel<<<blocks, 256>>>(in, out);
    return cudaGetLastError();
}

int prim_barrier_reduce(int const* predicate, int* out, int blocks, int threads)
{
    barrierReduceKernel<<<blocks, threads>>>(predicate, out);
    return cudaGetLastError();
}

int prim_shared_per_block(int* out, int blocks, int threads)
{
    sharedPerBlockKernel<<<blocks, threads>>>(out);
    return cudaGetLastError();
}

int prim_dynamic_shared(float* out, int blocks, int threads)
{
    dynamicSharedKernel<<<blocks, threads, threads * sizeof(float)>>>(out);
    return cudaGetLastError();
}

int prim_atomics(int* ints, unsigned* uints, float* floats, unsigned long long* wide, int blocks, int threads)
{
    atomicsKernel<<<blocks, threads>>>(ints, uints, floats, wide);
    return cudaGetLastError();
}

int prim_dp4a(int const* a, int const* b, int const* c, int* out, unsigned* outUnsigned, int n)
{
    dp4aKernel<<<(n + 127) / 128, 128>>>(a, b, c, out, outUnsigned, n);
    return cudaGetLastError();
}

int prim_half(float const* in, unsigned short const* halves, unsigned short* rn, unsigned short* rz, float* back,
    float* pairs, int n)
{
    halfKernel<<<(n + 255) / 256, 256>>>(in, halves, rn, rz, back, pairs, n);
    return cudaGetLastError();
}

int prim_bits(unsigned const* x, unsigned const* y, unsigned const* s, unsigned* out, int n)
{
    bitsKernel<<<(n + 255) / 256, 256>>>(x, y, s, out, n);
    return cudaGetLastError();
}

int prim_float_to_int(float const* in, int* out, int n)
{
    floatToIntKernel<<<(n + 255) / 256, 256>>>(in, out, n);
    return cudaGetLastError();
}

int prim_math(float const* x, float const* y, float* out, int n)
{
    mathKernel<<<(n + 255) / 256, 256>>>(x, y, out, n);
    return cudaGetLastError();
}

int prim_vectors(float4 const* in, uint2 const* words, float4* out, uint2* outWords, int n)
{
    vectorKernel<<<n / 32, 32>>>(in, words, out, outWords);
    return cudaGetLastError();
}

int prim_launch(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz, unsigned shared)
{
    emptyKernel<<<dim3(gx, gy, gz), dim3(bx, by, bz), shared>>>();
    return cudaGetLastError();
}

int prim_racy(int* out, int threads, int synchronised)
{
    racyKernel<<<1, threads>>>(out, synchronised);
    return cudaGetLastError();
}

// sizeof and alignof of the vector types, as host code sees them.
void prim_layout(int* out)
{
    int const sizes[] = {static_cast<int>(sizeof(float4)), static_cast<int>(alignof(float4)),
        static_cast<int>(sizeof(uint4)), static_cast<int>(alignof(uint4)), static_cast<int>(sizeof(uint2)),
        static_cast<int>(alignof(uint2)), static_cast<int>(sizeof(int4)), static_cast<int>(alignof(int4)),
        static_cast<int>(sizeof(__half)), static_cast<int>(alignof(__half)), static_cast<int>(sizeof(__half2)),
        static_cast<int>(alignof(__half2)), static_cast<int>(sizeof(dim3))};
    for (int i = 0; i < 13; ++i)
    {
        out[i] = sizes[i];
    }
}

#ifdef CUDA_EMULATION
int prim_bad_shuffle(int variant, float* out)
{
    badShuffleKernel<<<1, 32>>>(variant, out);
    return cudaGetLastError();
}

int prim_bad_barrier(int variant, float* out)
{
    badBarrierKernel<<<1, 64>>>(variant, out);
    return cudaGetLastError();
}

int prim_too_much_shared(float* out)
{
    tooMuchSharedKernel<<<1, 32>>>(out);
    return cudaGetLastError();
}

int prim_overrun(float* out, int n)
{
    overrunKernel<<<1, n + 1>>>(out, n);
    return cudaGetLastError();
}

int prim_uninitialised(float* out)
{
    uninitialisedKernel<<<1, 64>>>(out);
    return cudaGetLastError();
}

int prim_trap()
{
    trapKernel<<<1, 32>>>();
    return cudaGetLastError();
}
#endif
}
