"""`qwen3vl compare` on Polygraphy: ONNX Runtime against the TensorRT graphs on the plugins' numpy
references (no TensorRT here), on tiny engines built with --backend trt. The graphs agree; a graph
with one weight scaled fails with exit status 1 and the report names the first marked tensor that
diverges."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from commands import main
from runtime.engine_manifest import sha256_file, update_manifest

PERTURBED_WEIGHT = "language_model.layers.1.post_attention_layernorm.weight"  # feeds layer 1's MLP


def compare(capsys, *args: str) -> tuple[int, dict | str, str]:
    code = main(["compare", *args])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if "--json" in args else out), err


def parts(report: dict) -> dict:
    return {part["part"]: part for part in report["parts"]}


@pytest.mark.parametrize("config_name", ["gqa2-tied", "gqa6-untied"])
def test_onnx_runtime_and_the_tensorrt_graphs_agree(tiny_engine, capsys, config_name):
    engine = str(tiny_engine(config_name, backend="trt"))
    code, report, err = compare(capsys, "--engine", engine, "--json", "--mark-all")
    assert code == 0, report
    assert report["passed"] and report["runners"] == ["onnxruntime-cpu", "plugin-reference"]
    assert "against the plugins' numpy references" in err
    assert [p["part"] for p in report["parts"]] == ["vision", "prefill", "decode"]
    assert report["tolerances"] == {"atol": {"": 1e-3}, "rtol": {"": 1e-3}, "check_error_stat": "elemwise"}
    assert report["inputs"]["image_tokens"] > 0 and report["inputs"]["prompt_tokens"] > 64  # past 64: GatherElements
    by_part = parts(report)
    names = {part: [o["name"] for o in p["outputs"]] for part, p in by_part.items()}
    assert {"image_embeds", "deepstack_embeds", "/visual/blocks.0/Add_output_0"} <= set(names["vision"])
    assert {"logits", "present_key.0", "/language_model/layers.0/Add_1_output_0"} <= set(names["prefill"])
    assert names["decode"] == names["prefill"]
    # Reported in graph order, the marked residual stream between the layers' caches.
    assert names["prefill"].index("present_key.0") < names["prefill"].index("/language_model/layers.0/Add_output_0")
    assert names["prefill"][-1] == "logits"
    assert all(o["max_absdiff"] <= 1e-3 for p in report["parts"] for o in p["outputs"])


def perturb(engine, folder):
    """A copy of the engine whose TensorRT decoder graph has one RMSNorm weight scaled by 1.5 (the
    ONNX Runtime graph keeps the original: the two graphs share only the weight file)."""
    shutil.copytree(engine, folder)
    path = folder / "decoder.trt.onnx"
    model = onnx.load(str(path), load_external_data=False)
    for i, tensor in enumerate(model.graph.initializer):
        if tensor.name == PERTURBED_WEIGHT:
            value = numpy_helper.to_array(tensor, base_dir=str(folder))
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array((value * 1.5).astype(value.dtype),
                                                                        PERTURBED_WEIGHT))
            break
    else:
        raise AssertionError(f"{PERTURBED_WEIGHT} not in the graph")
    onnx.save(model, str(path))

    def edit(manifest):
        manifest["sizes"][path.name] = path.stat().st_size
        manifest["hashes"][path.name] = sha256_file(path)

    update_manifest(folder, edit)
    return folder


def test_a_scaled_weight_fails_and_the_first_diverging_marked_tensor_is_named(tiny_engine, capsys, tmp_path):
    engine = perturb(tiny_engine("gqa2-tied", backend="trt"), tmp_path / "perturbed")
    code, report, _ = compare(capsys, "--engine", str(engine), "--json", "--mark-all")
    assert code == 1 and not report["passed"]
    by_part = parts(report)
    assert by_part["vision"]["passed"] and by_part["vision"]["first_divergence"] is None
    for name in ("prefill", "decode"):
        part = by_part[name]
        assert not part["passed"]
        assert part["first_divergence"] == "/language_model/layers.1/Add_1_output_0"
        verdicts = {o["name"]: o["passed"] for o in part["outputs"]}
        # Everything before the scaled weight still agrees: layer 0, layer 1's attention and cache.
        assert verdicts["/language_model/layers.0/Add_1_output_0"] and verdicts["present_key.1"]
        assert verdicts["/language_model/layers.1/Add_output_0"]
        assert not verdicts["logits"]

    # Without marks the first divergence is the first graph output after it; in text, FAILED.
    code, text, _ = compare(capsys, "--engine", str(engine), "--part", "prefill")
    assert code == 1 and "prefill: FAILED, first divergence: present_key.2" in text
    assert text.rstrip().endswith("FAILED: outside tolerance")


def test_one_marked_tensor_and_per_output_tolerances(tiny_engine, capsys, tmp_path):
    engine = perturb(tiny_engine("gqa2-tied", backend="trt"), tmp_path / "perturbed")
    marked = "/language_model/layers.1/Add_1_output_0"
    code, report, _ = compare(capsys, "--engine", str(engine), "--json", "--part", "prefill", "--mark", marked,
                              "--atol", "1e3", "--atol", f"{marked}:1e-3", "--rtol", f"{marked}:1e-3")
    outputs = {o["name"]: o for o in parts(report)["prefill"]["outputs"]}
    assert code == 1 and parts(report)["prefill"]["first_divergence"] == marked
    assert outputs[marked]["marked"] and outputs[marked]["atol"] == 1e-3
    assert outputs["logits"]["passed"] and outputs["logits"]["atol"] == 1e3  # loose everywhere else


def test_an_int4_engine_passes_on_the_mean_error(tiny_engine, capsys):
    engine = str(tiny_engine("gqa2-tied", backend="trt", precision="int4"))
    code, report, _ = compare(capsys, "--engine", engine, "--json")
    assert code == 0 and report["tolerances"]["check_error_stat"] == "mean"
    decode = parts(report)["decode"]["outputs"]
    # One token: both sides quantize the same activations to int8 the same way.
    assert max(o["max_absdiff"] for o in decode) < 1e-4


def test_refusals_are_one_line(tiny_engine, capsys):
    code, _, err = compare(capsys, "--engine", str(tiny_engine("gqa2-tied")))
    assert code == 1 and err.strip() == (f"error: {tiny_engine('gqa2-tied')}: has no TensorRT graphs to compare "
                                         f"(build it with --backend trt)")
    engine = str(tiny_engine("gqa2-tied", backend="trt"))
    code, _, err = compare(capsys, "--engine", engine, "--mark", "no/such/tensor")
    assert code == 1 and err.strip().splitlines()[-1].startswith("error: --mark no/such/tensor: not a tensor both")
    code, _, err = compare(capsys, "--engine", engine, "--atol", "logits:lots")
    assert code == 1 and "error: tolerance 'logits:lots'" in err
    code, _, err = compare(capsys, "--engine", engine, "--against", "tensorrt")
    if "--against tensorrt" in err:  # where TensorRT cannot run: one line, no traceback
        assert code == 1 and err.strip().splitlines()[-1].startswith("error: --against tensorrt: ")


def test_int8_activation_rounding_matches_its_contract():
    from graph_passes.polygraphy_reference_runner import int8_activations

    a = np.array([[0.5, -1.0, 0.25, 0.0, 2.0, -2.0, 1.0, 3.0]], dtype=np.float32)
    got = int8_activations(a, 4)  # blocks [0.5, -1, 0.25, 0] (amax 1) and [2, -2, 1, 3] (amax 3)
    step1, step2 = np.float32(1 / 127), np.float32(3 / 127)
    expected = np.concatenate([np.rint(a[0, :4] / step1) * step1, np.rint(a[0, 4:] / step2) * step2])
    np.testing.assert_allclose(got[0], expected, rtol=1e-6)
    assert np.all(np.abs(got - a) <= np.array([step1] * 4 + [step2] * 4) / 2 + 1e-7)
