"""What each of the fronts' calls does at the runtime process (gateway/processes/runtime_process.py serves the
socket and dispatches to these): a module of its own, since the calls are the runtime's API and the server
only frames and routes them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.registry import Collector

from gateway.api.routes import clear_cache, model_list, model_runtimes, readiness
from gateway.base.config import ConfigError
from gateway.base.errors import GatewayError
from gateway.base.observability import ModelGauges
from gateway.embedding import check, rerank, service
from gateway.embedding.rerank import Ranked, RerankArgs
from gateway.embedding.state import Gateway
from gateway.runtime.link import CacheClearArgs, EmbedArgs, TakeArgs, Vectors
from gateway.shared.keys import ApiKey

log = logging.getLogger("gateway")


def _key(gw: Gateway, digest: bytes | None, admin: bool = False) -> ApiKey | None:
    # The front checked the key against its view of the config; the runtime's is the one that counts (a reload
    # may have removed the key, or its rights, since).
    if digest is None:
        return None
    key = gw.keys.find(digest)
    if key is None:
        raise GatewayError(401, "invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    if admin and not key.admin:
        raise GatewayError(403, "this API key may not use admin endpoints", code="forbidden")
    return key


async def _embed(gw: Gateway, raw: msgspec.Raw, notes: dict[str, Any]) -> Vectors:
    args = msgspec.msgpack.decode(raw, type=EmbedArgs)
    key = _key(gw, args.key)
    if key is not None:
        await key.charge_request()
    vectors, tokens, output = await service.request_vectors(gw, args.body, key, notes, args.deadline_s)
    ranges = output.ranges
    return Vectors(
        data=vectors.astype("<f4", copy=False).tobytes(),
        rows=len(vectors),
        tokens=tokens,
        kind=output.kind,
        packed=output.packed,
        starts=ranges.starts.astype("<f4").tobytes() if ranges is not None else None,
        steps=ranges.steps.astype("<f4").tobytes() if ranges is not None else None,
        notes=notes,
    )


async def _rerank(gw: Gateway, raw: msgspec.Raw, notes: dict[str, Any]) -> Ranked:
    # The front charged the request when it checked the key (its windows are the runtime's).
    args = msgspec.msgpack.decode(raw, type=RerankArgs)
    return await rerank.rerank(gw, args.query, _key(gw, args.key), notes, args.deadline_s)


async def _take(gw: Gateway, raw: msgspec.Raw, notes: dict[str, Any]) -> float:
    args = msgspec.msgpack.decode(raw, type=TakeArgs)
    key = _key(gw, args.key)
    window = (key.requests if args.what == "requests" else key.tokens) if key is not None else None
    if window is None:
        return 0.0
    if args.mode == "give":
        got: Any = window.give_back(args.amount)
    else:
        got = window.take(args.amount) if args.mode == "take" else window.wait_for(args.amount)
    got = await got if asyncio.iscoroutine(got) else got
    return float(got or 0.0)


async def _models(gw: Gateway, raw: msgspec.Raw, notes: dict[str, Any]) -> Any:
    key = _key(gw, msgspec.msgpack.decode(raw, type=bytes))
    assert key is not None
    return model_list(gw, key)


async def ready(gw: Gateway, raw: msgspec.Raw, notes: dict[str, Any]) -> Any:
    digest = msgspec.msgpack.decode(raw, type=bytes | None)
    key = gw.keys.find(digest) if digest is not None else None
    return readiness(gw, key)


async def _admin_models(gw: Gateway, raw: msgspec.Raw, notes: dict[str, Any]) -> Any:
    return model_runtimes(gw)


async def _check(gw: Gateway, raw: msgspec.Raw, notes: dict[str, Any]) -> Any:
    args = msgspec.msgpack.decode(raw, type=check.CheckArgs)
    return await check.run(gw, args.models, args.against)


async def _reload(gw: Gateway, raw: msgspec.Raw, notes: dict[str, Any]) -> Any:
    try:
        return await gw.reload()
    except ConfigError as exc:
        log.error("reload refused: %s", exc)
        raise GatewayError(400, f"reload refused, the running config is kept: {exc}", code="invalid_config") from None


async def _gauges(gw: Gateway, raw: msgspec.Raw, notes: dict[str, Any]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_ModelGauges(gw))
    return generate_latest(registry)


class _ModelGauges(Collector):
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    def collect(self) -> Any:
        gauges = ModelGauges()
        gauges.add(self.gw.model_status)
        return gauges.collect()


async def _cache_clear(gw: Gateway, raw: msgspec.Raw, notes: dict[str, Any]) -> Any:
    args = msgspec.msgpack.decode(raw, type=CacheClearArgs)
    return await clear_cache(gw, args.name, args.identity)


async def _cache_get(gw: Gateway, raw: msgspec.Raw, notes: dict[str, Any]) -> list[bytes | None]:
    # A front's lookup for its per-worker model: the raw entries (the front unpacks and counts them).
    keys = msgspec.msgpack.decode(raw, type=list[bytes])
    if gw.cache is None:
        return [None] * len(keys)
    return await gw.cache.store.get_many(keys)


Op = Callable[[Gateway, msgspec.Raw, dict[str, Any]], Awaitable[Any]]
OPS: dict[str, Op] = {
    "embed": _embed,
    "rerank": _rerank,
    "take": _take,
    "models": _models,
    "admin_models": _admin_models,
    "check": _check,
    "reload": _reload,
    "cache_clear": _cache_clear,
    "cache_get": _cache_get,
    "gauges": _gauges,
    "ready": ready,
}
