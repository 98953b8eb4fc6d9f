"""The link between the HTTP fronts and the runtime process (with `[server] workers` > 1).

One Unix stream socket in a private (0700) folder; each front holds one connection and keeps many calls in
flight on it, matched by id. A frame is a 4-byte big-endian length and a msgpack body: a `Call` one way, a
`Reply` the other. The runtime side is gateway/processes/runtime_process.py; this module is the wire format and the
fronts' client.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import mmap
import os
import struct
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal, TypeVar

import msgspec

from gateway.base.errors import GatewayError
from gateway.base.schemas import EmbeddingRequest

log = logging.getLogger("gateway")

T = TypeVar("T")

#: Environment the supervisor hands the fronts and the runtime (never a key: the generated one goes as its digest).
SOCKET_ENV = "GATEWAY_RUNTIME_SOCKET"
CONFIG_ENV = "GATEWAY_RUNTIME_CONFIG"
FALLBACK_KEY_ENV = "GATEWAY_FALLBACK_KEY_DIGEST"
WORKERS_ENV = "GATEWAY_RUNTIME_WORKERS"

_LENGTH = struct.Struct("!I")
# A frame larger than this is a broken peer, not a request: 2048 inputs of 100k characters fit under it.
MAX_FRAME = 1 << 30


class Call(msgspec.Struct, array_like=True):
    """Front -> runtime: operation `op` with its arguments (msgpack of the op's own type)."""

    id: int
    op: str
    args: msgspec.Raw


class Reply(msgspec.Struct, array_like=True):
    """Runtime -> front: the answer to call `id`: its value, or a `Failure` when `ok` is false."""

    id: int
    ok: bool
    value: msgspec.Raw


class Failure(msgspec.Struct, array_like=True):
    """A GatewayError raised at the runtime, with what the request noted before it (for the access log)."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = {}
    notes: dict[str, Any] = {}


class RemoteError(GatewayError):
    """A GatewayError the runtime raised, carrying what the request had noted there."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(
            failure.status, failure.message, param=failure.param, code=failure.code, headers=failure.headers
        )
        self.notes = failure.notes


class EmbedArgs(msgspec.Struct, array_like=True):
    """One embeddings request: the decoded body, the caller's key (its digest) and the client's deadline."""

    body: EmbeddingRequest
    key: bytes | None
    deadline_s: float | None


class Vectors(msgspec.Struct, array_like=True):
    """The vectors of one request as float32 bytes (rows x width), how to encode them, and its notes."""

    data: bytes
    rows: int
    tokens: int
    kind: str
    packed: bool
    # int8/uint8 calibration (float32 bytes), when the output type needs it.
    starts: bytes | None
    steps: bytes | None
    notes: dict[str, Any]


class TakeArgs(msgspec.Struct, array_like=True):
    """A key's requests/minute (or tokens/minute) window at the runtime: take `amount`, only ask how long until
    it would fit, or give it back."""

    key: bytes
    amount: float
    mode: Literal["take", "ask", "give"]
    what: Literal["requests", "tokens"] = "requests"


class Push(msgspec.Struct, array_like=True):
    """Runtime -> front, sent as a `Reply` with a negative id: operation `op` the front runs and answers with a
    `Pushed` ("prepare" a reload's per-worker copies, "abort" it)."""

    op: str
    args: msgspec.Raw


class Pushed(msgspec.Struct, array_like=True):
    """Front -> runtime (the op "pushed"): the answer to push `n`."""

    n: int
    ok: bool
    value: msgspec.Raw


class CacheClearArgs(msgspec.Struct, array_like=True):
    """Clear the runtime's cache: of model `name`, or of a front's per-worker copy (its cache `identity`)."""

    name: str | None
    identity: bytes | None = None


class RuntimeGone(Exception):
    """The connection to the runtime process dropped (it died or is restarting) with the call unanswered."""


_ENCODER = msgspec.msgpack.Encoder()
_REPLY = msgspec.msgpack.Decoder(Reply)
_FAILURE = msgspec.msgpack.Decoder(Failure)


