"""create_app(): the Litestar application: routes, middleware, lifespan and the OpenAPI schema."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import msgspec
from litestar import Litestar
from litestar.datastructures import State
from litestar.middleware.base import DefineMiddleware
from litestar.openapi import OpenAPIConfig

from gateway.api import batches as batch_routes
from gateway.api import compat, console, docs
from gateway.api import embeddings as embeddings_route
from gateway.api import rerank as rerank_routes
from gateway.api.routes import FRONT_ROUTES, ROUTES
from gateway.base import schemas
from gateway.base.config import ConfigError, GatewayConfig
from gateway.base.errors import EXCEPTION_HANDLERS
from gateway.base.observability import ACCESS_LOG, MODEL_GAUGES, RequestContextMiddleware, record_batch
from gateway.embedding.batch_runner import start_runner, stop_runner
from gateway.embedding.state import Gateway
from gateway.runtime.link import RuntimeLink
from gateway.runtime.plugins import Plugins, load_plugins
from gateway.shared.keys import KeyStore

log = logging.getLogger("gateway")


def create_app(
    config: GatewayConfig,
    *,
    plugins: Plugins | None = None,
    keys: KeyStore | None = None,
    fallback_keys: KeyStore | None = None,
    config_path: str | Path | None = None,
    link: RuntimeLink | None = None,
) -> Litestar:
    """Build the app; models load in the background once it starts (see /ready).

    `plugins`: the installed ones by default; `keys`: fixed keys (config keys ignored); `fallback_keys`: used
    while the config names no key; `config_path`: the file a reload re-reads; `link`: the app is a front worker,
    and the runtime process at its other end loads and serves the models (gateway/processes/supervisor.py).
    """
    plugins = plugins or load_plugins()
    gateway = Gateway(
        config,
        plugins.backends(),
        broken=plugins.broken,
        keys=keys,
        fallback_keys=fallback_keys,
        config_path=str(config_path) if config_path is not None else None,
        on_batch=record_batch,
        placements=plugins.placements(),
        link=link,
    )
    app = Litestar(
        route_handlers=_routes(front=link is not None),
        exception_handlers=EXCEPTION_HANDLERS,
        request_max_body_size=config.server.max_body_bytes,
        # Request ids, the access log and the HTTP metrics in one middleware (see observability.py).
        middleware=[DefineMiddleware(RequestContextMiddleware, log_requests=config.server.access_log)],
        lifespan=[_lifespan],
        state=State({"gateway": gateway}),
        openapi_config=OpenAPIConfig(
            title="Embedding gateway",
            version="0.1.0",
            path="/schema",
            render_plugins=embeddings_route.render_plugins({d.component: d.schema for d in compat.DESCRIBED}),
        ),
    )
    for document in (embeddings_route.document, rerank_routes.document, compat.document, batch_routes.document):
        document(app)
    gateway.on_reload.append(lambda: embeddings_route.describe_request(app))
    gateway.on_reload.append(lambda: compat.redescribe(app))
    _strict_request_schemas(app)
    _optional_bodies(app)
    return app


def _routes(front: bool) -> list[Any]:
    """Every route: the hot embeddings route, the others (a front worker's own set), rerank, other APIs' shapes."""
    return [
        embeddings_route.serve_embeddings,
        *(FRONT_ROUTES if front else ROUTES),
        *rerank_routes.ROUTES,
        *batch_routes.ROUTES,
        *compat.ROUTES,
        *docs.ROUTES,
        *console.ROUTES,
    ]


@asynccontextmanager
async def _lifespan(app: Litestar) -> AsyncIterator[None]:
    gateway: Gateway = app.state.gateway
    if gateway.running:
        # A second lifespan on a running app would load the models again and start a second job runner on the
        # same store (each job's chunks computed twice), and its end would close what the first still serves.
        log.warning("the app's lifespan started again while it runs: the first one keeps the models and jobs")
        yield
        return
    gateway.running = True
    try:
        if gateway.link is not None:
            async with _front_lifespan(gateway):
                yield
        else:
            async with _single_lifespan(gateway):
                yield
    finally:
        gateway.running = False


@asynccontextmanager
async def _single_lifespan(gateway: Gateway) -> AsyncIterator[None]:
    # The server in one process: it loads the models and runs the Batch API jobs.
    loop = asyncio.get_running_loop()
    gateway.registry.load_all(loop)
    MODEL_GAUGES.add(gateway.model_status)
    lag = loop.create_task(gateway.watch_loop_lag())
    jobs = start_runner(gateway)
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
        lag.cancel()
        with suppress(ValueError, RuntimeError, NotImplementedError):
            loop.remove_signal_handler(signal.SIGHUP)
        # Batch jobs stop between chunks, while the models still serve the chunk in progress.
        await stop_runner(gateway, jobs)
        # Queued work finishes before models are released (graceful shutdown).
        await loop.run_in_executor(None, gateway.registry.close)
        await gateway.close_shared()
        MODEL_GAUGES.remove(gateway.model_status)
        ACCESS_LOG.flush()


@asynccontextmanager
async def _front_lifespan(gateway: Gateway) -> AsyncIterator[None]:
    # A front worker loads only its own copies of the per-worker models: the runtime process loads the rest.
    # Its signals are uvicorn's; SIGHUP goes to the supervisor, which has the runtime reload.
    loop = asyncio.get_running_loop()
    lag = loop.create_task(gateway.watch_loop_lag())
    link = gateway.link
    assert link is not None
    # The runtime's /ready adds up the fronts' copies: told on each connection and after each load.
    link.states = gateway.local_states
    link.on_push = lambda op, args: _pushed(gateway, op, args)
    gateway.registry.load_all(loop, here=gateway.here, loaded=lambda: loop.call_soon_threadsafe(link.send_states))
    # Connected from the start: the runtime counts the fronts connected for /ready.
    connect = loop.create_task(link.connect())
    try:
        yield
    finally:
        lag.cancel()
        connect.cancel()
        if gateway.batches is not None:
            await asyncio.to_thread(gateway.batches.close)
        await link.close()
        await loop.run_in_executor(None, gateway.registry.close)
        ACCESS_LOG.flush()


async def _pushed(gateway: Gateway, op: str, args: msgspec.Raw) -> Any:
    """What the runtime process asks of a front: prepare a reload (load the new per-worker copies; the failed
    ones, by model) or drop the one prepared."""
    if op == "prepare":
        return await gateway.prepare(msgspec.msgpack.decode(args, type=GatewayConfig))
    if op == "abort":
        gateway.drop_prepared()
        return None
    raise ValueError(f"unknown push {op!r}")


def _optional_bodies(app: Litestar) -> None:
    # Litestar marks every request body required; a handler whose `data` has a default takes none
    # (`POST /admin/cache/clear` with no body clears every model's entries).
    paths = app.openapi_schema.paths or {}
    for route in app.routes:
        path_item = paths.get(route.path)
        for handler in getattr(route, "route_handlers", ()):
            data = handler.parsed_fn_signature.parameters.get("data")
            if path_item is None or data is None or not data.has_default:
                continue
            for method in handler.http_methods:
                operation = getattr(path_item, method.lower(), None)
                if operation is not None and operation.request_body is not None:
                    operation.request_body.required = False


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
