"""The remote backend's rerank half: the request and answer of an upstream's rerank API, in the two shapes
servers speak. "cohere": Cohere's and Jina's `POST {base_url}/rerank` (`query`, `documents`; `results[{index,
relevance_score}]`), which this gateway answers too; "tei": text-embeddings-inference's `POST {base_url}/rerank`
(`query`, `texts`, `raw_scores`; `[{index, score}]`).

`score` returns raw scores (logits). TEI gives them (`raw_scores: true`). A Cohere-shaped upstream gives only
relevance scores: when they are the sigmoid of the logits (what this gateway's /models card says of a reranker),
the logits are recovered exactly enough (float64 logit of a float64 sigmoid) for the front's own activation to give
the upstream's relevance again; otherwise they are passed on as they are, with the activation "identity".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import msgspec
import numpy as np

from gateway.plugin import BackendError, BackendUnavailable, Embedded, ModelInfo

if TYPE_CHECKING:
    import tokenizers

log = logging.getLogger("gateway.remote")

RerankApi = Literal["cohere", "tei"]
Activation = Literal["sigmoid", "identity"]


class _Result(msgspec.Struct):
    index: int
    relevance_score: float


class _Tokens(msgspec.Struct):
    input_tokens: int | None = None


class _Meta(msgspec.Struct):
    tokens: _Tokens | None = None
    billed_units: _Tokens | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int | None = None
    total_tokens: int | None = None


class _CohereReply(msgspec.Struct):
    results: list[_Result]
    meta: _Meta | None = None
    usage: _Usage | None = None


class _TeiRank(msgspec.Struct):
    index: int
    score: float


_COHERE = msgspec.json.Decoder(_CohereReply)
_TEI = msgspec.json.Decoder(list[_TeiRank])


def request(api: RerankApi, model: str, query: str, documents: list[str], cut_at: int | None) -> bytes:
    """The JSON body asking the upstream to score `documents` against `query`; `cut_at`: the model's limit, when a
    pair over it must be cut (the request that holds it asked to truncate)."""
    if api == "tei":
        body: dict[str, object] = {"model": model, "query": query, "texts": documents, "raw_scores": True}
        if cut_at is not None:
            body["truncate"] = True
    else:
        body = {"model": model, "query": query, "documents": documents, "top_n": len(documents)}
        if cut_at is not None:
            # Cohere's own field for cutting (this gateway takes its presence as `truncate`).
            body["max_tokens_per_doc"] = cut_at
    return msgspec.json.encode(body)


def reply(api: RerankApi, content: bytes, n: int, activation: Activation) -> tuple[np.ndarray, list[int | None]]:
    """The raw scores (float64 [n], in document order) of an upstream's answer and the tokens it reports (each
    place a shape may say them); ValueError (or msgspec.DecodeError) for an answer that is not one score per
    document."""
    if api == "tei":
        ranks = _TEI.decode(content)
        pairs = [(r.index, r.score) for r in ranks]
        reported: list[int | None] = []
    else:
        got = _COHERE.decode(content)
        pairs = [(r.index, r.relevance_score) for r in got.results]
        meta, usage = got.meta, got.usage
        reported = [
            meta.tokens.input_tokens if meta and meta.tokens else None,
            meta.billed_units.input_tokens if meta and meta.billed_units else None,
            usage.total_tokens if usage else None,
            usage.prompt_tokens if usage else None,
        ]
    if len(pairs) != n or sorted(i for i, _ in pairs) != list(range(n)):
        raise ValueError(f"{len(pairs)} scores (indices not 0..{n - 1}) for {n} documents")
    scores = np.empty(n, dtype=np.float64)
    for i, s in pairs:
        scores[i] = s
    if not np.isfinite(scores).all():
        raise ValueError("scores that are NaN or infinite")
    if api == "cohere" and activation == "sigmoid":
        scores = logits(scores)
    return scores, reported


def logits(relevance: np.ndarray) -> np.ndarray:
    """The logits whose sigmoid is `relevance` (ValueError outside [0, 1]: not a sigmoid's output). A score that
    rounded to 0 or 1 upstream comes back as the largest logit whose sigmoid still rounds there."""
    if ((relevance < 0) | (relevance > 1)).any():
        raise ValueError("relevance scores outside [0, 1], which no sigmoid gives (set options.score_activation)")
    tiny = np.finfo(np.float64).tiny
    p = np.clip(relevance, tiny, np.nextafter(1.0, 0.0))
    return np.log(p) - np.log1p(-p)


class RemoteScoring:
    """`score` and `tokenize_pairs` of the remote backend, and its load for task = "rerank" (a mixin of
    OpenAIBackend, whose transport, card and token counting it uses)."""

    model: str
    task: str
    options: Any
    _tokenizer: tokenizers.Tokenizer | None
    _seen_card: Any
    _dimension: int
    _limit: int = 0
    _activation: Activation = "identity"

    if TYPE_CHECKING:

        @property
        def upstream_model(self) -> str: ...
        def _card(self) -> Any: ...
        def _send(self, route: str, body: bytes, deadline: float) -> bytes: ...
        def _counted(self, reported: Sequence[int | None], texts: list[str]) -> int: ...

    def _load_reranker(self, limit: int | None) -> ModelInfo:
        """A rerank model's ModelInfo: its limit (options, tokenizer folder, else the upstream's card) and its
        activation (options, else the card's, else the API's usual one); BackendError when the card says the
        upstream model is not a reranker."""
        opts = self.options
        limit = opts.max_input_tokens or limit
        card = None
        if limit is None or opts.score_activation is None:
            card = self._seen_card = self._card()
        if card is not None and card.task not in (None, "rerank"):
            raise BackendError(
                f"the upstream's model {self.upstream_model!r} is not a reranker (the upstream lists it with task "
                f"{card.task!r})"
            )
        limit = limit or (card.max_input_tokens if card else None)
        if limit is None:
            raise BackendError(
                f"the upstream does not say model {self.upstream_model!r}'s input limit; set "
                "options.max_input_tokens (or options.tokenizer to a model folder)"
            )
        said = card.score_activation if card is not None else None
        if opts.score_activation is not None:
            activation: Activation = opts.score_activation
        elif said in ("sigmoid", "identity"):
            activation = said  # type: ignore[assignment]
        else:
            activation = "sigmoid" if opts.rerank_api == "tei" else "identity"
        self._dimension, self._limit, self._activation = 1, limit, activation
        local = self._tokenizer is not None
        return ModelInfo(
            dimension=1,
            max_input_tokens=limit,
            normalized=False,
            max_batch_size=opts.batch_size,
            concurrent_batches=opts.concurrent_batches,
            pads_to_longest=False,
            call_overhead_tokens=0,
            local_tokenizer=local,
            counts_tokens=local,
            task="rerank",
            score_activation=activation,
        )

    def tokenize_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[list[int]]:
        """Each pair's ids as the local tokenizer joins a pair ([CLS] q [SEP] d [SEP] for BERT), untruncated."""
        tok = self._tokenizer
        if tok is None:
            raise BackendError(f"model {self.model!r} counts tokens upstream (no options.tokenizer)")
        special = self.options.add_special_tokens
        return [e.ids for e in tok.encode_batch([(q, d) for q, d in pairs], add_special_tokens=special)]

    def score(self, pairs: Sequence[tuple[str, str]], token_ids: Sequence[Sequence[int]]) -> np.ndarray | Embedded:
        """The raw scores of `pairs`: one upstream call per query in the batch (a rerank API takes one query and
        its documents; the core's batches merge requests with different queries), all within `timeout_s`."""
        by_query: dict[str, list[int]] = {}
        for i, (query, _) in enumerate(pairs):
            by_query.setdefault(query, []).append(i)
        raw = np.empty(len(pairs), dtype=np.float32)
        tokens = 0
        deadline = time.monotonic() + self.options.timeout_s
        for query, where in by_query.items():
            # Ids are known only with a local tokenizer: a pair over the limit is here because its request cut.
            cut = any(len(token_ids[i]) > self._limit for i in where)
            documents = [pairs[i][1] for i in where]
            scores, reported = self._rerank(query, documents, self._limit if cut else None, deadline)
            raw[where] = scores
            tokens += self._counted(reported, [f"{query} {d}" for d in documents])
        return raw if self._tokenizer is not None else Embedded(raw, tokens)

    def _rerank(
        self, query: str, documents: list[str], cut_at: int | None, deadline: float
    ) -> tuple[np.ndarray, list[int | None]]:
        """One upstream rerank call: the raw scores in document order, and the tokens the upstream reports."""
        api = self.options.rerank_api
        body = request(api, self.upstream_model, query, documents, cut_at)
        content = self._send("rerank", body, deadline)
        try:
            return reply(api, content, len(documents), self._activation)
        except (msgspec.DecodeError, ValueError) as exc:
            log.error("model %r: upstream %s answered an invalid body: %s", self.model, self.options.base_url, exc)
            raise BackendUnavailable(f"the upstream of model {self.model!r} answered an invalid response") from None
