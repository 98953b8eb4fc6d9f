"""Request ids, one structured log line per request, and the gateway's Prometheus metrics.

One middleware does all three per request. The HTTP series keep the names and labels Litestar's Prometheus
middleware gives them (`gateway_http_requests_total{method,path,status_code,app_name}` and friends); that
middleware is not used because, stacked beside this one, it took a sixth of the event-loop CPU of an
embedding request (bench/README.md, "The embeddings route"). Litestar's PrometheusController still serves
/metrics.
"""

from __future__ import annotations

import atexit
import collections
import itertools
import json
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.base.asgi import header

if TYPE_CHECKING:
    from litestar.types import ASGIApp, Message, Receive, Scope, Send

access_log = logging.getLogger("gateway.access")
# Ids: a random per-process prefix and a counter. uuid4 reads the OS's random source on every call, a
# measurable share of the event loop's time per request on a small machine.
_ID_PREFIX = secrets.token_hex(6)
_ID_COUNTER = itertools.count()


def new_id() -> str:
    """A unique id for a request or a response (unique across restarts thanks to the random prefix)."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER):010x}"


_VALID_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
# Methods a client may name; any other token (h11 accepts any) is counted and logged as OTHER, so that a
# client cannot grow the metrics' label sets without bound.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})


def method_label(method: str) -> str:
    """The method as a metric label and log field: itself when it is a standard one, else OTHER."""
    return method if method in _METHODS else "OTHER"


# A log field written as is: printable ASCII without spaces or quotes. Anything else is quoted and escaped
# (json.dumps), so one request is always one line whatever a client puts in its path.
_PLAIN_FIELD = re.compile(r"[!#-~]{1,256}")


def log_field(value: str) -> str:
    """`value` as one whitespace-free token of a log line."""
    if _PLAIN_FIELD.fullmatch(value):
        return value
    return json.dumps(value if len(value) <= 256 else value[:256] + "...")


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


# Litestar's Prometheus plugin names, labels and buckets (prefix "gateway_http", app_name "gateway").
_APP = "gateway"
HTTP_REQUESTS = Counter("gateway_http_requests", "Total requests", ["method", "path", "status_code", "app_name"])
HTTP_ERRORS = Counter(
    "gateway_http_requests_error", "Total errors in requests", ["method", "path", "status_code", "app_name"]
)
HTTP_SECONDS = Histogram(
    "gateway_http_request_duration_seconds",
    "Request duration, in seconds",
    ["method", "path", "status_code", "app_name"],
)
HTTP_IN_PROGRESS = Gauge(
    "gateway_http_requests_in_progress",
    "Total requests currently in progress",
    ["method", "path", "status_code", "app_name"],
    multiprocess_mode="livesum",
)
# Label children by label values: a `labels()` call takes a lock and builds a tuple, several per request.
_children: dict[tuple[Any, ...], Any] = {}


def _child(metric: Any, *values: str) -> Any:
    key = (id(metric), *values)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*values)
    return child


REFUSED = Counter(
    "gateway_admissions_refused", "Requests refused at admission (429) by model and reason", ["model", "reason"]
)


FAILOVERS = Counter(
    "gateway_failovers",
    "Requests a model could not serve and handed to its next fallback, by reason",
    ["model", "fallback", "reason"],
)


def record_failover(model: str, fallback: str, reason: str) -> None:
    """A request left `model` for `fallback`: reason "unavailable", "timeout", "circuit_open" or "not_ready"."""
    _child(FAILOVERS, model, fallback, reason).inc()


def record_refusal(model: str, reason: str) -> None:
    """A request refused at admission: `reason` is "wait" (predicted wait over the limit) or "queue"."""
    _child(REFUSED, model, reason).inc()


CACHE_LOOKUPS = Counter("gateway_cache_lookups", "Cache lookups of inputs by model and result", ["model", "result"])
CACHE_EVICTIONS = Counter("gateway_cache_evictions", "Entries evicted to stay within the cache's size", ["store"])
CACHE_BYTES = Gauge("gateway_cache_bytes", "Bytes held by the in-process cache", ["store"], multiprocess_mode="livesum")
STORE_ERRORS = Counter(
    "gateway_shared_state_errors",
    "Failed or skipped calls to the shared store (Redis), by use: the request went on without it",
    ["use"],
)


def record_cache(
    store: str,
    model: str | None = None,
    hits: int = 0,
    misses: int = 0,
    evictions: int = 0,
    size: int | None = None,
    invalid: int = 0,
) -> None:
    """Cache figures: lookups by model (an "invalid" entry, malformed or of another width, is served as a
    miss), evictions and size by store."""
    if model is not None:
        if hits:
            _child(CACHE_LOOKUPS, model, "hit").inc(hits)
        if misses:
            _child(CACHE_LOOKUPS, model, "miss").inc(misses)
        if invalid:
            _child(CACHE_LOOKUPS, model, "invalid").inc(invalid)
    if evictions:
        _child(CACHE_EVICTIONS, store).inc(evictions)
    if size is not None:
        _child(CACHE_BYTES, store).set(size)


def record_store_error(use: str) -> None:
    """A call to the shared store failed or was skipped while it is down: `use` is "cache" or "rate_limits"."""
    _child(STORE_ERRORS, use).inc()


def record_batch(model: str, size: int, tokens: int, seconds: float) -> None:
    """Called by the batcher after each backend batch."""
    _child(BATCH_SIZE, model).observe(size)
    _child(BATCH_SECONDS, model).observe(seconds)


@dataclass(frozen=True, slots=True)
class ModelStatus:
    """One model's live figures for the gauges."""

    name: str
    queued: int
    ready: bool
    #: Seconds until the work queued now is done; tokens per second the model drains (None: not measured).
    predicted_wait_s: float = 0.0
    drain_rate: float | None = None
    #: (ready, total) replicas of a model whose batches run elsewhere (None: in this process).
    replicas: tuple[int, int] | None = None
    #: The model's circuit breaker: 0 closed, 1 half-open, 2 open (circuit.CircuitState).
    circuit: int = 0


