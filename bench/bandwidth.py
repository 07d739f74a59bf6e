"""Memory read bandwidth of this machine, for `qwen3vl bench`'s decode efficiency.

Decoding one token reads every decoder weight once, so decode speed on a CPU is bounded by how fast
the cores can stream memory. This measures that bound the way decode reads: several threads, each
streaming its own share of one large array with vector loads (numpy's SIMD reductions, which
release the GIL, so the threads really run in parallel). The array is much larger than the
last-level cache, so the figure is DRAM bandwidth, not cache bandwidth.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

GIB = 1 << 30
# Per reduction call: large enough that call overhead vanishes, small enough to split evenly.
_CHUNK_BYTES = 16 << 20


def _stream(view: np.ndarray, chunk: int) -> float:
    # Max is a pure streaming reduction in numpy (AVX2 loads and compares, no pairwise summation
    # tree), so it runs at memory speed rather than at the adder's speed.
    best = -np.inf
    for start in range(0, view.size, chunk):
        best = max(best, float(np.maximum.reduce(view[start:start + chunk])))
    return best


def read_bandwidth(threads: int, size_bytes: int = GIB, passes: int = 10, array: np.ndarray | None = None) -> float:
    """Best-of-`passes` read bandwidth in GB/s (10**9 bytes per second) with `threads` threads over
    a float32 array of `size_bytes` (or over `array`, to reuse one between thread counts).

    Best of many passes: on a shared host single passes vary by 10% or more, and the best one is
    the closest to what the memory can deliver, the bound decode is compared with."""
    if threads < 1:
        raise ValueError("threads must be >= 1")
    data = array if array is not None else make_array(size_bytes)
    chunk = max(1, _CHUNK_BYTES // data.itemsize)
    # Contiguous shares, one per thread, so no two threads touch the same cache lines.
    bounds = np.linspace(0, data.size, threads + 1).astype(np.int64)
    shares = [data[bounds[i]:bounds[i + 1]] for i in range(threads)]
    best = np.inf
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for _ in range(passes + 1):  # the first pass is a warm-up (thread start, page-table walks)
            start = time.perf_counter()
            list(pool.map(_stream, shares, [chunk] * threads))
            best = min(best, time.perf_counter() - start)
    return data.nbytes / best / 1e9


def make_array(size_bytes: int = GIB) -> np.ndarray:
    """A float32 array whose pages are all resident (written once), so no page fault is timed."""
    return np.ones(max(1, size_bytes // 4), dtype=np.float32)


def measure(threads: int, size_bytes: int = GIB, passes: int = 10) -> dict:
    """Bandwidth with `threads` threads and with one, over the same array: whether more threads
    help tells whether one core alone can saturate memory on this machine."""
    data = make_array(size_bytes)
    try:
        result = {"bandwidth_gb_s": read_bandwidth(threads, passes=passes, array=data)}
        result["bandwidth_1thread_gb_s"] = (result["bandwidth_gb_s"] if threads == 1
                                            else read_bandwidth(1, passes=passes, array=data))
    finally:
        del data
    return {key: round(value, 2) for key, value in result.items()}


def decoder_weight_bytes(engine_dir: str | Path, manifest) -> int:
    """Bytes of decoder weights read to decode one token: every weight once, except tables that are
    only gathered from (an untied embedding: one row per token). A tied embedding is read whole as
    the lm_head and counted once, also where two initializers view the same bytes (quantized
    builds give MatMulNBits and GatherBlockQuantized one stored table).

    Reads the graph (without its weights) when the onnx package is installed; without it, the size
    of the decoder's external data files, which is the same for tied models.
    """
    folder = Path(engine_dir)
    graph_file = manifest.files["decoder"]
    try:
        import onnx
    except ImportError:
        return sum(size for name, size in manifest.sizes.items()
                   if name != graph_file and name.startswith(graph_file))
    graph = onnx.load(str(folder / graph_file), load_external_data=False).graph
    readers: dict[str, list[tuple[str, int]]] = {}
    for node in graph.node:
        for slot, name in enumerate(node.input):
            readers.setdefault(name, []).append((node.op_type, slot))
    counted: set = set()
    total = 0
    for tensor in graph.initializer:
        uses = readers.get(tensor.name, [])
        if uses and all(op in ("Gather", "GatherBlockQuantized") and slot == 0 for op, slot in uses):
            continue  # a lookup table: one row per token
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            entries = {e.key: e.value for e in tensor.external_data}
            key = (entries["location"], int(entries.get("offset", 0)), int(entries["length"]))
            if key not in counted:
                counted.add(key)
                total += key[2]
        else:
            total += len(tensor.raw_data)  # small inline constants
    return total


def physical_cores() -> int:
    """Distinct (package, core) pairs in /proc/cpuinfo: hyper-threads do not speed up these kernels."""
    try:
        cores, package = set(), None
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "physical id":
                    package = value.strip()
                elif key == "core id":
                    cores.add((package, value.strip()))
        if cores:
            return len(cores)
    except OSError:
        pass
    return os.cpu_count() or 1
