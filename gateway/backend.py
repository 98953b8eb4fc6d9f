"""What a backend plugin implements. Synchronous on purpose: every runtime we wrap blocks; the core moves
calls off the event loop and batches them."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import msgspec
import numpy as np


class NoOptions(msgspec.Struct, forbid_unknown_fields=True):
    """A backend that takes no options."""


class ModelInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What a loaded model tells the core about itself."""

    dimension: int
    # The model's own limit, special tokens included (the count reported in usage is on the same basis).
    max_input_tokens: int
    # True when the vectors `embed` returns are unit length (so Matryoshka cuts are re-normalized).
    normalized: bool


class BackendError(Exception):
    """A model cannot be loaded or served; the message is shown to operators (and in 503 bodies)."""


class Backend(ABC):
    """One served model. The core calls `load` once, then `count_tokens` (or `tokenize`) and `embed` from
    worker threads.

    `embed` is never called concurrently on one instance unless `max_concurrent_batches` says it may be
    (a remote backend can allow several batches in flight; an in-process runtime uses one).
    """

    #: The `backend = "..."` value in gateway.toml.
    name: ClassVar[str]
    #: Struct that validates the model's `[models.X.options]` table.
    Options: ClassVar[type[msgspec.Struct]] = NoOptions
    #: Batch limits when the config sets none. These and `pads_to_longest` are read after `load`, so a
    #: backend may set them on the instance there (say, bigger batches once it knows it packs rows).
    default_max_batch_size: int = 32
    default_max_batch_tokens: int = 16_384
    #: Batches `embed` may run at once (one worker thread each). Read after `load`, like the defaults above.
    max_concurrent_batches: int = 1
    #: True when the runtime pads a batch to its longest input: the core then groups similar lengths and
    #: splits a length-sorted batch into calls where that saves more than it costs. False for a runtime that
    #: packs inputs without padding (gateway/packing.py) or takes them one at a time.
    pads_to_longest: bool = True
    #: The fixed cost of one `embed` call, in tokens of compute (measured per runtime; see bench/).
    call_overhead_tokens: ClassVar[int] = 32
    #: True when `count_tokens` is a local tokenizer call that takes microseconds per sentence and is safe
    #: beside a running `embed` and beside itself: the core then calls it on the event loop for small
    #: requests. Leave False for a tokenizer that does I/O (a remote service) or holds the GIL for long.
    local_tokenizer: ClassVar[bool] = False
    #: True when `tokenize` gives the ids `embed` would compute itself, and `embed` takes them back
    #: (`token_ids=`): the core then tokenizes each input once, on arrival (for counting and limits), and the
    #: ids travel with it to its batch. Read after `load`. A backend whose runtime takes text (a remote
    #: OpenAI-compatible server, say) leaves it False and is never passed ids.
    reuses_token_ids: bool = False

    def __init__(self, *, model: str, path: str, options: Any, trust_remote_code: bool = False) -> None:
        self.model = model
        self.path = path
        self.options = options
        self.trust_remote_code = trust_remote_code

    @abstractmethod
    def load(self) -> ModelInfo:
        """Load the model (may take seconds); raise BackendError with a readable reason on failure."""

    @abstractmethod
    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens the model's own tokenizer produces for each text, special tokens included, untruncated."""

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids for each text, special tokens included, untruncated (so `len` is `count_tokens`).
        Called instead of `count_tokens` only when `reuses_token_ids` is True."""
        raise NotImplementedError(f"{type(self).__name__} does not hand out token ids")

    @abstractmethod
    def embed(self, texts: Sequence[str], token_ids: Sequence[Sequence[int]] | None = None) -> np.ndarray:
        """Vectors for `texts` as float32 [len(texts), dimension], in input order.

        With `reuses_token_ids`, the core passes `token_ids`: what `tokenize` returned for these texts, none
        longer than the model's max input tokens. Other backends are called with the texts alone.
        """

    def close(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Release the model's resources."""


class Converter(ABC):
    """`gateway convert SRC --to NAME --out PATH`: a model format a plugin can produce."""

    name: ClassVar[str]
    help: ClassVar[str] = ""

    def add_arguments(self, parser: Any) -> None:  # noqa: B027 - optional
        """Add this converter's own options to the `convert` argparse parser."""

    @abstractmethod
    def convert(self, src: str, out: str, args: Any) -> None:
        """Write the converted model to `out`; raise BackendError with a readable reason on failure."""