class ModelGauges(Collector):
    """Queue depth and readiness per model, asked at scrape time of each source an app has added."""

    def __init__(self) -> None:
        self._sources: list[Callable[[], Iterable[ModelStatus]]] = []

    def add(self, source: Callable[[], Iterable[ModelStatus]]) -> None:
        self._sources.append(source)

    def remove(self, source: Callable[[], Iterable[ModelStatus]]) -> None:
        if source in self._sources:
            self._sources.remove(source)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily("gateway_queue_depth", "Inputs waiting for a batch, by model", labels=["model"])
        ready = GaugeMetricFamily("gateway_model_ready", "1 when the model is loaded and serving", labels=["model"])
        wait = GaugeMetricFamily(
            "gateway_predicted_wait_seconds", "Time until the work queued now is done, by model", labels=["model"]
        )
        rate = GaugeMetricFamily(
            "gateway_drain_rate_tokens_per_second", "Tokens per second a model drains while busy", labels=["model"]
        )
        replicas_ready = GaugeMetricFamily(
            "gateway_replicas_ready", "Replicas ready, for a model whose batches run on replicas", labels=["model"]
        )
        replicas = GaugeMetricFamily(
            "gateway_replicas", "Replicas wanted, for a model whose batches run on replicas", labels=["model"]
        )
        circuit = GaugeMetricFamily(
            "gateway_circuit_state", "A model's circuit breaker: 0 closed, 1 half-open, 2 open", labels=["model"]
        )
        for source in list(self._sources):
            for status in source():
                circuit.add_metric([status.name], status.circuit)
                depth.add_metric([status.name], status.queued)
                ready.add_metric([status.name], 1.0 if status.ready else 0.0)
                wait.add_metric([status.name], status.predicted_wait_s)
                if status.drain_rate is not None:
                    rate.add_metric([status.name], status.drain_rate)
                if status.replicas is not None:
                    replicas_ready.add_metric([status.name], status.replicas[0])
                    replicas.add_metric([status.name], status.replicas[1])
        yield from (depth, ready, wait, rate, replicas_ready, replicas, circuit)


MODEL_GAUGES = ModelGauges()
REGISTRY.register(MODEL_GAUGES)


_ACCESS_FORMAT = "request_id=%s method=%s path=%s status=%d model=%s tokens=%s latency_ms=%.1f"


