"""The routes besides embeddings: model list, liveness, readiness, reload and metrics."""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from litestar import Request, get, post
from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler
from litestar.openapi import ResponseSpec
from litestar.params import FromQuery, JSONBody
from litestar.plugins.prometheus import PrometheusController
from litestar.response import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from gateway.base.circuit import CircuitState
from gateway.base.config import ConfigError
from gateway.base.errors import GatewayError, error_responses
from gateway.base.schemas import (
    CacheClear,
    CacheCleared,
    Health,
    ModelCard,
    ModelLimits,
    ModelList,
    ModelRuntime,
    ModelRuntimeList,
    ReloadResult,
)
from gateway.embedding import check
from gateway.embedding.state import Gateway
from gateway.runtime.link import CacheClearArgs
from gateway.runtime.registry import ModelState, ServedModel
from gateway.shared.keys import ApiKey, authorize

log = logging.getLogger("gateway")


def _gateway(connection: ASGIConnection[Any, Any, Any, Any]) -> Gateway:
    return connection.app.state.gateway  # type: ignore[no-any-return]


async def require_key(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Guard: a valid bearer key, which then counts one request against its limit."""
    await authorize(_gateway(connection).keys, connection.headers.get("authorization"), connection.scope["state"])


async def require_admin(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """Guard: a valid key with admin rights."""
    await require_key(connection, handler)
    if not connection.scope["state"]["api_key"].admin:
        raise GatewayError(403, "this API key may not use admin endpoints", code="forbidden")


def _card(model: ServedModel, state: str | None = None) -> ModelCard:
    """`model`'s card; `state`: its state as the whole server sees it, when not the local model's."""
    cfg = model.spec.config
    info = model.info
    state = state or model.state.value
    return ModelCard(
        id=model.name,
        created=model.created,
        backend=cfg.backend,
        ready=state == ModelState.READY,
        state=state,  # type: ignore[arg-type]
        dimension=info.dimension if info else None,
        max_input_tokens=model.max_input_tokens if info else cfg.max_input_tokens,
        matryoshka_dimensions=cfg.matryoshka_dimensions,
        aliases=list(cfg.aliases),
        prompts=dict(model.prompts) if info else dict(cfg.prompts or {}),
        default_prompt_name=model.default_prompt_name if info else cfg.default_prompt_name,
        truncate=cfg.truncate,
        fallbacks=list(cfg.fallbacks),
        embedding_space=cfg.embedding_space,
        error=model.public_error,
        task=model.spec.task,
        score_activation=info.score_activation if info and info.task == "rerank" else msgspec.UNSET,
    )


@get(["/v1/models", "/api/v3/inference/models"], guards=[require_key], responses=error_responses(401, 429))
async def list_models(request: Request[Any, Any, Any]) -> ModelList:
    """The models this key may use, and what each can do."""
    key: ApiKey = request.scope["state"]["api_key"]
    gw = _gateway(request)
    if gw.link is not None:
        listed = await gw.link.call("models", key.digest, ModelList)
        # A per-worker model is described by this front's own copy (the runtime does not load it), with the
        # state of all the fronts' copies together.
        mine = gw.registry.models
        listed.data = [
            _card(mine[c.id], c.state) if c.id in mine and not mine[c.id].elsewhere else c for c in listed.data
        ]
        return listed
    return model_list(gw, key)


def model_list(gw: Gateway, key: ApiKey) -> ModelList:
    """The models `key` may use, as loaded here."""
    return ModelList(data=[_card(m, gw.state_of(m)[0]) for m in gw.registry.models.values() if key.may_use(m.name)])


@get("/admin/models", guards=[require_admin], responses=error_responses(401, 403, 429))
async def admin_models(request: Request[Any, Any, Any]) -> ModelRuntimeList:
    """Every configured model as an operator sees it: its card, where its batches run (in-process, a placement's
    replicas, a remote upstream), replicas ready, circuit, queue depth and predicted wait, and its limits."""
    gw = _gateway(request)
    if gw.link is not None:
        return await gw.link.call("admin_models", None, ModelRuntimeList)
    return model_runtimes(gw)


_CIRCUIT = {CircuitState.CLOSED: "closed", CircuitState.HALF_OPEN: "half-open", CircuitState.OPEN: "open"}


def model_runtimes(gw: Gateway) -> ModelRuntimeList:
    """Each model's card with its live figures (the same the metrics' gauges report) and configured limits."""
    data = []
    for status in gw.model_status():
        model = gw.registry.models[status.name]
        cfg = model.spec.config
        b, c = cfg.batching, cfg.circuit
        limits = ModelLimits(
            max_batch_size=b.max_batch_size,
            max_batch_tokens=b.max_batch_tokens,
            max_wait_ms=b.max_wait_ms,
            max_queue_wait_ms=b.max_queue_wait_ms,
            max_queue=b.max_queue,
            circuit_failures=c.failures,
            circuit_open_s=c.open_s,
        )
        replicas = status.replicas or (None, None)
        data.append(
            ModelRuntime(
                id=status.name,
                placement="remote" if cfg.backend == "remote" else model.spec.placement_cls.name,
                replicas_ready=replicas[0],
                replicas=replicas[1],
                circuit=_CIRCUIT[CircuitState(status.circuit)],  # type: ignore[arg-type]
                queue_depth=status.queued,
                predicted_wait_s=status.predicted_wait_s,
                limits=limits,
                card=_card(model, gw.state_of(model)[0]),
            )
        )
    return ModelRuntimeList(data=data)


@get("/health", summary="Liveness")
async def health() -> Health:
    """Answers while the process serves HTTP (no auth)."""
    return Health(status="ok")


@get("/ready", summary="Readiness", responses={503: ResponseSpec(data_container=Health)})
async def ready(request: Request[Any, Any, Any]) -> Response[Health]:
    """200 when every configured model is loaded, else 503 (no auth); with a valid key, the state of each model
    that key may use."""
    gw = _gateway(request)
    try:
        key: ApiKey | None = gw.keys.check(request.headers.get("authorization"))
    except GatewayError:
        key = None  # orchestrators probe without a key: they get the status, not the model names
    if gw.link is not None:
        health = await gw.link.call("ready", key.digest if key is not None else None, Health)
    else:
        health = readiness(gw, key)
    return Response(health, status_code=200 if health.status == "ready" else 503)


def readiness(gw: Gateway, key: ApiKey | None) -> Health:
    """ "ready" when every configured model is loaded here; each model's state, for a key that may use it."""
    seen = {name: gw.state_of(m) for name, m in gw.registry.models.items()}
    ok = all(state == ModelState.READY for state, _ in seen.values())
    states = {name: state for name, (state, _) in seen.items() if key is not None and key.may_use(name)}
    # Ray replicas, or (with workers) the front workers' copies of a per-worker model.
    replicas = {name: f"{r[0]}/{r[1]}" for name in states if (r := seen[name][1]) is not None}
    return Health(status="ready" if ok else "not ready", models=states, replicas=replicas or msgspec.UNSET)


