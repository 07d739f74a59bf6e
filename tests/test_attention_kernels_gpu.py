"""The attention kernels against their contracts (trt_plugins/attention: Qwen3VLAttention,
trt_plugins/vision_attention: Qwen3VLVisionAttention), on a CUDA GPU and in the CPU emulation of one.

Each kernel is compared with the numpy reference of its contract (graph_passes/plugin_reference.py)
and with ONNX Runtime CPU running the ONNX Runtime-target op: GroupQueryAttention on q and k
normalised and rotated in numpy, and the vision graph's padded per-frame attention. Every test runs
on both backends of kernel_devices.py: "cuda" (nvcc for the present GPU, marked gpu: `pytest -m gpu`)
and "emulated" (g++ and tests/cuda_emulation, in `make test`), the emulated ones over shorter caches,
prompts and frames that still take every path (prefill tiles with partial query and key tiles,
decode in one chunk and split-K with the combine, every GQA grouping). Run with `-s` on a GPU to
see the decode bandwidth report.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
from kernel_devices import (BOTH, build_for_gpu, check, cuda, device, emulated_cuda,  # noqa: F401
                            emulated_library, emulation_runtime, per_backend, real_cuda)
from test_kernels_gpu import device_copy_bandwidth

from graph_passes.plugin_reference import qwen3vl_attention, rms_norm, rotate_half, vision_attention
from runtime.vision_positions import frame_layout

ROOT = Path(__file__).resolve().parents[1]
SOURCES = (ROOT / "trt_plugins" / "attention" / "attention_kernel.cu",
           ROOT / "trt_plugins" / "vision_attention" / "vision_attention_kernel.cu")
DTYPES = {"fp32": np.float32, "fp16": np.float16}
CODES = {np.float32: 0, np.float16: 1}  # qwen3vl_dtype
EPSILON = 1e-6
# Kernel vs numpy reference: the same float32 maths in another order; fp16 storage can round one
# ulp apart (values up to ~4: 4e-3).
TOLERANCE = {np.float32: 1e-4, np.float16: 4e-3}
# Against ONNX Runtime, whose graph also rounds q and k to fp16 before the attention.
ORT_TOLERANCE = {np.float32: 1e-4, np.float16: 2e-2}


# -- building and binding (the CUDA runtime layer is kernel_devices.py) -----------------------------

def declare_attention_api(lib: ctypes.CDLL) -> ctypes.CDLL:
    """ctypes signatures of attention_kernel.h and vision_attention_kernel.h."""
    p, i32, f32 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_float
    lib.qwen3vl_attention.argtypes = [p] * 14 + [i32] * 6 + [f32, f32, ctypes.c_int, ctypes.c_int, i32, p,
                                                             ctypes.c_size_t, p]
    lib.qwen3vl_attention_workspace_size.argtypes = [i32, i32, i32]
    lib.qwen3vl_attention_workspace_size.restype = ctypes.c_size_t
    lib.qwen3vl_attention_decode_splits.argtypes = [i32, i32, i32]
    lib.qwen3vl_attention_decode_splits.restype = i32
    lib.qwen3vl_vision_attention.argtypes = [p] * 6 + [ctypes.c_int64] + [i32] * 4 + [f32, ctypes.c_int, i32, p]
    for name in ("qwen3vl_attention", "qwen3vl_vision_attention"):
        getattr(lib, name).restype = ctypes.c_int
    return lib


@pytest.fixture(scope="session")
def gpu_attention_kernels(real_cuda, tmp_path_factory):
    library = tmp_path_factory.mktemp("attention_kernels") / "libqwen3vl_attention_test.so"
    return declare_attention_api(ctypes.CDLL(str(build_for_gpu(real_cuda, SOURCES, library))))


@pytest.fixture
def kernels(backend, request):
    """The kernel library of the test's backend (the emulated one holds every kernel)."""
    if backend == "cuda":
        return request.getfixturevalue("gpu_attention_kernels")
    return declare_attention_api(request.getfixturevalue("emulated_cuda").lib)


# -- the decoder attention -------------------------------------------------------------------------

