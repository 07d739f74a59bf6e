// CPU emulation of the CUDA device code and runtime API that the kernels in trt_plugins/ use, so
// that their unmodified .cu sources compile with g++ and run in tests on a machine without a GPU.
//
// Execution model (runtime.cpp): every CUDA thread of a block is a fiber with its own stack; a
// fiber runs until it reaches a barrier or a warp collective (shuffle, vote, __syncwarp) or
// returns, and the collective completes only when every thread it names has arrived, so barriers
// and shuffles exchange real values between independently running threads. Blocks run one after
// another. By default a seeded random warp runs as far as it can (its lanes in random order) before
// another is picked, so warps drift apart as on a GPU, and a missing barrier shows up as a read of
// shared memory before its write (shared memory starts as 0xFF bytes: NaN floats) or after the next
// overwrite. Undefined behaviour that CUDA documents
// (a shuffle reading a lane outside its mask or an exited lane, a mask that leaves out the caller,
// lanes disagreeing on a collective, a barrier not reached by every thread of the block, a
// deadlock, more than 48 KiB of static shared memory, a write just past a cudaMalloc allocation)
// stops the launch with an error: the launch reports cudaErrorLaunchFailure, sticky like a device
// fault, and cuda_emu_error_message() says what happened where.
//
// Two source constructs have no C++ spelling and are rewritten by tests/cuda_emulation/__init__.py
// before compiling (line numbers kept): `kernel<<<grid, block, shm, stream>>>(args)` becomes
// cuda_emu::launch(...), and `__shared__ T name[...]` becomes a reference to per-block storage
// (cuda_emu::sharedVariable). Everything else is this header: the stand-ins for cuda_runtime.h,
// cuda_runtime_api.h, cuda_fp16.h and math_constants.h in this folder include it.
#pragma once

#define CUDA_EMULATION 1

#include <math.h> // sqrtf, exp2f, fmaf, ... in the global namespace, as device code sees them
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <climits>
#include <cmath>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

// Device code is compiled as for this architecture (`#if __CUDA_ARCH__ >= 610` picks __dp4a).
// Unlike nvcc there is one compilation pass, so host code sees it too; the kernels here test it in
// device functions only.
#ifndef __CUDA_ARCH__
#define __CUDA_ARCH__ 610
#endif

// ---- qualifiers ---------------------------------------------------------------------------------

#define __global__
#define __device__
#define __host__
#define __constant__
#define __managed__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
// `__shared__` declarations are rewritten before compiling; one left over is a compile error.
#define __shared__ __shared___was_not_rewritten_by_the_cuda_emulation_preprocessor

// ---- vector types -------------------------------------------------------------------------------

