"""Qwen3-VL image preprocessing in numpy + Pillow.

Produces the same ``pixel_values`` / ``image_grid_thw`` as transformers' ``Qwen2VLImageProcessorPil``
(the processor Qwen3-VL uses): RGB conversion with transparency composited onto white, ``smart_resize``
to multiples of ``patch_size * merge_size``, Pillow BICUBIC resize, rescale by 1/255, normalise, and
patchify in spatial-merge-block order. Ordinary 8-bit images give bit-identical results.

Where the reference (Pillow's ``convert("RGB")``) gets colours wrong, this module deliberately differs:

- 16-bit pixels (Pillow modes I;16, I;16L, I;16B, I;16N, and numpy uint16) are scaled to 8 bits as
  round(v / 257); the reference clips them at 255, so a 16-bit grey PNG comes out nearly white. Mode I
  (32-bit integers) is read as 16-bit data and must lie in [0, 65535]. Pillow itself keeps only the
  high byte of 16-bit RGB/RGBA PNGs when it decodes them (at most one level off round(v / 257)).
- Float pixels (Pillow mode F, numpy float16/32/64) must lie in [0, 1] and become round(x * 255); values
  outside, NaN or infinity are refused rather than clipped (transformers truncates x * 255 instead).
- An embedded ICC profile (RGB, grey or CMYK) is converted to sRGB with Little CMS (``PIL.ImageCms``);
  profiles that already render as sRGB (within one level) leave the pixels untouched, so sRGB-tagged
  photos stay identical to the reference. Without ImageCms, or with a malformed profile, the pixels are
  taken as they are, as Pillow does (for CMYK, Pillow's naive CMYK -> RGB).

Animated and multi-page files (GIF, APNG, WebP, TIFF) give their first frame, as transformers'
``load_image`` does; a PIL image is taken at its current frame.

Bounds: every source has at most ``MAX_IMAGE_PIXELS`` pixels, checked from the file header before
anything is decoded (``image_size`` and ``image_grid`` read only headers, so a caller can count visual
tokens and admit memory first). Pillow's own decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``)
belongs to the host program and is never changed here: when it is lower it refuses first, with our
message; its DecompressionBombWarning (between its limit and twice that) is the host's to filter.
Conversion to RGB works in strips, so a large RGBA image costs one RGB copy, not several.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import struct
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin

try:
    from PIL import ImageCms
except ImportError:  # Pillow built without Little CMS: embedded colour profiles are ignored
    ImageCms = None  # type: ignore[assignment]

from runtime.errors import ImageError

# Our ceiling, checked from the header before decoding: 300 MP of RGB is ~0.9 GB decoded (1.2 GB in
# Pillow, which stores RGB as 4 bytes a pixel). Pillow's default bomb limit refuses above ~179 MP first
# unless the host raised or disabled it.
MAX_IMAGE_PIXELS = 300_000_000

# The reference rejects anything more elongated than this (the grid would degenerate).
MAX_ASPECT_RATIO = 200

# Colour conversion works on strips of about this many pixels (4 MB of RGBA per temporary).
_STRIP_PIXELS = 1 << 20

_ORIENTATION = 0x0112
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)  # transpose, rotate 270, transverse, rotate 90
_DEEP_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


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


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.3g}"


def _check_pixels(size: tuple[int, int], limit: int, name: str) -> None:
    width, height = size
    if width * height > limit:
        raise ImageError(
            f"image is too large ({width}x{height} = {_megapixels(width * height)} megapixels, "
            f"limit {_megapixels(limit)}): {name}"
        )


def _refused_by_pillow(name: str) -> ImageError:
    # Pillow refuses above twice the host's Image.MAX_IMAGE_PIXELS; read, never set.
    limit = Image.MAX_IMAGE_PIXELS
    over = f"over {_megapixels(2 * limit)} megapixels, " if limit else ""
    return ImageError(f"image is too large ({over}the limit PIL.Image.MAX_IMAGE_PIXELS sets in this program): {name}")


# ---------------------------------------------------------------- 16-bit and float pixels to 8 bits


def _uint16_to_8bit(values: np.ndarray) -> np.ndarray:
    # round(v / 257), the nearest of the 256 levels (65535 = 255 * 257); no ties for integer v.
    return ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)


def _floats_to_8bit(values: np.ndarray, name: str) -> np.ndarray:
    if values.size == 0:
        return np.zeros(values.shape, np.uint8)
    if not np.isfinite(values).all():
        raise ImageError(f"image has NaN or infinite pixel values: {name}")
    low, high = float(values.min()), float(values.max())
    if low < 0.0 or high > 1.0:
        raise ImageError(
            f"float image values must lie in [0, 1], found [{low:g}, {high:g}] (pass 0-255 data as uint8): {name}"
        )
    work = np.float64 if values.dtype == np.float64 else np.float32
    return np.rint(values.astype(work, copy=False) * work(255)).astype(np.uint8)


def _int32_to_8bit(values: np.ndarray, name: str) -> np.ndarray:
    # Mode I: what Pillow once gave 16-bit PNGs and still gives some TIFFs; read as 16-bit data.
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise ImageError(
            f"32-bit integer image (mode I) is read as 16-bit and must lie in [0, 65535], "
            f"found [{values.min()}, {values.max()}]: {name}"
        )
    return _uint16_to_8bit(values)


def _deep_to_8bit(strip: Image.Image, name: str) -> Image.Image:
    """An I;16*, I or F strip as L, or LA when a 16-bit transparent value (PNG tRNS) is set."""
    values = np.asarray(strip)
    if strip.mode == "F":
        eight = _floats_to_8bit(values, name)
    elif strip.mode == "I":
        eight = _int32_to_8bit(values, name)
    else:
        eight = _uint16_to_8bit(values)
    transparency = strip.info.get("transparency")
    if isinstance(transparency, int) and strip.mode != "F":
        alpha = np.where(values == transparency, 0, 255).astype(np.uint8)
        return Image.merge("LA", (Image.fromarray(eight), Image.fromarray(alpha)))
    return Image.fromarray(eight)


def _rows_per_strip(width: int) -> int:
    return max(1, _STRIP_PIXELS // max(width, 1))


def _array_to_8bit(array: np.ndarray, name: str) -> np.ndarray:
    out = np.empty(array.shape, np.uint8)
    rows = _rows_per_strip(array.shape[1] * (array.shape[2] if array.ndim == 3 else 1))
    for top in range(0, array.shape[0], rows):
        part = array[top : top + rows]
        out[top : top + rows] = _uint16_to_8bit(part) if array.dtype == np.uint16 else _floats_to_8bit(part, name)
    return out


# ---------------------------------------------------------------- embedded colour profiles


def _embedded_profile(image: Image.Image) -> tuple[str | None, Any]:
    """(colour space "RGB" / "GRAY" / "CMYK", profile) of the embedded ICC profile, or (None, None)."""
    icc = image.info.get("icc_profile")
    if ImageCms is None or not icc:
        return None, None
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        space = profile.profile.xcolor_space.strip()
    except (OSError, ValueError, TypeError, AttributeError):  # PyCMSError is an OSError
        return None, None  # a malformed profile: take the pixels as they are, as viewers do
    return (space, profile) if space in ("RGB", "GRAY", "CMYK") else (None, None)


def _renders_as_srgb(transform: Any, mode: str) -> bool:
    """True when the RGB transform moves no probe colour by more than one level (an sRGB profile)."""
    levels = np.arange(0, 256, 17, dtype=np.uint8)
    lattice = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), axis=-1).reshape(-1, 3)
    ramp = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
    expected = np.concatenate([lattice, ramp])[None]
    probe = expected
    if mode == "RGBA":
        probe = np.concatenate([expected, np.full(expected.shape[:2] + (1,), 255, np.uint8)], axis=2)
    out = np.asarray(ImageCms.applyTransform(Image.fromarray(probe), transform))[..., :3]
    return int(np.abs(out.astype(np.int16) - expected).max()) <= 1


def _grey_to_srgb(profile: Any, srgb: Any) -> Callable[[Image.Image], Image.Image] | None:
    # Little CMS's optimised 8-bit grey transforms are up to 10 levels off near black (measured with a
    # linear grey profile); 256 inputs make an exact lookup table cheap instead.
    exact = ImageCms.buildTransform(profile, srgb, "L", "RGB", flags=ImageCms.Flags.NOOPTIMIZE)
    table = np.asarray(ImageCms.applyTransform(Image.fromarray(np.arange(256, dtype=np.uint8)[None]), exact))[0]
    if int(np.abs(table.astype(np.int16) - np.arange(256)[:, None]).max()) <= 1:
        return None
    tables = [table[:, c].tolist() for c in range(3)]

    def convert(strip: Image.Image) -> Image.Image:
        rgb = Image.merge("RGB", [strip.getchannel(0).point(t) for t in tables])
        if strip.mode == "LA":
            rgb.putalpha(strip.getchannel("A"))
        return rgb

    return convert


def _srgb_converter(space: str | None, profile: Any, mode: str) -> Callable[[Image.Image], Image.Image] | None:
    """A function taking strips in `mode` from the embedded profile to sRGB (RGB or RGBA), or None when
    there is no usable profile or it already renders as sRGB."""
    if space is None:
        return None
    # (space, strip mode) -> (input mode, output mode) of the Little CMS transform
    modes = {
        ("RGB", "RGB"): ("RGB", "RGB"),
        ("RGB", "RGBA"): ("RGBA", "RGBA"),
        ("CMYK", "CMYK"): ("CMYK", "RGB"),
    }.get((space, mode))
    try:
        srgb = ImageCms.createProfile("sRGB")
        if space == "GRAY" and mode in ("L", "LA"):
            return _grey_to_srgb(profile, srgb)
        if modes is None:
            return None
        transform = ImageCms.buildTransform(profile, srgb, *modes)
        if space == "RGB" and _renders_as_srgb(transform, mode):
            return None
    except (OSError, ValueError, TypeError, AttributeError):  # a profile Little CMS cannot use: pixels as they are
        return None
    return lambda strip: ImageCms.applyTransform(strip, transform)


# ---------------------------------------------------------------- any mode to RGB


def _has_transparency(image: Image.Image) -> bool:
    # The reference's rule (an alpha band, or tRNS / palette transparency), plus the premultiplied modes.
    return "A" in image.getbands() or image.mode in ("La", "RGBa") or image.info.get("transparency") is not None


def _working_mode(mode: str, alpha: bool, space: str | None) -> str:
    """The 8-bit mode a strip is brought to before colour management (Pillow converts the rest itself)."""
    if mode in _DEEP_MODES:
        mode = "LA" if alpha and mode != "F" else "L"
    mode = {"La": "LA", "RGBa": "RGBA"}.get(mode, mode)
    if space is None:
        return mode
    if alpha and mode not in ("LA", "RGBA"):
        # Transparency held in info (tRNS, palette alpha) becomes a band: transforms drop info.
        return "LA" if space == "GRAY" and mode == "L" else "RGBA"
    if space == "RGB" and mode in ("P", "PA"):
        return "RGBA" if alpha else "RGB"
    return mode


def _rgb_converter(image: Image.Image, name: str) -> Callable[[Image.Image], Image.Image] | None:
    """A function taking any strip of `image` to RGB, or None when `image` is RGB as it stands."""
    alpha = _has_transparency(image)
    space, profile = _embedded_profile(image)
    mode = _working_mode(image.mode, alpha, space)
    to_srgb = _srgb_converter(space, profile, mode)
    if to_srgb is None:
        mode = _working_mode(image.mode, alpha, None)  # no colour management: the reference's path
    if image.mode == "RGB" and to_srgb is None and not alpha:
        return None

    def convert(strip: Image.Image) -> Image.Image:
        if strip.mode in _DEEP_MODES:
            strip = _deep_to_8bit(strip, name)
        if strip.mode != mode:
            strip = strip.convert(mode)
        if to_srgb is not None:
            strip = to_srgb(strip)
        if alpha:
            # PIL's own compositing onto white, as the reference does, one strip at a time.
            white = Image.new("RGBA", strip.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, strip.convert("RGBA")).convert("RGB")
        return strip if strip.mode == "RGB" else strip.convert("RGB")

    return convert


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    """RGB, 8 bits a channel, sRGB, any transparency composited onto white.

    Works in strips of rows, so a large image costs its RGB result plus a few strip-sized temporaries
    (converting a 30 MP RGBA whole took four full-size copies).
    """
    convert = _rgb_converter(image, name)
    if convert is None:
        return image  # convert("RGB") would only copy; skipping it saves a full copy of a huge photo
    width, height = image.size
    rows = _rows_per_strip(width)
    if rows >= height:
        return convert(image)
    out = Image.new("RGB", image.size)
    for top in range(0, height, rows):
        box = (0, top, width, min(height, top + rows))
        out.paste(convert(image.crop(box)), box[:2])
    return out


# ---------------------------------------------------------------- sources


_FORMATS = ("PNG", "JPEG", "MPO", "GIF", "WEBP", "BMP", "DIB", "TIFF", "PPM", "TGA", "ICO", "JPEG2000", "PCX",
            "SGI", "QOI", "AVIF", "HEIF")


def _raster_formats() -> list[str]:
    """_FORMATS that this Pillow build opens (plugins vary by build and version)."""
    Image.init()
    return [f for f in _FORMATS if f in Image.OPEN]


def _open_header(path: str, limit: int) -> Image.Image:
    """Open `path` lazily: the header is read (format, size, metadata), no pixel is decoded."""
    if not os.path.exists(path):
        raise ImageError(f"image file not found: {path}")
    if os.path.isdir(path):
        raise ImageError(f"image path is a directory, not a file: {path}")
    try:
        # Pillow checks its own bomb limit (the host's setting) here, from the header. Only raster
        # formats Pillow decodes itself: an EPS file (whatever its name) would run Ghostscript.
        image = Image.open(path, formats=_raster_formats())
    except PermissionError:
        raise ImageError(f"image file is not readable (permission denied): {path}") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"not an image file (unrecognised format): {path}") from None
    except Image.DecompressionBombError:
        raise _refused_by_pillow(path) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"cannot read image (corrupt or unsupported): {path} ({_one_line(exc)})") from None
    try:
        _check_pixels(image.size, limit, path)
    except ImageError:
        image.close()
        raise
    return image


def _open_path(path: str, limit: int) -> Image.Image:
    image = _open_header(path, limit)
    try:
        # Decode now: truncation and corrupt data only surface when pixels are read.
        image.load()
    except Image.DecompressionBombError:  # some formats check again per frame or tile
        image.close()
        raise _refused_by_pillow(path) from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        image.close()
        raise ImageError(f"image file is truncated or corrupt: {path} ({_one_line(exc)})") from None
    try:
        # Files are shown upright by viewers; transformers' load_image applies the EXIF orientation too.
        ImageOps.exif_transpose(image, in_place=True)
    except Exception as exc:  # a malformed EXIF block must not look like a crash
        image.close()
        raise ImageError(f"cannot apply EXIF orientation of {path}: {_one_line(exc)}") from None
    return image


def _png_metadata(image: Image.Image, path: str) -> dict:
    """The PNG's info as decoding leaves it: metadata chunks after the image data update it then.

    Walks the chunk headers and seeks over the image data, so nothing is decompressed but text.
    """
    info = dict(image.info)
    try:
        with open(path, "rb") as fp:
            if fp.read(8) != b"\x89PNG\r\n\x1a\n":
                return info
            stream = PngImagePlugin.PngStream(fp)
            stream.im_info = info
            after_data = False
            animated = bool(getattr(image, "is_animated", False))
            while True:
                cid, pos, length = stream.read()
                # Decoding the first frame reads up to IEND, or to the next frame's fcTL.
                if cid == b"IEND" or (after_data and animated and cid == b"fcTL"):
                    break
                if after_data and cid in (b"eXIf", b"tEXt", b"zTXt", b"iTXt"):
                    stream.call(cid, pos, length)
                else:
                    fp.seek(pos + length)
                after_data = after_data or cid in (b"IDAT", b"fdAT")
                fp.read(4)  # CRC
    except (OSError, EOFError, SyntaxError, ValueError, struct.error):
        pass  # a damaged tail is for decoding to report
    return info


def _stored_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) as stored, before any EXIF orientation."""
    tags = getattr(image, "tag_v2", None)
    if image.format == "TIFF" and tags is not None and 256 in tags and 257 in tags:
        # Recent Pillow reports a TIFF's size already upright (and transposes it when decoding).
        return int(tags[256]), int(tags[257])
    return image.size


