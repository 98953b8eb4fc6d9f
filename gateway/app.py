"""create_app(): the Litestar application."""

from __future__ import annotations

import asyncio
import base64
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pluggy
from litestar import Litestar, Request, get, post
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.exceptions import HTTPException, MethodNotAllowedException
from litestar.handlers import HTTPRouteHandler, asgi
from litestar.handlers.base import BaseRouteHandler
from litestar.middleware.base import DefineMiddleware
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.params import JSONBody
from litestar.plugins.prometheus import PrometheusController
from litestar.response import Response
from litestar.types import Receive, Scope, Send

from . import schemas
from .auth import ApiKey, KeyStore
from .backend import Backend
from .batching import BatchFailed, QueueFull
from .config import ConfigError, GatewayConfig, load_config
from .decoding import BodyDecoder
from .errors import EXCEPTION_HANDLERS, GatewayError
from .observability import ACCESS_LOG, QUEUES, RequestContextMiddleware, header, new_id
from .plugins import collect_backends, get_plugin_manager
from .registry import Registry, ServedModel, build_specs
from .schemas import (
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    ErrorResponse,
    Health,
    ModelCard,
    ModelList,
    ReloadResult,
    Usage,
)

log = logging.getLogger("gateway")


# [server] settings fixed when the server starts (the others follow a reload).
_RESTART_FIELDS = ("host", "port", "max_body_bytes", "access_log", "log_level")


class Gateway:
    """Everything a request needs, kept on `app.state.gateway`.

    `config`, `keys` and `registry` are replaced whole on reload (one assignment each, on the event loop),
    so a request sees either the old or the new set, never a mix within one lookup.
    """

    def __init__(
        self,
        config: GatewayConfig,
        backends: dict[str, type[Backend]],
        *,
        keys: KeyStore | None = None,
        fallback_keys: KeyStore | None = None,
        config_path: str | None = None,
    ) -> None:
        self.config = config
        self.backends = backends
        self.config_path = config_path
        # `keys` given by the caller stay fixed; otherwise keys come from config (and follow reloads), and
        # `fallback_keys` (the key generated at start) serve while the config names none.
        self._fixed_keys = keys
        self._fallback_keys = fallback_keys
        self.keys = KeyStore()
        self.keys = self._keys_for(config)
        self.registry = Registry(build_specs(config, backends, config_path or "<config>"))
        # Fixed at start, like the rest of _RESTART_FIELDS.
        self.max_body_bytes = config.server.max_body_bytes
        self._reload_lock = asyncio.Lock()

    def _keys_for(self, config: GatewayConfig) -> KeyStore:
        if self._fixed_keys is not None:
            return self._fixed_keys
        keys = KeyStore.from_config(config.auth, previous=self.keys)
        return keys if keys or self._fallback_keys is None else self._fallback_keys

    async def reload(self) -> ReloadResult:
        """Re-read the config file: load new/changed models beside the old ones, swap, retire the old."""
        if self.config_path is None:
            raise ConfigError("this gateway was not started from a config file; nothing to reload")
        async with self._reload_lock:
            loop = asyncio.get_running_loop()
            config = await loop.run_in_executor(None, load_config, self.config_path)
            specs = build_specs(config, self.backends, self.config_path)
            old = self.registry
            new = Registry(specs, reuse=old.models)
            previous = {id(m) for m in old.models.values()}
            fresh = [m for m in new.models.values() if id(m) not in previous]
            # Loaded off the loop, one at a time, while the old models keep serving.
            await loop.run_in_executor(None, lambda: [m.load() for m in fresh])
            kept_old: list[str] = []
            for m in fresh:
                prior = old.models.get(m.name)
                if m.state == "failed" and prior is not None and prior.state == "ready":
                    # A changed model that fails to load must not replace a working one.
                    log.error(
                        "reload: model %r failed to load (%s); the previous version keeps serving", m.name, m.error
                    )
                    new.replace(prior)
                    kept_old.append(m.name)
            restart = [f for f in _RESTART_FIELDS if getattr(config.server, f) != getattr(self.config.server, f)]
            if restart:
                log.warning("reload: [server] %s changed; that takes a restart to apply", ", ".join(restart))
            self.config = config
            self.keys = self._keys_for(config)
            self.registry = new
            live = {id(m) for m in new.models.values()}
            retired = [m for m in old.models.values() if id(m) not in live]
            for m in retired:
                m.retire_in_background(config.server.request_timeout_s)
            result = ReloadResult(
                status="reloaded",
                added=sorted(n for n in new.models if n not in old.models),
                changed=sorted(m.name for m in fresh if m.name in old.models and m.name not in kept_old),
                removed=sorted(n for n in old.models if n not in new.models),
                failed={m.name: m.error or "" for m in fresh if m.state == "failed"},
                models={n: m.state for n, m in new.models.items()},
            )
            log.info("config reloaded: %s", msgspec.json.encode(result).decode())
            return result


