"""The runtime's edges: bad input gives a one-line error and a non-zero exit; odd images work."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from conftest import assert_one_line_error, qwen3vl
from model_src.synthetic_checkpoint import write_preset

MAX_CONTEXT = 256


@pytest.fixture(scope="module")
def engine(tiny_engine):
    return tiny_engine("gqa2-tied", max_context=MAX_CONTEXT)


def run_engine(engine, *args):
    return qwen3vl("run", "--engine", engine, "--prompt", "Describe this image.", "--max-new-tokens", 3, "--json",
                   *args)


def test_missing_image(engine, tmp_path):
    assert_one_line_error(run_engine(engine, "--image", tmp_path / "nope.png"), "nope.png")


def test_file_that_is_not_an_image(engine, tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("just text")
    assert_one_line_error(run_engine(engine, "--image", path), "notes.png")


def test_truncated_image(engine, tmp_path):
    path = tmp_path / "cut.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:2000])
    assert_one_line_error(run_engine(engine, "--image", path), "cut.jpg")


def test_aspect_ratio_over_200_is_refused(engine, tmp_path):
    path = tmp_path / "strip.png"
    Image.new("RGB", (402, 2), "red").save(path)
    assert_one_line_error(run_engine(engine, "--image", path), "aspect ratio")


def test_prompt_longer_than_the_engine_context(engine):
    result = qwen3vl("run", "--engine", engine, "--prompt", "word " * (MAX_CONTEXT + 10), "--json")
    assert_one_line_error(result, "context", str(MAX_CONTEXT))


def test_missing_engine(tmp_path):
    assert_one_line_error(qwen3vl("run", "--engine", tmp_path / "none", "--prompt", "hi"), "not found")


def test_incomplete_engine(engine, tmp_path):
    broken = shutil.copytree(engine, tmp_path / "broken")
    data = broken / "decoder.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    assert_one_line_error(run_engine(broken), "decoder.onnx.data", "incomplete")
    (broken / "manifest.json").unlink()
    assert_one_line_error(run_engine(broken), "manifest.json")


def test_engine_from_an_incompatible_version(engine, tmp_path):
    old = shutil.copytree(engine, tmp_path / "old")
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["format_version"] = 0
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert_one_line_error(run_engine(old), "incompatible", "rebuild")


def test_tiny_image_is_upscaled_to_the_minimum_budget(engine, tmp_path):
    path = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), "blue").save(path)
    result = run_engine(engine, "--image", path)
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["token_ids"]) == 3


def test_50_megapixel_image_is_resized_within_the_budget_with_bounded_memory(engine, tmp_path):
    path = tmp_path / "huge.jpg"
    rng = np.random.default_rng(1)
    small = rng.integers(0, 255, (100, 125, 3), dtype=np.uint8)
    Image.fromarray(small).resize((8165, 6124), Image.BILINEAR).save(path, quality=80)  # 50.0 MP
    script = textwrap.dedent(f"""
        import json
        from runtime import Pipeline
        result = Pipeline.load({str(engine)!r}).generate("Describe.", images=[{str(path)!r}], max_new_tokens=2,
                                                          do_sample=False)
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent (pytest).
        peak = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
        print(json.dumps({{"tokens": result.token_ids, "prompt": result.prompt_tokens,
                          "rss_mb": int(peak.split()[1]) / 1024}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert len(report["tokens"]) == 2
    # 50 MP of RGB is 150 MB decoded; everything after the resize is small.
    print("50 MP run:", report)
    assert report["rss_mb"] < 1200, report


def test_runtime_never_imports_torch_or_transformers(engine, tmp_path):
    image = tmp_path / "im.png"
    Image.new("RGB", (64, 48), "green").save(image)
    script = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers"):
                    raise ImportError(f"blocked import of {{name}}")
                return None
        sys.meta_path.insert(0, Block())
        from runtime import Pipeline
        pipe = Pipeline.load({str(engine)!r})
        result = pipe.generate("Describe this image.", images=[{str(image)!r}], max_new_tokens=4, do_sample=False)
        assert len(result.token_ids) == 4
        assert not any(m.split(".")[0] in ("torch", "transformers") for m in sys.modules)
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_build_refuses_a_folder_that_is_not_an_engine(tmp_path, engine):
    target = tmp_path / "precious"
    target.mkdir()
    (target / "data.txt").write_text("keep me")
    checkpoint = write_preset("tiny", tmp_path / "ck")
    assert_one_line_error(qwen3vl("build", "--checkpoint", checkpoint, "--out", target), "not an engine folder")
    assert (target / "data.txt").read_text() == "keep me"


def test_build_from_a_broken_checkpoint_leaves_nothing_behind(tmp_path):
    checkpoint = write_preset("tiny", tmp_path / "ck")
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    result = qwen3vl("build", "--checkpoint", checkpoint, "--out", tmp_path / "engine")
    assert_one_line_error(result, "model.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_images_too_large_for_memory_are_refused_before_running(engine, tmp_path):
    """With the checkpoint's budget raised, a big photo would need more RAM than the machine has."""
    roomy = shutil.copytree(engine, tmp_path / "roomy")  # a context long enough for 12 MP of visual tokens
    manifest = json.loads((roomy / "manifest.json").read_text())
    manifest["max_context"] = 32768
    (roomy / "manifest.json").write_text(json.dumps(manifest))
    path = tmp_path / "photo.png"
    Image.new("RGB", (4000, 3000), "white").save(path)
    result = run_engine(roomy, "--image", path, "--max-pixels", 4000 * 3000)
    assert_one_line_error(result, "--max-pixels", "GiB")
