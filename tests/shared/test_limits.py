"""Per-key rate limits: the sliding window of one-second slots in this process (on an injected clock, never
sleeping) and in Redis (the Lua script on Redis' clock, a real redis-server), two gateways sharing one key, and
the per-process fallback while Redis is down."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import math
import random
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from gateway.base.config import KeyConfig, RedisConfig
from gateway.shared.keys import KeyStore
from gateway.shared.redis_state import _WINDOW, RedisLink, RedisStore, SharedWindow
from gateway.shared.windows import SLOT_LIFE_S, WINDOW_S, SlidingWindow

from ..conftest import FAKE_TOML, make_app, serve, until, uvicorn_server

URL = "/v1/embeddings"


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _window(limit: int, t: float = 1000.0) -> tuple[SlidingWindow, Clock]:
    clock = Clock(t)
    return SlidingWindow(limit, clock=clock), clock


# -- in this process ------------------------------------------------------------------------------------------


def test_n_are_admitted_then_the_next_waits_until_the_oldest_slot_has_left():
    w, clock = _window(5, 1000.25)
    for i in range(5):
        clock.t = 1000.25 + 2 * i  # seconds 1000, 1002, ..., 1008
        assert w.take(1) == 0
    clock.t = 1010.0
    assert w.take(1) == pytest.approx(1000 + 61 - 1010.0)  # second 1000's slot stops counting at 1061
    assert w.wait_for(1) == pytest.approx(51.0) and w.in_use() == 5
    # Still inside its last second, the slot counts in full: 60.999 s after a request, no quota back yet.
    clock.t = 1060.999
    assert w.take(1) == pytest.approx(0.001)
    clock.t = 1061.0
    assert w.take(1) == 0  # one back, one taken
    assert w.take(1) == pytest.approx(1063 - 1061.0)  # the next back when second 1002's slot leaves


def test_the_wait_is_until_enough_of_the_oldest_slots_have_left():
    w, clock = _window(5)
    for t, amount in ((1000.5, 2), (1030.2, 2), (1059.9, 1)):
        clock.t = t
        assert w.take(amount) == 0
    clock.t = 1060.5
    assert w.take(2) == pytest.approx(1061 - 1060.5)  # second 1000's 2 leave: 3 + 2 fit
    assert w.take(3) == pytest.approx(1091 - 1060.5)  # seconds 1000 and 1030 must leave
    assert w.take(5) == pytest.approx(1120 - 1060.5)  # all of them
    assert w.in_use() == 5  # the refusals took nothing


def test_a_request_bigger_than_the_limit_is_admitted_only_into_an_empty_window():
    w, clock = _window(5, 1000.5)
    assert w.wait_for(12) == 0
    assert w.take(12) == 0 and w.in_use() == 12
    clock.t = 1030.0
    assert w.take(1) == pytest.approx(31.0) and w.take(12) == pytest.approx(31.0)
    clock.t = 1061.0
    assert w.in_use() == 0
    assert w.take(1) == 0
    assert w.take(12) == pytest.approx(61.0)  # not into a window holding 1: once that has left
    clock.t = 1122.0
    assert w.take(12) == 0


def test_give_back_takes_units_off_the_newest_slots_and_never_below_zero():
    w, clock = _window(10)
    for t, amount in ((1000.0, 4), (1020.0, 3), (1040.0, 2)):
        clock.t = t
        w.take(amount)
    w.give_back(4)  # second 1040's 2, then 2 of second 1020's 3
    assert w.in_use() == 5
    clock.t = 1061.0  # second 1000's 4 leave; second 1020's 1 is left
    assert w.in_use() == 1
    w.give_back(50)
    assert w.in_use() == 0
    assert w.take(10) == 0
    # A negative amount charges more, unconditionally (an upstream counted more tokens than estimated).
    w.give_back(-3)
    assert w.in_use() == 13 and w.wait_for(1) == pytest.approx(61.0)


def test_fill_puts_a_figure_in_the_slot_of_its_time():
    w, _ = _window(10, 1000.0)
    w.take(4)
    w.fill(9, at=990.5)  # replaces what was there; admitted in second 990, it leaves at 1051
    assert w.in_use() == 9 and w.take(2) == pytest.approx(51.0)
    w.fill(9, at=900.0)  # seen long ago: already out of the window
    assert w.in_use() == 0
    w.fill(10)  # now
    assert w.take(1) == pytest.approx(61.0)


def _used_at(log: list[tuple[float, float]], t: float) -> float:
    """The definition, from the log of what was admitted: slots of seconds floor(t) - 60 .. floor(t) count."""
    return sum(a for at, a in log if math.floor(at) >= math.floor(t) - WINDOW_S and at <= t)


@pytest.mark.parametrize("seed", range(6))
def test_never_more_than_n_in_any_60_seconds_over_a_long_random_sequence(seed):
    rng = random.Random(seed)
    limit = rng.choice([1, 7, 60, 500])
    w, clock = _window(limit, 1000.0 + rng.random())
    log: list[tuple[float, float]] = []  # (time, amount kept) of each admission
    refused = 0
    for _ in range(3000):
        # Bursts within a second, pauses of some seconds, now and then over a minute of nothing.
        pause = rng.random()
        clock.t += 0.0 if pause < 0.3 else rng.random() * 0.05 if pause < 0.6 else rng.random() * 3
        if pause > 0.95:
            clock.t += rng.uniform(60, 120)
        amount = rng.randint(1, max(1, limit // 8)) if rng.random() < 0.92 else rng.randint(limit + 1, 2 * limit)
        used, need = _used_at(log, clock.t), min(amount, limit)
        wait = w.take(amount)
        assert (wait == 0) == (used + need <= limit), (clock.t, used, amount)
        if wait:
            # Exactly when it would fit (to a microsecond, for the floats' sake).
            assert _used_at(log, clock.t + wait + 1e-6) + need <= limit
            assert _used_at(log, clock.t + wait - 1e-6) + need > limit
            refused += 1
            continue
        kept = amount
        if amount <= limit and rng.random() < 0.1:  # part of it refunded at once (the work was not all done)
            back = rng.randint(1, amount)
            w.give_back(back)
            kept -= back
        if kept:
            log.append((clock.t, kept))
    assert len(log) >= 25 and refused >= 100, (len(log), refused)  # both sides exercised
    times = [t for t, _ in log]
    sums = list(itertools.accumulate((a for _, a in log), initial=0))
    oversized = 0
    # Every 60 s window (closed) that could hold the most: those starting at an admission.
    for i, start in enumerate(times):
        end = bisect.bisect_right(times, start + WINDOW_S)
        inside = sums[end] - sums[i]
        # Over the limit only for a request bigger than the whole limit, alone in its window.
        assert inside <= limit or end - i == 1, (start, log[i:end])
        oversized += inside > limit
    assert oversized >= 1  # that case was exercised


def test_a_reload_keeps_a_keys_window_only_while_its_limits_are_unchanged():
    entry = KeyConfig(key="reload-key-1", requests_per_minute=3, tokens_per_minute=100)
    before = KeyStore(entries=[entry])
    (old,) = before._keys
    assert old.requests is not None and old.requests.take(3) == 0
    (kept,) = KeyStore(entries=[entry], previous=before)._keys
    assert kept.requests is old.requests and kept.requests.wait_for(1) > 0
    changed = KeyConfig(key="reload-key-1", requests_per_minute=4, tokens_per_minute=100)
    (fresh,) = KeyStore(entries=[changed], previous=before)._keys
    assert fresh.requests is not old.requests and fresh.requests.limit == 4 and fresh.requests.wait_for(1) == 0


def test_a_refused_request_says_when_to_retry():
    auth = '[[auth.keys]]\nkey = "window-key-1"\nrequests_per_minute = 3\n'
    with serve(auth + FAKE_TOML, keys="config") as client:
        h = {"Authorization": "Bearer window-key-1"}
        (key,) = [k for k in client.app.state.gateway.keys._keys if k.name != "key-1"]
        started = time.monotonic()
        real = time.monotonic
        assert [client.post(URL, json={"model": "fake", "input": "x"}, headers=h).status_code for _ in range(3)] == [
            200
        ] * 3
        r = client.post(URL, json={"model": "fake", "input": "x"}, headers=h)
        assert r.status_code == 429 and r.json()["error"] == {
            "message": f"rate limit exceeded for key 'keys[0]': 3 requests per minute; retry in "
            f"{r.headers['retry-after']}s",
            "type": "rate_limit_error",
            "param": None,
            "code": "rate_limit_exceeded",
        }
        # The first request's second leaves 61 s after it began: less the time these requests took.
        assert 60 - (time.monotonic() - started) <= int(r.headers["retry-after"]) <= 61
        key.requests.clock = lambda: real() + 50.0  # not yet: the first request's slot still counts
        assert client.post(URL, json={"model": "fake", "input": "x"}, headers=h).status_code == 429
        key.requests.clock = lambda: real() + SLOT_LIFE_S + 1  # every slot has left
        assert client.post(URL, json={"model": "fake", "input": "x"}, headers=h).status_code == 200


# -- in Redis -------------------------------------------------------------------------------------------------


def _script(r, name: str, limit: int, amount: float, mode: str = "take", carried: float = 0) -> tuple[float, float]:
    wait, used = r.eval(_WINDOW, 1, name, limit, amount, mode, 120, carried).split()
    return float(wait), float(used)


def _in_one_second(r, run):
    """`run(second)` with Redis' current second, again if Redis' clock moved to another second meanwhile."""
    for _ in range(20):
        second = int(r.time()[0])
        out = run(second)
        if int(r.time()[0]) == second:
            return out
    raise AssertionError("Redis' second kept changing")


def test_redis_admits_n_then_refuses_with_the_wait_and_peek_takes_nothing(redis_server):
    r = redis_server.client()
    r.delete("w:fresh")
    assert _script(r, "w:fresh", 5, 1, "peek") == (0, 0)
    assert [_script(r, "w:fresh", 5, 1) for _ in range(5)] == [(0, n) for n in range(1, 6)]
    wait, used = _script(r, "w:fresh", 5, 1)
    assert used == 5 and 59 < wait <= 61, wait  # all of it in the last second or two: back a minute later
    assert _script(r, "w:fresh", 5, 1, "peek")[1] == 5
    assert 119 <= r.ttl("w:fresh") <= 120 and len(r.hgetall("w:fresh")) <= 2


def test_redis_counts_the_slot_partly_out_of_the_window_and_deletes_older_ones(redis_server):
    r = redis_server.client()

    def run(second):
        r.delete("w:slots")
        r.hset("w:slots", mapping={second - 61: 7, second - 60: 4, second - 20: 3})
        return _script(r, "w:slots", 10, 3), _script(r, "w:slots", 10, 1), _script(r, "w:slots", 10, 5), second

    (first, one, five, second) = _in_one_second(r, run)
    assert first == (0, 10)  # 4 + 3 in the window (the 7 of second - 61 are out of it), and 3 more fit
    assert one[1] == 10 and 0 < one[0] <= 1  # second - 60's 4 leave within the second
    assert five[1] == 10 and 40 < five[0] <= 41  # second - 20's 3 must leave too
    assert set(r.hgetall("w:slots")) == {str(second - 60).encode(), str(second - 20).encode(), str(second).encode()}


def test_redis_admits_a_request_bigger_than_the_limit_only_into_an_empty_window(redis_server):
    r = redis_server.client()
    r.delete("w:big")
    assert _script(r, "w:big", 5, 12, "peek") == (0, 0)
    assert _script(r, "w:big", 5, 12) == (0, 12)
    wait, used = _script(r, "w:big", 5, 1)
    assert used == 12 and 59 < wait <= 61
    assert _script(r, "w:big", 5, 12)[0] > 59


def test_redis_gives_back_off_the_newest_slots_and_never_below_zero(redis_server):
    r = redis_server.client()

    def run(second):
        r.delete("w:give")
        r.hset("w:give", mapping={second - 40: 4, second - 20: 3, second - 5: 2})
        return _script(r, "w:give", 10, 4, "give"), r.hgetall("w:give"), second

    (after, slots, second) = _in_one_second(r, run)
    assert after == (0, 5) and slots == {str(second - 40).encode(): b"4", str(second - 20).encode(): b"1"}
    assert _script(r, "w:give", 10, 50, "give") == (0, 0) and not r.exists("w:give")
    # A negative amount charges more, unconditionally; so does what a process admitted while Redis was away.
    assert _script(r, "w:give", 10, 10) == (0, 10)
    assert _script(r, "w:give", 10, -3, "give") == (0, 13)
    wait, used = _script(r, "w:give", 10, 1, "peek", carried=2)
    assert used == 15 and wait > 59
    assert _script(r, "w:give", 10, 0, "peek", carried=-15) == (0, 0)


def test_redis_never_admits_more_than_n_to_many_clients_at_once(redis_server):
    limit, admitted, lock = 50, [], threading.Lock()
    redis_server.client().delete("w:many")

    def client(seed: int) -> None:
        rng, r = random.Random(seed), redis_server.client()
        for _ in range(100):
            amount = rng.randint(1, 7)
            wait, _ = _script(r, "w:many", limit, amount)
            if not wait:
                with lock:
                    admitted.append(amount)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # 800 calls in a second or two: at most the limit, and every unit admitted is in the window.
    assert limit - 7 < sum(admitted) <= limit, admitted
    assert _script(redis_server.client(), "w:many", limit, 0, "peek")[1] == sum(admitted)


def _redis_toml(redis_url: str, auth: str, extra: str = "") -> str:
    # A deadline no busy test machine misses: a call that misses it is counted in this process only.
    return f'[cache]\nstore = "off"\n[redis]\nurl = "{redis_url}"\ntimeout_ms = 3000\n{extra}' + auth + FAKE_TOML


def _rate_limit_errors(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    lines = [x for x in text.splitlines() if x.startswith("gateway_shared_state_errors_total{")]
    return sum(float(x.rsplit(" ", 1)[1]) for x in lines if 'use="rate_limits"' in x)


def test_two_gateways_sharing_redis_never_admit_more_than_n_together(redis_server):
    redis_server.client().flushall()
    auth = '[[auth.keys]]\nkey = "shared-key-12"\nrequests_per_minute = 20\n'
    toml = _redis_toml(redis_server.url, auth)
    h = {"Authorization": "Bearer shared-key-12"}
    codes: list[tuple[int, str | None]] = []
    lock = threading.Lock()

    def hammer(url: str) -> None:
        with httpx.Client(base_url=url, headers=h, timeout=30) as http:
            for _ in range(15):
                r = http.post(URL, json={"model": "fake", "input": "x"})
                with lock:
                    codes.append((r.status_code, r.headers.get("retry-after")))

    with contextlib.ExitStack() as stack:
        one, _ = stack.enter_context(uvicorn_server(make_app(toml, keys="config")))
        two, _ = stack.enter_context(uvicorn_server(make_app(toml, keys="config")))
        errors = _rate_limit_errors(one)  # the counter is this test process's, shared by both apps
        threads = [threading.Thread(target=hammer, args=(url,)) for url in (one, two, one, two)]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        took = time.monotonic() - started
        assert _rate_limit_errors(one) == errors  # every check went through Redis
    assert [c for c, _ in codes].count(200) == 20 and [c for c, _ in codes].count(429) == 40, codes
    # The first admitted second leaves the window 61 s after it began, less the time the calls took.
    assert all(60 - took <= int(after) <= 61 for c, after in codes if c == 429), (took, codes)


@contextlib.contextmanager
def _outage(redis_server) -> Iterator[None]:
    """redis-server killed, then started again with the data it held (as after a network partition, or with
    persistence: the test server has none)."""
    r = redis_server.client()
    held = {name: r.hgetall(name) for name in r.keys("*")}
    redis_server.stop()
    try:
        yield
    finally:
        redis_server.start()
        r = redis_server.client()
        for name, fields in held.items():
            r.hset(name, mapping=fields)
            r.expire(name, 120)


def test_an_outage_carries_on_from_the_shared_use_and_is_counted_in_redis_after_it(redis_server):
    redis_server.client().flushall()
    auth = '[[auth.keys]]\nkey = "outage-key-1"\nrequests_per_minute = 6\n'
    toml = _redis_toml(redis_server.url, auth, "retry_after_s = 0.1\n")
    h = {"Authorization": "Bearer outage-key-1"}

    def codes(c, n: int) -> list[int]:
        return [c.post(URL, json={"model": "fake", "input": "x"}, headers=h).status_code for _ in range(n)]

    with serve(toml, keys="config") as one, serve(toml, keys="config") as two:
        started = time.monotonic()
        assert codes(one, 1) + codes(two, 1) + codes(one, 1) == [200] * 3
        with _outage(redis_server):
            # One's own window starts from the 3 in use it last saw, not from 0 (nor from its own 2); two's from
            # the 2 it saw. Each admits on its own: no shared count while Redis is away.
            assert codes(one, 4) == [200] * 3 + [429]
            r = one.post(URL, json={"model": "fake", "input": "x"}, headers=h)
            # Those 3 leave as if admitted when seen: 61 s after that second began, less the time since.
            assert r.status_code == 429 and 60 - (time.monotonic() - started) <= int(r.headers["retry-after"]) <= 61
            assert codes(two, 1) == [200]
        time.sleep(0.5)  # past retry_after_s, doubled while it failed (up to 4x): the next call tries Redis
        # What each admitted during the outage reaches Redis with its next call: 3 + 3 + 1 in use for both.
        assert codes(one, 1) == [429] and codes(two, 1) == [429]
        assert redis_server.client().eval(_WINDOW, 1, _redis_name(two), 6, 0, "peek", 120, 0).split()[1] == b"7"


def _redis_name(client) -> bytes:
    (key,) = [k for k in client.app.state.gateway.keys._keys if k.name != "key-1"]
    return key.requests.name


def test_shared_window_falls_back_to_this_process_and_back(redis_server):
    async def main() -> None:
        redis_server.client().flushall()
        link = RedisLink(RedisConfig(url=redis_server.url, timeout_ms=3000, retry_after_s=0.05))
        clock = Clock(time.monotonic())
        local = SlidingWindow(4, clock=clock)
        shared = SharedWindow(link, b"direct:requests:4", 4, local)
        assert [await shared.take(1) for _ in range(3)] == [0, 0, 0] and local.in_use() == 0
        with _outage(redis_server):
            assert await shared.take(1) == 0  # the 3 seen in Redis, and this one, in this process
            assert await shared.wait_for(1) > 59 and local.in_use() == 4
            await shared.give_back(1)
            assert await shared.wait_for(1) == 0
            assert await shared.take(1) == 0
        await asyncio.sleep(0.3)  # past retry_after_s, doubled while it failed (up to 4x)
        assert await shared.wait_for(1) > 59  # the outage's 1 (taken, given back, taken) reached Redis
        await shared.give_back(1)
        assert await shared.take(1) == 0 and await shared.take(1) > 59
        await link.close()

    asyncio.run(main())


def test_redis_counts_slots_dated_ahead_of_its_clock_from_now(redis_server):
    """Redis' clock stepped back: a slot dated 600 s ahead counts as admitted now (leaving within 61 s), never
    until its own second."""
    r = redis_server.client()

    def run(second):
        r.delete("w:future")
        r.hset("w:future", mapping={second + 600: 5})
        return _script(r, "w:future", 5, 1), r.hgetall("w:future"), second

    (wait, used), slots, second = _in_one_second(r, run)
    assert used == 5 and 59 < wait <= 61, wait
    assert slots == {str(second).encode(): b"5"}


class _Proxy:
    """A TCP proxy in front of Redis, on this event loop: replies to scripts held `reply_delay` seconds (a slow
    network after Redis ran the call; the client's handshake on a new connection answered at once), or requests
    swallowed (`drop_requests`: never reach Redis)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reply_delay = 0.0
        self.drop_requests = False
        # Connections closed as soon as they open (Redis unreachable).
        self.refuse = False
        self.requests = 0
        # Scripts sent on to Redis, and those Redis answered (whether or not the answer was passed on in time).
        self.scripts = 0
        self.ran = 0
        self.server: asyncio.Server | None = None
        self.url = ""

    async def start(self) -> _Proxy:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/0"
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refuse:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)

        script = False

        async def requests() -> None:
            nonlocal script
            while data := await reader.read(65536):
                self.requests += 1
                script = b"EVALSHA" in data.upper()
                if not self.drop_requests:
                    self.scripts += script
                    up_writer.write(data)
                    await up_writer.drain()

        async def replies() -> None:
            while data := await up_reader.read(65536):
                if script:
                    self.ran += 1
                    await asyncio.sleep(self.reply_delay)
                writer.write(data)
                await writer.drain()

        tasks = [asyncio.ensure_future(requests()), asyncio.ensure_future(replies())]
        with contextlib.suppress(Exception):
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        for w in (writer, up_writer):
            w.close()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()


