"""runtime.rope_index against transformers' Qwen3VLModel.get_rope_index (the oracle)."""

import numpy as np
import pytest

from runtime.errors import PromptError
from runtime.rope_index import rope_index

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

IMG, VID, START, END, PAD = 90, 91, 92, 93, 0


def tiny_config():
    return transformers.Qwen3VLConfig(
        text_config=dict(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]},
        ),
        vision_config=dict(
            depth=1,
            hidden_size=16,
            intermediate_size=32,
            num_heads=2,
            out_hidden_size=32,
            patch_size=4,
            temporal_patch_size=2,
            spatial_merge_size=2,
            num_position_embeddings=16,
            deepstack_visual_indexes=[0],
        ),
        image_token_id=IMG,
        video_token_id=VID,
        vision_start_token_id=START,
        vision_end_token_id=END,
    )


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return transformers.Qwen3VLForConditionalGeneration(tiny_config()).eval()


def prompt(grids, prefix=(1, 2), suffix=(4, 6, 7)):
    ids = list(prefix)
    for t, h, w in grids:
        ids += [START] + [IMG] * (t * h * w // 4) + [END, 3]
    return ids + list(suffix)


def left_pad(rows):
    width = max(len(r) for r in rows)
    ids = np.array([[PAD] * (width - len(r)) + r for r in rows], dtype=np.int64)
    return ids, (ids != PAD).astype(np.int64)


def reference(model, ids, grids, mask, token_types=None, video_grids=None):
    ids_t = torch.from_numpy(ids)
    types = token_types if token_types is not None else (ids == IMG).astype(np.int32)
    pos, delta = model.model.get_rope_index(
        ids_t,
        mm_token_type_ids=torch.from_numpy(types),
        image_grid_thw=None if grids is None else torch.tensor(grids),
        video_grid_thw=None if video_grids is None else torch.tensor(video_grids),
        attention_mask=None if mask is None else torch.from_numpy(mask),
    )
    return pos.numpy(), delta.numpy()


def check(model, ids, grids, mask=None):
    expected_pos, expected_delta = reference(model, ids, grids, mask)
    pos, delta = rope_index(ids, None if grids is None else np.array(grids), mask, IMG, 2)
    assert pos.dtype == np.int64 and delta.dtype == np.int64
    assert pos.shape == (3,) + ids.shape and delta.shape == (ids.shape[0], 1)
    np.testing.assert_array_equal(pos, expected_pos)
    np.testing.assert_array_equal(delta, expected_delta)
    return pos, delta


def test_text_only(model):
    ids = np.array([[5, 6, 7, 8, 9, 10]])
    pos, delta = check(model, ids, None)
    np.testing.assert_array_equal(pos[0, 0], np.arange(6))
    assert delta[0, 0] == 0


def test_one_image(model):
    grids = [[1, 4, 6]]
    pos, delta = check(model, np.array([prompt(grids)]), grids)
    assert delta[0, 0] != 0  # a 2x3 merged grid uses 6 tokens but advances positions by 3


@pytest.mark.parametrize(
    "grids", [[[1, 4, 6], [1, 8, 2]], [[1, 2, 40], [1, 30, 2]], [[1, 2, 2], [1, 10, 10], [1, 6, 4]]]
)
def test_several_images(model, grids):
    check(model, np.array([prompt(grids)]), grids)


@pytest.mark.parametrize("grid", [[1, 2, 60], [1, 60, 2]])
def test_wide_and_tall(model, grid):
    check(model, np.array([prompt([grid])]), [grid])


def test_left_padded_batch(model):
    grids = [[1, 4, 6], [1, 2, 2], [1, 2, 2]]
    ids, mask = left_pad([prompt(grids[:1]), prompt(grids[1:], prefix=(1,))])
    assert (mask == 0).any()
    pos, _ = check(model, ids, grids, mask)
    assert (pos[:, mask == 0] == 0).all()


def test_text_only_padded_batch(model):
    ids, mask = left_pad([[5, 6, 7, 8], [5, 6]])
    check(model, ids, None, mask)


def test_images_back_to_back(model):
    # transformers assigns one grid per run of image tokens; labelling the second image as a one-frame
    # video splits the run for it while the position formula stays the same.
    first, second = [1, 4, 6], [1, 6, 4]
    n1, n2 = 6, 6
    ids = np.array([[1, 2, START] + [IMG] * n1 + [IMG] * n2 + [END, 4, 5]])
    types = np.zeros_like(ids, dtype=np.int32)
    types[0, 3 : 3 + n1] = 1
    types[0, 3 + n1 : 3 + n1 + n2] = 2
    expected_pos, expected_delta = reference(model, ids, [first], None, token_types=types, video_grids=[second])
    pos, delta = rope_index(ids, np.array([first, second]), None, IMG, 2)
    np.testing.assert_array_equal(pos, expected_pos)
    np.testing.assert_array_equal(delta, expected_delta)


def test_token_count_mismatch_raises():
    grids = np.array([[1, 4, 6]])
    ids = np.array([prompt([[1, 4, 4]])])  # 4 image tokens, the grid needs 6
    with pytest.raises(PromptError, match="4 image tokens.*6") as info:
        rope_index(ids, grids, None, IMG, 2)
    assert "\n" not in str(info.value)
    with pytest.raises(PromptError):
        rope_index(np.array([prompt([[1, 4, 6]])]), None, None, IMG, 2)
