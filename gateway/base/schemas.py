"""Wire types (msgspec Structs): requests are decoded and validated into them, and /schema is built from them."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

InputType = Literal[
    "query",
    "search_query",
    "document",
    "search_document",
    "passage",
    "classification",
    "clustering",
]

Text = Annotated[str, msgspec.Meta(min_length=1, description="A text to embed; never empty.")]


class EmbeddingRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Body of POST /v1/embeddings and /api/v3/inference/embeddings."""

    model: str
    input: Text | Annotated[list[Text], msgspec.Meta(min_length=1)]
    dimensions: Annotated[int, msgspec.Meta(ge=1)] | None = None
    # "float" and "base64" are OpenAI's; the others are shorthands for that `embedding_type` as JSON integers.
    encoding_format: Literal["float", "base64", "int8", "uint8", "binary", "ubinary"] = "float"
    # The vector's value type: float32, or a compact type (quantize.py); `encoding_format` "base64" packs any.
    embedding_type: Literal["float", "int8", "uint8", "binary", "ubinary"] | None = None
    # One of the model's named prompts (sentence-transformers' and TEI's name for it), prepended to each input.
    prompt_name: Annotated[str, msgspec.Meta(min_length=1)] | None = None
    # Cohere/Voyage style: what the inputs are; mapped onto the model's prompt names.
    input_type: InputType | None = None
    # Inputs over the model's token limit: refused (false) or cut, keeping the start (true, "end") or the end
    # ("start"). None: the model's configured default.
    truncate: bool | Literal["end", "start"] | None = None
    # Accepted for OpenAI compatibility; not used.
    user: str | None = None


class EmbeddingData(msgspec.Struct, kw_only=True):
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str
    index: int


class Usage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["embedding"] = "embedding"
    data: list[EmbeddingData]
    model: str
    # Unix seconds as a JSON number with a fractional part (1705329600.0).
    created: float
    usage: Usage


class ErrorDetail(msgspec.Struct, kw_only=True):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(msgspec.Struct, kw_only=True):
    """Every non-2xx answer: OpenAI's error shape."""

    error: ErrorDetail