def _used(redis_server, window: SharedWindow) -> float:
    return _script(redis_server.client(), window.name.decode(), window.limit, 0, "peek")[1]


def test_a_reply_lost_after_redis_ran_the_call_is_settled_once_never_replayed(redis_server):
    """Replies 150 ms late, past the 100 ms deadline: Redis ran every call, the process went on with its own
    window; once replies come in time, Redis holds exactly what was admitted (not the takes twice, nor the
    give-back twice)."""

    async def main() -> None:
        redis_server.client().flushall()
        proxy = await _Proxy(redis_server.port).start()
        link = RedisLink(RedisConfig(url=proxy.url, timeout_ms=100, retry_after_s=0.05))
        shared = SharedWindow(link, b"late:tokens:100", 100, SlidingWindow(100))
        await shared.wait_for(1)  # connected, the script loaded
        proxy.reply_delay = 0.15
        assert [await shared.take(10) for _ in range(3)] == [0, 0, 0]
        await until(lambda: proxy.ran == proxy.scripts, "Redis ran the three takes")
        proxy.reply_delay = 0.0
        await until(lambda: link.up, "Redis tried again")
        assert await shared.wait_for(1) == 0
        assert _used(redis_server, shared) == 30  # 30 admitted; not 60 (the takes carried again)
        proxy.reply_delay = 0.15
        assert await shared.take(60) == 0
        await shared.give_back(30)
        await until(lambda: proxy.ran == proxy.scripts, "Redis ran the take and the give-back")
        proxy.reply_delay = 0.0
        await until(lambda: link.up, "Redis tried again")
        assert await shared.wait_for(1) == 0
        assert _used(redis_server, shared) == 60  # 30 + 60 - 30, each once
        await link.close()
        await proxy.close()

    asyncio.run(main())


