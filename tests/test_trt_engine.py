"""TensorRT plans and the TensorRT backend, checked without TensorRT or a GPU.

The pure parts run as they are: optimization profiles and the binding plan derived from the graphs'
inputs (trt_io.json, written from the ONNX graphs without weights), the chunk schedule, builder flags,
the cache key and stale-plan detection, atomic writes, the KV slab's layout. The one-line messages
run as the user meets them (`qwen3vl build`). The builder and the backend run against a stand-in
`tensorrt` module and a stand-in CUDA runtime (device memory is host memory): the builder's calls,
their order, profile shapes and flags are recorded, and the backend's bindings (past and present at
one address, row views at row offsets), chunked prefill and CUDA-graph decode drive a toy decoder
that writes each token id into the KV buffers where the attention plugin would.
"""

from __future__ import annotations

import ctypes
import enum
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runtime import trt_plans
from runtime.backend import DecoderChunk, VisionBatch
from runtime.cuda_runtime import GpuInfo
from runtime.engine_manifest import load_manifest
from runtime.graph_io import DECODER_INPUTS, past_names
from runtime.trt_backend import (KVLayout, TrtBackend, capacity_that_fits, kv_bytes_per_token, piece_of,
                                 split_vision_batch)
from runtime.trt_plans import (BuildFlags, PlanSettings, StalePlan, TrtPlanError, TrtUnavailable, atomic_write,
                               binding_plan, build_flags, check_compatibility, chunk_schedule, describe_difference,
                               kv_copy_layers, plan_components, plan_key, profile_ranges, profile_shapes,
                               read_plan, read_trt_io, write_plan)
from runtime.vision_positions import vision_inputs

MX250 = GpuInfo("NVIDIA GeForce MX250", (6, 1), 3, 2 << 30)
RTX = GpuInfo("NVIDIA GeForce RTX 3060 Laptop GPU", (8, 6), 30, 6 << 30)
ALL_FLAGS = {"FP16", "DIRECT_IO", "EXPLICIT_BATCH", "STRONGLY_TYPED"}


@pytest.fixture(scope="module")
def engine(tiny_engine):
    return tiny_engine("gqa2-tied", backend="trt")


@pytest.fixture(scope="module")
def ios(engine):
    return read_trt_io(engine, load_manifest(engine))


# -- profiles and the binding plan ------------------------------------------------------------------

def test_trt_io_lists_the_graph_inputs_weights_and_plugins(engine, ios):
    manifest = load_manifest(engine)
    assert manifest.files["trt_io"] == "trt_io.json" and "trt_io.json" in manifest.hashes
    decoder = ios["decoder"]
    assert decoder.file == "decoder.trt.onnx" and decoder.data_files == ("decoder.onnx.data",)
    assert set(decoder.plugins) >= {"Qwen3VLAttention", "Qwen3VLRMSNorm"}
    names = [t.name for t in decoder.inputs]
    assert names == list(DECODER_INPUTS) + past_names(manifest.model.num_hidden_layers)
    assert ios["vision"].plugins == ("Qwen3VLVisionAttention",)


def test_decoder_profiles_cover_batch_chunk_and_capacity(engine, ios):
    m = load_manifest(engine).model
    settings = PlanSettings(max_batch=4, prefill_batch=2, prefill_chunk=256, opt_capacity=2048)
    ranges = profile_ranges("decoder", settings, max_context=8192)
    assert list(ranges) == ["prefill", "decode"]
    prefill = profile_shapes(ios["decoder"].inputs, ranges["prefill"])
    decode = profile_shapes(ios["decoder"].inputs, ranges["decode"])
    assert prefill["input_ids"] == ((1, 1), (1, 256), (2, 256))  # prefill rows x chunk: the activations
    assert decode["input_ids"] == ((1, 1), (1, 1), (4, 1))  # decode rows x 1 token
    assert prefill["deepstack_embeds"] == ((m.num_deepstack, 1, 1, m.hidden_size),
                                           (m.num_deepstack, 1, 256, m.hidden_size),
                                           (m.num_deepstack, 2, 256, m.hidden_size))
    assert prefill["position_ids"][2] == (3, 2, 256) and prefill["total_sequence_length"] == ((1,), (1,), (1,))
    kv = (m.num_key_value_heads, m.head_dim)
    for shapes, rows in ((prefill, 2), (decode, 4)):
        assert shapes["past_key.0"] == ((1, kv[0], 1, kv[1]), (1, kv[0], 2048, kv[1]), (rows, kv[0], 8192, kv[1]))
        assert shapes["seqlens_k"] == ((1,), (1,), (rows,))
    assert profile_ranges("decoder", PlanSettings(), 8192)["prefill"]["batch"] == (1, 1, 1)  # the default
    # A small context clamps the optimum; a larger max capacity replaces max_context.
    small = profile_ranges("decoder", settings, max_context=512)["prefill"]["capacity"]
    assert small == (1, 512, 512)
    assert profile_ranges("decoder", PlanSettings(max_capacity=1024), 8192)["decode"]["capacity"] == (1, 1024, 1024)


def test_vision_profile_and_unknown_dims(ios):
    shapes = profile_shapes(ios["vision"].inputs, profile_ranges("vision", PlanSettings(), 8192)["vision"])
    assert shapes["pixel_values"][2][0] == 4096 and shapes["frame_patch_index"] == ((1, 1), (1, 1024), (8, 4096))
    with pytest.raises(TrtPlanError, match="dimension 'sequence'"):
        profile_shapes(ios["decoder"].inputs, {"batch": (1, 1, 1)})


def test_binding_plan_shares_past_and_present(ios):
    plan = binding_plan(ios["decoder"], profile_ranges("decoder", PlanSettings(max_batch=2), 4096))
    kinds = {b.name: b for b in plan}
    assert [b.name for b in plan if b.kind == "input"] == list(DECODER_INPUTS)
    assert kinds["input_ids"].max_shape == (2, 256) and kinds["input_ids"].dtype == "int64"
    caches = [b for b in plan if b.kind == "cache"]
    assert len(caches) == 2 * 2 * 4  # past and present of keys and values of 4 layers
    for b in caches:
        if b.name.startswith("present_"):
            assert b.shares_with == "past_" + b.name[len("present_"):]
            assert b.max_shape == kinds[b.shares_with].max_shape == (2, 2, 4096, 16)
    assert [b.name for b in plan if b.kind == "output"] == ["logits"]
    assert kinds["logits"].max_shape == (2, -1)  # the vocabulary comes from the engine


# -- chunk schedule -----------------------------------------------------------------------------------

def _pieces(past, lengths, tokens, batch):
    return [(p.row_start, p.row_stop, p.col_start, p.col_stop) for p in chunk_schedule(past, lengths, tokens, batch)]


def test_chunk_schedule():
    # Fits: one call.
    assert _pieces([0, 0], [5, 3], 8, 4) == [(0, 2, 0, 5)]
    # A first chunk longer than the plan: the first window batched, the rest row by row.
    assert _pieces([0, 0], [10, 3], 4, 4) == [(0, 2, 0, 4), (0, 1, 4, 8), (0, 1, 8, 10)]
    # Rows that fill every window stay batched.
    assert _pieces([0, 0], [8, 8], 4, 4) == [(0, 2, 0, 4), (0, 2, 4, 8)]
    # More rows than the plan takes: groups of consecutive rows.
    assert _pieces([0, 0, 0], [2, 2, 1], 4, 2) == [(0, 2, 0, 2), (2, 3, 0, 1)]
    # One-token steps after a past: batched. Several tokens after a past, unequal: row by row.
    assert _pieces([5, 9], [1, 1], 4, 4) == [(0, 2, 0, 1)]
    assert _pieces([5, 9], [3, 2], 4, 4) == [(0, 1, 0, 3), (1, 2, 0, 2)]
    assert _pieces([5, 9], [3, 3], 4, 4) == [(0, 2, 0, 3)]
    # A row view continuing a long prompt.
    assert _pieces([4], [9], 4, 1) == [(0, 1, 0, 4), (0, 1, 4, 8), (0, 1, 8, 9)]
    # Every row's tokens, exactly once and in order.
    rng = np.random.default_rng(0)
    for _ in range(50):
        b = int(rng.integers(1, 6))
        lengths, past = rng.integers(1, 20, b), rng.integers(0, 3, b) * int(rng.integers(0, 2))
        seen = {r: [] for r in range(b)}
        for r0, r1, c0, c1 in _pieces(past, lengths, int(rng.integers(1, 8)), int(rng.integers(1, 4))):
            for r in range(r0, r1):
                seen[r] += list(range(c0, min(c1, lengths[r])))
        assert all(seen[r] == list(range(lengths[r])) for r in range(b))


