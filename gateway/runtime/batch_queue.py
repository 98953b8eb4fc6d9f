"""The batcher's queue and how a batch is chosen from it: keys take turns, the token budget, background work
last, and where to cut a batch for a backend that pads (its own module: choosing a batch is a job apart from
computing one).

Batches are filled by turns: the keys that have inputs queued take turns, one input each, so a key sending
many requests gets no more of a batch than a key sending one; within a key the oldest request goes first,
but takes at most half a batch, so a request with thousands of inputs shares every batch with the small
requests behind it.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# How many candidates (times max_batch_size) a batch is chosen from.
_CANDIDATES = 4


@dataclass(slots=True)
class Progress:
    """How far the batcher got with one request: tokens of its inputs that batches have taken (computed or
    computing). Written under the batcher's lock; read by the caller once the request ends."""

    taken_tokens: int = 0
    #: For a backend that does not count tokens up front: the tokens it reported for this request's inputs
    #: (its share of each batch's count).
    counted_tokens: int = 0


@dataclass(slots=True)
class KeyShare:
    """One key's share of the queue, and when a batch last took from it (keys take turns)."""

    inputs: int = 0
    tokens: int = 0
    served: float = 0.0


@dataclass(eq=False, slots=True)
class Request:
    """One call to the batcher: its inputs, where their vectors go, and how far batches got with them."""

    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[np.ndarray]
    texts: Sequence[str] | Sequence[tuple[str, str]]
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

    @classmethod
    def new(
        cls,
        texts: Sequence[str] | Sequence[tuple[str, str]],
        token_ids: Sequence[Sequence[int]],
        tokens: list[int],
        dimension: int,
        *,
        owner: str | None,
        progress: Progress | None,
        background: bool,
    ) -> Request:
        """A request for `texts` on the running event loop, all its inputs waiting for vectors of `dimension`."""
        loop = asyncio.get_running_loop()
        return cls(
            loop=loop,
            future=loop.create_future(),
            texts=texts,
            tokens=tokens,
            token_ids=token_ids,
            vectors=np.empty((len(texts), dimension), dtype=np.float32),
            waiting=list(range(len(texts))),
            remaining=len(texts),
            owner=owner,
            progress=progress,
            background=background,
        )


#: One input of a batch: its request and its index there.
Item = tuple[Request, int]


def _in_turn(reqs: list[Request], share: int) -> Iterator[Item]:
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


def _share_counted(batch: list[Item], counted: int) -> None:
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