def test_admissions_carried_through_an_outage_survive_a_call_cancelled_on_its_way(redis_server):
    """Admitted while Redis was marked down, then the request whose call would carry them to Redis is cancelled
    before Redis saw it: they reach Redis with the next call all the same."""

    async def main() -> None:
        redis_server.client().flushall()
        proxy = await _Proxy(redis_server.port).start()
        link = RedisLink(RedisConfig(url=proxy.url, timeout_ms=3000, retry_after_s=1))
        shared = SharedWindow(link, b"cancel:tokens:100", 100, SlidingWindow(100))
        assert await shared.take(5) == 0  # through Redis
        await link.close()
        proxy.refuse = True
        assert await shared.take(2) == 0  # refused: Redis marked down, this process's window
        assert [await shared.take(2) for _ in range(2)] == [0, 0]  # skipped while down
        proxy.refuse = False
        await until(lambda: link.up, "the retry interval over")
        proxy.drop_requests = True
        seen = proxy.requests
        call = asyncio.ensure_future(shared.take(1))
        await until(lambda: proxy.requests > seen, "the call on its way")
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await call
        proxy.drop_requests = False
        assert await shared.wait_for(1) == 0
        assert _used(redis_server, shared) == 11  # 5, and the outage's 6; the cancelled take never ran
        await link.close()
        await proxy.close()

    asyncio.run(main())