def test_piece_of_moves_the_past_on():
    chunk = DecoderChunk(np.arange(10).reshape(2, 5), np.zeros((3, 2, 5), np.int64), np.array([0, 0]),
                         np.array([5, 3]), np.ones((2, 5, 4), np.float32), np.ones((3, 2, 5, 4), np.float32))
    piece = piece_of(chunk, slice(0, 2), slice(2, 4))
    assert piece.input_ids.tolist() == [[2, 3], [7, 8]]
    assert piece.past_lengths.tolist() == [2, 2] and piece.lengths.tolist() == [2, 1]
    assert piece.seqlens_k.tolist() == [3, 2] and piece.visual_embeds.shape == (2, 2, 4)
    tail = piece_of(chunk, slice(0, 1), slice(4, 5))
    assert tail.input_ids.tolist() == [[4]] and tail.past_lengths.tolist() == [4]


# -- flags, compatibility, cache key ----------------------------------------------------------------------

def test_build_flags():
    fp32 = build_flags("8.6.1", MX250, PlanSettings(), "fp32", ALL_FLAGS)
    assert fp32 == BuildFlags(fp16=False, strongly_typed=False, direct_io=True, workspace=256 << 20)
    assert not build_flags("8.6.1", MX250, PlanSettings(), "fp16", ALL_FLAGS).fp16  # SM 6.1: FP16 math is slow
    assert build_flags("8.6.1", MX250, PlanSettings(fp16=True), "fp32", ALL_FLAGS).fp16  # unless asked
    assert build_flags("8.6.1", RTX, PlanSettings(), "fp16", ALL_FLAGS).fp16
    assert not build_flags("8.6.1", RTX, PlanSettings(fp16=False), "fp16", ALL_FLAGS).fp16
    ten = build_flags("10.13.0", RTX, PlanSettings(), "fp16", ALL_FLAGS)
    assert ten.strongly_typed and not ten.fp16
    with pytest.raises(TrtPlanError, match="strongly typed"):
        build_flags("10.13.0", RTX, PlanSettings(fp16=True), "fp32", ALL_FLAGS)
    assert not build_flags("11.1.0", RTX, PlanSettings(), "fp32", {"STRONGLY_TYPED"}).direct_io


def test_compatibility_messages():
    check_compatibility("8.6.1", MX250)
    check_compatibility("10.13.0", RTX)
    with pytest.raises(TrtUnavailable, match=r"^SM 6.1 \(NVIDIA GeForce MX250\) needs TensorRT 8.6, found 10.13.0$"):
        check_compatibility("10.13.0", MX250)
    with pytest.raises(TrtUnavailable, match="too old"):
        check_compatibility("8.5.3", MX250)


def _components(manifest, io, **change):
    args = dict(trt_version="8.6.1", gpu=MX250, plugin_hash="p" * 64,
                profiles=profile_ranges("decoder", PlanSettings(), manifest.max_context),
                flags=build_flags("8.6.1", MX250, PlanSettings(), "fp32", ALL_FLAGS))
    args.update(change)
    return plan_components("decoder", args["trt_version"], args["gpu"], args["plugin_hash"], manifest, io,
                           args["profiles"], args["flags"])


def test_cache_key_covers_every_component(engine, ios):
    manifest, io = load_manifest(engine), ios["decoder"]
    base = _components(manifest, io)
    assert plan_key(base) == plan_key(_components(load_manifest(engine), io))  # nothing changed: same key
    changed = {
        "tensorrt": _components(manifest, io, trt_version="8.6.2"),
        "gpu name": _components(manifest, io, gpu=GpuInfo("NVIDIA GeForce MX350", (6, 1), 3, 2 << 30)),
        "compute capability": _components(manifest, io, gpu=GpuInfo(MX250.name, (7, 5), 3, 2 << 30)),
        "sm count": _components(manifest, io, gpu=GpuInfo(MX250.name, (6, 1), 4, 2 << 30)),
        "plugins": _components(manifest, io, plugin_hash="q" * 64),
        "profiles": _components(manifest, io, profiles=profile_ranges("decoder", PlanSettings(max_batch=2), 8192)),
        "flags": _components(manifest, io, flags=build_flags("8.6.1", MX250, PlanSettings(fp16=True), "fp32",
                                                             ALL_FLAGS)),
    }
    for what, file in (("graph", io.file), ("weights", io.data_files[0])):
        other = load_manifest(engine)
        other.hashes = {**other.hashes, file: "0" * 64}
        changed[what] = _components(other, io)
    keys = {what: plan_key(c) for what, c in changed.items()}
    assert plan_key(base) not in keys.values() and len(set(keys.values())) == len(keys)
    assert describe_difference(base, changed["tensorrt"]) == "built with TensorRT 8.6.1, this is 8.6.2"
    assert "built for NVIDIA GeForce MX250 (SM 6.1, 3 SMs), this is NVIDIA GeForce MX250 (SM 7.5" in \
        describe_difference(base, changed["compute capability"])
    assert describe_difference(base, changed["weights"]) == "weights changed"
    assert describe_difference(base, changed["plugins"]) == "plugin library changed"


def test_stale_foreign_or_damaged_plans_are_never_returned(tmp_path, engine, ios):
    manifest, io = load_manifest(engine), ios["decoder"]
    components = _components(manifest, io)
    assert read_plan(tmp_path, "decoder", components) is None
    write_plan(tmp_path, "decoder", b"PLAN" * 100, components)
    assert read_plan(tmp_path, "decoder", components) == b"PLAN" * 100
    with pytest.raises(StalePlan, match="built with TensorRT 8.6.1, this is 10.13.0"):
        read_plan(tmp_path, "decoder", _components(manifest, io, trt_version="10.13.0"))
    plan = tmp_path / "trt" / "decoder.plan"
    plan.write_bytes(b"PLAN" * 99)  # truncated
    with pytest.raises(StalePlan, match="incomplete or changed"):
        read_plan(tmp_path, "decoder", components)
    plan.write_bytes(b"PLAX" * 100)  # same size, other bytes
    with pytest.raises(StalePlan, match="incomplete or changed"):
        read_plan(tmp_path, "decoder", components)
    (tmp_path / "trt" / "decoder.plan.json").write_text("{not json")
    with pytest.raises(StalePlan, match="unreadable"):
        read_plan(tmp_path, "decoder", components)


