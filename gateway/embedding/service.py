"""The embedding use case: from a decoded request and the caller's key to a response.

The HTTP route and `gateway embed` both come through here. In order: the model (404, 403), the inputs and
the output type (400), an empty token quota (429), readiness (503), `dimensions`, the prompt and the
truncation (400), a key already over the model's admission limit (429, before any tokenizing), int8/uint8
calibration (once per model), tokens and their limits (400, or cut when truncating), the key's token
quota (429), admission and the model's batches (429 when predicted too late, 500 when a batch fails, 504
past the timeout), then the Matryoshka cut, the output type and the response. Inputs already cached are
taken from the cache and never reach the model (so they are answered while its circuit is open). A model
that cannot serve (failing, its circuit open, or not ready while a fallback is) hands the request to its
fallbacks, in order (`_first_served`, over the one `ModelHandle` the registry gives the request). With
`[server] workers` > 1, a front worker hands the request to the runtime process at one place (`_computed`),
which runs the rest there, unless the model has a copy in each front (`copies = "per-worker"`): then the front
runs it all, with the runtime's key windows and cache.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
import numpy as np

from gateway.base.errors import GatewayError
from gateway.base.observability import new_id, record_failover, record_refusal
from gateway.base.schemas import EmbeddingData, EmbeddingRequest, EmbeddingResponse, Usage
from gateway.embedding.cache import Cache, Entry
from gateway.embedding.cache import input_key as cache_key
from gateway.embedding.state import Gateway
from gateway.plugin import BackendError, BackendFailure, TokenSpan
from gateway.runtime import inputs, quantize
from gateway.runtime.batching import BatchFailed, Progress, QueueFull
from gateway.runtime.hf import l2_normalize
from gateway.runtime.link import EmbedArgs, RemoteError
from gateway.runtime.registry import ModelHandle, ServedModel
from gateway.shared.keys import ApiKey

log = logging.getLogger("gateway")

T = TypeVar("T")

# Responses of more floats than this are built and encoded off the event loop: the largest take a tenth of a
# second of CPU, while a single vector takes microseconds, less than the hop to a thread.
_OFFLOAD_FLOATS = 32_768
# Characters tokenized per step of a large request (about 10-30 ms of a fast tokenizer's time).
_CHUNK_CHARS = 32_768


async def embed(
    gw: Gateway,
    body: EmbeddingRequest,
    key: ApiKey | None = None,
    notes: MutableMapping[str, Any] | None = None,
    deadline_s: float | None = None,
) -> EmbeddingResponse:
    """The response for `body` on behalf of `key` (None: no key, as `gateway embed` runs).

    `notes` receives what the access log and metrics report: the model once known, then the tokens and
    inputs of a request that was answered. `deadline_s`: the client's own time limit, when it gave one
    (it shortens the request's timeout and its admission). Errors are GatewayError.
    """
    vectors, tokens, output = await _computed(gw, body, key, notes if notes is not None else {}, deadline_s)
    return await _off_loop(vectors, _response, vectors, body, tokens, output)


async def embed_json(
    gw: Gateway,
    body: EmbeddingRequest,
    key: ApiKey | None = None,
    notes: MutableMapping[str, Any] | None = None,
    deadline_s: float | None = None,
) -> bytes:
    """`embed`, encoded as the JSON body of the HTTP answer."""
    vectors, tokens, output = await _computed(gw, body, key, notes if notes is not None else {}, deadline_s)
    return await _off_loop(vectors, lambda *a: msgspec.json.encode(_response(*a)), vectors, body, tokens, output)


async def vectors(
    gw: Gateway,
    body: EmbeddingRequest,
    key: ApiKey | None = None,
    notes: MutableMapping[str, Any] | None = None,
) -> tuple[np.ndarray, int, Output]:
    """`body`'s float vectors (cut to `dimensions`), its token count, and how it asked them encoded (with the
    int8/uint8 ranges when it asked a calibrated type): for the routes that answer in another API's shape
    (gateway/api/compat), which encode the vectors themselves. The same path as `embed`, here or at the
    runtime process."""
    return await _computed(gw, body, key, notes if notes is not None else {}, None)


def values(vectors: np.ndarray, kind: quantize.EmbeddingType, ranges: quantize.Ranges | None) -> list[Any]:
    """The rows of `vectors` as JSON numbers of type `kind` (floats with 9 decimals, as `embed` writes them)."""
    if kind != "float":
        return quantize.quantize(vectors, kind, ranges).tolist()  # type: ignore[no-any-return]
    return np.round(vectors.astype(np.float64), 9).tolist()  # type: ignore[no-any-return]


async def off_loop(vectors: np.ndarray, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)`, on a worker thread when `vectors` are large enough for encoding them to hold the loop."""
    return await _off_loop(vectors, fn, *args)


