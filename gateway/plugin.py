"""The plugin contract, whole: the hooks a plugin implements (`hookimpl`), the Backend it registers and what
that returns (ModelInfo, Embedded, the failures it may raise), Converters, and Placements (where batches run).

Backends are synchronous on purpose: every runtime we wrap blocks; the core moves calls off the event loop and
batches them. Everything here is importable from `gateway` itself.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

import msgspec
import numpy as np
import pluggy

from gateway.base.digest import weights_digest

#: The entry-point group and pluggy project name under which plugins register.
PROJECT = "embedding_gateway"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

Positive = Annotated[int, msgspec.Meta(ge=1)]

#: What a model does: "embed" (texts in, vectors out) or "rerank" (query/document pairs in, one score each out).
Task = Literal["embed", "rerank"]


class NoOptions(msgspec.Struct, forbid_unknown_fields=True):
    """A backend that takes no options."""


class ModelInfo(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What a loaded model tells the core: its vectors, its limits, and how to schedule its batches.

    Returned by `Backend.load` and checked there: a value out of range fails the load with a message naming
    the backend.
    """

    dimension: Positive
    #: The model's own limit, special tokens included (the count reported in usage is on the same basis).
    max_input_tokens: Positive
    #: True when the vectors `embed` returns are unit length (so Matryoshka cuts are re-normalized).
    normalized: bool
    #: Batch limits when gateway.toml sets none.
    max_batch_size: Positive = 32
    max_batch_tokens: Positive = 16_384
    #: Batches `embed` may run at once, one worker thread each (a remote server may take several; an
    #: in-process runtime usually one).
    concurrent_batches: Positive = 1
    #: True when the runtime pads a batch to its longest input: the core then groups similar lengths and
    #: splits a batch where padding would cost more than a call. False for a runtime that packs inputs
    #: without padding (gateway/runtime/packing.py) or takes them one at a time.
    pads_to_longest: bool = True
    #: The fixed cost of one `embed` call, in tokens of compute (weighs padding against calls).
    call_overhead_tokens: Annotated[int, msgspec.Meta(ge=0)] = 32
    #: True when `tokenize` is a local call that takes microseconds per sentence and is safe beside a running
    #: `embed` and beside itself: the core then runs it on the event loop for small requests. Leave False
    #: for a tokenizer that does I/O or holds the GIL for long.
    local_tokenizer: bool = False
    #: True when `embed` computes from the `token_ids` it is given (not from the texts): the core can then cut
    #: over-long inputs to the model's limit for requests that ask it to (`truncate`). A backend that
    #: embeds the text itself leaves it False, and such requests are refused.
    embeds_token_ids: bool = False
    #: False when the backend cannot count tokens before `embed` (a remote server without a local copy of
    #: its tokenizer): `tokenize` is then never called, batches and admission use an estimate from each
    #: text's length, per-input limits are the runtime's to enforce (raise InputRejected), and `embed`
    #: returns `Embedded` with the tokens the runtime counted, which is what requests are charged.
    counts_tokens: bool = True
    #: What the loaded model does: "rerank" for a model that `score`s pairs (its `dimension` is then 1, one
    #: score per pair). The core refuses a model whose loaded task is not the configured one.
    task: Task = "embed"
    #: For a rerank model: what turns its raw score (a logit) into the relevance score clients get, as
    #: sentence-transformers' `CrossEncoder.predict` applies it by default ("sigmoid" for one label).
    score_activation: Literal["sigmoid", "identity"] = "sigmoid"


class TokenSpan(msgspec.Struct, frozen=True, kw_only=True):
    """One token of a text as `Backend.token_spans` shows it (TEI's `/tokenize` shape): its id, its text (the
    characters it covers, or the token itself for a special token), and where it is in the text (character
    offsets; None for a special token)."""

    id: int
    text: str
    special: bool
    start: int | None
    stop: int | None


def tokenizer_spans(tokenizer: Any, texts: Sequence[str], add_special_tokens: bool) -> list[list[TokenSpan]]:
    """`token_spans` from a `tokenizers.Tokenizer` (the one `tokenize` counts with, so the ids are the same)."""
    out: list[list[TokenSpan]] = []
    for text, enc in zip(
        texts, tokenizer.encode_batch(list(texts), add_special_tokens=add_special_tokens), strict=True
    ):
        spans = []
        for id_, token, special, (start, stop) in zip(
            enc.ids, enc.tokens, enc.special_tokens_mask, enc.offsets, strict=True
        ):
            if special:
                spans.append(TokenSpan(id=id_, text=token, special=True, start=None, stop=None))
            else:
                spans.append(TokenSpan(id=id_, text=text[start:stop], special=False, start=start, stop=stop))
        out.append(spans)
    return out


@dataclass(frozen=True, slots=True)
class Embedded:
    """What `embed` returns for a backend with `counts_tokens = False`: the vectors and the tokens the runtime
    counted for the whole batch (requests that shared it are charged in proportion to their length)."""

    vectors: np.ndarray
    tokens: int


