"""Hyper-parameters of Qwen3-VL, read from a checkpoint's config.json.

Only what this pipeline implements is accepted: anything else is refused with a message that names
the field, so a different model never loads silently with the wrong maths.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import CheckpointError


@dataclass(frozen=True)
class VisionConfig:
    depth: int = 24
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    out_hidden_size: int = 2048
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: tuple[int, ...] = (5, 11, 17)
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Values in one row of pixel_values: C x T x P x P."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merged_dim(self) -> int:
        return self.hidden_size * self.spatial_merge_size**2


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 6144
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 5_000_000.0
    mrope_section: tuple[int, int, int] = (24, 20, 20)
    max_position_embeddings: int = 262144


@dataclass(frozen=True)
class ModelConfig:
    vision: VisionConfig
    text: TextConfig
    tie_word_embeddings: bool = True
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653

    @property
    def num_deepstack(self) -> int:
        return len(self.vision.deepstack_visual_indexes)


def load_config(checkpoint_dir: str | Path) -> ModelConfig:
    path = Path(checkpoint_dir) / "config.json"
    if not Path(checkpoint_dir).is_dir():
        raise CheckpointError(f"checkpoint folder not found: {checkpoint_dir}")
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (not a Hugging Face checkpoint folder?)")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    return parse_config(raw, source=str(path))


def parse_config(raw: dict, source: str = "config.json") -> ModelConfig:
    def refuse(field: str, value, expected: str) -> CheckpointError:
        return CheckpointError(f"{source}: unsupported {field}={value!r} (expected {expected})")

    if raw.get("model_type") != "qwen3_vl":
        raise refuse("model_type", raw.get("model_type"), "'qwen3_vl'")
    for key in ("text_config", "vision_config"):
        if not isinstance(raw.get(key), dict):
            raise CheckpointError(f"{source}: missing {key}")
    text_raw, vision_raw = raw["text_config"], raw["vision_config"]

    def get(section: dict, prefix: str, name: str, kind, default=None):
        value = section.get(name, default)
        if value is None:
            raise CheckpointError(f"{source}: missing {prefix}.{name}")
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise refuse(f"{prefix}.{name}", value, kind.__name__)
        return value

    # Text decoder.
    t = "text_config"
    if text_raw.get("hidden_act", "silu") != "silu":
        raise refuse(f"{t}.hidden_act", text_raw["hidden_act"], "'silu'")
    if text_raw.get("attention_bias", False):
        raise refuse(f"{t}.attention_bias", text_raw["attention_bias"], "false")
    rope = _read_text_rope(text_raw, source)
    hidden = get(text_raw, t, "hidden_size", int)
    heads = get(text_raw, t, "num_attention_heads", int)
    kv_heads = get(text_raw, t, "num_key_value_heads", int, heads)
    head_dim = get(text_raw, t, "head_dim", int, hidden // heads)
    if heads % kv_heads:
        raise refuse(f"{t}.num_key_value_heads", kv_heads, f"a divisor of num_attention_heads={heads}")
    if head_dim % 2:
        raise refuse(f"{t}.head_dim", head_dim, "an even number")
    section = tuple(rope["mrope_section"])
    if len(section) != 3 or sum(section) != head_dim // 2:
        raise refuse(f"{t}.rope mrope_section", list(section), f"3 sizes summing to head_dim/2={head_dim // 2}")
    # Interleaved layout: H uses indices 1,4,..; W uses 2,5,..; both must fit inside head_dim/2.
    if section[1] * 3 > head_dim // 2 + 1 or section[2] * 3 > head_dim // 2:
        raise refuse(f"{t}.rope mrope_section", list(section), "H/W sections that fit the interleaved layout")
    text = TextConfig(
        vocab_size=get(text_raw, t, "vocab_size", int),
        hidden_size=hidden,
        intermediate_size=get(text_raw, t, "intermediate_size", int),
        num_hidden_layers=get(text_raw, t, "num_hidden_layers", int),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=get(text_raw, t, "rms_norm_eps", float, 1e-6),
        rope_theta=rope["rope_theta"],
        mrope_section=section,
        max_position_embeddings=get(text_raw, t, "max_position_embeddings", int, 262144),
    )

    # Vision encoder.
    v = "vision_config"
    if vision_raw.get("hidden_act", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise refuse(f"{v}.hidden_act", vision_raw["hidden_act"], "'gelu_pytorch_tanh'")
    vision_rope = vision_raw.get("rope_parameters") or {}
    if vision_rope.get("rope_type", "axial") != "axial":
        raise refuse(f"{v}.rope_parameters.rope_type", vision_rope["rope_type"], "'axial'")
    num_pos = get(vision_raw, v, "num_position_embeddings", int, 2304)
    if round(num_pos**0.5) ** 2 != num_pos:
        raise refuse(f"{v}.num_position_embeddings", num_pos, "a square number")
    v_hidden = get(vision_raw, v, "hidden_size", int)
    v_heads = get(vision_raw, v, "num_heads", int)
    if v_hidden % v_heads or (v_hidden // v_heads) % 4:
        raise refuse(f"{v}.num_heads", v_heads, "a head_dim (hidden_size/num_heads) that is a multiple of 4")
    depth = get(vision_raw, v, "depth", int)
    deepstack = tuple(get(vision_raw, v, "deepstack_visual_indexes", list, [5, 11, 17]))
    if any(not isinstance(i, int) or not 0 <= i < depth for i in deepstack):
        raise refuse(f"{v}.deepstack_visual_indexes", list(deepstack), f"block indexes below depth={depth}")
    if len(deepstack) > text.num_hidden_layers:
        raise refuse(f"{v}.deepstack_visual_indexes", list(deepstack), "no more entries than text layers")
    out_hidden = get(vision_raw, v, "out_hidden_size", int)
    if out_hidden != text.hidden_size:
        raise refuse(f"{v}.out_hidden_size", out_hidden, f"text hidden_size={text.hidden_size}")
    vision = VisionConfig(
        depth=depth,
        hidden_size=v_hidden,
        intermediate_size=get(vision_raw, v, "intermediate_size", int),
        num_heads=v_heads,
        in_channels=get(vision_raw, v, "in_channels", int, 3),
        patch_size=get(vision_raw, v, "patch_size", int, 16),
        temporal_patch_size=get(vision_raw, v, "temporal_patch_size", int, 2),
        spatial_merge_size=get(vision_raw, v, "spatial_merge_size", int, 2),
        out_hidden_size=out_hidden,
        num_position_embeddings=num_pos,
        deepstack_visual_indexes=deepstack,
        rope_theta=float(vision_rope.get("rope_theta", 10000.0)),
    )

    # tie_word_embeddings may sit at the top level and/or in text_config; the top level wins.
    tie = raw.get("tie_word_embeddings", text_raw.get("tie_word_embeddings", False))
    return ModelConfig(
        vision=vision,
        text=text,
        tie_word_embeddings=bool(tie),
        image_token_id=get(raw, "config", "image_token_id", int, 151655),
        video_token_id=get(raw, "config", "video_token_id", int, 151656),
        vision_start_token_id=get(raw, "config", "vision_start_token_id", int, 151652),
        vision_end_token_id=get(raw, "config", "vision_end_token_id", int, 151653),
    )


def _read_text_rope(text_raw: dict, source: str) -> dict:
    """Both styles: transformers 5 `rope_parameters`, older `rope_scaling` + `rope_theta`."""
    if isinstance(text_raw.get("rope_parameters"), dict):
        params, where = dict(text_raw["rope_parameters"]), "text_config.rope_parameters"
    elif isinstance(text_raw.get("rope_scaling"), dict):
        params, where = dict(text_raw["rope_scaling"]), "text_config.rope_scaling"
    else:
        raise CheckpointError(f"{source}: missing text_config.rope_parameters (or rope_scaling + rope_theta)")
    params.setdefault("rope_theta", text_raw.get("rope_theta"))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise CheckpointError(f"{source}: unsupported {where}.rope_type={rope_type!r} (expected 'default')")
    if not params.get("mrope_interleaved", False):
        raise CheckpointError(
            f"{source}: unsupported {where}.mrope_interleaved={params.get('mrope_interleaved')!r} (expected true)"
        )
    if "mrope_section" not in params:
        raise CheckpointError(f"{source}: missing {where}.mrope_section")
    theta = params.get("rope_theta")
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise CheckpointError(f"{source}: unsupported {where}.rope_theta={theta!r} (expected a positive number)")
    params["rope_theta"] = float(theta)
    return params
