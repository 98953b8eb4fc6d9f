"""Cohere's v2 embed route: `POST /v2/embed`, errors as Cohere's `{"id", "message"}`.

Decisions: unknown fields are refused (400 naming the field), as on our own routes; the fields the `cohere`
client sends for text are all known (`priority` is accepted and has no effect; `images`, `inputs` and
`max_tokens` are not served and are refused as unknown). `input_type` picks the model's prompt as it does on
/v1/embeddings (`search_query` -> the prompt named `query` or `search_query`, ...; a model without one gets
none). Several `embedding_types` are one computation: the float vectors are computed once and each type is
made from them with the model's one set of int8/uint8 ranges. `truncate` defaults to `END`, as in Cohere's API.
"""

from __future__ import annotations

import base64
import uuid
from typing import Annotated, Any, Literal

import msgspec
from litestar import Request, Response, post
from litestar.openapi import ResponseSpec
from litestar.params import JSONBody

from gateway.api.compat.common import Described, Shape, answer, per_model, read, texts_limits, vectors
from gateway.api.decoding import BodyDecoder
from gateway.base.schemas import EmbeddingRequest, Text
from gateway.embedding import service
from gateway.runtime import quantize

CohereType = Literal["float", "int8", "uint8", "binary", "ubinary", "base64"]


class CohereEmbedRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Body of POST /v2/embed (Cohere's v2 shape, text only)."""

    model: str
    texts: Annotated[list[Text], msgspec.Meta(min_length=1)]
    input_type: Literal["search_document", "search_query", "classification", "clustering"] | None = None
    embedding_types: Annotated[list[CohereType], msgspec.Meta(min_length=1)] = msgspec.field(
        default_factory=lambda: ["float"]
    )
    output_dimension: Annotated[int, msgspec.Meta(ge=1)] | None = None
    truncate: Literal["NONE", "START", "END"] = "END"
    # Accepted for Cohere's client; requests here are served in arrival order.
    priority: int | None = None


class CohereEmbeddings(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One list per type asked for (the others absent)."""

    float_: list[list[float]] | None = msgspec.field(default=None, name="float")
    int8: list[list[int]] | None = None
    uint8: list[list[int]] | None = None
    binary: list[list[int]] | None = None
    ubinary: list[list[int]] | None = None
    base64: list[str] | None = None


class CohereBilledUnits(msgspec.Struct, kw_only=True):
    input_tokens: int


class CohereApiVersion(msgspec.Struct, kw_only=True):
    version: str = "2"


class CohereMeta(msgspec.Struct, kw_only=True):
    api_version: CohereApiVersion
    billed_units: CohereBilledUnits


class CohereEmbedResponse(msgspec.Struct, kw_only=True):
    id: str
    embeddings: CohereEmbeddings
    texts: list[str]
    meta: CohereMeta
    response_type: Literal["embeddings_by_type"] = "embeddings_by_type"


class CohereError(msgspec.Struct, kw_only=True):
    """Every error on Cohere's route: Cohere's shape."""

    id: str
    message: str


def _error(status: int, message: str, code: str | None) -> tuple[int, Any]:
    return status, {"id": str(uuid.uuid4()), "message": message}


SHAPE = Shape(_error, {"input": "texts", "dimensions": "output_dimension"})
_DECODER = BodyDecoder(CohereEmbedRequest)
_TRUNCATE: dict[str, bool | Literal["start", "end"]] = {"NONE": False, "START": "start", "END": "end"}


@post("/v2/embed", status_code=200, include_in_schema=False, exception_handlers=SHAPE.handlers())
async def cohere_embed(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Cohere's /v2/embed over the embedding pipeline."""
    body: CohereEmbedRequest = await read(request, _DECODER)
    types = list(dict.fromkeys(body.embedding_types))
    # The request asks the pipeline for a calibrated type when it wants one, so that the answer carries the
    # model's ranges; every type is then made from the same float vectors.
    calibrated = next((t for t in types if t in quantize.CALIBRATED), None)
    ours = EmbeddingRequest(
        model=body.model,
        input=body.texts,
        dimensions=body.output_dimension,
        input_type=body.input_type,
        truncate=_TRUNCATE[body.truncate],
        embedding_type=calibrated,
    )
    rows, tokens, output = await vectors(request, ours)

    def encode() -> bytes:
        by_type: dict[str, Any] = {}
        for kind in types:
            if kind == "base64":
                packed = quantize.quantize(rows, "float")
                by_type["base64"] = [base64.b64encode(row.tobytes()).decode() for row in packed]
            else:
                by_type["float_" if kind == "float" else kind] = service.values(rows, kind, output.ranges)
        meta = CohereMeta(api_version=CohereApiVersion(), billed_units=CohereBilledUnits(input_tokens=tokens))
        response = CohereEmbedResponse(
            id=str(uuid.uuid4()), embeddings=CohereEmbeddings(**by_type), texts=body.texts, meta=meta
        )
        return msgspec.json.encode(response)

    return answer(request, await service.off_loop(rows, encode))


@post(
    "/v2/embed",
    status_code=200,
    summary="Create embeddings (Cohere v2)",
    responses={
        s: ResponseSpec(data_container=CohereError, description="Cohere-shaped error")
        for s in (400, 401, 403, 404, 413, 429, 500, 503, 504)
    },
)
async def _embed(data: JSONBody[CohereEmbedRequest]) -> CohereEmbedResponse:
    """Cohere's `POST /v2/embed`: `model`, `texts`, `input_type`, `embedding_types`, `output_dimension`,
    `truncate`."""
    raise NotImplementedError  # never routed: it only describes `cohere_embed` for /schema


DESCRIBED = [
    Described(
        "CohereEmbedRequest",
        CohereEmbedRequest,
        lambda gw, props: texts_limits(gw, props["texts"]),
        lambda gw, key, body: per_model(gw, key, body, "model", "output_dimension"),
    )
]
ROUTES = [cohere_embed]
DESCRIPTIONS = [_embed]
