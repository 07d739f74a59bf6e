"""Every backend behind the same Pipeline gives the same answers: ONNX Runtime, the TensorRT-target
graphs on the plugins' numpy references, and the PyTorch model; chunked prefill equals one call;
execution providers, sampling defaults and the manifest's token ids."""

from __future__ import annotations

import json

import pytest

from conftest import qwen3vl, random_image
from graph_passes.reference_backend import ReferenceBackend
from model_src.torch_backend import checkpoint_pipeline
from runtime import Pipeline
from runtime.backend import Backend, KVCache
from runtime.engine_manifest import EngineError, load_manifest
from runtime.ort_backend import OrtBackend

GREEDY = dict(do_sample=False, logprobs=5)


def assert_same_answers(a, b, logprob_tolerance: float):
    assert a.token_ids == b.token_ids
    for step_a, step_b in zip(a.logprobs, b.logprobs):
        assert step_a[0]["token_id"] == step_b[0]["token_id"]
        theirs = {entry["token_id"]: entry["logprob"] for entry in step_b}
        for entry in step_a:
            if entry["token_id"] in theirs:
                assert abs(entry["logprob"] - theirs[entry["token_id"]]) <= logprob_tolerance


@pytest.mark.parametrize("config_name", ["gqa2-tied", "gqa6-untied"])
def test_tensorrt_graphs_on_the_reference_backend_equal_onnx_runtime(tiny_engine, config_name):
    """The proof that the TensorRT graphs plus the runtime's host logic are right before a GPU sees them."""
    engine = tiny_engine(config_name, backend="trt")
    manifest = load_manifest(engine)
    reference = Pipeline(engine, manifest, ReferenceBackend(engine, manifest))
    ort = Pipeline.load(engine, backend="ort")
    # The third row is over 64 tokens (onnx.reference's own GatherElements stops at 64).
    prompts = ["Describe this image.", "Hi", " ".join(["Tell me everything about the harbour at dawn."] * 8)]
    images = [[random_image(64, 96, seed=1)], [], []]
    assert reference.prepare(prompts, images).longest > 64
    got = reference.generate(prompts, images=images, max_new_tokens=8, **GREEDY)
    expected = ort.generate(prompts, images=images, max_new_tokens=8, **GREEDY)
    for a, b in zip(got, expected):
        assert_same_answers(a, b, 1e-3)


def test_reference_backend_refuses_an_engine_without_tensorrt_graphs(tiny_engine):
    engine = tiny_engine("gqa2-tied")
    with pytest.raises(EngineError, match="--backend trt"):
        ReferenceBackend(engine, load_manifest(engine))


def test_torch_backend_equals_onnx_runtime(tiny_checkpoints, tiny_engine):
    torch_pipe = checkpoint_pipeline(tiny_checkpoints["gqa6-untied"])
    ort = Pipeline.load(tiny_engine("gqa6-untied"))
    image = [random_image(80, 64, seed=3)]
    got = torch_pipe.generate("What is this?", images=image, max_new_tokens=8, **GREEDY)
    expected = ort.generate("What is this?", images=image, max_new_tokens=8, **GREEDY)
    assert_same_answers(got, expected, 1e-3)
    assert got.prompt_tokens == expected.prompt_tokens
    assert torch_pipe.manifest.model == ort.manifest.model


@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_chunked_prefill_gives_the_tokens_of_one_call(tiny_engine, chunk):
    """First chunk batched, the rest row by row over per-row views of the cache."""
    engine = tiny_engine("gqa6-untied")
    whole, chunked = Pipeline.load(engine), Pipeline.load(engine)
    chunked.prefill_chunk = chunk
    prompts = ["Describe this image in a few words.", "Hi", "Compare them."]
    images = [[random_image(64, 64, seed=4)], [], [random_image(32, 96, seed=5), random_image(64, 32, seed=6)]]
    for a, b in zip(chunked.generate(prompts, images=images, max_new_tokens=6, **GREEDY),
                    whole.generate(prompts, images=images, max_new_tokens=6, **GREEDY)):
        assert_same_answers(a, b, 1e-4)


def test_pipeline_takes_any_object_that_implements_the_backend(tiny_engine):
    engine = tiny_engine("gqa2-tied")
    manifest = load_manifest(engine)

    class Counting:
        """Delegates to ONNX Runtime and counts the calls that cross the boundary."""

        def __init__(self):
            self.inner = OrtBackend(engine, manifest)
            self.name, self.decoder_dtype, self.kv_dtype = "counting", self.inner.decoder_dtype, self.inner.kv_dtype
            self.calls = {"encode_images": 0, "new_cache": 0, "prefill": 0, "decode": 0}

        def __getattr__(self, name):
            def call(*args):
                self.calls[name] += 1
                return getattr(self.inner, name)(*args)
            return call

        def close(self):
            self.inner.close()

    backend = Counting()
    assert isinstance(backend.inner, Backend) and isinstance(backend.inner.new_cache(1, 4), KVCache)
    result = Pipeline(engine, manifest, backend).generate("Describe.", images=[random_image(64, 64, 1)],
                                                          max_new_tokens=4, do_sample=False)
    expected = Pipeline.load(engine).generate("Describe.", images=[random_image(64, 64, 1)], max_new_tokens=4,
                                              do_sample=False)
    assert result.token_ids == expected.token_ids and result.timings["backend"] == "counting"
    steps = len(result.token_ids) - 1
    assert backend.calls == {"encode_images": 1, "new_cache": 1, "prefill": 1, "decode": steps}