struct alignas(2) char2 { signed char x, y; };
struct alignas(4) char4 { signed char x, y, z, w; };
struct alignas(2) uchar2 { unsigned char x, y; };
struct alignas(4) uchar4 { unsigned char x, y, z, w; };
struct alignas(8) int2 { int x, y; };
struct int3 { int x, y, z; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct uint3 { unsigned x, y, z; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) float2 { float x, y; };
struct float3 { float x, y, z; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) double2 { double x, y; };
struct alignas(16) longlong2 { long long x, y; };
struct alignas(16) ulonglong2 { unsigned long long x, y; };

struct dim3
{
    unsigned x, y, z;
    constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
    constexpr operator uint3() const { return uint3{x, y, z}; }
};

inline int2 make_int2(int x, int y) { return int2{x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return int4{x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
inline uint3 make_uint3(unsigned x, unsigned y, unsigned z) { return uint3{x, y, z}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline float3 make_float3(float x, float y, float z) { return float3{x, y, z}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline char4 make_char4(signed char x, signed char y, signed char z, signed char w) { return char4{x, y, z, w}; }
inline uchar4 make_uchar4(unsigned char x, unsigned char y, unsigned char z, unsigned char w)
{
    return uchar4{x, y, z, w};
}

constexpr int warpSize = 32;

// ---- runtime API types (the numeric values are CUDA's) -----------------------------------------

typedef enum cudaError
{
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorInitializationError = 3,
    cudaErrorInvalidConfiguration = 9,
    cudaErrorInvalidDevicePointer = 17,
    cudaErrorInvalidMemcpyDirection = 21,
    cudaErrorNoDevice = 100,
    cudaErrorInvalidDevice = 101,
    cudaErrorInvalidResourceHandle = 400,
    cudaErrorNotReady = 600,
    cudaErrorIllegalAddress = 700,
    cudaErrorLaunchOutOfResources = 701,
    cudaErrorAssert = 710,
    cudaErrorMisalignedAddress = 716,
    cudaErrorLaunchFailure = 719
} cudaError_t;

typedef enum cudaMemcpyKind
{
    cudaMemcpyHostToHost = 0,
    cudaMemcpyHostToDevice = 1,
    cudaMemcpyDeviceToHost = 2,
    cudaMemcpyDeviceToDevice = 3,
    cudaMemcpyDefault = 4
} cudaMemcpyKind;

typedef enum cudaDeviceAttr
{
    cudaDevAttrMaxThreadsPerBlock = 1,
    cudaDevAttrMaxBlockDimX = 2,
    cudaDevAttrMaxBlockDimY = 3,
    cudaDevAttrMaxBlockDimZ = 4,
    cudaDevAttrMaxGridDimX = 5,
    cudaDevAttrMaxGridDimY = 6,
    cudaDevAttrMaxGridDimZ = 7,
    cudaDevAttrMaxSharedMemoryPerBlock = 8,
    cudaDevAttrWarpSize = 10,
    cudaDevAttrMultiProcessorCount = 16,
    cudaDevAttrComputeCapabilityMajor = 75,
    cudaDevAttrComputeCapabilityMinor = 76
} cudaDeviceAttr;

typedef struct CUstream_st* cudaStream_t;
typedef struct CUevent_st* cudaEvent_t;

extern "C" {
cudaError_t cudaMalloc(void** pointer, size_t bytes);
cudaError_t cudaFree(void* pointer);
cudaError_t cudaMemcpy(void* dst, void const* src, size_t bytes, cudaMemcpyKind kind);
cudaError_t cudaMemcpyAsync(void* dst, void const* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t stream);
cudaError_t cudaMemset(void* pointer, int value, size_t bytes);
cudaError_t cudaMemsetAsync(void* pointer, int value, size_t bytes, cudaStream_t stream);
cudaError_t cudaDeviceSynchronize(void);
cudaError_t cudaStreamSynchronize(cudaStream_t stream);
cudaError_t cudaStreamCreate(cudaStream_t* stream);
cudaError_t cudaStreamDestroy(cudaStream_t stream);
cudaError_t cudaGetLastError(void);
cudaError_t cudaPeekAtLastError(void);
char const* cudaGetErrorString(cudaError_t error);
char const* cudaGetErrorName(cudaError_t error);
cudaError_t cudaGetDeviceCount(int* count);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int device);
cudaError_t cudaEventCreate(cudaEvent_t* event);
cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream);
cudaError_t cudaEventSynchronize(cudaEvent_t event);
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t stop);
cudaError_t cudaEventDestroy(cudaEvent_t event);

// Emulator controls for tests.
char const* cuda_emu_error_message(void);    // what stopped the last failed launch ("" if none)
void cuda_emu_reset(void);                    // clears the sticky error, as a new process would
void cuda_emu_set_schedule(int policy, unsigned long long seed); // CUDA_EMU_SCHEDULE_*
void cuda_emu_set_device(int major, int minor, int multiprocessors); // what the attributes report
unsigned long long cuda_emu_context_switches(void); // fiber switches since load (cost measure)
}

// The order in which threads run to their next synchronisation point.
enum
{
    CUDA_EMU_SCHEDULE_RANDOM = 0,   // a random warp as far as it goes, its lanes in random order (default)
    CUDA_EMU_SCHEDULE_FORWARD = 1,  // the lowest runnable thread first
    CUDA_EMU_SCHEDULE_REVERSE = 2   // the highest runnable thread first
};

template <typename T>
inline cudaError_t cudaMalloc(T** pointer, size_t bytes)
{
    return cudaMalloc(reinterpret_cast<void**>(pointer), bytes);
}

// ---- threads, blocks, launches ------------------------------------------------------------------

namespace cuda_emu
{

struct Site
{
    char const* file;
    int line;
};

// The part of the emulated thread that device code reads; runtime.cpp extends it.
struct ThreadIds
{
    uint3 index; // threadIdx
};

struct GridIds
{
    uint3 block;    // blockIdx
    dim3 blockSize; // blockDim
    dim3 gridSize;  // gridDim
};

namespace detail
{
extern ThreadIds* current; // the thread whose fiber runs now
extern GridIds grid;       // the block that runs now (blocks run one at a time)
} // namespace detail

inline uint3 const& threadIndex() { return detail::current->index; }
inline uint3 const& blockIndex() { return detail::grid.block; }
inline dim3 const& blockDimension() { return detail::grid.blockSize; }
inline dim3 const& gridDimension() { return detail::grid.gridSize; }

struct LaunchConfig
{
    dim3 grid;
    dim3 block;
    size_t sharedBytes;
    cudaStream_t stream;
    LaunchConfig(dim3 g, dim3 b, size_t shm = 0, cudaStream_t s = nullptr)
        : grid(g), block(b), sharedBytes(shm), stream(s)
    {
    }
};

// Runs body(context) once per thread of every block of the grid (runtime.cpp).
void launchGrid(char const* name, LaunchConfig const& config, void (*body)(void*), void* context);

// kernel<<<config>>>(args): the arguments are converted to the parameter types and copied once,
// as CUDA does; each thread calls the kernel with its own copy.
template <typename... Params, typename... Args>
void launch(char const* name, void (*kernel)(Params...), LaunchConfig const& config, Args&&... args)
{
    struct Call
    {
        void (*kernel)(Params...);
        std::tuple<std::decay_t<Params>...> params;
    };
    Call call{kernel, std::tuple<std::decay_t<Params>...>(std::forward<Args>(args)...)};
    launchGrid(
        name, config,
        [](void* context) {
            Call* c = static_cast<Call*>(context);
            std::apply(c->kernel, c->params); // by-value parameters: a copy per thread
        },
        &call);
}

// Per-block storage of one `__shared__` declaration, found by the address of a static tag unique
// to the declaration; filled with 0xFF bytes when the block's first thread reaches it.
void* sharedAllocate(void const* tag, size_t bytes, size_t alignment);
void* dynamicShared();

template <typename T, size_t Align>
T* sharedVariable(void const* tag)
{
    constexpr size_t kAlign = Align > alignof(T) ? Align : alignof(T);
    return static_cast<T*>(sharedAllocate(tag, sizeof(T), kAlign < 16 ? 16 : kAlign));
}

// ---- synchronisation ----------------------------------------------------------------------------

enum class WarpOp : int
{
    ShuffleIndex,
    ShuffleUp,
    ShuffleDown,
    ShuffleXor,
    All,
    Any,
    Ballot,
    SyncWarp
};

// All three block to the scheduler until their collective completes (runtime.cpp).
int barrier(Site site, int predicate, int reduce); // reduce: 0 none, 1 count, 2 and, 3 or
unsigned long long warpCollective(
    Site site, WarpOp op, unsigned mask, unsigned long long value, int valueBytes, int argument, int width);
unsigned activeMask();
[[noreturn]] void trap(Site site, char const* what);

struct Barrier
{
    Site site;
    void operator()() const { barrier(site, 1, 0); }
};

struct BarrierReduce
{
    Site site;
    int reduce;
    int operator()(int predicate) const { return barrier(site, predicate, reduce); }
};

struct Shuffle
{
    Site site;
    WarpOp op;
    template <typename T>
    T operator()(unsigned mask, T var, int laneOrDelta, int width = warpSize) const
    {
        static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "shuffles move up to 8 bytes");
        unsigned long long bits = 0;
        memcpy(&bits, &var, sizeof(T));
        bits = warpCollective(site, op, mask, bits, static_cast<int>(sizeof(T)), laneOrDelta, width);
        T out;
        memcpy(&out, &bits, sizeof(T));
        return out;
    }
};

struct Vote
{
    Site site;
    WarpOp op;
    unsigned operator()(unsigned mask, int predicate) const
    {
        return static_cast<unsigned>(warpCollective(site, op, mask, predicate != 0, 4, 0, warpSize));
    }
};

struct SyncWarp
{
    Site site;
    void operator()(unsigned mask = 0xffffffffu) const
    {
        warpCollective(site, WarpOp::SyncWarp, mask, 0, 4, 0, warpSize);
    }
};

} // namespace cuda_emu

#define threadIdx (::cuda_emu::threadIndex())
#define blockIdx (::cuda_emu::blockIndex())
#define blockDim (::cuda_emu::blockDimension())
#define gridDim (::cuda_emu::gridDimension())

#define CUDA_EMU_SITE (::cuda_emu::Site{__FILE__, __LINE__})
#define __syncthreads ::cuda_emu::Barrier{CUDA_EMU_SITE}
#define __syncthreads_count ::cuda_emu::BarrierReduce{CUDA_EMU_SITE, 1}
#define __syncthreads_and ::cuda_emu::BarrierReduce{CUDA_EMU_SITE, 2}
#define __syncthreads_or ::cuda_emu::BarrierReduce{CUDA_EMU_SITE, 3}
#define __syncwarp ::cuda_emu::SyncWarp{CUDA_EMU_SITE}
#define __shfl_sync ::cuda_emu::Shuffle{CUDA_EMU_SITE, ::cuda_emu::WarpOp::ShuffleIndex}
#define __shfl_up_sync ::cuda_emu::Shuffle{CUDA_EMU_SITE, ::cuda_emu::WarpOp::ShuffleUp}
#define __shfl_down_sync ::cuda_emu::Shuffle{CUDA_EMU_SITE, ::cuda_emu::WarpOp::ShuffleDown}
#define __shfl_xor_sync ::cuda_emu::Shuffle{CUDA_EMU_SITE, ::cuda_emu::WarpOp::ShuffleXor}
#define __all_sync ::cuda_emu::Vote{CUDA_EMU_SITE, ::cuda_emu::WarpOp::All}
#define __any_sync ::cuda_emu::Vote{CUDA_EMU_SITE, ::cuda_emu::WarpOp::Any}
#define __ballot_sync ::cuda_emu::Vote{CUDA_EMU_SITE, ::cuda_emu::WarpOp::Ballot}
#define __activemask() (::cuda_emu::activeMask())
#define __trap() (::cuda_emu::trap(CUDA_EMU_SITE, "__trap()"))

// Fences order memory between threads that run concurrently; fibers switch only at the
// synchronisation points above, so a compiler barrier is all they need here.
inline void __threadfence() { __asm__ __volatile__("" ::: "memory"); }
inline void __threadfence_block() { __asm__ __volatile__("" ::: "memory"); }
inline void __threadfence_system() { __asm__ __volatile__("" ::: "memory"); }

// ---- atomics (one OS thread runs all fibers, and a fiber is never interrupted inside one) ---------

template <typename T>
inline T cudaEmuAtomicUpdate(T* address, T (*update)(T, T), T value)
{
    T const old = *address;
    *address = update(old, value);
    return old;
}

#define CUDA_EMU_ATOMIC(name, type, expression)                                                             \
    inline type name(type* address, type val)                                                               \
    {                                                                                                       \
        return cudaEmuAtomicUpdate<type>(address, [](type old, type v) -> type { return expression; }, val); \
    }

CUDA_EMU_ATOMIC(atomicAdd, int, static_cast<int>(static_cast<unsigned>(old) + static_cast<unsigned>(v)))
CUDA_EMU_ATOMIC(atomicAdd, unsigned, old + v)
CUDA_EMU_ATOMIC(atomicAdd, unsigned long long, old + v)
CUDA_EMU_ATOMIC(atomicAdd, float, old + v)
CUDA_EMU_ATOMIC(atomicAdd, double, old + v)
CUDA_EMU_ATOMIC(atomicSub, int, static_cast<int>(static_cast<unsigned>(old) - static_cast<unsigned>(v)))
CUDA_EMU_ATOMIC(atomicSub, unsigned, old - v)
CUDA_EMU_ATOMIC(atomicExch, int, ((void) old, v))
CUDA_EMU_ATOMIC(atomicExch, unsigned, ((void) old, v))
CUDA_EMU_ATOMIC(atomicExch, unsigned long long, ((void) old, v))
CUDA_EMU_ATOMIC(atomicExch, float, ((void) old, v))
CUDA_EMU_ATOMIC(atomicMin, int, v < old ? v : old)
CUDA_EMU_ATOMIC(atomicMin, unsigned, v < old ? v : old)
CUDA_EMU_ATOMIC(atomicMin, long long, v < old ? v : old)
CUDA_EMU_ATOMIC(atomicMin, unsigned long long, v < old ? v : old)
CUDA_EMU_ATOMIC(atomicMax, int, v > old ? v : old)
CUDA_EMU_ATOMIC(atomicMax, unsigned, v > old ? v : old)
CUDA_EMU_ATOMIC(atomicMax, long long, v > old ? v : old)
CUDA_EMU_ATOMIC(atomicMax, unsigned long long, v > old ? v : old)
CUDA_EMU_ATOMIC(atomicAnd, int, old & v)
CUDA_EMU_ATOMIC(atomicAnd, unsigned, old & v)
CUDA_EMU_ATOMIC(atomicAnd, unsigned long long, old & v)
CUDA_EMU_ATOMIC(atomicOr, int, old | v)
CUDA_EMU_ATOMIC(atomicOr, unsigned, old | v)
CUDA_EMU_ATOMIC(atomicOr, unsigned long long, old | v)
CUDA_EMU_ATOMIC(atomicXor, int, old ^ v)
CUDA_EMU_ATOMIC(atomicXor, unsigned, old ^ v)
CUDA_EMU_ATOMIC(atomicXor, unsigned long long, old ^ v)
// ((old >= val) ? 0 : (old + 1)) and (((old == 0) || (old > val)) ? val : (old - 1)), as documented.
CUDA_EMU_ATOMIC(atomicInc, unsigned, old >= v ? 0u : old + 1u)
CUDA_EMU_ATOMIC(atomicDec, unsigned, (old == 0u || old > v) ? v : old - 1u)
#undef CUDA_EMU_ATOMIC

template <typename T>
inline T cudaEmuAtomicCas(T* address, T compare, T val)
{
    T const old = *address;
    *address = old == compare ? val : old;
    return old;
}
inline int atomicCAS(int* a, int c, int v) { return cudaEmuAtomicCas(a, c, v); }
inline unsigned atomicCAS(unsigned* a, unsigned c, unsigned v) { return cudaEmuAtomicCas(a, c, v); }
inline unsigned long long atomicCAS(unsigned long long* a, unsigned long long c, unsigned long long v)
{
    return cudaEmuAtomicCas(a, c, v);
}

// ---- loads, bit and integer intrinsics ------------------------------------------------------------

template <typename T>
inline T __ldg(T const* p)
{
    return *p;
}

template <typename To, typename From>
inline To cudaEmuBits(From v)
{
    static_assert(sizeof(To) == sizeof(From), "same size");
    To out;
    memcpy(&out, &v, sizeof(To));
    return out;
}
inline float __uint_as_float(unsigned v) { return cudaEmuBits<float>(v); }
inline float __int_as_float(int v) { return cudaEmuBits<float>(v); }
inline unsigned __float_as_uint(float v) { return cudaEmuBits<unsigned>(v); }
inline int __float_as_int(float v) { return cudaEmuBits<int>(v); }
inline double __longlong_as_double(long long v) { return cudaEmuBits<double>(v); }
inline long long __double_as_longlong(double v) { return cudaEmuBits<long long>(v); }

// Byte n of the result is byte (s >> 4n) & 7 of the 8 bytes y:x (x the low four).
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s)
{
    unsigned long long const bytes = (static_cast<unsigned long long>(y) << 32) | x;
    unsigned r = 0;
    for (int n = 0; n < 4; ++n)
    {
        unsigned const select = (s >> (4 * n)) & 7u;
        r |= static_cast<unsigned>((bytes >> (8 * select)) & 0xFFu) << (8 * n);
    }
    return r;
}

// Four byte products (signed for int, unsigned for unsigned) added to c, wrapping like the hardware.
inline int __dp4a(int a, int b, int c)
{
    unsigned sum = static_cast<unsigned>(c);
    for (int i = 0; i < 32; i += 8)
    {
        sum += static_cast<unsigned>(
            static_cast<int>(static_cast<signed char>(a >> i)) * static_cast<int>(static_cast<signed char>(b >> i)));
    }
    return static_cast<int>(sum);
}
inline unsigned __dp4a(unsigned a, unsigned b, unsigned c)
{
    for (int i = 0; i < 32; i += 8)
    {
        c += ((a >> i) & 0xFFu) * ((b >> i) & 0xFFu);
    }
    return c;
}

inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz(static_cast<unsigned>(v)); }
inline int __clzll(long long v) { return v == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(v)); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline int __ffsll(long long v) { return __builtin_ffsll(v); }
inline unsigned __brev(unsigned v)
{
    unsigned r = 0;
    for (int i = 0; i < 32; ++i)
    {
        r |= ((v >> i) & 1u) << (31 - i);
    }
    return r;
}