async def token_spans(
    gw: Gateway,
    body: EmbeddingRequest,
    key: ApiKey | None,
    add_special_tokens: bool,
    notes: MutableMapping[str, Any] | None = None,
) -> list[list[TokenSpan]]:
    """The tokens of `body`'s inputs on its model (TEI's /tokenize), its prompt in front as an embedding request
    would have it: the model (404, 403), the inputs (400), readiness (503), then the backend's tokenizer."""
    model = gw.registry.handle(body.model, key).model
    if notes is not None:
        notes["model"] = model.name
    server = gw.config.server
    texts = _texts(body, server.max_items_per_request, server.max_input_chars)
    await model.ready(server.request_timeout_s)
    assert model.info is not None
    name = inputs.choose_prompt(model.name, model.prompts, model.default_prompt_name, body.prompt_name, None)
    if name is not None:
        texts = [model.prompts[name] + text for text in texts]
    return await model.token_spans(texts, add_special_tokens)


async def _computed(
    gw: Gateway,
    body: EmbeddingRequest,
    key: ApiKey | None,
    notes: MutableMapping[str, Any],
    deadline_s: float | None,
) -> tuple[np.ndarray, int, Output]:
    """`request_vectors`, here or, in a front worker, at the runtime process: the one place the two meet."""
    if gw.link is None:
        return await request_vectors(gw, body, key, notes, deadline_s)
    model = gw.registry.find(body.model)
    if model is not None and not model.elsewhere:
        # A per-worker model (`copies = "per-worker"`): this front's own copy computes it. The key's request is
        # charged here, as the runtime charges the requests it computes; its limits are the runtime's windows.
        if key is not None:
            await key.charge_request()
        return await request_vectors(gw, body, key, notes, deadline_s)
    try:
        got = await gw.link.embed(EmbedArgs(body, key.digest if key is not None else None, deadline_s))
    except RemoteError as exc:
        notes.update(exc.notes)
        raise
    notes.update(got.notes)
    ranges = None
    if got.starts is not None and got.steps is not None:
        ranges = quantize.Ranges(np.frombuffer(got.starts, np.float32), np.frombuffer(got.steps, np.float32))
    rows = np.frombuffer(got.data, np.float32).reshape(got.rows, -1)
    return rows, got.tokens, Output(got.kind, got.packed, ranges)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Output:
    """How the vectors go out: their value type, base64 or JSON numbers, and int8/uint8 ranges."""

    kind: quantize.EmbeddingType
    packed: bool
    ranges: quantize.Ranges | None = None


async def _off_loop(vectors: np.ndarray, fn: Callable[..., T], *args: Any) -> T:
    if vectors.size > _OFFLOAD_FLOATS:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
    return fn(*args)


