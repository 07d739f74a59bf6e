"""runtime.image_processing against transformers' Qwen2VLImageProcessorPil (the oracle)."""

import io
import math
import os
import random

import numpy as np
import pytest
from PIL import Image

from runtime.errors import ImageError
from runtime.image_processing import (
    ImageProcessorSettings,
    load_image,
    preprocess_images,
    smart_resize,
)

ref_module = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")

SMALL_MIN = 32 * 32 * 4
SMALL_MAX = 32 * 32 * 64


def reference(min_pixels=SMALL_MIN, max_pixels=SMALL_MAX):
    return ref_module.Qwen2VLImageProcessorPil(
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
    )


SMALL = ImageProcessorSettings(min_pixels=SMALL_MIN, max_pixels=SMALL_MAX)


def random_rgb(height, width, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def assert_same_as_reference(images, settings=SMALL, ref=None, ref_inputs=None):
    ref = ref or reference(settings.min_pixels, settings.max_pixels)
    expected = ref(ref_inputs if ref_inputs is not None else images)
    ours = preprocess_images(images, settings)
    np.testing.assert_array_equal(ours.image_grid_thw, expected["image_grid_thw"])
    assert ours.image_grid_thw.dtype == np.int64
    assert ours.pixel_values.dtype == np.float32
    assert ours.pixel_values.shape == expected["pixel_values"].shape
    assert np.abs(ours.pixel_values - expected["pixel_values"]).max() <= 1e-6
    return ours


SIZES = [
    (1, 1),
    (2, 3),
    (3, 500),  # wide, below min_pixels
    (600, 4),  # tall
    (199, 1),  # aspect 199:1, just inside the limit
    (1, 200),  # exactly at the limit
    (31, 33),  # odd sizes, rounds to one merge block
    (257, 129),
    (333, 777),  # above max_pixels -> downscale
    (1000, 1500),  # well above max_pixels
    (64, 64),  # already a multiple of the factor
    (95, 161),
]


@pytest.mark.parametrize("height,width", SIZES)
def test_sizes_match_reference(height, width):
    image = Image.fromarray(random_rgb(height, width, seed=height * 1000 + width))
    assert_same_as_reference([image])


def test_several_images_in_one_call():
    images = [Image.fromarray(random_rgb(h, w, seed=i)) for i, (h, w) in enumerate([(40, 90), (300, 120), (17, 17)])]
    ours = assert_same_as_reference(images)
    assert ours.tokens_per_image == [int(t * h * w) // 4 for t, h, w in ours.image_grid_thw]
    assert sum(ours.tokens_per_image) * 4 == ours.pixel_values.shape[0]


def test_default_budget_on_moderate_image():
    image = Image.fromarray(random_rgb(300, 420, seed=5))
    ours = assert_same_as_reference([image], settings=ImageProcessorSettings(), ref=reference(65536, 16777216))
    # 300x420 is below the default 65536 minimum, so it is upscaled.
    assert ours.image_grid_thw[0, 1] * ours.image_grid_thw[0, 2] * 256 >= 65536


def test_rgba_transparency_composited_on_white():
    rgba = np.concatenate([random_rgb(70, 90, seed=1), np.zeros((70, 90, 1), np.uint8)], axis=2)
    rgba[:, :, 3] = np.random.default_rng(2).integers(0, 256, (70, 90), dtype=np.uint8)
    rgba[:10, :, 3] = 0  # fully transparent band must come out white
    ours = assert_same_as_reference([Image.fromarray(rgba, "RGBA")])
    # Arrays take the reference's numpy compositing path; it must agree too.
    assert_same_as_reference([rgba])
    assert np.all(np.asarray(load_image(rgba))[:10] == 255)
    assert ours.pixel_values.shape[0] > 0


def test_grayscale():
    gray = np.random.default_rng(3).integers(0, 256, (50, 70), dtype=np.uint8)
    assert_same_as_reference([Image.fromarray(gray, "L")])
    # transformers does not accept a 2-D array; its (H, W, 1) form is the same image.
    assert_same_as_reference([gray], ref_inputs=[gray[:, :, None]])
    assert_same_as_reference([gray[:, :, None]])


def test_palette_with_transparency_and_la():
    rng = np.random.default_rng(4)
    palette_image = Image.fromarray(rng.integers(0, 16, (60, 45), dtype=np.uint8), "P")
    palette_image.putpalette(rng.integers(0, 256, 16 * 3, dtype=np.uint8).tobytes())
    assert_same_as_reference([palette_image])
    palette_image.info["transparency"] = 3
    assert_same_as_reference([palette_image])
    la = Image.fromarray(rng.integers(0, 256, (33, 66, 2), dtype=np.uint8), "LA")
    assert_same_as_reference([la])


def test_rgb_array_and_path_inputs(tmp_path):
    array = random_rgb(80, 120, seed=6)
    assert_same_as_reference([array])
    png = tmp_path / "photo.png"
    Image.fromarray(array).save(png)
    # transformers loads a path string with its own load_image.
    assert_same_as_reference([str(png)], ref_inputs=[str(png)])
    assert_same_as_reference([png], ref_inputs=[str(png)])


def test_exif_orientation_applied_for_paths(tmp_path):
    array = random_rgb(48, 96, seed=7)
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    Image.fromarray(array).save(path, exif=exif, quality=95)
    ours = assert_same_as_reference([str(path)], ref_inputs=[str(path)])
    assert load_image(path).size == (48, 96)  # upright: width and height swapped
    assert ours.image_grid_thw.shape == (1, 3)


def test_pillow_bomb_limit_is_the_hosts_and_ours_applies_beyond_it(tmp_path, monkeypatch):
    # Issue 11: Image.MAX_IMAGE_PIXELS belongs to the host program. A small file stands in for a huge one.
    path = tmp_path / "big.png"
    Image.fromarray(random_rgb(60, 60, seed=8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # the host's limit: Pillow refuses above 2000
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)
    with pytest.raises(ImageError, match="too large") as info:
        load_image(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert Image.MAX_IMAGE_PIXELS == 1000  # left as the host set it
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # the host disabled Pillow's check
    assert load_image(path).size == (60, 60)
    with pytest.raises(ImageError, match="too large") as info:
        load_image(path, max_image_pixels=3000)
    assert str(path) in str(info.value)
    assert Image.MAX_IMAGE_PIXELS is None


def test_smart_resize_matches_reference():
    rng = random.Random(0)
    for _ in range(2000):
        h = rng.randint(1, 5000)
        w = rng.randint(max(1, math.ceil(h / 200)), min(5000, h * 200))
        lo = rng.choice([SMALL_MIN, 65536, 3136])
        hi = rng.choice([SMALL_MAX, 16777216, 1280 * 32 * 32])
        if lo > hi:
            lo, hi = hi, lo
        assert smart_resize(h, w, 32, lo, hi) == ref_module.smart_resize(h, w, 32, lo, hi), (h, w, lo, hi)


@pytest.mark.parametrize("height,width", [(1, 201), (1000, 4), (3, 700)])
def test_aspect_ratio_above_200_rejected(height, width):
    with pytest.raises(ValueError):
        ref_module.smart_resize(height, width, 32, SMALL_MIN, SMALL_MAX)
    with pytest.raises(ImageError, match="200") as info:
        smart_resize(height, width, 32, SMALL_MIN, SMALL_MAX)
    assert "\n" not in str(info.value)
    with pytest.raises(ImageError):
        preprocess_images([random_rgb(height, width)], SMALL)


def test_zero_size_rejected():
    with pytest.raises(ImageError):
        smart_resize(0, 10, 32, SMALL_MIN, SMALL_MAX)
    with pytest.raises(ImageError):
        preprocess_images([np.zeros((0, 5, 3), np.uint8)], SMALL)


def test_settings_from_preprocessor_config_all_forms():
    mean = [0.48145466, 0.4578275, 0.40821073]
    std = [0.26862954, 0.26130258, 0.27577711]
    configs = [
        {"size": {"shortest_edge": 1000, "longest_edge": 9000}, "patch_size": 14, "image_mean": mean, "image_std": std},
        {"min_pixels": 3136, "max_pixels": 12845056, "merge_size": 2, "temporal_patch_size": 2},
        # both forms: the top-level keys win, as in the reference __init__
        {"size": {"shortest_edge": 1000, "longest_edge": 9000}, "min_pixels": 2000, "max_pixels": 8000},
        {"size": {"shortest_edge": 1000, "longest_edge": 9000}, "max_pixels": 50000},
    ]
    for config in configs:
        ours = ImageProcessorSettings.from_preprocessor_config(config)
        ref = ref_module.Qwen2VLImageProcessorPil(**config)
        assert ours.min_pixels == ref.size["shortest_edge"], config
        assert ours.max_pixels == ref.size["longest_edge"], config
        assert ours.patch_size == config.get("patch_size", 16)
    settings = ImageProcessorSettings.from_preprocessor_config(configs[0])
    assert settings.image_mean == tuple(mean) and settings.image_std == tuple(std)
    assert settings.factor == 28
    assert ImageProcessorSettings.from_preprocessor_config({}) == ImageProcessorSettings()


def test_settings_budget_override_and_validation():
    base = ImageProcessorSettings()
    small = base.with_budget(max_pixels=1280 * 32 * 32)
    assert (small.min_pixels, small.max_pixels) == (65536, 1280 * 32 * 32)
    assert base.max_pixels == 16777216  # the original is unchanged
    assert base.with_budget(min_pixels=1024).min_pixels == 1024
    for bad, field in [
        (dict(min_pixels=10, max_pixels=5), "min_pixels"),
        (dict(max_pixels=0), "max_pixels"),
        (dict(patch_size=-16), "patch_size"),
        (dict(merge_size=1.5), "merge_size"),
        (dict(image_std=(0.5, 0.0, 0.5)), "image_std"),
        (dict(image_mean=(0.5, 0.5)), "image_mean"),
    ]:
        with pytest.raises(ImageError, match=field):
            ImageProcessorSettings(**bad)
    with pytest.raises(ImageError, match="min_pixels"):
        base.with_budget(min_pixels=base.max_pixels + 1)


def _one_line_error_with_path(source, path):
    with pytest.raises(ImageError) as info:
        load_image(source)
    message = str(info.value)
    assert path in message and "\n" not in message
    return message


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.png")
    assert "not found" in _one_line_error_with_path(path, path)


def test_text_file_named_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n")
    assert "not an image" in _one_line_error_with_path(path, str(path))


@pytest.mark.parametrize("fmt,ext", [("PNG", "png"), ("JPEG", "jpg")])
def test_truncated_image(tmp_path, fmt, ext):
    buffer = io.BytesIO()
    Image.fromarray(random_rgb(64, 64, seed=9)).save(buffer, fmt)
    path = tmp_path / f"cut.{ext}"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) * 2 // 3])
    assert "truncated or corrupt" in _one_line_error_with_path(str(path), str(path))


def test_directory_and_unreadable(tmp_path, monkeypatch):
    _one_line_error_with_path(str(tmp_path), str(tmp_path))
    path = tmp_path / "secret.png"
    Image.fromarray(random_rgb(8, 8)).save(path)
    os.chmod(path, 0)
    try:
        if os.access(path, os.R_OK):
            # root ignores file modes: make the open itself fail the way it would for a normal user.
            def denied(fp, *args, **kwargs):
                raise PermissionError(13, "Permission denied", str(fp))

            monkeypatch.setattr(Image, "open", denied)
        assert "permission" in _one_line_error_with_path(str(path), str(path))
    finally:
        os.chmod(path, 0o600)


@pytest.mark.parametrize(
    "array",
    [
        np.zeros((8, 8, 2), np.uint8),
        np.zeros((8, 8, 3), np.int32),  # uint16 and float arrays are images since issue 11
        np.zeros((2, 8, 8, 3), np.uint8),
        np.zeros((8, 8, 3), np.bool_),
    ],
)
def test_unsupported_array(array):
    with pytest.raises(ImageError, match="unsupported image array") as info:
        load_image(array)
    assert "\n" not in str(info.value)


def test_unsupported_source_type():
    with pytest.raises(ImageError, match="unsupported image source"):
        load_image(12345)
