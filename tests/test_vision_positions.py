"""runtime.vision_positions against transformers' vision_utils and Qwen3VLVisionRotaryEmbedding (the oracles)."""

import numpy as np
import pytest

from runtime.vision_positions import vision_inputs

torch = pytest.importorskip("torch")
vision_utils = pytest.importorskip("transformers.vision_utils")
qwen3_vl = pytest.importorskip("transformers.models.qwen3_vl.modeling_qwen3_vl")
configuration = pytest.importorskip("transformers.models.qwen3_vl.configuration_qwen3_vl")

GRID_SETS = [
    [[1, 2, 2]],  # smallest image
    [[1, 64, 94]],
    [[1, 2, 400], [1, 400, 2]],  # extreme aspect ratios
    [[1, 48, 48]],  # exactly the learned table's size
    [[1, 4, 6], [1, 10, 10], [1, 36, 18], [1, 2, 2]],  # several images at once
    [[2, 10, 6], [1, 4, 4]],  # a two-frame entry: one segment per frame
]


def expected(grids, side, merge, hidden, heads):
    grid_thw = torch.tensor(grids)
    indices, weights = vision_utils.get_vision_interpolation_indices_and_weights(
        grid_thw, side, mode="bilinear", align_corners=True, spatial_merge_size=merge
    )
    position_ids = vision_utils.get_vision_position_ids(grid_thw, merge)
    config = configuration.Qwen3VLVisionConfig(hidden_size=hidden, num_heads=heads)
    rotary = qwen3_vl.Qwen3VLVisionRotaryEmbedding(config)
    cos, sin = rotary(torch.zeros(1), position_ids)
    cu_seqlens = vision_utils.get_vision_cu_seqlens(grid_thw).numpy()
    segments = np.repeat(np.arange(len(cu_seqlens) - 1), np.diff(cu_seqlens))
    return indices.numpy(), weights.numpy(), cos.numpy(), sin.numpy(), segments


@pytest.mark.parametrize("grids", GRID_SETS)
@pytest.mark.parametrize("hidden,heads", [(1024, 16), (1152, 16)])  # head_dim 64 (Qwen3-VL-2B) and 72
def test_matches_transformers(grids, hidden, heads):
    indices, weights, cos, sin, segments = expected(grids, 48, 2, hidden, heads)
    ours = vision_inputs(
        np.array(grids), num_position_embeddings=48 * 48, spatial_merge_size=2, head_dim=hidden // heads
    )
    n = sum(t * h * w for t, h, w in grids)
    assert ours.pos_indices.shape == (n, 4) and ours.pos_indices.dtype == np.int64
    assert ours.pos_weights.shape == (n, 4) and ours.pos_weights.dtype == np.float32
    assert ours.rotary_cos.shape == (n, hidden // heads) and ours.rotary_cos.dtype == np.float32
    assert ours.rotary_sin.dtype == np.float32 and ours.patch_frame_slot.dtype == np.int64
    np.testing.assert_array_equal(ours.pos_indices, indices)
    np.testing.assert_allclose(ours.pos_weights, weights, rtol=0, atol=1e-6)
    np.testing.assert_allclose(ours.rotary_cos, cos, rtol=0, atol=1e-6)
    np.testing.assert_allclose(ours.rotary_sin, sin, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(frame_of_each_patch(ours), segments)


def test_other_table_and_merge_size():
    grids = [[1, 9, 6], [1, 3, 12]]
    indices, weights, *_ = expected(grids, 16, 3, 1024, 16)
    ours = vision_inputs(np.array(grids), num_position_embeddings=256, spatial_merge_size=3, head_dim=64)
    np.testing.assert_array_equal(ours.pos_indices, indices)
    np.testing.assert_allclose(ours.pos_weights, weights, rtol=0, atol=1e-6)


def frame_of_each_patch(ours) -> np.ndarray:
    """Reads the block-diagonal layout back into one frame id per packed patch, checking it is consistent."""
    frames, longest = ours.frame_patch_index.shape
    frame, position = np.divmod(ours.patch_frame_slot, longest)
    n = len(ours.patch_frame_slot)
    # Every patch sits in exactly one valid slot, and that slot points back at it.
    np.testing.assert_array_equal(ours.frame_patch_index[frame, position], np.arange(n))
    assert ours.frame_patch_mask[frame, position].all()
    assert ours.frame_patch_mask.sum() == n and len(set(ours.patch_frame_slot.tolist())) == n
    return frame


def test_weights_sum_to_one_and_attention_blocks_are_per_frame():
    ours = vision_inputs(np.array([[2, 4, 4], [1, 6, 2]]), 2304, 2, 64)
    np.testing.assert_allclose(ours.pos_weights.sum(axis=1), 1.0, atol=1e-6)
    assert frame_of_each_patch(ours).tolist() == [0] * 16 + [1] * 16 + [2] * 12
    assert ours.frame_patch_index.shape == (3, 16)
    assert ours.frame_patch_mask.sum(axis=1).tolist() == [16, 16, 12]


def test_rejects_bad_grids():
    with pytest.raises(ValueError):
        vision_inputs(np.array([[1, 3, 4]]), 2304, 2, 64)  # height not a multiple of the merge size
    with pytest.raises(ValueError):
        vision_inputs(np.array([[1, 4, 4]]), 2300, 2, 64)  # table not square
