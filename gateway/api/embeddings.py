"""POST /v1/embeddings (and /api/v3/inference/embeddings): the one hot route, as a raw ASGI handler.

Litestar's per-request handler machinery (the Request object, the kwargs and signature models, the
response object) costs more event-loop CPU than everything else an embedding request needs, and that
CPU is what a busy server takes from inference (bench/README.md, "The embeddings route"). So this route
is an ASGI handler inside the Litestar app: routing, the middleware and the exception handlers stay
Litestar's, and therefore every error answer does. What Litestar would do for a `post` handler is done
here, in this module only: the method check, the body read under the app's body limit, the decode and its
error messages (decoding.py), and the route's OpenAPI description (`document`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Annotated, Any

import msgspec
from litestar import Litestar, Request, post
from litestar._openapi.plugin import OpenAPIPlugin
from litestar.exceptions import HTTPException, MethodNotAllowedException
from litestar.handlers import asgi
from litestar.openapi.plugins import JsonRenderPlugin, OpenAPIRenderPlugin, YamlRenderPlugin
from litestar.openapi.spec import OpenAPIType, Schema
from litestar.params import HeaderParameter, JSONBody
from litestar.types import Receive, Scope, Send

from gateway.api import docs, rerank
from gateway.api.decoding import BodyDecoder
from gateway.base.asgi import client_deadline, header
from gateway.base.errors import GatewayError, error_body, error_responses
from gateway.base.schemas import EmbeddingRequest, EmbeddingResponse
from gateway.embedding import service
from gateway.embedding.state import Gateway
from gateway.runtime.registry import ServedModel
from gateway.shared.keys import ApiKey, authorize

PATHS = ["/v1/embeddings", "/api/v3/inference/embeddings"]
_DECODER = BodyDecoder(EmbeddingRequest)
_JSON = (b"content-type", b"application/json")
_ALLOW = "POST, OPTIONS"  # in a 405; the 204 to OPTIONS lists them the other way round, as Litestar's does
# Only requests still waiting after this long get a task that watches for their client hanging up: most
# finish sooner, and a task per request is a measurable share of the loop's time.
_WATCH_AFTER_S = 0.1


@asgi(PATHS, is_mount=False, copy_scope=False)
async def serve_embeddings(scope: Scope, receive: Receive, send: Send) -> None:
    """Answer one embeddings request."""
    method = scope["method"]
    if method != "POST":
        if method == "OPTIONS":
            await send({"type": "http.response.start", "status": 204, "headers": [(b"allow", b"OPTIONS, POST")]})
            await send({"type": "http.response.body", "body": b""})
            return
        raise MethodNotAllowedException(headers={"allow": _ALLOW})
    try:
        status, out = 200, await _embeddings(scope, receive)
        # What service.embed_json noted for the answer: the prompt applied, inputs cut, ...
        noted = scope["state"].get("headers") or {}
        extra = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in noted.items()]
    except GatewayError as exc:
        # Answered here rather than through Litestar's exception handlers: the same answer for a fraction of
        # the CPU, which matters when a flood is being refused (bench/README.md, "Overload").
        status, out = exc.status, msgspec.json.encode(error_body(exc.status, exc.message, exc.param, exc.code))
        extra = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in exc.headers.items()]
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [_JSON, (b"content-length", str(len(out)).encode()), *extra],
        }
    )
    await send({"type": "http.response.body", "body": out})


async def _embeddings(scope: Scope, receive: Receive) -> bytes:
    app: Litestar = scope["litestar_app"]
    gw: Gateway = app.state.gateway
    state: dict[str, Any] = scope.setdefault("state", {})
    authorization = header(scope, b"authorization")
    # A front worker leaves the request's charge to the runtime process, in the same message as its inputs.
    key = await authorize(
        gw.keys, authorization.decode("latin-1") if authorization is not None else None, state, gw.link is None
    )
    deadline_s = _client_deadline(scope)
    server = gw.config.server
    try:
        async with asyncio.timeout(server.body_timeout_s):
            raw = await _read_body(scope, receive, app.request_max_body_size)
    except TimeoutError:
        raise GatewayError(
            408, f"request body not received within {server.body_timeout_s:g}s", code="body_timeout"
        ) from None
    body = _DECODER.decode(raw)
    with _HangUpWatch(receive) as watch:
        try:
            return await service.embed_json(gw, body, key, state, deadline_s)
        except asyncio.CancelledError:
            if not watch.hung_up:
                raise
            # Cancelled because the client hung up: its inputs left the model's queue, nobody computes them.
            watch.task.uncancel()
            raise _client_closed() from None


def _client_deadline(scope: Scope) -> float | None:
    return client_deadline(header(scope, b"x-request-timeout-ms"))


def _client_closed() -> GatewayError:
    # 499 (nginx's "client closed request"): counted and logged like any answer, though nobody reads it.
    return GatewayError(499, "client closed the request", code="client_closed")


async def _read_body(scope: Scope, receive: Receive, limit: int | None) -> bytes:
    # Refused as soon as it is known to be too large, from Content-Length or from what has arrived.
    limit = limit or 2**63
    length = header(scope, b"content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise HTTPException(status_code=413)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _client_closed()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise HTTPException(status_code=413)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class _HangUpWatch:
    """Cancels the request's task when its client hangs up (noticed at most `_WATCH_AFTER_S` late)."""

    def __init__(self, receive: Receive) -> None:
        self.receive = receive
        task = asyncio.current_task()
        assert task is not None
        self.task = task
        self.hung_up = False
        self._watcher: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None

    def __enter__(self) -> _HangUpWatch:
        self._timer = asyncio.get_running_loop().call_later(_WATCH_AFTER_S, self._start)
        return self

    def __exit__(self, *exc: object) -> None:
        # No await between the request's work ending and this: a watcher cannot cancel the task after it.
        if self._timer is not None:
            self._timer.cancel()
        if self._watcher is not None:
            self._watcher.cancel()

    def _start(self) -> None:
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        # The body has been read, so the next ASGI message can only be the client going away.
        while (await self.receive())["type"] != "http.disconnect":
            pass
        self.hung_up = True
        self.task.cancel()


