"""Per-tensor precision in `qwen3vl build`: the 8-bit head of int4 builds and --head-bits, the
manifest's per-weight records, --keep-sensitive choosing the linears whose quantization moves the
output most (checked on a checkpoint where one linear is made sensitive on purpose), and the
one-line refusals. That mixed engines compute what their dequantized weights say is
tests/test_quantized_vs_dequantized.py; that the TensorRT-target graphs keep each weight's format,
tests/test_trt_target.py."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from conftest import assert_one_line_error, qwen3vl
from export.sensitivity import linear_sensitivities, most_sensitive
from graph_passes.quantize_weights import WeightFormat
from runtime.engine_manifest import load_manifest

HEAD = "language_model.embed_tokens.weight"
# The linear made sensitive on purpose: not in the first layer, whose attention is the most sensitive
# part of the untouched tiny checkpoint.
BOOSTED = "language_model.layers.2.mlp.up_proj.weight"


def decoder_records(engine) -> dict[str, dict]:
    return load_manifest(engine).quantization["tensors"]["decoder"]


def test_int4_default_places_every_weight_within_4_5_bits_per_weight(tiny_checkpoints, tiny_engine):
    """The int4 default is a weight budget of 4.5 bits per weight over the linears and the lm_head,
    placed by measured sensitivity: the engine reads what the plan says, within the budget."""
    from bench.bandwidth import decoder_weight_bytes
    from export.precision_allocation import budget_bytes, other_bytes_per_token
    from model_src.config import load_config

    engine = tiny_engine("gqa2-tied", precision="int4")
    manifest = load_manifest(engine)
    text = load_config(tiny_checkpoints["gqa2-tied"]).text
    budget = budget_bytes("4.5bpw", text, other_bytes_per_token(text, None, "int8"), head_placed=True)
    plan = manifest.quantization["budget"]
    assert plan["bytes_per_token"] == budget and plan["requested"] == "4.5bpw"
    assert decoder_weight_bytes(engine, manifest) == plan["planned_bytes_per_token"] <= budget
    records = decoder_records(engine)
    assert len(records) == 7 * 4 + 1 and {r["reason"] for r in records.values()} <= {"budget", "default"}
    assert len(manifest.quantization["sensitivity"]["kl"]) == 7 * 4 + 1  # the head measured too


def test_the_default_budget_never_refuses_a_layout_whose_smallest_formats_exceed_it(tiny_checkpoints, tmp_path):
    """Asymmetric 4-bit blocks on the tiny model's short rows (blocks padded to K) need more than 4.5
    bits per weight in every format: the default then takes the cheapest layout; an explicit 4.5bpw
    is refused."""
    from export.build_engine import build_engine
    from runtime.errors import Qwen3VLError

    checkpoint = tiny_checkpoints["gqa2-tied"]
    build_engine(checkpoint, tmp_path / "asym", precision="int4", symmetric=False)
    plan = load_manifest(tmp_path / "asym").quantization["budget"]
    assert plan["requested"] == "4.5bpw" and plan["planned_bytes_per_token"] == plan["bytes_per_token"]
    with pytest.raises(Qwen3VLError, match="in 4-bit blocks of 128"):
        build_engine(checkpoint, tmp_path / "refused", precision="int4", symmetric=False, weight_budget="4.5bpw")


def test_int4_uniform_keeps_the_tied_head_at_8_bits_and_records_every_weight(tiny_engine):
    engine = tiny_engine("gqa2-tied", precision="int4", weight_budget=None)
    manifest = load_manifest(engine)
    assert manifest.quantization["default"] == {"bits": 4, "block_size": 64, "symmetric": True,
                                                "scale_search": "clip"}
    records = decoder_records(engine)
    assert len(records) == 7 * 4 + 1
    assert records[HEAD]["bits"] == 8 and records[HEAD]["reason"] == "head"
    others = [r for name, r in records.items() if name != HEAD]
    assert {(r["bits"], r["reason"], r["scale_search"]) for r in others} == {(4, "default", "clip")}
    # Bytes: codes, scales (fp32, one per block) and no zero points (symmetric).
    for record in records.values():
        n, k = record["shape"]
        blocks = -(-k // record["block_size"])
        assert record["bytes"] == n * blocks * (record["block_size"] * record["bits"] // 8 + 4)
    assert "sensitivity" not in manifest.quantization


def test_head_bits_4_and_untied_heads(tiny_engine):
    records = decoder_records(tiny_engine("gqa2-tied", precision="int4", head_bits=4, weight_budget=None))
    assert {(r["bits"], r["reason"]) for r in records.values()} == {(4, "default")}
    untied = decoder_records(tiny_engine("gqa6-untied", precision="int4", weight_budget=None))
    # An untied lm_head is the head; its embedding is a table read one row per token, 8 bits too.
    assert untied["lm_head.weight"]["bits"] == 8 and untied["lm_head.weight"]["reason"] == "head"
    assert untied[HEAD]["reason"] == "head"
    int8 = decoder_records(tiny_engine("gqa2-tied", precision="int8"))
    assert {(r["bits"], r["reason"]) for r in int8.values()} == {(8, "default")}


def test_fp32_engines_have_no_quantization_record(tiny_engine):
    assert load_manifest(tiny_engine("gqa2-tied")).quantization is None


@pytest.fixture(scope="module")
def boosted_checkpoint(tiny_checkpoints, tmp_path_factory):
    """The tiny checkpoint with one linear that 4 bits cannot hold and that computes what it did: the
    norm before layer 2's MLP zeroes every 16th input channel, and up_proj's weights on those
    channels become outliers of 40 standard deviations. The function is unchanged (they multiply
    zeros), but each block's scale now follows its outlier: at 4 bits (steps of ~5 sigma) nearly
    every other weight rounds to zero; at 8 bits (~0.3 sigma) they survive."""
    out = tmp_path_factory.mktemp("boosted") / "checkpoint"
    shutil.copytree(tiny_checkpoints["gqa2-tied"], out)
    tensors = load_file(str(out / "model.safetensors"))
    weight, norm = f"model.{BOOSTED}", "model.language_model.layers.2.post_attention_layernorm.weight"
    w, gain = tensors[weight].float(), tensors[norm].float()
    w[:, ::16] = 40 * w.std()
    gain[::16] = 0
    tensors[weight], tensors[norm] = w.to(tensors[weight].dtype), gain.to(tensors[norm].dtype)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_sensitivity_ranks_the_boosted_linear_first(tiny_checkpoints, boosted_checkpoint):
    form = WeightFormat(4, 32, True, "clip")
    plain = linear_sensitivities(tiny_checkpoints["gqa2-tied"], form)
    boosted = linear_sensitivities(boosted_checkpoint, form)
    assert len(plain) == len(boosted) == 7 * 4 and all(value >= 0 for value in plain.values())
    assert most_sensitive(plain, 1) != [BOOSTED]
    assert most_sensitive(boosted, 1) == [BOOSTED]
    assert boosted[BOOSTED] > 5 * max(value for name, value in boosted.items() if name != BOOSTED)
    # The model computes what it did (the outliers multiply zeros): the other linears' sensitivities
    # are the same as in the plain checkpoint.
    for name in ("language_model.layers.0.self_attn.v_proj.weight", "language_model.layers.3.mlp.down_proj.weight"):
        assert boosted[name] == pytest.approx(plain[name], rel=2e-2)  # (measured: within 0.5%)
    # At 8 bits the outliers leave the other weights a fine grid.
    eight = linear_sensitivities(boosted_checkpoint, WeightFormat(8, 32, True, "clip"))
    assert eight[BOOSTED] < boosted[BOOSTED] / 20


def test_keep_sensitive_keeps_the_boosted_linear_at_8_bits_and_logs_why(boosted_checkpoint, tmp_path):
    result = qwen3vl("build", "--checkpoint", str(boosted_checkpoint), "--out", str(tmp_path / "engine"),
                     "--precision", "int4", "--block-size", "32", "--keep-sensitive", "2")
    assert result.returncode == 0, result.stderr
    assert "sensitivity: layer 3 done (28/28 linears" in result.stderr
    assert "kept at 8 bits: layers.2.mlp.up_proj" in result.stderr
    quantization = load_manifest(tmp_path / "engine").quantization
    sensitivity = quantization["sensitivity"]
    assert sensitivity["kept"][0] == BOOSTED and len(sensitivity["kept"]) == 2
    assert set(sensitivity["kl"]) == {f"language_model.layers.{i}.{linear}.weight" for i in range(4)
                                      for linear in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                     "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                     "mlp.down_proj")}
    records = quantization["tensors"]["decoder"]
    kept = {name for name, r in records.items() if r["reason"] == "sensitive"}
    assert kept == set(sensitivity["kept"]) and all(records[name]["bits"] == 8 for name in kept)
    # The manifest keeps what the build measured, readable as JSON by tools.
    raw = json.loads((tmp_path / "engine" / "manifest.json").read_text())
    assert raw["quantization"]["sensitivity"]["kept"] == sensitivity["kept"]


def _budget_build(checkpoint, out, budget, *options):
    result = qwen3vl("build", "--checkpoint", str(checkpoint), "--out", str(out), "--precision", "int4",
                     "--weight-budget", str(budget), *options)
    assert result.returncode == 0, result.stderr
    assert "format errors: " in result.stderr and "weight budget: " in result.stderr
    return result, load_manifest(out)


def test_weight_budget_gives_the_boosted_linear_8_bits_and_fits(boosted_checkpoint, tmp_path):
    """With the head fixed at 8 bits, a budget of every linear in 4-bit blocks of 128 plus the boosted
    linear's step to 8 bits: the boosted one gets 8 bits, and the engine reads what the build planned,
    within the budget."""
    from bench.bandwidth import decoder_weight_bytes
    from export.precision_allocation import candidate_formats, linear_shapes, other_bytes_per_token, stored_bytes
    from export.quantization_plan import body_format, head_format
    from model_src.config import load_config

    text = load_config(boosted_checkpoint).text
    body = body_format("int4", 64, True, "clip")
    cheapest, eight = candidate_formats(body)[0], candidate_formats(body)[-1]
    shapes = linear_shapes(text)
    assert shapes["mlp.down_proj"] == (text.hidden_size, text.intermediate_size)
    linears = text.num_hidden_layers * sum(stored_bytes(shape, cheapest) for shape in shapes.values())
    boost = stored_bytes(shapes["mlp.up_proj"], eight) - stored_bytes(shapes["mlp.up_proj"], cheapest)
    head = stored_bytes((text.vocab_size, text.hidden_size), head_format("int4", body, 8))
    norms = 4 * (text.num_hidden_layers * 2 * (text.hidden_size + text.head_dim) + text.hidden_size)
    # The int4 default stores the KV cache in int8: its scales, one per KV channel per layer, are read too.
    scales = 4 * text.num_hidden_layers * 2 * text.num_key_value_heads * text.head_dim
    assert other_bytes_per_token(text, head_format("int4", body, 8), "int8") == head + norms + scales
    budget = head + norms + scales + linears + boost
    result, manifest = _budget_build(boosted_checkpoint, tmp_path / "engine", budget, "--head-bits", "8")
    assert "format errors: 28/28 weights" in result.stderr and "the lm_head" not in result.stderr
    records = manifest.quantization["tensors"]["decoder"]
    assert records[BOOSTED]["bits"] == 8 and records[BOOSTED]["reason"] == "budget"
    assert records[HEAD]["reason"] == "head" and HEAD not in manifest.quantization["sensitivity"]["kl"]
    assert {r["bits"] for name, r in records.items() if name not in (BOOSTED, HEAD)} == {4}
    plan = manifest.quantization["budget"]
    assert plan["planned_bytes_per_token"] <= budget
    assert decoder_weight_bytes(tmp_path / "engine", manifest) == plan["planned_bytes_per_token"]
    # What the plan counted per linear is what the quantizer stored.
    assert sum(r["bytes"] for r in records.values()) == plan["planned_bytes_per_token"] - norms - scales


def test_weight_budget_places_the_head_unless_head_bits_is_given(tiny_checkpoints, tmp_path):
    """Without --head-bits the tied table is one more weight to place: measured, given a format by the
    allocation, counted in the plan. A budget of everything in 4-bit blocks of 128 leaves it there."""
    from bench.bandwidth import decoder_weight_bytes
    from export.precision_allocation import other_bytes_per_token, smallest_bytes_per_token
    from export.quantization_plan import body_format
    from model_src.config import load_config

    checkpoint = tiny_checkpoints["gqa2-tied"]
    text, body = load_config(checkpoint).text, body_format("int4", 64, True, "clip")
    least = other_bytes_per_token(text, None, "int8") + smallest_bytes_per_token(text, body, head_placed=True)
    result, manifest = _budget_build(checkpoint, tmp_path / "least", least)
    assert "sensitivity: the lm_head (tied) KL" in result.stderr and "format errors: 29/29 weights" in result.stderr
    assert "; the lm_head int4:b" in result.stderr
    records = manifest.quantization["tensors"]["decoder"]
    assert manifest.quantization["sensitivity"]["kl"][HEAD] > 0
    assert records[HEAD]["reason"] == "budget" and records[HEAD]["bits"] == 4
    assert decoder_weight_bytes(tmp_path / "least", manifest) == manifest.quantization["budget"][
        "planned_bytes_per_token"] == least
    refused = qwen3vl("build", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "under"), "--precision", "int4",
                      "--weight-budget", str(least - 1))
    assert_one_line_error(refused, "--weight-budget", "and the lm_head", "4-bit blocks of 128")
    assert not (tmp_path / "under").exists()


def test_without_the_memory_to_measure_the_default_falls_back_and_explicit_requests_are_refused(
        tiny_checkpoints, tmp_path, monkeypatch):
    import export.build_engine as build
    from runtime.errors import Qwen3VLError

    monkeypatch.setattr(build, "available_memory_bytes", lambda: 1 << 20)
    checkpoint, lines = tiny_checkpoints["gqa2-tied"], []
    build.build_engine(checkpoint, tmp_path / "default", precision="int4", progress=lines.append)
    assert any(line.startswith("weight budget: skipped (measuring the decoder's sensitivities needs ~")
               for line in lines), lines
    quantization = load_manifest(tmp_path / "default").quantization
    assert "budget" not in quantization and "sensitivity" not in quantization
    assert quantization["tensors"]["decoder"][HEAD]["reason"] == "head"
    for options, alternative in (({"weight_budget": "4.5bpw"}, "--weight-budget none"),
                                 ({"keep_sensitive": 2}, "no --keep-sensitive")):
        with pytest.raises(Qwen3VLError, match=f"GiB is available: build on a machine with more memory, or with "
                                               f"{alternative}"):
            build.build_engine(checkpoint, tmp_path / "refused", precision="int4", **options)
        assert not (tmp_path / "refused").exists()


@pytest.mark.parametrize("arguments,fragments", [
    (["--precision", "int8", "--keep-sensitive", "2"], ["--keep-sensitive", "--precision int4"]),
    (["--precision", "fp32", "--head-bits", "8"], ["--head-bits", "fp32"]),
    (["--precision", "int4", "--keep-sensitive", "-1"], ["--keep-sensitive -1"]),
    (["--precision", "int4", "--scale-search", "mse"], ["--scale-search", "invalid choice"]),
    (["--precision", "fp32", "--weight-budget", "1GB"], ["--weight-budget", "fp32"]),
    (["--precision", "int4", "--weight-budget", "1GB", "--keep-sensitive", "2"], ["--keep-sensitive"]),
    (["--precision", "int4", "--weight-budget", "1MB"], ["--weight-budget 0.001 GB", "lm_head"]),
    (["--precision", "int4", "--weight-budget", "lots"], ["not a memory size"]),
    (["--precision", "int4", "--weight-budget", "0bpw"], ["--weight-budget '0bpw'", "4.5bpw"]),
    (["--precision", "int4", "--weight-budget", "fourbpw"], ["--weight-budget 'fourbpw'", "4.5bpw"]),
    (["--precision", "int4", "--weight-budget", "3bpw"], ["--weight-budget", "4-bit blocks of 128"]),
])
def test_bad_quantization_options_are_refused_in_one_line(tiny_checkpoints, tmp_path, arguments, fragments):
    result = qwen3vl("build", "--checkpoint", str(tiny_checkpoints["gqa2-tied"]), "--out", str(tmp_path / "e"),
                     *arguments)
    if "invalid choice" in fragments:  # argparse's own refusal
        assert result.returncode == 2 and all(f in result.stderr for f in fragments), result.stderr
        return
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "e").exists()


def test_memory_plan_counts_a_mixed_engines_parameters_from_its_records(tiny_checkpoints, tiny_engine):
    """The 8-bit head makes bytes / (int4 bytes per weight) overcount the weights ~1.7x on this tiny
    model; the plan counts them from the records instead (its estimates for other precisions use it)."""
    from model_src.config import load_config
    from model_src.model import Qwen3VL
    from runtime.memory_plan import EngineFacts
    import torch

    with torch.device("meta"):
        model = Qwen3VL(load_config(tiny_checkpoints["gqa2-tied"]))
    true = sum(p.numel() for p in model.language_model.parameters())
    facts = EngineFacts.from_manifest(load_manifest(tiny_engine("gqa2-tied", precision="int4")))
    assert facts.decoder_parameters == pytest.approx(true, rel=0.02)
    assert facts.rebuilt("fp32").decoder_weight_bytes == pytest.approx(4 * true, rel=0.02)