def frame(message: msgspec.Struct) -> bytes:
    """`message` as one frame: its length, then its msgpack."""
    body = _ENCODER.encode(message)
    return _LENGTH.pack(len(body)) + body


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    """The next frame's body; IncompleteReadError at the end of the stream."""
    (size,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    if size > MAX_FRAME:
        raise ConnectionError(f"frame of {size} bytes from the runtime link")
    return await reader.readexactly(size)


_GENERATION = struct.Struct("<Q")


def generation_path(socket_path: str) -> str:
    """The generation file beside the runtime's socket (the supervisor creates it, 8 zero bytes)."""
    return os.path.join(os.path.dirname(socket_path), "generation")


class Generation:
    """The number of the config the runtime process serves, in shared memory: raised before a reload is
    answered (and when a restarted runtime read its config anew), read by each front per request, so that no
    front serves an older config than the runtime's once the reload's answer is out."""

    def __init__(self, path: str) -> None:
        fd = os.open(path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, _GENERATION.size)
        finally:
            os.close(fd)

    def read(self) -> int:
        return _GENERATION.unpack_from(self._map)[0]  # type: ignore[no-any-return]

    def bump(self) -> int:
        """Raise the number (only the runtime process does); the new one."""
        n = self.read() + 1
        _GENERATION.pack_into(self._map, 0, n)
        return n


class RuntimeLink:
    """A front's connection to the runtime process: calls in flight matched by id, reconnected on demand."""

    def __init__(self, path: str, connect_timeout_s: float = 30.0) -> None:
        """`connect_timeout_s`: how long a call waits for the runtime to (re)appear before answering 503."""
        self.path = path
        self.connect_timeout_s = connect_timeout_s
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Reply]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._connecting: asyncio.Lock | None = None
        #: The runtime process that answered this link's hello (the one its calls go to).
        self.runtime_pid: int | None = None
        #: The state of this front's per-worker copies, sent on every (re)connection and on `send_states`.
        self.states: Callable[[], dict[str, str]] | None = None
        #: Runs what the runtime pushes (see `Push`): (op, args) -> the value answered.
        self.on_push: Callable[[str, msgspec.Raw], Awaitable[Any]] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def _connection(self) -> asyncio.StreamWriter:
        if self._writer is not None:
            return self._writer
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._writer is not None:
                return self._writer
            deadline = time.monotonic() + self.connect_timeout_s
            while True:
                try:
                    reader, writer = await self._open(deadline)
                    break
                except (OSError, EOFError, TimeoutError, msgspec.DecodeError) as exc:
                    # Not there yet (starting) or gone (being restarted by the supervisor): try again shortly.
                    if time.monotonic() > deadline:
                        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
                        raise GatewayError(
                            503,
                            f"the model runtime process is not reachable ({reason}); retry shortly",
                            code="runtime_unavailable",
                            headers={"Retry-After": "1"},
                        ) from None
                    await asyncio.sleep(0.05)
            self._writer = writer
            self._reader_task = asyncio.get_running_loop().create_task(self._read(reader, writer))
            if self.states is not None:
                # A new runtime knows nothing of this front's copies yet.
                self.cast("states", self.states())
            return writer

    async def _open(self, deadline: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection the runtime has answered on."""
        reader, writer = await asyncio.open_unix_connection(self.path, limit=MAX_FRAME)
        try:
            # First, who this front is (the runtime counts the fronts connected for /ready); then wait for the
            # runtime's answer. A connect alone proves nothing: the listening socket of a runtime being killed still
            # accepts for a moment (a connect succeeds, then is reset), and a call retried there would be lost a
            # second time.
            writer.write(frame(Call(0, "hello", msgspec.Raw(_ENCODER.encode(os.getpid())))))
            answer = _REPLY.decode(await asyncio.wait_for(read_frame(reader), max(0.1, deadline - time.monotonic())))
            self.runtime_pid = msgspec.msgpack.decode(answer.value, type=int)
        except BaseException:
            writer.close()
            raise
        return reader, writer

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                reply = _REPLY.decode(await read_frame(reader))
                if reply.id < 0:
                    self._spawn(self._answer_push(-reply.id, msgspec.msgpack.decode(reply.value, type=Push)))
                    continue
                future = self._pending.pop(reply.id, None)
                if future is not None and not future.done():
                    future.set_result(reply)
        except (asyncio.IncompleteReadError, ConnectionError, OSError, msgspec.DecodeError) as exc:
            log.warning("runtime link lost: %s", type(exc).__name__)
        finally:
            if self._writer is writer:
                self._writer = None
            writer.close()
            # Every call on this connection is unanswered for good.
            pending, self._pending = self._pending, {}
            for future in pending.values():
                if not future.done():
                    future.set_exception(RuntimeGone())

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer_push(self, n: int, push: Push) -> None:
        try:
            if self.on_push is None:
                raise GatewayError(500, f"this front takes no pushed {push.op!r}", code="runtime_protocol")
            answer = Pushed(n, True, msgspec.Raw(_ENCODER.encode(await self.on_push(push.op, push.args))))
        except Exception as exc:
            log.exception("front worker: the runtime's %r failed here", push.op)
            answer = Pushed(n, False, msgspec.Raw(_ENCODER.encode(f"{type(exc).__name__}: {exc}")))
        self.cast("pushed", answer)

    def cast(self, op: str, args: object) -> None:
        """Send `op(args)` to the runtime without waiting for (or reading) its answer; dropped while no
        connection is up (a cache write, or states that the next connection sends again)."""
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(frame(Call(0, op, msgspec.Raw(_ENCODER.encode(args)))))

    def send_states(self) -> None:
        """Tell the runtime the state of this front's per-worker copies (connecting first if need be)."""
        if self.states is None:
            return
        if self._writer is not None:
            self.cast("states", self.states())
        else:
            self._spawn(self.connect())  # the connection sends them

    async def connect(self) -> None:
        """Connect now (a front does at startup, so the runtime counts it before its first request)."""
        try:
            await self._connection()
        except GatewayError as exc:
            log.error("%s", exc.message)

    async def call(self, op: str, args: object, result: type[T] | Any) -> T:
        """The value of `op(args)` at the runtime, decoded as `result`: GatewayError as the runtime raised it,
        RuntimeGone if the runtime went away before answering."""
        writer = await self._connection()
        call_id = next(self._ids)
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        try:
            writer.write(frame(Call(call_id, op, msgspec.Raw(_ENCODER.encode(args)))))
            reply = await future
        except asyncio.CancelledError:
            # The client went away or timed out: the runtime drops the work (its inputs leave the queue).
            if self._pending.pop(call_id, None) is not None and self._writer is writer:
                writer.write(frame(Call(0, "cancel", msgspec.Raw(_ENCODER.encode(call_id)))))
            raise
        finally:
            self._pending.pop(call_id, None)
        if not reply.ok:
            raise RemoteError(_FAILURE.decode(reply.value))
        return msgspec.msgpack.decode(reply.value, type=result)  # type: ignore[no-any-return]

    async def embed(self, args: EmbedArgs) -> Vectors:
        """One embeddings request's vectors (RemoteError as the runtime refused it); retried once if the runtime
        went away meanwhile (its batches are lost with it), then 503."""
        for attempt in (1, 2):
            try:
                return await self.call("embed", args, Vectors)
            except RuntimeGone:
                if attempt == 2:
                    break
                log.warning("the runtime process went away with a request in flight; retrying it once")
        raise GatewayError(
            503,
            "the model runtime process restarted twice while this request was in flight; retry",
            code="runtime_restarted",
            headers={"Retry-After": "1"},
        )

    async def close(self) -> None:
        """Close the connection (calls in flight get RuntimeGone)."""
        if self._writer is not None:
            self._writer.close()
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader_task


class LinkWindow:
    """A key's requests (or tokens) per minute as the runtime counts it (one window for every front):
    SharedWindow's shape."""

    def __init__(
        self, link: RuntimeLink, digest: bytes, limit: int, what: Literal["requests", "tokens"] = "requests"
    ) -> None:
        self.link = link
        self.digest = digest
        self.limit = limit
        self.what: Literal["requests", "tokens"] = what

    async def _call(self, amount: float, mode: Literal["take", "ask", "give"]) -> float:
        try:
            return await self.link.call("take", TakeArgs(self.digest, amount, mode, self.what), float)
        except RuntimeGone:
            # The runtime died with the call (and its windows with it): the new one counts from here.
            return await self.link.call("take", TakeArgs(self.digest, amount, mode, self.what), float)

    async def take(self, amount: float) -> float:
        """Take `amount` now and return 0, or take nothing and return the seconds until it would fit."""
        return await self._call(amount, "take")

    async def wait_for(self, amount: float) -> float:
        """Seconds until `amount` would fit (0: now), taking nothing."""
        return await self._call(amount, "ask")

    async def give_back(self, amount: float) -> None:
        """Return `amount` taken for work that was not done (negative: take it without a check)."""
        await self._call(amount, "give")


class LinkStore:
    """The cache store of the runtime process, for a front's per-worker models (cache.Store's shape): one
    cache for every front, cleared in one place."""

    def __init__(self, link: RuntimeLink, name: str) -> None:
        self.link = link
        #: The runtime's store's name (metrics label their hits by it).
        self.name = name

    async def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        try:
            return await self.link.call("cache_get", list(keys), list[bytes | None])
        except RuntimeGone:
            # The runtime died with the lookup, and its memory cache with it: misses, as a Redis outage gives.
            return [None] * len(keys)

    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        # Not waited for: the runtime reads this connection's frames in order, so a lookup sent after it by
        # this front finds the entries.
        self.link.cast("cache_put", list(items))

    async def clear(self, prefix: bytes) -> int:
        raise NotImplementedError("a front clears the cache through the runtime's cache_clear")

    async def close(self) -> None:
        return None