@post(
    PATHS,
    status_code=200,
    summary="Create embeddings",
    responses=error_responses(400, 401, 403, 404, 413, 429, 500, 503, 504),
)
async def _described(
    data: JSONBody[EmbeddingRequest],
    # `int`, not `int | None`: a header has no null, and an empty one is refused like any other non-number.
    x_request_timeout_ms: Annotated[
        int,
        HeaderParameter(
            name="X-Request-Timeout-Ms",
            ge=1,
            le=86_400_000,
            required=False,
            description="The client's own time limit: shortens the server's timeout and queue-wait limit.",
        ),
    ],
) -> EmbeddingResponse:
    """Embed one string or a list of strings with a configured model."""
    raise NotImplementedError  # never routed: it only describes `serve_embeddings` for /schema


def document(app: Litestar) -> None:
    """Add this route to `app`'s OpenAPI schema, which leaves ASGI handlers out.

    The description is Litestar's own, made from `_described` by a throwaway app with the same OpenAPI
    config, so it says exactly what a `post` handler with that signature would; the request body's schema is
    then made exact (`describe_request`).
    """
    described = Litestar(route_handlers=[_described], openapi_config=app.openapi_config).openapi_schema
    schema = app.openapi_schema
    schema.paths = {**(described.paths or {}), **(schema.paths or {})}
    schema.components.schemas = {**(described.components.schemas or {}), **(schema.components.schemas or {})}
    describe_request(app)


def describe_request(app: Litestar) -> None:
    """The request body's schema in the document everyone may read (/schema and its pages): as the API
    enforces it, but naming no model, alias, prompt or `dimensions` value (a caller without a key must not
    learn what is served; `KeyedJsonRenderPlugin` gives a key's own). Called again after each reload."""
    gw: Gateway = app.state.gateway
    app.openapi_schema.components.schemas["EmbeddingRequest"] = openapi_schema(request_schema(gw, None))
    for name, body in rerank.request_schemas(gw, None).items():
        app.openapi_schema.components.schemas[name] = openapi_schema(body)
    # Litestar renders /schema from a dict it builds at the first fetch: dropped, so this reload's shows.
    app.plugins.get(OpenAPIPlugin)._openapi_schema = None


def request_schema(gw: Gateway, key: ApiKey | None) -> dict[str, Any]:
    """EmbeddingRequest's JSON schema as the API enforces it: msgspec's own (Litestar's drops the constraints
    inside unions) and the [server] limits; with `key`, also the models it may use (names and aliases), their
    `dimensions` and their prompt names, as configured now."""
    server = gw.config.server
    body = msgspec.json.schema(EmbeddingRequest)["$defs"]["EmbeddingRequest"]
    props = body["properties"]
    text, texts = props["input"]["anyOf"]
    for one in (text, texts["items"]):
        one["maxLength"] = server.max_input_chars
    texts["maxItems"] = server.max_items_per_request
    # Only embedding models: a rerank model is refused here.
    models = [
        m for name, m in gw.registry.models.items() if key is not None and key.may_use(name) and m.spec.task == "embed"
    ]
    if key is not None:
        _the_keys_models(props, models)
    # A compact `encoding_format` is the type itself: `embedding_type` may only repeat it.
    body["allOf"] = [
        {
            "if": {"properties": {"encoding_format": {"const": kind}}, "required": ["encoding_format"]},
            "then": {"properties": {"embedding_type": {"enum": [kind, None]}}},
        }
        for kind in ("int8", "uint8", "binary", "ubinary")
    ]
    # Each model takes only its own `dimensions` and prompt names: said per model, so that a value another
    # model takes is not schema-valid for this one.
    body["allOf"].extend(_per_model(model) for model in models)
    # A prompt is chosen by name or by input type, not both.
    body["allOf"].append(
        {
            "if": {"properties": {"prompt_name": {"type": "string"}}, "required": ["prompt_name"]},
            "then": {"properties": {"input_type": {"type": "null"}}},
        }
    )
    return body


