"""Greedy generation with the PyTorch model: the reference path until an engine is built.

Uses the same host-side steps as the runtime (numpy preprocessing, prompt building, M-RoPE
position ids), so the only PyTorch-specific part is the forward pass.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from runtime.image_processing import ImageProcessorSettings, preprocess_images
from runtime.prompt import PromptBuilder, user_message
from runtime.rope_index import rope_index

from .model import Qwen3VL

DEFAULT_EOS = (151645, 151643)


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    timings: dict = field(default_factory=dict)


def eos_token_ids(checkpoint_dir: Path) -> tuple[int, ...]:
    path = checkpoint_dir / "generation_config.json"
    if path.is_file():
        eos = json.loads(path.read_text()).get("eos_token_id")
        if eos is not None:
            return tuple(eos) if isinstance(eos, list) else (eos,)
    return DEFAULT_EOS


@torch.no_grad()
def greedy_tokens(
    model: Qwen3VL,
    input_ids: np.ndarray,  # (S,)
    pixel_values: np.ndarray | None,
    image_grid_thw: np.ndarray | None,
    max_new_tokens: int,
    eos_ids: tuple[int, ...] = DEFAULT_EOS,
) -> Iterator[int]:
    """Yields generated token ids one by one (stops after an end-of-turn token)."""
    cfg = model.config
    length = len(input_ids)
    positions, delta = rope_index(input_ids[None], image_grid_thw, None, cfg.image_token_id,
                                  cfg.vision.spatial_merge_size)
    image_embeds = deepstack = None
    if pixel_values is not None and len(pixel_values):
        image_embeds, deepstack = model.encode_images(torch.from_numpy(pixel_values), image_grid_thw)
    keys, values = model.new_cache(1, length + max_new_tokens)
    logits, keys, values = model(
        torch.from_numpy(input_ids[None].astype(np.int64)), torch.from_numpy(positions),
        torch.tensor([length - 1], dtype=torch.int32), torch.tensor([length], dtype=torch.int32),
        keys, values, image_embeds=image_embeds, deepstack=deepstack,
    )
    for step in range(max_new_tokens):
        token = int(logits[0, -1].argmax())
        yield token
        if token in eos_ids or step == max_new_tokens - 1:
            return
        cache_len = length + step  # tokens in the cache before this one
        step_pos = torch.full((3, 1, 1), cache_len + int(delta[0, 0]), dtype=torch.int64)
        logits, keys, values = model(
            torch.tensor([[token]]), step_pos, torch.tensor([cache_len], dtype=torch.int32),
            torch.tensor([cache_len + 1], dtype=torch.int32), keys, values,
        )


class ReferencePipeline:
    """Checkpoint folder -> answers, with the PyTorch model."""

    def __init__(self, checkpoint_dir: str | Path, dtype: torch.dtype = torch.float32):
        self.folder = Path(checkpoint_dir)
        self.model = Qwen3VL.from_checkpoint(self.folder, dtype)
        cfg = self.model.config
        self.prompts = PromptBuilder.from_folder(self.folder, cfg.image_token_id)
        preprocessor = self.folder / "preprocessor_config.json"
        raw = json.loads(preprocessor.read_text()) if preprocessor.is_file() else {}
        self.image_settings = ImageProcessorSettings.from_preprocessor_config(raw)
        self.eos_ids = eos_token_ids(self.folder)

    def answer(self, prompt: str, images: list = (), max_new_tokens: int = 64) -> Answer:
        start = time.perf_counter()
        processed = preprocess_images(list(images), self.image_settings) if images else None
        tokens = self.prompts.encode(user_message(prompt, len(images)),
                                     processed.tokens_per_image if processed else [])
        generated = list(greedy_tokens(
            self.model,
            tokens.input_ids,
            processed.pixel_values if processed else None,
            processed.image_grid_thw if processed else None,
            max_new_tokens,
            self.eos_ids,
        ))
        return Answer(
            text=self.prompts.decode(generated),
            token_ids=generated,
            prompt_tokens=len(tokens.input_ids),
            timings={"total_ms": 1000 * (time.perf_counter() - start)},
        )