class BackendError(Exception):
    """A model cannot be loaded or served; the message is shown to operators (and in 503 bodies)."""


class BackendFailure(Exception):
    """A typed failure `embed` may raise so that clients get the right answer instead of a 500.

    The message is shown to clients as is: never put a secret, an upstream body or a path in it (log those).
    """

    status: ClassVar[int] = 502
    code: ClassVar[str] = "backend_error"
    #: True when another model of the same embedding space may serve the request instead (failover), and
    #: the failure counts against the model's circuit breaker.
    fail_over: ClassVar[bool] = False

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class InputRejected(BackendFailure):
    """The runtime refused an input (too long, say): 400. Only the request that holds it fails."""

    status = 400
    code = "input_rejected"


class BackendOverloaded(BackendFailure):
    """The runtime asks us to slow down: 429 with Retry-After (`retry_after` seconds, 1 if unknown)."""

    status = 429
    code = "backend_overloaded"


class BackendUnavailable(BackendFailure):
    """The runtime cannot serve now (unreachable, refused our credentials, answered garbage): 502."""

    status = 502
    code = "backend_unavailable"
    fail_over = True


class BackendTimeout(BackendFailure):
    """The runtime did not answer in time: 504."""

    status = 504
    code = "backend_timeout"
    fail_over = True


