"""Qwen3-VL image preprocessing in numpy + Pillow.

Produces the same ``pixel_values`` / ``image_grid_thw`` as transformers' ``Qwen2VLImageProcessorPil``
(the processor Qwen3-VL uses): RGB conversion with transparency composited onto white, ``smart_resize``
to multiples of ``patch_size * merge_size``, Pillow BICUBIC resize, rescale by 1/255, normalise, and
patchify in spatial-merge-block order.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from runtime.errors import ImageError

# Larger than Pillow's default bomb threshold (~179 MP hard error) so that big photos and scans load,
# but still bounded: decoding 300 MP of RGB takes ~0.9 GB.
MAX_IMAGE_PIXELS = 300_000_000

# The reference rejects anything more elongated than this (the grid would degenerate).
MAX_ASPECT_RATIO = 200

# Pillow keeps its bomb limit in a module global; serialise our temporary override of it.
_PIL_LIMIT_LOCK = threading.Lock()


def _check_positive_int(name: str, value: Any) -> None:
    # bool is an int subclass; `True` as a pixel budget is surely a mistake.
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ImageError(f"image processor setting {name} must be a positive integer, got {value!r}")


def _as_triple(name: str, value: Any) -> tuple[float, float, float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = (value, value, value)
    try:
        triple = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ImageError(f"image processor setting {name} must be 3 numbers, got {value!r}") from None
    if len(triple) != 3 or not all(math.isfinite(v) for v in triple):
        raise ImageError(f"image processor setting {name} must be 3 finite numbers, got {value!r}")
    return triple  # type: ignore[return-value]


@dataclass(frozen=True)
class ImageProcessorSettings:
    """What the checkpoint's preprocessor_config.json says, plus any pixel-budget override."""

    min_pixels: int = 65536
    max_pixels: int = 16777216
    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        for name in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size"):
            value = getattr(self, name)
            _check_positive_int(name, value)
            object.__setattr__(self, name, int(value))
        if self.min_pixels > self.max_pixels:
            raise ImageError(
                f"image processor setting min_pixels ({self.min_pixels}) is larger than max_pixels ({self.max_pixels})"
            )
        object.__setattr__(self, "image_mean", _as_triple("image_mean", self.image_mean))
        std = _as_triple("image_std", self.image_std)
        if any(s == 0.0 for s in std):
            raise ImageError(f"image processor setting image_std must not contain zero, got {list(std)}")
        object.__setattr__(self, "image_std", std)

    @property
    def factor(self) -> int:
        """Resized sides are multiples of this: one merged visual token covers factor x factor pixels."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_preprocessor_config(cls, d: dict) -> "ImageProcessorSettings":
        """Read a checkpoint's preprocessor_config.json (as a dict), accepting every layout in use.

        Newer files: ``size: {shortest_edge, longest_edge}`` (both in pixels). Older files: top-level
        ``min_pixels`` / ``max_pixels`` (also some put those two keys inside ``size``). When both forms are
        present the top-level keys win, as in the reference processor's ``__init__``.
        """
        if not isinstance(d, dict):
            raise ImageError(f"preprocessor config must be a JSON object, got {type(d).__name__}")
        kwargs: dict[str, Any] = {}
        size = d.get("size")
        if size is not None:
            if not isinstance(size, dict):
                raise ImageError(f"image processor setting size must be an object, got {size!r}")
            for key, field in (
                ("min_pixels", "min_pixels"),
                ("max_pixels", "max_pixels"),
                ("shortest_edge", "min_pixels"),
                ("longest_edge", "max_pixels"),
            ):
                # shortest_edge/longest_edge come later so they win over the legacy keys inside `size`.
                if size.get(key) is not None:
                    kwargs[field] = size[key]
        for key in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size"):
            if d.get(key) is not None:
                kwargs[key] = d[key]
        for key in ("image_mean", "image_std"):
            if d.get(key) is not None:
                kwargs[key] = d[key]
        return cls(**kwargs)

    def with_budget(self, min_pixels: int | None = None, max_pixels: int | None = None) -> "ImageProcessorSettings":
        """A copy with the pixel budget overridden (None keeps the current value)."""
        changes: dict[str, int] = {}
        if min_pixels is not None:
            changes["min_pixels"] = min_pixels
        if max_pixels is not None:
            changes["max_pixels"] = max_pixels
        return dataclasses.replace(self, **changes)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Target (height, width): multiples of ``factor``, area within [min_pixels, max_pixels], aspect kept.

    Same arithmetic as the reference (Python ``round`` is round-half-even there too), so the grids agree.
    """
    if height <= 0 or width <= 0:
        raise ImageError(f"image has zero size ({width}x{height} pixels)")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageError(
            f"image aspect ratio {ratio:.1f}:1 ({width}x{height} pixels) exceeds the limit of {MAX_ASPECT_RATIO}:1"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency (alpha band or tRNS/palette transparency) composited onto white."""
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode == "RGB":
        # convert("RGB") would only copy; skipping it saves a full copy of a huge photo.
        return image
    return image.convert("RGB")


def _open_path(path: str, limit: int) -> Image.Image:
    if not os.path.exists(path):
        raise ImageError(f"image file not found: {path}")
    if os.path.isdir(path):
        raise ImageError(f"image path is a directory, not a file: {path}")
    with _PIL_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        # Pillow warns above MAX_IMAGE_PIXELS and refuses above twice that; put its threshold at ours
        # and do the refusing ourselves, with a clear message.
        Image.MAX_IMAGE_PIXELS = limit
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                try:
                    image = Image.open(path)
                except PermissionError:
                    raise ImageError(f"image file is not readable (permission denied): {path}") from None
                except Image.UnidentifiedImageError:
                    raise ImageError(f"not an image file (unrecognised format): {path}") from None
                except Image.DecompressionBombError:
                    raise ImageError(
                        f"image is too large (more than {limit / 1e6:.0f} megapixels, the limit): {path}"
                    ) from None
                except (OSError, SyntaxError, ValueError, EOFError) as exc:
                    raise ImageError(
                        f"cannot read image (corrupt or unsupported): {path} ({_one_line(exc)})"
                    ) from None
                width, height = image.size
                if width * height > limit:
                    image.close()
                    raise ImageError(
                        f"image is too large ({width}x{height} = {width * height / 1e6:.0f} megapixels, "
                        f"limit {limit / 1e6:.0f}): {path}"
                    )
                try:
                    # Decode now: truncation and corrupt data only surface when pixels are read.
                    image.load()
                except Image.DecompressionBombError:
                    image.close()
                    raise ImageError(
                        f"image is too large (more than {limit / 1e6:.0f} megapixels, the limit): {path}"
                    ) from None
                except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
                    image.close()
                    raise ImageError(f"image file is truncated or corrupt: {path} ({_one_line(exc)})") from None
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    try:
        # Files are shown upright by viewers; transformers' load_image applies the EXIF orientation too.
        ImageOps.exif_transpose(image, in_place=True)
    except Exception as exc:  # a malformed EXIF block must not look like a crash
        image.close()
        raise ImageError(f"cannot apply EXIF orientation of {path}: {_one_line(exc)}") from None
    return image


def _from_array(array: np.ndarray) -> Image.Image:
    if array.dtype != np.uint8:
        raise ImageError(f"unsupported image array dtype {array.dtype} (expected uint8)")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ImageError(
            f"unsupported image array shape {tuple(array.shape)} (expected HxW, HxWx3 or HxWx4 uint8, channels last)"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageError(f"image array has zero size {tuple(array.shape)}")
    # uint8 HxW / HxWx3 / HxWx4 map to Pillow's L / RGB / RGBA.
    return Image.fromarray(np.ascontiguousarray(array))


def load_image(source: Any, *, max_image_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Load ``source`` (path, PIL image or uint8 numpy array) as a decoded RGB PIL image.

    Paths get their EXIF orientation applied (as transformers does when given a path); PIL images and
    arrays are taken as they are. Transparency is composited onto white. Every failure is an ImageError.
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        image = _open_path(path, max_image_pixels)
        try:
            rgb = _to_rgb(image)
        except (OSError, ValueError) as exc:
            image.close()
            raise ImageError(f"cannot convert image to RGB: {path} ({_one_line(exc)})") from None
        if rgb is not image:
            image.close()  # multi-frame files keep their file handle open until closed
        return rgb
    if isinstance(source, Image.Image):
        try:
            source.load()  # a lazily opened image may still be truncated
            return _to_rgb(source)
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            name = getattr(source, "filename", "") or "<PIL image>"
            raise ImageError(f"cannot decode image {name}: {_one_line(exc)}") from None
    if isinstance(source, np.ndarray):
        return _to_rgb(_from_array(source))
    raise ImageError(
        f"unsupported image source of type {type(source).__name__} (expected a path, a PIL image or a numpy array)"
    )


@dataclass
class ProcessedImages:
    pixel_values: np.ndarray  # (total_patches, C*T*P*P) float32
    image_grid_thw: np.ndarray  # (n_images, 3) int64
    merge_size: int = 2

    @property
    def tokens_per_image(self) -> list[int]:
        """Number of <|image_pad|> tokens each image occupies in the prompt (one per merge block)."""
        merge_area = self.merge_size**2
        return [int(t * h * w) // merge_area for t, h, w in self.image_grid_thw.tolist()]


def _normalisation_table(settings: ImageProcessorSettings) -> np.ndarray:
    """(3, 256) float32: every uint8 value per channel after rescale and normalise.

    Same float steps as the reference (uint8 -> float64 * (1/255) -> float32, then (x - mean) / std in
    float32), so a table lookup is bit-identical while avoiding full-size float64 temporaries.
    """
    scaled = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    mean = np.asarray(settings.image_mean, dtype=np.float32)[:, None]
    std = np.asarray(settings.image_std, dtype=np.float32)[:, None]
    return (scaled[None, :] - mean) / std


def _patchify(normalised: np.ndarray, settings: ImageProcessorSettings) -> np.ndarray:
    """(H, W, C) float32 -> (grid_h*grid_w, C*T*P*P), rows in merge-block order."""
    height, width, channels = normalised.shape
    p, m, t = settings.patch_size, settings.merge_size, settings.temporal_patch_size
    grid_h, grid_w = height // p, width // p
    blocks = normalised.reshape(grid_h // m, m, p, grid_w // m, m, p, channels)
    # -> (block row, block col, row in block, col in block, C, patch row, patch col)
    blocks = blocks.transpose(0, 3, 1, 4, 6, 2, 5)
    out = np.empty((grid_h // m, grid_w // m, m, m, channels, t, p, p), dtype=np.float32)
    # A still image is the same frame repeated temporal_patch_size times.
    out[...] = blocks[:, :, :, :, :, None, :, :]
    return out.reshape(grid_h * grid_w, channels * t * p * p)


def preprocess_images(images: list, settings: ImageProcessorSettings) -> ProcessedImages:
    """Turn images (paths, PIL images or uint8 arrays) into the vision encoder's pixel_values + grids."""
    if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)):
        images = [images]
    table = _normalisation_table(settings)
    all_patches: list[np.ndarray] = []
    grids: list[list[int]] = []
    for source in images:
        image = load_image(source)
        width, height = image.size
        new_h, new_w = smart_resize(height, width, settings.factor, settings.min_pixels, settings.max_pixels)
        # Always resize (even to the same size), as the reference does.
        resized = image.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
        # Free the (possibly huge) decoded original before building float arrays.
        if image is not source:
            image.close()
        del image
        pixels = np.asarray(resized)
        del resized
        normalised = np.empty(pixels.shape, dtype=np.float32)
        for c in range(pixels.shape[2]):
            normalised[:, :, c] = table[c][pixels[:, :, c]]
        del pixels
        all_patches.append(_patchify(normalised, settings))
        del normalised
        grids.append([1, new_h // settings.patch_size, new_w // settings.patch_size])
    if not all_patches:
        raise ImageError("no images given")
    pixel_values = all_patches[0] if len(all_patches) == 1 else np.concatenate(all_patches, axis=0)
    return ProcessedImages(
        pixel_values=pixel_values,
        image_grid_thw=np.asarray(grids, dtype=np.int64).reshape(-1, 3),
        merge_size=settings.merge_size,
    )
