// The CPU side of cuda_emulation.h: fibers for CUDA threads, the block scheduler with its barriers
// and warp collectives, per-block shared memory, guarded "device" allocations and the CUDA runtime
// calls the kernels' launchers and the tests make. One OS thread runs everything (a mutex keeps
// launches from two host threads apart); blocks run one after another.
#include "cuda_emulation.h"

#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <cstdarg>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace cuda_emu
{
namespace detail
{
ThreadIds* current = nullptr;
GridIds grid{};
} // namespace detail

namespace
{

// ---- fibers ---------------------------------------------------------------------------------------
// x86-64: a hand-written switch that saves the callee-saved registers and the FP control words on
// the old stack and pops them from the new one (glibc's swapcontext makes a signal-mask system call
// per switch, and a kernel test switches millions of times). Elsewhere: ucontext.

constexpr size_t kStackBytes = 256 * 1024; // per CUDA thread; a guard page below catches overflow

struct FiberContext
{
#if defined(__x86_64__)
    void* sp = nullptr;
#else
    ucontext_t context;
#endif
};

using FiberEntry = void (*)(void*);

#if defined(__x86_64__)
extern "C" void cuda_emu_switch(void** save, void* load) __attribute__((visibility("hidden")));
extern "C" void cuda_emu_fiber_start() __attribute__((visibility("hidden")));
asm(R"(
    .text
    .p2align 4
    .hidden cuda_emu_switch
    .type cuda_emu_switch, @function
cuda_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size cuda_emu_switch, .-cuda_emu_switch

    .p2align 4
    .hidden cuda_emu_fiber_start
    .type cuda_emu_fiber_start, @function
cuda_emu_fiber_start:
    movq %r12, %rdi
    callq *%r13
    ud2
    .size cuda_emu_fiber_start, .-cuda_emu_fiber_start
)");

inline void switchContext(FiberContext& from, FiberContext& to)
{
    cuda_emu_switch(&from.sp, to.sp);
}

// A new fiber's stack, laid out as cuda_emu_switch leaves a suspended one: it "returns" into
// cuda_emu_fiber_start, which calls entry(argument) with a 16-byte aligned stack.
void prepareFiber(FiberContext& fiber, unsigned char* stackTop, FiberEntry entry, void* argument)
{
    uint64_t* top = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(stackTop) & ~uintptr_t{15});
    uint32_t controlWords[2];
    __asm__ __volatile__("stmxcsr %0\n\tfnstcw %1" : "=m"(controlWords[0]), "=m"(controlWords[1]));
    top[-1] = reinterpret_cast<uint64_t>(&cuda_emu_fiber_start);
    top[-2] = 0;                                    // rbp
    top[-3] = 0;                                    // rbx
    top[-4] = reinterpret_cast<uint64_t>(argument); // r12
    top[-5] = reinterpret_cast<uint64_t>(entry);    // r13
    top[-6] = 0;                                    // r14
    top[-7] = 0;                                    // r15
    top[-8] = controlWords[0] | (static_cast<uint64_t>(controlWords[1] & 0xFFFFu) << 32);
    fiber.sp = top - 8;
}
#else
inline void switchContext(FiberContext& from, FiberContext& to)
{
    swapcontext(&from.context, &to.context);
}

void trampoline(unsigned entryHigh, unsigned entryLow, unsigned argHigh, unsigned argLow)
{
    auto entry = reinterpret_cast<FiberEntry>((static_cast<uintptr_t>(entryHigh) << 32) | entryLow);
    entry(reinterpret_cast<void*>((static_cast<uintptr_t>(argHigh) << 32) | argLow));
}

void prepareFiber(FiberContext& fiber, unsigned char* stackTop, FiberEntry entry, void* argument)
{
    getcontext(&fiber.context);
    fiber.context.uc_stack.ss_sp = stackTop - kStackBytes;
    fiber.context.uc_stack.ss_size = kStackBytes;
    fiber.context.uc_link = nullptr;
    uintptr_t const e = reinterpret_cast<uintptr_t>(entry);
    uintptr_t const a = reinterpret_cast<uintptr_t>(argument);
    makecontext(&fiber.context, reinterpret_cast<void (*)()>(trampoline), 4, static_cast<unsigned>(e >> 32),
        static_cast<unsigned>(e), static_cast<unsigned>(a >> 32), static_cast<unsigned>(a));
}
#endif

// Stacks are made once and reused by every later block and launch.
std::vector<unsigned char*> g_stacks; // top of each

unsigned char* stackTop(size_t index)
{
    while (g_stacks.size() <= index)
    {
        size_t const page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
        void* base = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE,
            MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (base == MAP_FAILED)
        {
            fprintf(stderr, "cuda emulation: cannot map a fiber stack\n");
            abort();
        }
        mprotect(base, page, PROT_NONE); // overflow faults instead of corrupting the next stack
        g_stacks.push_back(static_cast<unsigned char*>(base) + page + kStackBytes);
    }
    return g_stacks[index];
}

// ---- state ----------------------------------------------------------------------------------------

enum class State : unsigned char
{
    Runnable,
    Running,
    AtBarrier,
    AtWarp,
    Exited
};

struct Thread : ThreadIds
{
    int id = 0;
    int warp = 0;
    int lane = 0;
    State state = State::Runnable;
    FiberContext fiber;
    // the warp collective it waits at
    WarpOp op = WarpOp::SyncWarp;
    unsigned mask = 0;
    int argument = 0;
    int width = 32;
    int valueBytes = 0;
    unsigned long long value = 0;
    unsigned long long result = 0;
    Site site{"", 0};
    int predicate = 0; // of a reducing barrier
};

struct Warp
{
    unsigned lanes = 0;   // lanes that exist (a last, partial warp has fewer)
    unsigned exited = 0;
    unsigned waiting = 0; // lanes waiting at a collective
    bool uniform = true;  // every waiting lane has the same op and mask (the common, fast case)
    WarpOp op = WarpOp::SyncWarp;
    unsigned mask = 0;
};

constexpr size_t kStaticSharedLimit = 48 * 1024; // per block, as on every GPU without opt-in
constexpr size_t kDynamicSharedLimit = 48 * 1024;

struct Block
{
    std::vector<Thread> threads;
    std::vector<Warp> warps;
    int count = 0;
    int exited = 0;
    int firstExited = -1;
    int atBarrier = 0;
    Site barrierSite{"", 0};
    int barrierReduce = 0;
    int barrierValue = 0;
    std::vector<unsigned> runnable; // per warp, the lanes that may run
    int currentWarp = -1;           // the warp the random policy keeps running
    // shared memory: the static variables, then the launch's dynamic bytes
    alignas(64) unsigned char arena[kStaticSharedLimit + kDynamicSharedLimit];
    size_t staticUsed = 0;
    std::vector<std::pair<void const*, void*>> variables;
};

std::mutex g_lock;
Block g_block;
FiberContext g_scheduler;
void (*g_body)(void*) = nullptr;
void* g_bodyContext = nullptr;
char const* g_kernel = "";
bool g_failed = false;
std::string g_message;               // what stopped the last failed launch
cudaError_t g_sticky = cudaSuccess;  // a failed launch: every later call reports it
cudaError_t g_last = cudaSuccess;    // cudaGetLastError's
int g_policy = CUDA_EMU_SCHEDULE_RANDOM;
unsigned long long g_seed = 0x9E3779B97F4A7C15ull;
unsigned long long g_launches = 0;   // since the last cuda_emu_set_schedule: seeds each launch
unsigned long long g_random = 1;
unsigned long long g_switches = 0;
int g_major = 6;
int g_minor = 1;
int g_multiprocessors = 3; // an MX250: Pascal SM 6.1, the project's target

std::string format(char const* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string format(char const* fmt, ...)
{
    char buffer[1024];
    va_list args;
    va_start(args, fmt);
    vsnprintf(buffer, sizeof(buffer), fmt, args);
    va_end(args);
    return buffer;
}

std::string where(Site s)
{
    char const* slash = strrchr(s.file, '/');
    return format("%s:%d", slash ? slash + 1 : s.file, s.line);
}

bool sameSite(Site a, Site b)
{
    return a.line == b.line && (a.file == b.file || strcmp(a.file, b.file) == 0);
}

char const* opName(WarpOp op)
{
    switch (op)
    {
    case WarpOp::ShuffleIndex: return "__shfl_sync";
    case WarpOp::ShuffleUp: return "__shfl_up_sync";
    case WarpOp::ShuffleDown: return "__shfl_down_sync";
    case WarpOp::ShuffleXor: return "__shfl_xor_sync";
    case WarpOp::All: return "__all_sync";
    case WarpOp::Any: return "__any_sync";
    case WarpOp::Ballot: return "__ballot_sync";
    case WarpOp::SyncWarp: return "__syncwarp";
    }
    return "?";
}

std::string describe(Thread const& t)
{
    return format("thread (%u,%u,%u) (warp %d lane %d)", t.index.x, t.index.y, t.index.z, t.warp, t.lane);
}

std::string blockName()
{
    uint3 const b = detail::grid.block;
    return format("%s, block (%u,%u,%u)", g_kernel, b.x, b.y, b.z);
}

Thread& self()
{
    if (detail::current == nullptr)
    {
        fprintf(stderr, "cuda emulation: device code called outside a kernel launch\n");
        abort();
    }
    return *static_cast<Thread*>(detail::current);
}

// Stops the launch from inside a thread: its fiber (and every other of the launch) is never resumed.
[[noreturn]] void fail(Thread& t, std::string const& what)
{
    if (!g_failed)
    {
        g_failed = true;
        g_message = blockName() + ", " + describe(t) + ": " + what;
    }
    switchContext(t.fiber, g_scheduler);
    __builtin_trap();
}

void makeRunnable(Thread& t)
{
    t.state = State::Runnable;
    g_block.runnable[static_cast<size_t>(t.warp)] |= 1u << t.lane;
}

unsigned nextRandom()
{
    g_random ^= g_random << 13; // xorshift64
    g_random ^= g_random >> 7;
    g_random ^= g_random << 17;
    return static_cast<unsigned>(g_random >> 32);
}

// The next thread to run, -1 when none may. RANDOM keeps running one warp, its lanes in random
// order, until none of them can go on, then takes another warp at random: warps drift apart as
// they do on a GPU, so a warp racing past a missing barrier meets the others' unfinished work.
int pickRunnable()
{
    Block& b = g_block;
    int const warps = static_cast<int>(b.runnable.size());
    int warp = -1;
    if (g_policy == CUDA_EMU_SCHEDULE_FORWARD || g_policy == CUDA_EMU_SCHEDULE_REVERSE)
    {
        bool const forward = g_policy == CUDA_EMU_SCHEDULE_FORWARD;
        for (int i = 0; i < warps && warp < 0; ++i)
        {
            int const w = forward ? i : warps - 1 - i;
            warp = b.runnable[static_cast<size_t>(w)] != 0 ? w : -1;
        }
        if (warp < 0)
        {
            return -1;
        }
        unsigned const lanes = b.runnable[static_cast<size_t>(warp)];
        int const lane = forward ? __builtin_ctz(lanes) : 31 - __builtin_clz(lanes);
        b.runnable[static_cast<size_t>(warp)] &= ~(1u << lane);
        return warp * 32 + lane;
    }
    if (b.currentWarp >= 0 && b.runnable[static_cast<size_t>(b.currentWarp)] != 0)
    {
        warp = b.currentWarp;
    }
    else
    {
        int ready = 0;
        for (unsigned lanes : b.runnable)
        {
            ready += lanes != 0;
        }
        if (ready == 0)
        {
            return -1;
        }
        int pick = static_cast<int>(nextRandom() % static_cast<unsigned>(ready));
        for (warp = 0;; ++warp)
        {
            if (b.runnable[static_cast<size_t>(warp)] != 0 && pick-- == 0)
            {
                break;
            }
        }
        b.currentWarp = warp;
    }
    unsigned lanes = b.runnable[static_cast<size_t>(warp)];
    for (unsigned skip = nextRandom() % static_cast<unsigned>(__builtin_popcount(lanes)); skip > 0; --skip)
    {
        lanes &= lanes - 1; // drop the lowest runnable lane
    }
    int const lane = __builtin_ctz(lanes);
    b.runnable[static_cast<size_t>(warp)] &= ~(1u << lane);
    return warp * 32 + lane;
}

void yieldToScheduler(Thread& t)
{
    switchContext(t.fiber, g_scheduler);
}

// ---- warp collectives -----------------------------------------------------------------------------

bool isShuffle(WarpOp op)
{
    return op == WarpOp::ShuffleIndex || op == WarpOp::ShuffleUp || op == WarpOp::ShuffleDown
        || op == WarpOp::ShuffleXor;
}

// The lane a shuffle reads, as PTX's shfl.sync defines it for the width's segment; own lane when
// the source falls outside the segment (up, down, xor to a later segment). Only the low five bits
// of the lane/delta operand count.
int sourceLane(Thread const& t)
{
    int const lane = t.lane;
    int const b = t.argument & 31;
    int const minLane = lane & ~(t.width - 1);
    int const maxLane = minLane + t.width - 1;
    switch (t.op)
    {
    case WarpOp::ShuffleIndex: return minLane | (b & (t.width - 1));
    case WarpOp::ShuffleUp: return lane - b >= minLane ? lane - b : lane;
    case WarpOp::ShuffleDown: return lane + b <= maxLane ? lane + b : lane;
    case WarpOp::ShuffleXor: return (lane ^ b) <= maxLane ? (lane ^ b) : lane;
    default: return lane;
    }
}

// Every lane of `live` (the non-exited lanes of one collective's mask) waits: check that they agree
// on it, compute the results and let them go. `caller` reports errors.
void completeWarp(Thread& caller, Warp& w, int warp, unsigned live)
{
    Thread* lanes = &g_block.threads[static_cast<size_t>(warp) * 32];
    int first = __builtin_ctz(live);
    Thread const& leader = lanes[first];
    for (unsigned m = live; m != 0; m &= m - 1)
    {
        Thread const& t = lanes[__builtin_ctz(m)];
        if (t.op != leader.op || t.mask != leader.mask)
        {
            fail(caller, format("lanes of warp %d disagree: lane %d is at %s(mask 0x%08x) at %s, lane %d at "
                                "%s(mask 0x%08x) at %s",
                              warp, leader.lane, opName(leader.op), leader.mask, where(leader.site).c_str(), t.lane,
                              opName(t.op), t.mask, where(t.site).c_str()));
        }
    }
    if (isShuffle(leader.op))
    {
        for (unsigned m = live; m != 0; m &= m - 1)
        {
            Thread& t = lanes[__builtin_ctz(m)];
            int const source = sourceLane(t);
            if (source != t.lane)
            {
                if (!((t.mask >> source) & 1u))
                {
                    fail(caller, format("lane %d's %s at %s reads lane %d, outside its mask 0x%08x (undefined value)",
                                      t.lane, opName(t.op), where(t.site).c_str(), source, t.mask));
                }
                if (!((live >> source) & 1u))
                {
                    fail(caller, format("lane %d's %s at %s reads lane %d, which has exited or does not exist "
                                        "(undefined value)",
                                      t.lane, opName(t.op), where(t.site).c_str(), source));
                }
                if (lanes[source].valueBytes != t.valueBytes)
                {
                    fail(caller, format("lane %d's %s at %s reads a %d-byte value from lane %d, which shuffles %d "
                                        "bytes",
                                      t.lane, opName(t.op), where(t.site).c_str(), t.valueBytes, source,
                                      lanes[source].valueBytes));
                }
            }
        }
        for (unsigned m = live; m != 0; m &= m - 1)
        {
            Thread& t = lanes[__builtin_ctz(m)];
            t.result = lanes[sourceLane(t)].value;
        }
    }
    else if (leader.op != WarpOp::SyncWarp)
    {
        unsigned ballot = 0;
        for (unsigned m = live; m != 0; m &= m - 1)
        {
            int const lane = __builtin_ctz(m);
            ballot |= lanes[lane].value != 0 ? 1u << lane : 0u;
        }
        unsigned long long const result = leader.op == WarpOp::Ballot ? ballot
            : leader.op == WarpOp::All                                 ? (ballot == live ? 1 : 0)
                                                                       : (ballot != 0 ? 1 : 0);
        for (unsigned m = live; m != 0; m &= m - 1)
        {
            lanes[__builtin_ctz(m)].result = result;
        }
    }
    w.waiting &= ~live;
    w.uniform = false; // re-derived at the next arrival into an empty warp
    for (unsigned m = live; m != 0; m &= m - 1)
    {
        makeRunnable(lanes[__builtin_ctz(m)]);
    }
}

// The group of `mask` is complete when every lane of it that has not exited waits.
void tryComplete(Thread& caller, Warp& w, int warp, unsigned mask)
{
    unsigned const live = mask & w.lanes & ~w.exited;
    if (live != 0 && (w.waiting & live) == live)
    {
        completeWarp(caller, w, warp, live);
    }
}

// Lanes of one warp that name each other must be at the same collective with the same mask.
void checkAgreement(Thread& t, Warp& w)
{
    Thread* lanes = &g_block.threads[static_cast<size_t>(t.warp) * 32];
    for (unsigned m = w.waiting & ~(1u << t.lane); m != 0; m &= m - 1)
    {
        Thread const& o = lanes[__builtin_ctz(m)];
        bool const related = ((o.mask >> t.lane) & 1u) || ((t.mask >> o.lane) & 1u);
        if (related && (o.op != t.op || o.mask != t.mask))
        {
            fail(t, format("lanes of warp %d disagree: lane %d is at %s(mask 0x%08x) at %s, lane %d at %s(mask "
                           "0x%08x) at %s",
                         t.warp, o.lane, opName(o.op), o.mask, where(o.site).c_str(), t.lane, opName(t.op), t.mask,
                         where(t.site).c_str()));
        }
    }
}

// A lane exited: groups that waited for it may now be complete.
void retryWarp(Thread& caller, Warp& w, int warp)
{
    Thread* lanes = &g_block.threads[static_cast<size_t>(warp) * 32];
    while (w.waiting != 0)
    {
        unsigned const before = w.waiting;
        for (unsigned m = w.waiting; m != 0; m &= m - 1)
        {
            tryComplete(caller, w, warp, lanes[__builtin_ctz(m)].mask);
            if (w.waiting != before)
            {
                break;
            }
        }
        if (w.waiting == before)
        {
            return;
        }
    }
}

// ---- the block ------------------------------------------------------------------------------------

void releaseBarrier()
{
    Block& b = g_block;
    for (int i = 0; i < b.count; ++i) // (b.threads may be longer: kept from larger blocks)
    {
        Thread& t = b.threads[static_cast<size_t>(i)];
        if (t.state == State::AtBarrier)
        {
            t.result = static_cast<unsigned long long>(b.barrierValue);
            makeRunnable(t);
        }
    }
    b.atBarrier = 0;
    b.currentWarp = -1; // a new phase starts with a warp picked afresh
}

void onExit(Thread& t)
{
    Block& b = g_block;
    t.state = State::Exited;
    ++b.exited;
    if (b.firstExited < 0)
    {
        b.firstExited = t.id;
    }
    Warp& w = b.warps[static_cast<size_t>(t.warp)];
    w.exited |= 1u << t.lane;
    if (b.atBarrier > 0)
    {
        fail(t, format("exits while %d threads of the block wait at __syncthreads() at %s (a barrier must be "
                       "reached by every thread of the block)",
                     b.atBarrier, where(b.barrierSite).c_str()));
    }
    if (w.waiting != 0)
    {
        retryWarp(t, w, t.warp);
    }
}

void fiberMain(void* argument)
{
    Thread& t = *static_cast<Thread*>(argument);
    g_body(g_bodyContext);
    onExit(t);
    switchContext(t.fiber, g_scheduler); // never resumed
    __builtin_trap();
}

std::string deadlockReport()
{
    Block& b = g_block;
    std::string out = format("deadlock: %d of %d threads have exited", b.exited, b.count);
    if (b.atBarrier > 0)
    {
        out += format(", %d wait at __syncthreads() at %s", b.atBarrier, where(b.barrierSite).c_str());
    }
    for (size_t w = 0; w < b.warps.size(); ++w)
    {
        Warp const& warp = b.warps[w];
        for (unsigned m = warp.waiting; m != 0; m &= m - 1)
        {
            Thread const& t = b.threads[w * 32 + static_cast<size_t>(__builtin_ctz(m))];
            unsigned const missing = t.mask & warp.lanes & ~warp.exited & ~warp.waiting;
            out += format("; warp %zu lane %d waits at %s(mask 0x%08x) at %s for lanes 0x%08x", w, t.lane,
                opName(t.op), t.mask, where(t.site).c_str(), missing);
            break; // one lane per warp says enough
        }
    }
    return out;
}

void runBlock(unsigned count)
{
    Block& b = g_block;
    b.count = static_cast<int>(count);
    b.exited = 0;
    b.firstExited = -1;
    b.atBarrier = 0;
    b.currentWarp = -1;
    b.staticUsed = 0;
    b.variables.clear();
    if (b.threads.size() < count)
    {
        b.threads.resize(count);
    }
    b.warps.assign((count + 31) / 32, Warp{});
    b.runnable.assign((count + 31) / 32, 0u);
    dim3 const dim = detail::grid.blockSize;
    for (unsigned i = 0; i < count; ++i)
    {
        Thread& t = b.threads[i];
        t.index = uint3{i % dim.x, (i / dim.x) % dim.y, i / (dim.x * dim.y)};
        t.id = static_cast<int>(i);
        t.warp = static_cast<int>(i / 32);
        t.lane = static_cast<int>(i % 32);
        t.state = State::Runnable;
        prepareFiber(t.fiber, stackTop(i), &fiberMain, &t);
        b.runnable[i / 32] |= 1u << (i % 32);
        b.warps[i / 32].lanes |= 1u << (i % 32);
    }
    while (!g_failed)
    {
        int const id = pickRunnable();
        if (id < 0)
        {
            break;
        }
        Thread& t = b.threads[static_cast<size_t>(id)];
        t.state = State::Running;
        detail::current = &t;
        ++g_switches;
        switchContext(g_scheduler, t.fiber); // back when t waits, exits or fails
    }
    detail::current = nullptr;
    if (!g_failed && b.exited < b.count)
    {
        g_failed = true;
        g_message = blockName() + ": " + deadlockReport();
    }
}

// ---- device memory --------------------------------------------------------------------------------
// Host memory with 256 guard bytes on both sides (and the padding up to the next 256 bytes after
// the end), checked after every launch: a kernel writing just past a buffer fails the launch.

constexpr size_t kGuard = 256;
constexpr unsigned char kGuardByte = 0xA5;

struct Allocation
{
    unsigned char* base;
    size_t bytes;
    size_t padded; // bytes rounded up to 256
};

std::map<uintptr_t, Allocation> g_allocations; // by the pointer cudaMalloc returned

size_t roundUp(size_t v, size_t to)
{
    return (v + to - 1) / to * to;
}

// The allocation holding [p, p + bytes), or nullptr.
Allocation const* findAllocation(void const* p, size_t bytes)
{
    uintptr_t const address = reinterpret_cast<uintptr_t>(p);
    auto it = g_allocations.upper_bound(address);
    if (it == g_allocations.begin())
    {
        return nullptr;
    }
    --it;
    bool const inside = address >= it->first && address - it->first <= it->second.bytes
        && bytes <= it->second.bytes - (address - it->first);
    return inside ? &it->second : nullptr;
}

// Describes the first damaged guard and repairs every one, so that a damage is reported once.
std::string checkGuards()
{
    std::string found;
    for (auto const& entry : g_allocations)
    {
        Allocation const& a = entry.second;
        unsigned char* user = a.base + kGuard;
        for (size_t i = 0; i < kGuard; ++i)
        {
            if (a.base[i] != kGuardByte && found.empty())
            {
                found = format("wrote before the start of a %zu-byte cudaMalloc allocation (at byte -%zu)", a.bytes,
                    kGuard - i);
            }
        }
        for (size_t i = a.bytes; i < a.padded + kGuard; ++i)
        {
            if (user[i] != kGuardByte && found.empty())
            {
                found = format("wrote past the end of a %zu-byte cudaMalloc allocation (at byte %zu)", a.bytes, i);
            }
        }
        if (!found.empty())
        {
            memset(a.base, kGuardByte, kGuard);
            memset(user + a.bytes, kGuardByte, a.padded - a.bytes + kGuard);
        }
    }
    return found;
}

cudaError_t report(cudaError_t error)
{
    if (error != cudaSuccess)
    {
        g_last = error;
    }
    return error;
}

bool deviceRange(void const* p, size_t bytes)
{
    return bytes == 0 || findAllocation(p, bytes) != nullptr;
}

} // namespace

// ---- the device API of cuda_emulation.h ---------------------------------------------------------

int barrier(Site site, int predicate, int reduce)
{
    Thread& t = self();
    Block& b = g_block;
    if (b.exited > 0)
    {
        fail(t, format("reaches __syncthreads() at %s after %d thread(s) of the block exited (first %s): a barrier "
                       "must be reached by every thread of the block",
                     where(site).c_str(), b.exited, describe(b.threads[static_cast<size_t>(b.firstExited)]).c_str()));
    }
    if (b.atBarrier == 0)
    {
        b.barrierSite = site;
        b.barrierReduce = reduce;
        b.barrierValue = reduce == 2 ? 1 : 0;
    }
    else if (!sameSite(site, b.barrierSite))
    {
        fail(t, format("waits at __syncthreads() at %s while %d threads wait at the one at %s (divergent barriers)",
                     where(site).c_str(), b.atBarrier, where(b.barrierSite).c_str()));
    }
    if (reduce != b.barrierReduce)
    {
        fail(t, "threads disagree on the kind of __syncthreads_count/_and/_or at " + where(site));
    }
    bool const p = predicate != 0;
    b.barrierValue = reduce == 1 ? b.barrierValue + p : (reduce == 2 ? (b.barrierValue && p) : (b.barrierValue || p));
    t.state = State::AtBarrier;
    if (++b.atBarrier == b.count)
    {
        releaseBarrier();
    }
    yieldToScheduler(t);
    return static_cast<int>(t.result);
}

unsigned long long warpCollective(
    Site site, WarpOp op, unsigned mask, unsigned long long value, int valueBytes, int argument, int width)
{
    Thread& t = self();
    Block& b = g_block;
    Warp& w = b.warps[static_cast<size_t>(t.warp)];
    unsigned const bit = 1u << t.lane;
    if (!(mask & bit))
    {
        fail(t, format("%s at %s with mask 0x%08x, which leaves out the calling lane %d", opName(op),
                     where(site).c_str(), mask, t.lane));
    }
    if (isShuffle(op) && (width < 1 || width > 32 || (width & (width - 1)) != 0))
    {
        fail(t, format("%s at %s with width %d: not a power of two in [1, 32]", opName(op), where(site).c_str(),
                     width));
    }
    t.op = op;
    t.mask = mask;
    t.value = value;
    t.valueBytes = valueBytes;
    t.argument = argument;
    t.width = width;
    t.site = site;
    t.state = State::AtWarp;
    if (w.waiting == 0)
    {
        w.uniform = true;
        w.op = op;
        w.mask = mask;
    }
    else if (w.uniform && (w.op != op || w.mask != mask))
    {
        w.uniform = false;
    }
    if (!w.uniform)
    {
        checkAgreement(t, w);
    }
    w.waiting |= bit;
    tryComplete(t, w, t.warp, mask);
    yieldToScheduler(t);
    return t.result;
}

unsigned activeMask()
{
    Thread& t = self();
    Warp const& w = g_block.warps[static_cast<size_t>(t.warp)];
    return w.lanes & ~w.exited;
}

void trap(Site site, char const* what)
{
    fail(self(), format("%s at %s", what, where(site).c_str()));
}

void* sharedAllocate(void const* tag, size_t bytes, size_t alignment)
{
    Block& b = g_block;
    for (auto const& v : b.variables)
    {
        if (v.first == tag)
        {
            return v.second;
        }
    }
    size_t const offset = roundUp(b.staticUsed, alignment);
    if (offset + bytes > kStaticSharedLimit)
    {
        fail(self(), format("static __shared__ memory of the block reaches %zu bytes, over the 48 KiB limit",
                         offset + bytes));
    }
    void* p = b.arena + offset;
    memset(p, 0xFF, bytes); // uninitialised: NaN floats, -1 integers
    b.staticUsed = offset + bytes;
    b.variables.emplace_back(tag, p);
    return p;
}

void* dynamicShared()
{
    return g_block.arena + kStaticSharedLimit;
}

void launchGrid(char const* name, LaunchConfig const& config, void (*body)(void*), void* context)
{
    std::lock_guard<std::mutex> lock(g_lock);
    if (g_sticky != cudaSuccess)
    {
        return; // the context is lost after a failed launch, as after a device fault
    }
    dim3 const grid = config.grid;
    dim3 const block = config.block;
    unsigned long long const threads = static_cast<unsigned long long>(block.x) * block.y * block.z;
    if (block.x == 0 || block.y == 0 || block.z == 0 || block.x > 1024 || block.y > 1024 || block.z > 64
        || threads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7FFFFFFFu || grid.y > 65535
        || grid.z > 65535)
    {
        report(cudaErrorInvalidConfiguration);
        return;
    }
    if (config.sharedBytes > kDynamicSharedLimit)
    {
        report(cudaErrorInvalidValue);
        return;
    }
    g_kernel = name;
    g_body = body;
    g_bodyContext = context;
    g_failed = false;
    g_random = (g_seed ^ (0xD1B54A32D192ED03ull * ++g_launches)) | 1;
    detail::grid.blockSize = block;
    detail::grid.gridSize = grid;
    for (unsigned z = 0; z < grid.z && !g_failed; ++z)
    {
        for (unsigned y = 0; y < grid.y && !g_failed; ++y)
        {
            for (unsigned x = 0; x < grid.x && !g_failed; ++x)
            {
                detail::grid.block = uint3{x, y, z};
                memset(g_block.arena + kStaticSharedLimit, 0xFF, config.sharedBytes);
                runBlock(static_cast<unsigned>(threads));
            }
        }
    }
    if (!g_failed)
    {
        std::string const guard = checkGuards();
        if (!guard.empty())
        {
            g_failed = true;
            g_message = std::string(name) + ": " + guard;
        }
    }
    if (g_failed)
    {
        g_sticky = cudaErrorLaunchFailure;
        g_last = cudaErrorLaunchFailure;
        fprintf(stderr, "cuda emulation: %s\n", g_message.c_str());
    }
}

} // namespace cuda_emu