def _orientation(image: Image.Image, path: str) -> int:
    """The EXIF orientation loading would apply, read without decoding."""
    try:
        if image.format == "PNG":
            # PngImageFile.getexif decodes the image to reach chunks after the data; read them directly.
            carrier = Image.new("1", (1, 1))
            carrier.info = _png_metadata(image, path)
            exif = carrier.getexif()
        else:
            exif = image.getexif()
        return int(exif.get(_ORIENTATION, 1))
    except Exception as exc:  # as loading: a malformed EXIF block is an ImageError
        raise ImageError(f"cannot apply EXIF orientation of {path}: {_one_line(exc)}") from None


def _check_array(array: np.ndarray) -> None:
    if not (array.dtype in (np.uint8, np.uint16) or array.dtype.kind == "f"):
        raise ImageError(
            f"unsupported image array dtype {array.dtype} (expected uint8, uint16, or floats in [0, 1])"
        )
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3, 4))):
        raise ImageError(
            f"unsupported image array shape {tuple(array.shape)} (expected HxW, HxWx1, HxWx3 or HxWx4, channels last)"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageError(f"image array has zero size {tuple(array.shape)}")


def _from_array(array: np.ndarray) -> Image.Image:
    _check_array(array)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.dtype != np.uint8:
        array = _array_to_8bit(array, "<numpy array>")
    # uint8 HxW / HxWx3 / HxWx4 map to Pillow's L / RGB / RGBA.
    return Image.fromarray(np.ascontiguousarray(array))


def _path_of(source: Any) -> str | None:
    if not isinstance(source, (str, os.PathLike)):
        return None
    path = os.fspath(source)
    return os.fsdecode(path) if isinstance(path, bytes) else path


def _unsupported_source(source: Any) -> ImageError:
    return ImageError(
        f"unsupported image source of type {type(source).__name__} (expected a path, a PIL image or a numpy array)"
    )


def load_image(source: Any, *, max_image_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Load ``source`` (path, PIL image or numpy array) as a decoded 8-bit sRGB PIL image.

    Paths get their EXIF orientation applied (as transformers does when given a path); PIL images and
    arrays are taken as they are. Arrays may be uint8, uint16 or floats in [0, 1], HxW or HxWxC with 1,
    3 or 4 channels. Animated and multi-page files give their first frame (as transformers does); a PIL
    image gives its current frame. Transparency is composited onto white, embedded colour profiles are
    converted to sRGB, and more than ``max_image_pixels`` pixels are refused before decoding. Every
    failure is an ImageError with a one-line message.
    """
    path = _path_of(source)
    if path is not None:
        image = _open_path(path, max_image_pixels)
        try:
            rgb = _to_rgb(image, path)
        except ImageError:
            image.close()
            raise
        except (OSError, ValueError) as exc:
            image.close()
            raise ImageError(f"cannot convert image to RGB: {path} ({_one_line(exc)})") from None
        if rgb is not image:
            image.close()  # multi-frame files keep their file handle open until closed
        return rgb
    if isinstance(source, Image.Image):
        name = getattr(source, "filename", "") or "<PIL image>"
        _check_pixels(source.size, max_image_pixels, name)  # before a lazily opened image decodes
        try:
            source.load()  # a lazily opened image may still be truncated
        except Image.DecompressionBombError:
            raise _refused_by_pillow(name) from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageError(f"cannot decode image {name}: {_one_line(exc)}") from None
        try:
            return _to_rgb(source, name)
        except (OSError, ValueError) as exc:
            raise ImageError(f"cannot convert image to RGB: {name} ({_one_line(exc)})") from None
    if isinstance(source, np.ndarray):
        _check_array(source)
        _check_pixels((source.shape[1], source.shape[0]), max_image_pixels, "<numpy array>")
        return _to_rgb(_from_array(source), "<numpy array>")
    raise _unsupported_source(source)


def image_size(source: Any, *, max_image_pixels: int = MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """(width, height) of ``source`` as ``load_image`` would return it, reading only the file header.

    Paths are upright (EXIF orientations 5-8 swap the sides). Raises the ImageErrors loading raises for
    a missing, unreadable, unrecognised or too large file; damage inside the pixel data (truncation)
    only shows when the image is decoded.
    """
    path = _path_of(source)
    if path is not None:
        image = _open_header(path, max_image_pixels)
        try:
            width, height = _stored_size(image)
            if _orientation(image, path) in _SWAPPING_ORIENTATIONS:
                width, height = height, width
        finally:
            image.close()
        return width, height
    if isinstance(source, Image.Image):
        _check_pixels(source.size, max_image_pixels, getattr(source, "filename", "") or "<PIL image>")
        return source.size
    if isinstance(source, np.ndarray):
        _check_array(source)
        size = (int(source.shape[1]), int(source.shape[0]))
        _check_pixels(size, max_image_pixels, "<numpy array>")
        return size
    raise _unsupported_source(source)


def image_grid(
    source: Any, settings: ImageProcessorSettings, *, max_image_pixels: int = MAX_IMAGE_PIXELS
) -> tuple[int, int, int]:
    """The (t, h, w) patch grid ``preprocess_images`` gives ``source``, from its header alone.

    Visual tokens are t * h * w / merge_size**2; a caller can count them and admit memory before any
    image is decoded.
    """
    width, height = image_size(source, max_image_pixels=max_image_pixels)
    new_h, new_w = smart_resize(height, width, settings.factor, settings.min_pixels, settings.max_pixels)
    return 1, new_h // settings.patch_size, new_w // settings.patch_size


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
    """Turn images (paths, PIL images or numpy arrays) into the vision encoder's pixel_values + grids."""
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
