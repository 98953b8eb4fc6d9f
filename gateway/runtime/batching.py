"""Per-model dynamic batcher: merges inputs from concurrent requests into backend batches.

Written by hand: no maintained library batches across asyncio requests into a synchronous runtime with a
token budget (Infinity and TEI each carry their own). Worker threads own the backend; the event loop only
enqueues and awaits futures. The queue and the choice of each batch (keys taking turns) live in
`batch_queue`, whether a request may join it (by predicted wait) in `admission`; this module computes the
batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from gateway.base.circuit import CircuitBreaker
from gateway.plugin import Backend, BackendFailure, Embedded, InputRejected, ModelInfo, Task
from gateway.runtime.admission import Admission, QueueFull
from gateway.runtime.batch_queue import BatchQueue, Item, Progress, Request, split_by_padding

__all__ = ["BatchFailed", "Batcher", "Progress", "QueueFull", "split_by_padding"]

log = logging.getLogger("gateway.batching")


class BatchFailed(Exception):
    """The backend raised (or returned garbage) while computing a batch that held this request's inputs."""


def _resolve(req: Request, result: np.ndarray | None, exc: BaseException | None) -> None:
    if req.future.done():
        return
    if exc is not None:
        req.future.set_exception(exc)
    else:
        req.future.set_result(result)  # type: ignore[arg-type]


def _notify(req: Request, result: np.ndarray | None, exc: BaseException | None) -> None:
    # From a worker thread: the future belongs to the request's event loop.
    with contextlib.suppress(RuntimeError):  # that loop is gone (its client and server with it)
        req.loop.call_soon_threadsafe(_resolve, req, result, exc)


def _resolve_done(reqs: list[Request]) -> None:
    for req in reqs:
        _resolve(req, req.vectors, None)


def _notify_done(reqs: list[Request]) -> None:
    # One wake-up per event loop for all the requests a batch completed, not one per request.
    by_loop: dict[asyncio.AbstractEventLoop, list[Request]] = {}
    for req in reqs:
        by_loop.setdefault(req.loop, []).append(req)
    for loop, group in by_loop.items():
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_resolve_done, group)


