"""Shared fixtures: tiny synthetic checkpoints in several shapes, and the transformers oracle."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from model_src.synthetic_checkpoint import PRESETS, model_config, text_config, vision_config, write_checkpoint

TINY_BUDGET = (32 * 32 * 4, 32 * 32 * 64)

# Three tiny configurations that differ where the maths differs: head counts, GQA ratio, head_dim,
# mrope sections, deepstack indexes, position-table size and tied/untied head.
TINY_CONFIGS = {
    "gqa2-tied": PRESETS["tiny"][0],
    "gqa6-untied": model_config(
        text_config(96, 3, 6, 1, 32, 160, (6, 5, 5), tie=False),
        vision_config(3, 48, 2, 96, 96, (0, 2)),
    ),
    "mha-untied": model_config(
        text_config(64, 2, 8, 8, 8, 96, (2, 1, 1), tie=False),
        vision_config(3, 32, 1, 64, 64, (2,), num_position_embeddings=256),
    ),
}


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    return {name: write_checkpoint(root / name, cfg, TINY_BUDGET, seed=7) for name, cfg in TINY_CONFIGS.items()}


@pytest.fixture(scope="session")
def tiny_engine(tiny_checkpoints, tmp_path_factory):
    """tiny_engine(config_name, **build options) -> engine folder, built once per session for each
    combination (engines are only read by the tests that share them)."""
    from export.build_engine import build_engine

    root, built = tmp_path_factory.mktemp("engines"), {}

    def get(name: str = "gqa2-tied", **options):
        key = (name, tuple(sorted(options.items())))
        if key not in built:
            suffix = "-".join(f"{k}={v}" for k, v in key[1])
            built[key] = build_engine(tiny_checkpoints[name], root / f"{name}{'-' + suffix if suffix else ''}",
                                      **options)
        return built[key]

    return get


def random_image(height: int, width: int, seed: int) -> Image.Image:
    """A smooth random picture (a noise field upscaled), so resizing does real work."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BILINEAR)


def load_transformers_model(folder):
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    model, info = Qwen3VLForConditionalGeneration.from_pretrained(
        folder, dtype=torch.float32, output_loading_info=True
    )
    return model.eval(), info


def qwen3vl(*args, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    """The command line as a user runs it, in a process of its own."""
    return subprocess.run([sys.executable, "-m", "commands", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """The promise for bad input: exit status 1 and one line on stderr starting with `error:`."""
    assert result.returncode == 1, result.stderr
    message = result.stderr.strip()
    assert message.startswith("error: ") and "\n" not in message, result.stderr
    for fragment in fragments:
        assert fragment in message, message
