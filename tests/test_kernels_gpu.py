"""The RMSNorm and weight-only GEMM/gather kernels against their contracts (trt_plugins/rmsnorm,
trt_plugins/weight_only_gemm), on a CUDA GPU and in the CPU emulation of one.

Each kernel is compared with the numpy reference of its contract (graph_passes/plugin_reference.py)
and, for a few cases, with ONNX Runtime CPU running the ONNX Runtime-target op
(SimplifiedLayerNormalization, SkipSimplifiedLayerNormalization, MatMulNBits). The dp4a path
(int8 activations, accuracy_level 4) is compared with the same maths in numpy: the activations
quantized per block exactly as the kernel does, then the exact product. Every test runs on both
backends of kernel_devices.py: "cuda" (nvcc for the present GPU, marked gpu: `pytest -m gpu`) and
"emulated" (g++ and tests/cuda_emulation, in `make test`), the emulated ones at shapes a CPU runs in
seconds that still take every path (GEMV with one and four columns per warp and A staged in several
tiles, tiled GEMM with partial tiles, dp4a, the register-cache overflow of RMSNorm). Run with `-s`
on a GPU to see the decode GEMV bandwidth report.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np
import pytest
from kernel_devices import (BOTH, Cuda, Device, build_for_gpu, check, cuda, device, emulated_cuda,  # noqa: F401
                            emulated_library, emulation_runtime, per_backend, ptr, real_cuda)

from graph_passes.plugin_reference import dequantize_rows, quantized_gather, rms_norm, weight_only_gemm
from graph_passes.quantize_weights import quantize_blockwise

ROOT = Path(__file__).resolve().parents[1]
SOURCES = (ROOT / "trt_plugins" / "rmsnorm" / "rmsnorm_kernel.cu",
           ROOT / "trt_plugins" / "weight_only_gemm" / "weight_only_gemm_kernel.cu")
CODES = {np.dtype(np.float32): 0, np.dtype(np.float16): 1}  # qwen3vl_dtype
EPSILON = 1e-6

# qwen3vl_gemm flags and paths (weight_only_gemm_kernel.h)
INT8_ACTIVATIONS, FORCE_DP4A, FORCE_TILED = 1, 2, 4
PATH_GEMV, PATH_DP4A = 1, 2

# Qwen3-VL-2B's linear layers, (K, N): q/o, k/v, gate/up, down.
MODEL_SHAPES = [(2048, 2048), (2048, 1024), (2048, 6144), (6144, 2048)]
LM_HEAD = (2048, 151936)
# Emulated: K = 2048 stages A in two GEMV tiles, 1152 in a full and a partial one; N >= 192 takes
# four columns per warp for M <= 2 on the emulated 3-SM device (MX250).
EMULATED_SHAPES = [(2048, 192), (1152, 320)]


# -- building and binding (the CUDA runtime layer is kernel_devices.py) ---------------------

def declare_kernel_api(lib: ctypes.CDLL) -> ctypes.CDLL:
    """ctypes signatures of the kernels' C launch API (rmsnorm_kernel.h, weight_only_gemm_kernel.h)."""
    p, i32, i64, size = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64, ctypes.c_size_t
    lib.qwen3vl_rmsnorm.argtypes = [p, p, p, p, p, i64, i32, ctypes.c_float, ctypes.c_int, p]
    lib.qwen3vl_weight_only_gemm.argtypes = [p, p, p, p, p, p, i64, i32, i32, i32, i32, ctypes.c_int, i32, p, size, p]
    lib.qwen3vl_weight_only_gemm_workspace_size.argtypes = [i64, i32, i32, i32]
    lib.qwen3vl_weight_only_gemm_workspace_size.restype = size
    lib.qwen3vl_weight_only_gemm_path.argtypes = [i64, i32, i32, i32]
    lib.qwen3vl_weight_only_gemm_path.restype = i32
    lib.qwen3vl_quantized_gather.argtypes = [p, p, i32, i64, p, p, p, i64, i32, i32, i32, ctypes.c_int, p]
    for name in ("qwen3vl_rmsnorm", "qwen3vl_weight_only_gemm", "qwen3vl_quantized_gather"):
        getattr(lib, name).restype = ctypes.c_int
    return lib


