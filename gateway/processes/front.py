"""A front worker (with `[server] workers` > 1): the HTTP app, built from what the supervisor handed down.

uvicorn starts each worker in a fresh interpreter and calls `create_front` there (an app factory given as an
import string). A front does HTTP, auth, body decoding and validation and the response's encoding; the
runtime process (gateway/processes/runtime_process.py) does the rest, reached through a RuntimeLink, except for the
models with `copies = "per-worker"`: each front loads its own copy of those and computes their requests, with
the runtime's key windows and cache, and loads a reload's new copies when the runtime asks (Gateway.prepare).
"""

from __future__ import annotations

import asyncio
import logging
import os

from litestar import Litestar
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from gateway.api.app import create_app
from gateway.api.server import DeadlineProtocol
from gateway.base.config import ConfigError, load_config
from gateway.embedding.state import Gateway
from gateway.runtime.link import CONFIG_ENV, FALLBACK_KEY_ENV, SOCKET_ENV, Generation, RuntimeLink, generation_path
from gateway.runtime.plugins import load_plugins
from gateway.shared.keys import KeyStore

log = logging.getLogger("gateway")


class FrontProtocol(DeadlineProtocol):
    """The HTTP protocol of a front worker: uvicorn imports it by name; `create_front` sets its deadlines."""


def create_front() -> Litestar:
    """The front worker's app: the supervisor's config, its generated key (as a digest), the runtime's socket."""
    # A spawned interpreter: `gateway serve`'s logging setup did not run here.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config_path = os.environ[CONFIG_ENV]
    socket_path = os.environ[SOCKET_ENV]
    generation = Generation(generation_path(socket_path))
    seen = generation.read()
    config = load_config(config_path)
    logging.getLogger().setLevel(config.server.log_level.upper())
    FrontProtocol.head_timeout_s = config.server.header_timeout_s
    FrontProtocol.send_timeout_s = config.server.send_timeout_s
    digest = os.environ.get(FALLBACK_KEY_ENV)
    app = create_app(
        config,
        plugins=load_plugins(),
        fallback_keys=KeyStore([f"sha256:{digest}"]) if digest else None,
        config_path=config_path,
        link=RuntimeLink(socket_path),
    )
    app.asgi_handler = _following(app, generation, seen, config_path)
    if config.server.log_level == "debug":
        # Which worker answered, for debugging the layout (and for the tests that need two workers' answers).
        app.asgi_handler = _with_worker_pid(app.asgi_handler)
    return app


def _following(app: Litestar, generation: Generation, seen: int, config_path: str) -> ASGIApp:
    """`app`'s handler, first taking the runtime's newer config when it has one (a memory read per request)."""
    handler = app.asgi_handler
    gw: Gateway = app.state.gateway
    lock = asyncio.Lock()
    current = [seen]

    async def follow() -> None:
        async with lock:
            now = generation.read()
            if now == current[0]:
                return  # another request of this worker took it meanwhile
            try:
                # The reload the runtime had this front prepare (its per-worker copies loaded), else the file
                # as the runtime read it at its (re)start.
                if not gw.swap():
                    config = await asyncio.get_running_loop().run_in_executor(None, load_config, config_path)
                    await gw.follow(config)
                gw.link.send_states()  # type: ignore[union-attr]
            except ConfigError as exc:
                # The file changed again since the runtime read it, and is broken: the runtime's own config
                # stands (it checks every request's key and model again).
                log.error("front worker: cannot read the config the runtime reloaded: %s", exc)
            current[0] = now

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if generation.read() != current[0]:
            await follow()
        await handler(scope, receive, send)

    return wrapped


def _with_worker_pid(app: ASGIApp) -> ASGIApp:
    pid = str(os.getpid()).encode()

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_pid(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-gateway-worker", pid)]
            await send(message)

        await app(scope, receive, send_with_pid)

    return wrapped
