"""create_app(): the Litestar application."""

from __future__ import annotations

import asyncio
import base64
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import pluggy
from litestar import Litestar, Request, get, post
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.handlers.base import BaseRouteHandler
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.params import JSONBody
from litestar.response import Response

from .auth import KeyStore
from .batching import BatchFailed, QueueFull
from .config import GatewayConfig
from .errors import EXCEPTION_HANDLERS, GatewayError
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
    Usage,
)

log = logging.getLogger("gateway")


class Gateway:
    """Everything a request needs, kept on `app.state.gateway`; `registry` is swapped whole on reload."""

    def __init__(self, config: GatewayConfig, registry: Registry, keys: KeyStore) -> None:
        self.config = config
        self.registry = registry
        self.keys = keys


def _gateway(connection: ASGIConnection[Any, Any, Any, Any]) -> Gateway:
    return connection.app.state.gateway  # type: ignore[no-any-return]


def require_key(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Guard: a valid bearer key."""
    _gateway(connection).keys.check(connection.headers.get("authorization"))


def _errors(*statuses: int) -> dict[int, ResponseSpec]:
    return {s: ResponseSpec(data_container=ErrorResponse, description="OpenAI-shaped error") for s in statuses}


def _texts(body: EmbeddingRequest, max_items: int) -> list[str]:
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
        if not text:
            where = "input" if isinstance(body.input, str) else f"input[{i}]"
            raise GatewayError(400, f"`{where}` is an empty string", param=where, code="empty_input")
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


def _encode(vectors: np.ndarray, fmt: str) -> list[EmbeddingData]:
    if fmt == "base64":
        # Little-endian float32 bytes: what the official OpenAI client decodes.
        raw = vectors.astype("<f4", copy=False)
        return [EmbeddingData(embedding=base64.b64encode(row.tobytes()).decode(), index=i) for i, row in enumerate(raw)]
    return [EmbeddingData(embedding=row, index=i) for i, row in enumerate(vectors.tolist())]


async def _embed(gw: Gateway, body: EmbeddingRequest) -> EmbeddingResponse:
    server = gw.config.server
    model = gw.registry.resolve(body.model)
    texts = _texts(body, server.max_items_per_request)
    try:
        async with asyncio.timeout(server.request_timeout_s):
            await model.ready(server.request_timeout_s)
            dims = _dimensions(body.dimensions, model)
            counts = await model.count_tokens(texts)
            total = _check_tokens(texts, counts, model, server.max_tokens_per_request)
            vectors = await model.embed(texts, counts)
    except TimeoutError:
        raise GatewayError(
            504,
            f"request did not finish within {server.request_timeout_s:g}s (model {model.name!r})",
            code="timeout",
        ) from None
    except QueueFull as exc:
        raise GatewayError(429, str(exc), code="queue_full", headers={"Retry-After": str(exc.retry_after)}) from None
    except BatchFailed as exc:
        error_id = uuid.uuid4().hex[:16]
        log.error("request failed (error id %s): %s", error_id, exc)
        raise GatewayError(500, f"{exc} (error id {error_id})", code=error_id) from None
    if dims is not None:
        vectors = vectors[:, :dims]
        assert model.info is not None
        if model.info.normalized:
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors = vectors / np.maximum(norms, 1e-12)
    return EmbeddingResponse(
        id=f"embed-{uuid.uuid4().hex}",
        data=_encode(vectors, body.encoding_format),
        model=body.model,
        created=int(time.time()),
        usage=Usage(prompt_tokens=total, total_tokens=total),
    )


@post(
    ["/v1/embeddings", "/api/v3/inference/embeddings"],
    status_code=200,
    guards=[require_key],
    summary="Create embeddings",
    responses=_errors(400, 401, 404, 413, 429, 500, 503, 504),
)
async def create_embeddings(request: Request[Any, Any, Any], data: JSONBody[EmbeddingRequest]) -> EmbeddingResponse:
    """Embed one string or a list of strings with a configured model."""
    return await _embed(_gateway(request), data)


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


@get(["/v1/models", "/api/v3/inference/models"], guards=[require_key], responses=_errors(401))
async def list_models(request: Request[Any, Any, Any]) -> ModelList:
    """Configured models and what each can do."""
    return ModelList(data=[_card(m) for m in _gateway(request).registry.models.values()])


@get("/health", summary="Liveness")
async def health() -> Health:
    """Answers while the process serves HTTP (no auth)."""
    return Health(status="ok")


@get("/ready", summary="Readiness", responses={503: ResponseSpec(data_container=Health)})
async def ready(request: Request[Any, Any, Any]) -> Response[Health]:
    """200 when every configured model is loaded; 503 listing the ones that are not."""
    states = {name: m.state for name, m in _gateway(request).registry.models.items()}
    ok = all(s == "ready" for s in states.values())
    return Response(Health(status="ready" if ok else "not ready", models=states), status_code=200 if ok else 503)


def create_app(
    config: GatewayConfig,
    *,
    plugin_manager: pluggy.PluginManager | None = None,
    keys: KeyStore | None = None,
) -> Litestar:
    """Build the app; models load in the background once it starts (see /ready)."""
    pm = plugin_manager or get_plugin_manager()
    specs = build_specs(config, collect_backends(pm))
    gateway = Gateway(config, Registry(specs), keys if keys is not None else KeyStore.from_config(config.auth.api_keys))

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        gateway.registry.load_all()
        try:
            yield
        finally:
            # Queued work finishes before models are released (graceful shutdown).
            await asyncio.get_running_loop().run_in_executor(None, gateway.registry.close)

    return Litestar(
        route_handlers=[create_embeddings, list_models, health, ready],
        exception_handlers=EXCEPTION_HANDLERS,
        request_max_body_size=config.server.max_body_bytes,
        lifespan=[lifespan],
        state=State({"gateway": gateway}),
        openapi_config=OpenAPIConfig(title="Embedding gateway", version="0.1.0", path="/schema"),
    )
