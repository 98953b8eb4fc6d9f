"""The embedding use case: from a decoded request and the caller's key to a response.

The HTTP route and `gateway embed` both come through here. In order: the model (404, 403), the inputs
(400), readiness (503), `dimensions`, tokens and their limits (400), the key's token quota (429), the
model's batches (429 when its queue is full, 500 when a batch fails, 504 past the timeout), then the
Matryoshka cut and the response.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
import uuid
from collections.abc import Callable, MutableMapping
from typing import Any, TypeVar

import msgspec
import numpy as np

from .auth import ApiKey
from .batching import BatchFailed, QueueFull
from .errors import GatewayError
from .hf import l2_normalize
from .observability import new_id
from .registry import ServedModel
from .schemas import EmbeddingData, EmbeddingRequest, EmbeddingResponse, Usage
from .state import Gateway

log = logging.getLogger("gateway")

T = TypeVar("T")

# Responses of more floats than this are built and encoded off the event loop: the largest take a tenth of a
# second of CPU, while a single vector takes microseconds, less than the hop to a thread.
_OFFLOAD_FLOATS = 32_768


async def embed(
    gw: Gateway, body: EmbeddingRequest, key: ApiKey | None = None, notes: MutableMapping[str, Any] | None = None
) -> EmbeddingResponse:
    """The response for `body` on behalf of `key` (None: no key, as `gateway embed` runs).

    `notes` receives what the access log and metrics report: the model once known, then the tokens and
    inputs of a request that was answered. Errors are GatewayError.
    """
    vectors, tokens = await _vectors(gw, body, key, notes if notes is not None else {})
    return await _off_loop(vectors, _response, vectors, body, tokens)


async def embed_json(
    gw: Gateway, body: EmbeddingRequest, key: ApiKey | None = None, notes: MutableMapping[str, Any] | None = None
) -> bytes:
    """`embed`, encoded as the JSON body of the HTTP answer."""
    vectors, tokens = await _vectors(gw, body, key, notes if notes is not None else {})
    return await _off_loop(vectors, lambda *a: msgspec.json.encode(_response(*a)), vectors, body, tokens)


async def _off_loop(vectors: np.ndarray, fn: Callable[..., T], *args: Any) -> T:
    if vectors.size > _OFFLOAD_FLOATS:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
    return fn(*args)


async def _vectors(
    gw: Gateway, body: EmbeddingRequest, key: ApiKey | None, notes: MutableMapping[str, Any]
) -> tuple[np.ndarray, int]:
    server = gw.config.server
    model = gw.registry.resolve(body.model, key)
    if key is not None and not key.may_use(model.name):
        raise GatewayError(
            403, f"this API key may not use model {body.model!r}", param="model", code="model_not_allowed"
        )
    notes["model"] = model.name
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
                token_ids = await model.tokenize(texts)
                total = _check_tokens(texts, token_ids, model, server.max_tokens_per_request)
                if key is not None:
                    key.charge_tokens(total)
                    charged = total
                log.debug("embedding %d texts on %r: %r", len(texts), model.name, texts)
                vectors = await model.embed(texts, token_ids)
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
    notes["tokens"] = total
    notes["inputs"] = len(texts)
    if dims is not None:
        vectors = vectors[:, :dims]
        assert model.info is not None
        if model.info.normalized:
            vectors = l2_normalize(vectors)
    return vectors, total


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


def _check_tokens(texts: list[str], token_ids: list[list[int]], model: ServedModel, max_total: int) -> int:
    limit = model.max_input_tokens
    total = 0
    for i, ids in enumerate(token_ids):
        n = len(ids)
        if n > limit:
            where = "input" if len(texts) == 1 else f"input[{i}]"
            raise GatewayError(
                400,
                f"`{where}` has {n} tokens; model {model.name!r} accepts at most {limit} tokens per input",
                param=where,
                code="input_too_long",
            )
        total += n
    if total > max_total:
        raise GatewayError(
            400,
            f"request has {total} tokens in all; the limit is {max_total} tokens per request",
            param="input",
            code="too_many_tokens",
        )
    return total


def _response(vectors: np.ndarray, body: EmbeddingRequest, tokens: int) -> EmbeddingResponse:
    return EmbeddingResponse(
        id=f"embed-{new_id()}",
        data=_encode(vectors, body.encoding_format),
        model=body.model,
        created=int(time.time()),
        usage=Usage(prompt_tokens=tokens, total_tokens=tokens),
    )


def _encode(vectors: np.ndarray, fmt: str) -> list[EmbeddingData]:
    if fmt == "base64":
        # Little-endian float32 bytes: what the official OpenAI client decodes; bit-exact.
        raw = vectors.astype("<f4", copy=False)
        return [EmbeddingData(embedding=base64.b64encode(row.tobytes()).decode(), index=i) for i, row in enumerate(raw)]
    # A float32 widened to a double prints 17 digits; 9 decimals (absolute error <= 5e-10, below float32's
    # resolution near 1) make the JSON a third smaller for the same vectors.
    rows = np.round(vectors.astype(np.float64), 9).tolist()
    return [EmbeddingData(embedding=row, index=i) for i, row in enumerate(rows)]
