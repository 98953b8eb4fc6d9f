"""ONNX Runtime backend (`backend = "onnx"`) and converter (`gateway convert --to onnx`).

Importing this package is cheap: onnxruntime, tokenizers, torch and onnx load only when a model is loaded
or converted.
"""

from __future__ import annotations

from collections.abc import Callable

from gateway.plugin import Backend, Converter, hookimpl

from .backend import OnnxBackend, OnnxOptions
from .convert import OnnxConverter

__all__ = ["OnnxBackend", "OnnxConverter", "OnnxOptions"]


@hookimpl
def register_backends(register: Callable[[type[Backend]], None]) -> None:
    register(OnnxBackend)


@hookimpl
def register_converters(register: Callable[[Converter], None]) -> None:
    register(OnnxConverter())
