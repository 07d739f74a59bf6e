"""model_src against transformers' Qwen3-VL with the same random weights (fp32, max abs diff <= 1e-4)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import TINY_CONFIGS, load_transformers_model, random_image
from model_src.model import Qwen3VL
from runtime.image_processing import ImageProcessorSettings, preprocess_images
from runtime.prompt import PromptBuilder, user_message
from runtime.rope_index import rope_index

TOLERANCE = 1e-4

# name -> list of (height, width) images in the prompt
CASES = {
    "text-only": [],
    "one-image": [(96, 128)],
    "two-images": [(64, 160), (200, 120)],
    "wide-image": [(24, 900)],
    "tall-image": [(900, 24)],
}


class Models:
    def __init__(self, folder):
        self.ours = Qwen3VL.from_checkpoint(folder)
        self.theirs, self.info = load_transformers_model(folder)
        self.prompts = PromptBuilder.from_folder(folder, self.ours.config.image_token_id)
        self.settings = ImageProcessorSettings.from_preprocessor_config(
            json.loads((folder / "preprocessor_config.json").read_text())
        )

    def encode(self, text: str, sizes, seed: int = 0):
        images = [random_image(h, w, seed + i) for i, (h, w) in enumerate(sizes)]
        processed = preprocess_images(images, self.settings) if images else None
        tokens = self.prompts.encode(user_message(text, len(images)), processed.tokens_per_image if processed else [])
        return tokens.input_ids, processed

    def transformers_logits(self, input_ids, attention_mask, processed):
        ids = torch.from_numpy(input_ids)
        kwargs = {"mm_token_type_ids": (ids == self.ours.config.image_token_id).long()}
        if processed is not None:
            kwargs["pixel_values"] = torch.from_numpy(processed.pixel_values)
            kwargs["image_grid_thw"] = torch.from_numpy(processed.image_grid_thw)
        with torch.no_grad():
            return self.theirs(input_ids=ids, attention_mask=torch.from_numpy(attention_mask), **kwargs).logits

    def our_logits(self, input_ids, attention_mask, processed):
        """Rows right-padded: attention_mask is 1 on a prefix of each row."""
        cfg = self.ours.config
        grid = processed.image_grid_thw if processed is not None else None
        positions, _ = rope_index(input_ids, grid, attention_mask, cfg.image_token_id, cfg.vision.spatial_merge_size)
        batch, length = input_ids.shape
        with torch.no_grad():
            image_embeds = deepstack = None
            if processed is not None:
                image_embeds, deepstack = self.ours.encode_images(torch.from_numpy(processed.pixel_values), grid)
            keys, values = self.ours.new_cache(batch, length)
            logits, _, _ = self.ours(
                torch.from_numpy(input_ids), torch.from_numpy(positions),
                torch.from_numpy(attention_mask.sum(1).astype(np.int32) - 1), torch.tensor([length], dtype=torch.int32),
                keys, values, image_embeds=image_embeds, deepstack=deepstack,
            )
        return logits


@pytest.fixture(scope="module")
def models(tiny_checkpoints):
    return {name: Models(folder) for name, folder in tiny_checkpoints.items()}


@pytest.mark.parametrize("config_name", list(TINY_CONFIGS))
def test_transformers_loads_checkpoint_without_missing_or_unexpected_keys(models, config_name):
    info = models[config_name].info
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("config_name", list(TINY_CONFIGS))
def test_logits_match_transformers(models, config_name, case):
    m = models[config_name]
    ids, processed = m.encode("What is in the picture? Answer briefly.", CASES[case])
    mask = np.ones_like(ids)[None]
    ref = m.transformers_logits(ids[None], mask, processed)
    ours = m.our_logits(ids[None], mask, processed)
    assert ours.shape == ref.shape
    diff = (ours - ref).abs().max().item()
    print(f"{config_name} {case}: max abs logits diff {diff:.2e} over {ids.size} tokens")
    assert diff <= TOLERANCE
    # A model that ignored the image would pass the text-only case alone; with images the logits
    # at the image positions and after must differ from those of a blank prompt.
    if processed is not None:
        assert ref[0, -1].std() > 0.1


@pytest.mark.parametrize("config_name", list(TINY_CONFIGS))
def test_padded_batch_of_two_prompts_matches_transformers(models, config_name):
    m = models[config_name]
    ids_a, proc_a = m.encode("Describe the image in detail, please.", [(96, 64)], seed=3)
    ids_b, proc_b = m.encode("Hi", [(64, 64)], seed=4)
    length = max(len(ids_a), len(ids_b))
    pad = 151643
    batch = np.full((2, length), pad, dtype=np.int64)
    mask = np.zeros((2, length), dtype=np.int64)
    for row, ids in enumerate((ids_a, ids_b)):  # right padding, as the runtime batches prompts
        batch[row, :len(ids)] = ids
        mask[row, :len(ids)] = 1
    processed = type(proc_a)(
        pixel_values=np.concatenate([proc_a.pixel_values, proc_b.pixel_values]),
        image_grid_thw=np.concatenate([proc_a.image_grid_thw, proc_b.image_grid_thw]),
    )
    ref = m.transformers_logits(batch, mask, processed)
    ours = m.our_logits(batch, mask, processed)
    real = torch.from_numpy(mask).bool()
    diff = (ours[real] - ref[real]).abs().max().item()
    print(f"{config_name} padded batch: max abs logits diff {diff:.2e}")
    assert diff <= TOLERANCE


@pytest.mark.parametrize("config_name", list(TINY_CONFIGS))
def test_kv_cache_decode_matches_full_forward(models, config_name):
    """Prefill part of the prompt, then feed the rest one token at a time through the KV buffers."""
    m = models[config_name]
    ids, processed = m.encode("Count the objects.", [(64, 96)], seed=5)
    full = m.our_logits(ids[None], np.ones_like(ids)[None], processed)
    cfg = m.ours.config
    positions, _ = rope_index(ids[None], processed.image_grid_thw, None, cfg.image_token_id, 2)
    split = len(ids) - 4
    i32 = lambda *values: torch.tensor(values, dtype=torch.int32)  # noqa: E731
    with torch.no_grad():
        image_embeds, deepstack = m.ours.encode_images(torch.from_numpy(processed.pixel_values),
                                                       processed.image_grid_thw)
        keys, values = m.ours.new_cache(1, len(ids) + 3)  # spare capacity must not change results
        logits, keys, values = m.ours(torch.from_numpy(ids[None, :split]), torch.from_numpy(positions[:, :, :split]),
                                      i32(split - 1), i32(split), keys, values, image_embeds=image_embeds,
                                      deepstack=deepstack)
        steps = [logits]
        for i in range(split, len(ids)):
            logits, keys, values = m.ours(torch.from_numpy(ids[None, i:i + 1]),
                                          torch.from_numpy(positions[:, :, i:i + 1]), i32(i), i32(i + 1), keys, values)
            steps.append(logits)
    incremental = torch.cat(steps, dim=1)
    assert (incremental - full).abs().max().item() <= TOLERANCE


def test_greedy_generation_matches_transformers_generate(models):
    m = models["gqa6-untied"]
    ids, processed = m.encode("Describe this image.", [(80, 112)], seed=9)
    ours = _torch_greedy(m, ids, processed, 16)
    with torch.no_grad():
        ref = m.theirs.generate(
            input_ids=torch.from_numpy(ids[None]),
            attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
            pixel_values=torch.from_numpy(processed.pixel_values),
            image_grid_thw=torch.from_numpy(processed.image_grid_thw),
            mm_token_type_ids=torch.from_numpy((ids[None] == m.ours.config.image_token_id).astype(np.int64)),
            max_new_tokens=16, min_new_tokens=16, do_sample=False,
        )[0, len(ids):].tolist()
    assert ours == ref


def _torch_greedy(m, ids, processed, steps: int) -> list[int]:
    """Greedy tokens of the PyTorch model through the runtime's generation loop (TorchBackend)."""
    from model_src.torch_backend import TorchBackend
    from runtime.backend import VisionBatch
    from runtime.generate import generate
    from runtime.prepare import PreparedBatch
    from runtime.sampling import SamplingConfig
    from runtime.vision_positions import vision_inputs

    cfg = m.ours.config
    v = cfg.vision
    positions, delta = rope_index(ids[None], processed.image_grid_thw, None, cfg.image_token_id, 2)
    index = np.where(ids == cfg.image_token_id, np.cumsum(ids == cfg.image_token_id) - 1, -1)[None]
    host = vision_inputs(processed.image_grid_thw, v.num_position_embeddings, v.spatial_merge_size, v.head_dim,
                         v.rope_theta)
    batch = PreparedBatch(ids[None], np.array([len(ids)]), positions, delta[:, 0], index,
                          VisionBatch(processed.pixel_values, processed.image_grid_thw, host), [""])
    steps_out = generate(TorchBackend(m.ours), batch, steps, SamplingConfig(do_sample=False), eos_token_ids=())
    return [int(step.tokens[0]) for step in steps_out]
