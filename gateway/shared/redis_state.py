"""State shared by gateway processes through Redis: the embedding cache's entries and the per-key rate limits.

Redis is an accelerator and a coordinator, never a dependency of an answer: every call runs under a short
deadline (Redis' own budget plus the event loop's measured lag, which is not Redis' fault), and a failed
connection, or several slow replies in a row, mark the link down for a while, during which calls are
skipped at once. The cache then misses and the rate limits fall back to per-process windows; the outage is logged
once when it starts and once when it ends, and each skipped or failed call is counted in /metrics. The
`redis` package (extra `redis`) is imported only when a config names Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from gateway.base.config import ConfigError, RedisConfig
from gateway.base.observability import record_store_error

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript

    from gateway.shared.windows import SlidingWindow

log = logging.getLogger("gateway.redis")

T = TypeVar("T")

# A key's sliding window (windows.py's SlidingWindow), updated atomically in Redis on Redis' own clock (so replicas
# with skewed clocks agree): a hash of slot second -> amount admitted in it; slots out of the window are deleted,
# and slots dated after Redis' present (its clock stepped back) count from now.
# KEYS[1]: the window; ARGV: limit, amount, mode ("take", "peek" or "give"), ttl (s; 0: the key never expires),
# carried (what this process admitted, net of what it gave back, while it went without Redis: added first,
# unconditionally).
# Optional, for calls whose reply may be lost: KEYS[2], a ledger (hash) of the calls that ran, by field; ARGV[6]
# this call's field (a call already in the ledger is never applied again); ARGV[7] how many earlier calls to
# settle, then that many pairs (field, what the process counted for it); then fields whose replies came (dropped).
# Returns "WAIT USED": the seconds until `amount` would fit (0: taken, or would be) and the amount in use left,
# as a string to keep the fractions.
_WINDOW = """
local t = redis.call('TIME')
local second = tonumber(t[1])
local now = second + tonumber(t[2]) / 1000000
local limit = tonumber(ARGV[1])
local amount = tonumber(ARGV[2])
local mode = ARGV[3]
local ttl = tonumber(ARGV[4])
local carried = tonumber(ARGV[5])
local ledger, op = KEYS[2], ARGV[6]
if ledger ~= nil and op ~= nil then
  local done = redis.call('HGET', ledger, op)
  if done then
    -- Sent again (the client library retried) or given up on and reconciled: never applied twice.
    return string.match(done, '^%S+ (%S+ %S+)') or '0 0'
  end
  local n = tonumber(ARGV[7])
  for i = 0, n - 1 do
    -- A call whose reply never came: `mine` is what the process counted for it (what it carried, and what it
    -- admitted on its own); the difference to what Redis applied, if it ran, is applied now, once.
    local field, mine = ARGV[8 + 2 * i], tonumber(ARGV[9 + 2 * i])
    local ran = redis.call('HGET', ledger, field)
    if ran == false then
      carried = carried + mine
    elseif string.sub(ran, 1, 1) ~= 'x' then
      carried = carried + mine - tonumber(string.match(ran, '^(%S+)'))
    end
    -- Settled: the call, should it still arrive, applies nothing.
    redis.call('HSET', ledger, field, 'x ' .. t[1])
  end
  for i = 8 + 2 * n, #ARGV do redis.call('HDEL', ledger, ARGV[i]) end
end
local flat = redis.call('HGETALL', KEYS[1])
local by = {}
for i = 1, #flat, 2 do
  local k = tonumber(flat[i])
  if k == nil or k < second - 60 then
    redis.call('HDEL', KEYS[1], flat[i])
  else
    if k > second then
      -- Dated ahead of Redis' clock (the clock stepped back): counted from now, not until that future second.
      redis.call('HDEL', KEYS[1], flat[i])
      redis.call('HINCRBYFLOAT', KEYS[1], t[1], flat[i + 1])
      k = second
    end
    by[k] = (by[k] or 0) + tonumber(flat[i + 1])
  end
