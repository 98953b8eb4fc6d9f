"""The HTTP server: uvicorn, configured from `[server]`, with the deadlines its HTTP/1.1 protocol lacks.

uvicorn times out idle keep-alive connections but not a client that sends half a request head and stops,
nor one that stops reading its response (the response then sits in memory for as long as the client
keeps the connection open). The protocol below adds both deadlines; the body's own deadline (408) is the
embeddings route's.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from gateway.base.config import ServerConfig


class DeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol, closing connections whose request head or response write stalls."""

    head_timeout_s: float = 10.0
    send_timeout_s: float = 30.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._send_timer: asyncio.TimerHandle | None = None
        self._head_timer: asyncio.TimerHandle | None = self.loop.call_later(self.head_timeout_s, self._head_late)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:
            # Part of a request head has arrived (uvicorn's keep-alive timer, which covered the quiet time
            # before it, is now off): it gets head_timeout_s to be complete.
            if self._head_timer is None and not self.transport.is_closing():
                self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_late)
        elif self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_timer is None:
            self._send_timer = self.loop.call_later(self.send_timeout_s, self._send_late)

    def resume_writing(self) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        super().resume_writing()

    def _send_late(self) -> None:
        # abort(), not close(): close() would keep the unsent response in memory until the client reads it.
        self._send_timer = None
        self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._head_timer, self._send_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._send_timer = None
        super().connection_lost(exc)


def protocol_for(server: ServerConfig) -> type[H11Protocol]:
    """The protocol class with `server`'s deadlines."""
    return type(
        "GatewayProtocol",
        (DeadlineProtocol,),
        {"head_timeout_s": server.header_timeout_s, "send_timeout_s": server.send_timeout_s},
    )


def uvicorn_config(app: Any, server: ServerConfig, **overrides: Any) -> uvicorn.Config:
    """uvicorn's Config for `app` from `[server]`; `overrides` (host, port, ...) win."""
    options: dict[str, Any] = {
        "host": server.host,
        "port": server.port,
        "log_level": server.log_level,
        # Our own access log (observability.py) replaces uvicorn's.
        "access_log": False,
        "http": protocol_for(server),
        "timeout_keep_alive": server.keep_alive_s,
        "limit_concurrency": server.max_connections,
        "h11_max_incomplete_event_size": server.max_header_bytes,
    }
    options.update(overrides)
    return uvicorn.Config(app, **options)