#define CUDA_EMU_MINMAX(type)                                     \
    inline type min(type a, type b) { return b < a ? b : a; }    \
    inline type max(type a, type b) { return a < b ? b : a; }
CUDA_EMU_MINMAX(int)
CUDA_EMU_MINMAX(unsigned)
CUDA_EMU_MINMAX(long)
CUDA_EMU_MINMAX(unsigned long)
CUDA_EMU_MINMAX(long long)
CUDA_EMU_MINMAX(unsigned long long)
#undef CUDA_EMU_MINMAX
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }

// ---- float intrinsics -----------------------------------------------------------------------------

// Conversions saturate and send NaN to 0, as cvt does.
inline int cudaEmuToInt(float v, float rounded)
{
    if (v != v)
    {
        return 0;
    }
    if (rounded >= 2147483648.f)
    {
        return INT_MAX;
    }
    if (rounded < -2147483648.f)
    {
        return INT_MIN;
    }
    return static_cast<int>(rounded);
}
inline int __float2int_rn(float v) { return cudaEmuToInt(v, nearbyintf(v)); } // the default mode: to even
inline int __float2int_rz(float v) { return cudaEmuToInt(v, truncf(v)); }
inline int __float2int_rd(float v) { return cudaEmuToInt(v, floorf(v)); }
inline int __float2int_ru(float v) { return cudaEmuToInt(v, ceilf(v)); }
inline unsigned __float2uint_rn(float v)
{
    float const r = nearbyintf(v);
    return v != v || r <= 0.f ? 0u : (r >= 4294967296.f ? UINT_MAX : static_cast<unsigned>(r));
}
inline float __int2float_rn(int v) { return static_cast<float>(v); }
inline float __uint2float_rn(unsigned v) { return static_cast<float>(v); }

