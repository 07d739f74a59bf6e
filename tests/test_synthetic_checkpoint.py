"""Synthetic checkpoints: real layout and shapes, deterministic, and weights that behave."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch

from conftest import load_transformers_model, random_image
from model_src.checkpoint import checkpoint_shapes
from model_src.config import parse_config
from model_src.torch_backend import checkpoint_pipeline
from model_src.model import Qwen3VL
from model_src.synthetic_checkpoint import PRESETS, write_preset


def parameter_counts(preset: str) -> dict[str, int]:
    with torch.device("meta"):
        shapes = checkpoint_shapes(Qwen3VL(parse_config(PRESETS[preset][0])))
    counts = {"total": 0, "vision": 0, "text": 0, "embedding": 0}
    for name, shape in shapes.items():
        n = math.prod(shape)
        counts["total"] += n
        counts["vision" if name.startswith("model.visual.") else "text"] += n
        if name.endswith("embed_tokens.weight"):
            counts["embedding"] += n
    return counts


def test_2b_preset_has_the_real_model_shapes():
    counts = parameter_counts("2b")
    assert round(counts["total"] / 1e6, 1) == 2127.5
    assert round(counts["vision"] / 1e6, 1) == 407.0
    assert round(counts["text"] / 1e6, 1) == 1720.6
    assert round(counts["embedding"] / 1e6, 1) == 311.2
    config = parse_config(PRESETS["2b"][0])
    t = config.text
    assert (t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads, t.head_dim) == (28, 16, 8, 128)
    assert config.tie_word_embeddings and config.vision.deepstack_visual_indexes == (5, 11, 17)


def folder_digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_same_seed_gives_identical_files_and_another_seed_other_weights(tmp_path):
    a = folder_digest(write_preset("tiny", tmp_path / "a", seed=1))
    b = folder_digest(write_preset("tiny", tmp_path / "b", seed=1))
    c = folder_digest(write_preset("tiny", tmp_path / "c", seed=2))
    assert a == b
    assert a["model.safetensors"] != c["model.safetensors"]
    assert a["config.json"] == c["config.json"]


def test_checkpoint_folder_has_the_hugging_face_files(tmp_path):
    folder = write_preset("tiny", tmp_path / "ck")
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "generation_config.json", "preprocessor_config.json", "model.safetensors",
            "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "chat_template.jinja"} <= names
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "qwen3_vl" and config["vision_config"]["model_type"] == "qwen3_vl"
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "staging folder left behind"


def test_transformers_tokenizer_and_chat_template_place_images(tmp_path):
    from transformers import AutoTokenizer

    folder = write_preset("tiny", tmp_path / "ck")
    tok = AutoTokenizer.from_pretrained(folder)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe this image.<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert tok.convert_tokens_to_ids("<|image_pad|>") == 151655


def test_existing_folder_is_not_overwritten_without_force(tmp_path):
    from runtime.errors import CheckpointError

    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="already exists"):
        write_preset("tiny", tmp_path / "ck")
    assert (tmp_path / "ck" / "notes.txt").read_text() == "mine"


@pytest.fixture(scope="module")
def small_pipeline(tmp_path_factory):
    return checkpoint_pipeline(write_preset("small", tmp_path_factory.mktemp("small") / "ck", seed=0))


def test_small_preset_loads_in_transformers(small_pipeline):
    _, info = load_transformers_model(small_pipeline.engine_dir)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info


def test_greedy_outputs_are_varied_and_depend_on_the_image(small_pipeline):
    images = [random_image(224, 224, seed) for seed in (1, 2)]
    answers = [small_pipeline.generate("Describe this image.", [im], max_new_tokens=24, do_sample=False)
               for im in images]
    for answer in answers:
        assert len(set(answer.token_ids)) >= 8, answer.token_ids
    assert answers[0].token_ids != answers[1].token_ids
    text_only = small_pipeline.generate("Describe this image.", [], max_new_tokens=24, do_sample=False)
    assert text_only.token_ids not in (answers[0].token_ids, answers[1].token_ids)


@pytest.mark.slow
def test_2b_forward_matches_transformers(tmp_path):
    """One forward pass of the full-size synthetic checkpoint (about 20 GB of RAM, minutes)."""
    import gc

    from runtime.image_processing import preprocess_images
    from runtime.prompt import user_message
    from runtime.rope_index import rope_index

    folder = write_preset("2b", tmp_path / "ck2b", seed=0)
    assert (folder / "model.safetensors.index.json").is_file()
    pipe = checkpoint_pipeline(folder)
    settings = pipe.manifest.image_processor.with_budget(max_pixels=448 * 448, min_pixels=256 * 256)
    processed = preprocess_images([random_image(448, 448, 0)], settings)
    ids = pipe.prompts.encode(user_message("Describe this image.", 1), processed.tokens_per_image).input_ids
    model = pipe.backend.model
    cfg = model.config
    positions, _ = rope_index(ids[None], processed.image_grid_thw, None, cfg.image_token_id, 2)
    with torch.no_grad():
        emb, deep = model.encode_images(torch.from_numpy(processed.pixel_values), processed.image_grid_thw)
        keys, values = model.new_cache(1, len(ids))
        ours, _, _ = model(torch.from_numpy(ids[None]), torch.from_numpy(positions),
                                torch.tensor([len(ids) - 1], dtype=torch.int32),
                                torch.tensor([len(ids)], dtype=torch.int32), keys, values,
                                image_embeds=emb, deepstack=deep)
    ours = ours[0, -8:].clone()
    del pipe, model, emb, deep
    gc.collect()
    theirs, info = load_transformers_model(folder)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        ref = theirs(input_ids=torch.from_numpy(ids[None]), pixel_values=torch.from_numpy(processed.pixel_values),
                     image_grid_thw=torch.from_numpy(processed.image_grid_thw),
                     mm_token_type_ids=torch.from_numpy((ids[None] == cfg.image_token_id).astype(np.int64)),
                     logits_to_keep=8).logits[0]
    diff = (ours - ref).abs().max().item()
    print(f"2b: max abs logits diff {diff:.2e} (last 8 positions of {len(ids)})")
    assert diff <= 1e-3
