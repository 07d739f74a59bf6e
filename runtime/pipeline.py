"""`Pipeline`: an engine folder and a Backend in, answers about images out. No torch, no transformers.

One request flows: `prepare` (chat template, tokens, image patches, positions: runtime/prepare.py)
-> `generate` (vision, prefill, decode steps over the backend: runtime/generate.py) -> text. A list
of prompts runs as one right-padded batch; every row gets the same tokens as it would alone.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .backend import Backend
from .engine_manifest import Manifest, load_manifest
from .errors import PromptError, Qwen3VLError
from .generate import Timings, generate
from .kv_window import KVWindow
from .memory_admission import OutOfMemoryError, admit, available_memory_bytes, estimate_request
from .prefix_cache import BatchReuse, PrefixCache, default_cache_memory
from .prepare import PreparedBatch, is_chat, prepare
from .prompt import PromptBuilder, load_chat_template
from .sampling import SamplingConfig


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (end-of-turn token) or "length"
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (runtime/prefix_cache.py)
    logprobs: list[list[dict]] | None = None
    timings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        body = asdict(self)
        if body["logprobs"] is None:
            del body["logprobs"]
        return body


class Pipeline:
    """`engine_dir` holds the tokenizer and chat template the manifest names; `backend` runs the graphs.

    Safe to share between threads: requests run one at a time, in the order they take the lock (a
    `stream` holds it until it is exhausted or closed).

    `cache_memory`: bytes for reusing the KV of recent conversations and the features of recent
    images (runtime/prefix_cache.py); None: 1 GiB or an eighth of the available memory where less;
    0: no reuse. Reused KV needs a backend whose cache offers read_prefix/write_prefix (all of the
    runtime's do; with another backend's cache only image features are reused).
    """

    max_batch = 64  # prompts per call
    max_images = 64  # images per prompt

    def __init__(self, engine_dir: str | Path, manifest: Manifest, backend: Backend, prefill_chunk: int | None = 512,
                 kv_window: int | None = None, cache_memory: int | None = None):
        self.engine_dir = Path(engine_dir)
        self.manifest = manifest
        self.backend = backend
        # Prompt tokens per decoder call (None: all at once): bounds the attention scratch, which
        # grows with chunk x context, whatever the prompt's length; tokens do not change.
        self.prefill_chunk = prefill_chunk
        self._lock = threading.RLock()
        if cache_memory is None:
            cache_memory = default_cache_memory(available_memory_bytes())
        if isinstance(cache_memory, bool) or not isinstance(cache_memory, int) or cache_memory < 0:
            raise PromptError(f"cache_memory must be a number of bytes >= 0, got {cache_memory!r}")
        self.prefix_cache = PrefixCache(cache_memory) if cache_memory else None
        template = manifest.files.get("chat_template")  # an engine's; a checkpoint keeps it in one of several forms
        self.prompts = PromptBuilder(self.engine_dir / manifest.files["tokenizer"],
                                     (self.engine_dir / template).read_text() if template
                                     else load_chat_template(self.engine_dir), manifest.model.image_token_id)
        self.kv_window: KVWindow | None = None  # None: a prompt longer than the context is refused
        if kv_window is not None:
            self.use_kv_window(kv_window)

    @classmethod
    def load(cls, engine_dir: str | Path, backend: str = "auto", threads: int | None = None,
             providers: list[str] | None = None, verify: bool = False, kv_window: int | None = None,
             cache_memory: int | None = None) -> "Pipeline":
        """Opens an engine folder built by `qwen3vl build` with one of the runtime's backends ("auto",
        "trt", "ort"; runtime.backends); verify=True also checks file hashes; `kv_window` see
        `use_kv_window`; `cache_memory` see the class. Other backends: `Pipeline(folder, manifest, obj)`."""
        from .backends import open_backend

        engine_dir = Path(engine_dir)
        manifest = load_manifest(engine_dir, verify_hashes=verify)
        return cls(engine_dir, manifest, open_backend(backend, engine_dir, manifest, threads, providers),
                   kv_window=kv_window, cache_memory=cache_memory)

    def close(self) -> None:
        self.backend.close()

    def use_kv_window(self, window: int, slack: int | None = None) -> None:
        """Long chats: a conversation longer than the engine's context is answered with a bounded KV
        cache that keeps the attention sinks (system prompt, images) and the most recent `window`
        tokens (runtime/kv_window.py) instead of being refused."""
        refusal = getattr(self.backend, "kv_window_refusal", None)
        if refusal:
            raise Qwen3VLError(refusal)
        if isinstance(window, int) and not isinstance(window, bool) and window > self.manifest.max_context:
            raise PromptError(f"--kv-window {window} is more than this engine's context of {self.manifest.max_context}")
        self.kv_window = KVWindow.for_engine(window, self.prompts, self.manifest.model, slack)

    # -- host side -------------------------------------------------------------------------------

    def prepare(self, prompts: list, images: list[list] | None = None, min_pixels: int | None = None,
                max_pixels: int | None = None, allow_special_tokens: bool = False, check=None) -> PreparedBatch:
        """Model input for a batch: one prompt (string or chat) per row, one image list per row.
        Special-token strings typed in the prompts stay text unless `allow_special_tokens`; `check(lengths,
        grids)` runs before any image is decoded (runtime.prepare.prepare)."""
        settings = self.manifest.image_processor.with_budget(min_pixels, max_pixels)
        images = images if images is not None else [[] for _ in prompts]
        if len(prompts) > self.max_batch:
            raise PromptError(f"{len(prompts)} prompts in one call; the limit is {self.max_batch} (split the batch)")
        for row_images in images:
            if isinstance(row_images, (list, tuple)) and len(row_images) > self.max_images:
                raise PromptError(f"{len(row_images)} images for one prompt; the limit is {self.max_images}")
        return prepare(prompts, images, self.prompts, settings, self.manifest.model, self.manifest.model.pad_token_id,
                       allow_special_tokens, check)

    def sampling(self, do_sample: bool | None = None, temperature: float | None = None, top_p: float | None = None,
                 top_k: int | None = None, seed: int | None = None) -> SamplingConfig:
        """The engine's defaults (the checkpoint's generation_config.json) overridden by what is given."""
        defaults = self.manifest.generation_defaults
        pick = lambda value, key, fallback: value if value is not None else defaults.get(key, fallback)  # noqa: E731
        return SamplingConfig(pick(do_sample, "do_sample", False), pick(temperature, "temperature", 1.0),
                              pick(top_p, "top_p", 1.0), pick(top_k, "top_k", 0), seed)

    # -- public API ------------------------------------------------------------------------------

    def generate(self, prompt, images: Sequence | None = None, max_new_tokens: int = 256, do_sample: bool | None = None,
                 temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                 seed: int | None = None, logprobs: int = 0, min_pixels: int | None = None,
                 max_pixels: int | None = None, allow_special_tokens: bool = False):
        """A prompt (str) or chat (list of messages) -> GenerationResult; a list of prompts -> a list.

        For a batch, `images` is one list of images per prompt. Sampling settings left at None follow
        the engine's defaults (the checkpoint's generation_config.json); do_sample=False is greedy.
        Text that looks like a special token (`<|im_end|>`) is encoded as text unless allow_special_tokens.
        """
        is_batch = isinstance(prompt, list) and all(isinstance(p, (str, list)) for p in prompt) and not is_chat(prompt)
        prompts = prompt if is_batch else [prompt]
        per_prompt_images = ([_image_list(i) for i in images] if images else [[] for _ in prompts]) if is_batch \
            else [_image_list(images)]
        sampling = self.sampling(do_sample, temperature, top_p, top_k, seed)
        logprobs = _check_logprobs(logprobs, self.manifest.model.vocab_size)
        with self._lock:
            timings = Timings()
            batch, max_new_tokens = self._prepare_admitted(prompts, per_prompt_images, max_new_tokens, min_pixels,
                                                           max_pixels, allow_special_tokens)
            generated = [[] for _ in prompts]
            scores = [[] for _ in prompts] if logprobs else None
            finished = None
            for step in generate(self.backend, batch, max_new_tokens, sampling, self.manifest.model.eos_token_ids,
                                 logprobs, self.prefill_chunk, timings, kv_window=self.kv_window,
                                 reuse=self._reuse(batch, min_pixels, max_pixels)):
                for r in step.active.nonzero()[0]:
                    generated[r].append(int(step.tokens[r]))
                    if scores is not None:
                        scores[r].append(step.logprobs[r])
                finished = step.finished
        results = [GenerationResult(
            text=self.prompts.decode(ids),
            token_ids=ids,
            prompt_tokens=int(batch.lengths[r]),
            finish_reason="stop" if finished[r] else "length",
            cached_tokens=timings.cached_tokens[r],
            logprobs=scores[r] if scores is not None else None,
            timings={**timings.to_dict(), "backend": self.backend.name},
        ) for r, ids in enumerate(generated)]
        return results if is_batch else results[0]

    def stream(self, prompt, images: Sequence | None = None, max_new_tokens: int = 256, do_sample: bool | None = None,
               temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
               seed: int | None = None, min_pixels: int | None = None, max_pixels: int | None = None,
               allow_special_tokens: bool = False) -> Iterator[str]:
        """Yields the answer's text in pieces as tokens are generated (one prompt); the pieces join to
        the text `generate` returns. A character split across tokens comes out once it is whole."""
        sampling = self.sampling(do_sample, temperature, top_p, top_k, seed)
        with self._lock:
            batch, max_new_tokens = self._prepare_admitted([prompt], [_image_list(images)], max_new_tokens,
                                                           min_pixels, max_pixels, allow_special_tokens)
            text = self.prompts.text_stream()
            for step in generate(self.backend, batch, max_new_tokens, sampling, self.manifest.model.eos_token_ids,
                                 0, self.prefill_chunk, kv_window=self.kv_window,
                                 reuse=self._reuse(batch, min_pixels, max_pixels)):
                piece = text.step(int(step.tokens[0]))
                if piece:
                    yield piece
            tail = text.finish()  # a character cut by the token limit
            if tail:
                yield tail

    def steps(self, prompts: list, images: list[list], max_new_tokens: int, sampling: list[SamplingConfig],
              logprobs: int = 0, timings: Timings | None = None) -> Iterator:
        """A batch with one sampling config per row, step by step (for servers that stream and batch):
        yields the rows' prompt lengths first, then one runtime.generate.Step per decode step. Holds
        the lock until exhausted or closed."""
        logprobs = _check_logprobs(logprobs, self.manifest.model.vocab_size)
        with self._lock:
            batch, max_new_tokens = self._prepare_admitted(prompts, images, max_new_tokens, None, None, False)
            yield batch.lengths.copy()
            yield from generate(self.backend, batch, max_new_tokens, list(sampling), self.manifest.model.eos_token_ids,
                                logprobs, self.prefill_chunk, timings, kv_window=self.kv_window,
                                reuse=self._reuse(batch, None, None))

    def _prepare_admitted(self, prompts: list, images: list[list], max_new_tokens, min_pixels, max_pixels,
                          allow_special_tokens: bool) -> tuple[PreparedBatch, int]:
        """The batch and the new tokens that fit beside its longest prompt in the engine's context. A
        request whose memory would not fit is refused from the images' headers, before any image is
        decoded or any buffer allocated."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise PromptError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        budget = {}

        def admit_request(lengths: np.ndarray, grids: np.ndarray | None) -> None:
            longest, context = int(lengths.max()), self.manifest.max_context
            window = self.kv_window
            if window is not None:  # no context limit; the cache holds at most sinks (<= W) + W + slack
                context = max(context, longest + max_new_tokens)
            if longest >= context:
                raise PromptError(f"the prompt is {longest} tokens; this engine was built for a context of {context} "
                                  f"(rebuild with a larger --max-context, or use a smaller image budget --max-pixels)")
            budget["new_tokens"] = new_tokens = min(max_new_tokens, context - longest)
            if getattr(self.backend, "uses_host_memory", True):
                patches = [int(np.prod(g)) for g in grids] if grids is not None else []
                frames = (int(grids[:, 0].sum()), max(int(h * w) for _, h, w in grids)) if patches else None
                capacity = longest + new_tokens if window is None else min(longest + new_tokens,
                                                                            2 * window.window + window.slack)
                estimate = estimate_request(self.manifest.model, len(lengths), longest, capacity,
                                            _kv_bytes_per_value(self.backend), patches, frames,
                                            self.prefill_chunk if window is None else window.slack)
                self._admit(estimate)

        batch = self.prepare(prompts, images, min_pixels, max_pixels, allow_special_tokens, admit_request)
        if self.kv_window is not None and not self.kv_window.fits(batch, budget["new_tokens"]):
            self.kv_window.check_sinks(self.kv_window.sinks(batch))  # before the vision encoder runs
        return batch, budget["new_tokens"]

    def _admit(self, estimate) -> None:
        """Refuses a request whose memory does not fit; the prefix cache's memory is given up first."""
        lower = "use a smaller --max-pixels, fewer images, fewer new tokens or a smaller batch"
        try:
            admit(estimate, what_to_lower=lower)
        except OutOfMemoryError:
            if self.prefix_cache is None or not self.prefix_cache.nbytes:
                raise
            self.prefix_cache.clear()
            admit(estimate, what_to_lower=lower)

    def _reuse(self, batch: PreparedBatch, min_pixels: int | None, max_pixels: int | None) -> BatchReuse | None:
        """The batch's use of the prefix cache (None when reuse is off); the images' keys name the
        pixel budget they were resized under."""
        if self.prefix_cache is None:
            return None
        settings = self.manifest.image_processor.with_budget(min_pixels, max_pixels)
        return BatchReuse(self.prefix_cache, batch, self.manifest.model, settings.min_pixels, settings.max_pixels)

    def reuse_stats(self) -> dict | None:
        """The prefix cache's hit/miss counts by input type and its bytes (None when reuse is off).
        Read without the lock (a server's /metrics must not wait for a running request): counters only."""
        return self.prefix_cache.stats() if self.prefix_cache is not None else None


def _kv_bytes_per_value(backend: Backend) -> int:
    """Bytes of one cached key or value: the backend's cache type (`--kv-dtype`) where it says, else its
    activations' (int8 scales are constants of the graph, not per token)."""
    return np.dtype(getattr(backend, "kv_dtype", None) or backend.decoder_dtype).itemsize


def _image_list(images) -> list:
    """A prompt's images as a list: one image (a path, PIL image or array) alone is not split up."""
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]


def _check_logprobs(k, vocab_size: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= min(vocab_size, 20):
        raise PromptError(f"logprobs must be an integer from 0 to 20, got {k!r}")
    return k
