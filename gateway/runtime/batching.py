"""Per-model dynamic batcher: merges inputs from concurrent requests into backend batches.

Written by hand: no maintained library batches across asyncio requests into a synchronous runtime with a
token budget (Infinity and TEI each carry their own). Worker threads own the backend; the event loop only
enqueues and awaits futures.

Batches are filled by turns: the keys that have inputs queued take turns, one input each, so a key sending
many requests gets no more of a batch than a key sending one; within a key the oldest request goes first,
but takes at most half a batch, so a request with thousands of inputs shares every batch with the small
requests behind it.

Admission is by predicted wait: the batcher measures how fast the model drains its queue (tokens per second
of wall time while it has work), and a request is admitted only if its key's share of the queued work and
its own are predicted to finish within the caller's limit. Otherwise it is refused at once with the
time after which it would fit, rather than left to wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gateway.base.circuit import CircuitBreaker
from gateway.plugin import Backend, BackendFailure, Embedded, InputRejected, ModelInfo

log = logging.getLogger("gateway.batching")


class QueueFull(Exception):
    """The model cannot take this request now: `reason` is "wait" (predicted wait over the limit) or "queue"
    (the queue's bound on inputs); `retry_after` is in whole seconds."""

    def __init__(self, message: str, retry_after: float, reason: str) -> None:
        super().__init__(message)
        self.retry_after = max(1, math.ceil(retry_after))
        self.reason = reason


@dataclass(slots=True)
class Progress:
    """How far the batcher got with one request: tokens of its inputs that batches have taken (computed or
    computing). Written under the batcher's lock; read by the caller once the request ends."""

    taken_tokens: int = 0
    #: For a backend that does not count tokens up front: the tokens it reported for this request's inputs
    #: (its share of each batch's count).
    counted_tokens: int = 0


@dataclass(slots=True)
class _Owner:
    """One key's share of the queue, and when a batch last took from it (keys take turns)."""

    inputs: int = 0
    tokens: int = 0
    served: float = 0.0


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
    # When the request arrived (within a key, older requests go first), and when a batch last took inputs
    # from it: for a backend that pads, the request served longest ago anchors the next batch.
    arrived: float = field(default_factory=time.monotonic)
    served: float = 0.0
    owner: str | None = None
    progress: Progress | None = None
    # Background work (int8/uint8 calibration): outside the queue's accounting, computed only when no client
    # input waits.
    background: bool = False


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
# Weight of the newest batch in the drain-rate estimate (an exponential moving average).
_RATE_WEIGHT = 0.2


def _in_turn(reqs: list[_Request], share: int) -> Iterator[tuple[_Request, int]]:
    """The waiting inputs of `reqs` (oldest request first), at most `share` of each before the next request's
    turn, then round again."""
    depth = 0
    while True:
        found = False
        for req in reqs:
            part = req.waiting[depth : depth + share]
            if part:
                found = True
                for i in part:
                    yield req, i
        if not found:
            return
        depth += share


def _share(batch: list[tuple[_Request, int]], counted: int) -> None:
    """Under the lock: the `counted` tokens of a batch, given to its requests' progress in proportion to
    their estimated tokens in it, in whole tokens that add up to `counted` (largest remainder)."""
    weights: dict[int, list[Any]] = {}
    for req, i in batch:
        entry = weights.setdefault(id(req), [req, 0])
        entry[1] += req.tokens[i]
    total = sum(w for _, w in weights.values()) or 1
    quotas = [(req, counted * w / total) for req, w in weights.values()]
    whole = [(req, math.floor(q), q - math.floor(q)) for req, q in quotas]
    left = counted - sum(n for _, n, _ in whole)
    for k, (req, n, _) in enumerate(sorted(whole, key=lambda x: -x[2])):
        if req.progress is not None:
            req.progress.counted_tokens += n + (1 if k < left else 0)


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
        circuit: CircuitBreaker | None = None,
    ) -> None:
        """`info`: what the loaded backend declared; batch limits left None take its defaults; `circuit`
        learns the outcome of every batch."""
        self.backend = backend
        self.circuit = circuit
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
        self._pending_tokens = 0
        self._owners: dict[str | None, _Owner] = {}
        # Background requests, oldest first: they take no queue room, add nothing to the predicted wait, and
        # a worker takes from them only when no client input is queued.
        self._idle: deque[_Request] = deque()
        # Tokens per second the model drains while it has work, all workers together; None until measured.
        self._rate: float | None = None
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

    @property
    def drain_rate(self) -> float | None:
        """Tokens per second the model drains while it has work (None until a batch has been measured)."""
        return self._rate

    def predicted_wait(self) -> float:
        """Seconds until the work queued now is done, at the measured drain rate (0 before any measurement)."""
        return self._pending_tokens / self._rate if self._rate else 0.0

    async def embed(
        self,
        texts: Sequence[str],
        token_ids: Sequence[Sequence[int]],
        *,
        owner: str | None = None,
        max_wait_s: float | None = None,
        progress: Progress | None = None,
        sizes: Sequence[int] | None = None,
        background: bool = False,
    ) -> np.ndarray:
        """Vectors for `texts` (float32 [n, dim], input order); `token_ids` are the backend's ids for each
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
        loop = asyncio.get_running_loop()
        tokens = list(sizes) if sizes is not None else list(map(len, token_ids))
        req = _Request(
            loop=loop,
            future=loop.create_future(),
            texts=texts,
            tokens=tokens,
            token_ids=token_ids,
            vectors=np.empty((len(texts), self.dimension), dtype=np.float32),
            waiting=list(range(len(texts))),
            remaining=len(texts),
            owner=owner,
            progress=progress,
            background=background,
        )
        own = sum(tokens)
        with self._cond:
            if self._closed:
                raise RuntimeError(f"model {self.model!r} is shutting down")
            if background:
                self._idle.append(req)
            else:
                self._admit(owner, len(texts), own, max_wait_s)
                self._queue.append(req)
                self._pending += len(texts)
                self._pending_tokens += own
                mine = self._owners.setdefault(owner, _Owner(served=req.arrived))
                mine.inputs += len(texts)
                mine.tokens += own
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

    def precheck(self, owner: str | None = None, max_wait_s: float | None = None) -> None:
        """QueueFull now if a request from `owner` would be refused whatever its size: called before the
        request is tokenized, so that refusing a flood costs little."""
        with self._cond:
            self._admit(owner, 0, 0, max_wait_s)

    def _admit(self, owner: str | None, inputs: int, own: int, max_wait_s: float | None) -> None:
        """Under the lock: raise QueueFull unless a request of `inputs` inputs and `own` tokens from `owner`
        may join the queue now."""
        mine = self._owners.get(owner)
        queued_mine = mine.inputs if mine is not None else 0
        # The bound on memory: a key with inputs queued stops at max_queue; a key with none may still add one
        # request (up to twice the bound in all), so that one key's flood cannot lock every other key out.
        if self._pending + inputs > (self.max_queue if queued_mine else 2 * self.max_queue):
            excess = self._pending + inputs - self.max_queue
            retry = excess * (self._pending_tokens / max(1, self._pending)) / self._rate if self._rate else 1.0
            raise QueueFull(
                f"model {self.model!r} is overloaded: {self._pending} inputs queued (limit {self.max_queue}); "
                "retry shortly",
                retry,
                "queue",
            )
        if max_wait_s is None or not self._rate:
            return
        # Keys take turns, so this request finishes after its key's queued work, its own, and from every
        # other key as much as that (or all that key has queued, if less).
        mine_tokens = mine.tokens if mine is not None else 0
        turn = mine_tokens + own
        others = sum(min(o.tokens, turn) for key, o in self._owners.items() if key != owner)
        finish = (turn + others) / self._rate
        if finish <= max_wait_s:
            return
        if not mine_tokens and own > max_wait_s * self._rate:
            # Too large to finish in time even alone: admitted when its key has nothing queued and its first
            # batch would start in time (it then shares every batch with the requests behind it).
            first = sum(min(o.tokens, self.max_batch_tokens) for key, o in self._owners.items() if key != owner)
            if first / self._rate <= max_wait_s:
                return
            finish = first / self._rate
        raise QueueFull(
            f"model {self.model!r} is overloaded: this request would finish in about {finish:.1f}s, over the "
            f"limit of {max_wait_s:.1f}s; retry in {max(1, math.ceil(finish - max_wait_s))}s",
            finish - max_wait_s,
            "wait",
        )

    def _forget(self, req: _Request, inputs: list[int]) -> None:
        # Under the lock: `inputs` of `req` leave the queue (taken by a batch, or dropped).
        tokens = sum(req.tokens[i] for i in inputs)
        self._pending -= len(inputs)
        self._pending_tokens -= tokens
        owner = self._owners.get(req.owner)
        if owner is not None:
            owner.inputs -= len(inputs)
            owner.tokens -= tokens

    def _drop(self, req: _Request) -> None:
        # Under the lock: forget the inputs of `req` that no batch has taken yet.
        if req.background:
            req.waiting = []
            if req in self._idle:
                self._idle.remove(req)
            return
        self._forget(req, req.waiting)
        req.waiting = []
        if req in self._queue:
            self._queue.remove(req)

    def _take(self) -> list[tuple[_Request, int]] | None:
        with self._cond:
            self._wait_for_inputs()
            while not self._pending:
                if self._idle:
                    return self._take_background()
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
                mine = taken[id(req)]
                req.served = now
                req.waiting = [i for i in req.waiting if i not in mine]
                self._forget(req, list(mine))
                if req.progress is not None:
                    req.progress.taken_tokens += sum(req.tokens[i] for i in mine)
                owner = self._owners.get(req.owner)
                if owner is not None:
                    owner.served = now
                if not req.waiting:
                    self._queue.remove(req)
            if self._pending:
                self._cond.notify()
            return batch

    def _take_background(self) -> list[tuple[_Request, int]]:
        """Under the lock, with no client input queued: the next batch of the oldest background request."""
        req = self._idle[0]
        part: list[int] = []
        longest = total = 0
        for i in req.waiting:
            n = req.tokens[i]
            size = (len(part) + 1) * max(longest, n) if self.pads_to_longest else total + n
            if part and (len(part) >= self.max_batch_size or size > self.max_batch_tokens):
                break
            part.append(i)
            longest, total = max(longest, n), total + n
        req.waiting = req.waiting[len(part) :]
        req.served = time.monotonic()
        if req.progress is not None:
            req.progress.taken_tokens += total
        if not req.waiting:
            self._idle.popleft()
        if self._idle:
            self._cond.notify()
        return [(req, i) for i in part]

    def _wait_for_inputs(self) -> None:
        # Under the lock: until something is queued, then, if configured, a little longer for more. Queued
        # inputs can disappear meanwhile (cancelled requests): the caller checks _pending again.
        while not self._pending:
            if self._closed or self._idle:
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

        Keys take turns: candidates are drawn one at a time from each key with inputs queued, the key served
        longest ago first, so a key with many requests gets no more of a batch than a key with one. Within a
        key, the oldest request goes first but takes at most half a batch before the next request's turn: a
        huge request cannot hold small ones back, and requests finish about in the order they came, which is
        what admission predicts. For a backend that pads, the batch is the run of up to max_batch_size
        consecutive lengths that holds an anchor input and starts as short as possible (less padding); the
        anchor is the next input of the first key's request served longest ago, so nothing waits forever.
        """
        window = self.max_batch_size * _CANDIDATES
        share = max(1, self.max_batch_size // 2)
        by_owner: dict[str | None, list[_Request]] = {}
        for req in self._queue:  # in arrival order
            by_owner.setdefault(req.owner, []).append(req)
        turns = sorted(by_owner.values(), key=lambda reqs: self._owners[reqs[0].owner].served)
        streams = [_in_turn(reqs, share) for reqs in turns]
        # For a backend that pads, the anchor leads; otherwise the turns alone order the batch.
        first = min(turns[0], key=lambda r: r.served) if self.pads_to_longest else None
        candidates: list[tuple[_Request, int]] = [] if first is None else [(first, first.waiting[0])]
        while streams and len(candidates) < window:
            for stream in list(streams):
                item = next(stream, None)
                if item is None:
                    streams.remove(stream)
                    continue
                if first is None or item != candidates[0]:
                    candidates.append(item)
                if len(candidates) >= window:
                    break
        anchor = candidates[0]
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
        # When this worker's last batch ended, if work was waiting then: the time from there to the end of
        # the next batch is drain time (turnaround included), the basis of the rate estimate.
        busy_since: float | None = None
        while True:
            try:
                batch = self._take()
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
                    sample = tokens / max(ended - (busy_since or started), 1e-6) * len(self._threads)
                    rate = self._rate
                    self._rate = sample if rate is None else rate + _RATE_WEIGHT * (sample - rate)
                busy_since = ended if self._pending else None

    def _fail(self, batch: list[tuple[_Request, int]], err: Exception) -> None:
        with self._cond:
            reqs = {id(r): r for r, _ in batch if not r.done}.values()
            for req in reqs:
                req.done = True
                self._drop(req)
        for req in reqs:
            _notify(req, None, err)

    def _compute(self, batch: list[tuple[_Request, int]]) -> int:
        """Run `batch` and hand its vectors back; the tokens it computed (0 when it failed)."""
        # Length-sorted batches pad less; results go back by each input's own index.
        batch.sort(key=lambda ri: ri[0].tokens[ri[1]])
        started = time.perf_counter()
        try:
            texts = [req.texts[i] for req, i in batch]
            ids = [req.token_ids[i] for req, i in batch]
            if self.pads_to_longest and len(batch) > 1:
                lengths = [req.tokens[i] for req, i in batch]
                ends = split_by_padding(lengths, self.call_overhead_tokens)
                parts = [self._call(texts[a:b], ids[a:b]) for a, b in zip([0, *ends], ends, strict=False)]
                vectors = np.concatenate([v for v, _ in parts])
                counts = [c for _, c in parts]
                counted = None if None in counts else sum(c for c in counts if c is not None)
            else:
                vectors, counted = self._call(texts, ids)
        except Exception as exc:
            groups: dict[int, list[tuple[_Request, int]]] = {}
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
                log.warning(
                    "batch of %d inputs failed on model %r (%s); retrying per request", len(batch), self.model, exc
                )
                return sum(self._compute(group) for group in groups.values())
            if typed:
                # The backend logged the details; this is what its clients are told.
                log.warning("batch of %d inputs failed on model %r: %s", len(batch), self.model, exc)
                self._fail(batch, exc)
                return 0
            log.error("batch of %d inputs failed on model %r", len(batch), self.model, exc_info=exc)
            self._fail(batch, BatchFailed(f"model {self.model!r} failed on a batch: {type(exc).__name__}"))
            return 0
        if self.circuit is not None:
            self.circuit.success()
        elapsed = time.perf_counter() - started
        finished: list[_Request] = []
        with self._cond:
            if counted is not None:
                _share(batch, counted)
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
        tokens = sum(req.tokens[i] for req, i in batch)
        if self._on_batch is not None:
            try:
                self._on_batch(self.model, len(batch), tokens, elapsed)
            except Exception:
                log.exception("batch metrics callback failed")
        return tokens

    def _call(self, texts: list[str], token_ids: list[Sequence[int]]) -> tuple[np.ndarray, int | None]:
        # The vectors, and the tokens the backend counted when it reports them (Embedded).
        out = self.backend.embed(texts, token_ids)
        counted = None
        if isinstance(out, Embedded):
            vectors, counted = out.vectors, out.tokens
        else:
            vectors = out
        shape = getattr(vectors, "shape", None)
        if shape != (len(texts), self.dimension):
            raise RuntimeError(f"backend returned shape {shape} for {len(texts)} inputs of width {self.dimension}")
        if not np.isfinite(vectors).all():
            raise RuntimeError("backend returned NaN or infinite values")
        return vectors, counted

    def close(self, timeout: float | None = 30.0) -> None:
        """Finish what is queued, then stop the workers."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout)
