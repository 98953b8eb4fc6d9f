"""OpenAI-compatible remote backend (`backend = "openai"`): the batches the core merges are sent to another
server's `POST {base_url}/embeddings` (TEI, Infinity, vLLM, Ollama, OpenAI, or another instance of this
gateway), up to `concurrent_batches` at once on a pooled HTTP/1.1 keep-alive client. A model with
`task = "rerank"` sends its pairs to the upstream's `POST {base_url}/rerank` instead (rerank.py).

Vectors travel as base64 (little-endian float32, a third of the bytes of float JSON) and are decoded
bit-exact. Tokens are counted locally when a tokenizer is configured, exactly as the local backends count
them; otherwise the model declares `counts_tokens = False` and requests are charged the upstream's `usage`.
Upstream failures become the core's typed errors (errors.py); the client and its deadlines are in transport.py.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import msgspec
import numpy as np

from gateway.plugin import (
    Backend,
    BackendError,
    BackendOverloaded,
    BackendTimeout,
    BackendUnavailable,
    Embedded,
    InputRejected,
    ModelInfo,
)
from gateway.runtime import hf

from . import errors, rerank, transport

if TYPE_CHECKING:
    import httpx
    import tokenizers

log = logging.getLogger("gateway.remote")

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
Seconds = Annotated[float, msgspec.Meta(gt=0)]


class OpenAIOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """`[models.X.options]` for `backend = "openai"`."""

    #: The upstream's API root: embeddings are posted to `{base_url}/embeddings` (e.g. http://gpu:8080/v1).
    base_url: str
    #: The model name the upstream knows; default: this model's name in gateway.toml.
    model: str | None = None
    #: The environment variable that holds the upstream's API key (sent as a bearer token). The key itself
    #: never goes in gateway.toml.
    api_key_env: str | None = None
    #: The vectors' dimension; default: asked of the upstream when the model loads (its /models card, else
    #: one probe call).
    dimension: PositiveInt | None = None
    #: The upstream model's input limit in tokens; default: the tokenizer folder's, else the upstream's
    #: /models card `max_input_tokens` (this gateway publishes it). With `dimension` set too, loading needs
    #: no upstream at all.
    max_input_tokens: PositiveInt | None = None
    #: A local copy of the upstream model's tokenizer: a `tokenizer.json` file or a model folder holding one
    #: (absolute, `pkg:`, or relative to the working directory). Tokens are then counted and limits checked
    #: before sending, as for local models; without it, the upstream's `usage` is charged and its limit
    #: errors become 400s.
    tokenizer: str | None = None
    #: Whether the tokenizer adds the model's special tokens ([CLS], [SEP]): the basis the upstream counts on.
    add_special_tokens: bool = True
    #: Whether the upstream returns unit-length vectors (OpenAI, TEI and this gateway do).
    normalized: bool = True
    #: "base64" (bit-exact float32, a third of the bytes) or "float" for an upstream without base64.
    encoding_format: Literal["base64", "float"] = "base64"
    connect_timeout_s: Seconds = 2.0
    #: How long one batch may take upstream, from sending it to the last byte of the answer, before it fails
    #: with a 504.
    timeout_s: Seconds = 30.0
    #: Inputs per upstream call, and calls in flight at once (pooled keep-alive connections).
    batch_size: PositiveInt = 64
    concurrent_batches: PositiveInt = 4
    #: For a model with task = "rerank": the shape of the upstream's `{base_url}/rerank`. "cohere": Cohere's and
    #: Jina's (`query`, `documents` -> `results[{index, relevance_score}]`), which this gateway answers at
    #: /v1/rerank and /v2/rerank; "tei": text-embeddings-inference's (`query`, `texts`, `raw_scores: true`).
    rerank_api: rerank.RerankApi = "cohere"
    #: For a rerank model: what turns the upstream model's logits into its relevance scores. With "cohere", the
    #: relevance scores the upstream answers are turned back into logits when "sigmoid", passed on as they are
    #: when "identity" (an upstream whose scores are not a known function of logits). Default: what the
    #: upstream's /models card says (this gateway publishes it), else "sigmoid" for "tei" (TEI's own activation
    #: for one label) and "identity" for "cohere".
    score_activation: rerank.Activation | None = None

    def __post_init__(self) -> None:
        if not re.match(r"https?://[^/\s]+", self.base_url):
            raise ValueError(f"base_url must be an http:// or https:// URL, got {self.base_url!r}")


class _Item(msgspec.Struct):
    embedding: str | list[float]
    index: int


class _Usage(msgspec.Struct):
    prompt_tokens: int | None = None
    total_tokens: int | None = None


class _Reply(msgspec.Struct):
    data: list[_Item]
    usage: _Usage | None = None


class _Card(msgspec.Struct):
    id: str
    dimension: int | None = None
    max_input_tokens: int | None = None
    # This gateway's: what the model does, and a reranker's activation.
    task: str | None = None
    score_activation: str | None = None


class _Models(msgspec.Struct):
    data: list[_Card]


_REPLY = msgspec.json.Decoder(_Reply)


class OpenAIBackend(rerank.RemoteScoring, Backend):
    """One model served by a remote OpenAI-compatible embeddings server (or rerank server: rerank.py)."""

    name = "openai"
    Options = OpenAIOptions
    uses_path: ClassVar[bool] = False
    per_worker_refused: ClassVar[str | None] = (
        "its model runs on a remote server: a copy per front worker would hold no model, only multiply the "
        "connections and the in-flight limit toward that server by the workers (keep it shared)"
    )

    def __init__(self, *, model: str, path: str, options: Any = None, trust_remote_code: bool = False) -> None:
        super().__init__(model=model, path=path, options=options or OpenAIOptions(base_url=""), trust_remote_code=False)
        self._client: httpx.Client | None = None
        self._tokenizer: tokenizers.Tokenizer | None = None
        self._dimension = 0
        self._httpx: Any = None
        # The deadline of the call this thread is making (each batch worker makes one at a time).
        self._deadline = threading.local()
        # What load learned of the upstream (its /models card, the tokenizer file): part of the fingerprint.
        self._seen_card: _Card | None = None
        self._tokenizer_file: Path | None = None
        # A reranker's input limit and activation (rerank.RemoteScoring).
        self._limit = 0
        self._activation: rerank.Activation = "identity"

    @property
    def upstream_model(self) -> str:
        return self.options.model or self.model

    # -- loading ------------------------------------------------------------------------------------------
    def load(self) -> ModelInfo:
        opts: OpenAIOptions = self.options
        self._httpx = transport.import_httpx()
        headers = transport.headers(opts.api_key_env)
        limit = None
        if opts.tokenizer is not None:
            limit = self._load_tokenizer(opts.tokenizer)
        self._client = transport.open_client(
            base_url=opts.base_url,
            headers=headers,
            timeout_s=opts.timeout_s,
            connect_timeout_s=opts.connect_timeout_s,
            connections=opts.concurrent_batches,
            deadlines=self._deadline,
        )
        try:
            if self.task == "rerank":
                return self._load_reranker(limit)
            self._dimension, limit = self._discover(limit)
        except BackendError:
            self.close()
            raise
        except (BackendUnavailable, BackendTimeout, BackendOverloaded, InputRejected) as exc:
            self.close()
            raise BackendError(f"cannot reach the upstream at {opts.base_url}: {exc}") from None
        local = self._tokenizer is not None
        return ModelInfo(
            dimension=self._dimension,
            max_input_tokens=limit,
            normalized=opts.normalized,
            max_batch_size=opts.batch_size,
            concurrent_batches=opts.concurrent_batches,
            # The upstream schedules its own compute: lengths cost nothing extra together here.
            pads_to_longest=False,
            call_overhead_tokens=0,
            local_tokenizer=local,
            counts_tokens=local,
        )

    def _discover(self, limit: int | None) -> tuple[int, int]:
        """The vectors' dimension and the input limit: from the options (or the tokenizer's `limit`), else the
        upstream's /models card, else (the dimension) one probe call."""
        opts: OpenAIOptions = self.options
        dimension = opts.dimension
        limit = opts.max_input_tokens or limit
        if dimension is None or limit is None:
            card = self._seen_card = self._card()
            dimension = dimension or (card.dimension if card else None)
            limit = limit or (card.max_input_tokens if card else None)
        if limit is None:
            raise BackendError(
                f"the upstream does not say model {self.upstream_model!r}'s input limit; set "
                "options.max_input_tokens (or options.tokenizer to a model folder)"
            )
        if dimension is None:
            dimension = self._post(["dimension probe"]).vectors.shape[1]
        return dimension, limit

    def _load_tokenizer(self, raw: str) -> int | None:
        """Load the local tokenizer; the input limit its folder declares, if any."""
        from tokenizers import Tokenizer

        from gateway.base.config import ConfigError, resolve_model_path

        try:
            where = resolve_model_path(raw, Path.cwd())
        except ConfigError as exc:
            raise BackendError(f"options.tokenizer: {exc}") from None
        file = where / "tokenizer.json" if where.is_dir() else where
        if not file.is_file():
            raise BackendError(f"options.tokenizer: no tokenizer file at {file}")
        try:
            tok = Tokenizer.from_file(str(file))
        except Exception as exc:
            raise BackendError(f"options.tokenizer: cannot load {file}: {exc}") from None
        # As the local backends count: no padding (all-MiniLM's file pads to 128), nothing truncated.
        tok.no_padding()
        tok.no_truncation()
        self._tokenizer, self._tokenizer_file = tok, file
        return hf.max_input_tokens(hf.read_layout(where)) if where.is_dir() else None

    def _card(self) -> _Card | None:
        """The upstream's /models entry for our model, when it has that route and lists it."""
        assert self._client is not None
        try:
            response = self._client.get("models")
        except self._httpx.HTTPError as exc:
            raise self._transport_error(exc) from None
        if response.status_code != 200:
            if response.status_code in (401, 403):
                raise self._status_error(response)
            return None  # no /models route (some servers): the probe call tells the dimension
        try:
            cards = msgspec.json.decode(response.content, type=_Models).data
        except msgspec.DecodeError:
            return None
        return next((c for c in cards if c.id == self.upstream_model), None)

    def fingerprint(self) -> bytes:
        """The upstream's identity (its base URL, the model name it knows, its /models card when load read
        one, the width it answers with) and the local tokenizer's digest: no files to hash, no directory walk."""
        from gateway.base.digest import weights_digest

        identity = {
            "base_url": self.options.base_url.rstrip("/"),
            "model": self.upstream_model,
            "card": self._seen_card,
            "dimension": self._dimension,
            "tokenizer": weights_digest(str(self._tokenizer_file)).hex() if self._tokenizer_file else None,
        }
        if self.task == "rerank":
            identity["rerank"] = [self.options.rerank_api, self._activation]
        return msgspec.json.encode(identity)

    @contextmanager
    def _within(self, deadline: float) -> Iterator[None]:
        """Calls made in this block, on this thread, end by `deadline` (time.monotonic())."""
        self._deadline.at = deadline
        try:
            yield
        finally:
            self._deadline.at = None

    # -- serving ------------------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        tok = self._tokenizer
        if tok is None:
            raise BackendError(f"model {self.model!r} counts tokens upstream (no options.tokenizer)")
        special = self.options.add_special_tokens
        if len(texts) == 1:
            return [tok.encode(texts[0], add_special_tokens=special).ids]
        return [e.ids for e in tok.encode_batch(list(texts), add_special_tokens=special)]

    def embed(self, texts: Sequence[str], token_ids: Sequence[Sequence[int]]) -> np.ndarray | Embedded:
        out = self._post(list(texts))
        return out.vectors if self._tokenizer is not None else out

    def _send(self, route: str, body: bytes, deadline: float) -> bytes:
        """POST `body` to the upstream's `route`, done by `deadline`; the answer's body, or the typed failure."""
        assert self._client is not None, "not loaded"
        try:
            with self._within(deadline):
                response = self._client.post(route, content=body)
        except self._httpx.HTTPError as exc:
            raise self._transport_error(exc, late=time.monotonic() >= deadline) from None
        if response.status_code != 200:
            raise self._status_error(response)
        return response.content

    def _post(self, texts: list[str]) -> Embedded:
        """One upstream call: the vectors, in input order, and the tokens the upstream counted."""
        body = msgspec.json.encode(
            {"model": self.upstream_model, "input": texts, "encoding_format": self.options.encoding_format}
        )
        content = self._send("embeddings", body, time.monotonic() + self.options.timeout_s)
        try:
            reply = _REPLY.decode(content)
            vectors = self._vectors(reply, len(texts))
        except (msgspec.DecodeError, ValueError, binascii.Error) as exc:
            log.error("model %r: upstream %s answered an invalid body: %s", self.model, self.options.base_url, exc)
            raise BackendUnavailable(f"the upstream of model {self.model!r} answered an invalid response") from None
        usage = reply.usage
        return Embedded(
            vectors, self._counted([] if usage is None else [usage.prompt_tokens, usage.total_tokens], texts)
        )

    def _counted(self, reported: Sequence[int | None], texts: list[str]) -> int:
        """The tokens the upstream reports for `texts` (the first of `reported` that can be true: at least one
        per input, and at most one per byte plus a margin for special tokens and prompts per input). Otherwise
        (none reported, 0, negative, absurd) our estimate: a charge is never zero, never negative, never
        unbounded."""
        least = len(texts)
        most = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts) + 64 * len(texts)
        for n in reported:
            if n is not None and least <= n <= most:
                return n
        if any(n is not None for n in reported):
            log.warning(
                "model %r: upstream %s reported usage %s for %d inputs; charging the local estimate",
                self.model,
                self.options.base_url,
                reported,
                len(texts),
            )
        return sum(len(t) // 4 + 1 for t in texts)

    def _vectors(self, reply: _Reply, n: int) -> np.ndarray:
        if len(reply.data) != n or sorted(item.index for item in reply.data) != list(range(n)):
            raise ValueError(f"{len(reply.data)} vectors (indices not 0..{n - 1}) for {n} inputs")
        rows: list[np.ndarray] = [np.empty(0, np.float32)] * n
        for item in reply.data:
            if isinstance(item.embedding, str):
                rows[item.index] = np.frombuffer(base64.b64decode(item.embedding, validate=True), dtype="<f4")
            else:
                rows[item.index] = np.asarray(item.embedding, dtype=np.float32)
        widths = {len(r) for r in rows}
        if len(widths) != 1 or (self._dimension and widths != {self._dimension}):
            raise ValueError(f"vectors of widths {sorted(widths)}, expected {self._dimension or 'one width'}")
        return np.stack(rows).astype(np.float32, copy=False)

    # -- errors -------------------------------------------------------------------------------------------
    def _transport_error(self, exc: Exception, late: bool = False) -> Exception:
        return errors.transport_error(self.model, self.options.base_url, self.options.timeout_s, exc, late)

    def _status_error(self, response: httpx.Response) -> Exception:
        return errors.status_error(self.model, self.options.base_url, response)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