@pytest.fixture(scope="session")
def gpu_kernels(real_cuda, tmp_path_factory):
    library = build_for_gpu(real_cuda, SOURCES, tmp_path_factory.mktemp("kernels") / "libqwen3vl_kernels_test.so")
    return declare_kernel_api(ctypes.CDLL(str(library)))


@pytest.fixture
def kernels(backend, request):
    """The kernel library of the test's backend (the emulated one holds every kernel)."""
    if backend == "cuda":
        return request.getfixturevalue("gpu_kernels")
    return declare_kernel_api(request.getfixturevalue("emulated_cuda").lib)


# -- RMSNorm ---------------------------------------------------------------------------------------

# Row lengths that take each launch shape: a block per row (2048), several rows per block with a
# warp each (128), scalar loads (1001), and rows past the 4 vectors per thread kept in registers
# (4100 at fp16: 4100 scalar vectors over 1024 threads). Small enough to emulate as they are.
RMSNORM_SHAPES = {"decode-hidden": (1, 1, 2048), "prefill-hidden": (2, 33, 2048), "head-dim": (2, 7, 16, 128),
                  "odd-1001": (5, 1001), "long-4100": (3, 4100)}


def run_rmsnorm(kernels, device, x, gamma, skip=None, emit_sum=False):
    y = device.empty(x.shape, x.dtype)
    total = device.empty(x.shape, x.dtype) if emit_sum else None
    status = kernels.qwen3vl_rmsnorm(ptr(device.put(x)), ptr(device.put(skip)), ptr(device.put(gamma)), y.ptr,
                                     ptr(total), x.size // x.shape[-1], x.shape[-1], EPSILON, CODES[x.dtype], None)
    check(device.cuda, status, "qwen3vl_rmsnorm")
    return y.numpy(), None if total is None else total.numpy()


def assert_close(actual, expected, dtype, scale=1.0):
    """float32: the same maths in another order; float16 storage may round one ulp apart."""
    rtol, atol = (1e-5, 1e-5 * scale) if np.dtype(dtype) == np.float32 else (1e-3, 1e-3 * scale)
    np.testing.assert_allclose(actual.astype(np.float32), expected.astype(np.float32), rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("form", ["plain", "skip", "skip+sum"])
@pytest.mark.parametrize(*per_backend("shape", cuda=RMSNORM_SHAPES, emulated=RMSNORM_SHAPES))
def test_rmsnorm_matches_reference(kernels, device, dtype, form, shape):
    rng = np.random.default_rng(sum(shape))
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    skip = (rng.standard_normal(shape) * 2).astype(dtype) if form != "plain" else None
    gamma = (rng.standard_normal(shape[-1]) * 0.5 + 1).astype(dtype)
    y, total = run_rmsnorm(kernels, device, x, gamma, skip, emit_sum=form == "skip+sum")
    expected_y, expected_sum = rms_norm(x, gamma, EPSILON, skip=skip)
    assert y.dtype == dtype
    assert_close(y, expected_y, dtype, scale=float(np.abs(expected_y.astype(np.float32)).max()))
    if form == "skip+sum":
        np.testing.assert_array_equal(total, expected_sum)  # one float32 add, one rounding: exact


@pytest.mark.parametrize("backend", BOTH)
def test_rmsnorm_long_rows_beyond_the_register_cache(kernels, device):
    """Rows longer than the 4 vectors per thread kept in registers are re-read: still exact."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 40000)).astype(np.float32)
    skip = rng.standard_normal((2, 40000)).astype(np.float32)
    gamma = rng.standard_normal(40000).astype(np.float32)
    y, total = run_rmsnorm(kernels, device, x, gamma, skip, emit_sum=True)
    expected_y, expected_sum = rms_norm(x, gamma, EPSILON, skip=skip)
    assert_close(y, expected_y, np.float32, scale=float(np.abs(expected_y).max()))
    np.testing.assert_array_equal(total, expected_sum)


@pytest.mark.parametrize("backend", BOTH)
def test_rmsnorm_matches_onnxruntime(kernels, device):
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 9, 2048)).astype(np.float32)
    skip = rng.standard_normal((2, 9, 2048)).astype(np.float32)
    gamma = rng.standard_normal(2048).astype(np.float32)
    value = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, None)  # noqa: E731
    nodes = [helper.make_node("SimplifiedLayerNormalization", ["x", "gamma"], ["y"], axis=-1, epsilon=EPSILON,
                              stash_type=1),
             helper.make_node("SkipSimplifiedLayerNormalization", ["x", "skip", "gamma"], ["ys", "", "", "sum"],
                              domain="com.microsoft", epsilon=EPSILON)]
    graph = helper.make_graph(nodes, "rmsnorm", [value("x"), value("skip"), value("gamma")],
                              [value("y"), value("ys"), value("sum")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y_ort, ys_ort, sum_ort = session.run(None, {"x": x, "skip": skip, "gamma": gamma})

    y, _ = run_rmsnorm(kernels, device, x, gamma)
    ys, total = run_rmsnorm(kernels, device, x, gamma, skip, emit_sum=True)
    assert_close(y, y_ort, np.float32, scale=float(np.abs(y_ort).max()))
    assert_close(ys, ys_ort, np.float32, scale=float(np.abs(ys_ort).max()))
    np.testing.assert_array_equal(total, sum_ort)


# -- weight-only GEMM -------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def quantized_layer(k: int, n: int, bits: int, block: int, symmetric: bool, dtype_name: str, seed: int = 0):
    """A random (K, N) linear layer quantized in MatMulNBits' layout, scales in the activation type."""
    rng = np.random.default_rng(seed + k + 7 * n + bits + block + symmetric)
    weight = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    if not symmetric:
        weight += 0.02  # off-centre blocks, so that the zero points matter
    packed, scales, zero_points = quantize_blockwise(weight, bits, block, symmetric, scale_dtype=np.dtype(dtype_name))
    bias = (rng.standard_normal(n) * 0.1).astype(dtype_name)
    return packed, scales, zero_points, bias


def activations(m: int, k: int, dtype, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed + m + k).standard_normal((m, k)).astype(dtype)


def run_gemm(kernels, device, a, packed, scales, zero_points, bias, k, n, bits, block, flags=0):
    m = a.shape[0]
    y = device.empty((m, n), a.dtype)
    workspace_size = kernels.qwen3vl_weight_only_gemm_workspace_size(m, k, block, flags)
    workspace = device.empty((max(workspace_size, 1),), np.uint8, fill=None)
    status = kernels.qwen3vl_weight_only_gemm(
        ptr(device.put(a)), ptr(device.put(packed)), ptr(device.put(scales)), ptr(device.put(zero_points)),
        ptr(device.put(bias)), y.ptr, m, n, k, bits, block, CODES[a.dtype], flags, workspace.ptr, workspace_size, None)
    check(device.cuda, status, "qwen3vl_weight_only_gemm")
    return y.numpy()


def int8_activations(a: np.ndarray, k: int, block: int) -> np.ndarray:
    """What the dp4a path multiplies: each block of a row quantized to int8 (amax / 127, round to
    nearest even), dequantized back to float32 (the dot products themselves are exact)."""
    m = a.shape[0]
    k_pad = -(-k // block) * block
    blocks = np.zeros((m, k_pad), np.float32)
    blocks[:, :k] = a.astype(np.float32)
    blocks = blocks.reshape(m, -1, block)
    amax = np.abs(blocks).max(axis=2, keepdims=True)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.clip(np.rint(blocks * inv), -127, 127)
    return (q * (amax / np.float32(127))).astype(np.float32).reshape(m, k_pad)[:, :k]


@functools.lru_cache(maxsize=None)
def dequantized_weight(k, n, bits, block, symmetric, dtype_name) -> np.ndarray:
    """W.T (N, K) of quantized_layer, by the reference's dequantize_rows (cached: the 2B shapes are large)."""
    packed, scales, zero_points, _ = quantized_layer(k, n, bits, block, symmetric, dtype_name)
    return dequantize_rows(packed.reshape(n, -1), scales, zero_points, bits, block)[:, :k]


def expected_gemm(a, packed, scales, zero_points, bias, k, n, bits, block, dp4a=False, layer=None):
    """weight_only_gemm's contract; `layer` (the quantized_layer key) reuses the dequantized weight."""
    source = int8_activations(a, k, block) if dp4a else a.astype(np.float32)
    if layer is None:
        exact = weight_only_gemm(source, packed, scales, zero_points, bias, k, n, bits, block)  # float32 maths
    else:
        exact = source @ dequantized_weight(*layer).T
        if bias is not None:
            exact = exact + bias.astype(np.float32)
    return exact.astype(a.dtype)


def assert_gemm_close(y, expected, dtype):
    scale = float(np.abs(expected.astype(np.float32)).max())
    rtol, atol = (1e-4, 1e-5 * scale) if np.dtype(dtype) == np.float32 else (2e-3, 2e-3 * scale)
    np.testing.assert_allclose(y.astype(np.float32), expected.astype(np.float32), rtol=rtol, atol=atol)


FORMATS = [(bits, block, symmetric) for bits in (4, 8) for block in (32, 64, 128) for symmetric in (True, False)]
FORMAT_IDS = [f"int{b}-b{s}-{'sym' if y else 'asym'}" for b, s, y in FORMATS]
PATHS = {"default": 0, "dp4a": FORCE_DP4A, "tiled": FORCE_TILED, "tiled-dp4a": FORCE_TILED | FORCE_DP4A}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("m", [1, 2, 3, 4, 17, 300])
@pytest.mark.parametrize("bits,block,symmetric", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("backend", BOTH)
def test_gemm_formats_on_an_odd_shape(kernels, device, bits, block, symmetric, m, path):
    """K = 200 (not a multiple of any block: the last block's padding), N = 77 (partial tiles)."""
    k, n, flags = 200, 77, PATHS[path]
    packed, scales, zero_points, bias = quantized_layer(k, n, bits, block, symmetric, "float32")
    a = activations(m, k, np.float32)
    taken = kernels.qwen3vl_weight_only_gemm_path(m, bits, block, flags)
    assert bool(taken & PATH_GEMV) == (m <= 4 and not flags & FORCE_TILED)
    assert bool(taken & PATH_DP4A) == bool(flags & FORCE_DP4A)
    y = run_gemm(kernels, device, a, packed, scales, zero_points, None, k, n, bits, block, flags)
    expected = expected_gemm(a, packed, scales, zero_points, None, k, n, bits, block, dp4a=bool(flags & FORCE_DP4A))
    assert_gemm_close(y, expected, np.float32)


@pytest.mark.parametrize("path", ["default", "dp4a"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("bits,block,symmetric", [(4, 64, True), (4, 128, False), (8, 32, False), (8, 128, True)],
                         ids=["int4-b64-sym", "int4-b128-asym", "int8-b32-asym", "int8-b128-sym"])
@pytest.mark.parametrize(*per_backend(
    "k,n,m",
    cuda={f"{k}x{n}-m{m}": (k, n, m) for k, n in MODEL_SHAPES for m in (1, 2, 4, 17, 300)},
    emulated={f"{k}x{n}-m{m}": (k, n, m) for k, n in EMULATED_SHAPES for m in (1, 2, 4, 17, 70)}))
def test_gemm_model_shapes(kernels, device, k, n, bits, block, symmetric, dtype, m, path):
    flags = PATHS[path]
    dtype_name = np.dtype(dtype).name
    packed, scales, zero_points, bias = quantized_layer(k, n, bits, block, symmetric, dtype_name)
    a = activations(m, k, dtype)
    y = run_gemm(kernels, device, a, packed, scales, zero_points, bias, k, n, bits, block, flags)
    assert y.dtype == dtype
    expected = expected_gemm(a, packed, scales, zero_points, bias, k, n, bits, block, dp4a=path == "dp4a",
                             layer=(k, n, bits, block, symmetric, dtype_name))
    assert_gemm_close(y, expected, dtype)


@pytest.mark.parametrize(*per_backend("m,k,n", cuda=[(1, 2048, 1024), (300, 2048, 1024)],
                                     emulated=[(1, 2048, 256), (70, 2048, 256)]))
def test_dp4a_path_stays_near_the_exact_product(kernels, device, m, k, n):
    """accuracy_level 4's activation rounding: a small error against the exact reference."""
    bits, block = 4, 64
    packed, scales, zero_points, bias = quantized_layer(k, n, bits, block, True, "float32")
    a = activations(m, k, np.float32)
    y = run_gemm(kernels, device, a, packed, scales, zero_points, bias, k, n, bits, block, FORCE_DP4A)
    exact = weight_only_gemm(a, packed, scales, zero_points, bias, k, n, bits, block)
    relative = np.sqrt(np.mean((y - exact) ** 2) / np.mean(exact**2))
    assert relative < 1e-2


@pytest.mark.parametrize("backend", BOTH)
def test_int8_activations_flag_takes_dp4a_only_on_pascal(kernels, cuda):
    major, minor = cuda.compute_capability()
    taken = kernels.qwen3vl_weight_only_gemm_path(1, 4, 64, INT8_ACTIVATIONS)
    assert bool(taken & PATH_DP4A) == (major == 6 and minor >= 1)
    assert not kernels.qwen3vl_weight_only_gemm_path(1, 4, 64, 0) & PATH_DP4A


@pytest.mark.parametrize("backend", ["emulated"])
def test_int8_activations_flag_follows_the_device_generation(kernels, cuda):
    """The flag's device query on the emulated device made Pascal with and without dp4a, and newer."""
    try:
        for major, minor, dp4a in ((6, 0, False), (6, 1, True), (6, 2, True), (7, 5, False), (8, 6, False)):
            cuda.lib.cuda_emu_set_device(major, minor, 3)
            assert bool(kernels.qwen3vl_weight_only_gemm_path(1, 4, 64, INT8_ACTIVATIONS) & PATH_DP4A) == dp4a
    finally:
        cuda.lib.cuda_emu_set_device(6, 1, 3)


@pytest.mark.parametrize(*per_backend("k,n", cuda=[(2048, 1024)], emulated=[(2048, 256)]))
def test_gemm_matches_onnxruntime_matmulnbits(kernels, device, k, n):
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    bits, block = 4, 64
    packed, scales, zero_points, bias = quantized_layer(k, n, bits, block, False, "float32")
    initializers = [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "scales"),
                    numpy_helper.from_array(zero_points, "zero_points")]
    node = helper.make_node("MatMulNBits", ["A", "B", "scales", "zero_points"], ["Y"], domain="com.microsoft",
                            K=k, N=n, bits=bits, block_size=block, accuracy_level=0)
    graph = helper.make_graph([node], "gemm", [helper.make_tensor_value_info("A", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for m in (1, 4, 33):
        a = activations(m, k, np.float32)
        y = run_gemm(kernels, device, a, packed, scales, zero_points, None, k, n, bits, block)
        assert_gemm_close(y, session.run(None, {"A": a})[0], np.float32)


@pytest.mark.parametrize("backend", BOTH)
def test_gemm_rejects_bad_arguments(kernels, device):
    a = device.put(activations(1, 64, np.float32))
    y = device.empty((1, 8), np.float32)
    b = device.empty((8, 64), np.uint8)
    scales = device.empty((8, 2), np.float32)
    for bits, block in ((5, 32), (4, 24), (4, 8)):
        assert kernels.qwen3vl_weight_only_gemm(a.ptr, b.ptr, scales.ptr, None, None, y.ptr, 1, 8, 64, bits, block, 0,
                                                0, None, 0, None) != 0
    # dp4a without the workspace it needs
    assert kernels.qwen3vl_weight_only_gemm(a.ptr, b.ptr, scales.ptr, None, None, y.ptr, 1, 8, 64, 4, 32, 0,
                                            FORCE_DP4A, None, 0, None) != 0


# -- quantized gather ---------------------------------------------------------------------------------

@pytest.mark.parametrize("index_type", [np.int64, np.int32], ids=["int64", "int32"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("bits,block,symmetric", [(4, 32, True), (4, 128, False), (8, 64, False), (8, 128, True)],
                         ids=["int4-b32-sym", "int4-b128-asym", "int8-b64-asym", "int8-b128-sym"])
@pytest.mark.parametrize("hidden", [2048, 200])
@pytest.mark.parametrize("backend", BOTH)
def test_gather_matches_reference(kernels, device, hidden, bits, block, symmetric, dtype, index_type):
    vocab = 1000
    rng = np.random.default_rng(hidden + bits + block)
    table = rng.standard_normal((vocab, hidden)).astype(np.float32)
    packed, scales, zero_points = quantize_blockwise(table, bits, block, symmetric, rows=True, scale_dtype=dtype)
    data = packed.reshape(vocab, -1)
    indices = rng.integers(-vocab, vocab, size=(2, 7)).astype(index_type)
    indices[0, 0], indices[0, 1] = 0, vocab - 1
    width = scales.shape[1] * block
    y = device.empty((*indices.shape, width), dtype)
    status = kernels.qwen3vl_quantized_gather(
        ptr(device.put(data)), ptr(device.put(indices)), 8 * np.dtype(index_type).itemsize, indices.size,
        ptr(device.put(scales)), ptr(device.put(zero_points)), y.ptr, vocab, scales.shape[1], bits, block,
        CODES[np.dtype(dtype)], None)
    check(device.cuda, status, "qwen3vl_quantized_gather")
    expected = quantized_gather(data, indices, scales, zero_points, bits, block)
    np.testing.assert_array_equal(y.numpy(), expected)  # the same single float32 product, one rounding


@pytest.mark.parametrize("backend", BOTH)
def test_gather_out_of_range_rows_are_zero(kernels, device):
    vocab, hidden, bits, block = 10, 64, 4, 32
    packed, scales, _ = quantize_blockwise(np.ones((vocab, hidden), np.float32), bits, block, True, rows=True)
    indices = np.array([3, 10, -11], np.int64)
    y = device.empty((3, hidden), np.float32)
    status = kernels.qwen3vl_quantized_gather(ptr(device.put(packed.reshape(vocab, -1))), ptr(device.put(indices)),
                                              64, 3, ptr(device.put(scales)), None, y.ptr, vocab, 2, bits, block, 0,
                                              None)
    check(device.cuda, status, "qwen3vl_quantized_gather")
    out = y.numpy()
    np.testing.assert_allclose(out[0], 1.0, rtol=1e-6)
    assert not out[1:].any()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("backend", BOTH)
def test_kernels_read_the_tensorrt_graphs_int32_words(kernels, device, tmp_path, bits):
    """What the plugins hand the kernels: the TensorRT graph's int32 initializers (B (N, k_blocks,
    blob / 4), the table likewise, zero points flat and zero-padded to a word: N = 23 rows of 2-3
    bytes) and int32 indices, their pointers cast to bytes; against the plugin references on that graph."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from graph_passes.pass_runner import run_passes
    from graph_passes.plugin_reference import run_reference
    from graph_passes.trt_weight_gemm import trt_weight_gemm

    k, n, block, vocab = 80, 23, 32, 10
    rng = np.random.default_rng(bits)
    packed, scales, zero_points = quantize_blockwise(rng.standard_normal((k, n)).astype(np.float32) + 0.3, bits,
                                                     block, symmetric=False)
    table, table_scales, table_zero_points = quantize_blockwise(
        rng.standard_normal((vocab, k)).astype(np.float32), bits, block, symmetric=False, rows=True)
    table = table.reshape(vocab, -1)
    nodes = [helper.make_node("MatMulNBits", ["a", "w", "w_scales", "w_zero_points"], ["y"], domain="com.microsoft",
                              K=k, N=n, bits=bits, block_size=block, accuracy_level=0),
             helper.make_node("GatherBlockQuantized", ["table", "ids", "t_scales", "t_zero_points"], ["rows"],
                              domain="com.microsoft", bits=bits, block_size=block, gather_axis=0, quantize_axis=1)]
    inits = [numpy_helper.from_array(x, name) for x, name in (
        (packed, "w"), (scales, "w_scales"), (zero_points, "w_zero_points"), (table, "table"),
        (table_scales, "t_scales"), (table_zero_points, "t_zero_points"))]
    graph = helper.make_graph(nodes, "words", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [3, k]),
                                                helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 3])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, None) for x in ("y", "rows")], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9
    path = tmp_path / "words.onnx"
    onnx.save(model, path)
    assert run_passes(path, [trt_weight_gemm]) == ["trt_weight_gemm"]
    words = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    assert all(words[x].dtype == np.int32 for x in ("w", "w_zero_points", "table", "t_zero_points"))
    feeds = {"a": rng.standard_normal((3, k)).astype(np.float32), "ids": np.array([[0, 9, 3], [3, -1, 1]])}
    expected = run_reference(path, feeds)

    y = run_gemm(kernels, device, feeds["a"], words["w"], scales, words["w_zero_points"], None, k, n, bits, block)
    assert_gemm_close(y, expected["y"], np.float32)
    ids = feeds["ids"].astype(np.int32)
    rows = device.empty((*ids.shape, table_scales.shape[1] * block), np.float32)
    status = kernels.qwen3vl_quantized_gather(
        ptr(device.put(words["table"])), ptr(device.put(ids)), 32, ids.size, ptr(device.put(table_scales)),
        ptr(device.put(words["t_zero_points"])), rows.ptr, vocab, table_scales.shape[1], bits, block, 0, None)
    check(device.cuda, status, "qwen3vl_quantized_gather")
    np.testing.assert_array_equal(rows.numpy(), expected["rows"])  # the padded width, as the plugin


# -- decode bandwidth (printed, not asserted) -----------------------------------------------------------

def device_copy_bandwidth(cuda: Cuda, device: Device, nbytes: int = 1 << 29) -> float:
    """GB/s of a device-to-device cudaMemcpy, counting the bytes read and written."""
    src, dst = device.empty((nbytes,), np.uint8), device.empty((nbytes,), np.uint8)
    ms = cuda.time_ms(lambda: cuda.copy(dst.ptr, src.ptr, nbytes, Cuda.D2D), 10)
    return 2 * nbytes / ms / 1e6


@pytest.mark.parametrize("backend", [pytest.param("cuda", marks=pytest.mark.gpu)])
def test_decode_gemv_bandwidth_report(kernels, cuda, device, capsys):
    copy = device_copy_bandwidth(cuda, device)
    rows = []
    layers = [("q/o", *MODEL_SHAPES[0]), ("k/v", *MODEL_SHAPES[1]), ("gate/up", *MODEL_SHAPES[2]),
              ("down", *MODEL_SHAPES[3]), ("lm_head", *LM_HEAD)]
    rng = np.random.default_rng(0)
    for bits, block in ((4, 64), (4, 128), (8, 128)):
        for name, k, n in layers:
            k_blocks = -(-k // block)
            packed = device.put(rng.integers(0, 256, (n, k_blocks, block * bits // 8), dtype=np.uint8))
            scales = device.put((rng.random((n, k_blocks)) * 0.01).astype(np.float32))
            a = device.put(activations(1, k, np.float32))
            y = device.empty((1, n), np.float32)
            for path, flags in (("exact", 0), ("dp4a", FORCE_DP4A)):
                size = kernels.qwen3vl_weight_only_gemm_workspace_size(1, k, block, flags)
                workspace = device.empty((max(size, 1),), np.uint8, fill=None)

                def run():
                    cuda.check(kernels.qwen3vl_weight_only_gemm(a.ptr, packed.ptr, scales.ptr, None, None, y.ptr, 1,
                                                                n, k, bits, block, 0, flags, workspace.ptr, size, None))

                ms = cuda.time_ms(run, 50)
                weight_bytes = packed.nbytes + scales.nbytes
                gbs = weight_bytes / ms / 1e6
                rows.append(f"int{bits} b{block:<4} {name:8} K={k:<5} N={n:<7} {path:6} {ms * 1e3:9.1f} us "
                            f"{gbs:8.1f} GB/s {100 * gbs / copy:5.1f}% of copy")
    major, minor = cuda.compute_capability()
    with capsys.disabled():
        print(f"\ndecode GEMV (M=1, fp32 A), packed weights + scales read per call; SM {major}.{minor}, "
              f"device-to-device cudaMemcpy {copy:.0f} GB/s")
        print("\n".join(rows))