// ---- the CUDA runtime API -------------------------------------------------------------------------

using namespace cuda_emu;

extern "C" {

cudaError_t cudaMalloc(void** pointer, size_t bytes)
{
    std::lock_guard<std::mutex> lock(g_lock);
    if (g_sticky != cudaSuccess)
    {
        return g_sticky;
    }
    if (pointer == nullptr)
    {
        return report(cudaErrorInvalidValue);
    }
    size_t const padded = roundUp(bytes, 256);
    auto* base = static_cast<unsigned char*>(aligned_alloc(256, kGuard + padded + kGuard));
    if (base == nullptr)
    {
        return report(cudaErrorMemoryAllocation);
    }
    unsigned char* user = base + kGuard;
    memset(base, kGuardByte, kGuard);
    memset(user, 0xFF, bytes); // never zero: a kernel must write what it returns
    memset(user + bytes, kGuardByte, padded - bytes + kGuard);
    g_allocations[reinterpret_cast<uintptr_t>(user)] = Allocation{base, bytes, padded};
    *pointer = user;
    return cudaSuccess;
}

cudaError_t cudaFree(void* pointer)
{
    std::lock_guard<std::mutex> lock(g_lock);
    if (pointer == nullptr)
    {
        return cudaSuccess;
    }
    auto it = g_allocations.find(reinterpret_cast<uintptr_t>(pointer));
    if (it == g_allocations.end())
    {
        return report(cudaErrorInvalidValue);
    }
    free(it->second.base);
    g_allocations.erase(it);
    return g_sticky;
}

cudaError_t cudaMemcpy(void* dst, void const* src, size_t bytes, cudaMemcpyKind kind)
{
    std::lock_guard<std::mutex> lock(g_lock);
    if (g_sticky != cudaSuccess)
    {
        return g_sticky;
    }
    bool const toDevice = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice;
    bool const fromDevice = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice;
    if (kind < cudaMemcpyHostToHost || kind > cudaMemcpyDefault)
    {
        return report(cudaErrorInvalidMemcpyDirection);
    }
    if ((toDevice && !deviceRange(dst, bytes)) || (fromDevice && !deviceRange(src, bytes)))
    {
        return report(cudaErrorInvalidValue); // outside any allocation, or past its end
    }
    if (bytes != 0)
    {
        memmove(dst, src, bytes);
    }
    return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void* dst, void const* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t)
{
    return cudaMemcpy(dst, src, bytes, kind);
}

cudaError_t cudaMemset(void* pointer, int value, size_t bytes)
{
    std::lock_guard<std::mutex> lock(g_lock);
    if (g_sticky != cudaSuccess)
    {
        return g_sticky;
    }
    if (!deviceRange(pointer, bytes))
    {
        return report(cudaErrorInvalidValue);
    }
    if (bytes != 0)
    {
        memset(pointer, value, bytes);
    }
    return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void* pointer, int value, size_t bytes, cudaStream_t)
{
    return cudaMemset(pointer, value, bytes);
}

cudaError_t cudaDeviceSynchronize(void)
{
    return g_sticky;
}

cudaError_t cudaStreamSynchronize(cudaStream_t)
{
    return g_sticky;
}

cudaError_t cudaStreamCreate(cudaStream_t* stream)
{
    if (stream == nullptr)
    {
        return report(cudaErrorInvalidValue);
    }
    *stream = reinterpret_cast<cudaStream_t>(new char(0)); // launches are synchronous: any handle will do
    return cudaSuccess;
}

cudaError_t cudaStreamDestroy(cudaStream_t stream)
{
    delete reinterpret_cast<char*>(stream);
    return cudaSuccess;
}

cudaError_t cudaGetLastError(void)
{
    cudaError_t const e = g_sticky != cudaSuccess ? g_sticky : g_last;
    g_last = cudaSuccess;
    return e;
}

cudaError_t cudaPeekAtLastError(void)
{
    return g_sticky != cudaSuccess ? g_sticky : g_last;
}

char const* cudaGetErrorName(cudaError_t error)
{
    switch (error)
    {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInitializationError: return "cudaErrorInitializationError";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevicePointer: return "cudaErrorInvalidDevicePointer";
    case cudaErrorInvalidMemcpyDirection: return "cudaErrorInvalidMemcpyDirection";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
    case cudaErrorNotReady: return "cudaErrorNotReady";
    case cudaErrorIllegalAddress: return "cudaErrorIllegalAddress";
    case cudaErrorLaunchOutOfResources: return "cudaErrorLaunchOutOfResources";
    case cudaErrorAssert: return "cudaErrorAssert";
    case cudaErrorMisalignedAddress: return "cudaErrorMisalignedAddress";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    }
    return "cudaErrorUnknown";
}

char const* cudaGetErrorString(cudaError_t error)
{
    switch (error)
    {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInitializationError: return "initialization error";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevicePointer: return "invalid device pointer";
    case cudaErrorInvalidMemcpyDirection: return "invalid copy direction for memcpy";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    case cudaErrorNotReady: return "device not ready";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
    case cudaErrorAssert: return "device-side assert triggered";
    case cudaErrorMisalignedAddress: return "misaligned address";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    }
    return "unrecognized error code";
}

cudaError_t cudaGetDeviceCount(int* count)
{
    if (count == nullptr)
    {
        return report(cudaErrorInvalidValue);
    }
    *count = 1;
    return cudaSuccess;
}

cudaError_t cudaGetDevice(int* device)
{
    if (device == nullptr)
    {
        return report(cudaErrorInvalidValue);
    }
    *device = 0;
    return cudaSuccess;
}

cudaError_t cudaSetDevice(int device)
{
    return device == 0 ? cudaSuccess : report(cudaErrorInvalidDevice);
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int device)
{
    if (value == nullptr)
    {
        return report(cudaErrorInvalidValue);
    }
    if (device != 0)
    {
        return report(cudaErrorInvalidDevice);
    }
    switch (attribute)
    {
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; break;
    case cudaDevAttrMaxBlockDimX: *value = 1024; break;
    case cudaDevAttrMaxBlockDimY: *value = 1024; break;
    case cudaDevAttrMaxBlockDimZ: *value = 64; break;
    case cudaDevAttrMaxGridDimX: *value = 0x7FFFFFFF; break;
    case cudaDevAttrMaxGridDimY: *value = 65535; break;
    case cudaDevAttrMaxGridDimZ: *value = 65535; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = 48 * 1024; break;
    case cudaDevAttrWarpSize: *value = 32; break;
    case cudaDevAttrMultiProcessorCount: *value = g_multiprocessors; break;
    case cudaDevAttrComputeCapabilityMajor: *value = g_major; break;
    case cudaDevAttrComputeCapabilityMinor: *value = g_minor; break;
    default: return report(cudaErrorInvalidValue);
    }
    return cudaSuccess;
}

struct CUevent_st
{
    std::chrono::steady_clock::time_point at;
};

cudaError_t cudaEventCreate(cudaEvent_t* event)
{
    if (event == nullptr)
    {
        return report(cudaErrorInvalidValue);
    }
    *event = new CUevent_st{std::chrono::steady_clock::now()};
    return cudaSuccess;
}

cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t)
{
    if (event == nullptr)
    {
        return report(cudaErrorInvalidResourceHandle);
    }
    event->at = std::chrono::steady_clock::now(); // launches are synchronous: now is when work ended
    return g_sticky;
}

