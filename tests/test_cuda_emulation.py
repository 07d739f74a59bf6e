"""The CPU emulation of CUDA (tests/cuda_emulation) against CUDA's documented behaviour, one feature
at a time, through the small kernels of tests/cuda_emulation/primitives_test.cu: thread and block
indices, shuffles (every mode and width), votes, barriers, __syncwarp, shared memory (static,
dynamic, per block), atomics, __dp4a, half conversions, bit and conversion intrinsics, vector types
and launch configuration errors. The same checks run on a real GPU (backend "cuda", marked gpu), so
that the hardware confirms what the emulation assumes.

Then what only the emulation does, since on a GPU it is undefined behaviour: a shuffle reading a
lane outside its mask or an exited lane, a mask leaving out its caller, lanes at different
collectives, a barrier not reached by every thread, divergent barriers, a deadlock, too much shared
memory, a write past an allocation and __trap() each stop the launch with cudaErrorLaunchFailure and
a message saying what happened where (never a hang), and that error stays until reset, as a device
fault does. A kernel missing a barrier reads unwritten shared memory under each thread order.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from kernel_devices import BOTH, Cuda, Device, build_for_gpu, check, emulation_runtime, real_cuda  # noqa: F401

import cuda_emulation

PRIMITIVES = cuda_emulation.HERE / "primitives_test.cu"
LAUNCH_FAILURE = 719  # cudaErrorLaunchFailure
INVALID_CONFIGURATION = 9  # cudaErrorInvalidConfiguration
RANDOM, FORWARD, REVERSE = 0, 1, 2  # CUDA_EMU_SCHEDULE_*
EMULATED = ["emulated"]


def declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i, u = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint
    signatures = {
        "prim_indices": [p, u, u, u, u, u, u], "prim_shuffle_float": [i, i, p, p, p, i],
        "prim_shuffle_double": [i, i, p, p, p, i], "prim_vote": [u, p, p, i], "prim_reverse": [p, p, i, i, i],
        "prim_warp_rotate": [p, p, i], "prim_barrier_reduce": [p, p, i, i], "prim_shared_per_block": [p, i, i],
        "prim_dynamic_shared": [p, i, i], "prim_atomics": [p, p, p, p, i, i], "prim_dp4a": [p, p, p, p, p, i],
        "prim_half": [p, p, p, p, p, p, i], "prim_bits": [p, p, p, p, i], "prim_float_to_int": [p, p, i],
        "prim_math": [p, p, p, i], "prim_vectors": [p, p, p, p, i], "prim_launch": [u, u, u, u, u, u, u],
        "prim_racy": [p, i, i],
        "prim_layout": [p], "prim_bad_shuffle": [i, p], "prim_bad_barrier": [i, p], "prim_too_much_shared": [p],
        "prim_overrun": [p, i], "prim_uninitialised": [p], "prim_trap": [],
    }
    for name, argtypes in signatures.items():
        if hasattr(lib, name):  # the prim_bad_* ones exist in the emulation only
            getattr(lib, name).argtypes = argtypes
            getattr(lib, name).restype = ctypes.c_int
    return lib


@pytest.fixture(scope="session")
def emulated_primitives(emulation_runtime, tmp_path_factory) -> Cuda:
    library = cuda_emulation.build_file(tmp_path_factory.mktemp("primitives"), PRIMITIVES, runtime=emulation_runtime,
                                        name="primitives")
    cuda = Cuda(str(library), emulated=True)
    declare(cuda.lib)
    return cuda


@pytest.fixture(scope="session")
def gpu_primitives(real_cuda, tmp_path_factory) -> ctypes.CDLL:
    library = tmp_path_factory.mktemp("primitives") / "libprimitives.so"
    return declare(ctypes.CDLL(str(build_for_gpu(real_cuda, [PRIMITIVES], library))))


@pytest.fixture
def cuda(backend, request) -> Cuda:
    return request.getfixturevalue("real_cuda" if backend == "cuda" else "emulated_primitives")


@pytest.fixture
def prims(backend, request, cuda) -> ctypes.CDLL:
    return request.getfixturevalue("gpu_primitives") if backend == "cuda" else cuda.lib


@pytest.fixture
def device(cuda):
    arrays = Device(cuda)
    yield arrays
    arrays.close()
    if cuda.emulated:
        cuda.reset()
        cuda.lib.cuda_emu_set_schedule(RANDOM, 0x9E3779B97F4A7C15)


def run(device: Device, status: int, what: str) -> None:
    check(device.cuda, status, what)


# -- indices ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BOTH)
def test_thread_and_block_indices_cover_the_grid(prims, device):
    grid, block = (3, 2, 2), (5, 3, 2)
    threads = np.prod(grid) * np.prod(block)
    out = device.empty((threads, 12), np.uint32)
    run(device, prims.prim_indices(out.ptr, *grid, *block), "indices")
    # Blocks in x-fastest order, threads likewise inside each.
    bz, by, bx, tz, ty, tx = np.meshgrid(*(np.arange(n) for n in (*grid[::-1], *block[::-1])), indexing="ij")
    expected = np.stack([tx, ty, tz, bx, by, bz] + [np.full_like(tx, v) for v in (*block, *grid)], axis=-1)
    np.testing.assert_array_equal(out.numpy(), expected.reshape(threads, 12))


# -- warp collectives ---------------------------------------------------------------------------------

def documented_shuffle(mode: str, width: int, values: np.ndarray, args: np.ndarray) -> np.ndarray:
    """The CUDA C++ Programming Guide's warp shuffle functions, lane by lane."""
    out = np.empty_like(values)
    for i in range(len(values)):
        lane, warp = i % 32, i - i % 32
        first = lane // width * width  # the lane's subsection of `width` lanes
        a = int(args[i])
        if mode == "idx":  # srcLane outside [0, width) reads srcLane modulo width, in the subsection
            source = first + a % width
        elif mode == "up":  # the lower delta lanes of a subsection keep their value
            source = lane - a if lane - a >= first else lane
        elif mode == "down":  # the upper delta lanes keep theirs
            source = lane + a if lane + a < first + width else lane
        else:  # lane ^ laneMask; earlier subsections may be read, later ones give the own value
            source = lane ^ a if lane ^ a < first + width else lane
        out[i] = values[warp + source]
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["4-bytes", "8-bytes"])
@pytest.mark.parametrize("width", [32, 16, 8, 4, 2, 1])
@pytest.mark.parametrize("mode", ["idx", "up", "down", "xor"])
@pytest.mark.parametrize("backend", BOTH)
def test_shuffles_read_the_documented_lane(prims, device, mode, width, dtype):
    n = 128  # 2 blocks of 2 warps
    rng = np.random.default_rng(width)
    values = rng.standard_normal(n).astype(dtype)
    args = {"idx": rng.integers(-40, 40, n), "xor": rng.integers(0, 32, n)}.get(mode, rng.integers(0, 32, n))
    args = args.astype(np.int32)
    out = device.empty((n,), dtype)
    launch = prims.prim_shuffle_float if dtype == np.float32 else prims.prim_shuffle_double
    run(device, launch(["idx", "up", "down", "xor"].index(mode), width, device.put(values).ptr,
                       device.put(args).ptr, out.ptr, n), "shuffle")
    np.testing.assert_array_equal(out.numpy(), documented_shuffle(mode, width, values, args))