def _gateway(connection: ASGIConnection[Any, Any, Any, Any]) -> Gateway:
    return connection.app.state.gateway  # type: ignore[no-any-return]


def _authorize(gw: Gateway, authorization: str | None, state: dict[str, Any]) -> None:
    # A valid bearer key, which then counts one request against its limit.
    key = gw.keys.check(authorization)
    state["api_key"] = key
    key.charge_request()


async def require_key(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Guard: a valid bearer key, which then counts one request against its limit."""
    _authorize(_gateway(connection), connection.headers.get("authorization"), connection.scope["state"])


async def require_admin(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """Guard: a valid key with admin rights."""
    await require_key(connection, handler)
    if not connection.scope["state"]["api_key"].admin:
        raise GatewayError(403, "this API key may not use admin endpoints", code="forbidden")


def _errors(*statuses: int) -> dict[int, ResponseSpec]:
    return {s: ResponseSpec(data_container=ErrorResponse, description="OpenAI-shaped error") for s in statuses}


def _texts(body: EmbeddingRequest, max_items: int, max_chars: int) -> list[str]:
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts:
        raise GatewayError(400, "`input` must not be an empty list", param="input", code="empty_input")
    if len(texts) > max_items:
        raise GatewayError(
            400,
            f"`input` has {len(texts)} items; the limit is {max_items} per request",
            param="input",
            code="too_many_inputs",
        )
    for i, text in enumerate(texts):
        where = "input" if isinstance(body.input, str) else f"input[{i}]"
        if not text:
            raise GatewayError(400, f"`{where}` is an empty string", param=where, code="empty_input")
        if len(text) > max_chars:
            raise GatewayError(
                400,
                f"`{where}` has {len(text)} characters; the limit is {max_chars} characters per input",
                param=where,
                code="input_too_long",
            )
    return texts


def _dimensions(requested: int | None, model: ServedModel) -> int | None:
    if requested is None:
        return None
    allowed = model.spec.config.matryoshka_dimensions
    assert model.info is not None
    if allowed is None:
        raise GatewayError(
            400,
            f"model {model.name!r} does not support `dimensions` (it is not configured as Matryoshka)",
            param="dimensions",
            code="dimensions_not_supported",
        )
    if requested < 1:
        raise GatewayError(
            400,
            f"`dimensions` must be a positive integer, got {requested}",
            param="dimensions",
            code="invalid_dimensions",
        )
    if requested > model.info.dimension:
        raise GatewayError(
            400,
            f"`dimensions` {requested} is larger than the model's dimension {model.info.dimension}",
            param="dimensions",
            code="invalid_dimensions",
        )
    if requested not in allowed:
        raise GatewayError(
            400,
            f"`dimensions` {requested} is not allowed for model {model.name!r}; allowed: {sorted(allowed)}",
            param="dimensions",
            code="invalid_dimensions",
        )
    return requested


def _check_tokens(texts: list[str], counts: list[int], model: ServedModel, max_total: int) -> int:
    limit = model.max_input_tokens
    for i, n in enumerate(counts):
        if n > limit:
            where = "input" if len(texts) == 1 else f"input[{i}]"
            raise GatewayError(
                400,
                f"`{where}` has {n} tokens; model {model.name!r} accepts at most {limit} tokens per input",
                param=where,
                code="input_too_long",
            )
    total = sum(counts)
    if total > max_total:
        raise GatewayError(
            400,
            f"request has {total} tokens in all; the limit is {max_total} tokens per request",
            param="input",
            code="too_many_tokens",
        )
    return total


# Above this many floats, building and encoding the response moves off the event loop (2048 x 1024 floats
# take about 100 ms of CPU; a single vector takes microseconds, less than the hop to a thread).
_OFFLOAD_FLOATS = 32_768


def _encode(vectors: np.ndarray, fmt: str) -> list[EmbeddingData]:
    if fmt == "base64":
        # Little-endian float32 bytes: what the official OpenAI client decodes; bit-exact.
        raw = vectors.astype("<f4", copy=False)
        return [EmbeddingData(embedding=base64.b64encode(row.tobytes()).decode(), index=i) for i, row in enumerate(raw)]
    # A float32 widened to a double prints 17 digits; 9 decimals (absolute error <= 5e-10, below float32's
    # resolution near 1) make the JSON a third smaller for the same vectors.
    rows = np.round(vectors.astype(np.float64), 9).tolist()
    return [EmbeddingData(embedding=row, index=i) for i, row in enumerate(rows)]


async def _embed(gw: Gateway, body: EmbeddingRequest, state: dict[str, Any] | None = None) -> EmbeddingResponse:
    state = state if state is not None else {}
    server = gw.config.server
    key: ApiKey | None = state.get("api_key")
    model = gw.registry.resolve(body.model, key)
    if key is not None and not key.may_use(model.name):
        raise GatewayError(
            403, f"this API key may not use model {body.model!r}", param="model", code="model_not_allowed"
        )
    state["model"] = model.name
    texts = _texts(body, server.max_items_per_request, server.max_input_chars)
    queue_limit = model.spec.config.batching.max_queue
    if len(texts) > queue_limit:
        raise GatewayError(
            400,
            f"`input` has {len(texts)} items; model {model.name!r} queues at most {queue_limit} inputs",
            param="input",
            code="too_many_inputs",
        )
    charged = 0
    with model.in_use():
        try:
            async with asyncio.timeout(server.request_timeout_s):
                await model.ready(server.request_timeout_s)
                dims = _dimensions(body.dimensions, model)
                counts, token_ids = await model.tokenize(texts)
                total = _check_tokens(texts, counts, model, server.max_tokens_per_request)
                if key is not None:
                    key.charge_tokens(total)
                    charged = total
                log.debug("embedding %d texts on %r: %r", len(texts), model.name, texts)
                vectors = await model.embed(texts, counts, token_ids)
                charged = 0  # delivered: the charge stands
        except TimeoutError:
            raise GatewayError(
                504,
                f"request did not finish within {server.request_timeout_s:g}s (model {model.name!r})",
                code="timeout",
            ) from None
        except QueueFull as exc:
            raise GatewayError(
                429, str(exc), code="queue_full", headers={"Retry-After": str(exc.retry_after)}
            ) from None
        except BatchFailed as exc:
            error_id = uuid.uuid4().hex[:16]
            log.error("request failed (error id %s): %s", error_id, exc)
            raise GatewayError(500, f"{exc} (error id {error_id})", code=error_id) from None
        finally:
            # Timed out, refused (queue full), failed or cancelled after the charge: no embeddings, no cost.
            if charged and key is not None:
                key.refund_tokens(charged)
    state["tokens"] = total
    state["inputs"] = len(texts)
    if dims is not None:
        vectors = vectors[:, :dims]
        assert model.info is not None
        if model.info.normalized:
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors = vectors / np.maximum(norms, 1e-12)
    return EmbeddingResponse(
        id=f"embed-{new_id()}",
        data=(
            await asyncio.get_running_loop().run_in_executor(None, _encode, vectors, body.encoding_format)
            if vectors.size > _OFFLOAD_FLOATS
            else _encode(vectors, body.encoding_format)
        ),
        model=body.model,
        created=int(time.time()),
        usage=Usage(prompt_tokens=total, total_tokens=total),
    )


_EMBEDDINGS_PATHS = ["/v1/embeddings", "/api/v3/inference/embeddings"]
_REQUEST_DECODER = BodyDecoder(EmbeddingRequest)
_JSON_HEADERS = [(b"content-type", b"application/json")]


@asgi(_EMBEDDINGS_PATHS, is_mount=False, copy_scope=False)
async def serve_embeddings(scope: Scope, receive: Receive, send: Send) -> None:
    """POST /v1/embeddings: an ASGI handler, not a Litestar `post` handler.

    Litestar's per-request handler machinery (kwargs and signature models, the response object, guards)
    was a third of the event loop's CPU per embedding request, and that CPU is what a busy server takes from
    inference (bench/overhead.py; bench/README.md). Routing, the middleware, the exception handlers and
    therefore every error response stay Litestar's; the route's OpenAPI description comes from
    `create_embeddings`. Written by hand: the method check, the body read under its size limit and the
    decode, each raising what Litestar raised, so clients see the same answers.
    """
    method = scope["method"]
    if method != "POST":
        if method == "OPTIONS":
            await send({"type": "http.response.start", "status": 204, "headers": [(b"allow", b"OPTIONS, POST")]})
            await send({"type": "http.response.body", "body": b""})
            return
        raise MethodNotAllowedException(headers={"allow": "POST, OPTIONS"})
    gw: Gateway = scope["app"].state.gateway
    state: dict[str, Any] = scope.setdefault("state", {})
    authorization = header(scope, b"authorization")
    _authorize(gw, authorization.decode("latin-1") if authorization is not None else None, state)
    body = await _read_body(scope, receive, gw.max_body_bytes)
    data = _REQUEST_DECODER.decode(body)
    with _HangUpWatch(receive) as watch:
        try:
            result = await _embed(gw, data, state)
        except asyncio.CancelledError:
            if not watch.hung_up:
                raise
            # Cancelled because the client hung up: its inputs left the model's queue, nobody computes them.
            watch.task.uncancel()
            raise _client_closed() from None
    if len(result.data) * len(result.data[0].embedding) > _OFFLOAD_FLOATS:
        out = await asyncio.get_running_loop().run_in_executor(None, msgspec.json.encode, result)
    else:
        out = msgspec.json.encode(result)
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [*_JSON_HEADERS, (b"content-length", str(len(out)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": out})


def _client_closed() -> GatewayError:
    # 499 (nginx's "client closed request"): counted and logged like any answer, though nobody reads it.
    return GatewayError(499, "client closed the request", code="client_closed")


async def _read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    # Refused as soon as it is known to be too large, from Content-Length or from what has arrived.
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


@post(
    _EMBEDDINGS_PATHS,
    status_code=200,
    summary="Create embeddings",
    responses=_errors(400, 401, 403, 404, 413, 429, 500, 503, 504),
)
async def create_embeddings(data: JSONBody[EmbeddingRequest]) -> EmbeddingResponse:
    """Embed one string or a list of strings with a configured model."""
    # Never routed: it describes `serve_embeddings` (an ASGI handler, which Litestar leaves out of the
    # schema) for /schema; see _describe().
    raise NotImplementedError


def _describe(app: Litestar, *handlers: HTTPRouteHandler) -> None:
    # Litestar's own schema for `handlers`, built by a throwaway app with the same OpenAPI config, merged
    # into the app's schema (which is built once, here, and then served as it is).
    described = Litestar(route_handlers=list(handlers), openapi_config=app.openapi_config).openapi_schema
    schema = app.openapi_schema
    schema.paths = {**(described.paths or {}), **(schema.paths or {})}
    schema.components.schemas = {**(described.components.schemas or {}), **(schema.components.schemas or {})}


class _HangUpWatch:
    """Cancels the request's task when its client hangs up.

    Only requests still waiting after `_WATCH_AFTER_S` get a watcher task: most finish sooner, and a task per
    request was a measurable share of the loop's time (a hang-up is then noticed at most that much later).
    """

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


_WATCH_AFTER_S = 0.1


def _card(model: ServedModel) -> ModelCard:
    cfg = model.spec.config
    info = model.info
    return ModelCard(
        id=model.name,
        created=model.created,
        backend=cfg.backend,
        ready=model.state == "ready",
        state=model.state,  # type: ignore[arg-type]
        dimension=info.dimension if info else None,
        max_input_tokens=model.max_input_tokens if info else cfg.max_input_tokens,
        matryoshka_dimensions=cfg.matryoshka_dimensions,
        aliases=list(cfg.aliases),
        error=model.error,
    )


@get(["/v1/models", "/api/v3/inference/models"], guards=[require_key], responses=_errors(401, 429))
async def list_models(request: Request[Any, Any, Any]) -> ModelList:
    """The models this key may use, and what each can do."""
    key: ApiKey = request.scope["state"]["api_key"]
    models = _gateway(request).registry.models.values()
    return ModelList(data=[_card(m) for m in models if key.may_use(m.name)])


@get("/health", summary="Liveness")
async def health() -> Health:
    """Answers while the process serves HTTP (no auth)."""
    return Health(status="ok")


@get("/ready", summary="Readiness", responses={503: ResponseSpec(data_container=Health)})
async def ready(request: Request[Any, Any, Any]) -> Response[Health]:
    """200 when every configured model is loaded; 503 listing the state of each."""
    states = {name: m.state for name, m in _gateway(request).registry.models.items()}
    ok = all(s == "ready" for s in states.values())
    return Response(Health(status="ready" if ok else "not ready", models=states), status_code=200 if ok else 503)


@post("/admin/reload", status_code=200, guards=[require_admin], responses=_errors(400, 401, 403))
async def admin_reload(request: Request[Any, Any, Any]) -> ReloadResult:
    """Re-read gateway.toml now (as SIGHUP does); an invalid config is refused and the running one kept."""
    try:
        return await _gateway(request).reload()
    except ConfigError as exc:
        log.error("reload refused: %s", exc)
        raise GatewayError(400, f"reload refused, the running config is kept: {exc}", code="invalid_config") from None


class MetricsController(PrometheusController):
    """Prometheus text format at /metrics (kept out of the JSON API's schema: it is not JSON)."""

    include_in_schema = False


def _strict_request_schemas(app: Litestar) -> None:
    # Litestar's Struct schemas omit forbid_unknown_fields; say it, so clients and fuzzers know unknown
    # fields are refused.
    components = app.openapi_schema.components
    for name, schema in (components.schemas or {}).items():
        struct = getattr(schemas, name, None)
        if (
            isinstance(struct, type)
            and issubclass(struct, msgspec.Struct)
            and struct.__struct_config__.forbid_unknown_fields
        ):
            schema.additional_properties = False


def create_app(
    config: GatewayConfig,
    *,
    plugin_manager: pluggy.PluginManager | None = None,
    keys: KeyStore | None = None,
    fallback_keys: KeyStore | None = None,
    config_path: str | Path | None = None,
) -> Litestar:
    """Build the app; models load in the background once it starts (see /ready).

    `keys`: fixed keys (config keys ignored); `fallback_keys`: used while the config names no key.
    """
    pm = plugin_manager or get_plugin_manager()
    gateway = Gateway(
        config,
        collect_backends(pm),
        keys=keys,
        fallback_keys=fallback_keys,
        config_path=str(config_path) if config_path is not None else None,
    )
    QUEUES.gateways.add(gateway)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        gateway.registry.load_all()
        _strict_request_schemas(app)
        reload_tasks: set[asyncio.Task[Any]] = set()

        async def on_sighup() -> None:
            try:
                await gateway.reload()
            except ConfigError as exc:
                log.error("reload refused, the running config is kept: %s", exc)

        def sighup() -> None:
            task = loop.create_task(on_sighup())
            reload_tasks.add(task)
            task.add_done_callback(reload_tasks.discard)

        # Only the main thread may own signals (a test client runs the app in another thread).
        with suppress(ValueError, RuntimeError, NotImplementedError):
            loop.add_signal_handler(signal.SIGHUP, sighup)
        try:
            yield
        finally:
            with suppress(ValueError, RuntimeError, NotImplementedError):
                loop.remove_signal_handler(signal.SIGHUP)
            # Queued work finishes before models are released (graceful shutdown).
            await loop.run_in_executor(None, gateway.registry.close)
            QUEUES.gateways.discard(gateway)
            ACCESS_LOG.flush()

    # Request ids, the access log and the HTTP metrics in one middleware (see gateway/observability.py).
    middleware = [DefineMiddleware(RequestContextMiddleware, log_requests=config.server.access_log)]
    app = Litestar(
        route_handlers=[serve_embeddings, list_models, health, ready, admin_reload, MetricsController],
        exception_handlers=EXCEPTION_HANDLERS,
        request_max_body_size=config.server.max_body_bytes,
        middleware=middleware,
        lifespan=[lifespan],
        state=State({"gateway": gateway}),
        openapi_config=OpenAPIConfig(title="Embedding gateway", version="0.1.0", path="/schema"),
    )
    _describe(app, create_embeddings)
    return app
