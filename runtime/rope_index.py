"""Multimodal RoPE (M-RoPE) position ids for Qwen3-VL prompts, in numpy.

Same results as transformers' ``Qwen3VLModel.get_rope_index`` for text + image prompts:

* text tokens take consecutive positions, equal on the T, H and W axes;
* an image with patch grid (t, h, w) occupies t * (h/m) * (w/m) consecutive image tokens (m = spatial
  merge size); starting at position p its tokens get T = p + frame, H = p + row, W = p + col over the
  merged grid, and the next token starts at p + max(h, w) / m;
* padding (attention_mask 0) gets position 0 and is skipped when counting.

Unlike the reference, which assigns one grid per *run* of image tokens, grids are consumed by token
count, so two images with no text between them are still placed correctly.
"""

from __future__ import annotations

import numpy as np

from runtime.errors import PromptError


def _image_block(start: int, grid: np.ndarray, merge: int) -> np.ndarray:
    """(3, t*hm*wm) positions of one image placed at ``start``, in the order its tokens appear."""
    t, h, w = (int(v) for v in grid)
    hm, wm = h // merge, w // merge
    frame = np.repeat(np.arange(t, dtype=np.int64), hm * wm)
    row = np.tile(np.repeat(np.arange(hm, dtype=np.int64), wm), t)
    col = np.tile(np.arange(wm, dtype=np.int64), t * hm)
    return np.stack([frame, row, col]) + start


def rope_index(
    input_ids: np.ndarray,
    image_grid_thw: np.ndarray | None,
    attention_mask: np.ndarray | None,
    image_token_id: int,
    spatial_merge_size: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """Position ids (3, B, S) int64 and rope deltas (B, 1) int64 for a (possibly left-padded) batch.

    Images are taken from ``image_grid_thw`` in order across the whole batch (row 0's images first).
    ``rope_delta = max_position + 1 - number_of_unmasked_tokens`` per row: a decode step's position is (tokens in the cache) + delta.
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise PromptError(f"input_ids must have shape (batch, sequence), got {ids.shape}")
    batch, seq = ids.shape
    if attention_mask is None:
        mask = np.ones((batch, seq), dtype=bool)
    else:
        mask = np.asarray(attention_mask).astype(bool)
        if mask.shape != ids.shape:
            raise PromptError(f"attention_mask shape {mask.shape} does not match input_ids shape {ids.shape}")
    merge = int(spatial_merge_size)
    grids = np.zeros((0, 3), dtype=np.int64) if image_grid_thw is None else np.asarray(image_grid_thw, np.int64)
    grids = grids.reshape(-1, 3)
    if (grids <= 0).any() or (grids[:, 1:] % merge).any():
        raise PromptError(
            f"image grids must be positive with height and width divisible by {merge}, got {grids.tolist()}"
        )
    tokens_per_grid = grids[:, 0] * (grids[:, 1] // merge) * (grids[:, 2] // merge)
    is_image = (ids == image_token_id) & mask
    n_image_tokens = int(is_image.sum())
    if n_image_tokens != int(tokens_per_grid.sum()):
        raise PromptError(
            f"prompt has {n_image_tokens} image tokens but the {len(grids)} image(s) need "
            f"{int(tokens_per_grid.sum())}"
        )

    position_ids = np.zeros((3, batch, seq), dtype=np.int64)
    deltas = np.zeros((batch, 1), dtype=np.int64)
    next_grid = 0
    for b in range(batch):
        row_is_image = is_image[b][mask[b]]
        n = row_is_image.shape[0]
        if n == 0:
            continue
        pieces: list[np.ndarray] = []
        pos = 0
        # Split the row into runs of text / image tokens (a few runs per prompt, so a Python loop is cheap).
        boundaries = np.flatnonzero(np.diff(row_is_image.astype(np.int8))) + 1
        starts = np.concatenate([[0], boundaries])
        ends = np.concatenate([boundaries, [n]])
        for start, end in zip(starts.tolist(), ends.tolist()):
            length = end - start
            if not row_is_image[start]:
                pieces.append(np.broadcast_to(np.arange(pos, pos + length, dtype=np.int64), (3, length)))
                pos += length
                continue
            while length > 0:
                # The total count matched above, so a grid is always available here.
                grid = grids[next_grid]
                need = int(tokens_per_grid[next_grid])
                if need > length:
                    raise PromptError(
                        f"image {next_grid} needs {need} consecutive image tokens but the prompt has a run of {length}"
                    )
                pieces.append(_image_block(pos, grid, merge))
                pos += max(int(grid[1]), int(grid[2])) // merge
                length -= need
                next_grid += 1
        positions = np.concatenate(pieces, axis=1)
        position_ids[:, b, mask[b]] = positions
        deltas[b, 0] = int(positions.max()) + 1 - n
    return position_ids, deltas