@post("/admin/reload", status_code=200, guards=[require_admin], responses=error_responses(400, 401, 403))
async def admin_reload(request: Request[Any, Any, Any]) -> ReloadResult:
    """Re-read gateway.toml now (as SIGHUP does); an invalid config is refused and the running one kept."""
    gw = _gateway(request)
    if gw.link is not None:
        return await gw.link.call("reload", None, ReloadResult)
    try:
        return await gw.reload()
    except ConfigError as exc:
        log.error("reload refused: %s", exc)
        raise GatewayError(400, f"reload refused, the running config is kept: {exc}", code="invalid_config") from None


@post("/admin/cache/clear", status_code=200, guards=[require_admin], responses=error_responses(400, 401, 403, 404, 503))
async def admin_cache_clear(request: Request[Any, Any, Any], data: JSONBody[CacheClear | None] = None) -> CacheCleared:
    """Remove cached vectors: of one model (`{"model": NAME}`; entries it shares with other names of the same
    weights go too) or all of this gateway's."""
    gw = _gateway(request)
    name = data.model if data is not None else None
    if gw.link is not None:
        identity = None
        if name is not None and (model := gw.registry.find(name)) is not None and not model.elsewhere:
            # A per-worker model: the runtime does not load it, and clears its entries by this copy's name for
            # them (every front's copy has the same).
            identity = _identity(model)
        return await gw.link.call("cache_clear", CacheClearArgs(name, identity), CacheCleared)
    return await clear_cache(gw, name)


