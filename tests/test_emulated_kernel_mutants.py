"""Proof that the emulated kernel tests can fail: broken variants of the real kernels are caught.

Each mutant is a one-place textual patch of a real source in trt_plugins/ (an off-by-one in a tile
bound, a missing barrier, a shuffle reading the wrong lane, a dropped scale, a barrier inside a
branch), applied to a copy and compiled for the CPU emulation. The test first checks that the patch
still applies to today's source (so a change there cannot make a mutant silently vanish), then runs
one case through the same run/compare helpers as test_kernels_gpu.py and
test_attention_kernels_gpu.py: on the real kernels it passes; on the mutant the comparison fails,
or the emulator stops the launch with the error named.

The missing barriers are caught because a thread runs until its next synchronisation point before
another runs, in a seeded random order: without the barrier some threads read shared memory before
the others have written it (it starts as NaN) or after they have overwritten it.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from kernel_devices import Cuda, Device, emulated_cuda, emulated_library, emulation_runtime  # noqa: F401
from test_attention_kernels_gpu import (attention_inputs, check_attention, declare_attention_api, run_attention,
                                        run_vision)
from test_kernels_gpu import (EPSILON, FORCE_DP4A, FORCE_TILED, activations, assert_close, assert_gemm_close,
                              declare_kernel_api, expected_gemm, quantized_layer, run_gemm, run_rmsnorm)

import cuda_emulation
from graph_passes.plugin_reference import rms_norm, vision_attention
from runtime.vision_positions import frame_layout

# -- the cases, as the kernel tests run them ---------------------------------------------------------


def rmsnorm_rows(n: int) -> Callable:
    """RMSNorm of rows of n values: 128 takes a warp per row, 2048 a block per row (with the
    block's barrier in rowSum)."""
    def check(lib, device):
        rng = np.random.default_rng(n)
        x = (rng.standard_normal((3, 16, n)) * 3).astype(np.float32)
        gamma = (rng.standard_normal(n) * 0.5 + 1).astype(np.float32)
        y, _ = run_rmsnorm(declare_kernel_api(lib), device, x, gamma)
        expected, _ = rms_norm(x, gamma, EPSILON)
        assert_close(y, expected, np.float32, scale=float(np.abs(expected).max()))
    return check


def gemm(m: int, k: int, n: int, flags: int) -> Callable:
    """One weight-only GEMM (int4, block 64, asymmetric) against its reference."""
    def check(lib, device):
        packed, scales, zero_points, bias = quantized_layer(k, n, 4, 64, False, "float32")
        a = activations(m, k, np.float32)
        y = run_gemm(declare_kernel_api(lib), device, a, packed, scales, zero_points, bias, k, n, 4, 64, flags)
        expected = expected_gemm(a, packed, scales, zero_points, bias, k, n, 4, 64, dp4a=bool(flags & FORCE_DP4A))
        assert_gemm_close(y, expected, np.float32)
    return check


def decode_step(lib, device):
    """A decode step over 32 and 19 cached keys in a buffer of 40 (the rest filler)."""
    rng = np.random.default_rng(1)
    f = attention_inputs(rng, batch=2, seq_len=1, heads=8, kv_heads=4, head_dim=64, capacity=40, valid=[33, 20],
                         prompt=False, dtype=np.float32, cache_dtype=np.float32)
    got = run_attention(declare_attention_api(lib), device, f, heads=8, kv_heads=4, head_dim=64)
    check_attention(got, f, 8, 4, 64, with_ort=False)


def vision_frames(lib, device):
    """Two frames of 36 and 35 patches (two key tiles each), 4 heads of 64."""
    heads, head_dim = 4, 64
    index, mask, slot = frame_layout(np.array([[1, 6, 6], [1, 5, 7]]))
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((int(mask.sum()), heads * head_dim)).astype(np.float32) for _ in range(3))
    got = run_vision(declare_attention_api(lib), device, q, k, v, index, mask, heads, head_dim, np.int64)
    want = vision_attention(q, k, v, index, mask, slot, heads, head_dim, head_dim**-0.5)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


# -- the mutants ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Mutant:
    source: str  # the file patched, relative to trt_plugins/
    old: str  # must occur exactly once in it
    new: str
    kernel: str  # the kernel source compiled (it includes `source` where that is a header)
    check: Callable  # (library, device): runs one case and compares
    caught_by: str  # "comparison", or what the emulator's error message says


GEMM = "weight_only_gemm/weight_only_gemm_kernel.cu"
ATTENTION = "attention/attention_kernel.cu"
VISION = "vision_attention/vision_attention_kernel.cu"
RMSNORM = "rmsnorm/rmsnorm_kernel.cu"

