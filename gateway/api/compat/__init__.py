"""The embedding routes in other APIs' shapes, for the clients people already run: text-embeddings-inference's
`POST /embed` (tei), Ollama's `POST /api/embed` and `/api/embeddings` (ollama), Cohere's `POST /v2/embed`
(cohere). Each is a thin adapter over the one pipeline (gateway/embedding/service.py); none is on the hot
OpenAI route's path."""

from __future__ import annotations

from litestar import Litestar

from gateway.api.compat import cohere, ollama, tei
from gateway.api.compat.common import Described, describe, refresh

ROUTES = [*tei.ROUTES, *ollama.ROUTES, *cohere.ROUTES]
#: Their request bodies as documented in /schema (a key's own models named in its keyed copy).
DESCRIBED: list[Described] = [*tei.DESCRIBED, *ollama.DESCRIBED, *cohere.DESCRIBED]


def document(app: Litestar) -> None:
    """Add the compat routes to `app`'s OpenAPI schema."""
    describe(app, [*tei.DESCRIPTIONS, *ollama.DESCRIPTIONS, *cohere.DESCRIPTIONS], DESCRIBED)


def redescribe(app: Litestar) -> None:
    """The request schemas again, after a reload."""
    refresh(app, DESCRIBED)