cudaError_t cudaEventSynchronize(cudaEvent_t event)
{
    return event == nullptr ? report(cudaErrorInvalidResourceHandle) : g_sticky;
}

cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t stop)
{
    if (ms == nullptr || start == nullptr || stop == nullptr)
    {
        return report(cudaErrorInvalidValue);
    }
    *ms = std::chrono::duration<float, std::milli>(stop->at - start->at).count();
    return cudaSuccess;
}

cudaError_t cudaEventDestroy(cudaEvent_t event)
{
    delete event;
    return cudaSuccess;
}

char const* cuda_emu_error_message(void)
{
    return g_message.c_str();
}

void cuda_emu_reset(void)
{
    std::lock_guard<std::mutex> lock(g_lock);
    g_sticky = cudaSuccess;
    g_last = cudaSuccess;
    g_message.clear();
}

void cuda_emu_set_schedule(int policy, unsigned long long seed)
{
    std::lock_guard<std::mutex> lock(g_lock);
    g_policy = policy;
    g_seed = seed;
    g_launches = 0;
}

void cuda_emu_set_device(int major, int minor, int multiprocessors)
{
    std::lock_guard<std::mutex> lock(g_lock);
    g_major = major;
    g_minor = minor;
    g_multiprocessors = multiprocessors;
}

unsigned long long cuda_emu_context_switches(void)
{
    return g_switches;
}

} // extern "C"