class AccessLog:
    """One line per request on the `gateway.access` logger, made and handed on by a background thread.

    The event loop only appends the line's fields; a thread turns them into log records every `interval`
    seconds, with the time each request ended, and passes them to the logger (its level, filters, handlers
    and propagation apply as usual). Logging from the loop cost about a tenth of its CPU per request
    (bench/README.md, "The embeddings route"): the record, the formatting and waking Litestar's queue
    listener once per line. Written by hand: the stdlib's QueueHandler and MemoryHandler still build
    the record on the calling thread. `flush()` hands on what is pending now (tests, shutdown).
    """

    def __init__(self, logger: logging.Logger, interval: float = 0.1) -> None:
        self.logger = logger
        self.interval = interval
        # deque: append on the loop and popleft on the thread are atomic, no lock on the loop's side.
        self._pending: collections.deque[tuple[float, tuple[Any, ...]]] = collections.deque()
        self._flushing = threading.Lock()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def add(
        self, request_id: str, method: str, path: str, status: int, model: str, tokens: object, latency_ms: float
    ) -> None:
        """Queue one line if the logger would take an INFO record (client-chosen fields are escaped later,
        by the thread)."""
        if self.logger.isEnabledFor(logging.INFO):
            self._pending.append((time.time(), (request_id, method, path, status, model, tokens, latency_ms)))
            if self._thread is None:
                self._start()

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is None:
                thread = threading.Thread(target=self._run, name="access-log", daemon=True)
                thread.start()
                self._thread = thread
                atexit.register(self.flush)

    def _run(self) -> None:
        while True:
            time.sleep(self.interval)
            try:
                self.flush()
            except Exception:  # a broken handler must not stop the access log for good
                logging.getLogger(__name__).exception("access log: handing records on failed")

    def flush(self) -> None:
        with self._flushing:
            while True:
                try:
                    created, args = self._pending.popleft()
                except IndexError:
                    return
                args = (args[0], args[1], log_field(args[2]), *args[3:])
                record = self.logger.makeRecord(self.logger.name, logging.INFO, __file__, 0, _ACCESS_FORMAT, args, None)
                # The time the request ended, not the time the line was handed on.
                shift = record.created - created
                record.created = created
                record.msecs = int((created - int(created)) * 1000) + 0.0
                record.relativeCreated -= shift * 1000
                self.logger.handle(record)


ACCESS_LOG = AccessLog(access_log)


class RequestContextMiddleware:
    """Honours or assigns X-Request-ID, returns it, and logs one line per request.

    Handlers put `model`, `tokens` and `key` on `scope["state"]`; no key and no input text is ever logged
    (texts only at debug level, by the handler).
    """

    def __init__(self, app: ASGIApp, log_requests: bool = True, unmetered: tuple[str, ...] = ("/metrics",)) -> None:
        self.app = app
        self.log_requests = log_requests
        self.unmetered = unmetered

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        raw_id = header(scope, b"x-request-id")
        incoming = raw_id.decode("latin-1") if raw_id is not None else None
        request_id = incoming if incoming and _VALID_ID.match(incoming) else new_id()
        state: dict[str, Any] = scope.setdefault("state", {})
        state["request_id"] = request_id
        status = 500
        metered = scope["path"] not in self.unmetered
        if metered:
            # The route's template, as Litestar's plugin labels it with group_path (this middleware runs
            # after routing, so it is set).
            method, path = method_label(scope["method"]), scope.get("path_template", scope["path"])
            in_progress = _child(HTTP_IN_PROGRESS, method, path, "200", _APP)
            in_progress.inc()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            latency = time.perf_counter() - started
            if metered:
                in_progress.dec()
                code = str(status)
                _child(HTTP_REQUESTS, method, path, code, _APP).inc()
                _child(HTTP_SECONDS, method, path, code, _APP).observe(latency)
                if status >= 500:
                    _child(HTTP_ERRORS, method, path, code, _APP).inc()
            self._account(scope, state, status, latency)

    def _account(self, scope: Scope, state: dict[str, Any], status: int, latency: float) -> None:
        """The embedding metrics of the model the request used, and its access-log line."""
        model = state.get("model")
        if model is not None:
            _child(EMBED_REQUESTS, model, str(status)).inc()
            if status == 200:
                _child(TOKENS, model).inc(state.get("tokens", 0))
                _child(INPUTS, model).inc(state.get("inputs", 0))
        if self.log_requests and scope["path"] not in ("/health", "/metrics"):
            ACCESS_LOG.add(
                state["request_id"],
                method_label(scope["method"]),
                scope["path"],
                status,
                model or "-",
                state.get("tokens", "-"),
                latency * 1000,
            )
