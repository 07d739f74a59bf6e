"""Bad checkpoints give one-line errors that name the problem, from the API and the command line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from model_src.config import load_config, parse_config
from model_src.model import Qwen3VL
from model_src.synthetic_checkpoint import PRESETS, write_preset
from runtime.errors import CheckpointError


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    return write_preset("tiny", tmp_path_factory.mktemp("good") / "ck", seed=0)


@pytest.fixture
def checkpoint(good_checkpoint, tmp_path):
    return shutil.copytree(good_checkpoint, tmp_path / "ck")


def load_error(folder) -> str:
    with pytest.raises(CheckpointError) as info:
        Qwen3VL.from_checkpoint(folder)
    message = str(info.value)
    assert "\n" not in message
    return message


def edit_config(folder, edit):
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


def test_good_checkpoint_loads(good_checkpoint):
    model = Qwen3VL.from_checkpoint(good_checkpoint)
    assert model.lm_head is None  # tied


def test_missing_folder(tmp_path):
    assert "not found" in load_error(tmp_path / "nowhere")


def test_missing_config(checkpoint):
    (checkpoint / "config.json").unlink()
    assert "config.json: missing" in load_error(checkpoint)


def test_wrong_model_type(checkpoint):
    edit_config(checkpoint, lambda c: c.update(model_type="llava"))
    message = load_error(checkpoint)
    assert "model_type='llava'" in message and "qwen3_vl" in message


def test_unsupported_rope_type_names_the_field(checkpoint):
    edit_config(checkpoint, lambda c: c["text_config"]["rope_scaling"].update(rope_type="yarn"))
    assert "text_config.rope_scaling.rope_type='yarn'" in load_error(checkpoint)


def test_truncated_safetensors(checkpoint):
    path = checkpoint / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    message = load_error(checkpoint)
    assert "model.safetensors" in message and "unreadable" in message


def test_tensor_of_the_wrong_shape(checkpoint):
    path = checkpoint / "model.safetensors"
    tensors = load_file(path)
    name = "model.language_model.layers.1.self_attn.k_proj.weight"
    tensors[name] = torch.zeros(tensors[name].shape[0] + 1, tensors[name].shape[1], dtype=torch.bfloat16)
    save_file(tensors, path, metadata={"format": "pt"})
    message = load_error(checkpoint)
    assert name in message and "shape" in message


def test_missing_tensor(checkpoint):
    path = checkpoint / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.visual.blocks.0.attn.qkv.bias"]
    save_file(tensors, path, metadata={"format": "pt"})
    assert "missing tensor model.visual.blocks.0.attn.qkv.bias" in load_error(checkpoint)


def test_unexpected_tensor(checkpoint):
    path = checkpoint / "model.safetensors"
    tensors = load_file(path)
    tensors["model.mtp.proj.weight"] = torch.zeros(2, 2, dtype=torch.bfloat16)
    save_file(tensors, path, metadata={"format": "pt"})
    assert "unexpected tensor model.mtp.proj.weight" in load_error(checkpoint)


def test_missing_shard_of_a_sharded_checkpoint(checkpoint):
    tensors = load_file(checkpoint / "model.safetensors")
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in halves.items():
        save_file({n: tensors[n] for n in part}, checkpoint / file, metadata={"format": "pt"})
    (checkpoint / "model.safetensors").unlink()
    index = {"weight_map": {n: f for f, part in halves.items() for n in part}}
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))
    Qwen3VL.from_checkpoint(checkpoint)  # loads sharded
    (checkpoint / "model-00002-of-00002.safetensors").unlink()
    assert "model-00002-of-00002.safetensors: shard listed" in load_error(checkpoint)


def test_bf16_fp16_fp32_load_to_the_chosen_dtype(good_checkpoint):
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        model = Qwen3VL.from_checkpoint(good_checkpoint, dtype)
        assert {p.dtype for p in model.parameters()} == {dtype}


def test_both_rope_config_styles_give_the_same_config():
    old = PRESETS["tiny"][0]
    new = json.loads(json.dumps(old))
    scaling = new["text_config"].pop("rope_scaling")
    theta = new["text_config"].pop("rope_theta")
    new["text_config"]["rope_parameters"] = {**scaling, "rope_theta": theta}
    assert parse_config(old) == parse_config(new)


def test_tie_word_embeddings_top_level_wins(checkpoint):
    edit_config(checkpoint, lambda c: c.update(tie_word_embeddings=False))
    assert not load_config(checkpoint).tie_word_embeddings
    assert "missing tensor lm_head.weight" in load_error(checkpoint)


def test_command_line_prints_one_line_and_fails(checkpoint):
    (checkpoint / "config.json").unlink()
    result = subprocess.run([sys.executable, "-m", "commands", "run", "--checkpoint", str(checkpoint),
                             "--prompt", "hi"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error: ")
    assert "config.json: missing" in result.stderr
