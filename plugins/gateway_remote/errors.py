"""Upstream failures as the core's typed errors (gateway/plugin.py): a client never sees the upstream's key or
body, and the operator gets one log line naming the upstream and its status."""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING

import msgspec

from gateway.plugin import BackendOverloaded, BackendTimeout, BackendUnavailable, InputRejected

if TYPE_CHECKING:
    import httpx

log = logging.getLogger("gateway.remote")

# An upstream's error code is repeated to clients only when it looks like an identifier (never free text).
_SAFE_CODE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


class _Error(msgspec.Struct):
    code: str | int | None = None


class _ErrorBody(msgspec.Struct):
    error: _Error | str | None = None


def transport_error(model: str, base_url: str, timeout_s: float, exc: Exception, late: bool = False) -> Exception:
    """The typed failure for a transport error; `late`: the call's deadline had passed (a timeout, even
    when it cut a connect short)."""
    import httpx

    log.error("model %r: upstream %s: %s: %s", model, base_url, type(exc).__name__, exc)
    if isinstance(exc, httpx.TimeoutException) and (late or not isinstance(exc, httpx.ConnectTimeout)):
        return BackendTimeout(f"the upstream of model {model!r} did not answer within {timeout_s:g}s")
    return BackendUnavailable(f"the upstream of model {model!r} is unreachable ({type(exc).__name__})")


def status_error(model: str, base_url: str, response: httpx.Response) -> Exception:
    """The typed failure for an upstream's answer other than 200."""
    status = response.status_code
    code = _error_code(response.content)
    # The operator's line: the upstream and its status, never its body (it may echo inputs) or our key.
    log.error(
        "model %r: upstream %s answered HTTP %d%s (%d bytes of body, not logged)",
        model,
        base_url,
        status,
        f" code {code}" if code else "",
        len(response.content),
    )
    said = f"HTTP {status}" + (f", code {code!r}" if code else "")
    if status in (400, 413, 422):
        return InputRejected(f"the upstream of model {model!r} rejected the input ({said})")
    if status == 429:
        return BackendOverloaded(
            f"the upstream of model {model!r} is overloaded ({said}); retry later",
            retry_after=_retry_after(response.headers.get("retry-after")),
        )
    if status in (401, 403):
        return BackendUnavailable(
            f"the upstream of model {model!r} refused the gateway's credentials ({said}); the operator has been told"
        )
    if status in (408, 504):
        return BackendTimeout(f"the upstream of model {model!r} timed out ({said})")
    return BackendUnavailable(f"the upstream of model {model!r} failed ({said})")


def _error_code(body: bytes) -> str | None:
    """The `error.code` of an OpenAI-shaped error body, when it is a short identifier."""
    try:
        error = msgspec.json.decode(body, type=_ErrorBody).error
    except msgspec.DecodeError:
        return None
    code = error.code if isinstance(error, _Error) else None
    code = str(code) if code is not None else None
    return code if code is not None and _SAFE_CODE.fullmatch(code) else None


def _retry_after(raw: str | None) -> float:
    """Seconds from a Retry-After header (a number; an HTTP date or nothing: 1)."""
    try:
        return max(1.0, float(raw)) if raw is not None else 1.0
    except ValueError:
        return 1.0
