"""From a user's prompt (or chat) and images to token ids.

The checkpoint's chat template places one `<|image_pad|>` per image; after tokenising, each pad is
expanded to the number of visual tokens of its image, as the reference processor does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CheckpointError, PromptError

IMAGE_PAD = "<|image_pad|>"


def load_chat_template(folder: str | Path) -> str:
    """Every form a checkpoint keeps it in: chat_template.jinja, chat_template.json, tokenizer_config.json."""
    folder = Path(folder)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = folder / name
        if path.is_file():
            try:
                template = json.loads(path.read_text()).get("chat_template")
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
            if isinstance(template, str):
                return template
    raise CheckpointError(f"{folder}: no chat template (chat_template.jinja, chat_template.json or tokenizer_config.json)")


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = True) -> str:
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise PromptError(f"chat template: {message}")

    # The same environment settings chat templates are written for.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt)
    except TemplateError as exc:
        raise PromptError(f"chat template failed: {exc}") from None


def user_message(prompt: str, num_images: int) -> list[dict]:
    """One user turn: each image in order, then the text."""
    return [{"role": "user", "content": [{"type": "image"}] * num_images + [{"type": "text", "text": prompt}]}]


def count_images(messages: list[dict]) -> int:
    count = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            count += sum(1 for part in content if isinstance(part, dict) and part.get("type") == "image")
    return count


@dataclass
class PromptTokens:
    text: str
    input_ids: np.ndarray  # (S,) int64, image pads expanded


class PromptBuilder:
    def __init__(self, tokenizer_file: str | Path, chat_template: str, image_token_id: int):
        from tokenizers import Tokenizer

        path = Path(tokenizer_file)
        if not path.is_file():
            raise CheckpointError(f"{path}: tokenizer file missing")
        self.tokenizer = Tokenizer.from_file(str(path))
        self.chat_template = chat_template
        self.image_token_id = image_token_id
        if self.tokenizer.token_to_id(IMAGE_PAD) != image_token_id:
            raise CheckpointError(f"{path}: {IMAGE_PAD} is not token {image_token_id} as the model config says")

    @classmethod
    def from_folder(cls, folder: str | Path, image_token_id: int) -> "PromptBuilder":
        return cls(Path(folder) / "tokenizer.json", load_chat_template(folder), image_token_id)

    def encode(self, messages: list[dict], tokens_per_image: list[int]) -> PromptTokens:
        text = render_chat(self.chat_template, messages)
        ids = np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)
        pads = np.flatnonzero(ids == self.image_token_id)
        if len(pads) != len(tokens_per_image):
            raise PromptError(f"the prompt has {len(pads)} image placeholders but {len(tokens_per_image)} images")
        pieces, start = [], 0
        for pad, count in zip(pads, tokens_per_image):
            pieces += [ids[start:pad], np.full(count, self.image_token_id, dtype=np.int64)]
            start = pad + 1
        pieces.append(ids[start:])
        return PromptTokens(text=text, input_ids=np.concatenate(pieces))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