// The hardware's fast approximations go through ex2/lg2 on a scaled argument; so do these.
inline float __expf(float x) { return exp2f(x * 1.4426950408889634f); }
inline float __exp10f(float x) { return exp2f(x * 3.3219280948873622f); }
inline float __logf(float x) { return log2f(x) * 0.6931471805599453f; }
inline float __log2f(float x) { return log2f(x); }
inline float __log10f(float x) { return log2f(x) * 0.3010299956639812f; }
inline float __powf(float x, float y) { return exp2f(y * log2f(x)); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.f / sqrtf(x); }
inline float __frsqrt_rn(float x) { return 1.f / sqrtf(x); }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __frcp_rn(float x) { return 1.f / x; }
inline float __saturatef(float x) { return x != x ? 0.f : (x < 0.f ? 0.f : (x > 1.f ? 1.f : x)); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
// Never contracted into an fma with a neighbouring operation: that is what the _rn forms are for.
__attribute__((noinline)) inline float __fadd_rn(float a, float b) { return a + b; }
__attribute__((noinline)) inline float __fsub_rn(float a, float b) { return a - b; }
__attribute__((noinline)) inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }

// ---- half precision (storage and conversions; the kernels compute in float32) ---------------------

struct __half_raw
{
    unsigned short x;
};

namespace cuda_emu
{
// float32 -> binary16, rounding to nearest even (or toward zero); NaN -> the canonical 0x7FFF.
inline unsigned short floatToHalfBits(float f, bool towardZero = false)
{
    uint32_t bits;
    memcpy(&bits, &f, 4);
    unsigned short const sign = static_cast<unsigned short>((bits >> 16) & 0x8000u);
    uint32_t const magnitude = bits & 0x7FFFFFFFu;
    if (magnitude > 0x7F800000u)
    {
        return 0x7FFF;
    }
    if (magnitude == 0x7F800000u)
    {
        return sign | 0x7C00;
    }
    int const exponent = static_cast<int>(magnitude >> 23) - 127; // of a normal float
    if (exponent >= 16)
    {
        return sign | (towardZero ? 0x7BFF : 0x7C00);
    }
    // The magnitude as an integer count of units of the half result's last place, plus the
    // remainder below it: normals keep 10 fraction bits, subnormals (below 2^-14) units of 2^-24.
    uint32_t const significand = magnitude < 0x00800000u ? 0 : ((magnitude & 0x007FFFFFu) | 0x00800000u);
    int const shift = exponent >= -14 ? 13 : 13 + (-14 - exponent); // bits dropped from the significand
    if (shift > 24)
    {
        return sign; // below half of the smallest subnormal
    }
    uint32_t units = significand >> shift;
    uint32_t const rest = significand & ((1u << shift) - 1u);
    uint32_t const halfway = 1u << (shift - 1);
    if (!towardZero && (rest > halfway || (rest == halfway && (units & 1u))))
    {
        ++units; // may carry into the exponent: still the right encoding
    }
    uint32_t const biased = exponent >= -14 ? static_cast<uint32_t>(exponent + 15) : 0u;
    uint32_t const encoded = exponent >= -14 ? ((biased << 10) + (units - 0x400u)) : units;
    if (encoded >= 0x7C00u)
    {
        return sign | (towardZero ? 0x7BFF : 0x7C00);
    }
    return static_cast<unsigned short>(sign | encoded);
}

inline float halfBitsToFloat(unsigned short h)
{
    uint32_t const sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    uint32_t const exponent = (h >> 10) & 0x1Fu;
    uint32_t const fraction = h & 0x3FFu;
    uint32_t bits;
    if (exponent == 0x1F)
    {
        bits = sign | 0x7F800000u | (fraction << 13);
    }
    else if (exponent != 0)
    {
        bits = sign | ((exponent + 112u) << 23) | (fraction << 13);
    }
    else
    {
        float const magnitude = static_cast<float>(fraction) * 5.9604644775390625e-8f; // exact: 2^-24 units
        memcpy(&bits, &magnitude, 4);
        bits |= sign;
    }
    float out;
    memcpy(&out, &bits, 4);
    return out;
}
} // namespace cuda_emu

