"""The runtime process (with `[server] workers` > 1): the one owner of what every front must share.

It holds the Gateway the single-process server holds (models and their batchers, so that the requests of all
fronts merge into the same batches; the cache and its in-flight dedup; the keys' requests and tokens per
minute; admission's queue; calibration) and answers the fronts' calls on a Unix socket
(gateway/runtime/link.py). It speaks no HTTP. A model with `copies = "per-worker"` is not loaded here: each
front computes it on its own copy, and this process counts its keys' limits, holds its cache entries, adds up
the fronts' copies for /ready, and has every front load a reload's new copies before it swaps. This module
serves the socket (accepting, framing, dispatching each call to gateway/processes/runtime_calls.py, which does
what the call asks) and runs the process. Started by the supervisor (gateway/processes/supervisor.py) as
`python -m gateway.processes.runtime_process`, with the socket and config paths in its environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import sys
import time
import uuid
from typing import Any

import msgspec

from gateway.base.config import ConfigError, GatewayConfig, load_config
from gateway.base.errors import GatewayError
from gateway.base.observability import record_batch
from gateway.base.schemas import Health
from gateway.embedding.batch_runner import start_runner, stop_runner
from gateway.embedding.state import Gateway
from gateway.processes.runtime_calls import OPS, ready
from gateway.runtime.link import (
    CONFIG_ENV,
    FALLBACK_KEY_ENV,
    SOCKET_ENV,
    WORKERS_ENV,
    Call,
    Failure,
    Generation,
    Push,
    Pushed,
    Reply,
    frame,
    generation_path,
    read_frame,
)
from gateway.shared.keys import KeyStore

__all__ = ["OPS", "RuntimeServer", "main", "run"]

log = logging.getLogger("gateway")

_CALL = msgspec.msgpack.Decoder(Call)
_ENCODER = msgspec.msgpack.Encoder()


class RuntimeServer:
    """Answers the fronts' calls on `gw`, each call in its own task (many in flight per connection)."""

    def __init__(self, gw: Gateway, workers: int = 0) -> None:
        """`workers`: the fronts the supervisor starts (readiness waits for all of them to connect)."""
        self.gw = gw
        self.workers = workers
        self.tasks: set[asyncio.Task[None]] = set()
        #: Front worker pids, by connection.
        self.fronts: dict[int, int] = {}
        #: Every front's open connection.
        self.writers: set[asyncio.StreamWriter] = set()
        #: The state of each front's per-worker copies, by connection.
        self.states: dict[int, dict[str, str]] = {}
        #: Pushes to fronts awaiting their answer: by number, with the connection it went on.
        self._pushes: dict[int, tuple[asyncio.StreamWriter, asyncio.Future[Pushed]]] = {}
        self._push_ids = itertools.count(1)

    async def connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one front's connection until it closes."""
        mine: dict[int, asyncio.Task[None]] = {}
        self.writers.add(writer)
        try:
            while True:
                call = _CALL.decode(await read_frame(reader))
                if self._note(call, writer, mine):
                    continue
                task = asyncio.get_running_loop().create_task(self._answer(call, writer))
                mine[call.id] = task
                self.tasks.add(task)
                task.add_done_callback(lambda t, i=call.id: (self.tasks.discard(t), mine.pop(i, None)))
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass  # the front went away (stopped, or restarted by uvicorn): its calls go with it
        except msgspec.DecodeError as exc:
            log.error("runtime link: undecodable call from a front (%s); closing its connection", exc)
        finally:
            self._forget(writer, mine)

    def _note(self, call: Call, writer: asyncio.StreamWriter, mine: dict[int, asyncio.Task[None]]) -> bool:
        """Take in a front's message that is not a call to answer (its hello, its copies' states, its answer to a
        push, a cache write, a cancel); False for a call."""
        if call.op == "hello":
            self.fronts[id(writer)] = msgspec.msgpack.decode(call.args, type=int)
            # The answer tells the front that a live runtime took its connection (see RuntimeLink).
            writer.write(frame(Reply(0, True, msgspec.Raw(_ENCODER.encode(os.getpid())))))
        elif call.op == "states":
            self.states[id(writer)] = msgspec.msgpack.decode(call.args, type=dict[str, str])
        elif call.op == "pushed":
            answer = msgspec.msgpack.decode(call.args, type=Pushed)
            waiting = self._pushes.pop(answer.n, None)
            if waiting is not None and not waiting[1].done():
                waiting[1].set_result(answer)
        elif call.op == "cache_put":
            # Not answered (the front does not wait): stored before any later call of this front runs.
            if self.gw.cache is not None:
                self.gw.cache.store.put_many(msgspec.msgpack.decode(call.args, type=list[tuple[bytes, bytes]]))
        elif call.op == "cancel":
            task = mine.get(msgspec.msgpack.decode(call.args, type=int))
            if task is not None:
                task.cancel()
        else:
            return False
        return True

    def _forget(self, writer: asyncio.StreamWriter, mine: dict[int, asyncio.Task[None]]) -> None:
        """A front's connection ended: drop what it registered, cancel the pushes it owed and its calls, close it."""
        self.writers.discard(writer)
        self.fronts.pop(id(writer), None)
        self.states.pop(id(writer), None)
        for n, (w, future) in list(self._pushes.items()):
            if w is writer:
                del self._pushes[n]
                if not future.done():
                    future.cancel()
        for task in list(mine.values()):
            task.cancel()
        writer.close()

    async def _answer(self, call: Call, writer: asyncio.StreamWriter) -> None:
        notes: dict[str, Any] = {}
        op = OPS.get(call.op)
        try:
            if op is None:
                raise GatewayError(500, f"unknown runtime call {call.op!r}", code="runtime_protocol")
            value = await (self._ready(call.args) if call.op == "ready" else op(self.gw, call.args, notes))
            reply = Reply(call.id, True, msgspec.Raw(_ENCODER.encode(value)))
        except GatewayError as exc:
            failure = Failure(exc.status, exc.message, exc.param, exc.code, exc.headers, notes)
            reply = Reply(call.id, False, msgspec.Raw(_ENCODER.encode(failure)))
        except asyncio.CancelledError:
            return  # asked to by the front (its client left): nobody waits for an answer
        except Exception as exc:
            error_id = uuid.uuid4().hex[:16]
            log.exception("runtime call %r failed (error id %s)", call.op, error_id)
            failure = Failure(500, f"{type(exc).__name__} (error id {error_id})", code=error_id, notes=notes)
            reply = Reply(call.id, False, msgspec.Raw(_ENCODER.encode(failure)))
        if not writer.is_closing():
            writer.write(frame(reply))

    def copies(self, model: str) -> tuple[int, int, bool]:
        """How many fronts have their copy of per-worker `model` ready, of the fronts started, and whether one
        failed to load it."""
        states = [s.get(model) for conn, s in self.states.items() if conn in self.fronts]
        return sum(s == "ready" for s in states), self.workers, any(s == "failed" for s in states)

    async def push(self, op: str, args: object, timeout_s: float) -> list[Pushed]:
        """Run `op(args)` in every connected front; their answers (a front that leaves meanwhile gives none: it
        reads the config file anew when it starts again)."""
        waiting: list[asyncio.Future[Pushed]] = []
        body = msgspec.Raw(_ENCODER.encode(Push(op, msgspec.Raw(_ENCODER.encode(args)))))
        for writer in list(self.writers):
            if writer.is_closing():
                continue
            n = next(self._push_ids)
            future: asyncio.Future[Pushed] = asyncio.get_running_loop().create_future()
            self._pushes[n] = (writer, future)
            waiting.append(future)
            writer.write(frame(Reply(-n, True, body)))
        try:
            async with asyncio.timeout(timeout_s):
                done = await asyncio.gather(*waiting, return_exceptions=True)
        finally:
            for future in waiting:
                future.cancel()
        return [d for d in done if isinstance(d, Pushed)]

    async def prepare_fronts(self, config: GatewayConfig) -> dict[str, str]:
        """A reload's first step in every front: load the new config's per-worker copies (Gateway.prepare);
        the models a front failed to load, and why. A front that cannot prepare refuses the reload."""
        failed: dict[str, str] = {}
        timeout_s = self.gw.config.server.request_timeout_s
        try:
            answers = await self.push("prepare", config, timeout_s)
        except TimeoutError:
            raise ConfigError(f"the front workers did not load the new per-worker copies in {timeout_s:g}s") from None
        for answer in answers:
            if not answer.ok:
                reason = msgspec.msgpack.decode(answer.value, type=str)
                raise ConfigError(f"a front worker could not prepare the reload: {reason}")
            failed.update(msgspec.msgpack.decode(answer.value, type=dict[str, str]))
        return failed

    def abort_fronts(self) -> None:
        """Have the fronts drop a prepared reload that did not happen (not waited for)."""
        task = asyncio.get_running_loop().create_task(self.push("abort", None, 5.0))
        self.tasks.add(task)  # type: ignore[arg-type]
        task.add_done_callback(self.tasks.discard)  # type: ignore[arg-type]

    async def drain(self, timeout_s: float) -> None:
        """Answer until every front has gone and every call is answered, within `timeout_s`; then close the
        connections left. A front closes its link only once it has stopped, after its own requests: signalled
        with the fronts (systemd's control group, Ctrl-C's process group), the runtime must not stop under them;
        stopped by the supervisor, after the fronts, it finds none left."""
        deadline = time.monotonic() + timeout_s
        while (self.writers or self.tasks) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.writers or self.tasks:
            log.warning(
                "runtime process: %d front(s) still connected and %d call(s) unanswered after %gs; closing",
                len(self.writers),
                len(self.tasks),
                timeout_s,
            )
        for writer in list(self.writers):
            # Closed, not cancelled: the connection's reader ends as at a front's exit.
            writer.close()
        for task in list(self.tasks):
            task.cancel()
        while self.writers and time.monotonic() < deadline + 1:
            await asyncio.sleep(0.01)

    async def _ready(self, raw: msgspec.Raw) -> Health:
        # Ready when the models are and every front worker is connected (a front restarted by uvicorn counts
        # again once it has connected).
        health = await ready(self.gw, raw, {})
        fronts = len(self.fronts)
        health.workers = f"{fronts}/{self.workers}"
        if fronts < self.workers:
            health.status = "not ready"
        return health