async def request_vectors(
    gw: Gateway,
    body: EmbeddingRequest,
    key: ApiKey | None,
    notes: MutableMapping[str, Any],
    deadline_s: float | None,
    background: bool = False,
) -> tuple[np.ndarray, int, Output]:
    """The request's vectors (cut to `dimensions`), its token count and how to encode them. `notes` also gets
    "headers" for the answer: the prompt applied and, when truncating, how many inputs were cut;
    "served_by": the model that computed the vectors (the one asked for, or a fallback of it); and
    "token_counts": each input's tokens, in input order (what `gateway embed-file` writes per row).

    `background`: a Batch API job's line: computed at the batcher's low priority (only while no client input
    waits), never refused by admission nor bound by `request_timeout_s`."""
    server = gw.config.server
    handle = gw.registry.handle(body.model, key)
    model = handle.model
    notes["model"] = model.name
    if model.spec.task != "embed":
        raise GatewayError(
            400,
            f'model {model.name!r} is a rerank model (task "{model.spec.task}"); embeddings need a model with '
            'task = "embed" (rerank it at /v1/rerank or /rerank)',
            param="model",
            code="wrong_task",
        )
    texts = _texts(body, server.max_items_per_request, server.max_input_chars)
    output = _output(body)
    if key is not None:
        await key.check_token_quota()
    timeout = min(server.request_timeout_s, deadline_s) if deadline_s is not None else server.request_timeout_s
    ends = math.inf if background else time.monotonic() + timeout
    try:
        async with asyncio.timeout(None if background else timeout):
            vectors, total, out = await _first_served(gw, handle, body, texts, key, ends, output, notes, background)
    except TimeoutError:
        raise GatewayError(
            504, f"request did not finish within {timeout:g}s (model {model.name!r})", code="timeout"
        ) from None
    notes["tokens"] = total
    notes["inputs"] = len(texts)
    return vectors, total, out


async def _first_served(
    gw: Gateway,
    handle: ModelHandle,
    body: EmbeddingRequest,
    texts: list[str],
    key: ApiKey | None,
    ends: float,
    output: Output,
    notes: MutableMapping[str, Any],
    background: bool = False,
) -> tuple[np.ndarray, int, Output]:
    """Failover: the model, then its fallbacks (same embedding space, checked at config load), each with its own
    tokenizer, limits and batches, until one serves; `notes` get its name and headers."""
    chain = handle.chain
    failed: Failover | None = None
    for n, candidate in enumerate(chain):
        # Each model notes its headers apart: the answer carries only the serving model's.
        said: dict[str, Any] = {}
        try:
            vectors, total, out = await _on_model(
                gw, candidate, body, texts, key, ends, output, said, n < len(chain) - 1, background
            )
        except Failover as exc:
            failed = failed or exc
            if n == len(chain) - 1:
                raise failed.answer(candidate if candidate is not handle.model else None, exc) from None
            record_failover(candidate.name, chain[n + 1].name, exc.reason)
            log.warning(
                "model %r could not serve a request (%s); trying fallback %r",
                candidate.name,
                exc.reason,
                chain[n + 1].name,
            )
            continue
        notes["served_by"] = candidate.name
        notes["token_counts"] = said["token_counts"]
        headers = notes.setdefault("headers", {})
        headers.update(said.get("headers", {}))
        headers["X-Served-Model"] = candidate.name
        return vectors, total, out
    raise AssertionError("the chain's last model serves or raises")


class Failover(Exception):
    """A model cannot serve this request now, and a fallback may: `error` is the answer if none can."""

    def __init__(self, error: GatewayError, reason: str) -> None:
        super().__init__(error.message)
        self.error = error
        self.reason = reason

    def answer(self, last: ServedModel | None, exc: Failover) -> GatewayError:
        """The requested model's own error, naming what the last fallback said when there was one."""
        if last is None:
            return self.error
        e = self.error
        return GatewayError(
            e.status, f"{e.message}; fallback {last.name!r}: {exc.error.message}", code=e.code, headers=e.headers
        )


