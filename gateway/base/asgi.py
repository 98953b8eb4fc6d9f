"""Small ASGI helpers for the hot path, where building Litestar's Request or Headers objects per request
costs more than the work itself."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.base.errors import GatewayError

if TYPE_CHECKING:
    from litestar.types import Scope


def header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of header `name` (lower case, as ASGI gives names)."""
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


def client_deadline(raw: bytes | str | None) -> float | None:
    """`X-Request-Timeout-Ms` in seconds: the client's own limit, which may only shorten the server's (None when
    absent); 400 when it is not a whole number of milliseconds in range."""
    if raw is None:
        return None
    if not raw.isdigit() or not 0 < int(raw) <= 86_400_000:
        raise GatewayError(
            400,
            "`X-Request-Timeout-Ms` must be a whole number of milliseconds between 1 and 86400000",
            param="X-Request-Timeout-Ms",
            code="invalid_header",
        )
    return int(raw) / 1000
