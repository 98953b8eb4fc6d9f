"""Where a model's load stands (loading, ready, failed, unloaded) and what a request that waits for it is told.

Its own module because every reader of a model's state (the model list, health, reload, the use case) needs
it, while only the registry loads models."""

from __future__ import annotations

import asyncio
import enum
import re
import threading
import time

from gateway.base.errors import GatewayError

# An absolute path inside a message: from a slash at the start or after a space or quote, to the next space,
# quote or end.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.])/[^\s'\"`,;]+")


class ModelState(enum.StrEnum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    UNLOADED = "unloaded"


class Readiness:
    """One model's state and load error, and the event its load sets when it has finished (either way)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.state = ModelState.LOADING
        self.error: str | None = None
        self._loaded = threading.Event()

    def failed(self, reason: str) -> None:
        """The load failed for `reason` (what the server's log and, cut by `public_error`, clients read)."""
        self.state, self.error = ModelState.FAILED, reason

    def finished(self) -> None:
        """The load has finished (or will never run here): requests stop waiting for it."""
        self._loaded.set()

    @property
    def finished_loading(self) -> bool:
        return self._loaded.is_set()

    def wait(self) -> None:
        """Block until the load has finished."""
        self._loaded.wait()

    @property
    def is_ready(self) -> bool:
        """Loaded and serving now (no waiting)."""
        return self._loaded.is_set() and self.state == ModelState.READY

    async def ready(self, timeout: float) -> None:
        """Wait for the load to finish; 503 if it failed or is still running after `timeout`."""
        if not self._loaded.is_set():
            # Polled, not waited on in a thread: a crowd of early requests must not hold the executor.
            deadline = time.monotonic() + timeout
            while not self._loaded.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if not self._loaded.is_set():
                raise GatewayError(
                    503,
                    f"model {self.name!r} is still loading; retry shortly",
                    code="model_loading",
                    headers={"Retry-After": "5"},
                )
        if self.state != ModelState.READY:
            raise self.unavailable()

    def unavailable(self) -> GatewayError:
        """The 503 for a request to this model while it is not serving (failed, unloaded, or loading)."""
        return GatewayError(
            503,
            f"model {self.name!r} is not available: {self.public_error or self.state}",
            code="model_unavailable",
        )

    @property
    def public_error(self) -> str | None:
        """The load error as clients may read it: file system paths cut to their last part (the server's
        log has them whole)."""
        return (
            _ABSOLUTE_PATH.sub(lambda m: ".../" + m.group(0).rstrip("/").rsplit("/", 1)[-1], self.error)
            if self.error
            else None
        )
