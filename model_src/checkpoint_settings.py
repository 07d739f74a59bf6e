"""A checkpoint's settings besides its hyper-parameters, read in one place with one behaviour.

- `preprocessor_config.json`: the image processor (pixel budget, patch sizes, mean/std). Required:
  every Qwen3-VL checkpoint ships one, and guessing a budget would change the answers.
- `generation_config.json`: end-of-turn and pad token ids and the default sampling, as transformers
  reads them. Optional: without it the ids come from `config.json` (`eos_token_id`, top level or
  `text_config`) and generation is greedy. A pad id that neither file gives is the first EOS id
  (what transformers' generate falls back to).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from runtime.errors import CheckpointError, ImageError
from runtime.image_processing import ImageProcessorSettings

SAMPLING_KEYS = ("do_sample", "temperature", "top_p", "top_k")


@dataclass(frozen=True)
class GenerationSettings:
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    defaults: dict = field(default_factory=dict)  # the sampling keys the checkpoint sets


def read_json(path: Path, required: bool) -> dict | None:
    if not path.is_file():
        if required:
            raise CheckpointError(f"{path}: missing")
        return None
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return raw


def image_processor_settings(checkpoint_dir: str | Path) -> ImageProcessorSettings:
    path = Path(checkpoint_dir) / "preprocessor_config.json"
    try:
        return ImageProcessorSettings.from_preprocessor_config(read_json(path, required=True))
    except ImageError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def _token_ids(value, source: Path, key: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    ids = value if isinstance(value, list) else [value]
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise CheckpointError(f"{source}: {key} must be a token id or a list of them, got {value!r}")
    return tuple(ids)


def generation_settings(checkpoint_dir: str | Path) -> GenerationSettings:
    folder = Path(checkpoint_dir)
    generation_path, config_path = folder / "generation_config.json", folder / "config.json"
    generation = read_json(generation_path, required=False) or {}
    config = read_json(config_path, required=True)
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}

    def first(key: str) -> tuple[int, ...] | None:
        for source, raw in ((generation_path, generation), (config_path, config), (config_path, text)):
            ids = _token_ids(raw.get(key), source, key)
            if ids is not None:
                return ids
        return None

    eos = first("eos_token_id")
    if eos is None:
        raise CheckpointError(f"{folder}: no eos_token_id in generation_config.json or config.json")
    pad = first("pad_token_id")
    defaults = {key: generation[key] for key in SAMPLING_KEYS if generation.get(key) is not None}
    for key, value in defaults.items():
        kind = bool if key == "do_sample" else int if key == "top_k" else (int, float)
        if not isinstance(value, kind) or (key != "do_sample" and isinstance(value, bool)):
            raise CheckpointError(f"{generation_path}: {key}={value!r} is not a valid setting")
    return GenerationSettings(eos_token_ids=eos, pad_token_id=pad[0] if pad else eos[0], defaults=defaults)


def model_facts(checkpoint_dir: str | Path, config=None):
    """The runtime's ModelFacts (what an engine's manifest records) for a checkpoint folder."""
    from runtime.engine_manifest import ModelFacts

    from .config import load_config

    config = config or load_config(checkpoint_dir)
    generation = generation_settings(checkpoint_dir)
    t, v = config.text, config.vision
    return ModelFacts(
        hidden_size=t.hidden_size,
        num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads,
        intermediate_size=t.intermediate_size,
        head_dim=t.head_dim,
        vocab_size=t.vocab_size,
        num_deepstack=config.num_deepstack,
        vision_head_dim=v.head_dim,
        vision_num_heads=v.num_heads,
        num_position_embeddings=v.num_position_embeddings,
        spatial_merge_size=v.spatial_merge_size,
        vision_rope_theta=v.rope_theta,
        image_token_id=config.image_token_id,
        vision_start_token_id=config.vision_start_token_id,
        vision_end_token_id=config.vision_end_token_id,
        eos_token_ids=generation.eos_token_ids,
        pad_token_id=generation.pad_token_id,
    )
