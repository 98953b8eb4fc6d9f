"""Per-model dynamic batcher: merges inputs from concurrent requests into backend batches.

Written by hand: no maintained library batches across asyncio requests into a synchronous runtime with a
token budget (Infinity and TEI each carry their own). Worker threads own the backend; the event loop only
enqueues and awaits futures.

Batches are filled round-robin across the queued requests, one input from each in turn, so a request with
thousands of inputs shares every batch with the small requests behind it instead of holding them up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .backend import Backend, ModelInfo

log = logging.getLogger("gateway.batching")


class QueueFull(Exception):
    """The model's queue cannot take this request now."""

    def __init__(self, model: str, queued: int, limit: int) -> None:
        super().__init__(f"model {model!r} is overloaded: {queued} inputs queued (limit {limit}); retry shortly")
        self.retry_after = 1


class BatchFailed(Exception):
    """The backend raised (or returned garbage) while computing a batch that held this request's inputs."""


@dataclass(eq=False, slots=True)
class _Request:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[np.ndarray]
    texts: Sequence[str]
    tokens: Sequence[int]
    # The backend's own ids for each text (what its `tokenize` returned), handed back with the batch.
    token_ids: Sequence[Sequence[int]]
    vectors: np.ndarray
    # Inputs not handed to a batch yet (in input order), and inputs not computed yet; both change only under
    # the batcher's lock.
    waiting: list[int] = field(default_factory=list)
    remaining: int = 0
    done: bool = False
    # When a batch last took inputs from this request (its arrival until then): the request served
    # longest ago anchors the next batch, so every queued request moves forward in turn.
    served: float = field(default_factory=time.monotonic)


def _resolve(req: _Request, result: np.ndarray | None, exc: BaseException | None) -> None:
    if req.future.done():
        return
    if exc is not None:
        req.future.set_exception(exc)
    else:
        req.future.set_result(result)  # type: ignore[arg-type]


def _notify(req: _Request, result: np.ndarray | None, exc: BaseException | None) -> None:
    # From a worker thread: the future belongs to the request's event loop.
    with contextlib.suppress(RuntimeError):  # that loop is gone (its client and server with it)
        req.loop.call_soon_threadsafe(_resolve, req, result, exc)


def _resolve_done(reqs: list[_Request]) -> None:
    for req in reqs:
        _resolve(req, req.vectors, None)


def _notify_done(reqs: list[_Request]) -> None:
    # One wake-up per event loop for all the requests a batch completed, not one per request.
    by_loop: dict[asyncio.AbstractEventLoop, list[_Request]] = {}
    for req in reqs:
        by_loop.setdefault(req.loop, []).append(req)
    for loop, group in by_loop.items():
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_resolve_done, group)


# How many candidates (times max_batch_size) a batch is chosen from.
_CANDIDATES = 4


def split_by_padding(lengths: Sequence[int], overhead: int) -> list[int]:
    """Where to cut a length-sorted batch so that sum(calls x overhead + rows x longest) is least.

    Runtimes that pad a batch to its longest input waste compute on mixed lengths; each extra call costs a
    fixed `overhead` (in token units). Exact dynamic programme over the cut points; batches are small.
    Returns the end index of each group.
    """
    n = len(lengths)
    best = [0] + [0] * n
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        best[end], cut[end] = min(
            (best[start] + overhead + (end - start) * lengths[end - 1], start) for start in range(end)
        )
    ends: list[int] = []
    end = n
    while end:
        ends.append(end)
        end = cut[end]
    return ends[::-1]