async def _on_model(
    gw: Gateway,
    model: ServedModel,
    body: EmbeddingRequest,
    texts: list[str],
    key: ApiKey | None,
    ends: float,
    output: Output,
    notes: MutableMapping[str, Any],
    may_fail_over: bool,
    background: bool = False,
) -> tuple[np.ndarray, int, Output]:
    """The vectors (cut to `dimensions`), tokens and output of `texts` on `model`; Failover when a fallback
    may serve instead (the model is failing, its circuit is open, or, with a fallback left, not ready)."""
    _check_can_take(model, texts, may_fail_over, background)
    job = Job(model, key, ends, gw.config.server.max_tokens_per_request, background=background)
    with model.in_use():
        async with settled(job):
            await model.ready(max(0.0, ends - time.monotonic()))
            assert model.info is not None
            dims = _dimensions(body.dimensions, model)
            texts = _set_up(job, body, texts, notes, gw.loop_lag)
            if output.kind in quantize.CALIBRATED:
                output = Output(output.kind, output.packed, await model.ranges(dims))
            log.debug("embedding %d texts on %r: %r", len(texts), model.name, texts)
            if gw.cache is not None and model.identity is not None:
                vectors, counts, cut = await _through_cache(gw.cache, job, texts, notes)
            else:
                vectors, counts, cut = await job.compute(texts)
            job.charged = 0  # delivered: the charge stands
    notes["token_counts"] = counts
    if job.side is not None:
        notes.setdefault("headers", {})["X-Truncated-Inputs"] = str(sum(cut))
    if dims is not None:
        vectors = vectors[:, :dims]
        if model.info.normalized:
            vectors = l2_normalize(vectors)
    return vectors, sum(counts), output


def _check_can_take(model: ServedModel, texts: list[str], may_fail_over: bool, background: bool = False) -> None:
    """400 when `texts` would not fit the model's queue at all (background work takes no room in it); Failover
    when it is not ready and a fallback is left (a fallback that is loaded serves now, rather than this one's
    load being waited for)."""
    batching = model.spec.config.batching
    if len(texts) > batching.max_queue and not background:
        raise GatewayError(
            400,
            f"`input` has {len(texts)} items; model {model.name!r} queues at most {batching.max_queue} inputs",
            param="input",
            code="too_many_inputs",
        )
    if may_fail_over and not model.is_ready:
        raise Failover(model.readiness.unavailable(), "not_ready")


def _set_up(
    job: Job, body: EmbeddingRequest, texts: list[str], notes: MutableMapping[str, Any], loop_lag: float
) -> list[str]:
    """The texts with the request's prompt in front; the job's prompt, truncation side and longest wait set."""
    model = job.model
    assert model.info is not None
    texts, job.prompt, job.keep, job.side = _prepare(model, body, texts, notes)
    if job.side is not None and not model.info.counts_tokens:
        raise GatewayError(
            400,
            f"model {model.name!r} cannot truncate: its tokens are counted by its upstream, after the inputs are sent",
            param="truncate",
            code="truncation_not_supported",
        )
    # The event loop's own delay, paid twice (reading this request, sending its answer), comes out of the wait
    # the model may add; never below a quarter of the limit.
    limit = model.spec.config.batching.max_queue_wait_ms / 1000
    job.max_wait_s = min(max(limit - 2 * loop_lag, limit / 4), job.ends - time.monotonic())
    return texts


@asynccontextmanager
async def settled(job: Job) -> AsyncIterator[None]:
    """What a failed computation tells the client (429, 500, or the backend's own error), and the key's charge
    settled: what no batch took is refunded unless the embeddings were delivered."""
    model, key = job.model, job.key
    try:
        yield
    except QueueFull as exc:
        record_refusal(model.name, exc.reason)
        raise GatewayError(429, str(exc), code="queue_full", headers={"Retry-After": str(exc.retry_after)}) from None
    except BackendFailure as exc:
        job.progress.taken_tokens = 0  # the failure was the backend's: nothing is charged
        raise _backend_error(model, exc) from None
    except (BatchFailed, BackendError) as exc:
        job.progress.taken_tokens = 0  # the failure was ours: nothing is charged
        error_id = uuid.uuid4().hex[:16]
        log.error("request failed (error id %s): %s", error_id, exc)
        raise GatewayError(500, f"{exc} (error id {error_id})", code=error_id) from None
    finally:
        # No embeddings returned (timed out, refused, failed, the client gone): what no batch took is not
        # charged; what batches took was computed, and stays charged.
        if job.charged and key is not None:
            await key.refund_tokens(job.charged - job.progress.taken_tokens)


