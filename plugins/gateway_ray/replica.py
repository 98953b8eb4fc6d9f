"""What runs in each Ray Serve replica: the configured Backend, built as the gateway would build it in-process.

Imports no Ray: Ray Serve wraps this class into a deployment (front.py), and pickles it by reference, so the
replica imports this module (and the backend's own plugin) from its own installation.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Sequence
from typing import Any

import msgspec
import numpy as np

from gateway import Backend, BackendError
from gateway.plugin import Embedded, Task, check_info

log = logging.getLogger("gateway.ray.replica")


def find_backend(name: str, ref: str) -> type[Backend]:
    """The Backend class registered as `name` through the entry points, or, when none is (a plugin the embedding
    application registered by hand), the class at `ref` ("module:qualname")."""
    from gateway.runtime.plugins import load_plugins

    plugins = load_plugins()
    cls = plugins.backends().get(name)
    if cls is not None and f"{cls.__module__}:{cls.__qualname__}" == ref:
        return cls
    module, _, qualname = ref.partition(":")
    try:
        found: Any = importlib.import_module(module)
        for part in qualname.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError) as exc:
        hint = f"; plugin {name!r} failed to import: {plugins.broken[name]}" if name in plugins.broken else ""
        raise BackendError(f"backend {name!r} ({ref}) is not installed where this replica runs: {exc}{hint}") from None
    if not (isinstance(found, type) and issubclass(found, Backend)):
        raise BackendError(f"{ref} is not a Backend class")
    return found


class Replica:
    """One copy of the model. A load failure is kept and reported (`describe`, `check_health`) rather than
    raised, so that the gateway can show the backend's own reason instead of Ray Serve's."""

    def __init__(
        self, backend: str, ref: str, model: str, path: str, options: Any, trust_remote_code: bool, task: Task = "embed"
    ) -> None:
        self._backend: Backend | None = None
        self._info: dict[str, Any] | None = None
        self._error: str | None = None
        try:
            cls = find_backend(backend, ref)
            instance = cls(
                model=model,
                path=path,
                options=msgspec.convert(options, cls.Options),
                trust_remote_code=trust_remote_code,
            )
            # As the core tells an in-process backend: a reranker loads as one ("rerank") from the same folder.
            instance.task = task
            info = check_info(instance, instance.load())
            self._backend, self._info = instance, msgspec.to_builtins(info)
        except Exception as exc:
            self._error = str(exc) if isinstance(exc, BackendError) else f"{type(exc).__name__}: {exc}"
            log.exception("model %r failed to load in replica %d", model, os.getpid())

    def describe(self) -> dict[str, Any]:
        """{"info": ModelInfo as a dict} once loaded, else {"error": reason}; and where it runs."""
        where = {"pid": os.getpid(), "node": _node_id()}
        return {"error": self._error, **where} if self._info is None else {"info": self._info, **where}

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(ids) for ids in self._loaded().tokenize(texts)]

    def embed(self, texts: Sequence[str], token_ids: Sequence[Sequence[int]]) -> np.ndarray | Embedded:
        out = self._loaded().embed(texts, token_ids)
        # As is when it is not an array (`Embedded`, or garbage the front's batcher refuses as it would here).
        return np.ascontiguousarray(out) if isinstance(out, np.ndarray) else out

    def tokenize_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[list[int]]:
        return [list(ids) for ids in self._loaded().tokenize_pairs(pairs)]

    def score(self, pairs: Sequence[tuple[str, str]], token_ids: Sequence[Sequence[int]]) -> np.ndarray | Embedded:
        out = self._loaded().score(pairs, token_ids)
        return np.ascontiguousarray(out) if isinstance(out, np.ndarray) else out

    def check_health(self) -> None:
        """Ray Serve's health check: a replica whose model did not load is replaced."""
        if self._error is not None:
            raise RuntimeError(self._error)

    def __del__(self) -> None:
        # Ray Serve calls this when it stops the replica.
        if self._backend is not None:
            self._backend.close()
            self._backend = None

    def _loaded(self) -> Backend:
        if self._backend is None:
            raise BackendError(f"the model did not load in this replica: {self._error}")
        return self._backend


def _node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:
        return None
