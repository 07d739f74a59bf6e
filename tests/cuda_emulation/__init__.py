"""The CUDA kernels of trt_plugins/ built for the CPU emulation (include/cuda_emulation.h, runtime.cpp).

The kernel sources compile unmodified as C++ except for two constructs C++ cannot spell, which
`rewrite` replaces in a copy (keeping every line where it was, so errors point at the real source):

- `kernel<T, V><<<grid, block, shm, stream>>>(args)` becomes
  `::cuda_emu::launch("kernel<T, V>", kernel<T, V>, ::cuda_emu::LaunchConfig(grid, block, shm, stream), args)`;
- `__shared__ [__align__(N)] T name[dims];` becomes a reference to the block's copy,
  `static char cuda_emu_tag_name; auto& name = *::cuda_emu::sharedVariable<T[dims], N>(&cuda_emu_tag_name);`
  (and `extern __shared__ T name[];` a pointer to the launch's dynamic shared memory).

Each rewrite checks that it replaced every occurrence, so a construct it does not understand fails
the build instead of compiling into something else. `build_library` copies the kernel tree,
optionally applies textual patches (the broken variants of test_emulated_kernel_mutants.py), rewrites,
and links the kernels with the runtime into one shared library that also exports the CUDA runtime
calls the tests make (cudaMalloc, cudaMemcpy, ...), so tests drive it exactly like libcudart.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PLUGINS = ROOT / "trt_plugins"
INCLUDE = HERE / "include"
RUNTIME = HERE / "runtime.cpp"

# Kernels are compiled -O1: -O2 took 45% more compiler time for all of them and ran a sample of the
# tests 8% faster (measured on the 2-core CI machine). No strict aliasing: CUDA code type-puns
# through vector loads (reinterpret_cast<uint4 const*>) as a matter of course.
CXX_FLAGS = ["-std=c++17", "-fPIC", "-fno-strict-aliasing", "-Wall", "-Wno-unknown-pragmas"]
KERNEL_OPT = "-O1"


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++")


def _arch_flags() -> list[str]:
    """FMA instructions where the CPU has them: fmaf becomes one instruction (not a libm call), and
    a * b + c contracts into an fma as nvcc does."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    return ["-mfma"] if re.search(r"^flags\s*:.*\bfma\b", flags, re.M) else []


# -- the rewrites -----------------------------------------------------------------------------------

def _matching(text: str, open_at: int, opening: str, closing: str) -> int:
    """Index of the bracket closing the one at `open_at`."""
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == opening:
            depth += 1
        elif text[i] == closing:
            depth -= 1
            if depth == 0:
                return i
    raise ValueError(f"unbalanced {opening}{closing} from offset {open_at}")


def _kernel_start(text: str, end: int) -> int:
    """Start of the kernel expression ending at `end`: a (qualified) name with template arguments."""
    i = end
    if text[i - 1] == ">":
        depth = 0
        while True:
            i -= 1
            depth += {">": 1, "<": -1}.get(text[i], 0)
            if depth == 0:
                break
    while i > 0 and (text[i - 1].isalnum() or text[i - 1] in "_:"):
        i -= 1
    if i == end or not (text[i].isalpha() or text[i] in "_:"):
        raise ValueError(f"no kernel name before <<< at offset {end}")
    return i


def rewrite_launches(text: str) -> tuple[str, int]:
    out, position, count = [], 0, 0
    while (start := text.find("<<<", position)) >= 0:
        end = text.find(">>>", start)
        name_start = _kernel_start(text, start)
        open_args = end + 3
        while text[open_args].isspace():
            open_args += 1
        if text[open_args] != "(":
            raise ValueError(f"no argument list after >>> at offset {end}")
        close_args = _matching(text, open_args, "(", ")")
        name, config, args = text[name_start:start], text[start + 3:end], text[open_args + 1:close_args]
        label = " ".join(name.split())
        rest = f", {args}" if args.strip() else ""
        out += [text[position:name_start],
                f'::cuda_emu::launch("{label}", {name}, ::cuda_emu::LaunchConfig({config}){rest})']
        position, count = close_args + 1, count + 1
    return "".join(out) + text[position:], count


SHARED = re.compile(r"(?P<extern>\bextern\s+)?\b__shared__\s+(?:__align__\((?P<align>\d+)\)\s+)?"
                    r"(?P<type>[A-Za-z_][\w:<>, ]*?)\s+(?P<name>[A-Za-z_]\w*)\s*(?P<dims>(?:\[[^\]\n]*\]\s*)*);")


def _shared_declaration(match: re.Match) -> str:
    kind, name, dims = match["type"].strip(), match["name"], match["dims"].strip()
    if match["extern"]:
        if dims.replace(" ", "") != "[]":
            raise ValueError(f"extern __shared__ {name} must be an unsized array")
        return f"{kind}* {name} = static_cast<{kind}*>(::cuda_emu::dynamicShared());"
    return (f"static char cuda_emu_tag_{name}; auto& {name} = "
            f"*::cuda_emu::sharedVariable<{kind}{dims}, {match['align'] or 0}>(&cuda_emu_tag_{name});")


