"""`Pipeline`: an engine folder and a Backend in, answers about images out. No torch, no transformers.

One request flows: `prepare` (chat template, tokens, image patches, positions: runtime/prepare.py)
-> `generate` (vision, prefill, decode steps over the backend: runtime/generate.py) -> text. A list
of prompts runs as one right-padded batch; every row gets the same tokens as it would alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .backend import Backend
from .engine_manifest import Manifest, load_manifest
from .errors import PromptError
from .generate import Timings, generate
from .prepare import PreparedBatch, is_chat, prepare
from .prompt import PromptBuilder, load_chat_template
from .sampling import SamplingConfig


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


class Pipeline:
    """`engine_dir` holds the tokenizer and chat template the manifest names; `backend` runs the graphs."""

    def __init__(self, engine_dir: str | Path, manifest: Manifest, backend: Backend, prefill_chunk: int | None = None):
        self.engine_dir = Path(engine_dir)
        self.manifest = manifest
        self.backend = backend
        self.prefill_chunk = prefill_chunk  # None: the whole prompt in one decoder call
        self.prompts = PromptBuilder(self.engine_dir / manifest.files["tokenizer"],
                                     load_chat_template(self.engine_dir), manifest.model.image_token_id)

    @classmethod
    def load(cls, engine_dir: str | Path, backend: str = "auto", threads: int | None = None,
             providers: list[str] | None = None, verify: bool = False) -> "Pipeline":
        """Opens an engine folder built by `qwen3vl build` with one of the runtime's backends ("auto",
        "ort"); verify=True also checks file hashes. Other backends: `Pipeline(folder, manifest, obj)`."""
        from .backends import open_backend

        engine_dir = Path(engine_dir)
        manifest = load_manifest(engine_dir, verify_hashes=verify)
        return cls(engine_dir, manifest, open_backend(backend, engine_dir, manifest, threads, providers))

    def close(self) -> None:
        self.backend.close()

    # -- host side -------------------------------------------------------------------------------

    def prepare(self, prompts: list, images: list[list] | None = None, min_pixels: int | None = None,
                max_pixels: int | None = None, allow_special_tokens: bool = False) -> PreparedBatch:
        """Model input for a batch: one prompt (string or chat) per row, one image list per row.
        Special-token strings typed in the prompts stay text unless `allow_special_tokens`."""
        settings = self.manifest.image_processor.with_budget(min_pixels, max_pixels)
        images = images if images is not None else [[] for _ in prompts]
        return prepare(prompts, images, self.prompts, settings, self.manifest.model, self.manifest.model.pad_token_id,
                       allow_special_tokens)

    def sampling(self, do_sample: bool | None = None, temperature: float | None = None, top_p: float | None = None,
                 top_k: int | None = None, seed: int | None = None) -> SamplingConfig:
        """The engine's defaults (the checkpoint's generation_config.json) overridden by what is given."""
        defaults = self.manifest.generation_defaults
        pick = lambda value, key, fallback: value if value is not None else defaults.get(key, fallback)  # noqa: E731
        return SamplingConfig(bool(pick(do_sample, "do_sample", False)), float(pick(temperature, "temperature", 1.0)),
                              float(pick(top_p, "top_p", 1.0)), int(pick(top_k, "top_k", 0)), seed)

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
        per_prompt_images = (images or [[] for _ in prompts]) if is_batch else [images or []]
        sampling = self.sampling(do_sample, temperature, top_p, top_k, seed)
        timings = Timings()
        batch = self.prepare(prompts, per_prompt_images, min_pixels, max_pixels, allow_special_tokens)
        max_new_tokens = self._budget(batch, max_new_tokens)
        generated = [[] for _ in prompts]
        scores = [[] for _ in prompts] if logprobs else None
        finished = None
        for step in generate(self.backend, batch, max_new_tokens, sampling, self.manifest.model.eos_token_ids,
                             logprobs, self.prefill_chunk, timings):
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
        batch = self.prepare([prompt], [images or []], min_pixels, max_pixels, allow_special_tokens)
        max_new_tokens = self._budget(batch, max_new_tokens)
        text = self.prompts.text_stream()
        for step in generate(self.backend, batch, max_new_tokens, sampling, self.manifest.model.eos_token_ids,
                             0, self.prefill_chunk):
            piece = text.step(int(step.tokens[0]))
            if piece:
                yield piece

    def _budget(self, batch: PreparedBatch, max_new_tokens: int) -> int:
        """New tokens that fit beside the longest prompt in the engine's context."""
        if max_new_tokens < 1:
            raise PromptError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        longest, context = int(batch.lengths.max()), self.manifest.max_context
        if longest >= context:
            raise PromptError(f"the prompt is {longest} tokens; this engine was built for a context of {context} "
                              f"(rebuild with a larger --max-context, or use a smaller image budget --max-pixels)")
        return min(max_new_tokens, context - longest)
