"""Host-side inputs of the Qwen3-VL vision encoder, computed from the image grids in numpy.

The encoder graph takes these instead of deriving them from ``grid_thw`` itself, because the
derivation is data-dependent (ragged per-image loops) and exports badly:

* ``pos_indices`` / ``pos_weights``: 4 bilinear taps (align_corners=True) into the learned square
  position-embedding table, resampled to each image's patch grid;
* ``rotary_cos`` / ``rotary_sin``: 2-D axial rotary tables (row frequencies, column frequencies, twice);
* ``frame_patch_index`` / ``frame_patch_mask`` / ``patch_frame_slot``: the block-diagonal attention
  layout. Each frame's patches are gathered into one row of a padded (frames, longest frame) batch,
  attention runs per row with padding masked, and results are scattered back: nothing is computed
  across frames.

All per-patch rows are in spatial-merge-block order, the order of ``pixel_values`` rows. Float maths
follows the same float32 steps as transformers' ``vision_utils`` and ``Qwen3VLVisionRotaryEmbedding``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class VisionInputs:
    pos_indices: np.ndarray  # (N, 4) int64 rows of the flattened position-embedding table
    pos_weights: np.ndarray  # (N, 4) float32 bilinear weights of those rows
    rotary_cos: np.ndarray  # (N, head_dim) float32
    rotary_sin: np.ndarray  # (N, head_dim) float32
    frame_patch_index: np.ndarray  # (F, L) int64: packed row of each slot of each frame (padding: 0)
    frame_patch_mask: np.ndarray  # (F, L) bool: which slots hold a patch
    patch_frame_slot: np.ndarray  # (N,) int64: flat slot (frame * L + position) of each packed patch


def _patch_rows_cols(grids: np.ndarray, merge: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per patch (merge-block order): row, col, and the grid height/width of its image."""
    t, h, w = grids[:, 0], grids[:, 1], grids[:, 2]
    counts = t * h * w
    total = int(counts.sum())
    heights = np.repeat(h, counts)
    widths = np.repeat(w, counts)
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    # Index within one frame; frames of a video repeat the same spatial layout.
    within = (np.arange(total, dtype=np.int64) - starts) % (heights * widths)
    blocks_w = widths // merge
    in_col = within % merge
    in_row = (within // merge) % merge
    block_col = (within // (merge * merge)) % blocks_w
    block_row = within // (merge * merge * blocks_w)
    return block_row * merge + in_row, block_col * merge + in_col, heights, widths


def _bilinear_taps(index: np.ndarray, size: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Two taps per target position along one axis (align_corners=True), clamped to the table."""
    # Closed form of linspace(0, side - 1, size)[index]; float32 like the reference so weights agree.
    src = index.astype(np.float32) * np.float32(side - 1) / np.maximum(size - 1, 1).astype(np.float32)
    floor = np.floor(src)
    offsets = np.arange(2, dtype=np.float32)
    taps = np.clip(floor.astype(np.int64)[:, None] + np.arange(2, dtype=np.int64), 0, side - 1)
    distance = np.abs(src[:, None] - floor[:, None] - offsets)
    weights = np.maximum(np.float32(1) - distance, np.float32(0))
    return taps, weights.astype(np.float32)


def _rotary_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """head_dim/4 inverse frequencies: a quarter of the head for rows, a quarter for columns, then repeated."""
    spatial_dim = head_dim // 2
    exponent = np.arange(0, spatial_dim, 2, dtype=np.float32) / np.float32(spatial_dim)
    # Evaluated in float64 and rounded once; this equals torch's float32 theta ** exponent here.
    power = np.power(np.float64(theta), exponent.astype(np.float64)).astype(np.float32)
    return np.float32(1.0) / power


def vision_inputs(
    image_grid_thw: np.ndarray,
    num_position_embeddings: int,
    spatial_merge_size: int,
    head_dim: int,
    rope_theta: float = 10000.0,
) -> VisionInputs:
    """Everything the vision encoder needs besides ``pixel_values``, for the images in ``image_grid_thw``."""
    grids = np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)
    merge = int(spatial_merge_size)
    side = int(num_position_embeddings**0.5)
    if side * side != num_position_embeddings:
        raise ValueError(f"num_position_embeddings must be a square, got {num_position_embeddings}")
    if (grids <= 0).any() or (grids[:, 1:] % merge).any():
        raise ValueError(f"grids must be positive with height and width divisible by {merge}, got {grids.tolist()}")
    if head_dim % 4:
        raise ValueError(f"vision head_dim must be a multiple of 4, got {head_dim}")

    rows, cols, heights, widths = _patch_rows_cols(grids, merge)

    h_taps, h_weights = _bilinear_taps(rows, heights, side)
    w_taps, w_weights = _bilinear_taps(cols, widths, side)
    pos_indices = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
    pos_weights = (h_weights[:, :, None] * w_weights[:, None, :]).reshape(-1, 4)

    inv_freq = _rotary_inv_freq(head_dim, rope_theta)
    # Angles in float32 exactly as the reference forms them; their cos/sin in float64, rounded once
    # (torch's float32 cos/sin are within 1 ulp of that, so tables agree to ~6e-8).
    freq_h = rows.astype(np.float32)[:, None] * inv_freq[None, :]
    freq_w = cols.astype(np.float32)[:, None] * inv_freq[None, :]
    angles = np.concatenate([freq_h, freq_w], axis=1).astype(np.float64)
    half_cos = np.cos(angles).astype(np.float32)
    half_sin = np.sin(angles).astype(np.float32)
    # Layout (h, w, h, w): rotate-half over the full head pairs each frequency with itself.
    rotary_cos = np.concatenate([half_cos, half_cos], axis=1)
    rotary_sin = np.concatenate([half_sin, half_sin], axis=1)

    frame_index, frame_mask, patch_slot = frame_layout(grids)
    return VisionInputs(
        pos_indices=pos_indices.astype(np.int64),
        pos_weights=pos_weights.astype(np.float32),
        rotary_cos=rotary_cos,
        rotary_sin=rotary_sin,
        frame_patch_index=frame_index,
        frame_patch_mask=frame_mask,
        patch_frame_slot=patch_slot,
    )


def frame_layout(image_grid_thw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Block-diagonal attention layout: one block per image frame (a still image is one frame)."""
    grids = np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)
    lengths = np.repeat(grids[:, 1] * grids[:, 2], grids[:, 0])  # patches per frame
    frames, longest = len(lengths), int(lengths.max())
    starts = np.cumsum(lengths) - lengths
    position = np.arange(longest, dtype=np.int64)
    mask = position[None, :] < lengths[:, None]
    index = np.where(mask, starts[:, None] + position[None, :], 0)
    frame_of_patch = np.repeat(np.arange(frames, dtype=np.int64), lengths)
    slot = frame_of_patch * longest + (np.arange(int(lengths.sum()), dtype=np.int64) - starts[frame_of_patch])
    return index.astype(np.int64), mask, slot
