"""text-embeddings-inference's routes: `POST /embed` and `POST /tokenize`; errors as TEI's `{"error", "error_type"}`.

Decisions: TEI serves one model and its requests name none, so these routes serve the first embedding model
of gateway.toml.
Unknown fields are refused, as on our own routes; every field huggingface_hub's `feature_extraction` sends for
TEI is known except `encoding_format` (an OpenAI field, refused as unknown). `truncate` absent leaves the
model's configured default (TEI's is its `--auto-truncate` flag); `truncation_direction` `Right` (TEI's
default) cuts the end, `Left` the start, in TEI's spelling or lower case. `normalize: true` (the default)
scales each vector to unit length; `normalize: false` answers the model's own output, which is already unit
length for a model that normalizes (a sentence-transformers folder ending in a Normalize module), where TEI
would answer the pooled vector before it. Bad input is a 400, as on every route, in TEI's body with TEI's
`error_type` names: `Empty` for an empty input, `Validation` for any other (TEI itself answers 413 or 422 there;
its clients raise on either), 429 `Overloaded`, 503 `Unhealthy`, other server errors `Backend`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
import numpy as np
from litestar import Request, Response, post
from litestar.openapi import ResponseSpec
from litestar.params import JSONBody

from gateway.api.compat.common import (
    Described,
    Shape,
    answer,
    default_model,
    embedding_models,
    read,
    texts_limits,
    vectors,
)
from gateway.api.compat.common import gateway as gateway_of
from gateway.api.decoding import BodyDecoder
from gateway.base.schemas import EmbeddingRequest, Text
from gateway.embedding import service
from gateway.embedding.state import Gateway
from gateway.plugin import TokenSpan
from gateway.runtime.hf import l2_normalize
from gateway.shared.keys import ApiKey


class TeiEmbedRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Body of POST /embed (TEI's shape)."""

    inputs: Text | Annotated[list[Text], msgspec.Meta(min_length=1)]
    normalize: bool = True
    # Inputs over the model's limit: cut (true) or refused (false); absent: the model's configured default.
    truncate: bool | None = None
    truncation_direction: Literal["Right", "Left", "right", "left"] = "Right"
    prompt_name: Annotated[str, msgspec.Meta(min_length=1)] | None = None
    dimensions: Annotated[int, msgspec.Meta(ge=1)] | None = None


class TeiTokenizeRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Body of POST /tokenize (TEI's shape)."""

    inputs: Text | Annotated[list[Text], msgspec.Meta(min_length=1)]
    add_special_tokens: bool = True
    prompt_name: Annotated[str, msgspec.Meta(min_length=1)] | None = None


class TeiError(msgspec.Struct, kw_only=True):
    """Every error on TEI's routes: TEI's shape."""

    error: str
    error_type: str


_TYPES = {401: "Unauthorized", 403: "Unauthorized", 429: "Overloaded", 503: "Unhealthy"}


def _error(status: int, message: str, code: str | None) -> tuple[int, Any]:
    if status == 400:
        return 400, {"error": message, "error_type": "Empty" if code == "empty_input" else "Validation"}
    kind = {401: "Unauthorized", 403: "Unauthorized", 429: "Overloaded", 503: "Unhealthy"}.get(
        status, "Backend" if status >= 500 else "Validation"
    )
    return status, {"error": message, "error_type": kind}


SHAPE = Shape(_error, {"input": "inputs"})
_DECODER = BodyDecoder(TeiEmbedRequest)
_TOKENIZE = BodyDecoder(TeiTokenizeRequest)
_RESPONSES = {
    s: ResponseSpec(data_container=TeiError, description="TEI-shaped error")
    for s in (400, 401, 403, 404, 413, 429, 500, 503, 504)
}


def _truncate(body: TeiEmbedRequest) -> bool | Literal["start", "end"] | None:
    if body.truncate is None or body.truncate is False:
        return body.truncate
    return "start" if body.truncation_direction.lower() == "left" else "end"


@post("/embed", status_code=200, include_in_schema=False, exception_handlers=SHAPE.handlers())
async def tei_embed(request: Request[Any, Any, Any]) -> Response[bytes]:
    """TEI's /embed over the embedding pipeline, on the first configured model."""
    body: TeiEmbedRequest = await read(request, _DECODER)
    model = default_model(gateway_of(request))
    ours = EmbeddingRequest(
        model=model.name,
        input=body.inputs,
        dimensions=body.dimensions,
        prompt_name=body.prompt_name,
        truncate=_truncate(body),
    )
    rows, _, _ = await vectors(request, ours)

    def encode() -> bytes:
        # A model that normalizes answers unit vectors already: scaled again, they would move in their last bits
        # and differ from /v1/embeddings' for the same text.
        unit = np.allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)
        return msgspec.json.encode(
            service.values(l2_normalize(rows) if body.normalize and not unit else rows, "float", None)
        )

    return answer(request, await service.off_loop(rows, encode))


