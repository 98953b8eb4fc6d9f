"""GGUF backend for the embedding gateway: llama.cpp (through llama-cpp-python) serving BERT-family models.

`backend = "gguf"` serves a `.gguf` file; `gateway convert SRC --to gguf --out FILE` writes one from a
sentence-transformers / Hugging Face BERT folder. Importing this package stays cheap on purpose: the
gateway imports every plugin at start-up, and llama_cpp / gguf / torch are imported only when used.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from gateway.plugin import hookimpl

from .backend import GgufBackend
from .convert import GgufConverter

if TYPE_CHECKING:
    from gateway.plugin import Backend, Converter

__all__ = ["GgufBackend", "GgufConverter"]


@hookimpl
def register_backends(register: Callable[[type[Backend]], None]) -> None:
    register(GgufBackend)


@hookimpl
def register_converters(register: Callable[[Converter], None]) -> None:
    register(GgufConverter())
