"""Ollama's embedding routes: `POST /api/embed` and the legacy `POST /api/embeddings`, errors as `{"error": ...}`.

Decisions: unknown fields are ignored, as Ollama's own server (Go's JSON decoding) ignores them, so that the
clients written for it (Open WebUI, LangChain's and LlamaIndex's Ollama embedders) send what they like;
`keep_alive` and `options` are accepted and have no effect (models here stay loaded). `truncate` defaults to
true as in Ollama. A `model` written with Ollama's `:latest` tag is the model of that name without it.
`load_duration` is 0: a model is loaded before it serves. The legacy route answers the model's own vectors
(normalized when the model normalizes; Ollama's legacy route never normalizes).
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import msgspec
from litestar import Request, Response, post
from litestar.openapi import ResponseSpec
from litestar.params import JSONBody

from gateway.api.compat.common import (
    Described,
    Shape,
    answer,
    model_named,
    per_model,
    read,
    text_limits,
    texts_limits,
    vectors,
)
from gateway.api.compat.common import gateway as gateway_of
from gateway.api.decoding import BodyDecoder
from gateway.base.schemas import EmbeddingRequest, Text
from gateway.embedding import service


class OllamaEmbedRequest(msgspec.Struct, kw_only=True):
    """Body of POST /api/embed (Ollama's shape)."""

    model: str
    input: Text | Annotated[list[Text], msgspec.Meta(min_length=1)]
    # Inputs over the model's limit: cut at the end (true, Ollama's default) or refused (false).
    truncate: bool = True
    dimensions: Annotated[int, msgspec.Meta(ge=1)] | None = None
    # Accepted for Ollama's clients; models here stay loaded and take no runtime options per request.
    keep_alive: float | str | None = None
    options: dict[str, Any] | None = None


class OllamaEmbeddingsRequest(msgspec.Struct, kw_only=True):
    """Body of POST /api/embeddings (Ollama's legacy shape: one text)."""

    model: str
    prompt: Text
    keep_alive: float | str | None = None
    options: dict[str, Any] | None = None


class OllamaEmbedResponse(msgspec.Struct, kw_only=True):
    model: str
    embeddings: list[list[float]]
    # Nanoseconds, as Ollama reports them.
    total_duration: int
    load_duration: int
    prompt_eval_count: int


class OllamaEmbeddingsResponse(msgspec.Struct, kw_only=True):
    embedding: list[float]


class OllamaError(msgspec.Struct, kw_only=True):
    """Every error on Ollama's routes: Ollama's shape."""

    error: str


def _error(status: int, message: str, code: str | None) -> tuple[int, Any]:
    return status, {"error": message}


SHAPE = Shape(_error)
LEGACY = Shape(_error, {"input": "prompt"})
_EMBED = BodyDecoder(OllamaEmbedRequest)
_LEGACY = BodyDecoder(OllamaEmbeddingsRequest)
_RESPONSES = {
    s: ResponseSpec(data_container=OllamaError, description="Ollama-shaped error")
    for s in (400, 401, 403, 404, 413, 429, 500, 503, 504)
}


@post("/api/embed", status_code=200, include_in_schema=False, exception_handlers=SHAPE.handlers())
async def ollama_embed(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Ollama's /api/embed over the embedding pipeline."""
    started = time.perf_counter_ns()
    body: OllamaEmbedRequest = await read(request, _EMBED)
    model = model_named(gateway_of(request), body.model)
    ours = EmbeddingRequest(model=model, input=body.input, dimensions=body.dimensions, truncate=body.truncate)
    rows, tokens, _ = await vectors(request, ours)

    def encode() -> bytes:
        return msgspec.json.encode(
            OllamaEmbedResponse(
                model=body.model,
                embeddings=service.values(rows, "float", None),
                total_duration=time.perf_counter_ns() - started,
                load_duration=0,
                prompt_eval_count=tokens,
            )
        )

    return answer(request, await service.off_loop(rows, encode))


@post("/api/embeddings", status_code=200, include_in_schema=False, exception_handlers=LEGACY.handlers())
async def ollama_embeddings(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Ollama's legacy /api/embeddings (one `prompt`, one `embedding`) over the embedding pipeline."""
    body: OllamaEmbeddingsRequest = await read(request, _LEGACY)
    model = model_named(gateway_of(request), body.model)
    rows, _, _ = await vectors(request, EmbeddingRequest(model=model, input=body.prompt))
    one = OllamaEmbeddingsResponse(embedding=service.values(rows, "float", None)[0])
    return answer(request, msgspec.json.encode(one))


@post("/api/embed", status_code=200, summary="Create embeddings (Ollama)", responses=_RESPONSES)
async def _embed(data: JSONBody[OllamaEmbedRequest]) -> OllamaEmbedResponse:
    """Ollama's `POST /api/embed`: `model`, `input` (a string or a list), `truncate`, `dimensions`."""
    raise NotImplementedError  # never routed: it only describes `ollama_embed` for /schema


@post("/api/embeddings", status_code=200, summary="Create one embedding (Ollama, legacy)", responses=_RESPONSES)
async def _embeddings(data: JSONBody[OllamaEmbeddingsRequest]) -> OllamaEmbeddingsResponse:
    """Ollama's legacy `POST /api/embeddings`: `model` and one `prompt`."""
    raise NotImplementedError  # never routed: it only describes `ollama_embeddings` for /schema


DESCRIBED = [
    Described(
        "OllamaEmbedRequest",
        OllamaEmbedRequest,
        lambda gw, props: texts_limits(gw, props["input"]),
        lambda gw, key, body: per_model(gw, key, body, "model", "dimensions"),
    ),
    Described(
        "OllamaEmbeddingsRequest",
        OllamaEmbeddingsRequest,
        lambda gw, props: text_limits(gw, props["prompt"]),
        lambda gw, key, body: per_model(gw, key, body, "model", None),
    ),
]
ROUTES = [ollama_embed, ollama_embeddings]
DESCRIPTIONS = [_embed, _embeddings]