def _identity(model: ServedModel) -> bytes:
    if model.identity is None:
        raise GatewayError(
            400,
            f"model {model.name!r} is not cached (not loaded, or `cache = false`)",
            param="model",
            code="not_cached",
        )
    return model.identity


async def clear_cache(gw: Gateway, name: str | None, identity: bytes | None = None) -> CacheCleared:
    """Remove the cached vectors of model `name` (and of other names of its weights), or all of them;
    `identity`: a front's per-worker model's, found there."""
    if gw.cache is None:
        raise GatewayError(400, 'the cache is off (`[cache] store = "off"`)', code="cache_off")
    if name is not None and identity is None:
        identity = _identity(gw.registry.resolve(name))
    try:
        removed = await gw.cache.clear(identity)
    except Exception as exc:  # Redis unreachable: the operator must know the entries are still there
        log.error("cache clear failed: %s: %s", type(exc).__name__, exc)
        raise GatewayError(
            503, f"the cache store could not be cleared: {type(exc).__name__}", code="cache_unavailable"
        ) from None
    log.info("cache cleared (%s): %d entries", name or "all models", removed)
    return CacheCleared(removed=removed)


async def metrics_guard(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """Guard: a valid key for /metrics when `[server] metrics_require_key` says so."""
    if _gateway(connection).config.server.metrics_require_key:
        await require_key(connection, handler)


class MetricsController(PrometheusController):
    """Prometheus text format at /metrics (kept out of the JSON API's schema: it is not JSON)."""

    include_in_schema = False
    guards = [metrics_guard]  # noqa: RUF012 - Litestar reads the class attribute


# Out of the OpenAPI schema: its parameters name configured models, which a static schema cannot list, so it
# would call requests valid that answer 404 (docs/api.md describes it).
@get("/admin/check", guards=[require_admin], include_in_schema=False)
async def admin_check(
    request: Request[Any, Any, Any], models: FromQuery[list[str] | None] = None, against: FromQuery[str | None] = None
) -> check.CheckReport:
    """`gateway check` on this server: each model (`models`, default all) against its reference (`against`, or
    the first model of its `embedding_space`): tokens equal, min/mean cosine, Spearman on the bundled pairs."""
    gw = _gateway(request)
    if gw.link is not None:
        # With workers the runtime process holds the models; the check runs there.
        return await gw.link.call("check", check.CheckArgs(models, against), check.CheckReport)
    return await check.run(gw, models, against)


@get("/metrics", guards=[metrics_guard], include_in_schema=False)
async def front_metrics(request: Request[Any, Any, Any]) -> Response[bytes]:
    """/metrics of a front worker: every process' counters and histograms summed (prometheus_client's
    multiprocess mode: the supervisor gives all of them one private folder), and the runtime's model gauges."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    link = _gateway(request).link
    assert link is not None
    text = generate_latest(registry) + await link.call("gauges", None, bytes)
    return Response(text, media_type=CONTENT_TYPE_LATEST)


ROUTES = [list_models, health, ready, admin_models, admin_reload, admin_cache_clear, admin_check, MetricsController]
#: A front worker's (`[server] workers` > 1): the same, with /metrics summed over the processes.
FRONT_ROUTES = [
    list_models,
    health,
    ready,
    admin_models,
    admin_reload,
    admin_cache_clear,
    admin_check,
    front_metrics,
]