@post("/tokenize", status_code=200, include_in_schema=False, exception_handlers=SHAPE.handlers())
async def tei_tokenize(request: Request[Any, Any, Any]) -> Response[bytes]:
    """TEI's /tokenize on the first configured model: each input's tokens, their text and character offsets."""
    body: TeiTokenizeRequest = await read(request, _TOKENIZE)
    gw = gateway_of(request)
    ours = EmbeddingRequest(model=default_model(gw).name, input=body.inputs, prompt_name=body.prompt_name)
    state = request.scope["state"]
    spans = await service.token_spans(gw, ours, state["api_key"], body.add_special_tokens, state)
    return answer(request, msgspec.json.encode(spans))


@post(
    "/embed",
    status_code=200,
    summary="Create embeddings (text-embeddings-inference)",
    responses=_RESPONSES,
)
async def _embed(data: JSONBody[TeiEmbedRequest]) -> list[list[float]]:
    """TEI's `POST /embed` on the first configured model: `inputs` (a string or a list), `normalize`,
    `truncate`, `truncation_direction`, `prompt_name`, `dimensions`; a list of vectors back."""
    raise NotImplementedError  # never routed: it only describes `tei_embed` for /schema


@post("/tokenize", status_code=200, summary="Tokenize (text-embeddings-inference)", responses=_RESPONSES)
async def _tokenize(data: JSONBody[TeiTokenizeRequest]) -> list[list[TokenSpan]]:
    """TEI's `POST /tokenize` on the first configured model: `inputs`, `add_special_tokens`, `prompt_name`; for
    each input its tokens (`id`, `text`, `special`, and `start`/`stop`, character offsets, null for a special
    token)."""
    raise NotImplementedError  # never routed: it only describes `tei_tokenize` for /schema


def _keyed(gw: Gateway, key: ApiKey, body: dict[str, Any]) -> None:
    # The one model the route serves: its own `dimensions` and prompt names.
    props = body["properties"]
    model = next(iter(embedding_models(gw)), None)
    if model is None or not key.may_use(model.name):
        return
    if "dimensions" in props:
        dims = sorted(model.spec.config.matryoshka_dimensions or ())
        props["dimensions"]["anyOf"][0] = {"type": "integer", "enum": dims} if dims else {"not": {}}
    prompts = sorted(model.prompt_names())
    props["prompt_name"]["anyOf"][0] = {"type": "string", "enum": prompts} if prompts else {"not": {}}


DESCRIBED = [
    Described("TeiEmbedRequest", TeiEmbedRequest, lambda gw, props: texts_limits(gw, props["inputs"]), _keyed),
    Described("TeiTokenizeRequest", TeiTokenizeRequest, lambda gw, props: texts_limits(gw, props["inputs"]), _keyed),
]
ROUTES = [tei_embed, tei_tokenize]
DESCRIPTIONS = [_embed, _tokenize]
