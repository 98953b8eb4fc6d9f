"""The rerank routes: Cohere's and Jina's shape (POST /v1/rerank, /v2/rerank, /api/v3/inference/rerank) and
text-embeddings-inference's (POST /rerank). Each parses its own body into the one `RerankQuery`, runs the one use
case (gateway/embedding/rerank.py) and writes the answer and its errors in the shape its clients read.

Bodies are decoded by `BodyDecoder` (the gateway's own words for every malformed field), so the handlers take
the raw request; the schema of each body is described by a twin handler (`document`), as for the embeddings
route.
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Litestar, Request, Response, post
from litestar.openapi import ResponseSpec
from litestar.params import JSONBody

from gateway.api.decoding import BodyDecoder
from gateway.api.routes import require_key
from gateway.base.asgi import client_deadline
from gateway.base.errors import EXCEPTION_HANDLERS, GatewayError, error_body, error_responses
from gateway.base.observability import new_id
from gateway.base.schemas import (
    RerankBilled,
    RerankMeta,
    RerankQuery,
    RerankRequest,
    RerankResponse,
    RerankResult,
    RerankResultDocument,
    RerankTokens,
    RerankUsage,
    TeiError,
    TeiRank,
    TeiRerankRequest,
)
from gateway.embedding.rerank import Ranked, ranked
from gateway.embedding.state import Gateway
from gateway.shared.keys import ApiKey

COHERE_PATHS = ["/v1/rerank", "/v2/rerank", "/api/v3/inference/rerank"]
TEI_PATH = "/rerank"
_COHERE = BodyDecoder(RerankRequest)
_TEI = BodyDecoder(TeiRerankRequest)
_STATUSES = (400, 401, 403, 404, 413, 429, 500, 503, 504)


def _cohere_error(status: int, message: str, param: str | None, code: str | None) -> dict[str, Any]:
    # Cohere's clients read `message`, OpenAI-style ones `error`: both, so every client finds its words.
    return {"message": message, **error_body(status, message, param, code)}


def _tei_error(status: int, message: str, param: str | None, code: str | None) -> dict[str, Any]:
    kind = {401: "Unauthorized", 403: "Unauthorized", 404: "Validation", 429: "Overloaded", 503: "Unhealthy"}
    return {"error": message, "error_type": kind.get(status, "Backend" if status >= 500 else "Validation")}


def _handlers(shape: Any) -> dict[type[Exception] | int, Any]:
    """The app's exception handlers, their answers rewritten into `shape` (same status and headers)."""

    def wrap(handler: Any) -> Any:
        def answer(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
            out = handler(request, exc)
            detail = out.content["error"]
            body = shape(out.status_code, detail["message"], detail["param"], detail["code"])
            return Response(body, status_code=out.status_code, headers=out.headers)

        return answer

    return {kind: wrap(handler) for kind, handler in EXCEPTION_HANDLERS.items()}


async def _body(request: Request[Any, Any, Any], decoder: BodyDecoder) -> Any:
    # Litestar reads the body under the app's size limit (413 beyond it).
    return decoder.decode(await request.body())


@post(
    COHERE_PATHS,
    status_code=200,
    guards=[require_key],
    include_in_schema=False,
    exception_handlers=_handlers(_cohere_error),
)
async def serve_rerank(request: Request[Any, Any, Any]) -> RerankResponse:
    """Rerank documents against a query (Cohere's and Jina's shape)."""
    body: RerankRequest = await _body(request, _COHERE)
    docs = [d if isinstance(d, str) else d.text for d in body.documents]
    cut = body.truncate or body.max_tokens_per_doc is not None
    query = RerankQuery(model=body.model, query=body.query, documents=docs, truncate=cut)
    got = await _ranked(request, query)
    order = _order(got.relevance, int(body.top_n) if body.top_n is not None else None)
    results = [
        RerankResult(
            index=i,
            relevance_score=got.relevance[i],
            document=RerankResultDocument(text=docs[i]) if body.return_documents else msgspec.UNSET,
        )
        for i in order
    ]
    return RerankResponse(
        id=f"rerank-{new_id()}",
        model=body.model,
        results=results,
        meta=RerankMeta(
            billed_units=RerankBilled(search_units=1, input_tokens=got.tokens),
            tokens=RerankTokens(input_tokens=got.tokens),
        ),
        usage=RerankUsage(prompt_tokens=got.tokens, total_tokens=got.tokens),
    )


@post(
    TEI_PATH, status_code=200, guards=[require_key], include_in_schema=False, exception_handlers=_handlers(_tei_error)
)
async def serve_tei_rerank(request: Request[Any, Any, Any]) -> list[TeiRank]:
    """Rerank texts against a query (text-embeddings-inference's shape)."""
    body: TeiRerankRequest = await _body(request, _TEI)
    model = body.model if body.model is not None else _only_reranker(_gateway(request))
    query = RerankQuery(
        model=model, query=body.query, documents=body.texts, truncate=bool(body.truncate), field="texts"
    )
    got = await _ranked(request, query)
    scores = got.raw if body.raw_scores else got.relevance
    return [
        TeiRank(index=i, score=scores[i], text=body.texts[i] if body.return_text else msgspec.UNSET)
        for i in _order(got.relevance, None)
    ]


def _gateway(request: Request[Any, Any, Any]) -> Gateway:
    return request.app.state.gateway  # type: ignore[no-any-return]


def _only_reranker(gw: Gateway) -> str:
    """The model a TEI request without `model` means: the one rerank model configured (TEI serves one)."""
    names = sorted(name for name, m in gw.registry.models.items() if m.spec.task == "rerank")
    if len(names) == 1:
        return names[0]
    which = f"one of {', '.join(names)}" if names else "none is configured"
    raise GatewayError(400, f"name the rerank model with `model` ({which})", param="model", code="model_required")


async def _ranked(request: Request[Any, Any, Any], query: RerankQuery) -> Ranked:
    # The scope's state is the request's notes: the access log and metrics read the model and tokens there.
    state = request.scope["state"]
    return await ranked(_gateway(request), query, state.get("api_key"), state, _deadline(request))


def _deadline(request: Request[Any, Any, Any]) -> float | None:
    return client_deadline(request.headers.get("x-request-timeout-ms"))


def _order(scores: list[float], top_n: int | None) -> list[int]:
    """Document indices by score, best first (ties keep input order), the first `top_n` of them."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    return order[:top_n] if top_n is not None else order


@post(COHERE_PATHS, status_code=200, summary="Rerank documents", responses=error_responses(*_STATUSES))
async def _described_cohere(data: JSONBody[RerankRequest]) -> RerankResponse:
    """Score each document against the query with a rerank model; results sorted by relevance, best first."""
    raise NotImplementedError  # never routed: it only describes `serve_rerank` for /schema


@post(
    TEI_PATH,
    status_code=200,
    summary="Rerank texts (text-embeddings-inference)",
    responses={s: ResponseSpec(data_container=TeiError, description="TEI-shaped error") for s in _STATUSES},
)
async def _described_tei(data: JSONBody[TeiRerankRequest]) -> list[TeiRank]:
    """Score each text against the query; `{index, score}` sorted by score, best first."""
    raise NotImplementedError  # never routed: it only describes `serve_tei_rerank` for /schema


ROUTES = [serve_rerank, serve_tei_rerank]


def document(app: Litestar) -> None:
    """Add the rerank routes to `app`'s OpenAPI schema (their handlers take the raw request)."""
    twin = Litestar(route_handlers=[_described_cohere, _described_tei], openapi_config=app.openapi_config)
    described = twin.openapi_schema
    schema = app.openapi_schema
    schema.paths = {**(schema.paths or {}), **(described.paths or {})}
    schema.components.schemas = {**(described.components.schemas or {}), **(schema.components.schemas or {})}


def request_schemas(gw: Gateway, key: ApiKey | None) -> dict[str, dict[str, Any]]:
    """The rerank bodies' JSON schemas as the API enforces them: msgspec's own with the [server] limits (a
    document given as `{text}` inlined, so its limit is said too); with `key`, `model` names the rerank models
    the key may use (an embedding model is refused there)."""
    server = gw.config.server
    names = sorted(
        label
        for name, m in gw.registry.models.items()
        if m.spec.task == "rerank" and key is not None and key.may_use(name)
        for label in (name, *m.spec.config.aliases)
    )
    out: dict[str, dict[str, Any]] = {}
    for struct, docs in ((RerankRequest, "documents"), (TeiRerankRequest, "texts")):
        spec = msgspec.json.schema(struct)
        body = spec["$defs"][struct.__name__]
        props = body["properties"]
        props["query"]["maxLength"] = server.max_input_chars
        props[docs]["maxItems"] = server.max_documents_per_request
        kinds = props[docs]["items"].get("anyOf", [props[docs]["items"]])
        for i, one in enumerate(kinds):
            if "$ref" in one:
                kinds[i] = one = dict(spec["$defs"][one["$ref"].rsplit("/", 1)[1]])
                one["properties"] = {"text": {**one["properties"]["text"], "maxLength": server.max_input_chars}}
            else:
                one["maxLength"] = server.max_input_chars
        if key is not None:
            model = props["model"]["anyOf"][0] if "anyOf" in props["model"] else props["model"]
            model.update({"enum": names} if names else {"not": {}})
        out[struct.__name__] = body
    return out