struct __half
{
    unsigned short __x;
    __half() = default;
    __half(__half_raw r) : __x(r.x) {}
    // cuda_fp16.hpp's implicit conversions (present unless __CUDA_NO_HALF_CONVERSIONS__).
    __half(float f) : __x(::cuda_emu::floatToHalfBits(f)) {}
    __half(double f) : __x(::cuda_emu::floatToHalfBits(static_cast<float>(f))) {}
    __half(int v) : __x(::cuda_emu::floatToHalfBits(static_cast<float>(v))) {} // exact below 2^24
    operator float() const { return ::cuda_emu::halfBitsToFloat(__x); }
    operator __half_raw() const { return __half_raw{__x}; }
};
static_assert(sizeof(__half) == 2 && std::is_trivially_copyable<__half>::value, "__half is 2 plain bytes");

struct alignas(4) __half2
{
    __half x;
    __half y;
};

inline __half __float2half(float f) { return __half_raw{::cuda_emu::floatToHalfBits(f)}; }
inline __half __float2half_rn(float f) { return __half_raw{::cuda_emu::floatToHalfBits(f)}; }
inline __half __float2half_rz(float f) { return __half_raw{::cuda_emu::floatToHalfBits(f, true)}; }
inline float __half2float(__half h) { return ::cuda_emu::halfBitsToFloat(h.__x); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline short __half_as_short(__half h) { return static_cast<short>(h.__x); }
inline __half __ushort_as_half(unsigned short v) { return __half_raw{v}; }
inline __half __short_as_half(short v) { return __half_raw{static_cast<unsigned short>(v)}; }
inline __half2 __halves2half2(__half a, __half b) { return __half2{a, b}; }
inline __half2 __floats2half2_rn(float a, float b) { return __half2{__float2half_rn(a), __float2half_rn(b)}; }
inline __half2 __float2half2_rn(float a) { return __half2{__float2half_rn(a), __float2half_rn(a)}; }
inline float2 __half22float2(__half2 h) { return float2{__half2float(h.x), __half2float(h.y)}; }
inline float __low2float(__half2 h) { return __half2float(h.x); }
inline float __high2float(__half2 h) { return __half2float(h.y); }
inline __half __low2half(__half2 h) { return h.x; }
inline __half __high2half(__half2 h) { return h.y; }
// Sums and products of two halves are exact in float32 before the one rounding to half (float's
// 24 bits >= 2 * 11 + 2: the double rounding is innocuous).
inline __half __hadd(__half a, __half b) { return __float2half_rn(__half2float(a) + __half2float(b)); }
inline __half __hsub(__half a, __half b) { return __float2half_rn(__half2float(a) - __half2float(b)); }
inline __half __hmul(__half a, __half b) { return __float2half_rn(__half2float(a) * __half2float(b)); }