class Batcher:
    """Worker threads that compute the batches of one loaded backend, fed by its queue."""

    def __init__(
        self,
        backend: Backend,
        info: ModelInfo,
        *,
        model: str,
        max_batch_size: int | None = None,
        max_batch_tokens: int | None = None,
        max_wait_ms: float = 0.0,
        return_wait: float = 0.0,
        background_batch_ms: float = 0.0,
        background_grace_ms: float = 0.0,
        background_batch_size: int | None = None,
        max_queue: int = 4096,
        on_batch: Callable[[str, int, int, float], None] | None = None,
        circuit: CircuitBreaker | None = None,
        task: Task = "embed",
    ) -> None:
        """`info`: what the loaded backend declared; batch limits left None take its defaults; `circuit`
        learns the outcome of every batch. `task` "rerank": the inputs are (query, document) pairs, batches
        call the backend's `score`, and each input's result is one value (a row of width 1)."""
        self.backend, self.circuit, self.model = backend, circuit, model
        self.scoring = task == "rerank"
        self.dimension = 1 if self.scoring else info.dimension
        self.pads_to_longest = info.pads_to_longest
        self.call_overhead_tokens = info.call_overhead_tokens
        self.max_batch_size = max_batch_size or info.max_batch_size
        self.max_batch_tokens = max_batch_tokens or info.max_batch_tokens
        self.max_wait, self.return_wait = max_wait_ms / 1000.0, return_wait
        self.max_queue = max_queue
        self._on_batch = on_batch
        self._queue = BatchQueue(
            max_batch_size=self.max_batch_size,
            max_batch_tokens=self.max_batch_tokens,
            pads_to_longest=self.pads_to_longest,
            max_wait=self.max_wait,
            return_wait=return_wait,
            background_batch=background_batch_ms / 1000.0,
            background_grace=background_grace_ms / 1000.0,
            background_batch_size=background_batch_size,
        )
        # One lock for the queue, admission and every request's state: the queue's, which workers wait on.
        self._cond = self._queue.lock
        # Background requests (the queue's), kept under this name for the tests that watch them arrive.
        self._idle = self._queue.background
        self._admission = Admission(
            self._queue, model=model, max_queue=max_queue, max_batch_tokens=self.max_batch_tokens
        )
        self._threads = _workers(self, info.concurrent_batches)

    @property
    def queued(self) -> int:
        """Inputs waiting for a worker."""
        return self._queue.pending

    @property
    def drain_rate(self) -> float | None:
        """Tokens per second the model drains while it has work (None until a batch has been measured)."""
        return self._admission.rate

    def predicted_wait(self) -> float:
        """Seconds until the work queued now is done, at the measured drain rate (0 before any measurement)."""
        return self._admission.predicted_wait()

    async def embed(
        self,
        texts: Sequence[str] | Sequence[tuple[str, str]],
        token_ids: Sequence[Sequence[int]],
        *,
        owner: str | None = None,
        max_wait_s: float | None = None,
        progress: Progress | None = None,
        sizes: Sequence[int] | None = None,
        background: bool = False,
    ) -> np.ndarray:
        """Vectors for `texts` (float32 [n, dim], input order; for a scoring batcher, `texts` are pairs and the
        result their scores, [n, 1]); `token_ids` are the backend's ids for each
        text, handed to its `embed` with the batch; `sizes`: each text's estimated tokens, for a backend that
        does not count them (its ids are then empty).

        `owner` (the caller's key) is who takes turns with whom; `max_wait_s` refuses the request (QueueFull)
        unless its predicted completion is within it; `progress` learns how much of it batches took.
        `background`: work for no client (calibration), at low priority: never refused, never counted
        against the queue's bound, and computed only while no client input waits.
        """
        if len(texts) != len(token_ids):
            raise ValueError("one id list per text")
        if len(texts) > self.max_queue and not background:
            raise ValueError(f"{len(texts)} inputs can never fit model {self.model!r}'s queue of {self.max_queue}")
        tokens = list(sizes) if sizes is not None else list(map(len, token_ids))
        req = Request.new(
            texts, token_ids, tokens, self.dimension, owner=owner, progress=progress, background=background
        )
        with self._cond:
            if self._queue.closed:
                raise RuntimeError(f"model {self.model!r} is shutting down")
            if not background:
                self._admission.check(owner, len(texts), sum(tokens), max_wait_s)
            self._queue.put(req)
        try:
            return await req.future
        except asyncio.CancelledError:
            self._cancel(req)
            raise

    def _cancel(self, req: Request) -> None:
        # The client went away (or timed out): drop what has not started so nobody computes it.
        with self._cond:
            if not req.done:
                req.done = True
                self._queue.drop(req)

    def precheck(self, owner: str | None = None, max_wait_s: float | None = None) -> None:
        """QueueFull now if a request from `owner` would be refused whatever its size: called before the
        request is tokenized, so that refusing a flood costs little."""
        with self._cond:
            self._admission.check(owner, 0, 0, max_wait_s)

    def _run(self) -> None:
        # When this worker's last batch ended, if work was waiting then: the time from there to the end of
        # the next batch is drain time (turnaround included), the basis of the rate estimate.
        busy_since: float | None = None
        while True:
            try:
                batch = self._queue.take()
            except Exception:  # a bug here must not end the worker: every later request would hang
                log.exception("batcher for model %r: cannot take a batch", self.model)
                time.sleep(0.01)
                continue
            if batch is None:
                return
            started = time.perf_counter()
            try:
                tokens = self._compute(batch)
            except BaseException:  # the worker must outlive any batch, whatever happens in it
                log.exception("batcher for model %r: unexpected error", self.model)
                self._fail(batch, BatchFailed(f"model {self.model!r} failed on a batch"))
                tokens = 0
            ended = time.perf_counter()
            with self._cond:
                if tokens:
                    self._admission.measure(tokens, ended - (busy_since or started), len(self._threads))
                busy_since = ended if self._queue.pending else None

    def _fail(self, batch: list[Item], err: Exception) -> None:
        with self._cond:
            reqs = {id(r): r for r, _ in batch if not r.done}.values()
            for req in reqs:
                req.done = True
                self._queue.drop(req)
        for req in reqs:
            _notify(req, None, err)

    def _compute(self, batch: list[Item]) -> int:
        """Run `batch` and hand its vectors back; the tokens it computed (0 when it failed)."""
        # Length-sorted batches pad less; results go back by each input's own index.
        batch.sort(key=lambda ri: ri[0].tokens[ri[1]])
        started = time.perf_counter()
        try:
            vectors, counted = self._embed_batch(batch)
        except Exception as exc:
            return self._recover(batch, exc)
        if self.circuit is not None:
            self.circuit.success()
        elapsed = time.perf_counter() - started
        self._deliver(batch, vectors, counted, elapsed)
        tokens = sum(req.tokens[i] for req, i in batch)
        if self._on_batch is not None:
            try:
                self._on_batch(self.model, len(batch), tokens, elapsed)
            except Exception:
                log.exception("batch metrics callback failed")
        return tokens

    def _embed_batch(self, batch: list[Item]) -> tuple[np.ndarray, int | None]:
        """The vectors of a length-sorted `batch` (for a backend that pads, in calls cut where padding costs
        least), and the tokens the backend counted (None unless every call reported them)."""
        texts = [req.texts[i] for req, i in batch]
        ids = [req.token_ids[i] for req, i in batch]
        if not (self.pads_to_longest and len(batch) > 1):
            return _call(self, texts, ids)
        lengths = [req.tokens[i] for req, i in batch]
        ends = split_by_padding(lengths, self.call_overhead_tokens)
        parts = [_call(self, texts[a:b], ids[a:b]) for a, b in zip([0, *ends], ends, strict=False)]
        vectors = np.concatenate([v for v, _ in parts])
        counts = [c for _, c in parts]
        return vectors, None if None in counts else sum(c for c in counts if c is not None)

    def _recover(self, batch: list[Item], exc: Exception) -> int:
        """After `batch` failed with `exc`: each request's inputs again on their own where the fault may be one
        request's, else the batch's requests fail; the tokens computed."""
        groups: dict[int, list[Item]] = {}
        for req, i in batch:
            groups.setdefault(id(req), []).append((req, i))
        typed = isinstance(exc, BackendFailure)
        if typed and exc.fail_over and self.circuit is not None:
            self.circuit.failure()
        # A runtime that is down, slow or overloaded fails every request alike: retrying each would only
        # hammer it. Only a rejected input (or an untyped error) may be one request's fault.
        if len(groups) > 1 and (not typed or isinstance(exc, InputRejected)):
            # Several requests shared the failed batch: run each request's inputs on their own, so only
            # the request that holds the bad input fails.
            log.warning("batch of %d inputs failed on model %r (%s); retrying per request", len(batch), self.model, exc)
            return sum(self._compute(group) for group in groups.values())
        if typed:
            # The backend logged the details; this is what its clients are told.
            log.warning("batch of %d inputs failed on model %r: %s", len(batch), self.model, exc)
            self._fail(batch, exc)
            return 0
        log.error("batch of %d inputs failed on model %r", len(batch), self.model, exc_info=exc)
        self._fail(batch, BatchFailed(f"model {self.model!r} failed on a batch: {type(exc).__name__}"))
        return 0

    def _deliver(self, batch: list[Item], vectors: np.ndarray, counted: int | None, elapsed: float) -> None:
        """Each input's vector to its request (and the backend's token count to their progress); wakes the
        requests the batch completed."""
        _notify_done(self._queue.complete(batch, vectors, counted, elapsed))

    def close(self, timeout: float | None = 30.0) -> None:
        """Finish what is queued, then stop the workers."""
        self._queue.close()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout)