def _backend_error(model: ServedModel, exc: BackendFailure) -> Exception:
    """The client's answer to a typed backend failure (a Failover when a fallback may serve instead)."""
    headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after or 1)))} if exc.status in (429, 503) else None
    param = "input" if exc.status == 400 else None
    error = GatewayError(exc.status, exc.message, param=param, code=exc.code, headers=headers)
    if exc.fail_over:
        return Failover(error, "timeout" if exc.status == 504 else "unavailable")
    return error


@dataclass(eq=False)
class Job:
    """One request's work on its model: how to tokenize, whom to charge, how long it may wait."""

    model: ServedModel
    key: ApiKey | None
    ends: float
    max_tokens: int
    side: inputs.Side | None = None
    # The prompt in front of every text (""), and its tokens (kept when cutting the start).
    prompt: str = ""
    keep: int = 0
    max_wait_s: float = 0.0
    progress: Progress = field(default_factory=Progress)
    # Tokens charged to the key and not delivered yet (refunded, less what batches took, if the request fails),
    # and all tokens charged for this request.
    charged: int = 0
    billed: int = 0
    # Tokens owed for inputs the cache answered, charged with the first computation's (one check of the sum).
    owed: int = 0
    # Whether the request has passed its one check against the key's tokens/minute.
    admitted: bool = False
    # A Batch API job's work: the batcher's low priority, no admission (see request_vectors).
    background: bool = False

    async def charge(self, tokens: int) -> None:
        """Count `tokens` against the key's tokens/minute, given back if the request fails. The request's first
        charge is checked (429 when over); what it learns it owes after that is added without a check: the
        request was admitted as a whole, as an uncached one is in one charge."""
        if self.key is None or not tokens:
            return
        if self.admitted:
            await self.key.refund_tokens(-tokens)  # a negative refund takes, unconditionally
        else:
            await self.key.charge_tokens(tokens)
            self.admitted = True
        self.charged += tokens
        self.billed += tokens

    async def compute(
        self, texts: list[str], counted: int = 0, positions: list[int] | None = None
    ) -> tuple[np.ndarray, list[int], list[bool]]:
        """Vectors, token counts and whether each input was cut, for `texts`: admission, tokens and their
        limits (`counted`: tokens of this request's other inputs, for the per-request total; `positions`:
        where `texts` are in the request, for errors), the key's token quota, then the model's batches."""
        model = self.model
        assert model.info is not None
        # Checked here, where work would reach the model: inputs the cache holds are answered while its
        # circuit is open, and only a request that needs the model takes the half-open state's one probe.
        refused = model.circuit_refusal()
        if refused is not None:
            raise Failover(refused, "circuit_open")
        owner = self.key.name if self.key else None
        if not self.background:
            model.precheck(owner=owner, max_wait_s=self.max_wait_s)
        if not model.info.counts_tokens:
            return await self._compute_counted_upstream(texts, owner)
        token_ids, total, cut = await _tokens(model, texts, self.max_tokens, self.side, self.keep, counted, positions)
        owed, self.owed = self.owed, 0
        await self.charge(owed + total)
        wait = min(self.max_wait_s, self.ends - time.monotonic())
        vectors = await model.embed(
            texts, token_ids, owner=owner, max_wait_s=wait, progress=self.progress, background=self.background
        )
        return vectors, [len(ids) for ids in token_ids], [i in cut for i in range(len(texts))]

    async def _compute_counted_upstream(
        self, texts: list[str], owner: str | None
    ) -> tuple[np.ndarray, list[int], list[bool]]:
        # The backend counts at the runtime: batches and the quota go by an estimate until it has.
        sizes = self.model.estimate(texts)
        estimate = sum(sizes)
        owed, self.owed = self.owed, 0
        await self.charge(owed + estimate)
        before = self.progress.counted_tokens
        wait = min(self.max_wait_s, self.ends - time.monotonic())
        vectors = await self.model.embed(
            texts,
            [[] for _ in texts],
            owner=owner,
            max_wait_s=wait,
            progress=self.progress,
            sizes=sizes,
            background=self.background,
        )
        counted = self.progress.counted_tokens - before
        if self.key is not None and counted != estimate:
            await self.key.refund_tokens(estimate - counted)  # the estimate, corrected either way
            self.charged += counted - estimate
            self.billed += counted - estimate
        return vectors, _share(counted, sizes), [False] * len(texts)