class ModelCard(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "embedding-gateway"
    backend: str
    ready: bool
    state: Literal["loading", "ready", "failed", "unloaded"]
    dimension: int | None
    max_input_tokens: int | None
    matryoshka_dimensions: list[int] | None
    aliases: list[str]
    # Named prompts (`prompt_name`) and the one applied when a request names none.
    prompts: dict[str, str] = {}
    default_prompt_name: str | None = None
    truncate: bool | Literal["end", "start"] = False
    # Models that serve this one's requests when it cannot, and the vector space they share.
    fallbacks: list[str] = []
    embedding_space: str | None = None
    error: str | None = None
    # "embed" (the embedding routes) or "rerank" (the rerank routes; `dimension` is then 1, one score per pair).
    task: Literal["embed", "rerank"] = "embed"
    # A loaded rerank model's activation from raw scores to relevance scores (a gateway in front of this one
    # reads it to recover the raw scores); absent otherwise.
    score_activation: Literal["sigmoid", "identity"] | msgspec.UnsetType = msgspec.UNSET


class ModelList(msgspec.Struct, kw_only=True):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ModelLimits(msgspec.Struct, kw_only=True):
    """A model's batching, queue and circuit limits as configured (`[models.X.batching]`, `[models.X.circuit]`)."""

    max_batch_size: int | None
    max_batch_tokens: int | None
    max_wait_ms: float
    max_queue_wait_ms: float
    max_queue: int
    circuit_failures: int
    circuit_open_s: float


class ModelRuntime(msgspec.Struct, kw_only=True):
    """What an operator looks at for one model (`GET /admin/models`): its card plus where it runs and how full."""

    id: str
    # "in-process", a placement plugin's name ("ray"), or "remote" for a backend that calls an upstream server.
    placement: str
    # Replicas ready and wanted, for a model whose batches run on replicas; absent for one in this process.
    replicas_ready: int | None = None
    replicas: int | None = None
    circuit: Literal["closed", "half-open", "open"]
    # Inputs waiting for a batch, and the seconds until the work queued now is done.
    queue_depth: int
    predicted_wait_s: float
    limits: ModelLimits
    card: ModelCard


class ModelRuntimeList(msgspec.Struct, kw_only=True):
    object: Literal["list"] = "list"
    data: list[ModelRuntime]


class ReloadResult(msgspec.Struct, kw_only=True):
    status: str
    added: list[str]
    changed: list[str]
    removed: list[str]
    # Models of the new config that failed to load (a changed one keeps its previous version serving).
    failed: dict[str, str]
    models: dict[str, str]


class CacheClear(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Body of POST /admin/cache/clear: one model, or (absent) all."""

    model: str | None = None


class CacheCleared(msgspec.Struct, kw_only=True):
    removed: int


class Health(msgspec.Struct, kw_only=True):
    status: str
    models: dict[str, str] = {}
    # "ready/total" per model whose batches run on replicas (Ray), for a key that may use it; absent when none.
    replicas: dict[str, str] | msgspec.UnsetType = msgspec.UNSET
    # "connected/started" front workers, with `[server] workers` > 1; absent with one process.
    workers: str | msgspec.UnsetType = msgspec.UNSET


# Rerank: a query and documents in, one relevance score per document out (gateway/api/rerank.py).


class RerankQuery(msgspec.Struct, kw_only=True):
    """One rerank request as every route's parser hands it to the use case (gateway/embedding/rerank.py)."""

    model: str
    query: str
    documents: list[str]
    # Pairs over the model's token limit: cut (longest first, as sentence-transformers does) or refused (400).
    truncate: bool = False
    # The request's own name for the documents (`documents`, or TEI's `texts`), which errors name.
    field: str = "documents"


RerankText = Annotated[str, msgspec.Meta(min_length=1, description="A query or a document; never empty.")]
# A count as Cohere's and Jina's clients may write it: 3 or 3.0 (a JSON number the schema calls an integer).
Count = Annotated[int, msgspec.Meta(ge=1)] | Annotated[float, msgspec.Meta(ge=1, multiple_of=1)]


class RerankDocument(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    text: RerankText


class RerankRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Body of POST /v1/rerank, /v2/rerank and /api/v3/inference/rerank: Cohere's and Jina's shape."""

    model: str
    query: RerankText
    documents: Annotated[list[RerankText | RerankDocument], msgspec.Meta(min_length=1)]
    # The best `top_n` results only (all by default).
    top_n: Count | None = None
    # Each result carries its document's text (`{"text": ...}`).
    return_documents: bool = False
    # A query/document pair over the model's token limit: refused (false) or cut, longest text first (true).
    truncate: bool = False
    # Cohere's: present, pairs over the model's limit are cut as with `truncate` (the number itself is not used).
    max_tokens_per_doc: Count | None = None
    # Cohere's; accepted, not used.
    priority: Annotated[int, msgspec.Meta(ge=0)] | Annotated[float, msgspec.Meta(ge=0, multiple_of=1)] | None = None


class RerankResultDocument(msgspec.Struct, kw_only=True):
    text: str


class RerankResult(msgspec.Struct, kw_only=True):
    index: int
    relevance_score: float
    document: RerankResultDocument | msgspec.UnsetType = msgspec.UNSET


class RerankTokens(msgspec.Struct, kw_only=True):
    input_tokens: int


class RerankBilled(msgspec.Struct, kw_only=True):
    search_units: int
    input_tokens: int


class RerankMeta(msgspec.Struct, kw_only=True):
    billed_units: RerankBilled
    tokens: RerankTokens


class RerankUsage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    total_tokens: int


class RerankResponse(msgspec.Struct, kw_only=True):
    """Results sorted by relevance, best first; `meta` (Cohere's) and `usage` (Jina's) count the tokens of
    every query/document pair as the model read it."""

    id: str
    model: str
    results: list[RerankResult]
    meta: RerankMeta
    usage: RerankUsage


class TeiRerankRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Body of POST /rerank: text-embeddings-inference's shape (the server's one model unless `model` names
    another)."""

    query: RerankText
    texts: Annotated[list[RerankText], msgspec.Meta(min_length=1)]
    # The model's logits instead of its relevance scores.
    raw_scores: bool = False
    return_text: bool = False
    # A pair over the model's token limit: refused (false, TEI's default) or cut, longest text first.
    truncate: bool | None = None
    # Only "Right" (the end of the longer text is cut, as sentence-transformers cuts a pair).
    truncation_direction: Literal["Right", "right"] = "Right"
    # Ours: the model to use when the server has several rerank models.
    model: str | None = None


class TeiRank(msgspec.Struct, kw_only=True):
    index: int
    score: float
    text: str | msgspec.UnsetType = msgspec.UNSET


class TeiError(msgspec.Struct, kw_only=True):
    """An error answer of POST /rerank, in TEI's shape."""

    error: str
    error_type: str
