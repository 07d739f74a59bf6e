"""`qwen3vl serve`: an OpenAI-compatible chat server over a runtime.Pipeline (needs the `[serve]` extra)."""

from .app import ServerConfig, create_app

__all__ = ["ServerConfig", "create_app"]
