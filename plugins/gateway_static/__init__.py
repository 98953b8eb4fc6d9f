"""Static-embedding backends for the embedding gateway: WordLlama (`backend = "wordllama"`).

Importing this package is cheap: wordllama, tokenizers and safetensors load only when a model is loaded.
"""

from __future__ import annotations

from collections.abc import Callable

from gateway.plugin import Backend, hookimpl

from .backend import WordLlamaBackend, WordLlamaOptions

__all__ = ["WordLlamaBackend", "WordLlamaOptions"]


@hookimpl
def register_backends(register: Callable[[type[Backend]], None]) -> None:
    register(WordLlamaBackend)