class Backend(ABC):
    """One served model. The core calls `load` once, then `tokenize` and `embed` from worker threads.

    `embed` is never called concurrently on one instance unless `ModelInfo.concurrent_batches` allows it.
    """

    #: The `backend = "..."` value in gateway.toml.
    name: ClassVar[str]
    #: Struct that validates the model's `[models.X.options]` table.
    Options: ClassVar[type[msgspec.Struct]] = NoOptions
    #: False for a backend that reads no local model (a remote server): `path` is then refused in gateway.toml
    #: and given to the backend as "".
    uses_path: ClassVar[bool] = True
    #: Why this backend refuses `copies = "per-worker"` (a copy in each front worker), or None when it can run
    #: there: said in the config error.
    per_worker_refused: ClassVar[str | None] = None

    @classmethod
    def within_cores(cls, options: Any, cores: int) -> Any:
        """`options` with the backend's CPU threads bounded to `cores`, unless the config set them: each front
        worker's copy (`copies = "per-worker"`) gets its share of the machine. The default: unchanged (a
        backend that computes on the calling thread only)."""
        return options

    def __init__(self, *, model: str, path: str, options: Any, trust_remote_code: bool = False) -> None:
        self.model = model
        self.path = path
        self.options = options
        self.trust_remote_code = trust_remote_code
        #: What the model is configured for (`task` in gateway.toml): set by the core before `load`, so that a
        #: backend that serves both loads a reranker ("rerank") or an embedder ("embed") from the folder.
        self.task: Task = "embed"

    @classmethod
    def can_score(cls) -> bool:
        """True when this backend implements `score` (and `tokenize_pairs`): only such a backend may load a
        model configured with `task = "rerank"`."""
        return cls.score is not Backend.score

    @abstractmethod
    def load(self) -> ModelInfo:
        """Load the model (may take seconds); raise BackendError with a readable reason on failure."""

    @abstractmethod
    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """The model's own token ids for each text, special tokens included, untruncated: their lengths are
        what requests are charged and checked against."""

    def embed(self, texts: Sequence[str], token_ids: Sequence[Sequence[int]]) -> np.ndarray | Embedded:
        """Vectors for `texts` as float32 [len(texts), dimension], in input order (`Embedded` when the model
        does not count tokens itself, see `ModelInfo.counts_tokens`). Every backend implements `embed` or
        `score` (a backend that only reranks leaves this one out).

        `token_ids` are what `tokenize` returned for these texts, none longer than the model's input limit;
        a runtime that works on ids uses them instead of tokenizing again, one that takes text ignores them.
        Raise a `BackendFailure` subclass to give clients a precise answer; any other exception is a 500.
        """
        raise NotImplementedError(f"backend {type(self).name!r} cannot embed")

    def tokenize_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[list[int]]:
        """For a rerank model: the token ids of each (query, document) pair as the model reads it (both texts in
        one input, special tokens included), untruncated: their lengths are what requests are charged and
        checked against `max_input_tokens`. Implement it together with `score`."""
        raise NotImplementedError(f"backend {type(self).name!r} cannot tokenize pairs")

    def score(self, pairs: Sequence[tuple[str, str]], token_ids: Sequence[Sequence[int]]) -> np.ndarray | Embedded:
        """For a rerank model: one raw score (the model's logit) per (query, document) pair, as float32 [n] in
        input order (`Embedded` with the tokens the runtime counted when the model does not count them itself,
        see `ModelInfo.counts_tokens`; `tokenize_pairs` is then never called and `token_ids` are empty); the core
        applies `ModelInfo.score_activation` for clients that want relevance scores.

        `token_ids` are what `tokenize_pairs` returned; a pair over `max_input_tokens` reaches here only when
        its request asked to truncate, and is then cut as the model's own tokenizer cuts a pair (longest
        first). Optional: a backend that implements it can serve `task = "rerank"` models (see `can_score`).
        Raise a `BackendFailure` subclass to give clients a precise answer, as in `embed`.
        """
        raise NotImplementedError(f"backend {type(self).name!r} cannot score pairs")

    def fingerprint(self) -> bytes:
        """What, besides the backend and its options, decides this model's vectors: by default a digest of
        the files at `path` (weights, tokenizer and configs). The cache keys entries by it, so a changed file
        never meets old entries. Called once after `load`, in the loading thread; override when the model's
        files are elsewhere, or can be named more cheaply than by reading them."""
        # A model without files (a remote one, given path "") is named by its backend and options, plus what
        # its own override adds: never by a walk of "", which is the working directory.
        return weights_digest(self.path) if self.path else b""

    def close(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Release the model's resources."""

    def token_spans(self, texts: Sequence[str], add_special_tokens: bool) -> list[list[TokenSpan]]:
        """Optional: each text's tokens with their text and character offsets (TEI's `POST /tokenize`), the same
        ids `tokenize` gives when `add_special_tokens` (without the special ones otherwise). A backend whose
        tokenizer is a `tokenizers.Tokenizer` returns `tokenizer_spans(it, texts, add_special_tokens)`; the
        default refuses (the route then answers that this model cannot show its tokens)."""
        raise NotImplementedError

    def load_tokenizer(self) -> bool:
        """Optional: make `tokenize` work without loading the model (no weights), for a front process that
        sends batches to replicas elsewhere. True when done; False (the default) when this backend cannot, and
        the front then asks a replica to tokenize."""
        return False

    def replicas(self) -> tuple[int, int] | None:
        """For a backend whose batches run on replicas: (ready, total), shown in /ready and /metrics."""
        return None


def check_info(backend: Backend, info: object) -> ModelInfo:
    """`info` as `load` returned it, checked; BackendError naming the backend when it is not a valid ModelInfo."""
    where = f"backend {type(backend).name!r} (model {backend.model!r}): load()"
    if not isinstance(info, ModelInfo):
        raise BackendError(f"{where} returned {type(info).__name__}, not a ModelInfo")
    try:
        return msgspec.convert(msgspec.structs.asdict(info), ModelInfo)
    except msgspec.ValidationError as exc:
        raise BackendError(f"{where} returned an invalid ModelInfo: {exc}") from None


class Converter(ABC):
    """`gateway convert SRC --to NAME --out PATH`: a model format a plugin can produce."""

    name: ClassVar[str]
    help: ClassVar[str] = ""

    def add_arguments(self, parser: Any) -> None:  # noqa: B027 - optional
        """Add this converter's own options to the `convert` argparse parser."""

    @abstractmethod
    def convert(self, src: str, out: str, args: Any) -> None:
        """Write the converted model to `out`; raise BackendError with a readable reason on failure."""

    def say(self, message: str) -> None:
        """A progress line on stderr, prefixed with the converter's name."""
        import sys

        print(f"[convert {self.name}] {message}", file=sys.stderr, flush=True)


class Placement(ABC):
    """One way to run a model's batches; built per model load with that model's validated options.

    A Placement turns the configured Backend class into the Backend the core serves: the default runs it in this
    process; a plugin (say gateway_ray) may run it on replicas elsewhere. A model picks a placement by a table
    named after it in gateway.toml (`[models.X.ray]`); without one it runs in-process. The placement's Options
    Struct validates that table when the config is read.
    """

    #: The table in `[models.X]` that asks for this placement (`ray` -> `[models.X.ray]`).
    name: ClassVar[str]
    #: Struct that validates that table.
    Options: ClassVar[type[msgspec.Struct]] = NoOptions

    def __init__(self, options: Any) -> None:
        self.options = options

    @abstractmethod
    def place(
        self, backend_cls: type[Backend], *, model: str, path: str, options: Any, trust_remote_code: bool
    ) -> Backend:
        """A Backend for the core to load and serve: the backend itself, or a stand-in that runs it elsewhere
        (its `load` starts the replicas and returns their ModelInfo)."""


# The hooks: the whole plugin interface of the gateway.


@hookspec
def register_backends(register: Callable[[type[Backend]], None]) -> None:
    """Register Backend classes; each is keyed by its `name` (the `backend =` value in gateway.toml)."""


@hookspec
def register_converters(register: Callable[[Converter], None]) -> None:
    """Register Converter instances for `gateway convert --to NAME`."""


@hookspec
def register_placements(register: Callable[[type[Placement]], None]) -> None:
    """Register Placement classes (where a model's batches run); each is keyed by its `name`, the table in
    `[models.X]` that asks for it."""
