"""A front worker (with `[server] workers` > 1): the HTTP app, built from what the supervisor handed down.

uvicorn starts each worker in a fresh interpreter and calls `create_front` there (an app factory given as an
import string). A front does HTTP, auth, body decoding and validation and the response's encoding; the
runtime process (gateway/runtime_process.py) does the rest, reached through a RuntimeLink.
"""

from __future__ import annotations

import logging
import os

from litestar import Litestar
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from .app import create_app
from .auth import KeyStore
from .config import load_config
from .plugins import load_plugins
from .runtime_link import CONFIG_ENV, FALLBACK_KEY_ENV, SOCKET_ENV, RuntimeLink
from .server import DeadlineProtocol


class FrontProtocol(DeadlineProtocol):
    """The HTTP protocol of a front worker: uvicorn imports it by name; `create_front` sets its deadlines."""


def create_front() -> Litestar:
    """The front worker's app: the supervisor's config, its generated key (as a digest), the runtime's socket."""
    # A spawned interpreter: `gateway serve`'s logging setup did not run here.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config_path = os.environ[CONFIG_ENV]
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
        link=RuntimeLink(os.environ[SOCKET_ENV]),
    )
    if config.server.log_level == "debug":
        # Which worker answered, for debugging the layout (and for the tests that need two workers' answers).
        app.asgi_handler = _with_worker_pid(app.asgi_handler)
    return app


def _with_worker_pid(app: ASGIApp) -> ASGIApp:
    pid = str(os.getpid()).encode()

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_pid(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-gateway-worker", pid)]
            await send(message)

        await app(scope, receive, send_with_pid)

    return wrapped
