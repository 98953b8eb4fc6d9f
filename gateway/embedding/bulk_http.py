"""`gateway embed-file --url`: the same requests as in-process, POSTed to a running gateway's `/v1/embeddings`."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import numpy as np

from gateway.base.errors import GatewayError
from gateway.embedding.bulk import Embedder, Options
from gateway.embedding.bulk_io import BulkError

# How long a request keeps being retried on 429/503 (the server busy, or its model still loading).
_RETRY_FOR_S = 600.0
# Texts and characters per request, requests in flight: each request a fraction of a second of the model's work,
# so that the server's admission takes the next one behind it (a larger one would be refused with 429).
REQUEST_SIZE, REQUEST_CHARS, CONCURRENCY = 256, 8192, 2


def client(url: str, key: str, concurrency: int) -> Any:
    """An httpx.AsyncClient for `url` with `key` (httpx is the `remote` extra's; imported only here)."""
    try:
        import httpx
    except ImportError:
        raise BulkError("--url needs httpx: pip install 'embedding-gateway[remote]'") from None
    return httpx.AsyncClient(
        base_url=url.rstrip("/"),
        headers={"Authorization": f"Bearer {key}"},
        timeout=httpx.Timeout(300.0, connect=10.0),
        limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
    )


def over_http(http: Any, options: Options) -> Embedder:
    """Requests to `/v1/embeddings` on `http`'s server; 429 and 503 retried after their Retry-After, any other
    refusal a GatewayError with the server's status and message. Token counts are None: the API reports one
    total per request, not each input's."""
    import httpx

    async def embed(texts: list[str]) -> tuple[np.ndarray, list[int | None]]:
        ends = time.monotonic() + _RETRY_FOR_S
        while True:
            try:
                response = await http.post("/v1/embeddings", json=options.wire(texts))
            except httpx.HTTPError as exc:
                raise BulkError(f"cannot reach {http.base_url}: {exc}") from None
            if response.status_code in (429, 503) and time.monotonic() < ends:
                await asyncio.sleep(_retry_after(response.headers.get("Retry-After")))
                continue
            if response.status_code != 200:
                raise _refusal(http, response)
            data = response.json()["data"]
            rows = [np.frombuffer(base64.b64decode(item["embedding"]), np.float32) for item in data]
            return np.stack(rows), [None] * len(texts)

    return Embedder(embed, REQUEST_SIZE, REQUEST_CHARS, CONCURRENCY)


def _retry_after(value: str | None) -> float:
    try:
        return min(max(float(value or 1), 0.05), 30.0)
    except ValueError:
        return 1.0


def _refusal(http: Any, response: Any) -> Exception:
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:200]
    if response.status_code in (401, 403):
        return BulkError(f"{http.base_url} refused the key ({response.status_code}): {message}")
    return GatewayError(response.status_code, message)
