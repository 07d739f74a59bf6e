"""The engine folder's manifest: everything the runtime needs besides the graphs.

An engine folder is self-contained: the runtime never looks at the checkpoint it was built from.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import Qwen3VLError
from .image_processing import ImageProcessorSettings

MANIFEST = "manifest.json"
FORMAT = "qwen3vl-engine"
FORMAT_VERSION = 2  # 2: pad_token_id in the model facts


class EngineError(Qwen3VLError):
    """An engine folder that is missing, incomplete or built by an incompatible version."""


@dataclass(frozen=True)
class ModelFacts:
    """The few hyper-parameters the runtime needs."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    head_dim: int
    vocab_size: int
    num_deepstack: int
    vision_head_dim: int
    vision_num_heads: int
    num_position_embeddings: int
    spatial_merge_size: int
    vision_rope_theta: float
    image_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int


@dataclass
class Manifest:
    model: ModelFacts
    image_processor: ImageProcessorSettings
    backend: str
    precision: str
    max_context: int
    files: dict[str, str]  # role -> file name: vision, decoder, tokenizer, chat_template
    hashes: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    sizes: dict[str, int] = field(default_factory=dict)  # file name -> bytes
    versions: dict[str, str] = field(default_factory=dict)
    graph_passes: list[str] = field(default_factory=list)
    generation_defaults: dict = field(default_factory=dict)  # the checkpoint's sampling defaults
    # KV cache storage type the build wrote (fp32/fp16/int8; int8: ONNX Runtime graphs only, static
    # scales whose granularity graph_passes records). None: manifests from before the field.
    kv_dtype: str | None = None
    # int8/int4 builds: how each weight was quantized and why ({"default": format, "tensors": {part:
    # {weight: {bits, block_size, symmetric, scale_search, reason, shape, bytes}}}, and "sensitivity"
    # with --keep-sensitive). A record for people and tools: the runtime reads the graphs' own
    # attributes. None: not quantized, or a manifest from before the field.
    quantization: dict | None = None

    def to_json(self) -> str:
        body = asdict(self)
        return json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, **body}, indent=2)


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def update_manifest(engine_dir: str | Path, edit: Callable[[dict], None]) -> None:
    """Rewrites the manifest of an engine folder whose files a later step changed: `edit` changes
    the manifest's JSON object in place. The new manifest replaces the old one whole."""
    path = Path(engine_dir) / MANIFEST
    manifest = json.loads(path.read_text())
    edit(manifest)
    temporary = path.with_name(f".{MANIFEST}.writing")
    temporary.write_text(json.dumps(manifest, indent=2))
    os.replace(temporary, path)


def load_manifest(engine_dir: str | Path, verify_hashes: bool = False) -> Manifest:
    folder = Path(engine_dir)
    if not folder.is_dir():
        raise EngineError(f"engine folder not found: {folder} (build one with `qwen3vl build`)")
    path = folder / MANIFEST
    if not path.is_file():
        raise EngineError(f"{folder}: no {MANIFEST}; not an engine folder, or its build did not finish")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise EngineError(f"{path}: unreadable ({exc})") from None
    if raw.get("format") != FORMAT:
        raise EngineError(f"{path}: not a qwen3vl engine manifest")
    if raw.get("format_version") != FORMAT_VERSION:
        raise EngineError(
            f"{folder}: built by an incompatible version (engine format {raw.get('format_version')}, "
            f"this runtime reads {FORMAT_VERSION}); rebuild it with `qwen3vl build`"
        )
    try:
        model = raw["model"]
        manifest = Manifest(
            model=ModelFacts(**{**model, "eos_token_ids": tuple(model["eos_token_ids"])}),
            image_processor=ImageProcessorSettings(**{
                **raw["image_processor"],
                "image_mean": tuple(raw["image_processor"]["image_mean"]),
                "image_std": tuple(raw["image_processor"]["image_std"]),
            }),
            **{k: raw[k] for k in ("backend", "precision", "max_context", "files", "hashes", "sizes", "versions",
                                   "graph_passes", "generation_defaults")},
            kv_dtype=raw.get("kv_dtype"),
            quantization=raw.get("quantization"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise EngineError(f"{path}: incomplete manifest ({exc})") from None
    _check_field_types(manifest, path)
    names = set(manifest.files.values()) | set(manifest.sizes) | set(manifest.hashes)
    for name in sorted(names, key=str):
        file = contained_file(folder, name)
        if not file.is_file():
            raise EngineError(f"{folder}: engine file {name} is missing")
        if name in manifest.sizes and file.stat().st_size != manifest.sizes[name]:
            raise EngineError(f"{folder}: engine file {name} is incomplete or changed "
                              f"({file.stat().st_size} bytes, expected {manifest.sizes[name]})")
        if verify_hashes:
            if not manifest.hashes.get(name):
                raise EngineError(f"{folder}: engine file {name} has no recorded hash to verify")
            if sha256_file(file) != manifest.hashes[name]:
                raise EngineError(f"{folder}: engine file {name} does not match its recorded hash")
    for name in sorted(n for n in manifest.files.values() if n.endswith(".onnx")):
        _check_external_data(folder, name, manifest)
    return manifest


def _check_field_types(manifest: Manifest, path: Path) -> None:
    def mapping(value, key_type, value_type) -> bool:
        return isinstance(value, dict) and all(isinstance(k, key_type) and isinstance(v, value_type)
                                               and not isinstance(v, bool) for k, v in value.items())

    checks = {
        "files": mapping(manifest.files, str, str),
        "sizes": mapping(manifest.sizes, str, int),
        "hashes": mapping(manifest.hashes, str, str),
        "max_context": isinstance(manifest.max_context, int) and manifest.max_context > 0,
        "generation_defaults": isinstance(manifest.generation_defaults, dict),
        "quantization": manifest.quantization is None or isinstance(manifest.quantization, dict),
        "files.tokenizer": "tokenizer" in manifest.files if isinstance(manifest.files, dict) else False,
    }
    bad = [name for name, ok in checks.items() if not ok]
    if bad:
        raise EngineError(f"{path}: malformed manifest ({', '.join(bad)})")


def contained_file(folder: Path, name) -> Path:
    """folder / name, refused unless `name` is a plain file name that stays inside the folder (no
    absolute path, no `..`, no subfolder, no symlink leading out): engine folders are data from others."""
    if (not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name
            or os.path.isabs(name)):
        raise EngineError(f"{folder}: engine file name {name!r} is not a plain file name inside the folder")
    path = folder / name
    if path.exists() and path.resolve().parent != folder.resolve():
        raise EngineError(f"{folder}: engine file {name} leads outside the engine folder")
    return path


def _check_external_data(folder: Path, graph: str, manifest: Manifest) -> None:
    """Every weight file a graph refers to is a listed engine file inside the folder."""
    from .onnx_external_data import MalformedModel, external_data_locations

    try:
        locations = external_data_locations((folder / graph).read_bytes())
    except (OSError, MalformedModel) as exc:
        raise EngineError(f"{folder}: engine file {graph} is not a readable ONNX model ({exc})") from None
    for location in sorted(locations):
        contained_file(folder, location)
        if location not in manifest.sizes:
            raise EngineError(f"{folder}: {graph} reads weights from {location!r}, which the manifest does not list")
