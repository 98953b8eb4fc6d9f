"""A key's per-minute limit as a sliding window of one-second slots, kept in this process (the Redis-shared
window in redis_state.py keeps the same arithmetic on Redis' clock)."""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable

# A limit counts what was admitted in one-second slots: at time t, the slots of seconds floor(t) - 60 ..
# floor(t). The slot partly out of the last 60 s still counts in full, which is what keeps any 60 s span at or
# under the limit; the price is that quota comes back up to a second later than an exact log would give it.
WINDOW_S = 60
# A slot stops counting this long after its second began.
SLOT_LIFE_S = WINDOW_S + 1


class SlidingWindow:
    """At most `limit` units admitted in any 60 seconds, counted in one-second slots (61 at most); thread-safe.

    Written by hand: Litestar's rate-limit middleware counts requests per client before auth, and cannot
    weigh a request by the tokens it carries, which is what an embeddings quota is about.
    """

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        """`clock`: seconds, never going back (tests pass their own)."""
        self.limit = per_minute
        self.clock = clock
        self._slots: deque[list[float]] = deque()  # [second, amount admitted in it], oldest first
        self._lock = threading.Lock()

    def _used(self, now: float) -> float:
        first = math.floor(now) - WINDOW_S
        while self._slots and self._slots[0][0] < first:
            self._slots.popleft()
        return sum(amount for _, amount in self._slots)

    def _wait(self, used: float, amount: float, now: float) -> float:
        # A request bigger than the whole limit is admitted when nothing is in use, or it never would be.
        need = min(amount, self.limit)
        wait = 0.0
        if used + need > self.limit:
            for second, admitted in self._slots:  # the oldest leave first
                used -= admitted
                wait = second + SLOT_LIFE_S - now
                if used + need <= self.limit:
                    break
        return wait

    def _add(self, amount: float, now: float) -> None:
        second = math.floor(now)
        if self._slots and self._slots[-1][0] == second:
            self._slots[-1][1] += amount
        else:
            self._slots.append([second, amount])

    def take(self, amount: float) -> float:
        """Take `amount` now and return 0, or take nothing and return the seconds until it would fit."""
        with self._lock:
            now = self.clock()
            wait = self._wait(self._used(now), amount, now)
            if not wait:
                self._add(amount, now)
            return wait

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` would fit (0: now), taking nothing."""
        with self._lock:
            now = self.clock()
            return self._wait(self._used(now), amount, now)

    def give_back(self, amount: float) -> None:
        """Return units taken for work that was not done, off the newest slots first: the refunded charge is
        among them unless the key was charged again since, whose units then leave early by that delay. A negative
        amount takes more, unconditionally: work that turned out bigger than charged was done all the same."""
        with self._lock:
            now = self.clock()
            self._used(now)
            if amount < 0:
                self._add(-amount, now)
                return
            while amount > 0 and self._slots:
                slot = self._slots[-1]
                returned = min(amount, slot[1])
                slot[1] -= returned
                amount -= returned
                if slot[1] <= 0:
                    self._slots.pop()

    def in_use(self) -> float:
        """Units admitted in the window now."""
        with self._lock:
            return self._used(self.clock())

    def fill(self, used: float, at: float | None = None) -> None:
        """Replace the window by `used` units admitted at time `at` (default: now), e.g. the shared window's use
        as last seen; they leave the window as if admitted then."""
        with self._lock:
            self._slots.clear()
            if used > 0:
                self._add(used, self.clock() if at is None else at)