class BatchQueue:
    """The requests waiting for one model, what is queued per key, and the choice of each next batch.

    `lock` guards all of it (and the requests' fields); methods documented "under the lock" expect the
    caller to hold it, the others take it themselves.
    """

    def __init__(
        self,
        *,
        max_batch_size: int,
        max_batch_tokens: int,
        pads_to_longest: bool,
        max_wait: float,
        return_wait: float,
        background_batch: float = 0.0,
        background_grace: float = 0.0,
        background_batch_size: int | None = None,
    ) -> None:
        """`max_wait` (seconds): how long a worker waits for a full batch; `return_wait`: see `_wait_for_inputs`;
        `background_batch` and `background_grace` (seconds): see `_take_background` and `take`;
        `background_batch_size`: the most inputs of a background batch (None: twice max_batch_size)."""
        self.max_batch_size = max_batch_size
        self.background_batch_size = background_batch_size or 2 * max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.pads_to_longest = pads_to_longest
        self.max_wait = max_wait
        self.return_wait = return_wait
        self.background_batch = background_batch
        self.background_grace = background_grace
        # Tokens per second one batch computes at (the measured drain rate over the workers; None until
        # measured): what sizes a background batch by time.
        self.batch_rate: float | None = None
        # When a client input last arrived or a batch holding one ended: background work waits
        # `background_grace` after it.
        self._client_at = 0.0
        self.lock = threading.Condition()
        self.closed = False
        self.requests: deque[Request] = deque()
        self.pending = 0  # inputs queued, not yet taken by a worker
        self.pending_tokens = 0
        self.owners: dict[str | None, KeyShare] = {}
        # Background requests, oldest first: they take no queue room, add nothing to the predicted wait, and
        # a worker takes from them only when no client input is queued.
        self.background: deque[Request] = deque()
        # Inputs expected right after the last batch (those queued then, plus one per request it answered:
        # a client that got its answer tends to send again), and how long that batch computed (see
        # _wait_for_inputs).
        self._expect = 0
        self._last_compute_s = 0.0
        self._finished_at = 0.0

    def put(self, req: Request) -> None:
        """Under the lock: queue `req` (a client's, counted against its key; or background work) and wake a
        worker."""
        if req.background:
            self.background.append(req)
        else:
            own = sum(req.tokens)
            self.requests.append(req)
            self.pending += len(req.texts)
            self.pending_tokens += own
            mine = self.owners.setdefault(req.owner, KeyShare(served=req.arrived))
            mine.inputs += len(req.texts)
            mine.tokens += own
            self._client_at = time.monotonic()
        self.lock.notify()

    def drop(self, req: Request) -> None:
        """Under the lock: forget the inputs of `req` that no batch has taken yet."""
        if req.background:
            req.waiting = []
            if req in self.background:
                self.background.remove(req)
            return
        self._forget(req, req.waiting)
        req.waiting = []
        if req in self.requests:
            self.requests.remove(req)

    def complete(self, batch: list[Item], vectors: np.ndarray, counted: int | None, elapsed: float) -> list[Request]:
        """Each input's vector of a batch computed in `elapsed` seconds to its request (and the tokens the
        backend `counted`, when it did, to their progress); the requests it completed, for the caller to wake."""
        finished: list[Request] = []
        with self.lock:
            if counted is not None:
                _share_counted(batch, counted)
            for (req, i), vec in zip(batch, vectors, strict=True):
                if req.done:
                    continue
                req.vectors[i] = vec
                req.remaining -= 1
                if req.remaining == 0:
                    req.done = True
                    finished.append(req)
            self._expect = self.pending + len(finished)
            self._last_compute_s = elapsed
            self._finished_at = time.monotonic()
            if any(not req.background for req, _ in batch):
                self._client_at = self._finished_at
        return finished

    def close(self) -> None:
        """Let the workers finish what is queued, then `take` answers None."""
        with self.lock:
            self.closed = True
            self.lock.notify_all()

    def _forget(self, req: Request, inputs: list[int]) -> None:
        # Under the lock: `inputs` of `req` leave the queue (taken by a batch, or dropped).
        tokens = sum(req.tokens[i] for i in inputs)
        self.pending -= len(inputs)
        self.pending_tokens -= tokens
        owner = self.owners.get(req.owner)
        if owner is not None:
            owner.inputs -= len(inputs)
            owner.tokens -= tokens

    def take(self) -> list[Item] | None:
        """The next batch, once there is one (blocks the worker thread); None once closed and empty."""
        with self.lock:
            self._wait_for_inputs()
            while not self.pending:
                if self.background:
                    # A client that just got its answer tends to send its next request within moments: a
                    # background batch started meanwhile would hold that request for the batch's whole time.
                    left = self._client_at + self.background_grace - time.monotonic()
                    if left <= 0:
                        return _take_background(self)
                    self.lock.wait(left)
                    continue
                # Everything queued was cancelled while this worker waited for more: start over.
                if self.closed:
                    return None
                self._wait_for_inputs()
            batch = self._choose()
            taken: dict[int, set[int]] = {}
            for req, i in batch:
                taken.setdefault(id(req), set()).add(i)
            now = time.monotonic()
            for req in [r for r in self.requests if id(r) in taken]:
                mine = taken[id(req)]
                req.served = now
                req.waiting = [i for i in req.waiting if i not in mine]
                self._forget(req, list(mine))
                if req.progress is not None:
                    req.progress.taken_tokens += sum(req.tokens[i] for i in mine)
                owner = self.owners.get(req.owner)
                if owner is not None:
                    owner.served = now
                if not req.waiting:
                    self.requests.remove(req)
            if self.pending:
                self.lock.notify()
            return batch

    def _wait_for_inputs(self) -> None:
        # Under the lock: until something is queued, then, if configured, a little longer for more. Queued
        # inputs can disappear meanwhile (cancelled requests): the caller checks pending again.
        while not self.pending:
            if self.closed or self.background:
                return
            self.lock.wait()
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
        while self.pending < want and not self.closed:
            left = deadline - time.monotonic()
            if left <= 0 or not self.lock.wait(left):
                break

    def _choose(self) -> list[Item]:
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
        return self._pick(self._candidates())

    def _pick(self, candidates: list[Item], budget: int | None = None, size: int | None = None) -> list[Item]:
        """The batch out of `candidates` (the anchor first; see `_choose`): at most `size` inputs (None:
        max_batch_size) within `budget` tokens (None: max_batch_tokens)."""
        budget = self.max_batch_tokens if budget is None else budget
        size = self.max_batch_size if size is None else size
        anchor = candidates[0]
        if not self.pads_to_longest:
            # Lengths cost nothing extra together (packed rows, or one sequence at a time): take inputs in
            # turn order, within the token budget.
            batch = candidates[:size]
            total = sum(req.tokens[i] for req, i in batch)
            while len(batch) > 1 and total > budget:
                req, i = batch.pop()
                total -= req.tokens[i]
            return batch
        candidates.sort(key=lambda ri: ri[0].tokens[ri[1]])
        at = next(k for k, c in enumerate(candidates) if c is anchor)
        start = max(0, at - size + 1)
        batch = candidates[start : start + size]
        # Budget is the padded size of the batch, what the runtime actually allocates.
        while len(batch) > 1 and len(batch) * batch[-1][0].tokens[batch[-1][1]] > budget:
            batch.pop(-1 if batch[-1] is not anchor else 0)
        return batch

    def _candidates(self) -> list[Item]:
        """Under the lock: up to _CANDIDATES batches' worth of queued inputs, keys in turn (see `_choose`);
        for a backend that pads, the anchor first."""
        window = self.max_batch_size * _CANDIDATES
        share = max(1, self.max_batch_size // 2)
        by_owner: dict[str | None, list[Request]] = {}
        for req in self.requests:  # in arrival order
            by_owner.setdefault(req.owner, []).append(req)
        turns = sorted(by_owner.values(), key=lambda reqs: self.owners[reqs[0].owner].served)
        streams = [_in_turn(reqs, share) for reqs in turns]
        # For a backend that pads, the anchor leads; otherwise the turns alone order the batch.
        first = min(turns[0], key=lambda r: r.served) if self.pads_to_longest else None
        candidates: list[Item] = [] if first is None else [(first, first.waiting[0])]
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
        return candidates


def _take_background(queue: BatchQueue) -> list[Item]:
    """Under the queue's lock, with no client input queued: the next batch of background inputs, chosen as a client
    batch is (`_pick`) from the oldest requests' inputs, the oldest input its anchor. A Batch API job sends
    each line as a request of its own: they merge here into full, length-sorted batches. With
    `background_batch` set and the drain rate measured, the batch holds at most about that long's tokens, so
    that a client input arriving while it computes waits at most about that long. A background batch holds up
    to `background_batch_size` inputs: no client waits on its latency, and bigger batches compute more texts
    per second (bench/README.md, "Bulk: embed-file")."""
    budget = queue.max_batch_tokens
    if queue.background_batch and queue.batch_rate:
        budget = min(budget, max(1, int(queue.batch_rate * queue.background_batch)))
    size = queue.background_batch_size
    window = size * (_CANDIDATES if queue.pads_to_longest else 1)
    candidates: list[Item] = []
    for req in queue.background:
        candidates.extend((req, i) for i in req.waiting[: window - len(candidates)])
        if len(candidates) >= window:
            break
    batch = queue._pick(candidates, budget, size)
    taken: dict[int, set[int]] = {}
    for req, i in batch:
        taken.setdefault(id(req), set()).add(i)
    now = time.monotonic()
    for req in [r for r in queue.background if id(r) in taken]:
        mine = taken[id(req)]
        req.waiting = [i for i in req.waiting if i not in mine]
        req.served = now
        if req.progress is not None:
            req.progress.taken_tokens += sum(req.tokens[i] for i in mine)
        if not req.waiting:
            queue.background.remove(req)
    if queue.background:
        queue.lock.notify()
    return batch