def _share(total: int, weights: list[int]) -> list[int]:
    """`total` split in proportion to `weights`, in whole numbers that add up to it (largest remainders)."""
    whole = sum(weights) or 1
    exact = [total * w / whole for w in weights]
    out = [int(x) for x in exact]
    for i in sorted(range(len(weights)), key=lambda i: exact[i] - out[i], reverse=True)[: total - sum(out)]:
        out[i] += 1
    return out


async def _through_cache(
    cache: Cache, job: Job, texts: list[str], notes: MutableMapping[str, Any]
) -> tuple[np.ndarray, list[int], list[bool]]:
    """`job.compute` for the inputs no cache entry holds, computed once however often they repeat (in this
    request, or in others in flight now); entries for the rest. Same vectors, counts and order as uncached."""
    model = job.model
    assert model.identity is not None and model.info is not None
    # `texts` carry the prompt in front; the key holds it apart from the text.
    cut_at = len(job.prompt)
    keys = [cache_key(model.identity, job.side, job.prompt, text[cut_at:]) for text in texts]
    found = await cache.lookup(model.name, keys, dimension=model.info.dimension)
    hits = sum(e is not None for e in found)
    notes.setdefault("headers", {})["X-Cache-Hits"] = str(hits)
    entries: dict[bytes, Entry] = {k: e for k, e in zip(keys, found, strict=True) if e is not None}
    # Cached inputs count against the key's quota as computed ones do (a hit is the same answer), in the one
    # charge with the inputs computed here: two checks would refuse what the sum alone passes.
    job.owed = sum(e.tokens for e in found if e is not None)
    missing = list(dict.fromkeys(k for k, e in zip(keys, found, strict=True) if e is None))
    others = {k: cache.inflight[k] for k in missing if k in cache.inflight}
    mine = [k for k in missing if k not in others]
    # Where each key first appears in the request (errors name that input); None for a one-input request.
    first = {k: i for i, k in reversed(list(enumerate(keys)))}
    if mine:
        await _compute_into(cache, job, texts, [first[k] for k in mine], mine, entries, claim=True)
    retry: list[bytes] = []
    for k, future in others.items():
        try:
            # Shielded: this request giving up must not cancel the computation others wait for.
            entries[k] = await asyncio.shield(future)
        except _Abandoned:
            retry.append(k)  # the request computing it failed or gave up: compute it here
    if retry:
        await _compute_into(cache, job, texts, [first[k] for k in retry], retry, entries, claim=False)
    vectors = np.empty((len(texts), model.info.dimension), dtype=np.float32)
    for i, k in enumerate(keys):
        vectors[i] = entries[k].vector
    counts = [entries[k].tokens for k in keys]
    # Repeats of an input, and inputs another request computed, are charged as an uncached request would be.
    await job.charge(sum(counts) - job.billed)
    return vectors, counts, [entries[k].cut for k in keys]


class _Abandoned(Exception):
    """The request computing an input others wait for did not finish."""


