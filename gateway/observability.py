"""Request ids, one structured log line per request, and the gateway's own Prometheus metrics.

Litestar's Prometheus middleware covers requests by route/method/status and their latency; it computes its
labels before the body is read, so the per-model series (tokens, batches, queue depth) are ours.
"""

from __future__ import annotations

import itertools
import logging
import re
import secrets
import time
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from litestar.types import ASGIApp, Message, Receive, Scope, Send

    from .app import Gateway

access_log = logging.getLogger("gateway.access")
# Ids: a random per-process prefix and a counter. uuid4 reads the OS's random source on every call, a
# measurable share of the event loop's time per request on a small machine.
_ID_PREFIX = secrets.token_hex(6)
_ID_COUNTER = itertools.count()


def new_id() -> str:
    """A unique id for a request or a response (unique across restarts thanks to the random prefix)."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER):010x}"


_VALID_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")

EMBED_REQUESTS = Counter("gateway_embedding_requests", "Embedding requests by model and status", ["model", "status"])
TOKENS = Counter("gateway_tokens", "Input tokens embedded, by model", ["model"])
INPUTS = Counter("gateway_inputs", "Input texts embedded, by model", ["model"])
BATCH_SIZE = Histogram(
    "gateway_batch_size", "Inputs per backend batch", ["model"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)
)
BATCH_SECONDS = Histogram(
    "gateway_batch_seconds",
    "Backend time per batch",
    ["model"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)


def record_batch(model: str, size: int, tokens: int, seconds: float) -> None:
    """Called by the batcher after each backend batch."""
    BATCH_SIZE.labels(model).observe(size)
    BATCH_SECONDS.labels(model).observe(seconds)


class _QueueCollector(Collector):
    """Queue depth and in-flight requests per model, read live at scrape time."""

    def __init__(self) -> None:
        self.gateways: weakref.WeakSet[Gateway] = weakref.WeakSet()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily("gateway_queue_depth", "Inputs waiting for a batch, by model", labels=["model"])
        ready = GaugeMetricFamily("gateway_model_ready", "1 when the model is loaded and serving", labels=["model"])
        for gw in list(self.gateways):
            for name, model in gw.registry.models.items():
                depth.add_metric([name], model.batcher.queued if model.batcher else 0)
                ready.add_metric([name], 1.0 if model.state == "ready" else 0.0)
        yield depth
        yield ready


QUEUES = _QueueCollector()
REGISTRY.register(QUEUES)


class RequestContextMiddleware:
    """Honours or assigns X-Request-ID, returns it, and logs one line per request.

    Handlers put `model`, `tokens` and `key` on `scope["state"]`; no key and no input text is ever logged
    (texts only at debug level, by the handler).
    """

    def __init__(self, app: ASGIApp, log_requests: bool = True) -> None:
        self.app = app
        self.log_requests = log_requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        incoming = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                incoming = value.decode("latin-1")
                break
        request_id = incoming if incoming and _VALID_ID.match(incoming) else new_id()
        state: dict[str, Any] = scope.setdefault("state", {})
        state["request_id"] = request_id
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            model = state.get("model")
            if model is not None:
                EMBED_REQUESTS.labels(model, str(status)).inc()
                if status == 200:
                    TOKENS.labels(model).inc(state.get("tokens", 0))
                    INPUTS.labels(model).inc(state.get("inputs", 0))
            if self.log_requests and scope["path"] not in ("/health", "/metrics"):
                access_log.info(
                    "request_id=%s method=%s path=%s status=%d model=%s tokens=%s latency_ms=%.1f",
                    request_id,
                    scope["method"],
                    scope["path"],
                    status,
                    model or "-",
                    state.get("tokens", "-"),
                    (time.perf_counter() - started) * 1000,
                )