async def run(gw: Gateway, socket_path: str, workers: int) -> None:
    """Load the models, answer the fronts until SIGTERM/SIGINT (or the supervisor's exit), then drain."""
    loop = asyncio.get_running_loop()
    runtime = RuntimeServer(gw, workers)
    gw.copies = runtime.copies
    gw.reloader.prepare_fronts, gw.reloader.abort_fronts = runtime.prepare_fronts, runtime.abort_fronts
    gw.registry.load_all(loop, here=gw.here)
    for name, model in gw.registry.models.items():
        if model.elsewhere:
            log.info("runtime process: model %r is not loaded here: each front worker loads its own copy", name)
    lag = loop.create_task(gw.watch_loop_lag())
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # This config is new to the fronts (a restarted runtime read the file again), and so is each reload's: the
    # number goes up before a reload is answered (on_reload runs inside it).
    generation = Generation(generation_path(socket_path))
    generation.bump()
    gw.on_reload.append(generation.bump)
    _reload_on_sighup(gw, loop)
    watch = loop.create_task(_stop_when_orphaned(stop, os.getppid()))
    # Batch API jobs run here, where the batchers are; the fronts write their files and rows.
    jobs = start_runner(gw)
    try:
        await _serve(runtime, socket_path, stop)
    finally:
        for task in (lag, watch):
            task.cancel()
        await stop_runner(gw, jobs)
        await loop.run_in_executor(None, gw.registry.close)
        await gw.close_shared()


