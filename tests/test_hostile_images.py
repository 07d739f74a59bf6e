"""Issue 11, images: deep and odd pixel formats get the right colours, animated files give their first
frame, decompression bombs are refused from the header without touching Pillow's global limit, large
RGBA images convert without full-size copies, and image_size / image_grid read headers only."""

import io
import os
import struct
import subprocess
import sys
import threading
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile, features

import runtime.image_processing as image_processing
from runtime.errors import ImageError
from runtime.image_processing import (
    ImageProcessorSettings,
    image_grid,
    image_size,
    load_image,
    preprocess_images,
)

SMALL = ImageProcessorSettings(min_pixels=32 * 32 * 4, max_pixels=32 * 32 * 64)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pixels(source, **kwargs):
    return np.asarray(load_image(source, **kwargs)).astype(int)


def one_line_error(call, *args, **kwargs) -> str:
    with pytest.raises(ImageError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message
    return message


# ---------------------------------------------------------------- hand-made PNG files


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bytes(width, height, depth, colour_type, rows: bytes, before=b"", after=b"") -> bytes:
    """A PNG with `before` chunks ahead of the image data and `after` chunks behind it."""
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + before + chunk(b"IDAT", zlib.compress(rows)) + after + chunk(b"IEND", b"")


def filtered_rows(array: np.ndarray) -> bytes:
    return b"".join(b"\0" + row.tobytes() for row in array)


def exif_chunk(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = exif.tobytes()
    return chunk(b"eXIf", data[6:] if data.startswith(b"Exif\0\0") else data)


# ---------------------------------------------------------------- hand-made ICC profiles (v2, matrix/TRC)

D50 = (0.9642, 1.0, 0.8249)
# sRGB's colorants adapted to D50, as ICC profiles store them.
SRGB_RED, SRGB_GREEN, SRGB_BLUE = (0.4361, 0.2225, 0.0139), (0.3851, 0.7169, 0.0971), (0.1431, 0.0606, 0.7141)


def _s15(value):
    return struct.pack(">i", round(value * 65536))


def _xyz(values):
    return b"XYZ " + bytes(4) + b"".join(_s15(v) for v in values)


def _gamma(value):
    return b"curv" + bytes(4) + struct.pack(">IH", 1, round(value * 256)) + bytes(2)


def icc_profile(space: bytes, tags: dict) -> bytes:
    offset = 128 + 4 + 12 * len(tags)
    table, data = b"", b""
    for signature, body in tags.items():
        table += signature + struct.pack(">II", offset + len(data), len(body))
        data += body
    header = (
        struct.pack(">I4sI4s4s4s", offset + len(data), b"none", 0x02100000, b"mntr", space, b"XYZ ")
        + bytes(12)
        + b"acsp"
        + bytes(28)
        + b"".join(_s15(v) for v in D50)
        + bytes(48)
    )
    return header + struct.pack(">I", len(tags)) + table + data


def rgb_profile(red, green, blue, gamma):
    curves = {tag: _gamma(gamma) for tag in (b"rTRC", b"gTRC", b"bTRC")}
    colorants = {b"rXYZ": _xyz(red), b"gXYZ": _xyz(green), b"bXYZ": _xyz(blue)}
    return icc_profile(b"RGB ", {b"wtpt": _xyz(D50), **colorants, **curves})


SWAPPED_PRIMARIES = rgb_profile(SRGB_GREEN, SRGB_RED, SRGB_BLUE, 2.2)  # file red is sRGB green and back
LINEAR_SRGB = rgb_profile(SRGB_RED, SRGB_GREEN, SRGB_BLUE, 1.0)
LINEAR_GREY = icc_profile(b"GRAY", {b"wtpt": _xyz(D50), b"kTRC": _gamma(1.0)})


def srgb_encode(linear):
    return round(255 * (1.055 * linear ** (1 / 2.4) - 0.055 if linear > 0.0031308 else 12.92 * linear))


needs_cms = pytest.mark.skipif(image_processing.ImageCms is None, reason="Pillow built without Little CMS")


# ---------------------------------------------------------------- 16-bit and float pixels

LEVELS_16 = np.array([[0, 128, 129, 257, 385, 386, 32896, 65406, 65535]], np.uint16)
EXPECTED_8 = np.array([[0, 0, 1, 1, 1, 2, 128, 254, 255]])  # round(v / 257)


def test_16_bit_grey_png_is_scaled_not_clipped(tmp_path):
    # transformers (Pillow's convert) clips: everything above 255 comes out white.
    path = tmp_path / "grey16.png"
    Image.fromarray(LEVELS_16).save(path)
    assert Image.open(path).mode == "I;16"
    out = pixels(path)
    for channel in range(3):
        np.testing.assert_array_equal(out[:, :, channel], EXPECTED_8)


def test_every_16_bit_value_rounds_to_the_nearest_8_bit_level():
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    out = pixels(values)[:, :, 0]
    np.testing.assert_array_equal(out, np.round(values / 257))
    assert np.abs(out - values / 257).max() <= 0.5


def test_16_bit_grey_png_with_transparent_value(tmp_path):
    grey = np.array([[1000, 40000, 1000]], ">u2")
    path = tmp_path / "grey16_trns.png"
    path.write_bytes(png_bytes(3, 1, 16, 0, filtered_rows(grey), before=chunk(b"tRNS", struct.pack(">H", 1000))))
    np.testing.assert_array_equal(pixels(path)[0, :, 0], [255, round(40000 / 257), 255])


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I"])
def test_pil_16_bit_modes(mode):
    raw = LEVELS_16.astype(">u2" if mode == "I;16B" else "<u2")
    if mode == "I":
        image = Image.fromarray(LEVELS_16.astype(np.int32))
    else:
        image = Image.frombytes(mode, (LEVELS_16.shape[1], 1), raw.tobytes())
    assert image.mode == mode
    np.testing.assert_array_equal(pixels(image)[:, :, 1], EXPECTED_8)


def test_mode_i_outside_16_bits_is_refused():
    image = Image.fromarray(np.array([[0, 70000]], np.int32))
    assert "[0, 65535]" in one_line_error(load_image, image)
    assert "[0, 65535]" in one_line_error(load_image, Image.fromarray(np.array([[-1, 5]], np.int32)))


def test_float_images_in_unit_range_scale_by_255():
    values = np.arange(256) / 255
    for dtype in (np.float16, np.float32, np.float64):
        array = values.astype(dtype).reshape(16, 16)
        np.testing.assert_array_equal(pixels(array)[:, :, 0], np.arange(256).reshape(16, 16), err_msg=str(dtype))
    mode_f = Image.fromarray(values.astype(np.float32).reshape(16, 16))
    assert mode_f.mode == "F"
    np.testing.assert_array_equal(pixels(mode_f)[:, :, 2], np.arange(256).reshape(16, 16))
    # Between levels: rounded to the nearest (transformers truncates).
    np.testing.assert_array_equal(pixels(np.array([[0.3 / 255, 0.7 / 255, 254.6 / 255]]))[0, :, 0], [0, 1, 255])


@pytest.mark.parametrize("bad", [[0.0, 255.0], [-0.1, 0.5], [0.5, np.nan], [np.inf, 0.5]])
def test_float_images_outside_unit_range_are_refused(bad):
    bad = np.array([bad], np.float32)
    message = one_line_error(load_image, bad)
    assert "[0, 1]" in message or "NaN" in message
    one_line_error(load_image, Image.fromarray(bad))


def test_uint16_and_float_arrays_of_every_shape():
    rng = np.random.default_rng(0)
    rgba16 = rng.integers(0, 65536, (9, 7, 4), dtype=np.uint16)
    rgba16[0, :, 3] = 0
    eight = np.round(rgba16 / 257).astype(np.uint8)
    np.testing.assert_array_equal(pixels(rgba16[:, :, :3]), eight[:, :, :3])
    np.testing.assert_array_equal(pixels(rgba16[:, :, :1]), np.repeat(eight[:, :, :1], 3, axis=2))
    np.testing.assert_array_equal(pixels(rgba16[:, :, 0]), np.repeat(eight[:, :, :1], 3, axis=2))
    np.testing.assert_array_equal(pixels(rgba16), pixels(eight))  # composited exactly as its 8-bit twin
    assert np.all(pixels(rgba16)[0] == 255)
    floats = eight / 255
    np.testing.assert_array_equal(pixels(floats), pixels(eight))
    np.testing.assert_array_equal(pixels(floats[:, :, :3].astype(np.float32)), eight[:, :, :3])


def test_deep_images_convert_the_same_strip_by_strip(monkeypatch):
    rng = np.random.default_rng(1)
    grey16 = rng.integers(0, 65536, (37, 53), dtype=np.uint16)
    floats = rng.random((37, 53, 3))
    whole = [pixels(Image.fromarray(grey16)), pixels(floats)]
    monkeypatch.setattr(image_processing, "_STRIP_PIXELS", 200)  # strips of 3 rows
    np.testing.assert_array_equal(pixels(Image.fromarray(grey16)), whole[0])
    np.testing.assert_array_equal(pixels(floats), whole[1])


# ---------------------------------------------------------------- other modes, known colours


def test_cmyk_without_profile():
    inks = [[0, 0, 0, 0], [255, 0, 0, 0], [0, 255, 0, 0], [0, 0, 255, 0], [0, 0, 0, 255], [0, 0, 0, 128]]
    cmyk = np.array([inks], np.uint8)
    expected = [[255, 255, 255], [0, 255, 255], [255, 0, 255], [255, 255, 0], [0, 0, 0], [127, 127, 127]]
    np.testing.assert_allclose(pixels(Image.fromarray(cmyk, "CMYK"))[0], expected, atol=1)


def test_palette_with_and_without_transparency(tmp_path):
    image = Image.fromarray(np.array([[0, 1, 2, 3]], np.uint8), "P")
    image.putpalette([10, 20, 30, 200, 100, 0, 0, 0, 0, 255, 255, 255] + [0] * (252 * 3))
    np.testing.assert_array_equal(pixels(image)[0], [[10, 20, 30], [200, 100, 0], [0, 0, 0], [255, 255, 255]])
    image.info["transparency"] = 2  # the black entry becomes white
    np.testing.assert_array_equal(pixels(image)[0], [[10, 20, 30], [200, 100, 0], [255, 255, 255], [255, 255, 255]])
    path = tmp_path / "palette_alpha.png"
    image.save(path, transparency=bytes([255, 0, 255, 255]))  # per-entry alpha: the orange entry is clear
    np.testing.assert_array_equal(pixels(path)[0], [[10, 20, 30], [255, 255, 255], [0, 0, 0], [255, 255, 255]])


def test_grey_alpha_and_transparent_values():
    la = Image.fromarray(np.array([[[100, 255], [100, 0], [0, 128]]], np.uint8), "LA")
    np.testing.assert_allclose(pixels(la)[0, :, 0], [100, 255, 255 * 127 / 255], atol=1)
    grey = Image.fromarray(np.array([[0, 7, 200]], np.uint8))
    grey.info["transparency"] = 7
    np.testing.assert_array_equal(pixels(grey)[0, :, 0], [0, 255, 200])
    rgb = Image.fromarray(np.array([[[1, 2, 3], [4, 5, 6]]], np.uint8))
    rgb.info["transparency"] = (4, 5, 6)
    np.testing.assert_array_equal(pixels(rgb)[0], [[1, 2, 3], [255, 255, 255]])


def test_premultiplied_and_other_modes():
    straight = Image.fromarray(np.array([[[200, 100, 0, 128], [9, 9, 9, 0]]], np.uint8), "RGBA")
    premultiplied = straight.convert("RGBa")
    np.testing.assert_allclose(pixels(premultiplied), pixels(straight), atol=1)
    assert np.all(pixels(straight.convert("LA").convert("La"))[0, 1] == 255)
    bilevel = Image.fromarray(np.array([[0, 255]], np.uint8)).convert("1")
    np.testing.assert_array_equal(pixels(bilevel)[0], [[0, 0, 0], [255, 255, 255]])
    rgb = Image.fromarray(np.random.default_rng(2).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    for mode in ("YCbCr", "HSV", "LAB", "RGBX"):
        np.testing.assert_array_equal(pixels(rgb.convert(mode)), np.asarray(rgb.convert(mode).convert("RGB")))


def test_rgba_compositing_is_bit_identical_to_pillow_whole_and_in_strips(monkeypatch):
    # Every (value, alpha) pair, against PIL's alpha_composite of the whole image (the reference's way).
    value, alpha = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    rgba = np.stack([value, 255 - value, (value * 7) % 256, alpha], axis=-1).astype(np.uint8)
    image = Image.fromarray(rgba, "RGBA")
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    expected = np.asarray(Image.alpha_composite(white, image).convert("RGB"))
    np.testing.assert_array_equal(np.asarray(load_image(image)), expected)
    monkeypatch.setattr(image_processing, "_STRIP_PIXELS", 1000)  # 3 rows a strip, a short last strip
    np.testing.assert_array_equal(np.asarray(load_image(image)), expected)
    np.testing.assert_array_equal(np.asarray(load_image(rgba)), expected)


def test_large_rgba_converts_without_full_size_copies():
    # Before issue 11: convert RGBA + white background + alpha_composite + convert RGB = 16 bytes a pixel
    # beyond the source. Now: the RGB result (Pillow stores 4 bytes a pixel) plus strip temporaries.
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak-memory mark")
    script = """
import numpy as np
from PIL import Image
from runtime.image_processing import load_image
def status(key):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))
row = np.random.default_rng(0).integers(0, 256, (1, 4000, 4), dtype=np.uint8)
image = Image.fromarray(np.broadcast_to(row, (3000, 4000, 4)).copy(), "RGBA")
open("/proc/self/clear_refs", "w").write("5")
base = status("VmRSS:")
out = load_image(image)
print((status("VmHWM:") - base) / (4000 * 3000))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    bytes_per_pixel = float(result.stdout.split()[-1])
    assert bytes_per_pixel < 6.5, bytes_per_pixel


# ---------------------------------------------------------------- embedded colour profiles


@needs_cms
def test_icc_profile_is_converted_to_srgb(tmp_path):
    colours = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255], [0, 0, 0]]], np.uint8)
    path = tmp_path / "swapped.png"
    Image.fromarray(colours).save(path, icc_profile=SWAPPED_PRIMARIES)
    swapped = [[0, 255, 0], [255, 0, 0], [0, 0, 255], [255, 255, 255], [0, 0, 0]]
    np.testing.assert_allclose(pixels(path)[0], swapped, atol=1)
    linear = Image.fromarray(np.array([[[128, 0, 200]]], np.uint8))
    linear.info["icc_profile"] = LINEAR_SRGB
    expected = [srgb_encode(128 / 255), 0, srgb_encode(200 / 255)]
    np.testing.assert_allclose(pixels(linear)[0, 0], expected, atol=1)
    # An RGBA image keeps its alpha through the transform, then goes onto white.
    rgba = Image.fromarray(np.array([[[128, 0, 200, 255], [1, 2, 3, 0]]], np.uint8), "RGBA")
    rgba.info["icc_profile"] = LINEAR_SRGB
    np.testing.assert_allclose(pixels(rgba)[0], [expected, [255, 255, 255]], atol=1)


@needs_cms
def test_grey_icc_profile_and_palette_with_profile(tmp_path):
    grey = Image.fromarray(np.array([[0, 128, 200, 7]], np.uint8))
    grey.info["icc_profile"] = LINEAR_GREY
    expected = [0, srgb_encode(128 / 255), srgb_encode(200 / 255), srgb_encode(7 / 255)]
    np.testing.assert_allclose(pixels(grey)[0, :, 0], expected, atol=1)
    grey.info["transparency"] = 7
    np.testing.assert_allclose(pixels(grey)[0, :, 0], expected[:3] + [255], atol=1)
    la = Image.merge("LA", (grey.convert("L"), Image.fromarray(np.array([[255, 255, 0, 255]], np.uint8))))
    la.info["icc_profile"] = LINEAR_GREY
    np.testing.assert_allclose(pixels(la)[0, :, 1], expected[:2] + [255, expected[3]], atol=1)
    palette = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * (254 * 3))
    path = tmp_path / "palette_icc.png"
    palette.save(path, icc_profile=SWAPPED_PRIMARIES)
    np.testing.assert_allclose(pixels(path)[0], [[0, 255, 0], [0, 0, 255]], atol=1)


@needs_cms
def test_srgb_profile_leaves_pixels_identical_to_the_reference(tmp_path):
    from PIL import ImageCms

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    array = np.random.default_rng(3).integers(0, 256, (40, 70, 3), dtype=np.uint8)
    path = tmp_path / "tagged.png"
    Image.fromarray(array).save(path, icc_profile=srgb)
    assert Image.open(path).info["icc_profile"]
    np.testing.assert_array_equal(pixels(path), array)
    ref_module = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    reference = ref_module.Qwen2VLImageProcessorPil(
        patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
        size={"shortest_edge": SMALL.min_pixels, "longest_edge": SMALL.max_pixels},
    )
    expected = reference([str(path)])["pixel_values"]
    np.testing.assert_array_equal(preprocess_images([path], SMALL).pixel_values, expected)


def test_without_little_cms_or_with_a_broken_profile_pixels_are_taken_as_they_are(monkeypatch):
    image = Image.fromarray(np.array([[[255, 0, 0], [10, 20, 30]]], np.uint8))
    image.info["icc_profile"] = b"not a colour profile"
    np.testing.assert_array_equal(pixels(image)[0], [[255, 0, 0], [10, 20, 30]])
    image.info["icc_profile"] = SWAPPED_PRIMARIES
    monkeypatch.setattr(image_processing, "ImageCms", None)
    np.testing.assert_array_equal(pixels(image)[0], [[255, 0, 0], [10, 20, 30]])


# ---------------------------------------------------------------- animated files

ANIMATED = [
    ("gif", {}, None),
    ("png", {}, None),
    ("webp", {"lossless": True}, "webp"),
    ("tiff", {}, None),
]


@pytest.mark.parametrize("ext,options,feature", ANIMATED)
def test_animated_and_multi_page_files_give_their_first_frame(tmp_path, ext, options, feature):
    if feature and not features.check(feature):
        pytest.skip(f"Pillow built without {feature}")
    frames = [Image.new("RGB", (16, 12), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    path = tmp_path / f"frames.{ext}"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0, **options)
    assert Image.open(path).n_frames == 3
    out = pixels(path)
    assert out.shape == (12, 16, 3) and np.all(out == [255, 0, 0])
    assert image_size(path) == (16, 12)
    # A PIL image is taken at its current frame, as transformers takes it.
    opened = Image.open(path)
    opened.seek(1)
    assert np.all(pixels(opened) == [0, 255, 0])


# ---------------------------------------------------------------- decompression bombs


def bomb_png(path, width=100_000, height=100_000):
    """A 10-gigapixel RGB PNG header over a few bytes of data: decoding it would need 40 GB."""
    path.write_bytes(png_bytes(width, height, 8, 2, b"\0" * 64))
    return path


@pytest.fixture
def no_decoding(monkeypatch):
    def refuse(self, *args, **kwargs):
        raise AssertionError("pixel data was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    if features.check("webp"):
        from PIL import WebPImagePlugin

        monkeypatch.setattr(WebPImagePlugin.WebPImageFile, "load", refuse)  # its own, not ImageFile's


@pytest.mark.parametrize("host_limit", ["default", None, 10**12, 1000])
def test_bomb_refused_from_header_with_any_host_limit(tmp_path, monkeypatch, host_limit, no_decoding):
    if host_limit != "default":
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", host_limit)
    before = Image.MAX_IMAGE_PIXELS
    path = bomb_png(tmp_path / "bomb.png")
    for call in (load_image, image_size):
        message = one_line_error(call, path)
        assert "too large" in message and str(path) in message
    assert "too large" in one_line_error(image_grid, path, SMALL)
    assert Image.MAX_IMAGE_PIXELS == before


def test_our_limit_applies_to_lazily_opened_pil_images(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    lazy = Image.open(bomb_png(tmp_path / "bomb.png"))
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded"))  # PNG: ImageFile's load
    assert "too large" in one_line_error(load_image, lazy)
    assert "too large" in one_line_error(image_size, lazy)
    assert "too large" in one_line_error(load_image, np.zeros((20, 20), np.uint8), max_image_pixels=399)


def test_pillow_bomb_warning_is_left_to_the_host(tmp_path, monkeypatch):
    path = tmp_path / "photo.png"
    Image.new("RGB", (60, 60), "red").save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # warns above 2000, refuses above 4000
    with pytest.warns(Image.DecompressionBombWarning):
        assert load_image(path).size == (60, 60)


def test_pillow_global_state_is_never_touched(tmp_path):
    path = tmp_path / "photo.png"
    Image.new("RGBA", (40, 30), (1, 2, 3, 4)).save(path)
    bomb = bomb_png(tmp_path / "bomb.png")
    limit, filters = Image.MAX_IMAGE_PIXELS, warnings.filters
    seen = set()
    done = threading.Event()

    def watch():
        while not done.is_set():
            seen.add((Image.MAX_IMAGE_PIXELS, warnings.filters is filters))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for _ in range(200):
            load_image(path)
            image_size(path)
            with pytest.raises(ImageError):
                load_image(bomb)
    finally:
        done.set()
        watcher.join()
    assert seen == {(limit, True)}


# ---------------------------------------------------------------- image_size and image_grid


def save_with_orientation(path, array, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(array).save(path, exif=exif)


GRID_CASES = [(48, 96), (31, 33), (333, 777), (1000, 1500), (600, 4), (3, 500)]


@pytest.mark.parametrize("height,width", GRID_CASES)
@pytest.mark.parametrize("orientation", range(1, 9))
def test_image_grid_equals_preprocess_grid(tmp_path, height, width, orientation):
    array = np.random.default_rng(height + width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    path = tmp_path / "photo.jpg"
    save_with_orientation(path, array, orientation)
    upright = (height, width) if orientation < 5 else (width, height)
    assert image_size(path) == load_image(path).size == upright[::-1]
    expected = preprocess_images([path], SMALL).image_grid_thw[0].tolist()
    assert list(image_grid(path, SMALL)) == expected
    assert all(type(v) is int for v in image_grid(path, SMALL))


@pytest.mark.parametrize("ext", ["jpg", "png", "tiff", "webp"])
def test_image_size_reads_orientation_of_other_formats_without_decoding(tmp_path, ext, request):
    if ext == "webp" and not features.check("webp"):
        pytest.skip("Pillow built without webp")
    path = tmp_path / f"rotated.{ext}"
    save_with_orientation(path, np.zeros((10, 30, 3), np.uint8), 6)
    assert load_image(path).size == (10, 30)
    request.getfixturevalue("no_decoding")
    with pytest.raises(AssertionError, match="decoded"):
        load_image(path)  # the guard works for this format
    assert image_size(path) == (10, 30)


def test_png_orientation_after_the_image_data(tmp_path, no_decoding):
    # Pillow only sees an eXIf chunk that follows IDAT when it decodes; image_size walks the chunks.
    array = np.arange(10 * 30 * 3, dtype=np.uint32).astype(np.uint8).reshape(10, 30, 3)
    path = tmp_path / "late_exif.png"
    path.write_bytes(png_bytes(30, 10, 8, 2, filtered_rows(array), after=exif_chunk(8)))
    assert image_size(path) == (10, 30)
    assert image_grid(path, SMALL) == (1, 8, 4)
    no_exif = tmp_path / "plain.png"
    no_exif.write_bytes(png_bytes(30, 10, 8, 2, filtered_rows(array)))
    assert image_size(no_exif) == (30, 10)


def test_png_orientation_after_the_data_matches_loading(tmp_path):
    array = np.arange(10 * 30 * 3, dtype=np.uint32).astype(np.uint8).reshape(10, 30, 3)
    path = tmp_path / "late_exif.png"
    path.write_bytes(png_bytes(30, 10, 8, 2, filtered_rows(array), after=exif_chunk(8)))
    assert load_image(path).size == image_size(path) == (10, 30)
    assert tuple(preprocess_images([path], SMALL).image_grid_thw[0]) == image_grid(path, SMALL)


@pytest.mark.parametrize("fmt,ext", [("PNG", "png"), ("JPEG", "jpg")])
def test_truncated_file_has_a_grid_and_only_preprocessing_reports_truncation(tmp_path, fmt, ext):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(4).integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(buffer, fmt)
    path = tmp_path / f"cut.{ext}"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) * 2 // 3])
    assert image_size(path) == (96, 64)
    assert image_grid(path, SMALL) == (1, 4, 6)
    assert "truncated or corrupt" in one_line_error(preprocess_images, [path], SMALL)


def test_image_size_of_pil_images_and_arrays():
    assert image_size(Image.new("RGB", (7, 5))) == (7, 5)
    assert image_size(np.zeros((5, 7), np.uint16)) == (7, 5)
    assert image_size(np.zeros((5, 7, 4), np.float32)) == (7, 5)
    grid = image_grid(np.zeros((300, 120, 3), np.uint8), SMALL)
    assert list(grid) == preprocess_images([np.zeros((300, 120, 3), np.uint8)], SMALL).image_grid_thw[0].tolist()
    assert "unsupported image array" in one_line_error(image_size, np.zeros((5, 7, 2), np.uint8))
    assert "unsupported image source" in one_line_error(image_size, 42)
    assert "200" in one_line_error(image_grid, np.zeros((1, 300), np.uint8), SMALL)


def test_image_size_raises_the_errors_loading_raises(tmp_path, monkeypatch):
    not_image = tmp_path / "notes.png"
    not_image.write_text("this is not an image\n")
    big = tmp_path / "big.png"
    Image.new("RGB", (60, 60)).save(big)
    for source, kwargs in [
        (tmp_path / "missing.png", {}),
        (tmp_path, {}),
        (not_image, {}),
        (big, {"max_image_pixels": 3000}),
    ]:
        assert one_line_error(image_size, source, **kwargs) == one_line_error(load_image, source, **kwargs)

    def denied(fp, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(fp))

    monkeypatch.setattr(Image, "open", denied)
    assert one_line_error(image_size, big) == one_line_error(load_image, big)
    assert "permission" in one_line_error(image_size, big)
