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
    """(text, batch): `prompt` plus as much filler as the window of `positions` needs, prepared as
    the Pipeline prepares a request (the chat template around the image and the text)."""
    from runtime.errors import PromptError

    if positions < 1:
        raise PromptError("--positions must be >= 1")
    m = pipe.manifest.model
    text, sentences = prompt, 0
    while True:
        batch = pipe.prepare([text], [[image]], min_pixels, max_pixels)
        ids = batch.row(0)
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
    return text, batch


def window_start(input_ids: np.ndarray, image_token_id: int) -> int:
    """The token before the first image token (it predicts the image's first token), else 0."""
    image = np.flatnonzero(input_ids == image_token_id)
    return max(0, int(image[0]) - 1) if len(image) else 0


def teacher_forced_logits(pipe, prompt: str, image, positions: int = DEFAULT_POSITIONS,
                          min_pixels: int | None = None, max_pixels: int | None = None) -> TeacherForced:
    """Next-token logits of `pipe`'s backend at `positions` consecutive prompt positions."""
    _, batch = fidelity_prompt(pipe, prompt, image, positions, min_pixels, max_pixels)
    m, backend = pipe.manifest.model, pipe.backend
    ids = batch.row(0)
    features = backend.encode_images(batch.vision)
    start = window_start(ids, m.image_token_id)
    cache = backend.new_cache(1, len(ids))
    out = np.empty((positions, m.vocab_size), dtype=np.float32)
    # Prefill the prefix through the first measured position; its logits are that position's.
    # Then one prompt token per call, at its own M-RoPE position (not the decode-time text position:
    # these tokens are inside the prompt), with its image embeddings when it is an image token.
    out[0] = backend.prefill(cache, batch.chunk(features, backend.decoder_dtype, 0, start + 1))[0]
    for i in range(1, positions):
        out[i] = backend.prefill(cache, batch.chunk(features, backend.decoder_dtype, start + i, start + i + 1))[0]
    is_image = ids == m.image_token_id
    return TeacherForced(out, ids, start, int(is_image[start:start + positions].sum()))


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
