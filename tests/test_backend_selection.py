"""`--backend auto`: TensorRT -> ONNX Runtime CUDA -> ONNX Runtime CPU, decided over stated
environments (no GPU or TensorRT is needed here), one line per fallback saying why; the real probe
and the command line on this machine."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest

from conftest import random_image
from runtime.backends import select_backend
from runtime.engine_manifest import load_manifest
from runtime.environment import (Environment, Gpu, choose_backend, parse_nvidia_smi, parse_version,
                                 probe_environment)
from runtime.errors import Qwen3VLError

MX250 = Gpu("NVIDIA GeForce MX250", (6, 1), 2 << 30, sm_count=3)
RTX = Gpu("NVIDIA GeForce RTX 4060 Laptop GPU", (8, 9), 8 << 30, sm_count=24)
CPU_ONLY = ("CPUExecutionProvider",)
WITH_CUDA = ("CUDAExecutionProvider", "CPUExecutionProvider")
# A Pascal laptop where everything for TensorRT is in place.
READY = Environment(gpu=MX250, tensorrt_version="8.6.1", plugin_library="/opt/q/libqwen3vl_plugins.so",
                    trt_graphs=True, plans_present=False, trt_backend_present=True, onnxruntime_providers=CPU_ONLY)


def test_a_ready_pascal_laptop_gets_tensorrt():
    choice = choose_backend(READY)
    assert choice.backend == "trt" and choice.fallbacks == []
    assert choose_backend(replace(READY, trt_graphs=False, plans_present=True)).backend == "trt"


def test_no_gpu_falls_back_to_the_cpu_saying_so_for_each_step():
    choice = choose_backend(Environment(onnxruntime_providers=WITH_CUDA))
    assert choice.backend == "ort-cpu" and choice.providers == ["CPUExecutionProvider"]
    assert choice.fallbacks == ["tensorrt skipped: no NVIDIA GPU found",
                                "onnxruntime-cuda skipped: no NVIDIA GPU found"]


@pytest.mark.parametrize("change, reason", [
    (dict(tensorrt_version="10.13.3.9"), "SM 6.1 needs TensorRT 8.6, found 10.13.3.9"),
    (dict(tensorrt_version="8.5.3.1"), "SM 6.1 needs TensorRT 8.6, found 8.5.3.1"),
    (dict(tensorrt_version=None, tensorrt_problem="not installed"),
     "TensorRT is not importable (not installed): install TensorRT 8.6"),
    (dict(plugin_library=None), "no plugin library (libqwen3vl_plugins.so): run `make plugins`"),
    (dict(trt_graphs=False), "rebuild it with `qwen3vl build --backend trt`"),
    (dict(trt_backend_present=False), "no TensorRT runtime backend (runtime/trt_backend.py)"),
])
def test_each_missing_piece_of_tensorrt_is_named(change, reason):
    choice = choose_backend(replace(READY, **change))
    assert choice.backend == "ort-cpu" and len(choice.fallbacks) == 2
    assert choice.fallbacks[0].startswith("tensorrt skipped: ") and reason in choice.fallbacks[0]
    assert choice.fallbacks[1] == ("onnxruntime-cuda skipped: ONNX Runtime has no CUDAExecutionProvider "
                                   "(install onnxruntime-gpu in place of onnxruntime)")


def test_onnx_runtime_cuda_is_second():
    choice = choose_backend(replace(READY, tensorrt_version="10.13.3.9", onnxruntime_providers=WITH_CUDA))
    assert choice.backend == "ort-cuda" and choice.providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choice.fallbacks == ["tensorrt skipped: SM 6.1 needs TensorRT 8.6, found 10.13.3.9"]


def test_newer_gpus_take_newer_tensorrt_but_not_older_than_8_6():
    assert choose_backend(replace(READY, gpu=RTX, tensorrt_version="10.13.3.9")).backend == "trt"
    old = choose_backend(replace(READY, gpu=RTX, tensorrt_version="8.5.3.1"))
    assert old.fallbacks[0] == "tensorrt skipped: TensorRT 8.5.3.1 is older than 8.6, which the plugins need"


def test_an_engine_too_large_for_the_gpu_skips_both_gpu_backends():
    problem = "the engine does not fit this GPU: does not fit: needs 6.80 GiB at 2048 tokens"
    choice = choose_backend(replace(READY, onnxruntime_providers=WITH_CUDA, gpu_fit_problem=problem))
    assert choice.backend == "ort-cpu"
    assert choice.fallbacks == [f"tensorrt skipped: {problem}", f"onnxruntime-cuda skipped: {problem}"]


def test_probe_parsers():
    gpu = parse_nvidia_smi("NVIDIA GeForce MX250, 6.1, 2048, 1990\n")
    assert gpu == Gpu("NVIDIA GeForce MX250", (6, 1), 2048 << 20, 1990 << 20) and gpu.sm == "6.1"
    assert parse_nvidia_smi("garbage") is None
    assert parse_version("10.13.3.9.post1") == (10, 13, 3, 9) and parse_version("8.6.1") == (8, 6, 1)


def test_a_chosen_backend_that_fails_to_open_is_one_more_fallback(tiny_engine, monkeypatch):
    """TensorRT and CUDA claimed present but not really here: each fails to open, is reported, and the
    CPU answers. The TensorRT backend module is hidden, as on an installation without it."""
    engine = tiny_engine("gqa2-tied", backend="trt")
    manifest = load_manifest(engine)
    monkeypatch.setitem(sys.modules, "runtime.trt_backend", None)
    selection = select_backend("auto", engine, manifest, env=replace(READY, onnxruntime_providers=WITH_CUDA))
    assert selection.backend.name == "onnxruntime-cpu"
    assert selection.fallbacks[0] == ("tensorrt skipped: failed to open (this installation has no TensorRT "
                                      "runtime backend (runtime/trt_backend.py))")
    assert selection.fallbacks[1].startswith("onnxruntime-cuda skipped: failed to open (ONNX Runtime ")
    assert "CUDAExecutionProvider" in selection.fallbacks[1]
    assert selection.to_dict() == {"requested": "auto", "backend": "onnxruntime-cpu", "fallbacks": selection.fallbacks}


def test_asking_for_tensorrt_where_it_cannot_run_is_an_error(tiny_engine):
    engine = tiny_engine("gqa2-tied", backend="trt")
    with pytest.raises(Qwen3VLError, match="TensorRT cannot run here: SM 6.1 needs TensorRT 8.6, found 10.13"):
        select_backend("trt", engine, load_manifest(engine), env=replace(READY, tensorrt_version="10.13.3.9"))
    explicit = select_backend("ort", engine, load_manifest(engine), env=Environment())
    assert explicit.backend.name == "onnxruntime-cpu" and explicit.fallbacks == []


def test_the_real_probe_here(tiny_engine):
    engine = tiny_engine("gqa2-tied", backend="trt")
    env = probe_environment(engine, load_manifest(engine))
    assert env.trt_graphs and "CPUExecutionProvider" in env.onnxruntime_providers
    if env.gpu is not None:
        pytest.skip(f"this machine has a GPU ({env.gpu.name}): the no-GPU expectations below do not apply")
    assert env.tensorrt_version is None  # not imported without a GPU to run it on
    assert choose_backend(env).fallbacks[0] == "tensorrt skipped: no NVIDIA GPU found"


def test_the_command_line_reports_the_choice_and_the_reasons(tiny_engine, tmp_path):
    image = tmp_path / "im.png"
    random_image(64, 64, seed=8).save(image)
    engine = str(tiny_engine("gqa2-tied", backend="trt"))
    proc = subprocess.run([sys.executable, "-m", "commands", "run", "--engine", engine, "--image", str(image),
                           "--prompt", "Describe.", "--max-new-tokens", "3", "--greedy", "--json"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    body = json.loads(proc.stdout)
    lines = proc.stderr.strip().splitlines()
    assert lines[-1] == f"backend: {body['timings']['backend']} (auto)"
    assert lines[:-1] == [f"backend: {reason}" for reason in body["backend"]["fallbacks"]]
    assert body["backend"]["requested"] == "auto" and body["backend"]["chosen"] == body["timings"]["backend"]
    if "no NVIDIA GPU found" in proc.stderr:
        assert body["backend"]["chosen"] == "onnxruntime-cpu" and len(lines) == 3


def test_the_tensorrt_extra_resolves_only_to_what_runs_on_pascal():
    """TensorRT 8.6 (10.x refuses SM 6.x; its wheels stop at Python 3.11) and nothing from CUDA 13."""
    import tomllib
    from pathlib import Path

    from packaging.requirements import Requirement
    from packaging.version import Version

    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
    extra = {r.name: r for r in map(Requirement, project["optional-dependencies"]["tensorrt"])}
    trt = extra["tensorrt"]
    assert set(trt.specifier.filter(["8.5.3.1", "8.6.1", "8.6.1.post1", "10.0.1", "10.13.3.9", "11.4.0.106"])) == {
        "8.6.1", "8.6.1.post1"}
    assert trt.marker.evaluate({"python_version": "3.11"}) and not trt.marker.evaluate({"python_version": "3.12"})
    assert all(not r.specifier.contains(Version("13.0.0")) for r in extra.values())  # no CUDA 13 package
    assert extra["nvidia-cuda-runtime-cu12"].specifier.contains(Version("12.9.79"))