async def _compute_into(
    cache: Cache,
    job: Job,
    texts: list[str],
    positions: list[int],
    keys: list[bytes],
    entries: dict[bytes, Entry],
    claim: bool,
) -> None:
    """Compute the inputs at `positions` of `texts` (keys `keys`) into `entries` and the cache; with `claim`,
    requests arriving meanwhile wait for these results instead of computing them again."""
    loop = asyncio.get_running_loop()
    futures: list[asyncio.Future[Entry]] = []
    if claim:
        for k in keys:
            future: asyncio.Future[Entry] = loop.create_future()
            # A failure nobody waited for is not an error to report.
            future.add_done_callback(lambda f: f.cancelled() or f.exception())
            cache.inflight[k] = future
            futures.append(future)
    try:
        counted = sum(e.tokens for e in entries.values())
        named = positions if len(texts) > 1 else None
        vectors, counts, cut = await job.compute([texts[i] for i in positions], counted, named)
        fresh = [Entry(vectors[i].copy(), counts[i], cut[i]) for i in range(len(positions))]
        cache.put(keys, fresh)
        for k, entry, future in zip(keys, fresh, futures or [None] * len(keys), strict=True):
            entries[k] = entry
            if future is not None:
                future.set_result(entry)
    finally:
        for k, future in zip(keys, futures, strict=False):
            if not future.done():
                future.set_exception(_Abandoned())
            if cache.inflight.get(k) is future:
                del cache.inflight[k]


def _output(body: EmbeddingRequest) -> Output:
    fmt, kind = body.encoding_format, body.embedding_type
    if fmt in ("float", "base64"):
        return Output(kind or "float", fmt == "base64")
    if kind is not None and kind != fmt:
        raise GatewayError(
            400,
            f"`embedding_type` {kind!r} contradicts `encoding_format` {fmt!r}; give the type in one of them "
            '(`encoding_format` "base64" packs any `embedding_type`)',
            param="embedding_type",
            code="invalid_value",
        )
    return Output(fmt, False)  # type: ignore[arg-type]


def _prepare(
    model: ServedModel, body: EmbeddingRequest, texts: list[str], notes: MutableMapping[str, Any]
) -> tuple[list[str], str, int, inputs.Side | None]:
    """The texts with the request's prompt in front, the prompt, its token count, and the truncation side."""
    assert model.info is not None
    name = inputs.choose_prompt(model.name, model.prompts, model.default_prompt_name, body.prompt_name, body.input_type)
    side = inputs.truncation(body.truncate, model.spec.config.truncate)
    if name is None:
        return texts, "", 0, side
    notes.setdefault("headers", {})["X-Prompt-Name"] = name
    prompt = model.prompts[name]
    return [prompt + text for text in texts], prompt, model.prompt_tokens[name], side


async def _tokens(
    model: ServedModel,
    texts: list[str],
    max_total: int,
    side: inputs.Side | None = None,
    keep: int = 0,
    counted: int = 0,
    positions: list[int] | None = None,
) -> tuple[list[list[int]], int, set[int]]:
    """Token ids per text, checked against the model's per-input limit (or cut to it on `side`, keeping the
    first `keep` tokens, the prompt's, when cutting the start) and the per-request total (`counted`: tokens
    of the request's inputs not in `texts`); with their total and the positions of the inputs cut.

    A large request is tokenized in chunks and checked after each: the first input over the limit stops
    it, and other requests' chunks take turns with its chunks on the model's tokenizer thread.
    """
    assert model.info is not None
    limit = model.max_input_tokens
    ids: list[list[int]] = []
    total = 0
    cut: set[int] = set()
    for start, end in _chunks(texts):
        part = await model.tokenize(texts[start:end])
        for k, one in enumerate(part, start):
            if len(one) > limit:
                if positions is not None:
                    where = f"input[{positions[k]}]"
                else:
                    where = "input" if len(texts) == 1 else f"input[{k}]"
                one = part[k - start] = _cut_to_limit(model, one, where, side, keep)
                cut.add(k)
            total += len(one)
        ids.extend(part)
        if counted + total > max_total:
            so_far = "in all" if end == len(texts) else f"in its first {end} inputs"
            raise GatewayError(
                400,
                f"request has {counted + total} tokens {so_far}; the limit is {max_total} tokens per request",
                param="input",
                code="too_many_tokens",
            )
    return ids, total, cut