def rope_tables(rng, batch: int, seq_len: int, head_dim: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin (B, S, D) shaped like a rotary table: each frequency's angle twice (both halves)."""
    angles = rng.uniform(-np.pi, np.pi, size=(batch, seq_len, head_dim // 2))
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)


def attention_inputs(rng, *, batch, seq_len, heads, kv_heads, head_dim, capacity, valid, prompt, dtype, cache_dtype):
    """Random inputs of one call; rows keep `valid` keys after it. Past positions hold keys, the
    rest of the buffer a filler that must never be read."""
    valid = np.asarray(valid, np.int64)
    f = dict(
        q=rng.standard_normal((batch, seq_len, heads * head_dim)).astype(dtype),
        k=rng.standard_normal((batch, seq_len, kv_heads * head_dim)).astype(dtype),
        v=rng.standard_normal((batch, seq_len, kv_heads * head_dim)).astype(dtype),
        q_norm_weight=(1 + 0.2 * rng.standard_normal(head_dim)).astype(dtype),
        k_norm_weight=(1 + 0.2 * rng.standard_normal(head_dim)).astype(dtype),
    )
    f["cos"], f["sin"] = rope_tables(rng, batch, seq_len, head_dim, dtype)
    filler = np.full((batch, kv_heads, capacity, head_dim), 7.0, cache_dtype)
    past_key, past_value = filler.copy(), filler.copy()
    for b in range(batch):
        past = 0 if prompt else int(valid[b]) - seq_len
        # The rotary makes real keys O(1) per element after the norm.
        past_key[b, :, :past] = rng.standard_normal((kv_heads, past, head_dim))
        past_value[b, :, :past] = rng.standard_normal((kv_heads, past, head_dim))
    f["past_key"], f["past_value"] = past_key, past_value
    f["seqlens_k"] = (valid - 1).astype(np.int32)
    f["total_sequence_length"] = np.array([seq_len if prompt else valid.max()], np.int32)
    return f


def run_attention(kernels, device, f, *, heads, kv_heads, head_dim, splits=0, same_buffer=True):
    """Runs qwen3vl_attention; returns output, present_key, present_value as numpy arrays."""
    batch, seq_len, _ = f["q"].shape
    capacity = f["past_key"].shape[2]
    args = {name: device.put(value) for name, value in f.items()}
    out = device.empty(f["q"].shape, f["q"].dtype)
    if same_buffer:
        present_key, present_value = args["past_key"], args["past_value"]
    else:
        present_key = device.empty(f["past_key"].shape, f["past_key"].dtype)
        present_value = device.empty(f["past_value"].shape, f["past_value"].dtype)
    workspace_size = kernels.qwen3vl_attention_workspace_size(batch, heads, head_dim)
    workspace = device.empty((workspace_size,), np.uint8)  # garbage: partials must be written before read
    status = kernels.qwen3vl_attention(
        args["q"].ptr, args["k"].ptr, args["v"].ptr, args["q_norm_weight"].ptr, args["k_norm_weight"].ptr,
        args["cos"].ptr, args["sin"].ptr, args["past_key"].ptr, args["past_value"].ptr, args["seqlens_k"].ptr,
        args["total_sequence_length"].ptr, out.ptr, present_key.ptr, present_value.ptr, batch, seq_len, heads,
        kv_heads, head_dim, capacity, head_dim**-0.5, EPSILON, CODES[f["q"].dtype.type],
        CODES[f["past_key"].dtype.type], splits, workspace.ptr, workspace_size, None)
    check(device.cuda, status, "qwen3vl_attention")
    return out.numpy(), present_key.numpy(), present_value.numpy()


def reference(f, heads, kv_heads, head_dim):
    return qwen3vl_attention(**f, num_heads=heads, kv_num_heads=kv_heads, head_dim=head_dim, scale=head_dim**-0.5,
                             epsilon=EPSILON)


def ort_attention(f, heads, kv_heads, head_dim):
    """The ORT-target form: q/k norm and rotary in numpy (float32, then the graph's type), then
    com.microsoft.GroupQueryAttention on ONNX Runtime CPU."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    dtype = f["q"].dtype
    batch, seq_len, _ = f["q"].shape
    c, s = f["cos"].astype(np.float32)[:, :, None], f["sin"].astype(np.float32)[:, :, None]

    def rotated(x, weight, n):
        x, _ = rms_norm(x.astype(np.float32).reshape(batch, seq_len, n, head_dim), weight, EPSILON)
        return (x * c + rotate_half(x) * s).reshape(batch, seq_len, -1).astype(dtype)

    elem = TensorProto.FLOAT if dtype == np.float32 else TensorProto.FLOAT16
    names = ["query", "key", "value", "past_key", "past_value"]
    node = helper.make_node("GroupQueryAttention", [*names, "seqlens_k", "total_sequence_length"],
                            ["output", "present_key", "present_value"], domain="com.microsoft", num_heads=heads,
                            kv_num_heads=kv_heads, scale=head_dim**-0.5)
    graph = helper.make_graph(
        [node], "gqa",
        [helper.make_tensor_value_info(n, elem, None) for n in names]
        + [helper.make_tensor_value_info(n, TensorProto.INT32, None) for n in ("seqlens_k", "total_sequence_length")],
        [helper.make_tensor_value_info(n, elem, None) for n in ("output", "present_key", "present_value")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = dict(query=rotated(f["q"], f["q_norm_weight"], heads), key=rotated(f["k"], f["k_norm_weight"], kv_heads),
                 value=f["v"], past_key=f["past_key"], past_value=f["past_value"], seqlens_k=f["seqlens_k"],
                 total_sequence_length=f["total_sequence_length"])
    return session.run(None, feeds)


def ort_rows(f, heads, kv_heads, head_dim):
    """ort_attention; one row at a time for S > 1 after a cached prefix, which ONNX Runtime's CPU
    GroupQueryAttention takes only at batch 1. Returns output and present_key."""
    batch, seq_len, _ = f["q"].shape
    if seq_len == 1 or int(f["total_sequence_length"][0]) == seq_len:
        out, key, _ = ort_attention(f, heads, kv_heads, head_dim)
        return out, key
    rows = []
    for b in range(batch):
        row = {name: value[b:b + 1] for name, value in f.items() if name not in ("q_norm_weight", "k_norm_weight")}
        row.update(q_norm_weight=f["q_norm_weight"], k_norm_weight=f["k_norm_weight"],
                   total_sequence_length=(f["seqlens_k"][b:b + 1] + 1).astype(np.int32))
        rows.append(ort_attention(row, heads, kv_heads, head_dim))
    return np.concatenate([r[0] for r in rows]), np.concatenate([r[1] for r in rows])


def written_positions(f) -> list[range]:
    batch, seq_len, _ = f["q"].shape
    capacity = f["past_key"].shape[2]
    valid = f["seqlens_k"].astype(np.int64) + 1
    prompt = int(f["total_sequence_length"][0]) == seq_len
    return [range(max(0, start), min(capacity, start + seq_len))
            for start in (0 if prompt else int(valid[b]) - seq_len for b in range(batch))]


def check_attention(got, f, heads, kv_heads, head_dim, same_buffer=True, with_ort=True):
    out, present_key, present_value = got
    want_out, want_key, want_value = reference(f, heads, kv_heads, head_dim)
    cache_tol = TOLERANCE[f["past_key"].dtype.type]
    # A key that rounds one fp16 ulp apart in the cache moves the output by as much (fp32 q/output
    # over an fp16 cache): the output is as precise as the coarser of the two types.
    tol = max(TOLERANCE[f["q"].dtype.type], cache_tol)
    np.testing.assert_allclose(out.astype(np.float32), want_out.astype(np.float32), atol=tol, rtol=tol)
    valid = f["seqlens_k"].astype(np.int64) + 1
    for b, written in enumerate(written_positions(f)):
        keys = slice(0, int(min(valid[b], f["past_key"].shape[2])))
        np.testing.assert_allclose(present_key[b, :, keys].astype(np.float32), want_key[b, :, keys].astype(np.float32),
                                   atol=cache_tol, rtol=cache_tol)
        np.testing.assert_array_equal(present_value[b, :, keys], want_value[b, :, keys])
        if same_buffer:  # in place: nothing but this step's positions changes
            untouched = np.setdiff1d(np.arange(f["past_key"].shape[2]), np.arange(written.start, written.stop))
            np.testing.assert_array_equal(present_key[b, :, untouched], f["past_key"][b, :, untouched])
            np.testing.assert_array_equal(present_value[b, :, untouched], f["past_value"][b, :, untouched])
    if with_ort and f["q"].dtype == f["past_key"].dtype:
        ort_out, ort_key = ort_rows(f, heads, kv_heads, head_dim)
        ort_tol = ORT_TOLERANCE[f["q"].dtype.type]
        np.testing.assert_allclose(out.astype(np.float32), ort_out.astype(np.float32), atol=ort_tol, rtol=ort_tol)
        for b in range(len(valid)):
            keys = slice(0, int(valid[b]))
            np.testing.assert_allclose(present_key[b, :, keys].astype(np.float32),
                                       ort_key[b, :, keys].astype(np.float32), atol=ort_tol, rtol=ort_tol)


TYPES = [("fp32", "fp32"), ("fp16", "fp16"), ("fp32", "fp16")]  # (q/k/v/output, cache)
GQA = [(8, 8), (8, 4), (8, 2)]  # (heads, kv_heads): ratios 1, 2, 4


@pytest.mark.parametrize("types", TYPES, ids=["-".join(t) for t in TYPES])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads,kv_heads", GQA, ids=[f"gqa{h // k}" for h, k in GQA])
@pytest.mark.parametrize(*per_backend("cached", cuda=[1, 7, 64, 1000, 4096], emulated=[1, 7, 64, 300]))
def test_decode_step_matches_reference_and_onnxruntime(kernels, device, cached, heads, kv_heads, head_dim, types):
    """One new token per row over a cache of `cached` tokens (batch 2, the second row shorter):
    split-K over the cache, then the combine."""
    dtype, cache_dtype = DTYPES[types[0]], DTYPES[types[1]]
    rng = np.random.default_rng(cached + 7 * head_dim + heads // kv_heads)
    valid = [cached + 1, cached // 2 + 1]
    f = attention_inputs(rng, batch=2, seq_len=1, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                         capacity=cached + 9, valid=valid, prompt=False, dtype=dtype, cache_dtype=cache_dtype)
    got = run_attention(kernels, device, f, heads=heads, kv_heads=kv_heads, head_dim=head_dim)
    check_attention(got, f, heads, kv_heads, head_dim)


@pytest.mark.parametrize("types", TYPES, ids=["-".join(t) for t in TYPES])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads,kv_heads", GQA, ids=[f"gqa{h // k}" for h, k in GQA])
@pytest.mark.parametrize(*per_backend("seq_len", cuda=[1, 5, 63, 65, 300], emulated=[1, 5, 63, 65, 130]))
def test_prompt_matches_reference_and_onnxruntime(kernels, device, seq_len, heads, kv_heads, head_dim, types):
    """A right-padded prompt of batch 2 (the second row shorter), lengths that are not multiples of
    the tiles: the tiled prefill kernel (seq_len 1 runs the decode kernel from position 0)."""
    dtype, cache_dtype = DTYPES[types[0]], DTYPES[types[1]]
    rng = np.random.default_rng(seq_len + 7 * head_dim + heads // kv_heads)
    valid = [seq_len, max(1, seq_len - 3)]
    f = attention_inputs(rng, batch=2, seq_len=seq_len, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                         capacity=seq_len + 11, valid=valid, prompt=True, dtype=dtype, cache_dtype=cache_dtype)
    got = run_attention(kernels, device, f, heads=heads, kv_heads=kv_heads, head_dim=head_dim)
    check_attention(got, f, heads, kv_heads, head_dim)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("backend", BOTH)
def test_chunk_after_a_cached_prefix_matches_reference(kernels, device, head_dim):
    """S > 1 tokens appended to a cache (not a prompt): positions start at valid - S per row."""
    rng = np.random.default_rng(head_dim)
    f = attention_inputs(rng, batch=2, seq_len=37, heads=16, kv_heads=8, head_dim=head_dim, capacity=200,
                         valid=[150, 61], prompt=False, dtype=np.float32, cache_dtype=np.float16)
    check_attention(run_attention(kernels, device, f, heads=16, kv_heads=8, head_dim=head_dim), f, 16, 8, head_dim)


@pytest.mark.parametrize("splits", [1, 3, 64])
@pytest.mark.parametrize(*per_backend("capacity,valid", cuda=[(1100, (1001, 333))], emulated=[(330, (301, 133))]))
def test_decode_split_count_does_not_change_the_result(kernels, device, splits, capacity, valid):
    rng = np.random.default_rng(splits)
    f = attention_inputs(rng, batch=2, seq_len=1, heads=16, kv_heads=8, head_dim=128, capacity=capacity,
                         valid=list(valid), prompt=False, dtype=np.float16, cache_dtype=np.float16)
    got = run_attention(kernels, device, f, heads=16, kv_heads=8, head_dim=128, splits=splits)
    check_attention(got, f, 16, 8, 128, with_ort=False)


@pytest.mark.parametrize("heads,kv_heads", [(16, 2), (12, 2), (6, 2)], ids=["gqa8", "gqa6", "gqa3"])
@pytest.mark.parametrize("backend", BOTH)
def test_other_group_sizes_decode_and_prefill(kernels, device, heads, kv_heads):
    """Ratio 8 in one block, and ratios that are not powers of two (query heads in subgroups)."""
    for seq_len, prompt, valid in ((1, False, [300, 41]), (19, True, [19, 4])):
        rng = np.random.default_rng(heads * seq_len)
        f = attention_inputs(rng, batch=2, seq_len=seq_len, heads=heads, kv_heads=kv_heads, head_dim=128,
                             capacity=320, valid=valid, prompt=prompt, dtype=np.float32, cache_dtype=np.float32)
        check_attention(run_attention(kernels, device, f, heads=heads, kv_heads=kv_heads, head_dim=128), f, heads,
                        kv_heads, 128)


@pytest.mark.parametrize("seq_len", [1, 65])
@pytest.mark.parametrize("backend", BOTH)
def test_separate_present_buffers_start_from_a_copy_of_past(kernels, device, seq_len):
    rng = np.random.default_rng(seq_len)
    valid = [seq_len + 40, seq_len + 3]
    f = attention_inputs(rng, batch=2, seq_len=seq_len, heads=16, kv_heads=8, head_dim=128, capacity=160,
                         valid=valid, prompt=False, dtype=np.float16, cache_dtype=np.float16)
    got = run_attention(kernels, device, f, heads=16, kv_heads=8, head_dim=128, same_buffer=False)
    check_attention(got, f, 16, 8, 128, same_buffer=False)
    _, present_key, _ = got
    for b, written in enumerate(written_positions(f)):  # beyond the written positions: past, copied
        np.testing.assert_array_equal(present_key[b, :, written.stop:], f["past_key"][b, :, written.stop:])


@pytest.mark.parametrize("backend", BOTH)
def test_positions_past_the_capacity_are_dropped(kernels, device):
    """A prompt longer than the buffer: the keys beyond it are not written and not attended."""
    rng = np.random.default_rng(3)
    f = attention_inputs(rng, batch=1, seq_len=40, heads=8, kv_heads=4, head_dim=64, capacity=32, valid=[40],
                         prompt=True, dtype=np.float32, cache_dtype=np.float32)
    check_attention(run_attention(kernels, device, f, heads=8, kv_heads=4, head_dim=64), f, 8, 4, 64, with_ort=False)


@pytest.mark.parametrize("seq_len", [1, 70])
@pytest.mark.parametrize("backend", BOTH)
def test_arbitrary_lengths_never_fault(kernels, device, seq_len):
    """TensorRT's timing runs feed arbitrary seqlens_k/total_sequence_length: every position the
    kernels touch stays inside the buffers (a fault would fail the synchronisation)."""
    rng = np.random.default_rng(seq_len)
    for seqlens, total in (([2**31 - 1, -5], 2**31 - 1), ([-(2**31), 40], -3), ([17, 2**31 - 2], seq_len)):
        f = attention_inputs(rng, batch=2, seq_len=seq_len, heads=16, kv_heads=8, head_dim=128, capacity=96,
                             valid=[seq_len, seq_len], prompt=True, dtype=np.float16, cache_dtype=np.float16)
        f["seqlens_k"] = np.array(seqlens, np.int32)
        f["total_sequence_length"] = np.array([total], np.int32)
        out, _, _ = run_attention(kernels, device, f, heads=16, kv_heads=8, head_dim=128)
        assert out.shape == f["q"].shape


@pytest.mark.parametrize("cache", ["fp16", "fp32"])
@pytest.mark.parametrize("backend", [pytest.param("cuda", marks=pytest.mark.gpu)])
def test_decode_bandwidth_report(kernels, cuda, device, capsys, cache):
    """Prints the decode step's achieved bandwidth (KV bytes read / time of the whole call: KV write,
    split-K, combine) for Qwen3-VL-2B's layer shape (16 heads, 8 kv heads, head_dim 128, batch 1) over
    1k and 4k cached tokens, beside the device's copy bandwidth. Nothing asserted on speed."""
    copy = device_copy_bandwidth(cuda, device)
    heads, kv_heads, head_dim = 16, 8, 128
    cache_dtype = DTYPES[cache]
    rows = []
    for cached in (1024, 4096):
        rng = np.random.default_rng(cached)
        f = attention_inputs(rng, batch=1, seq_len=1, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                             capacity=cached + 1, valid=[cached + 1], prompt=False, dtype=np.float16,
                             cache_dtype=cache_dtype)
        args = {name: device.put(value) for name, value in f.items()}
        out = device.empty(f["q"].shape, f["q"].dtype)
        workspace_size = kernels.qwen3vl_attention_workspace_size(1, heads, head_dim)
        workspace = device.empty((workspace_size,), np.uint8, fill=None)

        def run():
            cuda.check(kernels.qwen3vl_attention(
                args["q"].ptr, args["k"].ptr, args["v"].ptr, args["q_norm_weight"].ptr, args["k_norm_weight"].ptr,
                args["cos"].ptr, args["sin"].ptr, args["past_key"].ptr, args["past_value"].ptr,
                args["seqlens_k"].ptr, args["total_sequence_length"].ptr, out.ptr, args["past_key"].ptr,
                args["past_value"].ptr, 1, 1, heads, kv_heads, head_dim, cached + 1, head_dim**-0.5, EPSILON,
                CODES[np.float16], CODES[cache_dtype], 0, workspace.ptr, workspace_size, None))

        ms = cuda.time_ms(run, 200)
        kv_bytes = 2 * (cached + 1) * kv_heads * head_dim * np.dtype(cache_dtype).itemsize
        gbs = kv_bytes / ms / 1e6
        splits = kernels.qwen3vl_attention_decode_splits(1, kv_heads, cached + 1)
        rows.append(f"{cache} cache {cached:5} cached tokens {splits:3} splits {ms * 1e3:8.1f} us {gbs:8.1f} GB/s "
                    f"{100 * gbs / copy:5.1f}% of copy")
    major, minor = cuda.compute_capability()
    with capsys.disabled():
        print(f"\ndecode attention (16 heads, 8 kv heads, D 128, batch 1), KV bytes read per call; SM {major}.{minor}, "
              f"device-to-device cudaMemcpy {copy:.0f} GB/s")
        print("\n".join(rows))


# -- the vision attention --------------------------------------------------------------------------

def ort_vision_attention(q, k, v, index, mask, slot, heads, head_dim):
    """The ORT-target graph of model_src/vision.py for one block, on ONNX Runtime CPU."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    elem = TensorProto.FLOAT if q.dtype == np.float32 else TensorProto.FLOAT16
    frames, longest = index.shape
    nodes = [
        helper.make_node("Reshape", ["index", "flat"], ["index_flat"]),
        helper.make_node("Where", ["mask", "zero", "lowest"], ["bias2"]),
        helper.make_node("Unsqueeze", ["bias2", "axes12"], ["bias"]),
    ]
    for name, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        nodes += [helper.make_node("Gather", [name, "index_flat"], [f"{name}_g"], axis=0),
                  helper.make_node("Reshape", [f"{name}_g", "per_frame"], [f"{name}_f"]),
                  helper.make_node("Transpose", [f"{name}_f"], [f"{name}_t"], perm=perm)]
    nodes += [
        helper.make_node("MatMul", ["q_t", "k_t"], ["scores0"]),
        helper.make_node("Cast", ["scores0"], ["scores32"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["scores32", "scale"], ["scores1"]),
        helper.make_node("Add", ["scores1", "bias"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["probs32"], axis=-1),
        helper.make_node("Cast", ["probs32"], ["probs"], to=elem),
        helper.make_node("MatMul", ["probs", "v_t"], ["context"]),
        helper.make_node("Transpose", ["context"], ["context_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["context_t", "slots"], ["per_slot"]),
        helper.make_node("Gather", ["per_slot", "slot"], ["output"], axis=0),
    ]
    inits = [numpy_helper.from_array(a, n) for n, a in (
        ("flat", np.array([-1], np.int64)), ("per_frame", np.array([frames, longest, heads, head_dim], np.int64)),
        ("slots", np.array([frames * longest, heads * head_dim], np.int64)), ("axes12", np.array([1, 2], np.int64)),
        ("zero", np.array(0.0, np.float32)), ("lowest", np.array(np.finfo(np.float32).min, np.float32)),
        ("scale", np.array(head_dim**-0.5, np.float32)))]
    graph = helper.make_graph(
        nodes, "vision_attention",
        [helper.make_tensor_value_info(n, elem, None) for n in ("q", "k", "v")]
        + [helper.make_tensor_value_info("index", TensorProto.INT64, None),
           helper.make_tensor_value_info("mask", TensorProto.BOOL, None),
           helper.make_tensor_value_info("slot", TensorProto.INT64, None)],
        [helper.make_tensor_value_info("output", elem, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, dict(q=q, k=k, v=v, index=index, mask=mask, slot=slot))[0]


def run_vision(kernels, device, q, k, v, index, mask, heads, head_dim, index_dtype):
    """mask None: no mask pointer, as the TensorRT plugin calls it (padding slots by index alone)."""
    frames, longest = index.shape
    args = [device.put(a) for a in (q, k, v, index.astype(index_dtype))]
    mask_ptr = None if mask is None else device.put(mask.astype(np.uint8))
    out = device.empty(q.shape, q.dtype)  # filled with NaN bytes: every row must be written
    status = kernels.qwen3vl_vision_attention(
        *(a.ptr for a in args), None if mask_ptr is None else mask_ptr.ptr, out.ptr, q.shape[0], frames, longest,
        heads, head_dim, head_dim**-0.5, CODES[q.dtype.type], np.dtype(index_dtype).itemsize * 8, None)
    check(device.cuda, status, "qwen3vl_vision_attention")
    return out.numpy()


@pytest.mark.parametrize("index_dtype", [np.int64, np.int32], ids=["int64", "int32"])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize(*per_backend(
    "grids", cuda={"4-37-256-1024": [[1, 2, 2], [1, 1, 37], [1, 16, 16], [1, 32, 32]]},
    emulated={"4-37-64-130": [[1, 2, 2], [1, 1, 37], [1, 8, 8], [1, 10, 13]]}))
def test_vision_frames_of_different_lengths_match_reference_and_onnxruntime(kernels, device, grids, head_dim, dtype,
                                                                            index_dtype):
    """Frames of different lengths (on a GPU 4, 37, 256 and 1024 patches), 16 heads: block-diagonal,
    nothing across frames."""
    dtype = DTYPES[dtype]
    heads = 16
    grids = np.array(grids)
    index, mask, slot = frame_layout(grids)
    patches = int(mask.sum())
    rng = np.random.default_rng(head_dim)
    q, k, v = (rng.standard_normal((patches, heads * head_dim)).astype(dtype) for _ in range(3))
    got = run_vision(kernels, device, q, k, v, index, mask, heads, head_dim, index_dtype)
    want = vision_attention(q, k, v, index, mask, slot, heads, head_dim, head_dim**-0.5)
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), atol=tol, rtol=tol)
    ort_tol = ORT_TOLERANCE[dtype]
    want_ort = ort_vision_attention(q, k, v, index, mask, slot, heads, head_dim)
    np.testing.assert_allclose(got.astype(np.float32), want_ort.astype(np.float32), atol=ort_tol, rtol=ort_tol)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize(*per_backend(
    "grids", cuda={"4-37-256-1024": [[1, 2, 2], [1, 1, 37], [1, 16, 16], [1, 32, 32]]},
    emulated={"4-37-130": [[1, 2, 2], [1, 1, 37], [1, 10, 13]]}))
def test_vision_without_a_mask_takes_padding_from_the_index(kernels, device, grids, dtype):
    """The TensorRT plugin's call: no mask (TensorRT 8.6 plugins take no bool input), int32 indices
    with -1 in the padding slots (the graph's Where(mask, index, -1)); the same result as with the mask."""
    dtype = DTYPES[dtype]
    heads, head_dim = 16, 64
    index, mask, slot = frame_layout(np.array(grids))
    marked = np.where(mask, index, -1).astype(np.int32)
    patches = int(mask.sum())
    rng = np.random.default_rng(17)
    q, k, v = (rng.standard_normal((patches, heads * head_dim)).astype(dtype) for _ in range(3))
    got = run_vision(kernels, device, q, k, v, marked, None, heads, head_dim, np.int32)
    want = vision_attention(q, k, v, index, mask, slot, heads, head_dim, head_dim**-0.5)
    np.testing.assert_array_equal(want, vision_attention(q, k, v, marked, None, slot, heads, head_dim,
                                                         head_dim**-0.5))  # the plugin's reference agrees
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), atol=tol, rtol=tol)
    with_mask = run_vision(kernels, device, q, k, v, index, mask, heads, head_dim, np.int32)
    np.testing.assert_array_equal(got, with_mask)


