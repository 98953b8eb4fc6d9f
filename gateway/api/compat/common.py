"""What every compat shape shares: the key and the body read as the hot route reads them, the one pipeline, the
answer's headers, errors in the shape's own body, and the routes' OpenAPI description.

A shape is a parser (a msgspec Struct of its request), a mapping onto `EmbeddingRequest` and a mapping of the
answer; auth, limits, the cache, prompts, truncation, compact types and metrics are the pipeline's
(`gateway/embedding/service.py`), never copied here.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec
from litestar import Litestar, Request, Response
from litestar._openapi.plugin import OpenAPIPlugin
from litestar.exceptions import HTTPException, ValidationException
from litestar.handlers import HTTPRouteHandler

from gateway.api.decoding import BodyDecoder
from gateway.api.embeddings import openapi_schema
from gateway.base.errors import GatewayError
from gateway.base.schemas import EmbeddingRequest
from gateway.embedding import service
from gateway.embedding.state import Gateway
from gateway.runtime.registry import ServedModel
from gateway.shared.keys import ApiKey, authorize

log = logging.getLogger("gateway.errors")

#: (status, message, code) -> (status, JSON body) in the shape's own error form.
ErrorBody = Callable[[int, str, "str | None"], tuple[int, Any]]


@dataclass(frozen=True)
class Shape:
    """One client API's conventions: its error body, and its names for the pipeline's fields (`input` ->
    `texts`), so that an error names the field the client sent."""

    error: ErrorBody
    fields: Mapping[str, str] = field(default_factory=dict)

    def renamed(self, message: str) -> str:
        for ours, theirs in self.fields.items():
            message = re.sub(rf"`{ours}(?=[`\[])", f"`{theirs}", message)
        return message

    def answer(self, exc: GatewayError) -> Response[Any]:
        status, body = self.error(exc.status, self.renamed(exc.message), exc.code)
        return Response(body, status_code=status, headers=exc.headers or None)

    def handlers(self) -> dict[type[Exception] | int, Any]:
        """Litestar exception handlers that answer every failure on the shape's routes in its error body."""

        def gateway_error(_: Request[Any, Any, Any], exc: GatewayError) -> Response[Any]:
            return self.answer(exc)

        def http_error(_: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
            message = f"request body too large: {exc.detail}" if exc.status_code == 413 else exc.detail
            return self.answer(GatewayError(exc.status_code, message, headers=dict(exc.headers or {})))

        def validation_error(_: Request[Any, Any, Any], exc: ValidationException) -> Response[Any]:
            return self.answer(GatewayError(400, f"invalid request: {exc.detail}", code="invalid_value"))

        def internal(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
            error_id = uuid.uuid4().hex[:16]
            log.error("internal error %s on %s %s", error_id, request.method, request.url.path, exc_info=exc)
            return self.answer(GatewayError(500, f"internal error (id {error_id}); the server log has the details"))

        return {
            GatewayError: gateway_error,
            HTTPException: http_error,
            ValidationException: validation_error,
            Exception: internal,
        }


def gateway(request: Request[Any, Any, Any]) -> Gateway:
    return request.app.state.gateway  # type: ignore[no-any-return]


async def read(request: Request[Any, Any, Any], decoder: BodyDecoder) -> Any:
    """The caller's key (401, 429 as on /v1/embeddings), then the body, decoded (400 naming the field)."""
    gw = gateway(request)
    # A front worker leaves the request's charge to the runtime process, as the hot route does.
    await authorize(gw.keys, request.headers.get("authorization"), request.scope["state"], gw.link is None)
    timeout = gw.config.server.body_timeout_s
    try:
        async with asyncio.timeout(timeout):
            raw = await request.body()
    except TimeoutError:
        raise GatewayError(408, f"request body not received within {timeout:g}s", code="body_timeout") from None
    return decoder.decode(raw)


async def vectors(request: Request[Any, Any, Any], body: EmbeddingRequest) -> tuple[Any, int, service.Output]:
    """The pipeline's float vectors, token count and output for `body`, on behalf of the request's key."""
    state = request.scope["state"]
    key: ApiKey = state["api_key"]
    return await service.vectors(gateway(request), body, key, state)


def answer(request: Request[Any, Any, Any], content: bytes) -> Response[bytes]:
    """A 200 JSON answer with the headers the pipeline noted (prompt applied, inputs cut, cache hits, model)."""
    noted: dict[str, str] = request.scope["state"].get("headers") or {}
    return Response(content, media_type="application/json", headers=noted)


def model_named(gw: Gateway, name: str) -> str:
    """`name`, or, for an Ollama-style `name:latest` that no model is called, `name` without its tag."""
    if gw.registry.find(name) is None and name.endswith(":latest") and gw.registry.find(name[:-7]) is not None:
        return name[:-7]
    return name


def default_model(gw: Gateway) -> ServedModel:
    """The model a route without a `model` field serves (TEI's): the first embedding model in gateway.toml."""
    models = embedding_models(gw)
    if not models:
        raise GatewayError(404, "no embedding model is configured", code="model_not_found")
    return models[0]


def embedding_models(gw: Gateway) -> list[ServedModel]:
    """The configured models that embed (not the rerankers), in gateway.toml's order."""
    return [m for m in gw.registry.models.values() if m.spec.task == "embed"]


# -- OpenAPI ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Described:
    """A request Struct documented at `component`, with what the API enforces beyond msgspec's own schema
    (`limits`: the [server] limits) and, for a key, the values its models take (`keyed`)."""

    component: str
    struct: type[msgspec.Struct]
    limits: Callable[[Gateway, dict[str, Any]], None]
    keyed: Callable[[Gateway, ApiKey, dict[str, Any]], None]

    def schema(self, gw: Gateway, key: ApiKey | None) -> dict[str, Any]:
        body: dict[str, Any] = msgspec.json.schema(self.struct)["$defs"][self.struct.__name__]
        if self.struct.__struct_config__.forbid_unknown_fields:
            body["additionalProperties"] = False
        self.limits(gw, body["properties"])
        if key is not None:
            self.keyed(gw, key, body)
        return body


def texts_limits(gw: Gateway, prop: dict[str, Any]) -> None:
    """A `Text | list[Text]` (or `list[Text]`) property bounded by the [server] limits."""
    server = gw.config.server
    options = prop.get("anyOf", [prop])
    for one in options:
        if one.get("type") == "string":
            one["maxLength"] = server.max_input_chars
        elif one.get("type") == "array":
            one["items"]["maxLength"] = server.max_input_chars
            one["maxItems"] = server.max_items_per_request


def text_limits(gw: Gateway, prop: dict[str, Any]) -> None:
    prop["maxLength"] = gw.config.server.max_input_chars


def per_model(gw: Gateway, key: ApiKey, body: dict[str, Any], model_field: str, dims_field: str | None) -> None:
    """`model_field` narrowed to the names the key may use and, for each, `dims_field` to its own sizes."""
    props = body["properties"]
    models = [m for m in embedding_models(gw) if key.may_use(m.name)]
    names = sorted({name for m in models for name in (m.name, *m.spec.config.aliases)})
    if names:
        props[model_field]["enum"] = names
    if dims_field is None:
        return
    body.setdefault("allOf", []).extend(
        {
            "if": {"properties": {model_field: {"enum": sorted({m.name, *m.spec.config.aliases})}}},
            "then": {"properties": {dims_field: {"enum": [*sorted(m.spec.config.matryoshka_dimensions or ()), None]}}},
        }
        for m in models
    )


def describe(app: Litestar, handlers: list[HTTPRouteHandler], described: list[Described]) -> None:
    """Add `handlers` (signatures that only describe the real routes) to `app`'s OpenAPI schema, Litestar's own
    description of each, with the request bodies' schemas as the API enforces them (`refresh`)."""
    made = Litestar(route_handlers=handlers, openapi_config=app.openapi_config).openapi_schema
    schema = app.openapi_schema
    schema.paths = {**(schema.paths or {}), **(made.paths or {})}
    schema.components.schemas = {**(schema.components.schemas or {}), **(made.components.schemas or {})}
    refresh(app, described)


def refresh(app: Litestar, described: list[Described]) -> None:
    """The anonymous request schemas (no model names), as configured now; called again after a reload."""
    gw: Gateway = app.state.gateway
    for one in described:
        app.openapi_schema.components.schemas[one.component] = openapi_schema(one.schema(gw, None))
    # Litestar renders /schema from a dict it builds at the first fetch: dropped, so this reload's shows.
    app.plugins.get(OpenAPIPlugin)._openapi_schema = None
