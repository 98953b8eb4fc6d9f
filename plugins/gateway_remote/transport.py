"""The pooled keep-alive HTTP client to the upstream, every call bounded by its own deadline: a module of its
own because it reaches under httpx into httpcore's network backend."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from gateway.plugin import BackendError

if TYPE_CHECKING:
    import httpx


def import_httpx() -> Any:
    """The httpx module (BackendError naming the extra without it), its per-call INFO lines quieted."""
    try:
        import httpx
    except ImportError as exc:
        raise BackendError("httpx is not installed: pip install 'embedding-gateway[remote]'") from exc
    # httpx logs every call at INFO: one line per batch in the server's log, unless the operator chose.
    httpx_log = logging.getLogger("httpx")
    if httpx_log.level == logging.NOTSET:
        httpx_log.setLevel(logging.WARNING)
    return httpx


def headers(api_key_env: str | None) -> dict[str, str]:
    """The headers of every call: JSON, and the bearer key from `api_key_env` (BackendError when unset)."""
    out = {"Content-Type": "application/json"}
    if api_key_env is not None:
        key = os.environ.get(api_key_env)
        if not key:
            raise BackendError(f"environment variable {api_key_env} (options.api_key_env) is not set")
        out["Authorization"] = f"Bearer {key}"
    return out


def open_client(
    *,
    base_url: str,
    headers: dict[str, str],
    timeout_s: float,
    connect_timeout_s: float,
    connections: int,
    deadlines: threading.local,
) -> httpx.Client:
    """A client of `connections` pooled keep-alive connections whose calls end by `deadlines.at`."""
    import httpx

    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    # httpcore writes a request's head and body separately: with Nagle's algorithm on, the body
    # waits for the upstream's delayed ACK of the head (bench/README.md).
    transport = httpx.HTTPTransport(limits=limits, socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
    # httpx's timeouts bound each socket operation, so an upstream that trickles its answer could hold a batch
    # for ever: every connect, read and write is bounded by what is left of the call's own deadline instead.
    pool = transport._pool
    pool._network_backend = _Deadlines(pool._network_backend, deadlines)
    return httpx.Client(
        base_url=base_url.rstrip("/") + "/",
        headers=headers,
        timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
        transport=transport,
    )


class _Deadlines:
    """An httpcore network backend whose streams bound every operation by the calling thread's deadline
    (`deadlines.at`, a time.monotonic() value; None: no deadline): a call ends by its deadline however its
    upstream trickles."""

    def __init__(self, inner: Any, deadlines: threading.local) -> None:
        self._inner = inner
        self._deadlines = deadlines

    def left(self, timeout: float | None, error: type[Exception]) -> float | None:
        """`timeout`, cut to the time left before the deadline; `error` when it has passed."""
        deadline = getattr(self._deadlines, "at", None)
        if deadline is None:
            return timeout
        left = deadline - time.monotonic()
        if left <= 0:
            raise error("the call's deadline passed")
        return left if timeout is None else min(timeout, left)

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> _DeadlineStream:
        import httpcore

        stream = self._inner.connect_tcp(
            host, port, self.left(timeout, httpcore.ConnectTimeout), local_address, socket_options
        )
        return _DeadlineStream(stream, self)

    def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options: Any = None) -> Any:
        import httpcore

        stream = self._inner.connect_unix_socket(path, self.left(timeout, httpcore.ConnectTimeout), socket_options)
        return _DeadlineStream(stream, self)

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class _DeadlineStream:
    """A network stream of `_Deadlines`."""

    def __init__(self, inner: Any, backend: _Deadlines) -> None:
        self._inner = inner
        self._backend = backend

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        import httpcore

        return self._inner.read(max_bytes, self._backend.left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        import httpcore

        self._inner.write(buffer, self._backend.left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None) -> Any:
        import httpcore

        left = self._backend.left(timeout, httpcore.ConnectTimeout)
        stream = self._inner.start_tls(ssl_context, server_hostname, left)
        return _DeadlineStream(stream, self._backend)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)
