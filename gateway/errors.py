"""Every error leaves as OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import logging
import re
import uuid
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException

log = logging.getLogger("gateway.errors")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class GatewayError(Exception):
    """An error with a status and a message meant for the client."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The JSON body of an error response."""
    return {
        "error": {
            "message": message,
            "type": _TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response[dict[str, Any]]:
    """A Response carrying `error_body`."""
    return Response(error_body(status, message, param, code), status_code=status, headers=headers)


def _gateway_error(_: Request[Any, Any, Any], exc: GatewayError) -> Response[dict[str, Any]]:
    return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)


# msgspec's constraint messages, said the way a client reads them.
_PLAIN = {
    "Expected `str` of length >= 1": "`{param}` is an empty string",
    "Expected `array` of length >= 1": "`{param}` must not be an empty list",
    "Expected `int` >= 1": "`{param}` must be a positive integer",
}
_FIELD = re.compile(r"field `([^`]+)`")


def _param(key: str | None, message: str) -> str | None:
    # Litestar names the whole body "data"; msgspec then names the field inside the message.
    if key in (None, "", "data", "$"):
        m = _FIELD.search(message)
        return m.group(1) if m else None
    return key.removeprefix("$.")


def _invalid(message: str, key: str | None) -> GatewayError:
    # `message` is msgspec's, about the value at `key` ("data" or None: the body as a whole).
    if key == "data" and message.startswith("Expected `object`"):
        message = f"request body must be a JSON object: {message}"
    param = _param(key, message)
    if param and param.startswith("input[") and message in ("Expected `str`, got `array`", "Expected `str`, got `int`"):
        return GatewayError(
            400,
            f"`{param}` is not a string: `input` must be a string or a list of strings; token-id arrays are not "
            "accepted (LangChain's OpenAIEmbeddings sends them unless check_embedding_ctx_length=False)",
            param=param,
            code="invalid_value",
        )
    plain = _PLAIN.get(message)
    if param and plain:
        return GatewayError(400, plain.format(param=param), param=param, code="invalid_value")
    if param and f"`{param}`" not in message:
        message = f"{message} - at `{param}`"
    return GatewayError(400, f"invalid request: {message}", param=param, code="invalid_value")


_AT = re.compile(r" - at `\$\.(.+)`$")


def invalid_body(error: str) -> GatewayError:
    """The error for a JSON body that does not fit its Struct (`error`: msgspec's ValidationError text)."""
    at = _AT.search(error)
    return _invalid(error.split(" - ", 1)[0], at.group(1) if at else "data")


def unreadable_body(body: bytes, exc: Exception) -> GatewayError:
    """The error for a body that is not JSON at all (`exc`: msgspec's DecodeError, or a UnicodeDecodeError)."""
    if not body:
        return GatewayError(400, "request body is empty: expected a JSON object", code="invalid_json")
    if isinstance(exc, UnicodeDecodeError):
        return GatewayError(400, f"request body is not valid UTF-8: {exc.reason}", code="invalid_json")
    message = str(exc)
    if message == "Input data was truncated":
        # msgspec says this of a cut-off document and of an unpaired surrogate escape such as "\ud800".
        message = "it ends early or holds an unpaired UTF-16 surrogate escape"
    return GatewayError(400, f"request body is not valid JSON: {message}", code="invalid_json")


def _validation_error(request: Request[Any, Any, Any], exc: ValidationException) -> Response[dict[str, Any]]:
    # Litestar's own validation (of a route other than embeddings, which decodes its body itself).
    extra = exc.extra
    first = extra[0] if isinstance(extra, list) and extra and isinstance(extra[0], dict) else {}
    return _gateway_error(request, _invalid(str(first.get("message", exc.detail)), first.get("key")))


def _http_error(_: Request[Any, Any, Any], exc: HTTPException) -> Response[dict[str, Any]]:
    status = exc.status_code
    message = exc.detail
    if status == 404:
        message = f"no route for this path: {message}"
    elif status == 413:
        message = f"request body too large: {message}"
    return error_response(status, message, None, None, dict(exc.headers or {}))


def _internal_error(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    error_id = uuid.uuid4().hex[:16]
    log.error("internal error %s on %s %s", error_id, request.method, request.url.path, exc_info=exc)
    return error_response(500, f"internal error (id {error_id}); the server log has the details", None, error_id)


def _unicode_error(_: Request[Any, Any, Any], exc: UnicodeError) -> Response[dict[str, Any]]:
    return error_response(400, f"request body is not valid UTF-8: {exc.reason}", None, "invalid_json")


EXCEPTION_HANDLERS: dict[type[Exception] | int, Any] = {
    GatewayError: _gateway_error,
    UnicodeError: _unicode_error,
    ValidationException: _validation_error,
    HTTPException: _http_error,
    Exception: _internal_error,
}