end
local slots = {}
local used = 0
for k, v in pairs(by) do
  slots[#slots + 1] = {k, v}
  used = used + v
end
table.sort(slots, function(x, y) return x[1] < y[1] end)
local function add(n)
  redis.call('HINCRBYFLOAT', KEYS[1], t[1], n)
  local last = slots[#slots]
  if last ~= nil and last[1] == second then last[2] = last[2] + n else slots[#slots + 1] = {second, n} end
  used = used + n
end
local function give(n)
  for i = #slots, 1, -1 do
    if n <= 0 then break end
    local back = math.min(n, slots[i][2])
    slots[i][2] = slots[i][2] - back
    if slots[i][2] <= 0 then
      redis.call('HDEL', KEYS[1], tostring(slots[i][1]))
      table.remove(slots, i)
    else
      redis.call('HSET', KEYS[1], tostring(slots[i][1]), tostring(slots[i][2]))
    end
    n = n - back
    used = used - back
  end
end
if carried > 0 then add(carried) elseif carried < 0 then give(-carried) end
local settled = used
local wait = 0
if mode == 'give' then
  if amount >= 0 then give(amount) else add(-amount) end
else
  local need = math.min(amount, limit)
  if used + need <= limit then
    if mode == 'take' then add(amount) end
  else
    local left = used
    for i = 1, #slots do
      left = left - slots[i][2]
      wait = slots[i][1] + 61 - now
      if left + need <= limit then break end
    end
  end
end
local reply = tostring(wait) .. ' ' .. tostring(used)
if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl) else redis.call('PERSIST', KEYS[1]) end
if ledger ~= nil and op ~= nil then
  -- What this call applied, but for what it settled of earlier calls (those are settled by their own fields).
  local applied = used - settled + tonumber(ARGV[5])
  redis.call('HSET', ledger, op, tostring(applied) .. ' ' .. reply .. ' ' .. t[1])
  if redis.call('HLEN', ledger) > 64 then
    -- Fields nobody will settle (a process that stopped): dropped once older than any call can be late.
    local fields = redis.call('HGETALL', ledger)
    for i = 1, #fields, 2 do
      local at = tonumber(string.match(fields[i + 1], '(%d+)$'))
      if at == nil or at < second - 120 then redis.call('HDEL', ledger, fields[i]) end
    end
  end
  if ttl > 0 then redis.call('EXPIRE', ledger, ttl) else redis.call('PERSIST', ledger) end
end
return reply
"""


class RedisDown(Exception):
    """Redis is marked down (or just failed): the caller goes on without it. `sent`: the call reached the wire,
    so Redis may have run it (its outcome is unknown); False when it was skipped."""

    def __init__(self, sent: bool = False) -> None:
        super().__init__("redis is down" if not sent else "redis failed")
        self.sent = sent


# Replies past the deadline in a row before Redis counts as down (one refused connection is enough).
_SLOW_STRIKES = 3


# What an operator who has no Redis running reads in the outage's first log line.
_NO_SERVER_HINT = (
    ". Is a server running there? For local use, `gateway redis-server` starts the one installed with the "
    'gateway on [redis]\'s port; or set `[cache] store = "memory"` and drop `[redis]`'
)


def _refused(exc: BaseException) -> bool:
    """A connection that nothing accepted (as opposed to a slow or failing server)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ConnectionRefusedError) or "Connection refused" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@dataclass(slots=True)
class _Health:
    """Whether Redis is up for one use: the cache and the rate limits fail apart (a full Redis refusing cache
    writes, or slow cache lookups, must not turn the shared limits per-process)."""

    backoff: float
    strikes: int = 0
    down_until: float = 0.0
    # When the current outage began (None: up), and when it was last declared (at its start and at each
    # failed retry): a call that started before that says nothing new about it.
    down_since: float | None = None
    declared_at: float = 0.0


class RedisLink:
    """One client for one event loop, with the health rule above, kept per use ("cache", "rate_limits")."""

    def __init__(self, config: RedisConfig, lag: Callable[[], float] = lambda: 0.0) -> None:
        """`lag`: the event loop's current lag in seconds (added to each call's deadline)."""
        self.config = config
        self.lag = lag
        self.prefix = config.prefix.encode() + b":"
        self._client: Redis | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scripts: dict[str, AsyncScript] = {}
        self._health: dict[str, _Health] = {}

    def client(self) -> Redis:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            try:
                from redis.asyncio import Redis
            except ImportError:  # pragma: no cover - the extra is in the lock; a hand-made venv may lack it
                raise ConfigError(
                    "`[redis]` needs the `redis` package: pip install 'embedding-gateway[redis]'"
                ) from None
            # The socket's own limits are a backstop; the deadline in `call` is the one that counts. No retries
            # by the client library: a call re-sent after a lost reply would be applied twice.
            timeout = max(1.0, 4 * self.config.timeout_ms / 1000)
            self._client = Redis.from_url(
                self.config.url,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                health_check_interval=0,
                retry=None,
            )
            self._loop = loop
        return self._client

    def script(self, client: Redis, text: str) -> AsyncScript:
        """`text` as a Lua script of `client`: called by its SHA (EVALSHA), and sent again by redis-py when a
        restarted Redis has forgotten it, rather than sent whole with every call."""
        found = self._scripts.get(text)
        if found is None or found.registered_client is not client:
            found = self._scripts[text] = client.register_script(text)
        return found

    def _state(self, use: str) -> _Health:
        found = self._health.get(use)
        if found is None:
            found = self._health[use] = _Health(self.config.retry_after_s)
        return found

    def up_for(self, use: str) -> bool:
        """Whether calls for `use` go to Redis now (False while it is marked down for that use)."""
        return time.monotonic() >= self._state(use).down_until

    @property
    def up(self) -> bool:
        """Up for every use."""
        return all(time.monotonic() >= h.down_until for h in self._health.values())

    async def call(self, use: str, fn: Callable[[Redis], Awaitable[T]]) -> T:
        """`fn(client)` under the deadline; RedisDown (counted under `use`) when Redis is down for `use` or fails.
        An error Redis answers (a full Redis refusing a write, say) fails that call only: Redis is there."""
        health = self._state(use)
        if time.monotonic() < health.down_until:
            record_store_error(use)
            raise RedisDown
        # Outside the deadline: the first call imports the client library, which is not Redis being slow.
        client = self.client()
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.config.timeout_ms / 1000 + 2 * self.lag()):
                result = await fn(client)
        except TimeoutError as exc:
            health.strikes += 1
            if health.strikes < _SLOW_STRIKES:
                record_store_error(use)  # this call went without Redis; the next ones still try
                raise RedisDown(sent=True) from None
            self._failed(use, health, exc, started)
            raise RedisDown(sent=True) from None
        except (OSError, ConnectionError) as exc:
            self._failed(use, health, exc, started)
            raise RedisDown(sent=True) from None
        except Exception as exc:  # the redis package's own errors (ConnectionError, ResponseError, ...)
            if not type(exc).__module__.startswith("redis"):
                raise
            if _is_reply(exc):
                log.warning("redis at %s refused a %s call: %s", self._where(), use, exc)
                record_store_error(use)
            else:
                self._failed(use, health, exc, started)
            raise RedisDown(sent=True) from None
        health.strikes = 0
        if health.down_since is not None and started >= health.declared_at:
            log.warning(
                "redis at %s is back for %s after %.1fs", self._where(), use, time.monotonic() - health.down_since
            )
            health.down_since = None
            health.backoff = self.config.retry_after_s
        return result

    def _failed(self, use: str, health: _Health, exc: BaseException, started: float) -> None:
        record_store_error(use)
        now = time.monotonic()
        if health.down_since is not None and started < health.declared_at:
            return  # begun before the outage was declared: the same outage, already counted
        if health.down_since is None:
            health.down_since = now
            log.error(
                "redis at %s failed for %s (%s: %s); going on without it (%s), next try in %.1fs%s",
                self._where(),
                use,
                type(exc).__name__,
                exc or "timed out",
                "cache misses" if use == "cache" else "per-process rate limits",
                health.backoff,
                _NO_SERVER_HINT if _refused(exc) else "",
            )
        else:
            # Still down: try less often, up to four times the base interval.
            health.backoff = min(health.backoff * 2, self.config.retry_after_s * 4)
        health.strikes = 0
        health.declared_at = now
        health.down_until = now + health.backoff

    def _where(self) -> str:
        # The URL without its password.
        url = self.config.url
        scheme, sep, rest = url.partition("://")
        return f"{scheme}{sep}{rest.rsplit('@', 1)[-1]}" if sep else url

    async def close(self) -> None:
        if self._client is not None:
            try:
                await self._client.aclose()
            except Exception:  # closing a client whose loop is gone: nothing left to release
                log.debug("closing the redis client", exc_info=True)
            self._client = None


