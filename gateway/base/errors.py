"""Every error leaves as OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi import ResponseSpec

from gateway.base.schemas import ErrorResponse

log = logging.getLogger("gateway.errors")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
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


def error_responses(*statuses: int) -> dict[int, ResponseSpec]:
    """OpenAPI entries for a route's error answers, all in OpenAI's shape."""
    return {s: ResponseSpec(data_container=ErrorResponse, description="OpenAI-shaped error") for s in statuses}


def _gateway_error(_: Request[Any, Any, Any], exc: GatewayError) -> Response[dict[str, Any]]:
    return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)


def _validation_error(_: Request[Any, Any, Any], exc: ValidationException) -> Response[dict[str, Any]]:
    # Litestar's own parameter validation; no route takes parameters today (bodies go through decoding.py).
    return error_response(400, f"invalid request: {exc.detail}", None, "invalid_value")


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
