"""Errors a user can act on. The command line prints them as one line and exits non-zero."""


class Qwen3VLError(Exception):
    """Base class: a problem with the user's input, files or environment (not a bug)."""


class ImageError(Qwen3VLError):
    """An image that cannot be read or is outside what the image processor accepts."""


class CheckpointError(Qwen3VLError):
    """A checkpoint folder that is missing, incomplete, of another model, or inconsistent."""


class PromptError(Qwen3VLError):
    """A prompt or chat that cannot be turned into model input."""