def test_a_full_redis_refusing_cache_writes_leaves_the_limits_shared(redis_server):
    """Redis at its maxmemory with noeviction refuses the cache's writes (OutOfMemoryError): the cache's failure,
    not the limits'. Every limit call still reaches Redis, none falls back to the process's window."""

    async def main() -> None:
        r = redis_server.client()
        r.flushall()
        link = RedisLink(RedisConfig(url=redis_server.url, timeout_ms=3000, retry_after_s=30))
        store = RedisStore(link, ttl_s=600)
        shared = SharedWindow(link, b"full:requests:1000", 1000, SlidingWindow(1000))
        assert await shared.take(1) == 0
        r.config_set("maxmemory-policy", "noeviction")
        r.config_set("maxmemory", int(r.info("memory")["used_memory"]) + 100_000)
        try:
            for i in range(20):
                store.put_many([(f"entry {i}".encode(), bytes(20_000))])
                await until(lambda: store._writes_in_flight == 0, "the write answered")
            assert r.dbsize() < 2 + 20  # some writes refused
            assert [await shared.take(1) for _ in range(20)] == [0] * 20
            assert _used(redis_server, shared) == 21  # all in Redis: none taken in this process alone
        finally:
            r.config_set("maxmemory", 0)
        await store.close()

    asyncio.run(main())
