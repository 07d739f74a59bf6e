"""The few CUDA runtime calls the TensorRT backend makes, through ctypes on libcudart.

No cuda-python: its 13.x releases dropped Pascal, and what the backend needs is small (device
memory, pinned host memory, one stream, async copies, stream capture into a CUDA graph, device
facts). Everything else in the backend talks to a `CudaRuntime`, so tests can hand it a stand-in.

The library is the one TensorRT and the plugin library already use when it is loaded (dlopen by
soname returns the loaded copy), else the first `libcudart` found on the usual paths, in the pip
`nvidia-cuda-runtime-cu12` package, or at `$QWEN3VL_CUDART`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import Qwen3VLError

# cudaMemcpyKind, cudaStreamCaptureMode, cudaDeviceAttr values (driver_types.h, CUDA 11 and 12).
_HOST_TO_DEVICE, _DEVICE_TO_HOST = 1, 2
_CAPTURE_THREAD_LOCAL = 1  # what trtexec captures enqueueV3 with
_ATTR_SM_COUNT, _ATTR_MAJOR, _ATTR_MINOR = 16, 75, 76
_STREAM_NON_BLOCKING = 1
_DEVICE_PROP_BYTES = 8192  # larger than cudaDeviceProp of any release; `name` is its first field


class CudaError(Qwen3VLError):
    """A CUDA runtime call that failed, or no usable CUDA runtime / GPU."""


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: tuple[int, int]
    sm_count: int
    total_memory: int

    @property
    def sm(self) -> str:
        return f"{self.compute_capability[0]}.{self.compute_capability[1]}"


def _candidates() -> list[str]:
    names = [os.environ.get("QWEN3VL_CUDART", "")]
    if sys.platform == "win32":
        names += ["cudart64_12.dll", "cudart64_110.dll"]
    else:
        names += ["libcudart.so.12", "libcudart.so.11.0", "libcudart.so"]
        for entry in sys.path:  # the pip package nvidia-cuda-runtime-cu12
            names += [str(p) for p in sorted(Path(entry, "nvidia", "cuda_runtime", "lib").glob("libcudart.so*"))]
    found = ctypes.util.find_library("cudart")
    return [n for n in names + ([found] if found else []) if n]


class CudaRuntime:
    """libcudart through ctypes. Pointers and handles are Python ints; every failing call raises CudaError."""

    def __init__(self, lib: ctypes.CDLL, path: str = "libcudart"):
        self.lib, self.path = lib, path
        lib.cudaGetErrorName.restype = ctypes.c_char_p
        lib.cudaGetErrorString.restype = ctypes.c_char_p  # every other call returns cudaError_t: ctypes' int

    @classmethod
    def load(cls) -> "CudaRuntime":
        errors = []
        for name in _candidates():
            try:
                return cls(ctypes.CDLL(name), name)
            except OSError as exc:
                errors.append(str(exc).splitlines()[0])
        raise CudaError("no CUDA runtime library (libcudart) found: install a CUDA 12.x runtime or the "
                        "nvidia-cuda-runtime-cu12 package, or set QWEN3VL_CUDART")

    # -- errors --------------------------------------------------------------------------------------

    def error_name(self, code: int) -> str:
        return (self.lib.cudaGetErrorName(int(code)) or b"cudaError?").decode()

    def clear_error(self) -> None:
        """Resets the last error: a launch API that returns cudaGetLastError() would report an older one."""
        self.lib.cudaGetLastError()

    def check(self, code: int, what: str) -> None:
        if code != 0:
            message = (self.lib.cudaGetErrorString(int(code)) or b"").decode()
            raise CudaError(f"CUDA {what} failed: {self.error_name(code)} ({message})")

    # -- device facts --------------------------------------------------------------------------------

    def device_count(self) -> int:
        count = ctypes.c_int(0)
        code = self.lib.cudaGetDeviceCount(ctypes.byref(count))
        return count.value if code == 0 else 0

    def device_info(self, device: int = 0) -> GpuInfo:
        def attribute(attr: int) -> int:
            value = ctypes.c_int(0)
            self.check(self.lib.cudaDeviceGetAttribute(ctypes.byref(value), attr, device), "cudaDeviceGetAttribute")
            return value.value

        props = ctypes.create_string_buffer(_DEVICE_PROP_BYTES)
        get = getattr(self.lib, "cudaGetDeviceProperties_v2", None) or self.lib.cudaGetDeviceProperties
        self.check(get(props, device), "cudaGetDeviceProperties")
        name = props.raw[:256].split(b"\0", 1)[0].decode(errors="replace")
        free, total = self.mem_get_info()
        return GpuInfo(name, (attribute(_ATTR_MAJOR), attribute(_ATTR_MINOR)), attribute(_ATTR_SM_COUNT), total)

    def mem_get_info(self) -> tuple[int, int]:
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        self.check(self.lib.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total)), "cudaMemGetInfo")
        return free.value, total.value

    # -- memory --------------------------------------------------------------------------------------

    def malloc(self, nbytes: int) -> int:
        ptr = ctypes.c_void_p(0)
        self.check(self.lib.cudaMalloc(ctypes.byref(ptr), ctypes.c_size_t(max(int(nbytes), 1))),
                   f"cudaMalloc of {nbytes} bytes")
        return ptr.value or 0

    def free(self, ptr: int) -> None:
        self.lib.cudaFree(ctypes.c_void_p(ptr))

    def host_alloc(self, nbytes: int) -> int:
        """Pinned (page-locked) host memory: async copies from it do not stage through a bounce buffer."""
        ptr = ctypes.c_void_p(0)
        self.check(self.lib.cudaMallocHost(ctypes.byref(ptr), ctypes.c_size_t(max(int(nbytes), 1))),
                   f"cudaMallocHost of {nbytes} bytes")
        return ptr.value or 0

    def host_free(self, ptr: int) -> None:
        self.lib.cudaFreeHost(ctypes.c_void_p(ptr))

    def copy_to_device(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        self.check(self.lib.cudaMemcpyAsync(ctypes.c_void_p(dst), ctypes.c_void_p(src), ctypes.c_size_t(nbytes),
                                            _HOST_TO_DEVICE, ctypes.c_void_p(stream)), "cudaMemcpyAsync (to device)")

    def copy_to_host(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        self.check(self.lib.cudaMemcpyAsync(ctypes.c_void_p(dst), ctypes.c_void_p(src), ctypes.c_size_t(nbytes),
                                            _DEVICE_TO_HOST, ctypes.c_void_p(stream)), "cudaMemcpyAsync (to host)")

    def memset(self, ptr: int, value: int, nbytes: int, stream: int) -> None:
        self.check(self.lib.cudaMemsetAsync(ctypes.c_void_p(ptr), int(value), ctypes.c_size_t(nbytes),
                                            ctypes.c_void_p(stream)), "cudaMemsetAsync")

    # -- streams and graphs --------------------------------------------------------------------------

    def stream_create(self) -> int:
        stream = ctypes.c_void_p(0)
        self.check(self.lib.cudaStreamCreateWithFlags(ctypes.byref(stream), _STREAM_NON_BLOCKING), "cudaStreamCreate")
        return stream.value or 0

    def stream_destroy(self, stream: int) -> None:
        self.lib.cudaStreamDestroy(ctypes.c_void_p(stream))

    def synchronize(self, stream: int) -> None:
        self.check(self.lib.cudaStreamSynchronize(ctypes.c_void_p(stream)), "cudaStreamSynchronize")

    def begin_capture(self, stream: int) -> None:
        self.check(self.lib.cudaStreamBeginCapture(ctypes.c_void_p(stream), _CAPTURE_THREAD_LOCAL),
                   "cudaStreamBeginCapture")

    def end_capture(self, stream: int) -> int | None:
        """The captured graph, or None when the capture failed (an operation not allowed in capture);
        the stream leaves capture mode either way and the sticky error is cleared."""
        graph = ctypes.c_void_p(0)
        code = self.lib.cudaStreamEndCapture(ctypes.c_void_p(stream), ctypes.byref(graph))
        if code != 0 or not graph.value:
            self.lib.cudaGetLastError()
            if graph.value:
                self.lib.cudaGraphDestroy(graph)
            return None
        return graph.value

    def graph_instantiate(self, graph: int) -> int:
        """An executable graph (cudaGraphInstantiateWithFlags: the same signature in CUDA 11.4+ and 12);
        the graph itself is destroyed."""
        executable = ctypes.c_void_p(0)
        code = self.lib.cudaGraphInstantiateWithFlags(ctypes.byref(executable), ctypes.c_void_p(graph),
                                                      ctypes.c_ulonglong(0))
        self.lib.cudaGraphDestroy(ctypes.c_void_p(graph))
        self.check(code, "cudaGraphInstantiate")
        return executable.value or 0

    def graph_discard(self, graph: int) -> None:
        self.lib.cudaGraphDestroy(ctypes.c_void_p(graph))

    def graph_launch(self, executable: int, stream: int) -> None:
        self.check(self.lib.cudaGraphLaunch(ctypes.c_void_p(executable), ctypes.c_void_p(stream)), "cudaGraphLaunch")

    def graph_destroy(self, executable: int) -> None:
        self.lib.cudaGraphExecDestroy(ctypes.c_void_p(executable))


class DeviceBuffer:
    """Device memory freed with its owner."""

    def __init__(self, cuda: CudaRuntime, nbytes: int):
        self.cuda, self.nbytes = cuda, int(nbytes)
        self.ptr = cuda.malloc(self.nbytes)

    def close(self) -> None:
        if self.ptr:
            self.cuda.free(self.ptr)
            self.ptr = 0

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may be gone
            pass


class PinnedArray:
    """A numpy array over pinned host memory (the staging side of host <-> device copies)."""

    def __init__(self, cuda: CudaRuntime, shape: tuple[int, ...], dtype):
        self.cuda, self.dtype = cuda, np.dtype(dtype)
        self.nbytes = int(np.prod(shape, dtype=np.int64)) * self.dtype.itemsize
        self.ptr = cuda.host_alloc(self.nbytes)
        raw = (ctypes.c_byte * max(self.nbytes, 1)).from_address(self.ptr)
        self.array = np.frombuffer(raw, dtype=np.uint8, count=self.nbytes).view(self.dtype).reshape(shape)

    def view(self, shape: tuple[int, ...]) -> np.ndarray:
        """The first prod(shape) elements, shaped: contiguous, starting at `ptr`."""
        count = int(np.prod(shape, dtype=np.int64))
        return self.array.reshape(-1)[:count].reshape(shape)

    def close(self) -> None:
        if self.ptr:
            self.array = None
            self.cuda.host_free(self.ptr)
            self.ptr = 0

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
