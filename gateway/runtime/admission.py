"""Admission by predicted wait (its own module: whether a request may join the queue is a job apart from
queueing and computing it).

The batcher measures how fast the model drains its queue (tokens per second of wall time while it has work),
and a request is admitted only if its key's share of the queued work and its own are predicted to finish
within the caller's limit. Otherwise it is refused at once with the time after which it would fit, rather
than left to wait.
"""

from __future__ import annotations

import math

from gateway.runtime.batch_queue import BatchQueue

# Weight of the newest batch in the drain-rate estimate (an exponential moving average).
_RATE_WEIGHT = 0.2


class QueueFull(Exception):
    """The model cannot take this request now: `reason` is "wait" (predicted wait over the limit) or "queue"
    (the queue's bound on inputs); `retry_after` is in whole seconds."""

    def __init__(self, message: str, retry_after: float, reason: str) -> None:
        super().__init__(message)
        self.retry_after = max(1, math.ceil(retry_after))
        self.reason = reason


class Admission:
    """Whether a request may join one model's queue now: the queue's bound on inputs, and the predicted wait
    at the measured drain rate. Reads and writes under the queue's lock."""

    def __init__(self, queue: BatchQueue, *, model: str, max_queue: int, max_batch_tokens: int) -> None:
        self.queue = queue
        self.model = model
        self.max_queue = max_queue
        self.max_batch_tokens = max_batch_tokens
        # Tokens per second the model drains while it has work, all workers together; None until measured.
        self.rate: float | None = None

    def measure(self, tokens: int, seconds: float, workers: int) -> None:
        """Under the lock: `tokens` drained in `seconds` of busy wall time by one of `workers` workers."""
        sample = tokens / max(seconds, 1e-6) * workers
        rate = self.rate
        self.rate = sample if rate is None else rate + _RATE_WEIGHT * (sample - rate)
        # What one batch computes at: what cuts a background batch by time.
        self.queue.batch_rate = self.rate / workers

    def predicted_wait(self) -> float:
        """Seconds until the work queued now is done, at the measured drain rate (0 before any measurement)."""
        return self.queue.pending_tokens / self.rate if self.rate else 0.0

    def check(self, owner: str | None, inputs: int, own: int, max_wait_s: float | None) -> None:
        """Under the lock: raise QueueFull unless a request of `inputs` inputs and `own` tokens from `owner`
        may join the queue now."""
        q = self.queue
        mine = q.owners.get(owner)
        queued_mine = mine.inputs if mine is not None else 0
        # The bound on memory: a key with inputs queued stops at max_queue; a key with none may still add one
        # request (up to twice the bound in all), so that one key's flood cannot lock every other key out.
        if q.pending + inputs > (self.max_queue if queued_mine else 2 * self.max_queue):
            excess = q.pending + inputs - self.max_queue
            retry = excess * (q.pending_tokens / max(1, q.pending)) / self.rate if self.rate else 1.0
            raise QueueFull(
                f"model {self.model!r} is overloaded: {q.pending} inputs queued (limit {self.max_queue}); "
                "retry shortly",
                retry,
                "queue",
            )
        if max_wait_s is None or not self.rate:
            return
        self._check_wait(owner, mine.tokens if mine is not None else 0, own, max_wait_s, self.rate)

    def _check_wait(self, owner: str | None, mine_tokens: int, own: int, max_wait_s: float, rate: float) -> None:
        """Under the lock: raise QueueFull unless `own` tokens from `owner`, behind its `mine_tokens` queued,
        are predicted to finish within `max_wait_s` at `rate`."""
        owners = self.queue.owners
        # Keys take turns, so this request finishes after its key's queued work, its own, and from every
        # other key as much as that (or all that key has queued, if less).
        turn = mine_tokens + own
        others = sum(min(o.tokens, turn) for key, o in owners.items() if key != owner)
        finish = (turn + others) / rate
        if finish <= max_wait_s:
            return
        if not mine_tokens and own > max_wait_s * rate:
            # Too large to finish in time even alone: admitted when its key has nothing queued and its first
            # batch would start in time (it then shares every batch with the requests behind it).
            first = sum(min(o.tokens, self.max_batch_tokens) for key, o in owners.items() if key != owner)
            if first / rate <= max_wait_s:
                return
            finish = first / rate
        raise QueueFull(
            f"model {self.model!r} is overloaded: this request would finish in about {finish:.1f}s, over the "
            f"limit of {max_wait_s:.1f}s; retry in {max(1, math.ceil(finish - max_wait_s))}s",
            finish - max_wait_s,
            "wait",
        )
