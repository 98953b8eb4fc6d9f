"""Embedding gateway: one OpenAI-compatible HTTP API for text embeddings, any runtime behind it."""

from __future__ import annotations

from gateway.plugin import (
    Backend,
    BackendError,
    BackendFailure,
    BackendOverloaded,
    BackendTimeout,
    BackendUnavailable,
    Converter,
    Embedded,
    InputRejected,
    ModelInfo,
    NoOptions,
    Placement,
    TokenSpan,
    hookimpl,
    tokenizer_spans,
)

__all__ = [
    "Backend",
    "BackendError",
    "BackendFailure",
    "BackendOverloaded",
    "BackendTimeout",
    "BackendUnavailable",
    "Converter",
    "Embedded",
    "InputRejected",
    "ModelInfo",
    "NoOptions",
    "Placement",
    "TokenSpan",
    "create_app",
    "hookimpl",
    "tokenizer_spans",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # create_app pulls in Litestar; plugins importing `hookimpl` should not pay for that.
    if name == "create_app":
        from gateway.api.app import create_app

        return create_app
    raise AttributeError(name)
