"""From a user's prompt (or chat) and images to token ids.

The checkpoint's chat template places one `<|image_pad|>` per image; after tokenising, each pad is
expanded to the number of visual tokens of its image, as the reference processor does.
"""

from __future__ import annotations

import json
import re
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


ROLES = ("system", "user", "assistant", "tool")
# Stand in for the caller's texts while the template renders (private-use code points: no template
# or tokenizer gives them a meaning), so the rendered chat can be cut back into template and text.
_MARK = "\ue000{}\ue001"
_MARK_RE = re.compile("\ue000([0-9]+)\ue001")


def plain_messages(messages: list[dict]) -> list[dict]:
    """The chat as the template may see it: roles, texts and image markers, all plain strings.

    A chat template comes with the engine folder, which may be someone else's: it must not reach the
    caller's objects (an image object's methods can write files), so images become {"type": "image"}.
    """
    if not isinstance(messages, list) or not messages:
        raise PromptError("a chat must be a non-empty list of messages")
    plain = []
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise PromptError(f"each message needs a role among {', '.join(ROLES)}, got {message!r:.80}")
        content = message.get("content")
        if content is None or isinstance(content, str):
            plain.append({"role": message["role"], "content": content or ""})
            continue
        if not isinstance(content, list):
            raise PromptError(f"message content must be a string or a list of parts, got {type(content).__name__}")
        parts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind is None and isinstance(part, dict):
                kind = "image" if "image" in part or "image_url" in part else "text" if "text" in part else None
            if kind == "image":
                parts.append({"type": "image"})
            elif kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "video":
                raise PromptError("videos are not supported; give the frames as images")
            else:
                raise PromptError(f"unsupported message part {part!r:.80} (expected text or image parts)")
        plain.append({"role": message["role"], "content": parts})
    return plain


def user_message(prompt: str, num_images: int) -> list[dict]:
    """One user turn: each image in order, then the text."""
    return [{"role": "user", "content": [{"type": "image"}] * num_images + [{"type": "text", "text": prompt}]}]


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
        # A second instance that reads special-token strings as plain text, for the caller's texts
        # (the setting lives on the tokenizer: one instance each keeps encoding thread-safe).
        self.text_tokenizer = Tokenizer.from_file(str(path))
        self.text_tokenizer.encode_special_tokens = True
        self.special_tokens = [t.content for t in self.tokenizer.get_added_tokens_decoder().values() if t.special]
        self.chat_template = chat_template
        self.image_token_id = image_token_id
        if self.tokenizer.token_to_id(IMAGE_PAD) != image_token_id:
            raise CheckpointError(f"{path}: {IMAGE_PAD} is not token {image_token_id} as the model config says")

    @classmethod
    def from_folder(cls, folder: str | Path, image_token_id: int) -> "PromptBuilder":
        return cls(Path(folder) / "tokenizer.json", load_chat_template(folder), image_token_id)

    def encode(self, messages: list[dict], tokens_per_image: list[int], allow_special_tokens: bool = False
               ) -> PromptTokens:
        """Token ids of the chat with each image pad expanded to its image's visual tokens.

        The caller's texts are text: a special-token string typed in them (`<|im_end|>`, say) is
        encoded as its characters, never as the control token, unless `allow_special_tokens`."""
        messages = plain_messages(messages)
        texts = [part["text"] for m in messages for part in
                 ([{"text": m["content"]}] if isinstance(m["content"], str) else m["content"]) if "text" in part]
        if allow_special_tokens or not any(token in text for text in texts for token in self.special_tokens):
            text = render_chat(self.chat_template, messages)
            ids = np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)
        else:
            text, ids = self._encode_texts_as_text(messages, texts)
        pads = np.flatnonzero(ids == self.image_token_id)
        if len(pads) != len(tokens_per_image):
            raise PromptError(f"the prompt has {len(pads)} image placeholders but {len(tokens_per_image)} images")
        pieces, start = [], 0
        for pad, count in zip(pads, tokens_per_image):
            pieces += [ids[start:pad], np.full(count, self.image_token_id, dtype=np.int64)]
            start = pad + 1
        pieces.append(ids[start:])
        return PromptTokens(text=text, input_ids=np.concatenate(pieces))

    def _encode_texts_as_text(self, messages: list[dict], texts: list[str]) -> tuple[str, np.ndarray]:
        marked, index = [], iter(range(len(texts)))
        for m in messages:
            if isinstance(m["content"], str):
                marked.append({**m, "content": _MARK.format(next(index))})
            else:
                marked.append({**m, "content": [{**p, "text": _MARK.format(next(index))} if "text" in p else p
                                                for p in m["content"]]})
        rendered = render_chat(self.chat_template, marked)
        pieces = _MARK_RE.split(rendered)  # template, text index, template, ...
        ids = []
        for i, piece in enumerate(pieces):
            if i % 2:
                ids += self.text_tokenizer.encode(texts[int(piece)], add_special_tokens=False).ids
            elif piece:
                ids += self.tokenizer.encode(piece, add_special_tokens=False).ids
        text = _MARK_RE.sub(lambda match: texts[int(match.group(1))], rendered)
        return text, np.asarray(ids, dtype=np.int64)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def text_stream(self) -> "TextStream":
        """Incremental detokenizer for one answer (see TextStream)."""
        return TextStream(self.tokenizer)


class TextStream:
    """Text of an answer token by token, each token decoded once: `step(id)` returns the new text, or
    "" while the token ends inside a UTF-8 character (or is a special token). The pieces, and then
    `finish()`, join to `decode(ids)`."""

    def __init__(self, tokenizer):
        from tokenizers.decoders import DecodeStream

        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)
        self._ids: list[int] = []
        self._shown = 0  # characters returned so far

    def step(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        piece = self._stream.step(self._tokenizer, int(token_id)) or ""
        self._shown += len(piece)
        return piece

    def finish(self) -> str:
        """What is still held back once the answer ends: the bytes of a character the token limit cut,
        as `decode` shows them (U+FFFD), so that the streamed text is the text `generate` returns."""
        return self._tokenizer.decode(self._ids, skip_special_tokens=True)[self._shown:]
