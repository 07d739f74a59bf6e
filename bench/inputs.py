"""The bench's picture: a file, or a deterministic synthetic one of a given size."""

from __future__ import annotations


def parse_size(text: str) -> tuple[int, int]:
    from runtime.errors import ImageError

    width, sep, height = text.lower().partition("x")
    if not (sep and width.isdigit() and height.isdigit() and int(width) > 0 and int(height) > 0):
        raise ImageError(f"--image-size must be WIDTHxHEIGHT in pixels, e.g. 448x448, got {text!r}")
    if int(width) * int(height) > 100_000_000:
        raise ImageError(f"--image-size {text} is over 100 MP")
    return int(width), int(height)


def synthetic_image(width: int, height: int):
    """The same picture for a given size on every run and machine: colour ramps, a grid of discs
    and fixed-seed noise, so that resizing, patches and attention all see varied content."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = x / max(1, width - 1), y / max(1, height - 1)
    red, green, blue = 255 * u, 255 * v, 255 * (1 - u) * (1 - v)
    cell = max(8, min(width, height) // 6)
    disc = ((x % cell - cell / 2) ** 2 + (y % cell - cell / 2) ** 2) < (cell / 3) ** 2
    noise = np.random.default_rng(0).normal(0, 12, size=(height, width, 3)).astype(np.float32)
    rgb = np.stack([np.where(disc, 255 - red, red), np.where(disc, 240.0, green), np.where(disc, 40.0, blue)], -1)
    return Image.fromarray(np.clip(rgb + noise, 0, 255).astype(np.uint8))