def _is_reply(exc: BaseException) -> bool:
    """An error reply from Redis (OOM under maxmemory, a script error), as opposed to a failed link."""
    from redis.exceptions import ResponseError

    return isinstance(exc, ResponseError)


# Sets every KEYS[i] to ARGV[i] with the TTL in the last ARGV, in one command: a pipeline of SETs costs
# redis-py about five times the Python work per key (bench/README.md, "The cache's cost at hit rate 0").
_SET_MANY = """
local ttl = ARGV[#ARGV]
for i = 1, #KEYS do redis.call('SET', KEYS[i], ARGV[i], 'EX', ttl) end
return #KEYS
"""


class RedisStore:
    """Cache entries in Redis: one string per input, raw bytes, with a TTL.

    Lookups and writes are coalesced: every lookup made in one turn of the event loop goes out as one MGET,
    and every write as one script call, in the background. A round trip costs redis-py some 120 us of Python
    work whatever it carries, which per request was most of what the Redis store cost over no cache.
    """

    name = "redis"

    def __init__(self, link: RedisLink, ttl_s: int) -> None:
        self.link = link
        self.ttl_s = ttl_s
        self._lookups: list[tuple[list[bytes], asyncio.Future[list[bytes | None]]]] = []
        self._pending_writes: list[tuple[bytes, bytes]] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writes_in_flight = 0

    def _key(self, key: bytes) -> bytes:
        return self.link.prefix + b"cache:" + key.hex().encode()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        if not keys:
            return []
        if not self.link.up_for("cache"):
            record_store_error("cache")
            return [None] * len(keys)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[bytes | None]] = loop.create_future()
        if not self._lookups:
            loop.call_soon(self._flush_lookups)
        self._lookups.append(([self._key(k) for k in keys], future))
        return await future

    def _flush_lookups(self) -> None:
        lookups, self._lookups = self._lookups, []
        # A caller that gave up (its request timed out) is left out.
        lookups = [(names, f) for names, f in lookups if not f.done()]
        if lookups:
            self._spawn(self._lookup(lookups))

    async def _lookup(self, lookups: list[tuple[list[bytes], asyncio.Future[list[bytes | None]]]]) -> None:
        names = [name for batch, _ in lookups for name in batch]
        try:
            raws: list[bytes | None] = await self.link.call("cache", lambda r: r.mget(names))
        except RedisDown:
            raws = [None] * len(names)
        except asyncio.CancelledError:  # shutting down
            for _, future in lookups:
                future.cancel()
            raise
        except Exception as exc:  # not Redis' failure: each caller sees it, as it would have uncoalesced
            for _, future in lookups:
                if not future.done():
                    future.set_exception(exc)
            return
        at = 0
        for batch, future in lookups:
            if not future.done():
                future.set_result(raws[at : at + len(batch)])
            at += len(batch)

    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        if not items or not self.link.up_for("cache"):
            return
        # Bounded: while Redis is slow, writes beyond this many calls in flight are dropped (a later miss, no more).
        if self._writes_in_flight >= 64:
            record_store_error("cache")
            return
        if not self._pending_writes:
            asyncio.get_running_loop().call_soon(self._flush_writes)
        self._pending_writes.extend((self._key(k), raw) for k, raw in items)

    def _flush_writes(self) -> None:
        items, self._pending_writes = self._pending_writes, []
        if items:
            self._writes_in_flight += 1
            self._spawn(self._write(items))

    async def _write(self, items: list[tuple[bytes, bytes]]) -> None:
        names = [name for name, _ in items]
        args = [raw for _, raw in items] + [self.ttl_s]

        try:
            with contextlib.suppress(RedisDown):
                await self.link.call("cache", lambda r: self.link.script(r, _SET_MANY)(keys=names, args=args))
        finally:
            self._writes_in_flight -= 1

    async def clear(self, prefix: bytes) -> int:
        pattern = self.link.prefix + b"cache:" + prefix.hex().encode() + b"*"

        async def unlink(r: Redis) -> int:
            removed = 0
            batch: list[bytes] = []
            async for name in r.scan_iter(match=pattern, count=1000):
                batch.append(name)
                if len(batch) >= 1000:
                    removed += await r.unlink(*batch)
                    batch = []
            if batch:
                removed += await r.unlink(*batch)
            return removed

        # A clear may take longer than a lookup: its own deadline, and its errors are the caller's (a 503).
        client = self.link.client()
        async with asyncio.timeout(30):
            return await unlink(client)

    async def close(self) -> None:
        self._flush_lookups()
        self._flush_writes()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=1)
        await self.link.close()


