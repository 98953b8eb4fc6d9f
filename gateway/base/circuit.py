"""A circuit breaker per served model: stop sending work to a backend that keeps failing, probe it back."""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("gateway.circuit")


class CircuitState(enum.IntEnum):
    """As the `gateway_circuit_state` gauge reports it."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    """Closed until `failures` consecutive failed batches; then open for `open_s` (requests go elsewhere or
    are refused at once); then half-open: one request at a time probes the model, and its batch's success
    closes the circuit, its failure opens it again.

    Written by hand: the maintained breakers (pybreaker, aiobreaker) wrap one call and count exceptions of
    that call, while here the outcome of a batch, on a worker thread, decides for every request in it.
    Thread-safe: batches report from worker threads, requests ask from the event loop.
    """

    def __init__(self, model: str, failures: int, open_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.model = model
        self.failures = failures
        self.open_s = open_s
        self._clock = clock
        self._lock = threading.Lock()
        self._state = CircuitState.CLOSED
        self._failed = 0
        self._opened_at = 0.0
        # When the last probe was let through: a probe whose request never reached a batch (refused, cancelled)
        # reports nothing, so another may go once `open_s` has passed since.
        self._probe_at: float | None = None

    @property
    def state(self) -> CircuitState:
        with self._lock:
            return self._current()

    def _current(self) -> CircuitState:
        if self._state == CircuitState.OPEN and self._clock() - self._opened_at >= self.open_s:
            self._state, self._probe_at = CircuitState.HALF_OPEN, None
        return self._state

    def allow(self) -> bool:
        """Whether a request may go to the model now (in half-open state: the one probe)."""
        with self._lock:
            state = self._current()
            if state == CircuitState.CLOSED:
                return True
            if state == CircuitState.OPEN:
                return False
            now = self._clock()
            if self._probe_at is not None and now - self._probe_at < self.open_s:
                return False
            self._probe_at = now
            return True

    def retry_after(self) -> float:
        """Seconds until the model may be tried again (0 when it may now)."""
        with self._lock:
            if self._current() != CircuitState.OPEN:
                return 0.0
            return max(0.0, self.open_s - (self._clock() - self._opened_at))

    def success(self) -> None:
        """A batch succeeded: the circuit closes."""
        with self._lock:
            if self._state != CircuitState.CLOSED:
                log.warning("model %r: circuit closed (the backend answers again)", self.model)
            self._state, self._failed, self._probe_at = CircuitState.CLOSED, 0, None

    def failure(self) -> None:
        """A batch failed with the backend unavailable or timed out."""
        with self._lock:
            self._failed += 1
            state = self._current()
            if state == CircuitState.HALF_OPEN or (state == CircuitState.CLOSED and self._failed >= self.failures):
                log.warning(
                    "model %r: circuit open for %gs after %d consecutive failed batches",
                    self.model,
                    self.open_s,
                    self._failed,
                )
                self._state, self._opened_at, self._probe_at = CircuitState.OPEN, self._clock(), None