class Batcher:
    """Queue + worker threads for one loaded backend."""

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
        max_queue: int = 4096,
        on_batch: Callable[[str, int, int, float], None] | None = None,
    ) -> None:
        """`info`: what the loaded backend declared; batch limits left None take its defaults."""
        self.backend = backend
        self.model = model
        self.dimension = info.dimension
        self.pads_to_longest = info.pads_to_longest
        self.call_overhead_tokens = info.call_overhead_tokens
        self.max_batch_size = max_batch_size or info.max_batch_size
        self.max_batch_tokens = max_batch_tokens or info.max_batch_tokens
        self.max_wait = max_wait_ms / 1000.0
        self.return_wait = return_wait
        # Inputs expected right after the last batch (those queued then, plus one per request it answered:
        # a client that got its answer tends to send again), and how long that batch computed (see _take).
        self._expect = 0
        self._last_compute_s = 0.0
        self._finished_at = 0.0
        self.max_queue = max_queue
        self._on_batch = on_batch
        self._queue: deque[_Request] = deque()
        self._pending = 0  # inputs queued, not yet taken by a worker
        self._cond = threading.Condition()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._run, name=f"batcher-{model}-{i}", daemon=True)
            for i in range(info.concurrent_batches)
        ]
        for t in self._threads:
            t.start()

    @property
    def queued(self) -> int:
        """Inputs waiting for a worker."""
        return self._pending

    async def embed(self, texts: Sequence[str], token_ids: Sequence[Sequence[int]]) -> np.ndarray:
        """Vectors for `texts` (float32 [n, dim], input order); `token_ids` are the backend's ids for each
        text, handed to its `embed` with the batch."""
        if len(texts) != len(token_ids):
            raise ValueError("one id list per text")
        if len(texts) > self.max_queue:
            raise ValueError(f"{len(texts)} inputs can never fit model {self.model!r}'s queue of {self.max_queue}")
        loop = asyncio.get_running_loop()
        req = _Request(
            loop=loop,
            future=loop.create_future(),
            texts=texts,
            tokens=list(map(len, token_ids)),
            token_ids=token_ids,
            vectors=np.empty((len(texts), self.dimension), dtype=np.float32),
            waiting=list(range(len(texts))),
            remaining=len(texts),
        )
        with self._cond:
            if self._closed:
                raise RuntimeError(f"model {self.model!r} is shutting down")
            if self._pending + len(texts) > self.max_queue:
                raise QueueFull(self.model, self._pending, self.max_queue)
            self._queue.append(req)
            self._pending += len(texts)
            self._cond.notify()
        try:
            return await req.future
        except asyncio.CancelledError:
            # The client went away (or timed out): drop what has not started so nobody computes it.
            with self._cond:
                if not req.done:
                    req.done = True
                    self._drop(req)
            raise

    def _drop(self, req: _Request) -> None:
        # Under the lock: forget the inputs of `req` that no batch has taken yet.
        self._pending -= len(req.waiting)
        req.waiting = []
        if req in self._queue:
            self._queue.remove(req)

    def _take(self) -> list[tuple[_Request, int]] | None:
        with self._cond:
            self._wait_for_inputs()
            while not self._pending:
                # Everything queued was cancelled while this worker waited for more: start over.
                if self._closed:
                    return None
                self._wait_for_inputs()
            batch = self._choose()
            taken: dict[int, set[int]] = {}
            for req, i in batch:
                taken.setdefault(id(req), set()).add(i)
            now = time.monotonic()
            for req in [r for r in self._queue if id(r) in taken]:
                req.served = now
                req.waiting = [i for i in req.waiting if i not in taken[id(req)]]
                if not req.waiting:
                    self._queue.remove(req)
            self._pending -= len(batch)
            if self._pending:
                self._cond.notify()
            return batch

    def _wait_for_inputs(self) -> None:
        # Under the lock: until something is queued, then, if configured, a little longer for more. Queued
        # inputs can disappear meanwhile (cancelled requests): the caller checks _pending again.
        while not self._pending:
            if self._closed:
                return
            self._cond.wait()
        want, deadline = 0, 0.0
        if self.max_wait:
            want, deadline = self.max_batch_size, time.monotonic() + self.max_wait
        elif self.return_wait and time.monotonic() - self._finished_at < self._last_compute_s:
            # Clients just answered are on their way back: without this wait, clients that each await their
            # answer split into two alternating half-size batches (BatchingConfig.return_wait). They come
            # back within moments or not at all, hence nothing is expected after a quiet spell.
            want = min(self._expect, self.max_batch_size)
            deadline = time.monotonic() + self.return_wait * self._last_compute_s
        self._expect = 0
        while self._pending < want and not self._closed:
            left = deadline - time.monotonic()
            if left <= 0 or not self._cond.wait(left):
                break

    def _choose(self) -> list[tuple[_Request, int]]:
        """The next batch (under the lock): for a backend that pads, inputs of similar lengths around one
        anchor input.

        The anchor is the next input of the request served longest ago, so requests take turns and a huge
        request cannot hold small ones back. Candidates are drawn round-robin across queued requests; the
        batch is the run of up to max_batch_size consecutive lengths that holds the anchor and starts as
        short as possible: less padding, and nothing waits forever.
        """
        window = self.max_batch_size * _CANDIDATES
        first = min(self._queue, key=lambda r: r.served)
        anchor = (first, first.waiting[0])
        candidates: list[tuple[_Request, int]] = [anchor]
        depth = 0
        while len(candidates) < window:
            added = False
            for req in self._queue:
                if depth < len(req.waiting):
                    added = True
                    if depth or req is not first:
                        candidates.append((req, req.waiting[depth]))
                    if len(candidates) >= window:
                        break
            if not added:
                break
            depth += 1
        if not self.pads_to_longest:
            # Lengths cost nothing extra together (packed rows, or one sequence at a time): take inputs in
            # turn order, within the token budget.
            batch = candidates[: self.max_batch_size]
            total = sum(req.tokens[i] for req, i in batch)
            while len(batch) > 1 and total > self.max_batch_tokens:
                req, i = batch.pop()
                total -= req.tokens[i]
            return batch
        candidates.sort(key=lambda ri: ri[0].tokens[ri[1]])
        at = next(k for k, c in enumerate(candidates) if c is anchor)
        start = max(0, at - self.max_batch_size + 1)
        batch = candidates[start : start + self.max_batch_size]
        # Budget is the padded size of the batch, what the runtime actually allocates.
        while len(batch) > 1 and len(batch) * batch[-1][0].tokens[batch[-1][1]] > self.max_batch_tokens:
            batch.pop(-1 if batch[-1] is not anchor else 0)
        return batch

    def _run(self) -> None:
        while True:
            try:
                batch = self._take()
            except Exception:  # a bug here must not end the worker: every later request would hang
                log.exception("batcher for model %r: cannot take a batch", self.model)
                time.sleep(0.01)
                continue
            if batch is None:
                return
            try:
                self._compute(batch)
            except BaseException:  # the worker must outlive any batch, whatever happens in it
                log.exception("batcher for model %r: unexpected error", self.model)
                self._fail(batch, BatchFailed(f"model {self.model!r} failed on a batch"))

    def _fail(self, batch: list[tuple[_Request, int]], err: Exception) -> None:
        with self._cond:
            reqs = {id(r): r for r, _ in batch if not r.done}.values()
            for req in reqs:
                req.done = True
                self._drop(req)
        for req in reqs:
            _notify(req, None, err)

    def _compute(self, batch: list[tuple[_Request, int]]) -> None:
        # Length-sorted batches pad less; results go back by each input's own index.
        batch.sort(key=lambda ri: ri[0].tokens[ri[1]])
        started = time.perf_counter()
        try:
            texts = [req.texts[i] for req, i in batch]
            ids = [req.token_ids[i] for req, i in batch]
            if self.pads_to_longest and len(batch) > 1:
                lengths = [req.tokens[i] for req, i in batch]
                ends = split_by_padding(lengths, self.call_overhead_tokens)
                vectors = np.concatenate(
                    [self._call(texts[a:b], ids[a:b]) for a, b in zip([0, *ends], ends, strict=False)]
                )
            else:
                vectors = self._call(texts, ids)
        except Exception as exc:
            groups: dict[int, list[tuple[_Request, int]]] = {}
            for req, i in batch:
                groups.setdefault(id(req), []).append((req, i))
            if len(groups) > 1:
                # Several requests shared the failed batch: run each request's inputs on their own, so only
                # the request that holds the bad input fails.
                log.warning(
                    "batch of %d inputs failed on model %r (%s); retrying per request", len(batch), self.model, exc
                )
                for group in groups.values():
                    self._compute(group)
                return
            log.error("batch of %d inputs failed on model %r", len(batch), self.model, exc_info=exc)
            self._fail(batch, BatchFailed(f"model {self.model!r} failed on a batch: {type(exc).__name__}"))
            return
        elapsed = time.perf_counter() - started
        finished: list[_Request] = []
        with self._cond:
            for (req, i), vec in zip(batch, vectors, strict=True):
                if req.done:
                    continue
                req.vectors[i] = vec
                req.remaining -= 1
                if req.remaining == 0:
                    req.done = True
                    finished.append(req)
            self._expect = self._pending + len(finished)
            self._last_compute_s = elapsed
            self._finished_at = time.monotonic()
        _notify_done(finished)
        if self._on_batch is not None:
            try:
                self._on_batch(self.model, len(batch), sum(req.tokens[i] for req, i in batch), elapsed)
            except Exception:
                log.exception("batch metrics callback failed")

    def _call(self, texts: list[str], token_ids: list[Sequence[int]]) -> np.ndarray:
        vectors = self.backend.embed(texts, token_ids)
        shape = getattr(vectors, "shape", None)
        if shape != (len(texts), self.dimension):
            raise RuntimeError(f"backend returned shape {shape} for {len(texts)} inputs of width {self.dimension}")
        if not np.isfinite(vectors).all():
            raise RuntimeError("backend returned NaN or infinite values")
        return vectors

    def close(self, timeout: float | None = 30.0) -> None:
        """Finish what is queued, then stop the workers."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout)