class SharedWindow:
    """A key's rate-limit window in Redis, shared by every gateway process; `local` (this process's own
    window) answers while Redis is down.

    A call whose reply does not come (past the deadline, the link broken, the request cancelled) may have run in
    Redis or not: it is settled once, by the next call that gets through, against the ledger of calls that ran
    (the difference between what Redis applied and what this process counted instead), never sent again.
    """

    def __init__(self, link: RedisLink, name: bytes, per_minute: int, local: SlidingWindow) -> None:
        self.link = link
        # Not the name the token buckets had ("limit:"): during a rolling upgrade old and new never read each other's.
        self.name = link.prefix + b"window:" + name
        self.ledger = link.prefix + b"window-calls:" + name
        self.limit = per_minute
        self.local = local
        self._on_local = False
        # The shared window's use as last seen, and when (on the local window's clock): where this process's own
        # window starts when Redis goes.
        self._seen_used = 0.0
        self._seen_at = 0.0
        # Admitted here, net of what was given back, while Redis was away (calls never sent): counted in Redis
        # once it answers, so an outage's admissions are not forgotten when it ends.
        self._carried = 0.0
        # This process's calls, named in the ledger: (instance, sequence number).
        self._instance = secrets.token_hex(6)
        self._seq = 0
        # Calls sent whose outcome is unknown: their field -> what this process counted for them.
        self._unsettled: dict[str, float] = {}
        # Calls whose reply came: their ledger fields can go.
        self._answered: list[str] = []

    async def _run(self, amount: float, mode: str) -> float:
        # Sent once: a call that is skipped keeps it for the next; one that may have run is settled by the next.
        carried, self._carried = self._carried, 0.0
        self._seq += 1
        field = f"{self._instance}:{self._seq}"
        unsettled = dict(self._unsettled)
        answered, self._answered = self._answered, []
        pairs = [x for f, mine in unsettled.items() for x in (f, mine)]
        args = (self.limit, amount, mode, 0, carried, field, len(unsettled), *pairs, *answered)
        keys = [self.name, self.ledger]
        sent = True
        try:
            raw = await self.link.call("rate_limits", lambda r: self.link.script(r, _WINDOW)(keys=keys, args=args))
        except RedisDown as exc:
            sent = exc.sent
            raw = None
        except BaseException:
            # Cancelled (the request went away) while the call was out: it may have run. Nothing was admitted
            # here for it, so what it carried is all this process counts for it.
            self._unsettled[field] = carried
            self._answered.extend(answered)
            raise
        if raw is not None:
            for f in unsettled:
                self._unsettled.pop(f, None)
            self._answered.append(field)
            self._on_local = False
            wait, used = (raw.decode() if isinstance(raw, bytes) else raw).split()
            self._seen_used, self._seen_at = float(used), self.local.clock()
            return float(wait)
        self._answered.extend(answered)
        wait, counted = self._run_locally(amount, mode)
        if sent:
            self._unsettled[field] = carried + counted
        else:
            self._carried += carried + counted
        return wait

    def _run_locally(self, amount: float, mode: str) -> tuple[float, float]:
        """Redis is down: the call on this process's own window. Returns the wait and what it counted."""
        if not self._on_local:
            # Carry on from the shared use as last seen, rather than granting a fresh minute at every outage;
            # it leaves the window as if all admitted when it was seen.
            self._on_local = True
            self.local.fill(self._seen_used, at=self._seen_at)
        if mode == "peek":
            return self.local.wait_for(amount), 0.0
        if mode == "take":
            wait = self.local.take(amount)
            return wait, 0.0 if wait else amount
        self.local.give_back(amount)
        return 0.0, -amount

    async def take(self, amount: float) -> float:
        return await self._run(amount, "take")

    async def wait_for(self, amount: float) -> float:
        return await self._run(amount, "peek")

    async def give_back(self, amount: float) -> None:
        await self._run(amount, "give")
