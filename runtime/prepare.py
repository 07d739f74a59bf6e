"""Host-side input for a batch: prompts and images in, everything the decoder needs besides weights out.

`prepare` is the one place where a request becomes model input: chat template and tokens, images
resized into patches, M-RoPE position ids, the vision encoder's position inputs, and where each
visual token (and its deepstack features) lands in the prompt. The Pipeline, the benchmarks and the
PyTorch reference all call it, so every backend sees the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .backend import DecoderChunk, ImageFeatures, VisionBatch
from .engine_manifest import ModelFacts
from .errors import ImageError, PromptError
from .image_processing import ImageProcessorSettings, image_grid, preprocess_images
from .prompt import PromptBuilder, user_message
from .rope_index import rope_index
from .vision_positions import vision_inputs


@dataclass
class PreparedBatch:
    input_ids: np.ndarray  # (B, S) int64, rows right-padded with the pad id
    lengths: np.ndarray  # (B,) prompt tokens per row
    position_ids: np.ndarray  # (3, B, S) int64 M-RoPE positions
    rope_deltas: np.ndarray  # (B,) decode position = tokens in the cache + delta
    feature_index: np.ndarray  # (B, S) int64: row of the image features at each position, -1 for text
    vision: VisionBatch | None  # None: no images in the batch
    texts: list[str]  # each row's rendered chat

    @property
    def batch(self) -> int:
        return self.input_ids.shape[0]

    @property
    def longest(self) -> int:
        return self.input_ids.shape[1]

    @property
    def image_tokens(self) -> int:
        return int((self.feature_index >= 0).sum())

    def row(self, r: int) -> np.ndarray:
        """Row r's prompt token ids, without padding."""
        return self.input_ids[r, : self.lengths[r]]

    def chunk(self, features: ImageFeatures | None, dtype, start: int = 0, stop: int | None = None,
              rows: slice | int = slice(None)) -> DecoderChunk:
        """The decoder's inputs for prompt columns [start, stop) of `rows` (a slice, or one row), with
        the visual and deepstack embeddings of the image tokens among them; `start` tokens are
        already in the cache."""
        rows = slice(rows, rows + 1) if isinstance(rows, int) else rows
        # Cut to the longest selected row: attention reads a chunk's start as total length - S.
        longest = int(self.lengths[rows].max())
        stop = longest if stop is None else min(stop, longest)
        index = self.feature_index[rows, start:stop]
        lengths = np.clip(self.lengths[rows] - start, 0, stop - start)
        if (lengths < 1).any():
            raise ValueError(f"a chunk from column {start} has rows with no prompt tokens left")
        visual = deepstack = None
        if features is not None and (index >= 0).any():
            is_image = index >= 0
            visual = np.zeros((*index.shape, features.image_embeds.shape[-1]), dtype=dtype)
            visual[is_image] = features.image_embeds[index[is_image]]
            deepstack = np.zeros((features.deepstack_embeds.shape[0], *visual.shape), dtype=dtype)
            deepstack[:, is_image] = features.deepstack_embeds[:, index[is_image]]
        return DecoderChunk(
            input_ids=self.input_ids[rows, start:stop],
            position_ids=self.position_ids[:, rows, start:stop],
            past_lengths=np.full(len(lengths), start, dtype=np.int64),
            lengths=lengths,
            visual_embeds=visual,
            deepstack_embeds=deepstack,
        )

    def decode_positions(self, past_lengths: np.ndarray) -> np.ndarray:
        """M-RoPE position of each row's next token (the same on all three axes)."""
        return np.asarray(past_lengths, dtype=np.int64) + self.rope_deltas


def prepare(prompts: list, images: list[list], prompt_builder: PromptBuilder, settings: ImageProcessorSettings,
            model: ModelFacts, pad_token_id: int, allow_special_tokens: bool = False,
            admit: Callable[[np.ndarray, np.ndarray | None], None] | None = None) -> PreparedBatch:
    """One row per prompt (a string, or a chat as a list of messages), each with its own image list.
    Special-token strings in the prompts are plain text unless `allow_special_tokens`.

    Images are measured from their headers first: the tokens and `admit(lengths, grids)` (context and
    memory checks) come before any image is decoded, so a request that will be refused costs no pixels."""
    if not prompts:
        raise PromptError("no prompts given")
    if len(images) != len(prompts):
        raise PromptError(f"{len(prompts)} prompts but {len(images)} image lists")
    merge_area = settings.merge_size ** 2
    ids, texts, rows_images, row_grids = [], [], [], []
    for prompt, row_images in zip(prompts, images):
        messages, row_images = messages_and_images(prompt, list(row_images))
        grids = [image_grid(image, settings) for image in row_images]
        tokens = prompt_builder.encode(messages, [int(np.prod(g)) // merge_area for g in grids], allow_special_tokens)
        ids.append(tokens.input_ids)
        texts.append(tokens.text)
        rows_images.append(row_images)
        row_grids += grids
    expected = np.asarray(row_grids, dtype=np.int64).reshape(-1, 3) if row_grids else None
    if admit is not None:
        admit(np.array([len(i) for i in ids], dtype=np.int64), expected)
    processed = [preprocess_images(row_images, settings) for row_images in rows_images if row_images]
    if processed and not np.array_equal(np.concatenate([p.image_grid_thw for p in processed]), expected):
        raise ImageError("an image changed size between reading its header and decoding it")

    lengths = np.array([len(i) for i in ids], dtype=np.int64)
    input_ids = np.full((len(ids), int(lengths.max())), pad_token_id, dtype=np.int64)
    mask = np.zeros_like(input_ids)
    for r, row_ids in enumerate(ids):
        input_ids[r, : lengths[r]] = row_ids
        mask[r, : lengths[r]] = 1
    grids = np.concatenate([p.image_grid_thw for p in processed]) if processed else None
    positions, deltas = rope_index(input_ids, grids, mask, model.image_token_id, model.spatial_merge_size)

    is_image = (input_ids == model.image_token_id) & (mask == 1)
    feature_index = np.full(input_ids.shape, -1, dtype=np.int64)
    feature_index[is_image] = np.arange(int(is_image.sum()))  # row-major: images in prompt order
    vision = None
    if processed:
        host = vision_inputs(grids, model.num_position_embeddings, model.spatial_merge_size, model.vision_head_dim,
                             model.vision_rope_theta)
        vision = VisionBatch(np.concatenate([p.pixel_values for p in processed]), grids, host)
    return PreparedBatch(input_ids, lengths, positions, deltas[:, 0].astype(np.int64), feature_index, vision, texts)


def is_chat(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


def messages_and_images(prompt, images: list) -> tuple[list[dict], list]:
    """A prompt and its images as chat messages plus the images in placeholder order."""
    if isinstance(prompt, str):
        return user_message(prompt, len(images)), images
    if not is_chat(prompt):
        raise PromptError("a prompt must be a string or a list of chat messages with 'role' and 'content'")
    embedded = [part.get("image") for message in prompt if isinstance(message.get("content"), list)
                for part in message["content"] if isinstance(part, dict) and part.get("type") == "image"]
    if any(image is not None for image in embedded):
        if images or any(image is None for image in embedded):
            raise PromptError("give images either inside the chat messages or with images=, not both")
        return prompt, embedded
    if len(embedded) != len(images):
        raise PromptError(f"the chat has {len(embedded)} image placeholders but {len(images)} images were given")
    return prompt, images