def _cut_to_limit(model: ServedModel, ids: list[int], where: str, side: inputs.Side | None, keep: int) -> list[int]:
    """The ids of the input at `where`, over the model's limit, cut to it on `side` (keeping the first `keep`
    tokens when cutting the start); 400 when not truncating or when the model cannot cut."""
    assert model.info is not None
    limit, frame, n = model.max_input_tokens, model.frame, len(ids)
    if side is None:
        raise GatewayError(
            400,
            f"`{where}` has {n} tokens; model {model.name!r} accepts at most {limit} tokens per input "
            "(set `truncate` to embed a part of it)",
            param=where,
            code="input_too_long",
        )
    if not model.info.embeds_token_ids:
        raise GatewayError(
            400,
            f"`{where}` has {n} tokens, over the limit of {limit}, and model {model.name!r} cannot "
            "truncate: its backend embeds the text itself, not the token ids the gateway would cut",
            param="truncate",
            code="truncation_not_supported",
        )
    fixed = frame.head + frame.tail + (keep if side == "start" else 0)
    if limit <= fixed:
        raise GatewayError(
            400,
            f"`{where}` cannot be cut to {limit} tokens: its prompt takes {keep} of them",
            param="prompt_name",
            code="input_too_long",
        )
    return inputs.cut(ids, limit, side, frame, keep)


def _chunks(texts: list[str]) -> list[tuple[int, int]]:
    """(start, end) of consecutive runs of about _CHUNK_CHARS characters (one run for a small request)."""
    if len(texts) == 1:
        return [(0, 1)]
    chunks: list[tuple[int, int]] = []
    start, size = 0, 0
    for i, text in enumerate(texts):
        size += len(text)
        if size >= _CHUNK_CHARS:
            chunks.append((start, i + 1))
            start, size = i + 1, 0
    if start < len(texts):
        chunks.append((start, len(texts)))
    return chunks


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
        inputs.check_text("input" if isinstance(body.input, str) else f"input[{i}]", text, max_chars)
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


def _response(vectors: np.ndarray, body: EmbeddingRequest, tokens: int, output: Output) -> EmbeddingResponse:
    return EmbeddingResponse(
        id=f"embed-{new_id()}",
        data=_encode(vectors, output),
        model=body.model,
        created=float(int(time.time())),
        usage=Usage(prompt_tokens=tokens, total_tokens=tokens),
    )


def _encode(vectors: np.ndarray, output: Output) -> list[EmbeddingData]:
    if output.packed:
        # Little-endian float32 bytes (what the official OpenAI client decodes; bit-exact), or the compact
        # type's own bytes.
        raw = quantize.quantize(vectors, output.kind, output.ranges)
        return [EmbeddingData(embedding=base64.b64encode(row.tobytes()).decode(), index=i) for i, row in enumerate(raw)]
    if output.kind != "float":
        values = quantize.quantize(vectors, output.kind, output.ranges)
        return [EmbeddingData(embedding=row, index=i) for i, row in enumerate(values.tolist())]
    # A float32 widened to a double prints 17 digits; 9 decimals (absolute error <= 5e-10, below float32's
    # resolution near 1) make the JSON a third smaller for the same vectors.
    rows = np.round(vectors.astype(np.float64), 9).tolist()
    return [EmbeddingData(embedding=row, index=i) for i, row in enumerate(rows)]


def response(vectors: np.ndarray, body: EmbeddingRequest, tokens: int, output: Output) -> EmbeddingResponse:
    """The `/v1/embeddings` answer for `request_vectors`' result (a Batch API output line's body)."""
    return _response(vectors, body, tokens, output)