def test_atomic_write_is_whole_or_nothing(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "file.bin"
    atomic_write(target, b"old")
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new"

    def fail(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        atomic_write(target, b"half")
    assert target.read_bytes() == b"new" and sorted(p.name for p in target.parent.iterdir()) == ["file.bin"]


# -- KV slab, capacity, vision split, copy layers ---------------------------------------------------------

def test_kv_layout_rows_are_offsets():
    layout = KVLayout(buffers=8, batch=3, kv_heads=2, capacity=10, head_dim=16, itemsize=2)
    assert layout.row_bytes == 2 * 10 * 16 * 2 and layout.buffer_bytes == 3 * layout.row_bytes
    assert layout.nbytes == 8 * layout.buffer_bytes
    base = 1 << 20
    assert layout.addresses(base, 2) == [base + i * layout.buffer_bytes + 2 * layout.row_bytes for i in range(8)]


def test_capacity_from_free_memory(engine):
    m = load_manifest(engine).model
    per_token = kv_bytes_per_token(m, 2)
    assert per_token == 2 * m.num_hidden_layers * m.num_key_value_heads * m.head_dim * 2
    # Qwen3-VL-2B in FP16: 112 KiB per token; 300 MiB free less 64 MiB kept back -> 2157 tokens.
    assert 2 * 28 * 8 * 128 * 2 == 112 * 1024
    assert capacity_that_fits(300 << 20, 1, 112 * 1024) == ((300 - 64) << 20) // (112 * 1024)
    assert capacity_that_fits(300 << 20, 2, 112 * 1024) == ((300 - 64) << 20) // (2 * 112 * 1024)
    assert capacity_that_fits(10 << 20, 1, 112 * 1024) == 0


def _vision_batch(grids, head_dim=16):
    grids = np.asarray(grids, dtype=np.int64)
    n = int(grids.prod(axis=1).sum())
    pixels = np.arange(n, dtype=np.float32)[:, None] * np.ones((1, 6), np.float32)
    return VisionBatch(pixels, grids, vision_inputs(grids, 2304, 2, head_dim))


def test_split_vision_batch_matches_images_alone():
    grids = [[1, 4, 4], [1, 8, 4], [1, 4, 6]]
    batch = _vision_batch(grids)
    groups = split_vision_batch(batch, max_patches=48, max_frames=8)
    assert [g.grid_thw.tolist() for g in groups] == [[[1, 4, 4], [1, 8, 4]], [[1, 4, 6]]]
    for group, first in zip(groups, (0, 48)):
        alone = _vision_batch(group.grid_thw)
        np.testing.assert_array_equal(group.pixel_values[:, 0], np.arange(first, first + len(group.pixel_values)))
        for field in ("pos_indices", "pos_weights", "rotary_cos", "rotary_sin", "frame_patch_index",
                      "frame_patch_mask", "patch_frame_slot"):
            np.testing.assert_array_equal(getattr(group.host, field), getattr(alone.host, field))
    assert split_vision_batch(batch, 100, 8) == [batch]
    assert len(split_vision_batch(batch, 100, 1)) == 3
    with pytest.raises(Exception, match="makes 32 patches"):
        split_vision_batch(batch, 20, 8)


def test_kv_copy_layers():
    info = json.dumps({"Layers": [
        {"Name": "Reformatting CopyNode for Input Tensor 7 to layer0", "LayerType": "Reformat",
         "Inputs": [{"Name": "past_key.0"}], "Outputs": [{"Name": "past_key.0 copy"}]},
        {"Name": "/layers.0/attn", "LayerType": "PluginV2", "Inputs": [{"Name": "past_key.0"}]},
        {"Name": "Reformatting CopyNode for x", "LayerType": "Reformat", "Inputs": [{"Name": "hidden"}]},
    ]})
    assert kv_copy_layers(info, {"past_key.0", "present_key.0"}) == [
        "Reformatting CopyNode for Input Tensor 7 to layer0"]
    assert kv_copy_layers("not json", {"past_key.0"}) == []


def test_ctypes_calls_against_the_cpu_emulation_of_cuda(tmp_path):
    """runtime/cuda_runtime.py's calls and the plugin library's architecture probe, made through ctypes
    exactly as on a GPU, against the CPU emulation of CUDA (tests/cuda_emulation: the unmodified
    RMSNorm kernel behind its C API, and the CUDA runtime calls it implements)."""
    emulation = pytest.importorskip("cuda_emulation", reason="needs the CPU emulation of CUDA (tests/cuda_emulation)")
    if emulation.compiler() is None:
        pytest.skip("needs a C++ compiler for the CPU emulation of CUDA")
    from runtime.cuda_runtime import CudaError, CudaRuntime

    path = emulation.build_library(tmp_path, sources=["rmsnorm/rmsnorm_kernel.cu"])
    library = ctypes.CDLL(str(path))
    cuda = CudaRuntime(library, str(path))
    assert cuda.device_count() >= 1 and cuda.error_name(0) == "cudaSuccess"
    with pytest.raises(CudaError, match=r"^CUDA cudaMemcpyAsync \(to device\) failed: cudaError"):
        cuda.copy_to_device(0, 0, 16, 0)  # a null device pointer
    n = 24
    x, gamma = np.linspace(-2, 3, n, dtype=np.float32), np.linspace(0.5, 1.5, n, dtype=np.float32)
    buffers = [cuda.malloc(n * 4) for _ in range(3)]
    cuda.copy_to_device(buffers[0], x.ctypes.data, n * 4, 0)
    cuda.copy_to_device(buffers[1], gamma.ctypes.data, n * 4, 0)
    cuda.memset(buffers[2], 0xFF, n * 4, 0)
    trt_plans._probe_architecture(library, path, cuda, MX250)  # the probe's own launch: accepted
    kernel = library.qwen3vl_rmsnorm  # the probe's argument convention, on real data
    code = kernel(ctypes.c_void_p(buffers[0]), None, ctypes.c_void_p(buffers[1]), ctypes.c_void_p(buffers[2]), None,
                  ctypes.c_int64(1), ctypes.c_int32(n), ctypes.c_float(1e-6), 0, None)
    cuda.synchronize(0)
    y = np.empty(n, np.float32)
    cuda.copy_to_host(y.ctypes.data, buffers[2], n * 4, 0)
    assert code == 0
    np.testing.assert_allclose(y, x / np.sqrt(np.mean(x * x) + 1e-6) * gamma, rtol=1e-5)
    for ptr in buffers:
        cuda.free(ptr)


# -- the one-line messages ------------------------------------------------------------------------------

@pytest.fixture
def no_tensorrt(tmp_path, monkeypatch):
    """`import tensorrt` fails, here and in subprocesses (a stand-in package that raises ImportError)."""
    package = tmp_path / "no_tensorrt" / "tensorrt"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('no TensorRT in this test')\n")
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    path = os.pathsep.join([str(package.parent), str(Path(__file__).resolve().parents[1]),
                            os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path}


def _qwen3vl(args, env):
    return subprocess.run([sys.executable, "-m", "commands", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env=env, cwd=Path(__file__).resolve().parents[1])


def test_open_tensorrt_says_what_is_missing(no_tensorrt, tmp_path, monkeypatch):
    with pytest.raises(TrtUnavailable, match=r"^TensorRT is not installed \(.*8\.6\)$"):
        trt_plans.open_tensorrt()
    monkeypatch.setenv(trt_plans.PLUGIN_ENV, str(tmp_path / "missing.so"))
    with pytest.raises(TrtUnavailable, match=r"^no plugin library \(.*missing.so\): run `make plugins`"):
        trt_plans.find_plugin_library()


def test_build_trt_without_tensorrt_writes_graphs_and_says_plans_come_later(tiny_checkpoints, tmp_path, no_tensorrt):
    out = tmp_path / "engine"
    result = _qwen3vl(["build", "--checkpoint", tiny_checkpoints["gqa2-tied"], "--out", out, "--backend", "trt"],
                      no_tensorrt)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "compiled on the target machine" in line]
    assert len(lines) == 1 and "TensorRT is not installed" in lines[0] and "--compile-only" in lines[0]
    assert (out / "decoder.trt.onnx").is_file() and (out / "trt_io.json").is_file()
    assert not (out / "trt").exists()


def test_compile_only_without_tensorrt_is_one_error_line(engine, no_tensorrt):
    result = _qwen3vl(["build", "--engine", engine, "--compile-only"], no_tensorrt)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "error: cannot compile TensorRT plans here: TensorRT is not installed (pip install '.[tensorrt]'; "
        "Pascal GPUs need TensorRT 8.6)"]


def test_build_arguments(engine, no_tensorrt, tiny_checkpoints):
    result = _qwen3vl(["build", "--out", "somewhere"], no_tensorrt)
    assert result.returncode == 1 and result.stderr.startswith("error: build needs --checkpoint and --out")
    result = _qwen3vl(["build", "--compile-only", "--engine", engine, "--checkpoint",
                       tiny_checkpoints["gqa2-tied"]], no_tensorrt)
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1 and "--compile-only" in result.stderr


# -- stand-ins for TensorRT and the CUDA runtime -------------------------------------------------------

class FakeCuda:
    """The CudaRuntime interface over host memory; a stream capture records operations for replay."""

    def __init__(self, gpu: GpuInfo = MX250, free: int = 1 << 30):
        self.gpu, self.free_bytes = gpu, free
        self.blocks, self.capturing, self.graphs, self.launches = {}, None, {}, 0
        self.ops = []

    def _alloc(self, nbytes):
        block = np.zeros(int(nbytes) + 256, dtype=np.uint8)
        ptr = (block.ctypes.data + 255) // 256 * 256
        self.blocks[ptr] = block
        return ptr

    malloc = host_alloc = _alloc

    def free(self, ptr):
        self.blocks.pop(ptr, None)

    host_free = free

    def run(self, op):
        if self.capturing is not None:
            self.capturing.append(op)
        else:
            op()

    def copy_to_device(self, dst, src, nbytes, stream):
        self.ops.append(("h2d", dst, nbytes))
        self.run(lambda: ctypes.memmove(dst, src, nbytes))

    def copy_to_host(self, dst, src, nbytes, stream):
        self.ops.append(("d2h", src, nbytes))
        self.run(lambda: ctypes.memmove(dst, src, nbytes))

    def memset(self, ptr, value, nbytes, stream):
        self.run(lambda: ctypes.memset(ptr, value, nbytes))

    def mem_get_info(self):
        return self.free_bytes, self.gpu.total_memory

    def device_count(self):
        return 1

    def device_info(self, device=0):
        return self.gpu

    def clear_error(self):
        pass

    def error_name(self, code):
        return {0: "cudaSuccess", 209: "cudaErrorNoKernelImageForDevice"}.get(code, "cudaErrorUnknown")

    def stream_create(self):
        return 7

    def stream_destroy(self, stream):
        pass

    def synchronize(self, stream):
        assert self.capturing is None, "synchronize inside a capture"

    def begin_capture(self, stream):
        self.capturing = []

    def end_capture(self, stream):
        ops, self.capturing = self.capturing, None
        self.graphs[id(ops)] = ops
        return id(ops)

    def graph_instantiate(self, graph):
        return graph

    def graph_launch(self, graph, stream):
        self.launches += 1
        for op in self.graphs[graph]:
            op()

    def graph_destroy(self, graph):
        self.graphs.pop(graph, None)

    graph_discard = graph_destroy


def _array(ptr, shape, dtype):
    dtype = np.dtype(dtype)
    count = int(np.prod(shape)) * dtype.itemsize
    return np.frombuffer((ctypes.c_byte * count).from_address(ptr), dtype=np.uint8).view(dtype).reshape(shape)


class FakeTensorRT:
    """The slice of the `tensorrt` module that runtime/trt_plans.py and runtime/trt_backend.py use.

    `version` picks the API generation: 8.6 (explicit-batch flag, int64 inputs narrowed to int32,
    contexts without device memory + `device_memory`) or 10+ (strongly typed, int64 kept, user-managed
    allocation strategy + `set_device_memory`). Built plans are JSON of the parsed network; a decoder
    plan's execution writes every token id into the KV buffers where the attention plugin would."""

    def __init__(self, version: str, cuda: FakeCuda, vocab: int, kv_copy: bool = False):
        self.__version__, self.cuda, self.vocab, self.kv_copy = version, cuda, vocab, kv_copy
        self.parse_error = self.build_error = None  # set to make parsing / building fail with that message
        self.major = int(version.split(".")[0])
        self.calls, self.executions, self.creators = [], [], set()
        fake = self

        self.DataType = enum.IntEnum("DataType", "FLOAT HALF INT8 INT32 BOOL UINT8 INT64")
        self.TensorIOMode = enum.IntEnum("TensorIOMode", "NONE INPUT OUTPUT")
        self.TensorFormat = enum.IntEnum("TensorFormat", {"LINEAR": 0, "CHW2": 1})
        self.MemoryPoolType = enum.IntEnum("MemoryPoolType", "WORKSPACE")
        self.ProfilingVerbosity = enum.IntEnum("ProfilingVerbosity", "LAYER_NAMES_ONLY DETAILED")
        self.LayerInformationFormat = enum.IntEnum("LayerInformationFormat", "ONELINE JSON")
        flags = ["FP16", "DIRECT_IO"] if self.major < 11 else ["DIRECT_IO"]
        self.BuilderFlag = enum.IntEnum("BuilderFlag", flags)
        network_flags = {"EXPLICIT_BATCH": 0} if self.major < 10 else {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1}
        self.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", network_flags)
        if self.major >= 10:
            self.ExecutionContextAllocationStrategy = enum.IntEnum("ExecutionContextAllocationStrategy",
                                                                   "STATIC ON_PROFILE_CHANGE USER_MANAGED")

        class ILogger:
            Severity = enum.IntEnum("Severity", {"INTERNAL_ERROR": 0, "ERROR": 1, "WARNING": 2, "INFO": 3})

            def __init__(self):
                pass

        class Logger(ILogger):
            WARNING = 2

            def __init__(self, severity=2):
                pass

        self.ILogger, self.Logger = ILogger, Logger

        class Tensor:
            def __init__(self, name, dtype, shape, onnx_dims):
                self.name, self.dtype, self.shape, self.onnx_dims = name, dtype, shape, onnx_dims
                self._formats = None

            @property
            def allowed_formats(self):
                return self._formats

            @allowed_formats.setter
            def allowed_formats(self, value):
                fake.calls.append(("allowed_formats", self.name, value))
                self._formats = value

        class Network:
            def __init__(self, flags):
                self.flags, self.inputs, self.outputs = flags, [], []

            num_inputs = property(lambda self: len(self.inputs))
            num_outputs = property(lambda self: len(self.outputs))

            def get_input(self, i):
                return self.inputs[i]

            def get_output(self, i):
                return self.outputs[i]

        class OnnxParser:
            def __init__(self, network, logger):
                fake.calls.append(("OnnxParser",))
                self.network, self.num_errors = network, 0

            def get_error(self, index):
                class Error:
                    def desc(self):
                        return fake.parse_error + "\nIn node 17 (importFallbackPluginImporter)"

                return Error()

            def parse_from_file(self, path):
                import onnx

                fake.calls.append(("parse_from_file", Path(path).name))
                assert fake.creators, "parsed before the plugin library was loaded"
                if fake.parse_error:
                    self.num_errors = 1
                    return False
                model = onnx.load(path, load_external_data=False)
                initializers = {t.name for t in model.graph.initializer}
                graph, network = model.graph, self.network
                for values, into in ((graph.input, network.inputs), (graph.output, network.outputs)):
                    for v in values:
                        if v.name in initializers:
                            continue
                        dims = tuple(d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim)
                        types = {1: "FLOAT", 10: "HALF", 6: "INT32", 7: "INT64", 9: "BOOL"}
                        dtype = types[v.type.tensor_type.elem_type]
                        if dtype == "INT64" and fake.major < 10:
                            dtype = "INT32"  # the 8.6 parser narrows int64 network inputs
                        shape = tuple(-1 if isinstance(d, str) else d for d in dims)
                        into.append(Tensor(v.name, fake.DataType[dtype], shape, dims))
                return True

        class Profile:
            def __init__(self):
                self.shapes = {}

            def set_shape(self, name, low, opt, high):
                self.shapes[name] = (tuple(low), tuple(opt), tuple(high))

        class TimingCache:
            def __init__(self, data):
                self.data = bytes(data)

            def serialize(self):
                return self.data + b"+timed"

        class Config:
            def __init__(self):
                self.flags, self.profiles, self.cache = set(), [], None
                self.max_aux_streams = self.profiling_verbosity = None

            def set_memory_pool_limit(self, pool, size):
                fake.calls.append(("set_memory_pool_limit", pool.name, size))

            def set_flag(self, flag):
                fake.calls.append(("set_flag", flag.name))
                self.flags.add(flag.name)

            def add_optimization_profile(self, profile):
                fake.calls.append(("add_optimization_profile", len(self.profiles)))
                self.profiles.append(profile)
                return len(self.profiles) - 1

            def create_timing_cache(self, data):
                fake.calls.append(("create_timing_cache", bytes(data)))
                return TimingCache(data)

            def set_timing_cache(self, cache, ignore_mismatch):
                fake.calls.append(("set_timing_cache", ignore_mismatch))
                self.cache = cache
                return True

            def get_timing_cache(self):
                return self.cache

        class Builder:
            def __init__(self, logger):
                fake.calls.append(("Builder",))
                self.logger = logger

            def create_network(self, flags):
                fake.calls.append(("create_network", flags))
                return Network(flags)

            def create_builder_config(self):
                fake.calls.append(("create_builder_config",))
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                fake.calls.append(("build_serialized_network", sorted(config.flags), config.max_aux_streams,
                                   config.profiling_verbosity.name))
                if fake.build_error:
                    self.logger.log(fake.ILogger.Severity.WARNING, "a warning")
                    self.logger.log(fake.ILogger.Severity.ERROR, fake.build_error + "\nsecond line")
                    return None
                tensor = lambda t: [t.name, t.dtype.name, list(t.onnx_dims)]  # noqa: E731
                return json.dumps({"inputs": [tensor(t) for t in network.inputs],
                                   "outputs": [tensor(t) for t in network.outputs],
                                   "profiles": [{n: [list(s) for s in v] for n, v in p.shapes.items()}
                                                for p in config.profiles]}).encode()

        class Inspector:
            def __init__(self, engine):
                self.engine = engine

            def get_engine_information(self, format):
                layers = [{"Name": "/attn", "LayerType": "PluginV2", "Inputs": [{"Name": "past_key.0"}]}]
                if fake.kv_copy:
                    layers.append({"Name": "Reformatting CopyNode for past_key.0", "LayerType": "Reformat",
                                   "Inputs": [{"Name": "past_key.0"}]})
                return json.dumps({"Layers": layers})

        class Engine:
            def __init__(self, body):
                self.tensors = {t[0]: (fake.DataType[t[1]], tuple(t[2])) for t in body["inputs"] + body["outputs"]}
                self.input_names = [t[0] for t in body["inputs"]]
                self.names = self.input_names + [t[0] for t in body["outputs"]]
                self.profiles = body["profiles"]
                self.num_io_tensors = len(self.names)
                self.is_vision = "pixel_values" in self.tensors
                size = 1 << 16 if self.is_vision else 1 << 20
                if fake.major >= 10:
                    self.device_memory_size_v2 = size
                else:
                    self.device_memory_size = size

            def get_tensor_name(self, i):
                return self.names[i]

            def get_tensor_mode(self, name):
                return fake.TensorIOMode.INPUT if name in self.input_names else fake.TensorIOMode.OUTPUT

            def get_tensor_dtype(self, name):
                return self.tensors[name][0]

            def is_shape_inference_io(self, name):
                return False

            def get_tensor_profile_shape(self, name, profile):
                return [tuple(s) for s in self.profiles[profile][name]]

            def create_engine_inspector(self):
                return Inspector(self)

            def _context(self):
                fake.calls.append(("context", "user-managed" if fake.major >= 10 else "without-device-memory"))
                return Context(self)

            if self.major >= 10:
                def create_execution_context(self, strategy):
                    assert strategy == fake.ExecutionContextAllocationStrategy.USER_MANAGED
                    return self._context()
            else:
                def create_execution_context_without_device_memory(self):
                    return self._context()

        class Context:
            def __init__(self, engine):
                self.engine, self.shapes, self.addresses, self.profile, self.memory = engine, {}, {}, None, None

            if self.major >= 10:
                def set_device_memory(self, ptr, size):
                    self.memory = (ptr, size)
            else:
                @property
                def device_memory(self):
                    raise AttributeError("write-only")

                @device_memory.setter
                def device_memory(self, ptr):
                    self.memory = (ptr, None)

            def set_optimization_profile_async(self, index, stream):
                self.profile = index
                return True

            def set_input_shape(self, name, shape):
                low, _, high = self.engine.profiles[self.profile][name]
                shape = tuple(int(d) for d in shape)
                assert all(a <= d <= b for a, d, b in zip(low, shape, high)), (name, shape, low, high)
                self.shapes[name] = shape
                return True

            def _sizes(self):
                sizes = {}
                for name, shape in self.shapes.items():
                    for dim, value in zip(self.engine.tensors[name][1], shape):
                        if isinstance(dim, str):
                            sizes[dim] = value
                return sizes

            def get_tensor_shape(self, name):
                if name in self.shapes:
                    return self.shapes[name]
                if name.startswith("present_"):
                    return self.shapes["past_" + name[len("present_"):]]
                sizes = self._sizes()
                return tuple(d if isinstance(d, int) else sizes.get(d, sizes.get("patches", 0) // 4
                                                                    if d == "tokens" else fake.vocab)
                             for d in self.engine.tensors[name][1])

            def set_tensor_address(self, name, ptr):
                self.addresses[name] = ptr
                return True

            def execute_async_v3(self, stream):
                bound = {n: (self.addresses[n], self.get_tensor_shape(n), self.engine.tensors[n][0].name)
                         for n in self.engine.names}
                missing = [n for n in self.engine.input_names if n not in self.shapes]
                assert not missing, missing
                fake.cuda.run(lambda: fake.execute(bound, self.profile))
                return True

        self.Builder, self.OnnxParser, self.Engine = Builder, OnnxParser, Engine

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, data):
                fake.calls.append(("deserialize_cuda_engine",))
                assert fake.creators, "deserialized before the plugin library was loaded"
                return Engine(json.loads(bytes(data)))

        self.Runtime = Runtime

        class Registry:
            def get_creator(self, name, version, namespace):
                return name if name in fake.creators else None

            get_plugin_creator = get_creator

        self._registry = Registry()

    def get_plugin_registry(self):
        return self._registry

    def execute(self, bound, profile):
        """One plan execution on host memory: the toy model of the decoder or vision encoder."""
        numpy_of = {"FLOAT": np.float32, "HALF": np.float16, "INT32": np.int32, "INT64": np.int64, "BOOL": np.bool_}
        view = {n: _array(ptr, shape, numpy_of[dtype]) for n, (ptr, shape, dtype) in bound.items()}
        record = {"profile": profile, "addresses": {n: ptr for n, (ptr, _, _) in bound.items()},
                  "shapes": {n: shape for n, (_, shape, _) in bound.items()},
                  "dtypes": {n: dtype for n, (_, _, dtype) in bound.items()}}
        self.executions.append(record)
        if "pixel_values" in view:
            tokens = view["image_embeds"].shape[0]
            view["image_embeds"][:] = view["pixel_values"][::4, :1][:tokens]
            view["deepstack_embeds"][:] = view["image_embeds"][None] + np.arange(3)[:, None, None]
            return
        ids, total = view["input_ids"], int(view["total_sequence_length"][0])
        b, s = ids.shape
        for name in [n for n in view if n.startswith("past_")]:
            buffer = view[name]
            for row in range(b):
                valid = int(view["seqlens_k"][row]) + 1
                start = 0 if total == s else valid - s
                for j in range(s):
                    if start + j < buffer.shape[2]:
                        buffer[row, :, start + j, :] = ids[row, j]
        logits = view["logits"]
        logits[:] = 0
        for row in range(b):
            logits[row, (int(ids[row, int(view["logits_index"][row])]) + 1) % self.vocab] = 1
            logits[row, -1] = float(view["visual_embeds"][row].sum())


class FakeLibrary:
    """The plugin library: loading it registers the creators; its kernel API answers the probe."""

    def __init__(self, fake: FakeTensorRT, code: int = 0):
        self.fake, self.code = fake, code
        fake.creators |= {"Qwen3VLAttention", "Qwen3VLRMSNorm", "Qwen3VLVisionAttention", "Qwen3VLWeightOnlyGemm",
                          "Qwen3VLQuantizedGather"}
        outer = self

        class Probe:
            restype = None

            def __call__(self, *args):
                return outer.code

        self.qwen3vl_rmsnorm = Probe()


@pytest.fixture
def fake_trt(tmp_path, monkeypatch, engine):
    """fake_trt(version, gpu, ...) -> (fake tensorrt module, fake CUDA): installed for `import tensorrt`,
    with a plugin library file that loads (a new path per call: loaded libraries are cached by path)."""
    counter = [0]

    def install(version="8.6.1", gpu=MX250, free=1 << 30, probe_code=0, kv_copy=False):
        cuda = FakeCuda(gpu, free)
        fake = FakeTensorRT(version, cuda, load_manifest(engine).model.vocab_size, kv_copy)
        counter[0] += 1
        library = tmp_path / f"plugins{counter[0]}" / trt_plans.PLUGIN_LIBRARY
        library.parent.mkdir()
        library.write_bytes(b"\x7fELF plugin library %d" % counter[0])
        monkeypatch.setitem(sys.modules, "tensorrt", fake)
        monkeypatch.setenv(trt_plans.PLUGIN_ENV, str(library))
        monkeypatch.setattr(trt_plans, "_dlopen", lambda path: FakeLibrary(fake, probe_code))
        return fake, cuda

    return install


@pytest.fixture
def engine_copy(engine, tmp_path):
    """A private copy of the engine folder (plans get written into it)."""
    import shutil

    copy = tmp_path / "engine"
    shutil.copytree(engine, copy)
    return copy


# -- builder ---------------------------------------------------------------------------------------------

def test_builder_calls_on_tensorrt_86_for_sm61(fake_trt, engine_copy):
    fake, cuda = fake_trt("8.6.1", MX250)
    manifest = load_manifest(engine_copy)
    env = trt_plans.open_tensorrt(cuda=cuda, graph_plugins=("Qwen3VLAttention",))
    io = read_trt_io(engine_copy, manifest)["decoder"]
    messages = []
    data = trt_plans.ensure_plan(engine_copy, manifest, env, io, PlanSettings(max_batch=2, workspace=1 << 28),
                                 progress=messages.append)
    calls = [c for c in fake.calls if c[0] != "allowed_formats"]
    names = [c[0] for c in calls]
    assert names[:4] == ["Builder", "create_network", "OnnxParser", "parse_from_file"]
    assert calls[1] == ("create_network", 1 << 0)  # EXPLICIT_BATCH, 8.6
    assert calls[3] == ("parse_from_file", "decoder.trt.onnx")
    order = ["create_builder_config", "set_memory_pool_limit", "add_optimization_profile", "create_timing_cache",
             "set_timing_cache", "build_serialized_network", "deserialize_cuda_engine"]
    assert [n for n in names if n in order] == order[:2] + ["add_optimization_profile"] + order[2:]
    assert ("set_memory_pool_limit", "WORKSPACE", 1 << 28) in calls
    assert ("set_flag", "DIRECT_IO") in calls and ("set_flag", "FP16") not in calls  # no FP16 on SM 6.1
    assert ("build_serialized_network", ["DIRECT_IO"], 0, "DETAILED") in calls  # one stream, tensor names kept
    # Linear formats on exactly the KV cache inputs and outputs.
    formatted = {c[1] for c in fake.calls if c[0] == "allowed_formats"}
    assert formatted == set(past_names(4)) | {n.replace("past_", "present_") for n in past_names(4)}
    assert all(c[2] == 1 << 0 for c in fake.calls if c[0] == "allowed_formats")
    # The profiles as built: prefill then decode.
    body = json.loads(data)
    prefill, decode = body["profiles"]
    assert prefill["input_ids"] == [[1, 1], [1, 256], [1, 256]] and decode["input_ids"] == [[1, 1], [1, 1], [2, 1]]
    assert prefill["past_key.0"][2] == [1, 2, manifest.max_context, 16]
    assert decode["past_key.0"][2] == [2, 2, manifest.max_context, 16]
    assert {t[0]: t[1] for t in body["inputs"]}["input_ids"] == "INT32"  # 8.6 narrows int64 inputs
    timing = trt_plans.timing_cache_path(engine_copy, "8.6.1", MX250)
    assert timing.name == "timing-8.6.1-nvidia-geforce-mx250-sm61.cache" and timing.read_bytes() == b"+timed"
    assert messages[0].startswith("decoder: compiling a TensorRT 8.6.1 plan for NVIDIA GeForce MX250 (SM 6.1)")
    # Up to date: loaded, not rebuilt; the timing cache is read back on a rebuild.
    fake.calls.clear()
    assert trt_plans.ensure_plan(engine_copy, manifest, env, io, PlanSettings(max_batch=2, workspace=1 << 28)) == data
    assert not [c for c in fake.calls if c[0] == "Builder"]
    trt_plans.ensure_plan(engine_copy, manifest, env, io, PlanSettings(max_batch=2, workspace=1 << 28), force=True)
    assert ("create_timing_cache", b"+timed") in fake.calls


def test_builder_on_tensorrt_10_asks_for_strong_typing(fake_trt, engine_copy):
    fake, cuda = fake_trt("10.13.0", RTX)
    manifest = load_manifest(engine_copy)
    env = trt_plans.open_tensorrt(cuda=cuda)
    io = read_trt_io(engine_copy, manifest)["vision"]
    data = trt_plans.ensure_plan(engine_copy, manifest, env, io, PlanSettings())
    assert ("create_network", 1 << 1) in fake.calls  # STRONGLY_TYPED, no EXPLICIT_BATCH
    assert ("set_flag", "FP16") not in fake.calls
    assert {t[0]: t[1] for t in json.loads(data)["inputs"]}["pos_indices"] == "INT64"
    assert json.loads(data)["profiles"][0]["frame_patch_index"] == [[1, 1], [1, 1024], [8, 4096]]


def test_sm61_with_tensorrt_10_or_a_foreign_plugin_library_is_refused(fake_trt):
    fake, cuda = fake_trt("10.13.0", MX250)
    with pytest.raises(TrtUnavailable, match=r"^SM 6.1 \(NVIDIA GeForce MX250\) needs TensorRT 8.6, found 10.13.0$"):
        trt_plans.open_tensorrt(cuda=cuda)
    fake, cuda = fake_trt("8.6.1", MX250, probe_code=209)
    with pytest.raises(TrtUnavailable, match=r"has no kernels for this GPU \(NVIDIA GeForce MX250, SM 6.1\): rebuild "
                                             r"it here with `make plugins` \(CMAKE_CUDA_ARCHITECTURES=61\)$"):
        trt_plans.open_tensorrt(cuda=cuda)


def test_stale_plan_is_rebuilt_or_refused_with_one_line(fake_trt, engine_copy):
    fake, cuda = fake_trt("8.6.1", MX250)
    manifest = load_manifest(engine_copy)
    io = read_trt_io(engine_copy, manifest)["decoder"]
    env = trt_plans.open_tensorrt(cuda=cuda)
    trt_plans.ensure_plan(engine_copy, manifest, env, io, PlanSettings())
    fake2, cuda2 = fake_trt("8.6.1", MX250)  # another plugin library file: another hash
    env2 = trt_plans.open_tensorrt(cuda=cuda2)
    with pytest.raises(TrtPlanError) as refused:
        trt_plans.ensure_plan(engine_copy, manifest, env2, io, PlanSettings(), compile_missing=False)
    assert "\n" not in str(refused.value)
    assert "stale: plugin library changed" in str(refused.value) and "--compile-only" in str(refused.value)
    messages = []
    trt_plans.ensure_plan(engine_copy, manifest, env2, io, PlanSettings(), progress=messages.append)
    assert "(stale: plugin library changed)" in messages[0]
    assert [c for c in fake2.calls if c[0] == "build_serialized_network"]


def test_parse_and_build_failures_are_one_line(fake_trt, tiny_engine, tmp_path):
    import shutil

    engine = shutil.copytree(tiny_engine("gqa2-tied", backend="trt", precision="int4", kv_dtype="fp16"),
                             tmp_path / "fp16kv")
    fake, cuda = fake_trt("8.6.1", MX250)
    manifest = load_manifest(engine)
    env, io = trt_plans.open_tensorrt(cuda=cuda), read_trt_io(engine, manifest)["decoder"]
    fake.parse_error = "No importer registered for op: Qwen3VLAttention"
    with pytest.raises(TrtPlanError) as parse:
        trt_plans.ensure_plan(engine, manifest, env, io, PlanSettings())
    assert str(parse.value) == ("TensorRT 8.6.1 could not parse decoder.trt.onnx: No importer registered for op: "
                                "Qwen3VLAttention")
    fake.parse_error, fake.build_error = None, "could not find any supported formats"
    with pytest.raises(TrtPlanError) as build:
        trt_plans.ensure_plan(engine, manifest, env, io, PlanSettings())
    assert str(build.value) == ("TensorRT 8.6.1 could not build a plan from decoder.trt.onnx: could not find any "
                                "supported formats (an fp16 KV cache on TensorRT 8.6 may need the FP16 flag: "
                                "--trt-fp16)")
    assert not (engine / "trt" / "decoder.plan").exists()


def test_backend_with_an_fp16_kv_cache(fake_trt, tiny_engine, tmp_path):
    import shutil

    engine = shutil.copytree(tiny_engine("gqa2-tied", backend="trt", precision="int4", kv_dtype="fp16"),
                             tmp_path / "fp16kv")
    fake, cuda = fake_trt("8.6.1", MX250)
    manifest = load_manifest(engine)
    backend = TrtBackend(engine, manifest, PlanSettings(prefill_chunk=4), vision_on_gpu=False, cuda=cuda,
                         progress=lambda message: None)
    assert backend.kv_dtype == np.float16 and backend.decoder_dtype == np.float32
    cache = backend.new_cache(1, 16)
    assert cache.nbytes == 2 * 4 * 1 * 2 * 16 * 16 * 2  # half of fp32's
    backend.prefill(cache, _prompt_chunk([6], manifest.model))
    assert backend.decode(cache, np.array([700]), np.array([6]), np.array([6])).argmax() == 701
    assert _cache_tokens(cache, backend)[0, :7].tolist() == [100, 101, 102, 103, 104, 105, 700]
    assert all(e["dtypes"]["past_key.0"] == "HALF" for e in fake.executions if "past_key.0" in e["dtypes"])


def test_kv_copies_in_a_plan_are_reported(fake_trt, engine_copy):
    fake, cuda = fake_trt("8.6.1", MX250, kv_copy=True)
    manifest = load_manifest(engine_copy)
    messages = []
    trt_plans.ensure_plan(engine_copy, manifest, trt_plans.open_tensorrt(cuda=cuda),
                          read_trt_io(engine_copy, manifest)["decoder"], PlanSettings(), progress=messages.append)
    assert any(m.startswith("warning: TensorRT put 1 copy/reformat layer(s) on the KV cache") for m in messages)


def test_compile_only_command_compiles_both_plans(fake_trt, engine_copy, capsys, monkeypatch):
    from commands import main
    from runtime.cuda_runtime import CudaRuntime

    fake, cuda = fake_trt("8.6.1", MX250)
    monkeypatch.setattr(CudaRuntime, "load", classmethod(lambda cls: cuda))
    assert main(["build", "--engine", str(engine_copy), "--compile-only"]) == 0
    assert sorted(p.name for p in (engine_copy / "trt").iterdir() if not p.name.startswith("timing")) == [
        "decoder.plan", "decoder.plan.json", "vision.plan", "vision.plan.json"]
    assert "plans for NVIDIA GeForce MX250 (SM 6.1) ready" in capsys.readouterr().err
    # The runtime, given no settings, takes the ones the plans were compiled with: nothing to rebuild.
    assert trt_plans.recorded_settings(engine_copy) == PlanSettings()
    builds = len([c for c in fake.calls if c[0] == "build_serialized_network"])
    backend = TrtBackend(engine_copy, load_manifest(engine_copy), cuda=cuda, compile_missing=False)
    assert len([c for c in fake.calls if c[0] == "build_serialized_network"]) == builds
    assert backend.max_chunk == PlanSettings().prefill_chunk


# -- the backend -----------------------------------------------------------------------------------------

def _prompt_chunk(rows, m, image_rows=()):
    """A right-padded first chunk: row r holds tokens 100*(r+1) + 0..len-1."""
    longest = max(rows)
    ids = np.zeros((len(rows), longest), np.int64)
    for r, n in enumerate(rows):
        ids[r, :n] = 100 * (r + 1) + np.arange(n)
    positions = np.broadcast_to(np.arange(longest), (3, len(rows), longest)).copy()
    visual = None
    if image_rows:
        visual = np.zeros((len(rows), longest, m.hidden_size), np.float32)
        for r in image_rows:
            visual[r, 0] = 0.5
    deepstack = None if visual is None else np.zeros((m.num_deepstack, *visual.shape), np.float32)
    return DecoderChunk(ids, positions, np.zeros(len(rows), np.int64), np.array(rows), visual, deepstack)


def _cache_tokens(cache, backend, layer=0):
    layout = cache.layout
    keys = _array(cache.slab.ptr + layer * layout.buffer_bytes, (layout.batch, layout.kv_heads, layout.capacity,
                                                                  layout.head_dim), backend.kv_dtype)
    return keys[:, 0, :, 0]


@pytest.mark.parametrize("version", ["8.6.1", "10.13.0"])
def test_backend_binds_one_slab_and_prefills_in_pieces(fake_trt, engine_copy, version):
    fake, cuda = fake_trt(version, MX250 if version.startswith("8") else RTX)
    manifest = load_manifest(engine_copy)
    m = manifest.model
    backend = TrtBackend(engine_copy, manifest, PlanSettings(max_batch=2, prefill_batch=2, prefill_chunk=4),
                         cuda=cuda, progress=lambda message: None)
    assert backend.name == f"tensorrt-{version}" and backend.decoder_dtype == np.float32
    assert (backend.max_batch, backend.prefill_batch, backend.max_chunk) == (2, 2, 4)
    assert backend.max_capacity == manifest.max_context
    cache = backend.new_cache(2, 16)
    assert cache.nbytes == 2 * 4 * 2 * 2 * 16 * 16 * 4

    fake.executions.clear()
    logits = backend.prefill(cache, _prompt_chunk([7, 3], m, image_rows=(1,)))
    # 7 and 3 tokens in pieces of 4: rows 0-1 columns 0-4 batched, then row 0 alone (a view) for 4-7.
    runs = [(e["shapes"]["input_ids"], e["addresses"]["past_key.0"]) for e in fake.executions]
    base = cache.addresses()[0]
    assert runs == [((2, 4), base), ((1, 3), base)]  # row 0 is at the slab's start
    for e in fake.executions:
        assert e["profile"] == 0
        for past in past_names(m.num_hidden_layers):
            present = "present_" + past[len("past_"):]
            assert e["addresses"][past] == e["addresses"][present]  # one address: written in place
        assert e["dtypes"]["input_ids"] == ("INT32" if version.startswith("8") else "INT64")
    tokens = _cache_tokens(cache, backend)
    assert tokens[0, :7].tolist() == list(range(100, 107)) and tokens[1, :3].tolist() == [200, 201, 202]
    assert logits.dtype == np.float32 and logits.shape == (2, m.vocab_size)
    assert logits[0].argmax() == 107 and logits[1, 203] == 1  # each row's last token (+1)
    assert logits[0, -1] == 0 and logits[1, -1] == pytest.approx(0.5 * m.hidden_size)  # visual embeds arrived

    # Row 1 continues alone through a view: its buffers at one row's offset in every layer.
    fake.executions.clear()
    row = cache.row(1)
    chunk = DecoderChunk(np.array([[300, 301]]), np.zeros((3, 1, 2), np.int64), np.array([3]), np.array([2]))
    backend.prefill(row, chunk)
    layout = cache.layout
    for name, address in zip(past_names(m.num_hidden_layers), cache.addresses()):
        assert fake.executions[0]["addresses"][name] == address + layout.row_bytes
    assert _cache_tokens(cache, backend)[1, :5].tolist() == [200, 201, 202, 300, 301]
    assert _cache_tokens(cache, backend, layer=5)[1, :5].tolist() == [200, 201, 202, 300, 301]


def test_backend_decode_is_captured_once_and_replayed(fake_trt, engine_copy):
    fake, cuda = fake_trt("8.6.1", MX250)
    manifest = load_manifest(engine_copy)
    backend = TrtBackend(engine_copy, manifest, PlanSettings(max_batch=2, prefill_chunk=8), cuda=cuda,
                         progress=lambda message: None)
    cache = backend.new_cache(2, 12)
    backend.prefill(cache, _prompt_chunk([3, 2], manifest.model))
    past = np.array([3, 2])
    seen = []
    for step in range(4):
        tokens = np.array([500 + step, 600 + step])
        logits = backend.decode(cache, tokens, past + 10, past)
        seen.append(logits.argmax(axis=1).tolist())
        past = past + 1
    assert seen == [[501 + s, 601 + s] for s in range(4)]
    assert cuda.launches == 3  # step 1 plain, step 2 captured then launched, steps 3-4 replays
    decode_runs = [e for e in fake.executions if e["profile"] == 1]
    assert len(decode_runs) == 4 and all(e["shapes"]["input_ids"] == (2, 1) for e in decode_runs)
    assert decode_runs[0]["addresses"]["past_value.3"] == decode_runs[0]["addresses"]["present_value.3"]
    tokens = _cache_tokens(cache, backend)
    assert tokens[0, :7].tolist() == [100, 101, 102, 500, 501, 502, 503]
    assert tokens[1, :6].tolist() == [200, 201, 600, 601, 602, 603]
    # Without CUDA graphs, the same answers.
    backend.cuda_graphs = False
    cache2 = backend.new_cache(2, 12)
    backend.prefill(cache2, _prompt_chunk([3, 2], manifest.model))

    def step(tokens, past):
        return backend.decode(cache2, np.array(tokens), np.array(past) + 10, np.array(past))

    assert step([500, 600], [3, 2]).argmax(1).tolist() == [501, 601]
    assert step([501, 601], [4, 3]).argmax(1).tolist() == [502, 602]


def test_backend_rows_beyond_the_plans_batch(fake_trt, engine_copy):
    """Prefill one row per call (the default prefill batch), decode in groups of the decode batch."""
    fake, cuda = fake_trt("8.6.1", MX250)
    manifest = load_manifest(engine_copy)
    backend = TrtBackend(engine_copy, manifest, PlanSettings(max_batch=2), cuda=cuda, progress=lambda message: None)
    cache = backend.new_cache(3, 8)
    fake.executions.clear()
    logits = backend.prefill(cache, _prompt_chunk([2, 3, 1], manifest.model))
    assert [e["shapes"]["input_ids"] for e in fake.executions] == [(1, 2), (1, 3), (1, 1)]
    assert logits.argmax(axis=1).tolist() == [102, 203, 301]
    for step in range(3):
        past = np.array([2, 3, 1]) + step
        tokens = np.array([10, 20, 30]) + step
        assert backend.decode(cache, tokens, past, past).argmax(axis=1).tolist() == (tokens + 1).tolist()
    runs = [e["shapes"]["input_ids"] for e in fake.executions if e["profile"] == 1]
    assert runs == [(2, 1), (1, 1)] * 3
    tokens = _cache_tokens(cache, backend)
    assert tokens[2, :4].tolist() == [300, 30, 31, 32] and tokens[1, :6].tolist() == [200, 201, 202, 20, 21, 22]


def test_cache_prefix_copies_out_of_and_into_device_rows(fake_trt, engine_copy):
    """Prefix reuse on the GPU: a row's first n tokens come out in the cache's dtype and go into
    another cache's row, every layer and head, leaving the rest of that row alone."""
    fake, cuda = fake_trt("8.6.1", MX250)
    manifest = load_manifest(engine_copy)
    backend = TrtBackend(engine_copy, manifest, PlanSettings(max_batch=2), cuda=cuda, progress=lambda message: None)
    source, target = backend.new_cache(2, 8), backend.new_cache(3, 8)
    layout = source.layout
    shape = (layout.buffers, layout.batch, layout.kv_heads, layout.capacity, layout.head_dim)
    _array(source.slab.ptr, shape, backend.kv_dtype)[...] = np.arange(np.prod(shape)).reshape(shape) % 1000
    stored = source.row(1).read_prefix(5)
    assert len(stored) == layout.buffers and stored[0].dtype == backend.kv_dtype
    slab = _array(source.slab.ptr, shape, backend.kv_dtype)
    for i, array in enumerate(stored):
        np.testing.assert_array_equal(array[0], slab[i, 1, :, :5])
    target.row(2).write_prefix([a[:, :, :4] for a in stored])
    written = _array(target.slab.ptr, (layout.buffers, 3, layout.kv_heads, layout.capacity, layout.head_dim),
                     backend.kv_dtype)
    np.testing.assert_array_equal(written[:, 2, :, :4], slab[:, 1, :, :4])
    assert not written[:, :2].any() and not written[:, 2, :, 4:].any()


def test_pipeline_reuses_prefixes_on_the_backend(fake_trt, engine_copy):
    from runtime import Pipeline

    fake, cuda = fake_trt("8.6.1", MX250)
    manifest = load_manifest(engine_copy)
    backend = TrtBackend(engine_copy, manifest, PlanSettings(prefill_chunk=8), vision_on_gpu=False, cuda=cuda,
                         progress=lambda message: None)
    pipe = Pipeline(engine_copy, manifest, backend)
    prompt = "Tell me a short story about a lighthouse keeper."
    cold = pipe.generate(prompt, max_new_tokens=3, do_sample=False)
    warm = pipe.generate(prompt, max_new_tokens=3, do_sample=False)
    assert (cold.cached_tokens, warm.cached_tokens) == (0, warm.prompt_tokens - 1)
    assert warm.token_ids == cold.token_ids


def test_backend_refuses_caches_that_do_not_fit(fake_trt, engine_copy):
    fake, cuda = fake_trt("8.6.1", MX250, free=100 << 20)
    manifest = load_manifest(engine_copy)
    backend = TrtBackend(engine_copy, manifest, PlanSettings(max_batch=2), cuda=cuda, progress=lambda message: None)
    per_token = kv_bytes_per_token(manifest.model, 4)
    fits = capacity_that_fits(100 << 20, 1, per_token)
    assert backend.max_capacity_for(1) == min(fits, manifest.max_context)
    cuda.free_bytes = 64 << 20  # nothing beyond the reserve
    with pytest.raises(Exception, match=r"needs .* MiB of GPU memory; 0 tokens fit now"):
        backend.new_cache(1, 16)


def test_backend_vision_on_gpu_and_on_cpu(fake_trt, engine_copy):
    fake, cuda = fake_trt("8.6.1", MX250)
    manifest = load_manifest(engine_copy)
    gpu = TrtBackend(engine_copy, manifest, PlanSettings(vision_patches=48), cuda=cuda, progress=lambda message: None)
    batch = _vision_batch([[1, 4, 4], [1, 8, 4], [1, 4, 6]], head_dim=manifest.model.vision_head_dim)
    batch = VisionBatch(np.repeat(batch.pixel_values[:, :1], 1536, axis=1), batch.grid_thw, batch.host)
    features = gpu.encode_images(batch)
    assert [e["shapes"]["pixel_values"][0] for e in fake.executions if "pixel_values" in e["shapes"]] == [48, 24]
    assert features.image_embeds.shape == (18, manifest.model.hidden_size)
    np.testing.assert_array_equal(features.image_embeds[:, 0], np.arange(0, 72, 4))  # groups in order
    assert features.deepstack_embeds.shape == (3, 18, manifest.model.hidden_size)
    assert fake.executions[0]["dtypes"]["frame_patch_index"] == "INT32"

    cpu = TrtBackend(engine_copy, manifest, PlanSettings(), vision_on_gpu=False, cuda=cuda, progress=lambda m: None)
    from runtime.ort_backend import OrtBackend

    ort = OrtBackend(engine_copy, manifest)
    pixels = np.random.default_rng(0).standard_normal((16, 1536)).astype(np.float32)
    images = VisionBatch(pixels, np.array([[1, 4, 4]]), vision_inputs(np.array([[1, 4, 4]]), 2304, 2,
                                                                          manifest.model.vision_head_dim))
    np.testing.assert_array_equal(cpu.encode_images(images).image_embeds, ort.encode_images(images).image_embeds)


def test_pipeline_runs_on_the_backend(fake_trt, engine_copy):
    from runtime import Pipeline

    fake, cuda = fake_trt("8.6.1", MX250)
    manifest = load_manifest(engine_copy)
    backend = TrtBackend(engine_copy, manifest, PlanSettings(prefill_chunk=8), vision_on_gpu=False, cuda=cuda,
                         progress=lambda message: None)
    pipe = Pipeline(engine_copy, manifest, backend)
    results = pipe.generate(["Describe it.", "Hi"], max_new_tokens=3, do_sample=False)
    for result in results:
        ids = result.token_ids
        assert len(ids) == 3 and ids[1] == ids[0] + 1 and ids[2] == ids[1] + 1  # the toy model: token + 1
    assert all(r.timings["backend"] == "tensorrt-8.6.1" for r in results)


@pytest.mark.gpu
def test_real_tensorrt_plans_build_and_run(engine_copy):
    try:
        env = trt_plans.open_tensorrt()
    except TrtUnavailable as exc:
        pytest.skip(f"needs TensorRT, a GPU and the plugin library: {exc}")
    manifest = load_manifest(engine_copy)
    backend = TrtBackend(engine_copy, manifest, vision_on_gpu=True)
    cache = backend.new_cache(1, 32)
    logits = backend.prefill(cache, _prompt_chunk([5], manifest.model))
    assert np.isfinite(logits).all()
    assert env.version