def test_onnx_runtime_providers_are_passed_through_and_a_missing_one_is_refused(tiny_engine):
    engine = tiny_engine("gqa2-tied")
    manifest = load_manifest(engine)
    backend = OrtBackend(engine, manifest, providers=["CPUExecutionProvider"])
    assert backend.decoder.get_providers() == ["CPUExecutionProvider"] and backend.name == "onnxruntime-cpu"
    with pytest.raises(EngineError, match="no NoSuchExecutionProvider here .*available: .*CPUExecutionProvider"):
        OrtBackend(engine, manifest, providers=["NoSuchExecutionProvider", "CPUExecutionProvider"])


def test_cli_backends_agree_and_auto_names_its_choice(tiny_checkpoints, tiny_engine, tmp_path):
    image = tmp_path / "im.png"
    random_image(64, 64, seed=8).save(image)
    common = ["--image", str(image), "--prompt", "Describe.", "--max-new-tokens", "5", "--greedy", "--json",
              "--logprobs", "2"]
    auto = qwen3vl("run", "--engine", str(tiny_engine("gqa2-tied", backend="trt")), *common)
    assert auto.returncode == 0, auto.stderr
    # One line per backend passed over (no GPU here: TensorRT, ONNX Runtime CUDA), then the choice.
    assert auto.stderr.strip().splitlines()[-1] == "backend: onnxruntime-cpu (auto)"
    answers = {"auto": json.loads(auto.stdout)}
    for name, source in (("reference", ["--engine", str(tiny_engine("gqa2-tied", backend="trt"))]),
                         ("torch", ["--checkpoint", str(tiny_checkpoints["gqa2-tied"])])):
        proc = qwen3vl("run", *source, "--backend", name, *common)
        assert proc.returncode == 0, proc.stderr
        answers[name] = json.loads(proc.stdout)
        assert answers[name]["timings"]["backend"] != answers["auto"]["timings"]["backend"]
    assert answers["auto"]["token_ids"] == answers["reference"]["token_ids"] == answers["torch"]["token_ids"]
    assert len(answers["torch"]["logprobs"]) == len(answers["torch"]["token_ids"])

    bad = qwen3vl("run", "--engine", str(tiny_engine("gqa2-tied")), "--backend", "ort",
                  "--providers", "NoSuchExecutionProvider", *common)
    assert bad.returncode == 1 and bad.stderr.startswith("error: ") and len(bad.stderr.splitlines()) == 1
    wrong = qwen3vl("run", "--engine", str(tiny_engine("gqa2-tied")), "--backend", "torch", *common)
    assert wrong.returncode == 1 and "--checkpoint" in wrong.stderr


def test_sampling_defaults_come_from_the_checkpoints_generation_config(tiny_checkpoints, tiny_engine):
    pipe = Pipeline.load(tiny_engine("gqa2-tied"))
    written = json.loads((tiny_checkpoints["gqa2-tied"] / "generation_config.json").read_text())
    assert pipe.manifest.generation_defaults == {k: written[k] for k in ("do_sample", "temperature", "top_p", "top_k")}
    default = pipe.sampling()
    assert (default.do_sample, default.temperature, default.top_p, default.top_k) == (
        written["do_sample"], written["temperature"], written["top_p"], written["top_k"])
    assert pipe.sampling(do_sample=False).do_sample is False
    assert pipe.sampling(temperature=0.3).temperature == 0.3
    # Sampled by default: two unseeded-equal seeds agree, and the default differs from greedy somewhere.
    a = pipe.generate("Tell me a story.", max_new_tokens=12, seed=1)
    assert a.token_ids == pipe.generate("Tell me a story.", max_new_tokens=12, seed=1).token_ids
    samples = {tuple(pipe.generate("Tell me a story.", max_new_tokens=12, seed=s).token_ids) for s in range(4)}
    assert len(samples) > 1


def test_manifest_records_the_pad_id_and_refuses_the_previous_format(tiny_engine, tmp_path):
    import shutil

    engine = tiny_engine("gqa2-tied")
    raw = json.loads((engine / "manifest.json").read_text())
    assert raw["format_version"] == 2 and raw["model"]["pad_token_id"] == 151643
    old = tmp_path / "old"
    shutil.copytree(engine, old)
    raw["format_version"] = 1
    del raw["model"]["pad_token_id"]
    (old / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(EngineError, match="incompatible version.*rebuild"):
        load_manifest(old)


def test_streamed_text_is_decoded_once_per_token_and_holds_back_split_characters(tiny_engine):
    pipe = Pipeline.load(tiny_engine("gqa2-tied"))
    text = "naïve café 東京 🙂 done"
    ids = pipe.prompts.tokenizer.encode(text, add_special_tokens=False).ids
    stream = pipe.prompts.text_stream()
    pieces = [stream.step(i) for i in ids]
    assert "".join(pieces) == pipe.prompts.decode(ids) == text
    assert all("\ufffd" not in piece for piece in pieces)
    assert "" in pieces  # some token ends inside a multi-byte character: nothing shown yet