def _reload_on_sighup(gw: Gateway, loop: asyncio.AbstractEventLoop) -> None:
    """Reload the config on SIGHUP (the supervisor passes its SIGHUP on to this process)."""
    reloads: set[asyncio.Task[Any]] = set()

    async def reload() -> None:
        try:
            await gw.reload()
        except ConfigError as exc:
            log.error("reload refused, the running config is kept: %s", exc)

    def sighup() -> None:
        task = loop.create_task(reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, sighup)


async def _stop_when_orphaned(stop: asyncio.Event, parent: int) -> None:
    """The supervisor (`parent`) killed outright: nobody will stop this process, so it stops itself."""
    while os.getppid() == parent:
        await asyncio.sleep(1.0)
    log.warning("runtime process: the supervisor is gone; stopping")
    stop.set()


async def _serve(runtime: RuntimeServer, socket_path: str, stop: asyncio.Event) -> None:
    """Answer the fronts on `socket_path` until `stop` is set, then until they have gone (their drain)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket_path)  # left by a runtime process that died: this one takes its place
    server = await asyncio.start_unix_server(runtime.connection, socket_path, limit=1 << 30)
    log.info("runtime process %d answering on %s", os.getpid(), socket_path)
    try:
        await stop.wait()
    finally:
        # No new front from here; those connected are answered until they have gone (their drain).
        server.close()
        log.info("runtime process %d stopping: answering the fronts until they have gone", os.getpid())
        await runtime.drain(runtime.gw.config.server.request_timeout_s)


def main() -> int:
    """`python -m gateway.processes.runtime_process`: paths from the environment the supervisor set."""
    from gateway.runtime.plugins import load_plugins

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config_path = os.environ[CONFIG_ENV]
    config = load_config(config_path)
    logging.getLogger().setLevel(config.server.log_level.upper())
    plugins = load_plugins()
    digest = os.environ.get(FALLBACK_KEY_ENV)
    gw = Gateway(
        config,
        plugins.backends(),
        broken=plugins.broken,
        fallback_keys=KeyStore([f"sha256:{digest}"]) if digest else None,
        config_path=config_path,
        on_batch=record_batch,
        placements=plugins.placements(),
        runtime=True,
    )
    asyncio.run(run(gw, os.environ[SOCKET_ENV], int(os.environ.get(WORKERS_ENV, "0"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
