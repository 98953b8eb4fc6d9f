"""The rerank use case: a query and its documents, on a model with `task = "rerank"`, to one score per document.

Every rerank route (Cohere/Jina's and TEI's shapes) comes through here with a `RerankQuery`. In order: the model
(404, 403), its task (400 for an embedding model), the query and documents (400: empty, too many, too long), an
empty token quota (429), readiness and the circuit (503), the pairs' tokens and their limits (400 for a pair over
the model's limit unless the request truncates; the per-request total), the key's token quota (429), then the
model's batches, where pairs of concurrent requests are scored together (runtime/batching.Batcher in its scoring
mode), never on the event loop. With `[server] workers` > 1 a front sends the query to the runtime process
(`ranked`), which runs the rest there, unless the model has a copy in each front.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import MutableMapping
from typing import Any

import msgspec
import numpy as np

from gateway.base.errors import GatewayError
from gateway.base.schemas import RerankQuery
from gateway.embedding.service import Failover, Job, settled
from gateway.embedding.state import Gateway
from gateway.runtime import inputs
from gateway.runtime.registry import ServedModel
from gateway.shared.keys import ApiKey


class Ranked(msgspec.Struct, array_like=True):
    """The scores of one rerank request, in document order: the model's raw scores (logits), the relevance
    scores clients get (the model's activation applied, as `CrossEncoder.predict` does), and the tokens of all
    its pairs as the model read them."""

    raw: list[float]
    relevance: list[float]
    tokens: int
    notes: dict[str, Any] = {}


class RerankArgs(msgspec.Struct, array_like=True):
    """One rerank request sent from a front to the runtime process: the query, the key's digest, the deadline."""

    query: RerankQuery
    key: bytes | None
    deadline_s: float | None


async def ranked(
    gw: Gateway, query: RerankQuery, key: ApiKey | None, notes: MutableMapping[str, Any], deadline_s: float | None
) -> Ranked:
    """`rerank` here or, in a front worker, at the runtime process (unless the model is the front's own copy)."""
    if gw.link is None:
        return await rerank(gw, query, key, notes, deadline_s)
    model = gw.registry.find(query.model)
    if model is not None and not model.elsewhere:
        return await rerank(gw, query, key, notes, deadline_s)
    got = await gw.link.call("rerank", RerankArgs(query, key.digest if key else None, deadline_s), Ranked)
    notes.update(got.notes)
    return got


async def rerank(
    gw: Gateway, query: RerankQuery, key: ApiKey | None, notes: MutableMapping[str, Any], deadline_s: float | None
) -> Ranked:
    """The scores of `query.documents` against `query.query` on behalf of `key` (None: no key); GatewayError
    otherwise. `notes` gets the model, then the tokens and inputs of an answered request."""
    server = gw.config.server
    model = gw.registry.handle(query.model, key).model
    notes["model"] = model.name
    if model.spec.task != "rerank":
        raise GatewayError(
            400,
            f'model {model.name!r} is an embedding model (task "{model.spec.task}"); rerank needs a model with '
            'task = "rerank"',
            param="model",
            code="wrong_task",
        )
    _check_texts(query, server.max_documents_per_request, server.max_input_chars)
    if key is not None:
        await key.check_token_quota()
    timeout = min(server.request_timeout_s, deadline_s) if deadline_s is not None else server.request_timeout_s
    try:
        async with asyncio.timeout(timeout):
            raw, tokens = await _scored(gw, model, query, key, time.monotonic() + timeout)
    except TimeoutError:
        raise GatewayError(
            504, f"request did not finish within {timeout:g}s (model {model.name!r})", code="timeout"
        ) from None
    notes["tokens"] = tokens
    notes["inputs"] = len(query.documents)
    assert model.info is not None
    relevance = activate(raw, model.info.score_activation)
    said = {"model": model.name, "tokens": tokens, "inputs": len(query.documents)}
    return Ranked(raw=raw.tolist(), relevance=relevance.tolist(), tokens=tokens, notes=said)


def activate(raw: np.ndarray, activation: str) -> np.ndarray:
    """Relevance scores from raw ones: what `CrossEncoder.predict` applies by default ("sigmoid" for one label)."""
    if activation == "sigmoid":
        return 1.0 / (1.0 + np.exp(-raw.astype(np.float64)))
    return raw.astype(np.float64)


def _check_texts(query: RerankQuery, max_documents: int, max_chars: int) -> None:
    """400 naming the field: an empty query or document, no documents, too many, a text over the characters."""
    docs = query.field
    if not query.query:
        raise GatewayError(400, "`query` is an empty string", param="query", code="empty_input")
    if not query.documents:
        raise GatewayError(400, f"`{docs}` must not be an empty list", param=docs, code="empty_input")
    if len(query.documents) > max_documents:
        raise GatewayError(
            400,
            f"`{docs}` has {len(query.documents)} items; the limit is {max_documents} per request",
            param=docs,
            code="too_many_inputs",
        )
    named = [("query", query.query), *((f"{docs}[{i}]", d) for i, d in enumerate(query.documents))]
    for where, text in named:
        inputs.check_text(where, text, max_chars)


async def _scored(
    gw: Gateway, model: ServedModel, query: RerankQuery, key: ApiKey | None, ends: float
) -> tuple[np.ndarray, int]:
    """The raw scores of the query's pairs on `model`, and their tokens as the model reads them."""
    job = Job(model, key, ends, gw.config.server.max_tokens_per_request)
    with model.in_use():
        try:
            async with settled(job):
                await model.ready(max(0.0, ends - time.monotonic()))
                refused = model.circuit_refusal()
                if refused is not None:
                    raise refused
                owner = key.name if key else None
                limit = model.spec.config.batching.max_queue_wait_ms / 1000
                job.max_wait_s = min(limit, ends - time.monotonic())
                model.precheck(owner=owner, max_wait_s=job.max_wait_s)
                pairs = [(query.query, doc) for doc in query.documents]
                assert model.info is not None
                if not model.info.counts_tokens:
                    return await _scored_upstream(job, model, query, pairs, owner, ends)
                ids = await model.tokenize_pairs(pairs)
                counts = _pair_tokens(model, query, ids, job.max_tokens)
                await job.charge(sum(counts))
                wait = min(job.max_wait_s, ends - time.monotonic())
                raw = await model.score(pairs, ids, owner=owner, max_wait_s=wait, progress=job.progress)
                job.charged = 0  # delivered: the charge stands
        except Failover as exc:  # a rerank model has no fallbacks: its own error is the answer
            raise exc.error from None
    return raw, sum(counts)


async def _scored_upstream(
    job: Job, model: ServedModel, query: RerankQuery, pairs: list[tuple[str, str]], owner: str | None, ends: float
) -> tuple[np.ndarray, int]:
    """`_scored` for a model whose tokens are counted by its runtime (a remote one without a local tokenizer):
    batches and the quota go by an estimate until the runtime has counted, then the charge is corrected; its
    per-pair limit is the runtime's to enforce, so a request that asks to truncate is refused here."""
    if query.truncate:
        raise GatewayError(
            400,
            f"model {model.name!r} cannot truncate: its tokens are counted by its upstream, after the pairs are sent",
            param="truncate",
            code="truncation_not_supported",
        )
    most = model.spec.config.batching.max_queue
    if len(pairs) > most:
        raise GatewayError(
            400,
            f"`{query.field}` has {len(pairs)} items; model {model.name!r} queues at most {most} inputs",
            param=query.field,
            code="too_many_inputs",
        )
    sizes = model.estimate([q + " " + d for q, d in pairs])
    estimate = sum(sizes)
    await job.charge(estimate)
    before = job.progress.counted_tokens
    wait = min(job.max_wait_s, ends - time.monotonic())
    empty: list[list[int]] = [[] for _ in pairs]
    raw = await model.score(pairs, empty, owner=owner, max_wait_s=wait, progress=job.progress, sizes=sizes)
    counted = job.progress.counted_tokens - before
    if job.key is not None and counted != estimate:
        await job.key.refund_tokens(estimate - counted)  # the estimate, corrected either way
    job.charged = 0  # delivered: the charge stands
    return raw, counted


def _pair_tokens(model: ServedModel, query: RerankQuery, ids: list[list[int]], max_total: int) -> list[int]:
    """Each pair's tokens as the model reads it (cut to its limit when the request truncates); 400 for a pair
    over the limit otherwise, for more pairs than the model queues, or for more tokens than a request may have."""
    limit, most = model.max_input_tokens, model.spec.config.batching.max_queue
    if len(ids) > most:
        raise GatewayError(
            400,
            f"`{query.field}` has {len(ids)} items; model {model.name!r} queues at most {most} inputs",
            param=query.field,
            code="too_many_inputs",
        )
    counts: list[int] = []
    for i, one in enumerate(ids):
        if len(one) > limit and not query.truncate:
            where = f"{query.field}[{i}]"
            raise GatewayError(
                400,
                f"the query with `{where}` has {len(one)} tokens; model {model.name!r} accepts at most {limit} "
                f"tokens per query/document pair (set `truncate` to true to cut it)",
                param=where,
                code="input_too_long",
            )
        counts.append(min(len(one), limit))
    if sum(counts) > max_total:
        raise GatewayError(
            400,
            f"request has {sum(counts)} tokens in all; the limit is {max_total} tokens per request",
            param=query.field,
            code="too_many_tokens",
        )
    return counts
