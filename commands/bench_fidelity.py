"""How closely an engine's next-token distributions follow a reference engine's (`qwen3vl bench
--reference`): top-1 agreement and mean KL(P_ref || P_engine) over teacher-forced positions.

Both engines read the same prompt: the bench image, then the bench prompt followed by filler text
long enough for the requested number of positions. The decoder graph returns logits at one
position per call, so the prompt is fed as the runtime feeds it, one token per decoder call after a
prefill of the prefix up to the first position measured: the same kernels as decode, and every
image token goes through its own call with its visual and deepstack embedding rows, so the image
positions are measured too. The window starts at the token before the image, so it covers the
whole image (up to the number of positions) and then text.

Each engine runs in a process of its own in `qwen3vl bench` (two 2B engines need not fit in memory
together): `teacher_forced_logits` there, saved with `save`; `compare` here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_POSITIONS = 256
# Plain, varied English, so that the text positions are ordinary next-token predictions.
FILLER = (
    "The picture above was taken on a quiet morning near the harbour.",
    "Boats of every colour rest on the water while gulls circle overhead.",
    "A narrow street climbs the hill behind the market, lined with old stone houses.",
    "Fishermen sort the night's catch into wooden crates stacked beside the pier.",
    "In the distance a lighthouse stands on the rocks, its lamp dark in the daylight.",
    "Children run along the sea wall and a dog chases them, barking happily.",
    "The smell of fresh bread drifts from a bakery whose door has been left open.",
    "Clouds gather slowly over the western sky, promising rain before the evening.",
    "An old man repairs a net with patient hands, humming a song from his youth.",
    "Two tourists study a paper map and argue gently about which way to go next.",
    "Church bells ring nine times and the market stalls begin to fill with shoppers.",
    "Further along the coast the cliffs turn red and the beach becomes wild and empty.",
)


@dataclass
class TeacherForced:
    logits: np.ndarray  # (positions, vocab) float32: the next-token logits at each measured position
    input_ids: np.ndarray  # (prompt_tokens,) int64: the whole prompt
    start: int  # index in the prompt of the first measured position
    image_positions: int  # measured positions whose input token is an image token

    @property
    def positions(self) -> int:
        return len(self.logits)


def fidelity_prompt(pipe, prompt: str, image, positions: int, min_pixels: int | None = None,
                    max_pixels: int | None = None):
    """(text, request): `prompt` plus as much filler as the window of `positions` needs, encoded
    as Pipeline._prepare encodes it (the chat template around the image and the text)."""
    from runtime.errors import PromptError
    from runtime.prompt import user_message

    if positions < 1:
        raise PromptError("--positions must be >= 1")
    m = pipe.manifest.model
    request = pipe._prepare([prompt], [[image]], min_pixels, max_pixels)[0]
    tokens_per_image = request.processed.tokens_per_image
    text, sentences = prompt, 0
    while True:
        ids = pipe.prompts.encode(user_message(text, 1), tokens_per_image).input_ids
        if len(ids) >= window_start(ids, m.image_token_id) + positions:
            break
        if len(ids) >= pipe.manifest.max_context:
            raise PromptError(f"{positions} positions do not fit in this engine's context of "
                              f"{pipe.manifest.max_context} tokens (use fewer --positions)")
        text = f"{text} {FILLER[sentences % len(FILLER)]}"
        sentences += 1
    if len(ids) >= pipe.manifest.max_context:
        raise PromptError(f"the fidelity prompt is {len(ids)} tokens; this engine was built for a context of "
                          f"{pipe.manifest.max_context} (use fewer --positions or a smaller image)")
    request.input_ids = ids
    return text, request


def window_start(input_ids: np.ndarray, image_token_id: int) -> int:
    """The token before the first image token (it predicts the image's first token), else 0."""
    image = np.flatnonzero(input_ids == image_token_id)
    return max(0, int(image[0]) - 1) if len(image) else 0


def teacher_forced_logits(pipe, prompt: str, image, positions: int = DEFAULT_POSITIONS,
                          min_pixels: int | None = None, max_pixels: int | None = None) -> TeacherForced:
    """Next-token logits of `pipe`'s engine at `positions` consecutive prompt positions."""
    from runtime.rope_index import rope_index
    from runtime.vision_positions import vision_inputs

    _, request = fidelity_prompt(pipe, prompt, image, positions, min_pixels, max_pixels)
    m, backend = pipe.manifest.model, pipe.backend
    ids = request.input_ids
    length = len(ids)
    input_ids = ids[None]
    processed = request.processed
    grids = processed.image_grid_thw
    # As Pipeline._run builds them for a one-row batch.
    position_ids, _ = rope_index(input_ids, grids, np.ones_like(input_ids), m.image_token_id, m.spatial_merge_size)
    visual = np.zeros((1, length, m.hidden_size), dtype=backend.decoder_dtype)
    deepstack = np.zeros((m.num_deepstack, 1, length, m.hidden_size), dtype=backend.decoder_dtype)
    host = vision_inputs(grids, m.num_position_embeddings, m.spatial_merge_size, m.vision_head_dim,
                         m.vision_rope_theta)
    image_embeds, deep_embeds = backend.encode_images(processed.pixel_values, host)
    is_image = input_ids == m.image_token_id
    visual[is_image] = image_embeds
    deepstack[:, is_image] = deep_embeds

    start = window_start(ids, m.image_token_id)
    cache = backend.new_cache(1, length)
    out = np.empty((positions, m.vocab_size), dtype=np.float32)
    # Prefill the prefix through the first measured position; its logits are that position's.
    stop = start + 1
    out[0] = backend.decode(cache, input_ids[:, :stop], visual[:, :stop], deepstack[:, :, :stop],
                            position_ids[:, :, :stop], np.array([start]), stop, np.array([start]))[0]
    # Then one prompt token per call, at its own M-RoPE position (not the decode-time text position:
    # these tokens are inside the prompt), with its image embeddings when it is an image token.
    for i in range(1, positions):
        t = start + i
        out[i] = backend.decode(cache, input_ids[:, t:t + 1], visual[:, t:t + 1], deepstack[:, :, t:t + 1],
                                position_ids[:, :, t:t + 1], np.array([t]), t + 1, np.array([0]))[0]
    return TeacherForced(out, ids, start, int(is_image[0, start:start + positions].sum()))


def save(result: TeacherForced, path: str | Path) -> None:
    np.savez(path, logits=result.logits, input_ids=result.input_ids, start=result.start,
             image_positions=result.image_positions)


def load(path: str | Path) -> TeacherForced:
    with np.load(path) as f:
        return TeacherForced(f["logits"], f["input_ids"], int(f["start"]), int(f["image_positions"]))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float32)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def compare(reference: TeacherForced, engine: TeacherForced, rows: int = 32) -> dict:
    """top1_agreement, mean_kl (KL(P_ref || P_engine) in nats, averaged over positions), max_kl,
    positions, image_positions. Both must come from the same prompt."""
    from runtime.errors import Qwen3VLError

    if (reference.logits.shape != engine.logits.shape or reference.start != engine.start
            or not np.array_equal(reference.input_ids, engine.input_ids)):
        raise Qwen3VLError("the engine and the reference turned the fidelity prompt into different tokens or "
                           "vocabularies (were they built from different checkpoints?)")
    agree, kl = 0, []
    for begin in range(0, reference.positions, rows):  # row blocks bound the temporaries' memory
        ref = log_softmax(reference.logits[begin:begin + rows])
        eng = log_softmax(engine.logits[begin:begin + rows])
        agree += int((ref.argmax(-1) == eng.argmax(-1)).sum())
        # Summed in float64: over a 150k vocabulary fp32 rounding alone would be ~1e-6.
        kl.append((np.exp(ref, dtype=np.float64) * (ref.astype(np.float64) - eng)).sum(-1))
    kl = np.concatenate(kl)
    return {
        "top1_agreement": agree / reference.positions,
        "mean_kl": float(kl.mean()),
        "max_kl": float(kl.max()),
        "positions": reference.positions,
        "image_positions": reference.image_positions,
    }


def fidelity(pipe, reference_pipe, prompt: str, image, positions: int = DEFAULT_POSITIONS,
             min_pixels: int | None = None, max_pixels: int | None = None) -> dict:
    """compare() for two loaded pipelines in this process (tests, small engines)."""
    ref = teacher_forced_logits(reference_pipe, prompt, image, positions, min_pixels, max_pixels)
    return compare(ref, teacher_forced_logits(pipe, prompt, image, positions, min_pixels, max_pixels))