@pytest.mark.parametrize("backend", BOTH)
def test_vision_video_frames_stay_apart(kernels, device):
    """A video of 3 frames of 64 patches beside an image of 100: each frame attends only to itself."""
    heads, head_dim = 16, 64
    index, mask, slot = frame_layout(np.array([[3, 8, 8], [1, 10, 10]]))
    patches = int(mask.sum())
    rng = np.random.default_rng(11)
    q, k, v = (rng.standard_normal((patches, heads * head_dim)).astype(np.float32) for _ in range(3))
    got = run_vision(kernels, device, q, k, v, index, mask, heads, head_dim, np.int64)
    np.testing.assert_allclose(got, vision_attention(q, k, v, index, mask, slot, heads, head_dim, head_dim**-0.5),
                               atol=1e-4, rtol=1e-4)
    # Frame 0 alone gives frame 0's rows: nothing leaked in from the others.
    alone = vision_attention(q[:64], k[:64], v[:64], index[:1, :64], mask[:1, :64], slot[:64], heads, head_dim,
                             head_dim**-0.5)
    np.testing.assert_allclose(got[:64], alone, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BOTH)
def test_vision_index_out_of_range_is_padding(kernels, device):
    """A slot whose index is outside [0, N) (TensorRT's timing runs feed arbitrary data) is read and
    written as padding: no fault, the other patches as if the slot were masked out."""
    heads, head_dim = 16, 64
    index, mask, slot = frame_layout(np.array([[1, 6, 6], [1, 5, 5]]))
    patches = int(mask.sum())
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((patches, heads * head_dim)).astype(np.float32) for _ in range(3))
    broken = index.copy()
    broken[0, 3], broken[1, 7] = patches + 1000, -7  # rows 3 and 36 + 7 lose their slots
    got = run_vision(kernels, device, q, k, v, broken, mask, heads, head_dim, np.int32)
    without = mask.copy()
    without[0, 3] = without[1, 7] = False
    want = vision_attention(q, k, v, index, without, slot, heads, head_dim, head_dim**-0.5)
    kept = np.setdiff1d(np.arange(patches), [3, 36 + 7])
    np.testing.assert_allclose(got[kept], want[kept], atol=1e-4, rtol=1e-4)
    assert np.isnan(got[[3, 36 + 7]]).all()  # never written