def _the_keys_models(props: dict[str, Any], models: list[ServedModel]) -> None:
    """`model`, `dimensions` and `prompt_name` narrowed to what the key's models take, all models together."""
    names = sorted({name for m in models for name in (m.name, *m.spec.config.aliases)})
    if names:
        props["model"]["enum"] = names
    dims = sorted({d for m in models for d in m.spec.config.matryoshka_dimensions or ()})
    # Each model takes only its own values (GET /v1/models lists them); none here: no model takes any.
    props["dimensions"]["anyOf"][0] = {"type": "integer", "enum": dims} if dims else {"not": {}}
    prompts = sorted({name for m in models for name in m.prompt_names()})
    props["prompt_name"]["anyOf"][0] = {"type": "string", "enum": prompts} if prompts else {"not": {}}


def _per_model(model: ServedModel) -> dict[str, Any]:
    """If the body names `model`, its `dimensions` and `prompt_name` are that model's own."""
    own = sorted({model.name, *model.spec.config.aliases})
    return {
        "if": {"properties": {"model": {"enum": own}}, "required": ["model"]},
        "then": {
            "properties": {
                "dimensions": {"enum": [*sorted(model.spec.config.matryoshka_dimensions or ()), None]},
                "prompt_name": {"enum": [*sorted(model.prompt_names()), None]},
            }
        },
    }


class KeyedJsonRenderPlugin(JsonRenderPlugin):
    """/schema/openapi.json: to a caller with a valid key, the request schema names the models that key may
    use, their `dimensions` and prompts (what a client or a fuzzer needs to build valid requests); to anyone
    else, the document without them. The HTML pages and the YAML copy are always the anonymous document."""

    def __init__(self, others: Mapping[str, Callable[[Gateway, ApiKey], dict[str, Any]]] | None = None) -> None:
        super().__init__()
        # Other routes' request schemas that name a key's models (component name -> schema for a key).
        self.others = dict(others or {})

    def render(self, request: Request[Any, Any, Any], document: dict[str, Any]) -> bytes:
        gw: Gateway = request.app.state.gateway
        try:
            key = gw.keys.check(request.headers.get("authorization"))
        except GatewayError:
            return self.render_json(request, document)
        components = document.get("components", {})
        keyed = openapi_schema(request_schema(gw, key)).to_schema()
        schemas = {**components.get("schemas", {}), "EmbeddingRequest": keyed}
        for name, body in rerank.request_schemas(gw, key).items():
            schemas[name] = openapi_schema(body).to_schema()
        for name, schema in self.others.items():
            schemas[name] = openapi_schema(schema(gw, key)).to_schema()
        return self.render_json(request, {**document, "components": {**components, "schemas": schemas}})


def render_plugins(
    others: Mapping[str, Callable[[Gateway, ApiKey], dict[str, Any]]] | None = None,
) -> list[OpenAPIRenderPlugin]:
    """The /schema page (Swagger UI, its files served by the gateway: docs.py) and the document as JSON (keyed)
    and YAML; `others`: further request schemas that a key's copy narrows to its models."""
    return [
        docs.swagger_plugin(),
        KeyedJsonRenderPlugin(others),
        YamlRenderPlugin(),
    ]


def openapi_schema(spec: dict[str, Any]) -> Schema:
    """A JSON Schema (as msgspec writes it) as Litestar's OpenAPI Schema object."""
    out: dict[str, Any] = {}
    for key, value in spec.items():
        if key in ("anyOf", "oneOf", "allOf"):
            value = [openapi_schema(v) for v in value]
        elif key in ("items", "not", "if", "then", "else"):
            value = openapi_schema(value)
        elif key == "properties":
            value = {name: openapi_schema(v) for name, v in value.items()}
        elif key == "type":
            value = OpenAPIType(value)
        out[_SCHEMA_FIELDS.get(key, key)] = value
    return Schema(**out)


_SCHEMA_FIELDS = {
    "anyOf": "any_of",
    "oneOf": "one_of",
    "allOf": "all_of",
    "not": "schema_not",
    "if": "schema_if",
    "else": "schema_else",
    "minLength": "min_length",
    "maxLength": "max_length",
    "minItems": "min_items",
    "maxItems": "max_items",
    "exclusiveMinimum": "exclusive_minimum",
    "exclusiveMaximum": "exclusive_maximum",
    "additionalProperties": "additional_properties",
    "multipleOf": "multiple_of",
}
