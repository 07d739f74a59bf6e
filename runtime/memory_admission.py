"""Memory admitted before it is used: a request's peak is estimated from its shapes and refused
with one line saying what to lower when it will not fit.

The figure compared against is what this process may still use: the container's limit (cgroup v2
`memory.max` - `memory.current`, or v1 `memory.limit_in_bytes` - `memory.usage_in_bytes`) where one is
set, else the host's MemAvailable; the smaller when both exist.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .engine_manifest import ModelFacts
from .errors import Qwen3VLError

# Share of the available memory a request may plan to use: the rest covers what the estimate leaves
# out (allocator slack, Python objects, the tokenizer) and other processes' growth.
HEADROOM = 0.85
PATCH_VALUES = 3 * 2 * 16 * 16  # floats per vision patch row (C * T * P * P)


class OutOfMemoryError(Qwen3VLError):
    """A request that would not fit in the memory this process may use."""


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_free(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> int | None:
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        relative = path.lstrip("/")
        if hierarchy == "0" and controllers == "":  # v2: one unified hierarchy
            for folder in (root / relative, root):
                limit = _read_int(folder / "memory.max")
                if limit is not None:
                    used = _read_int(folder / "memory.current") or 0
                    return max(0, limit - used)
        elif "memory" in controllers.split(","):  # v1
            for folder in (root / "memory" / relative, root / "memory"):
                limit = _read_int(folder / "memory.limit_in_bytes")
                if limit is not None and limit < 1 << 60:  # "unlimited" is a huge number
                    used = _read_int(folder / "memory.usage_in_bytes") or 0
                    return max(0, limit - used)
    return None


def _mem_available(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_memory_bytes() -> int | None:
    """Bytes this process may still allocate, or None where the system does not say."""
    figures = [f for f in (_cgroup_free(), _mem_available()) if f is not None]
    return min(figures) if figures else None


@dataclass
class MemoryEstimate:
    parts: dict[str, int] = field(default_factory=dict)  # what -> bytes held at the peak

    @property
    def total(self) -> int:
        return sum(self.parts.values())


def estimate_request(model: ModelFacts, rows: int, longest: int, capacity: int, kv_bytes_per_value: int,
                     image_patches: list[int], frame_layout: tuple[int, int] | None, prefill_chunk: int | None,
                     act_bytes: int = 4) -> MemoryEstimate:
    """The peak of one request: its image patches and KV cache live throughout; the vision encoder's
    and the prefill's working sets come one after the other, so only the larger counts.

    image_patches: patches per image after resizing; frame_layout: (frames, longest frame) of the
    vision encoder's padded attention batch; act_bytes: bytes per activation value (4 for FP32 math).
    """
    m = model
    patches = sum(image_patches)
    pixels = patches * PATCH_VALUES * 4
    vision = 0
    if frame_layout is not None:
        frames, frame_len = frame_layout
        vision_hidden = m.vision_head_dim * m.vision_num_heads
        # Scores and probabilities per frame, plus the residual stream, MLP and qkv of all patches.
        vision = 2 * m.vision_num_heads * frames * frame_len * frame_len * act_bytes
        vision += patches * vision_hidden * 12 * act_bytes
    kv = 2 * m.num_hidden_layers * rows * m.num_key_value_heads * capacity * m.head_dim * kv_bytes_per_value
    chunk = min(prefill_chunk or longest, longest)
    # ONNX Runtime's CPU attention holds (rows, heads, chunk, keys) scores; then activations of one
    # layer (residual, qkv, MLP), the dense visual/deepstack inputs and the logits.
    prefill = rows * m.num_attention_heads * chunk * capacity * act_bytes
    prefill += rows * chunk * (6 * m.hidden_size + 3 * m.intermediate_size) * act_bytes
    prefill += rows * chunk * m.hidden_size * (1 + m.num_deepstack) * act_bytes
    prefill += rows * m.vocab_size * 4
    return MemoryEstimate({"image patches": pixels, "KV cache": kv,
                           "vision encoder" if vision >= prefill else "prefill": max(vision, prefill)})


def admit(estimate: MemoryEstimate, available: int | None = None, what_to_lower: str = "") -> None:
    """Raises OutOfMemoryError when the estimate does not fit in HEADROOM of what is available."""
    available = available_memory_bytes() if available is None else available
    if available is None or estimate.total <= HEADROOM * available:
        return
    parts = ", ".join(f"{name} {size / 2**30:.2f}" for name, size in estimate.parts.items() if size)
    raise OutOfMemoryError(
        f"this request needs about {estimate.total / 2**30:.1f} GiB ({parts} GiB) but {available / 2**30:.1f} GiB is "
        f"available{': ' + what_to_lower if what_to_lower else ''}")
