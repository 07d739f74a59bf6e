"""`Pipeline`: an engine folder in, answers about images out. No torch, no transformers.

One request flows: images -> preprocessing (numpy) -> vision graph -> visual tokens placed at the
image placeholders of the tokenised chat -> decoder prefill -> one decoder step per new token.
A list of prompts runs as one right-padded batch; every row gets the same tokens as it would alone.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .engine_manifest import Manifest, load_manifest
from .errors import PromptError
from .image_processing import ProcessedImages, preprocess_images
from .prompt import PromptBuilder, load_chat_template, user_message
from .rope_index import rope_index
from .sampling import SamplingConfig, next_tokens, top_logprobs
from .vision_positions import vision_inputs

PAD_TOKEN_ID = 151643


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (end-of-turn token) or "length"
    logprobs: list[list[dict]] | None = None
    timings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        body = asdict(self)
        if body["logprobs"] is None:
            del body["logprobs"]
        return body


@dataclass
class _Request:
    messages: list[dict]
    images: list
    input_ids: np.ndarray = None
    processed: ProcessedImages | None = None


class Pipeline:
    def __init__(self, engine_dir: Path, manifest: Manifest, backend):
        self.engine_dir = engine_dir
        self.manifest = manifest
        self.backend = backend
        self.prompts = PromptBuilder(engine_dir / manifest.files["tokenizer"],
                                     load_chat_template(engine_dir), manifest.model.image_token_id)

    @classmethod
    def load(cls, engine_dir: str | Path, threads: int | None = None, verify: bool = False) -> "Pipeline":
        """Opens an engine folder built by `qwen3vl build` (verify=True also checks file hashes)."""
        engine_dir = Path(engine_dir)
        manifest = load_manifest(engine_dir, verify_hashes=verify)
        from .ort_backend import OrtBackend

        return cls(engine_dir, manifest, OrtBackend(engine_dir, manifest, threads))

    # -- public API ------------------------------------------------------------------------------

    def generate(self, prompt, images: Sequence | None = None, max_new_tokens: int = 256, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                 logprobs: int = 0, min_pixels: int | None = None, max_pixels: int | None = None):
        """A prompt (str) or chat (list of messages) -> GenerationResult; a list of prompts -> a list.

        For a batch, `images` is one list of images per prompt.
        """
        batch = isinstance(prompt, list) and all(isinstance(p, (str, list)) for p in prompt) and not _is_chat(prompt)
        prompts = prompt if batch else [prompt]
        per_prompt_images = (images or [[] for _ in prompts]) if batch else [images or []]
        if len(per_prompt_images) != len(prompts):
            raise PromptError(f"{len(prompts)} prompts but {len(per_prompt_images)} image lists")
        sampling = SamplingConfig(do_sample, temperature, top_p, top_k, seed)
        results = None
        for results in self._run(prompts, per_prompt_images, max_new_tokens, sampling, logprobs,
                                 min_pixels, max_pixels):
            pass
        return results if batch else results[0]

    def stream(self, prompt, images: Sequence | None = None, max_new_tokens: int = 256, do_sample: bool = False,
               temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
               min_pixels: int | None = None, max_pixels: int | None = None) -> Iterator[str]:
        """Yields the answer's text in pieces as tokens are generated (one prompt)."""
        sampling = SamplingConfig(do_sample, temperature, top_p, top_k, seed)
        shown = ""
        for results in self._run([prompt], [images or []], max_new_tokens, sampling, 0, min_pixels, max_pixels):
            text = results[0].text
            # Hold back a trailing partial UTF-8 character until its last byte arrives.
            if text.startswith(shown) and not text.endswith("\ufffd") and len(text) > len(shown):
                yield text[len(shown):]
                shown = text

    # -- generation --------------------------------------------------------------------------------

    def _prepare(self, prompts, per_prompt_images, min_pixels, max_pixels) -> list[_Request]:
        settings = self.manifest.image_processor
        if min_pixels is not None or max_pixels is not None:
            settings = settings.with_budget(min_pixels=min_pixels, max_pixels=max_pixels)
        requests = []
        for prompt, images in zip(prompts, per_prompt_images):
            messages, images = _messages_and_images(prompt, list(images))
            processed = preprocess_images(images, settings) if images else None
            tokens = self.prompts.encode(messages, processed.tokens_per_image if processed else [])
            requests.append(_Request(messages, images, tokens.input_ids, processed))
        return requests

    def _run(self, prompts, per_prompt_images, max_new_tokens, sampling, logprobs, min_pixels, max_pixels):
        """Yields the list of results (growing) after every step."""
        if max_new_tokens < 1:
            raise PromptError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        start = time.perf_counter()
        m = self.manifest.model
        requests = self._prepare(prompts, per_prompt_images, min_pixels, max_pixels)
        lengths = np.array([len(r.input_ids) for r in requests], dtype=np.int64)
        longest = int(lengths.max())
        if longest >= self.manifest.max_context:
            raise PromptError(f"the prompt is {longest} tokens; this engine was built for a context of "
                              f"{self.manifest.max_context} (rebuild with a larger --max-context, or use a smaller "
                              f"image budget --max-pixels)")
        max_new_tokens = min(max_new_tokens, self.manifest.max_context - longest)
        batch = len(requests)

        input_ids = np.full((batch, longest), PAD_TOKEN_ID, dtype=np.int64)
        mask = np.zeros((batch, longest), dtype=np.int64)
        for row, request in enumerate(requests):
            input_ids[row, : lengths[row]] = request.input_ids
            mask[row, : lengths[row]] = 1
        processed = [r.processed for r in requests if r.processed is not None]
        grids = np.concatenate([p.image_grid_thw for p in processed]) if processed else None
        positions, deltas = rope_index(input_ids, grids, mask, m.image_token_id, m.spatial_merge_size)

        dtype = self.backend.decoder_dtype
        visual = np.zeros((batch, longest, m.hidden_size), dtype=dtype)
        deepstack = np.zeros((m.num_deepstack, batch, longest, m.hidden_size), dtype=dtype)
        vision_ms = 0.0
        if processed:
            vision_start = time.perf_counter()
            pixels = np.concatenate([p.pixel_values for p in processed])
            host = vision_inputs(grids, m.num_position_embeddings, m.spatial_merge_size, m.vision_head_dim,
                                 m.vision_rope_theta)
            image_embeds, deep_embeds = self.backend.encode_images(pixels, host)
            vision_ms = 1000 * (time.perf_counter() - vision_start)
            is_image = (input_ids == m.image_token_id) & (mask == 1)
            visual[is_image] = image_embeds
            deepstack[:, is_image] = deep_embeds

        cache = self.backend.new_cache(batch, longest + max_new_tokens)
        prefill_start = time.perf_counter()
        logits = self.backend.decode(cache, input_ids, visual, deepstack, positions, lengths - 1, longest,
                                     lengths - 1)
        prefill_ms = 1000 * (time.perf_counter() - prefill_start)

        rng = np.random.default_rng(sampling.seed)
        generated = [[] for _ in range(batch)]
        scores = [[] for _ in range(batch)] if logprobs else None
        finished = np.zeros(batch, dtype=bool)
        eos = np.array(m.eos_token_ids)
        steps = self.backend.decode_steps(cache)
        cache_len = lengths.copy()
        ttft_ms = decode_start = None
        for step in range(max_new_tokens):
            tokens = next_tokens(logits, sampling, rng)
            top = top_logprobs(logits, logprobs) if logprobs else None
            for row in np.flatnonzero(~finished):
                generated[row].append(int(tokens[row]))
                if top is not None:
                    scores[row].append(top[row])
            finished |= np.isin(tokens, eos)
            if ttft_ms is None:
                ttft_ms = 1000 * (time.perf_counter() - start)
                decode_start = time.perf_counter()
            yield self._results(requests, generated, scores, finished, {
                "vision_ms": vision_ms, "prefill_ms": prefill_ms, "ttft_ms": ttft_ms,
                "decode_tokens_per_s": step / max(time.perf_counter() - decode_start, 1e-9) if step else 0.0,
            })
            if finished.all() or step == max_new_tokens - 1:
                return
            logits = steps(tokens, cache_len + deltas[:, 0], cache_len, int(cache_len.max()) + 1)
            cache_len += 1

    def _results(self, requests, generated, scores, finished, timings) -> list[GenerationResult]:
        results = []
        for row, request in enumerate(requests):
            ids = generated[row]
            results.append(GenerationResult(
                text=self.prompts.decode(ids),
                token_ids=list(ids),
                prompt_tokens=len(request.input_ids),
                finish_reason="stop" if finished[row] else "length",
                logprobs=list(scores[row]) if scores is not None else None,
                timings=dict(timings),
            ))
        return results


def _is_chat(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


def _messages_and_images(prompt, images: list) -> tuple[list[dict], list]:
    if isinstance(prompt, str):
        return user_message(prompt, len(images)), images
    if not _is_chat(prompt):
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
