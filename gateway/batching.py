"""Per-model dynamic batcher: merges inputs from concurrent requests into backend batches.

Written by hand: no maintained library batches across asyncio requests into a synchronous runtime with a
token budget (Infinity and TEI each carry their own). Worker threads own the backend; the event loop only
enqueues and awaits futures.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .backend import Backend

log = logging.getLogger("gateway.batching")


class QueueFull(Exception):
    """The model's queue cannot take this request now."""

    def __init__(self, model: str, queued: int, limit: int) -> None:
        super().__init__(f"model {model!r} is overloaded: {queued} inputs queued (limit {limit}); retry shortly")
        self.retry_after = 1


class BatchFailed(Exception):
    """The backend raised while computing a batch that held this request's inputs."""


@dataclass(eq=False, slots=True)
class _Request:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[np.ndarray]
    n: int
    vectors: np.ndarray | None = None
    remaining: int = 0
    done: bool = False


@dataclass(slots=True)
class _Item:
    text: str
    tokens: int
    index: int
    request: _Request = field(repr=False)


@dataclass(slots=True)
class BatchStats:
    batches: int = 0
    inputs: int = 0
    failures: int = 0


def _resolve(req: _Request, result: np.ndarray | None, exc: BaseException | None) -> None:
    if req.future.done():
        return
    if exc is not None:
        req.future.set_exception(exc)
    else:
        req.future.set_result(result)  # type: ignore[arg-type]


class Batcher:
    """Queue + worker threads for one loaded backend."""

    def __init__(
        self,
        backend: Backend,
        *,
        model: str,
        max_batch_size: int,
        max_batch_tokens: int,
        max_wait_ms: float = 0.0,
        max_queue: int = 4096,
        on_batch: Callable[[str, int, int, float], None] | None = None,
    ) -> None:
        self.backend = backend
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.stats = BatchStats()
        self._on_batch = on_batch
        self._queue: deque[_Item] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._busy = 0
        self._threads = [
            threading.Thread(target=self._run, name=f"batcher-{model}-{i}", daemon=True)
            for i in range(max(1, backend.max_concurrent_batches))
        ]
        for t in self._threads:
            t.start()

    @property
    def queued(self) -> int:
        """Inputs waiting for a worker."""
        return len(self._queue)

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing computing."""
        with self._cond:
            return not self._queue and self._busy == 0

    async def embed(self, texts: Sequence[str], tokens: Sequence[int]) -> np.ndarray:
        """Vectors for `texts` (float32 [n, dim], input order); `tokens` are their counts."""
        loop = asyncio.get_running_loop()
        req = _Request(loop=loop, future=loop.create_future(), n=len(texts), remaining=len(texts))
        with self._cond:
            if self._closed:
                raise RuntimeError(f"model {self.model!r} is shutting down")
            # An oversized request is still admitted into an empty queue, or it could never be served.
            if self._queue and len(self._queue) + len(texts) > self.max_queue:
                raise QueueFull(self.model, len(self._queue), self.max_queue)
            self._queue.extend(_Item(t, k, i, req) for i, (t, k) in enumerate(zip(texts, tokens, strict=True)))
            self._cond.notify()
        try:
            return await req.future
        except asyncio.CancelledError:
            # The client went away (or timed out): drop what has not started so nobody computes it.
            with self._cond:
                req.done = True
                if any(it.request is req for it in self._queue):
                    self._queue = deque(it for it in self._queue if it.request is not req)
            raise

    def _take(self) -> list[_Item] | None:
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            if self.max_wait and len(self._queue) < self.max_batch_size:
                deadline = time.monotonic() + self.max_wait
                while len(self._queue) < self.max_batch_size and not self._closed:
                    left = deadline - time.monotonic()
                    if left <= 0 or not self._cond.wait(left):
                        break
            batch: list[_Item] = []
            longest = 0
            while self._queue and len(batch) < self.max_batch_size:
                item = self._queue[0]
                if item.request.done:
                    self._queue.popleft()
                    continue
                # Budget is the padded size of the batch, what the runtime actually allocates.
                width = max(longest, item.tokens)
                if batch and width * (len(batch) + 1) > self.max_batch_tokens:
                    break
                batch.append(self._queue.popleft())
                longest = width
            self._busy += 1
            if self._queue:
                self._cond.notify()
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            try:
                if batch:
                    self._compute(batch)
            finally:
                with self._cond:
                    self._busy -= 1
                    self._cond.notify_all()

    def _compute(self, batch: list[_Item]) -> None:
        # Length-sorted batches pad less; results go back by each item's own index.
        batch.sort(key=lambda it: it.tokens)
        started = time.perf_counter()
        try:
            vectors = self.backend.embed([it.text for it in batch])
            if vectors.shape[0] != len(batch):
                raise RuntimeError(f"backend returned {vectors.shape[0]} vectors for {len(batch)} inputs")
        except Exception as exc:
            self.stats.failures += 1
            log.exception("batch of %d inputs failed on model %r", len(batch), self.model)
            err = BatchFailed(f"model {self.model!r} failed on a batch: {type(exc).__name__}")
            for req in {id(it.request): it.request for it in batch}.values():
                if not req.done:
                    req.done = True
                    req.loop.call_soon_threadsafe(_resolve, req, None, err)
            return
        elapsed = time.perf_counter() - started
        self.stats.batches += 1
        self.stats.inputs += len(batch)
        if self._on_batch is not None:
            self._on_batch(self.model, len(batch), sum(it.tokens for it in batch), elapsed)
        for it, vec in zip(batch, vectors, strict=True):
            req = it.request
            if req.done:
                continue
            if req.vectors is None:
                req.vectors = np.empty((req.n, vectors.shape[1]), dtype=np.float32)
            req.vectors[it.index] = vec
            req.remaining -= 1
            if req.remaining == 0:
                req.done = True
                req.loop.call_soon_threadsafe(_resolve, req, req.vectors, None)

    def close(self, timeout: float | None = 30.0) -> None:
        """Finish what is queued, then stop the workers."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout)