def _workers(batcher: Batcher, n: int) -> list[threading.Thread]:
    """The batcher's worker threads, started: each takes batches and calls the backend."""
    threads = [
        threading.Thread(target=batcher._run, name=f"batcher-{batcher.model}-{i}", daemon=True) for i in range(n)
    ]
    for t in threads:
        t.start()
    return threads


def _call(batcher: Batcher, texts: list[Any], token_ids: list[Sequence[int]]) -> tuple[np.ndarray, int | None]:
    """One backend call of a batch (or part of one): the vectors, and the tokens the backend counted when it
    reports them (Embedded)."""
    if batcher.scoring:
        got = batcher.backend.score(texts, token_ids)
        # A backend that counts tokens at its runtime (a remote one) says how many with its scores.
        scores = np.asarray(got.vectors if isinstance(got, Embedded) else got, dtype=np.float32)
        if scores.shape != (len(texts),):
            raise RuntimeError(f"backend returned {scores.shape} scores for {len(texts)} pairs")
        out: np.ndarray | Embedded = (
            Embedded(scores.reshape(-1, 1), got.tokens) if isinstance(got, Embedded) else scores.reshape(-1, 1)
        )
    else:
        out = batcher.backend.embed(texts, token_ids)
    counted = None
    if isinstance(out, Embedded):
        vectors, counted = out.vectors, out.tokens
    else:
        vectors = out
    shape = getattr(vectors, "shape", None)
    if shape != (len(texts), batcher.dimension):
        raise RuntimeError(f"backend returned shape {shape} for {len(texts)} inputs of width {batcher.dimension}")
    if not np.isfinite(vectors).all():
        raise RuntimeError("backend returned NaN or infinite values")
    return vectors, counted
