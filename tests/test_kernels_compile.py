"""The CUDA kernels and the TensorRT plugin sources compile with warnings as errors, without a GPU.

- every `trt_plugins/*/*_kernel.cu` with the local nvcc for sm_75 (`-Werror all-warnings`, and the
  host compiler's -Wall -Wextra -Werror), in parallel;
- every plugin `.cpp` with g++ -fsyntax-only against each TensorRT header set found under
  $TRT_HEADERS_ROOT (folders like v8.6.1/include, v10.13.3/include, v11.1/include). No TensorRT
  wheel ships headers and none are in this project, so without that variable the check skips;
- with those headers, the plugin sources linked with the kernels into tests/plugin_lifecycle.cpp
  (no GPU and no TensorRT library needed: nothing is enqueued), which builds each plugin's fields as
  TensorRT 8.6's ONNX parser does (only the creator's listed names; strings with their NUL, int and
  float arrays) from the attributes the TensorRT passes write, runs each creator and plugin through
  create / clone / serialize / deserialize / destroy, checks supportsFormatCombination position by
  position against the types TensorRT offers a plugin (FLOAT, HALF, INT32) and getOutputDimensions
  through a stand-in of TensorRT's expression builder.
The header sets a run used are its test ids (e.g. `[v8.6.1]`, `[v10.13.3]`, `[v11.1]`): extract them
from github.com/NVIDIA/TensorRT outside the project, e.g.
`git archive v8.6.1 include | tar -x -C $TRT_HEADERS_ROOT/v8.6.1`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ROOT / "trt_plugins"
KERNELS = sorted(PLUGINS.glob("*/*_kernel.cu"))
PLUGIN_SOURCES = sorted(PLUGINS.glob("*/*.cpp"))
WORKERS = max(2, os.cpu_count() or 2)


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found is None and Path("/usr/local/cuda/bin/nvcc").exists():
        found = "/usr/local/cuda/bin/nvcc"
    return found


def _cuda_include() -> Path | None:
    """The CUDA runtime headers (cuda_runtime_api.h) the plugin sources include."""
    candidates = [Path("/usr/local/cuda/include")]
    nvcc = _nvcc()
    if nvcc:
        candidates.insert(0, Path(nvcc).resolve().parents[1] / "include")
    return next((c for c in candidates if (c / "cuda_runtime_api.h").exists()), None)


def _run_all(commands: dict[str, list[str]]) -> list[str]:
    """Runs the commands in parallel; returns the failures, each with its compiler output."""
    def run(item):
        name, command = item
        result = subprocess.run(command, capture_output=True, text=True)
        return None if result.returncode == 0 else f"{name}:\n{result.stdout}{result.stderr}"

    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        return [failure for failure in pool.map(run, commands.items()) if failure]


def test_every_plugin_folder_has_its_kernel_and_plugin_sources():
    assert {p.parent.name for p in KERNELS} >= {"rmsnorm", "weight_only_gemm"}
    assert {p.parent.name for p in PLUGIN_SOURCES} >= {"rmsnorm", "weight_only_gemm", "common"}


def test_kernels_do_not_include_tensorrt():
    """The kernels build and run without TensorRT (the kernel library, the GPU tests)."""
    for source in [*PLUGINS.glob("*/*.cu"), *PLUGINS.glob("*/*.cuh"), *PLUGINS.glob("*/*_kernel.h")]:
        assert not re.search(r'#include\s*[<"](NvInfer|.*trt_version|.*plugin_utils)', source.read_text()), source


def test_kernels_compile_for_sm75_with_warnings_as_errors(tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found: install the CUDA toolkit (12.x or 13.x) to compile the kernels")
    commands = {
        str(source.relative_to(ROOT)): [
            nvcc, "-std=c++17", "-O3", "-arch=sm_75", "-Werror", "all-warnings", "-Xcompiler=-Wall,-Wextra,-Werror",
            "-c", str(source), "-o", str(tmp_path / f"{source.parent.name}_{source.stem}.o")]
        for source in KERNELS
    }
    failures = _run_all(commands)
    assert not failures, "\n".join(failures)


def _header_sets() -> list:
    root = os.environ.get("TRT_HEADERS_ROOT")
    if not root:
        return [pytest.param(None, id="no-headers", marks=pytest.mark.skip(
            reason="TRT_HEADERS_ROOT is not set (a folder of TensorRT header sets: v8.6.1/include, "
                   "v10.13.3/include, ...; no TensorRT wheel ships headers)"))]
    sets = sorted(p for p in Path(root).glob("*/include") if (p / "NvInfer.h").exists())
    if not sets:
        return [pytest.param(None, id="no-headers", marks=pytest.mark.skip(
            reason=f"no <version>/include/NvInfer.h under TRT_HEADERS_ROOT={root}"))]
    return [pytest.param(p, id=p.parent.name) for p in sets]


@pytest.mark.parametrize("trt_include", _header_sets())
def test_plugins_compile_against_tensorrt_headers(trt_include):
    gxx = shutil.which("g++")
    cuda_include = _cuda_include()
    if gxx is None or cuda_include is None:
        pytest.skip("needs g++ and the CUDA runtime headers (cuda_runtime_api.h)")
    commands = {
        str(source.relative_to(ROOT)): [
            gxx, "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", f"-I{cuda_include}",
            f"-I{trt_include}", str(source)]
        for source in PLUGIN_SOURCES
    }
    failures = _run_all(commands)
    assert not failures, "\n".join(failures)


@pytest.fixture(scope="module")
def kernel_objects(tmp_path_factory):
    """The kernels compiled once (sm_75) for linking; skips without nvcc."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found: install the CUDA toolkit to link the plugins with their kernels")
    folder = tmp_path_factory.mktemp("kernel_objects")
    objects = [folder / f"{source.parent.name}_{source.stem}.o" for source in KERNELS]
    failures = _run_all({str(source): [nvcc, "-std=c++17", "-O1", "-arch=sm_75", "-Xcompiler=-fPIC", "-c",
                                       str(source), "-o", str(obj)] for source, obj in zip(KERNELS, objects)})
    assert not failures, "\n".join(failures)
    return objects


@pytest.mark.parametrize("trt_include", _header_sets())
def test_plugins_link_and_survive_their_lifecycle(trt_include, kernel_objects, tmp_path):
    gxx = shutil.which("g++")
    cuda_include = _cuda_include()
    if gxx is None or cuda_include is None:
        pytest.skip("needs g++ and the CUDA runtime headers (cuda_runtime_api.h)")
    cuda_lib = cuda_include.parent / "lib64"
    binary = tmp_path / "plugin_lifecycle"
    sources = [str(p) for p in PLUGINS.glob("*/*_plugin.cpp")]
    build = subprocess.run(
        [gxx, "-std=c++17", "-O1", "-fsanitize=address,undefined", "-Wall", "-Wextra", "-Werror", f"-I{PLUGINS}",
         f"-I{cuda_include}", f"-I{trt_include}", str(ROOT / "tests" / "plugin_lifecycle.cpp"), *sources,
         *map(str, kernel_objects), f"-L{cuda_lib}", "-lcudart", f"-Wl,-rpath,{cuda_lib}", "-o", str(binary)],
        capture_output=True, text=True)
    assert build.returncode == 0, build.stdout + build.stderr
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "all plugins ok" in run.stdout, run.stdout + run.stderr
