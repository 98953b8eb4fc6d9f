"""Remote backends for the embedding gateway: any OpenAI-compatible embeddings server (`backend = "openai"`).

Importing this package is cheap: httpx and tokenizers load only when a model is loaded.
"""

from __future__ import annotations

from collections.abc import Callable

from gateway.plugin import Backend, hookimpl

from .backend import OpenAIBackend, OpenAIOptions

__all__ = ["OpenAIBackend", "OpenAIOptions"]


@hookimpl
def register_backends(register: Callable[[type[Backend]], None]) -> None:
    register(OpenAIBackend)