@pytest.mark.parametrize("mask", [0xFFFFFFFF, 0x0000FFFF, 0x80000001, 0x55555555])
@pytest.mark.parametrize("backend", BOTH)
def test_votes_see_the_lanes_of_their_mask(prims, device, mask):
    n = 128
    predicate = (np.random.default_rng(mask).random(n) < 0.5).astype(np.int32)
    predicate[32:64] = 1  # one warp all true
    predicate[64:96] = 0  # one all false
    out = device.empty((n, 3), np.uint32)
    run(device, prims.prim_vote(mask, device.put(predicate).ptr, out.ptr, n), "votes")
    got = out.numpy()
    lanes = np.array([(mask >> lane) & 1 for lane in range(32)], bool)
    for warp in range(n // 32):
        p = predicate[warp * 32:(warp + 1) * 32].astype(bool)
        ballot = sum(1 << lane for lane in range(32) if lanes[lane] and p[lane])
        rows = got[warp * 32:(warp + 1) * 32][lanes]
        assert ((rows[:, 0] != 0) == p[lanes].all()).all()
        assert ((rows[:, 1] != 0) == p[lanes].any()).all()
        assert (rows[:, 2] == ballot).all()


# -- barriers and shared memory -------------------------------------------------------------------------

@pytest.mark.parametrize("threads,rounds", [(32, 1), (96, 2), (1024, 5)])
@pytest.mark.parametrize("backend", BOTH)
def test_barriers_order_shared_memory_across_the_block(prims, device, threads, rounds):
    blocks = 3
    values = np.random.default_rng(threads).integers(-1000, 1000, (blocks, threads)).astype(np.int32)
    out = device.empty(values.shape, np.int32)
    run(device, prims.prim_reverse(device.put(values).ptr, out.ptr, blocks, threads, rounds), "reverse")
    expected = (values if rounds % 2 == 0 else values[:, ::-1]) + rounds
    np.testing.assert_array_equal(out.numpy(), expected)


@pytest.mark.parametrize("backend", BOTH)
def test_syncwarp_orders_shared_memory_within_a_warp(prims, device):
    values = np.arange(2 * 256, dtype=np.int32) * 7
    out = device.empty(values.shape, np.int32)
    run(device, prims.prim_warp_rotate(device.put(values).ptr, out.ptr, 2), "warp rotate")
    np.testing.assert_array_equal(out.numpy(), np.roll(values.reshape(-1, 32), -1, axis=1).reshape(-1))


@pytest.mark.parametrize("backend", BOTH)
def test_barrier_count_and_or(prims, device):
    blocks, threads = 3, 96
    predicate = np.zeros((blocks, threads), np.int32)
    predicate[0, :] = 5  # any non-zero value counts as true
    predicate[1, ::3] = 1
    out = device.empty((blocks, 3), np.int32)
    run(device, prims.prim_barrier_reduce(device.put(predicate).ptr, out.ptr, blocks, threads), "barrier reduce")
    np.testing.assert_array_equal(out.numpy(), [[threads, 1, 1], [threads // 3, 0, 1], [0, 0, 0]])


@pytest.mark.parametrize("backend", BOTH)
def test_shared_variables_are_per_block(prims, device):
    blocks, threads = 5, 64
    out = device.empty((blocks,), np.int32)
    run(device, prims.prim_shared_per_block(out.ptr, blocks, threads), "shared per block")
    np.testing.assert_array_equal(out.numpy(), np.arange(blocks) * threads)


@pytest.mark.parametrize("backend", BOTH)
def test_dynamic_shared_memory(prims, device):
    blocks, threads = 3, 128
    out = device.empty((blocks, threads), np.float32)
    run(device, prims.prim_dynamic_shared(out.ptr, blocks, threads), "dynamic shared")
    np.testing.assert_array_equal(out.numpy(), np.arange(threads)[::-1][None, :] + np.arange(blocks)[:, None])


@pytest.mark.parametrize("backend", BOTH)
def test_atomics_from_every_thread(prims, device):
    blocks, threads = 4, 96
    n = blocks * threads
    ints = device.put(np.array([0, 100, -5, 5, 0, 0, 0], np.int32))
    uints = device.put(np.array([0, 0, 0, 0, 0xFFFFFFFF, 0, 0], np.uint32))
    floats = device.put(np.zeros(2, np.float32))
    wide = device.put(np.zeros(1, np.uint64))
    run(device, prims.prim_atomics(ints.ptr, uints.ptr, floats.ptr, wide.ptr, blocks, threads), "atomics")
    np.testing.assert_array_equal(ints.numpy(), [n, 100 - 2 * n, n - 1, -(n - 1), 3 * n, 7, 2 * n])
    xor = 0
    for i in range(n):
        xor ^= i
    # atomicInc wraps to 0 after 9, atomicDec from 0 (or above 9) to 9.
    np.testing.assert_array_equal(uints.numpy(), [3 * n, n % 10, (-n) % 10, 0xFFFFFFFF, 0, xor, 3 * (n - 1)])
    np.testing.assert_array_equal(floats.numpy(), [0.5 * n, 2.5])
    assert int(wide.numpy()[0]) == n << 33


# -- arithmetic intrinsics ------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BOTH)
def test_dp4a_adds_four_byte_products(prims, device):
    n = 1000
    rng = np.random.default_rng(4)
    a, b, c = (rng.integers(-2**31, 2**31, n).astype(np.int32) for _ in range(3))
    a[:4], b[:4] = -0x7F7F7F80, -0x7F7F7F80  # every byte -128: products at the edge, sums that wrap
    c[:2] = 2**31 - 1
    out = device.empty((n,), np.int32)
    out_unsigned = device.empty((n,), np.uint32)
    run(device, prims.prim_dp4a(device.put(a).ptr, device.put(b).ptr, device.put(c).ptr, out.ptr, out_unsigned.ptr,
                                n), "dp4a")
    signed = (a.view(np.int8).reshape(n, 4).astype(np.int64) * b.view(np.int8).reshape(n, 4)).sum(1) + c
    unsigned = (a.view(np.uint8).reshape(n, 4).astype(np.int64) * b.view(np.uint8).reshape(n, 4)).sum(1) + c.view(
        np.uint32)
    np.testing.assert_array_equal(out.numpy(), (signed % 2**32).astype(np.uint32).view(np.int32))
    np.testing.assert_array_equal(out_unsigned.numpy(), (unsigned % 2**32).astype(np.uint32))


def conversion_inputs() -> np.ndarray:
    """Floats where float -> half conversion has something to decide: every half value, the
    midpoints between neighbours (ties), just beside them, subnormals, overflow, signs, inf, NaN."""
    halves = np.arange(0x7C00, dtype=np.uint16).view(np.float16).astype(np.float64)
    mid = (halves[:-1] + halves[1:]) / 2
    points = np.concatenate([halves, mid, np.nextafter(mid.astype(np.float32), np.float32(np.inf)),
                             np.nextafter(mid.astype(np.float32), np.float32(-np.inf)),
                             [65504, 65519.99, 65520, 65536, 1e6, 3.4e38, 2.0**-25, 2.0**-26, 1e-10, 1e-45]])
    rng = np.random.default_rng(0)
    randoms = rng.standard_normal(20000) * np.exp2(rng.integers(-30, 20, 20000))
    values = np.concatenate([points, -points, randoms]).astype(np.float32)
    return np.concatenate([values, np.array([np.inf, -np.inf, np.nan, 0.0, -0.0], np.float32)])


@pytest.mark.parametrize("backend", BOTH)
def test_half_conversions_round_as_documented(prims, device):
    x = conversion_inputs()
    n = len(x)
    halves = np.resize(np.arange(65536, dtype=np.uint16), n)
    outputs = [device.empty((n,), np.uint16), device.empty((n,), np.uint16), device.empty((n,), np.float32),
               device.empty((n, 4), np.float32)]
    run(device, prims.prim_half(device.put(x).ptr, device.put(halves).ptr, *(o.ptr for o in outputs), n), "half")
    rn, rz, back, pairs = (o.numpy() for o in outputs)
    nan = np.isnan(x)
    # To nearest even, as numpy's astype(float16); NaN stays a NaN.
    with np.errstate(over="ignore"):
        nearest = x.astype(np.float16)
    np.testing.assert_array_equal(rn[~nan], nearest.view(np.uint16)[~nan])
    assert np.isnan(rn[nan].view(np.float16)).all()
    # Toward zero: the nearest, or its neighbour toward zero where the nearest rounded away from zero.
    away = np.abs(nearest.astype(np.float64)) > np.abs(x.astype(np.float64))
    toward = np.where(away, np.nextafter(nearest, np.float16(0)), nearest)
    np.testing.assert_array_equal(rz[~nan], toward.view(np.uint16)[~nan])
    # half -> float is exact.
    expected_back = halves.view(np.float16).astype(np.float32)
    finite = ~np.isnan(expected_back)
    np.testing.assert_array_equal(back[finite], expected_back[finite])
    assert np.isnan(back[~finite]).all()
    both = np.stack([nearest, -nearest], axis=1).astype(np.float32)
    np.testing.assert_array_equal(pairs[~nan][:, :2], both[~nan])
    np.testing.assert_array_equal(pairs[~nan][:, 2:], both[~nan])


@pytest.mark.parametrize("backend", BOTH)
def test_bit_intrinsics(prims, device):
    n = 2000
    rng = np.random.default_rng(5)
    x, y, s = (rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32) for _ in range(3))
    x[:3] = [0, 1, 0x80000000]
    s[:4] = [0x3210, 0x7654, 0x4444, 0xFFFF7140]  # identity, y, one byte, upper selector bits ignored
    out = device.empty((n, 6), np.uint32)
    run(device, prims.prim_bits(device.put(x).ptr, device.put(y).ptr, device.put(s).ptr, out.ptr, n), "bits")
    got = out.numpy()
    for i in range(n):
        xi, yi, si = int(x[i]), int(y[i]), int(s[i])
        source = xi | (yi << 32)  # bytes 0-3 from x, 4-7 from y; selector nibble n picks result byte n
        perm = sum(((source >> (8 * ((si >> (4 * k)) & 7))) & 0xFF) << (8 * k) for k in range(4))
        clz = 32 - xi.bit_length()
        ffs = (xi & -xi).bit_length()  # 1-based position of the lowest set bit, 0 for none
        brev = int(f"{xi:032b}"[::-1], 2)
        assert list(got[i]) == [perm, bin(xi).count("1"), clz, ffs, brev, xi], i


@pytest.mark.parametrize("backend", BOTH)
def test_float_to_int_rounding_modes_saturate(prims, device):
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49999997, 2.7, -2.7, 1e10, -1e10, 2147483520.0, np.inf,
                  -np.inf, np.nan, -0.0], np.float32)
    out = device.empty((len(x), 4), np.int32)
    run(device, prims.prim_float_to_int(device.put(x).ptr, out.ptr, len(x)), "float to int")
    expected = []
    for f in (np.rint, np.trunc, np.floor, np.ceil):  # rn is to nearest even, as np.rint
        v = np.nan_to_num(f(x.astype(np.float64)), nan=0.0, posinf=2**31 - 1, neginf=-(2**31))
        expected.append(np.clip(v, -(2**31), 2**31 - 1).astype(np.int64))
    np.testing.assert_array_equal(out.numpy(), np.stack(expected, axis=1))


@pytest.mark.parametrize("backend", BOTH)
def test_float_intrinsics_within_their_documented_error(prims, device):
    n = 4000
    rng = np.random.default_rng(6)
    x = rng.uniform(-5, 5, n).astype(np.float32)
    y = (rng.uniform(0.1, 4, n) * rng.choice([-1, 1], n)).astype(np.float32)
    out = device.empty((n, 12), np.float32)
    run(device, prims.prim_math(device.put(x).ptr, device.put(y).ptr, out.ptr, n), "math")
    got = out.numpy().astype(np.float64)
    a, b = x.astype(np.float64), y.astype(np.float64)
    # The Programming Guide's bounds: __expf 2 + floor(|1.173 x|) ulp (<= 7 here), __logf 2^-21.41
    # absolute near 1, __fdividef and rsqrtf 2 ulp, exp2f 2 ulp, sqrtf and fmaf correctly rounded.
    np.testing.assert_allclose(got[:, 0], np.exp(a), rtol=8 * 2.0**-23)
    np.testing.assert_allclose(got[:, 1], np.log(np.abs(a) + 0.5), rtol=4 * 2.0**-23, atol=2.0**-21)
    np.testing.assert_allclose(got[:, 2], a / b, rtol=2 * 2.0**-23)
    np.testing.assert_allclose(got[:, 3], 1 / np.sqrt(np.abs(b)), rtol=2 * 2.0**-23)
    np.testing.assert_array_equal(got[:, 4], np.clip(a, 0, 1))
    np.testing.assert_allclose(got[:, 5], a * b + 1, rtol=2.0**-24, atol=2.0**-24)
    np.testing.assert_allclose(got[:, 6], np.exp2(a), rtol=2 * 2.0**-23)
    np.testing.assert_array_equal(got[:, 7], np.sqrt(np.abs(x)).astype(np.float32))
    np.testing.assert_array_equal(got[:, 8:10], np.stack([np.maximum(x, y), np.minimum(x, y)], 1))
    tenths = np.stack([np.trunc(x * np.float32(10)), np.trunc(y * np.float32(10))], 1)
    np.testing.assert_array_equal(got[:, 10:], np.stack([tenths.min(1), tenths.max(1)], 1))


@pytest.mark.parametrize("backend", BOTH)
def test_vector_types_load_and_lay_out_like_cuda(prims, device):
    n = 64
    values = np.arange(4 * n, dtype=np.float32).reshape(n, 4)
    words = np.arange(2 * n, dtype=np.uint32).reshape(n, 2)
    out, out_words = device.empty(values.shape, np.float32), device.empty(words.shape, np.uint32)
    run(device, prims.prim_vectors(device.put(values).ptr, device.put(words).ptr, out.ptr, out_words.ptr, n), "vec")
    np.testing.assert_array_equal(out.numpy(), values[:, ::-1])
    np.testing.assert_array_equal(out_words.numpy(), words[:, ::-1])
    layout = (ctypes.c_int * 13)()
    prims.prim_layout(layout)
    # sizeof/alignof: float4, uint4, uint2, int4, __half, __half2; sizeof(dim3)
    assert list(layout) == [16, 16, 16, 16, 8, 8, 16, 16, 2, 2, 4, 4, 12]


@pytest.mark.parametrize("backend", BOTH)
def test_bad_launch_configurations_are_reported_and_not_sticky(prims, device):
    for grid, block in (((1, 1, 1), (1025, 1, 1)), ((1, 1, 1), (512, 4, 1)), ((1, 1, 1), (1, 1, 65)),
                        ((1, 65536, 1), (32, 1, 1)), ((0, 1, 1), (32, 1, 1)), ((1, 1, 1), (0, 1, 1))):
        assert prims.prim_launch(*grid, *block, 0) == INVALID_CONFIGURATION, (grid, block)
        assert prims.prim_launch(1, 1, 1, 32, 1, 1, 0) == 0  # the next launch runs
    device.cuda.synchronize()


# -- what only the emulation does -------------------------------------------------------------------

@pytest.mark.parametrize("backend", EMULATED)
def test_a_missing_barrier_reads_unwritten_shared_memory_in_every_order(prims, device):
    """racyKernel stores buffer[t] and, without a barrier, reads buffer[t + 1]. Threads run to their
    next synchronisation point in one go, so the reader often runs before the writer; unwritten
    shared memory holds 0xFF bytes (-1 here)."""
    threads = 64
    right = (np.arange(threads) + 1) % threads
    out = device.empty((threads,), np.int32)
    for policy in (RANDOM, FORWARD, REVERSE):
        prims.cuda_emu_set_schedule(policy, 7)
        run(device, prims.prim_racy(out.ptr, threads, 1), "with the barrier")
        np.testing.assert_array_equal(out.numpy(), right)
        run(device, prims.prim_racy(out.ptr, threads, 0), "without it")
        got = out.numpy()
        assert (got == -1).any() and ((got == right) | (got == -1)).all(), (policy, got)
        if policy == FORWARD:  # thread t runs before t + 1: all but the last read too early
            np.testing.assert_array_equal(got, np.r_[np.full(threads - 1, -1), 0])
        if policy == REVERSE:  # the last thread runs first and reads thread 0's slot too early
            np.testing.assert_array_equal(got, np.r_[right[:-1], -1])


@pytest.mark.parametrize("backend", EMULATED)
def test_shared_memory_starts_as_nan(prims, device):
    out = device.empty((64,), np.float32, fill=0)
    run(device, prims.prim_uninitialised(out.ptr), "uninitialised")
    assert np.isnan(out.numpy()).all()


ERRORS = {
    "shuffle-source-outside-mask": ("prim_bad_shuffle", 0, "outside its mask 0x0000ffff"),
    "shuffle-mask-without-caller": ("prim_bad_shuffle", 1, "leaves out the calling lane"),
    "shuffle-source-exited": ("prim_bad_shuffle", 2, "which has exited"),
    "lanes-at-different-collectives": ("prim_bad_shuffle", 3, "disagree"),
    "shuffle-width-not-power-of-two": ("prim_bad_shuffle", 4, "width 3: not a power of two"),
    "barrier-half-the-block": ("prim_bad_barrier", 0, "must be reached by every thread of the block"),
    "divergent-barriers": ("prim_bad_barrier", 1, "divergent barriers"),
    "deadlock": ("prim_bad_barrier", 2, "deadlock"),
    "barrier-after-a-warp-exited": ("prim_bad_barrier", 3, "thread(s) of the block exited (first thread"),
    "too-much-shared-memory": ("prim_too_much_shared", None, "over the 48 KiB limit"),
    "write-past-an-allocation": ("prim_overrun", 100, "wrote past the end of a 400-byte cudaMalloc allocation"),
    "trap": ("prim_trap", None, "__trap() at primitives_test.cu"),
}


@pytest.mark.parametrize("name", list(ERRORS))
@pytest.mark.parametrize("backend", EMULATED)
def test_undefined_behaviour_stops_the_launch_with_a_message(prims, device, name):
    function, argument, message = ERRORS[name]
    out = device.empty((100,), np.float32)
    args = {"prim_bad_shuffle": (argument, out.ptr), "prim_bad_barrier": (argument, out.ptr),
            "prim_too_much_shared": (out.ptr,), "prim_overrun": (out.ptr, argument), "prim_trap": ()}[function]
    assert getattr(prims, function)(*args) == LAUNCH_FAILURE
    assert message in device.cuda.emulation_error(), device.cuda.emulation_error()
    # Sticky, like a device fault: nothing runs and every call reports it until the reset.
    assert prims.prim_launch(1, 1, 1, 32, 1, 1, 0) == LAUNCH_FAILURE
    assert device.cuda.lib.cudaDeviceSynchronize() == LAUNCH_FAILURE
    device.cuda.reset()
    assert prims.prim_launch(1, 1, 1, 32, 1, 1, 0) == 0


@pytest.mark.parametrize("backend", EMULATED)
def test_device_memory_calls_stay_inside_allocations(device):
    lib = device.cuda.lib
    buffer = device.empty((100,), np.uint8)
    host = np.zeros(200, np.uint8)
    assert lib.cudaMemcpy(buffer.ptr, host.ctypes.data, 100, 1) == 0
    assert lib.cudaMemcpy(buffer.ptr, host.ctypes.data, 101, 1) != 0  # one byte past the end
    assert lib.cudaMemcpy(host.ctypes.data, buffer.ptr + 50, 51, 2) != 0
    assert lib.cudaMemcpy(host.ctypes.data, host.ctypes.data + 100, 50, 2) != 0  # not device memory
    assert lib.cudaMemset(buffer.ptr + 99, 0, 2) != 0
    assert lib.cudaGetLastError() != 0 and lib.cudaGetLastError() == 0  # reported once, then cleared


@pytest.mark.parametrize("backend", EMULATED)
def test_the_emulated_device_reports_its_settings(device):
    cuda = device.cuda
    assert cuda.compute_capability() == (6, 1)  # an MX250 by default: Pascal, the project's target
    try:
        cuda.lib.cuda_emu_set_device(7, 5, 40)
        assert cuda.compute_capability() == (7, 5)
        count = ctypes.c_int()
        cuda.check(cuda.lib.cudaDeviceGetAttribute(ctypes.byref(count), 16, 0))  # MultiProcessorCount
        assert count.value == 40
    finally:
        cuda.lib.cuda_emu_set_device(6, 1, 3)