def rewrite_shared(text: str) -> tuple[str, int]:
    wanted = len(re.findall(r"\b__shared__\b", text))
    rewritten, count = SHARED.subn(_shared_declaration, text)
    if count != wanted:
        left = [line for line in rewritten.splitlines() if re.search(r"\b__shared__\b", line)]
        raise ValueError(f"{wanted - count} __shared__ declaration(s) not understood: {left}")
    return rewritten, count


def rewrite(text: str) -> str:
    text, _ = rewrite_launches(text)
    text, _ = rewrite_shared(text)
    return text


# -- building -----------------------------------------------------------------------------------------

def kernel_sources() -> list[Path]:
    """Every kernel, relative to trt_plugins/ (as test_kernels_compile.py finds them)."""
    return sorted(p.relative_to(PLUGINS) for p in PLUGINS.glob("*/*_kernel.cu"))


def copy_tree(out: Path, patches: dict[str, list[tuple[str, str]]] | None = None) -> Path:
    """trt_plugins/'s kernel sources (.cu, .cuh, .h) copied under `out`, patched and rewritten.

    patches: {path relative to trt_plugins: [(old, new), ...]}; each `old` must occur exactly once
    in the file, so that a change of the real source cannot make a patch silently vanish."""
    patches = dict(patches or {})
    tree = out / "trt_plugins"
    for source in [*PLUGINS.glob("*/*.cu"), *PLUGINS.glob("*/*.cuh"), *PLUGINS.glob("*/*.h")]:
        relative = str(source.relative_to(PLUGINS))
        text = source.read_text()
        for old, new in patches.pop(relative, []):
            found = text.count(old)
            if found != 1:
                raise ValueError(f"patch for {relative} matches {found} times (wanted once): {old!r}")
            text = text.replace(old, new)
        if source.suffix in (".cu", ".cuh"):
            text = rewrite(text)
        target = tree / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    if patches:
        raise ValueError(f"patches for files that are not kernel sources: {sorted(patches)}")
    return tree


def _run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}\n{result.stdout}{result.stderr}")


def compile_runtime(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    obj = out / "cuda_emulation_runtime.o"
    _run([compiler(), *CXX_FLAGS, "-O2", "-Wextra", "-Werror", *_arch_flags(), f"-I{INCLUDE}", "-c", str(RUNTIME),
          "-o", str(obj)])
    return obj


def compile_kernel(source: Path, obj: Path, optimisation: str = KERNEL_OPT) -> Path:
    _run([compiler(), *CXX_FLAGS, optimisation, *_arch_flags(), f"-I{INCLUDE}", "-x", "c++", "-c", str(source),
          "-o", str(obj)])
    return obj


def link(objects: list[Path], library: Path) -> Path:
    # -Bsymbolic: the kernels call this library's cudaGetLastError & co. even where the real
    # libcudart is loaded into the same process (the GPU tests load it RTLD_GLOBAL).
    _run([compiler(), "-shared", "-Wl,-Bsymbolic", "-o", str(library), *map(str, objects)])
    return library


def build(out: Path, sources: list[Path], runtime: Path | None = None, name: str = "kernels",
          objects: list[Path] = (), optimisation: str = KERNEL_OPT) -> Path:
    """lib<name>.so in `out`: the CUDA sources (already rewritten) compiled in parallel, one process
    per source, linked with `objects` (built before) and the emulation runtime (an object from
    compile_runtime, or built here). A source's object is out/<its stem>.o."""
    if compiler() is None:
        raise RuntimeError("no C++ compiler (g++) found")
    out.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        pending = [pool.submit(compile_kernel, source, out / f"{source.stem}.o", optimisation) for source in sources]
        runtime_job = pool.submit(compile_runtime, out) if runtime is None else None
        compiled = [job.result() for job in pending]
        runtime = runtime_job.result() if runtime_job else runtime
    return link([*compiled, *objects, runtime], out / f"lib{name}.so")


def build_library(out: Path, sources: list[str] | None = None, patches: dict[str, list[tuple[str, str]]] | None = None,
                  **options) -> Path:
    """The kernels of trt_plugins/ (default: all; else paths relative to trt_plugins/), patched as
    asked (copy_tree), built into a library in `out` (options: those of `build`)."""
    tree = copy_tree(out / "src", patches)
    return build(out, [tree / s for s in (sources if sources is not None else kernel_sources())], **options)


def build_file(out: Path, source: Path, **options) -> Path:
    """One stand-alone .cu file (rewritten into `out`) built into a library (options: those of `build`)."""
    out.mkdir(parents=True, exist_ok=True)
    copy = out / source.name
    copy.write_text(rewrite(source.read_text()))
    return build(out, [copy], **options)
