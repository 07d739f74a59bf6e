"""A conversation as `qwen3vl chat` keeps it: chat messages in the runtime's format, images by path.

The saved form is JSON, `{"format": "qwen3vl-chat", "messages": [...]}`, whose messages
`Pipeline.generate` takes as they are: a user turn is a list of parts, its images first
(`{"type": "image", "image": "/absolute/path.png"}`) then its text; an answer is a string.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from runtime.errors import PromptError

FORMAT = "qwen3vl-chat"


@dataclass
class Conversation:
    system: str | None = None  # kept across /reset
    turns: list[dict] = field(default_factory=list)  # user and assistant messages, in order
    attached: list[str] = field(default_factory=list)  # image paths for the next user turn

    @property
    def messages(self) -> list[dict]:
        """The whole conversation, system prompt included."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns

    def user_message(self, text: str) -> dict:
        """The next user turn: the attached images, then the text."""
        images = [{"type": "image", "image": path} for path in self.attached]
        return {"role": "user", "content": images + [{"type": "text", "text": text}]}

    def add_turn(self, user: dict, answer: str) -> None:
        self.turns += [user, {"role": "assistant", "content": answer}]
        self.attached = []

    def reset(self) -> None:
        self.turns, self.attached = [], []

    @property
    def user_turns(self) -> int:
        return sum(message["role"] == "user" for message in self.turns)

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"format": FORMAT, "messages": self.messages}, f, ensure_ascii=False, indent=2)
            f.write("\n")

    @classmethod
    def load(cls, path: str) -> "Conversation":
        """A conversation saved by `save`; PromptError for anything else."""
        try:
            with open(path, encoding="utf-8") as f:
                saved = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PromptError(f"{path} is not a saved conversation (not JSON: {exc})") from None
        if not isinstance(saved, dict) or saved.get("format") != FORMAT or not isinstance(saved.get("messages"), list):
            raise PromptError(f'{path} is not a saved conversation (expected {{"format": "{FORMAT}", "messages": '
                              f"[...]}})")
        messages = saved["messages"]
        for message in messages:
            _check_message(message, path)
        system = None
        if messages and messages[0]["role"] == "system":
            system, messages = messages[0]["content"], messages[1:]
        return cls(system, messages)


def _check_message(message, path: str) -> None:
    """A message as `save` writes them: a role, and text (or, for a user, text and image parts)."""
    if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
        raise PromptError(f"{path}: each message needs a role among system, user, assistant; got {message!r:.80}")
    content = message.get("content")
    if isinstance(content, str):
        return
    if message["role"] == "user" and isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                continue
            if isinstance(part, dict) and part.get("type") == "image" and isinstance(part.get("image"), str) \
                    and os.path.isabs(part["image"]):
                continue
            raise PromptError(f"{path}: a user message part must be text or an image by absolute path; "
                              f"got {part!r:.80}")
        return
    raise PromptError(f"{path}: the content of a {message['role']} message must be text; got {content!r:.80}")