MUTANTS = {
    # Off-by-one in the decode chunk bound: each split also visits the first key past its chunk
    # (here the first not-yet-valid position of the buffer).
    "decode-chunk-bound-off-by-one": Mutant(
        ATTENTION, "ok[u] = j < c1;", "ok[u] = j <= c1;", ATTENTION, decode_step, "comparison"),
    # Off-by-one in the tiled GEMM's output bound: the tile also stores row m, past the output.
    "gemm-tile-store-off-by-one": Mutant(
        GEMM, "if (row >= m)", "if (row > m)", GEMM, gemm(17, 200, 77, FORCE_TILED),
        "wrote past the end of a 5236-byte cudaMalloc allocation"),
    # Missing barrier between storing the A and W tiles and reading them (read before write).
    "gemm-tile-missing-barrier": Mutant(
        GEMM, "wTile[lk + i][lr] = wv[i];\n        }\n        __syncthreads();",
        "wTile[lk + i][lr] = wv[i];\n        }", GEMM, gemm(17, 200, 77, FORCE_TILED), "comparison"),
    # Missing barrier between the scores reading the key tile and the values overwriting it
    # (write after read), in the attention tile the vision kernel shares with the prefill.
    "attention-tile-missing-barrier": Mutant(
        "attention/attention_tile.cuh",
        "        __syncthreads(); // every score has read the keys before the values replace them\n", "",
        VISION, vision_frames, "comparison"),
    # The warp sum reads lane + offset (shfl_down) instead of lane ^ offset: only lane 0 ends with
    # the whole sum, and the head-dim rows use every lane's.
    "warp-sum-wrong-shuffle-lane": Mutant(
        "common/device_utils.cuh", "v += __shfl_xor_sync(0xffffffffu, v, offset);",
        "v += __shfl_down_sync(0xffffffffu, v, offset);", RMSNORM, rmsnorm_rows(128), "comparison"),
    # The dp4a GEMV drops the activations' per-block scale.
    "dp4a-gemv-dropped-activation-scale": Mutant(
        GEMM, "acc[j][r] = fmaf(scale[j] * actScale[r], static_cast<float>(dot[r]), acc[j][r]);",
        "acc[j][r] = fmaf(scale[j], static_cast<float>(dot[r]), acc[j][r]);", GEMM, gemm(1, 256, 96, FORCE_DP4A),
        "comparison"),
    # The block barrier of RMSNorm's row sum moved inside `if (lane == 0)`: lane 0 of each warp
    # waits there while the rest of its warp waits for it at the next warp sum's shuffle.
    "rmsnorm-barrier-inside-a-branch": Mutant(
        RMSNORM, "        rowPartial[warp] = v;\n    }\n    __syncthreads();",
        "        rowPartial[warp] = v;\n        __syncthreads();\n    }", RMSNORM, rmsnorm_rows(2048),
        "deadlock: 0 of 256 threads have exited, 8 wait at __syncthreads() at rmsnorm_kernel.cu"),
}


# The kernels whose C API a check declares (declare_kernel_api, declare_attention_api) come in pairs:
# a mutant library links the unbroken one of its pair from the session's emulated build.
PARTNER = {RMSNORM: GEMM, GEMM: RMSNORM, ATTENTION: VISION, VISION: ATTENTION}


@pytest.fixture(scope="session")
def mutant_libraries(emulated_library, emulation_runtime, tmp_path_factory) -> dict[str, object]:
    """Every mutant compiled (two at a time, -O0: they run one small case), or the error that
    stopped it."""
    root = tmp_path_factory.mktemp("mutants")

    def build(name: str):
        m = MUTANTS[name]
        partner = emulated_library.parent / f"{Path(PARTNER[m.kernel]).stem}.o"
        try:
            return cuda_emulation.build_library(root / name, sources=[m.kernel], patches={m.source: [(m.old, m.new)]},
                                                runtime=emulation_runtime, objects=[partner], name=name,
                                                optimisation="-O0")
        except (ValueError, RuntimeError) as error:
            return error

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(MUTANTS, pool.map(build, MUTANTS)))


def run_check(cuda: Cuda, check: Callable) -> None:
    device = Device(cuda)
    try:
        check(cuda.lib, device)
    finally:
        device.close()
        cuda.reset()


@pytest.mark.parametrize("name", list(MUTANTS))
def test_a_broken_kernel_fails_the_check_the_real_one_passes(name, mutant_libraries, emulated_cuda):
    m = MUTANTS[name]
    source = (cuda_emulation.PLUGINS / m.source).read_text()
    assert source.count(m.old) == 1, f"the mutation no longer applies to trt_plugins/{m.source}: update it"
    built = mutant_libraries[name]
    if isinstance(built, Exception):
        raise built

    run_check(emulated_cuda, m.check)  # the real kernels pass
    broken = Cuda(str(built), emulated=True)
    if m.caught_by == "comparison":
        with pytest.raises(AssertionError):
            run_check(broken, m.check)
    else:
        with pytest.raises(RuntimeError) as error:
            run_check(broken, m.check)
        assert m.caught_by in str(error.value)
