"""Where the kernel tests run the kernels: a CUDA GPU or the CPU emulation of one.

Both are driven the same way, through ctypes and the CUDA runtime API (cudaMalloc, cudaMemcpy,
...): on a GPU that API is libcudart's and the kernels are built with nvcc for the GPU present; in
the emulation (tests/cuda_emulation) the kernels are built with g++ into one library that also
exports those calls, over host memory. A test takes the `backend` parameter ("cuda" or "emulated")
and the `cuda`, `device` and `kernels` fixtures then give it that backend's runtime, memory and
kernel library. The cuda cases carry the `gpu` mark (deselected by default, run with `-m gpu`);
the emulated ones run in `make test`, usually at smaller shapes (`per_backend`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import cuda_emulation

SKIP_REASON = "needs an NVIDIA GPU and nvcc"


# -- parameters ---------------------------------------------------------------------------------------

def per_backend(names: str, cuda=(), emulated=()) -> tuple[str, list]:
    """parametrize arguments for ("backend", *names) with different cases per backend: `cuda` cases
    (marked gpu) and `emulated` ones, each a list of values (tuples for several names) or a dict
    {id: value}. Usage: @pytest.mark.parametrize(*per_backend("m", cuda=[1, 300], emulated=[1, 70]))."""
    several = "," in names
    params = []
    for backend, values, marks in (("cuda", cuda, [pytest.mark.gpu]), ("emulated", emulated, [])):
        cases = values.items() if isinstance(values, dict) else [(None, v) for v in values]
        for case_id, value in cases:
            value = tuple(value) if several else (value,)
            params.append(pytest.param(backend, *value, marks=marks,
                                       id=None if case_id is None else f"{backend}-{case_id}"))
    return f"backend,{names}", params


BOTH = [pytest.param("cuda", marks=pytest.mark.gpu), "emulated"]


# -- the CUDA runtime through ctypes ------------------------------------------------------------------

def nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found is None and Path("/usr/local/cuda/bin/nvcc").exists():
        found = "/usr/local/cuda/bin/nvcc"
    return found


def cudart_path(nvcc_path: str) -> str | None:
    root = Path(nvcc_path).resolve().parents[1]
    for folder in (root / "lib64", root / "lib", root / "targets" / "x86_64-linux" / "lib"):
        libs = sorted(folder.glob("libcudart.so*"))
        if libs:
            return str(libs[0])
    return ctypes.util.find_library("cudart")


class Cuda:
    """The few CUDA runtime calls the tests need, from libcudart or from an emulated kernel library
    (which also reports what stopped a failed launch: `emulation_error`)."""

    H2D, D2H, D2D = 1, 2, 3

    def __init__(self, path: str, emulated: bool = False):
        # The emulation stays out of the global symbol scope, so that a real kernel library loaded
        # later still binds to libcudart.
        self.emulated = emulated
        self.lib = ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL if emulated else ctypes.RTLD_GLOBAL)
        lib = self.lib
        lib.cudaGetErrorString.restype = ctypes.c_char_p
        lib.cudaMalloc.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t]
        lib.cudaFree.argtypes = [ctypes.c_void_p]
        lib.cudaMemcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        lib.cudaMemset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
        lib.cudaEventCreate.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
        lib.cudaEventRecord.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        lib.cudaEventSynchronize.argtypes = [ctypes.c_void_p]
        lib.cudaEventElapsedTime.argtypes = [ctypes.POINTER(ctypes.c_float), ctypes.c_void_p, ctypes.c_void_p]
        lib.cudaEventDestroy.argtypes = [ctypes.c_void_p]
        if emulated:
            lib.cuda_emu_error_message.restype = ctypes.c_char_p
            lib.cuda_emu_set_schedule.argtypes = [ctypes.c_int, ctypes.c_ulonglong]
            lib.cuda_emu_set_device.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
            lib.cuda_emu_context_switches.restype = ctypes.c_ulonglong

    def emulation_error(self) -> str:
        return self.lib.cuda_emu_error_message().decode() if self.emulated else ""

    def reset(self) -> None:
        """Forget a failed launch (emulation only; on a GPU the context is lost for good)."""
        if self.emulated:
            self.lib.cuda_emu_reset()

    def check(self, status: int, what: str = "CUDA call") -> None:
        if status != 0:
            detail = self.emulation_error()
            raise RuntimeError(f"{what}: {self.lib.cudaGetErrorString(status).decode()}"
                               + (f": {detail}" if detail else ""))

    def device_count(self) -> int:
        count = ctypes.c_int(0)
        return count.value if self.lib.cudaGetDeviceCount(ctypes.byref(count)) == 0 else 0

    def compute_capability(self) -> tuple[int, int]:
        major, minor = ctypes.c_int(), ctypes.c_int()
        self.check(self.lib.cudaDeviceGetAttribute(ctypes.byref(major), 75, 0))  # cudaDevAttrComputeCapabilityMajor
        self.check(self.lib.cudaDeviceGetAttribute(ctypes.byref(minor), 76, 0))
        return major.value, minor.value

    def malloc(self, nbytes: int) -> int:
        ptr = ctypes.c_void_p()
        self.check(self.lib.cudaMalloc(ctypes.byref(ptr), max(nbytes, 1)), "cudaMalloc")
        return ptr.value

    def free(self, ptr: int) -> None:
        self.lib.cudaFree(ptr)

    def copy(self, dst: int, src: int, nbytes: int, kind: int) -> None:
        self.check(self.lib.cudaMemcpy(dst, src, nbytes, kind), "cudaMemcpy")

    def fill(self, ptr: int, byte: int, nbytes: int) -> None:
        self.check(self.lib.cudaMemset(ptr, byte, nbytes), "cudaMemset")

    def synchronize(self) -> None:
        self.check(self.lib.cudaDeviceSynchronize(), "kernel")

    def time_ms(self, run, iterations: int) -> float:
        """Mean milliseconds of `run()` over `iterations` launches on the default stream."""
        start, stop = ctypes.c_void_p(), ctypes.c_void_p()
        self.check(self.lib.cudaEventCreate(ctypes.byref(start)))
        self.check(self.lib.cudaEventCreate(ctypes.byref(stop)))
        try:
            run()  # warm-up
            self.check(self.lib.cudaEventRecord(start, None))
            for _ in range(iterations):
                run()
            self.check(self.lib.cudaEventRecord(stop, None))
            self.check(self.lib.cudaEventSynchronize(stop), "timed kernels")
            ms = ctypes.c_float()
            self.check(self.lib.cudaEventElapsedTime(ctypes.byref(ms), start, stop))
            return ms.value / iterations
        finally:
            self.lib.cudaEventDestroy(start)
            self.lib.cudaEventDestroy(stop)


class Device:
    """Device arrays of one test, freed together at its end."""

    def __init__(self, cuda: Cuda):
        self.cuda, self.pointers = cuda, []

    def empty(self, shape, dtype, fill: int | None = 0xFF) -> "DeviceArray":
        array = DeviceArray(self, shape, dtype)
        if fill is not None:  # garbage, so that a missed write shows
            self.cuda.fill(array.ptr, fill, array.nbytes)
        return array

    def put(self, host: np.ndarray | None) -> "DeviceArray | None":
        if host is None:
            return None
        host = np.ascontiguousarray(host)
        array = DeviceArray(self, host.shape, host.dtype)
        self.cuda.copy(array.ptr, host.ctypes.data, host.nbytes, Cuda.H2D)
        return array

    def close(self) -> None:
        for ptr in self.pointers:
            self.cuda.free(ptr)
        self.pointers.clear()


class DeviceArray:
    def __init__(self, device: Device, shape, dtype):
        self.device, self.shape, self.dtype = device, tuple(shape), np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        self.ptr = device.cuda.malloc(self.nbytes)
        device.pointers.append(self.ptr)

    def numpy(self) -> np.ndarray:
        self.device.cuda.synchronize()
        out = np.empty(self.shape, self.dtype)
        self.device.cuda.copy(out.ctypes.data, self.ptr, self.nbytes, Cuda.D2H)
        return out


def ptr(array: DeviceArray | None) -> int | None:
    return None if array is None else array.ptr


def check(cuda: Cuda, status: int, what: str) -> None:
    cuda.check(status, what)
    cuda.synchronize()


# -- building -----------------------------------------------------------------------------------------

def open_cuda() -> Cuda:
    """libcudart of the local toolkit, with a GPU behind it; skips otherwise."""
    compiler = nvcc()
    cudart = cudart_path(compiler) if compiler else None
    if compiler is None or cudart is None:
        pytest.skip(SKIP_REASON)
    cuda = Cuda(cudart)
    if cuda.device_count() < 1:
        pytest.skip(SKIP_REASON)
    return cuda


def build_for_gpu(cuda: Cuda, sources, library: Path) -> Path:
    """The kernel sources built with nvcc for the GPU present into one shared library."""
    compiler = nvcc()
    major, minor = cuda.compute_capability()
    # -cudart shared: the kernels and the tests' cudaMalloc share one runtime.
    command = [compiler, "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-cudart", "shared",
               f"-arch=sm_{major}{minor}", "--Werror=all-warnings", "-Wno-deprecated-gpu-targets",
               f"-Xlinker=-rpath={Path(cudart_path(compiler)).parent}", "-o", str(library), *map(str, sources)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 and "Unsupported gpu architecture" in result.stderr:
        pytest.skip(f"{compiler} cannot compile for sm_{major}{minor} (Pascal needs a CUDA 12.x toolkit)")
    assert result.returncode == 0, result.stderr
    return library


def need_compiler() -> None:
    if cuda_emulation.compiler() is None:
        pytest.skip("the CPU emulation of the kernels needs a C++ compiler (g++)")


# -- fixtures (imported by the kernel test modules) ---------------------------------------------------

# Each test module that imports these fixtures gets its own copy of them, so the session-wide
# objects are kept here: the emulated kernels are compiled once per session, not once per module.
_SESSION: dict[str, object] = {}


@pytest.fixture(scope="session")
def real_cuda():
    if "real_cuda" not in _SESSION:
        _SESSION["real_cuda"] = open_cuda()
    return _SESSION["real_cuda"]


@pytest.fixture(scope="session")
def emulation_runtime(tmp_path_factory) -> Path:
    """The emulation runtime's object file, compiled once and linked into every emulated library."""
    if "emulation_runtime" not in _SESSION:
        need_compiler()
        _SESSION["emulation_runtime"] = cuda_emulation.compile_runtime(tmp_path_factory.mktemp("emulation_runtime"))
    return _SESSION["emulation_runtime"]


@pytest.fixture(scope="session")
def emulated_library(emulation_runtime, tmp_path_factory) -> Path:
    """Every kernel with the emulation runtime, built once per session."""
    if "emulated_library" not in _SESSION:
        _SESSION["emulated_library"] = cuda_emulation.build_library(tmp_path_factory.mktemp("emulated_kernels"),
                                                                    runtime=emulation_runtime)
    return _SESSION["emulated_library"]


@pytest.fixture(scope="session")
def emulated_cuda(emulated_library) -> Cuda:
    if "emulated_cuda" not in _SESSION:
        _SESSION["emulated_cuda"] = Cuda(str(emulated_library), emulated=True)
    return _SESSION["emulated_cuda"]


@pytest.fixture
def cuda(backend, request) -> Cuda:
    return request.getfixturevalue("real_cuda" if backend == "cuda" else "emulated_cuda")


@pytest.fixture
def device(cuda):
    arrays = Device(cuda)
    yield arrays
    arrays.close()
    cuda.reset()
