"""WordLlama backend (`backend = "wordllama"`): static token embeddings, averaged, through the `wordllama`
package.

A WordLlama model is two files: a safetensors matrix (one row per token of the vocabulary) and a Hugging Face
tokenizer. A text's vector is the mean of its tokens' rows: no transformer, no context, no position table.
`path` is a folder (the model's files are found in it, see `WordLlamaOptions`), or the weights file itself.
`pkg:wordllama` is the package's own folder, which holds its default model (`l2_supercat`, 256 dimensions,
trained with Matryoshka representation learning, so its vectors can be cut to 64 or 128 values).

Files are read from the configured path only: the package's own `WordLlama.load` may fetch the tokenizer
with `requests` and no timeout (0.4 looks for its bundled tokenizer under the wrong folder name), so it is
never called. `wordllama` is imported inside `load`: the core imports every plugin at start, and the
package's import calls `logging.basicConfig`, which must not reconfigure the host's root logger.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

import msgspec
import numpy as np

from gateway.plugin import Backend, BackendError, ModelInfo, TokenSpan, tokenizer_spans
from gateway.runtime.hf import l2_normalize

if TYPE_CHECKING:
    import tokenizers

log = logging.getLogger("gateway.wordllama")

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]

#: The tensor name the package writes and reads (`ModelURI.tensor_key`).
TENSOR_KEY = "embedding.weight"
#: Tokens gathered at once while averaging one input: bounds the temporary copy of rows whatever the limit.
_GATHER_CHUNK = 4096


class WordLlamaOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """`[models.X.options]` for `backend = "wordllama"`."""

    #: The weights file, relative to the model folder; default: the one `*.safetensors` file in the folder
    #: or in its `weights/` subfolder (the package's layout).
    weights: str | None = None
    #: The tokenizer (a Hugging Face `tokenizers` JSON file), relative to the model folder (the weights
    #: file's folder when `path` is that file); default: `tokenizer.json` there, else the one `*.json` file
    #: in its `tokenizers/` (the package's layout) or `tokenizer/` subfolder.
    tokenizer: str | None = None
    #: Tokens per input the model accepts; a longer input is refused with a 400. WordLlama has no limit of
    #: its own (a mean of token rows works at any length, and the package averages any length it is given),
    #: so this is a service limit: OpenAI's for its embedding models, so that clients written against it
    #: meet the same ceiling; `max_input_tokens` on the model lowers it, this option raises it.
    input_limit: PositiveInt = 8192
    #: Unit-length vectors (the package's `embed(norm=True)`); false returns the plain means, whose length
    #: varies with the text.
    normalize: bool = True


def _import_wordllama() -> Any:
    """The `wordllama` package, imported without the root-logger changes its import makes."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        import wordllama
    except ImportError as exc:
        raise BackendError("the wordllama package is not installed: pip install 'embedding-gateway[static]'") from exc
    finally:
        # Both wordllama/__init__.py and wordllama/inference.py call logging.basicConfig(level=INFO) on import.
        root.handlers[:] = handlers
        root.setLevel(level)
    return wordllama


def _one(candidates: list[Path], what: str, where: str, option: str) -> Path:
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise BackendError(f"no {what} found in {where}; set options.{option}")
    names = ", ".join(str(p) for p in candidates)
    raise BackendError(f"{len(candidates)} {what} files in {where} ({names}); set options.{option} to one")


def _option_file(root: Path, relative: str, option: str) -> Path:
    target = root / Path(relative).expanduser()
    if not target.is_file():
        raise BackendError(f"options.{option}: {target} is not a file")
    return target


def find_files(path: Path, options: WordLlamaOptions) -> tuple[Path, Path]:
    """The (weights, tokenizer) files `path` and the options name; BackendError saying what is missing."""
    if not path.exists():
        raise BackendError(f"WordLlama model path {path} does not exist")
    if path.is_file():
        if options.weights is not None:
            raise BackendError(f"options.weights is set, but path {path} is already a weights file")
        root, weights = path.parent, path
    else:
        root = path
        if options.weights is not None:
            weights = _option_file(root, options.weights, "weights")
        else:
            found = sorted([*root.glob("*.safetensors"), *(root / "weights").glob("*.safetensors")])
            weights = _one(found, "*.safetensors weights", f"{root} or {root / 'weights'}", "weights")
    if options.tokenizer is not None:
        return weights, _option_file(root, options.tokenizer, "tokenizer")
    if (root / "tokenizer.json").is_file():
        return weights, root / "tokenizer.json"
    found = sorted([*(root / "tokenizers").glob("*.json"), *(root / "tokenizer").glob("*.json")])
    where = f"{root} (tokenizer.json) or its tokenizers/ or tokenizer/ subfolder"
    return weights, _one(found, "tokenizer JSON", where, "tokenizer")


def read_matrix(weights: Path) -> np.ndarray:
    """The token-embedding matrix [vocabulary, dimension] of a safetensors file, as stored."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), framework="np") as fh:
            keys = list(fh.keys())
            if TENSOR_KEY in keys:
                key = TENSOR_KEY
            elif len(keys) == 1:
                key = keys[0]
            else:
                raise BackendError(f"{weights} holds no {TENSOR_KEY!r} tensor (it has {len(keys)}: {keys[:5]})")
            matrix = fh.get_tensor(key)
    except (SafetensorError, OSError, TypeError, ValueError) as exc:
        raise BackendError(f"cannot read WordLlama weights {weights}: {exc}") from exc
    if matrix.ndim != 2 or matrix.dtype.kind != "f" or 0 in matrix.shape:
        raise BackendError(
            f"{weights}: tensor {key!r} is {matrix.dtype} {list(matrix.shape)}, not a float matrix "
            "[vocabulary, dimension] (binary WordLlama models are not supported)"
        )
    return matrix


def read_tokenizer(file: Path) -> str:
    """The tokenizer JSON, checked to be one `tokenizers` can load."""
    from tokenizers import Tokenizer

    try:
        text = file.read_text(encoding="utf-8")
        Tokenizer.from_str(text)
    except Exception as exc:  # tokenizers raises a bare Exception for a malformed file
        raise BackendError(f"cannot load tokenizer {file}: {exc}") from exc
    return text


class WordLlamaBackend(Backend):
    """One WordLlama model: token ids from its tokenizer, vectors as the mean of their rows."""

    name: ClassVar[str] = "wordllama"
    Options: ClassVar[type[msgspec.Struct]] = WordLlamaOptions

    def __init__(self, *, model: str, path: str, options: Any, trust_remote_code: bool = False) -> None:
        super().__init__(model=model, path=path, options=options, trust_remote_code=trust_remote_code)
        self.opts: WordLlamaOptions = options if isinstance(options, WordLlamaOptions) else WordLlamaOptions()
        self._table: np.ndarray | None = None
        self._tokenizer: tokenizers.Tokenizer | None = None

    def load(self) -> ModelInfo:
        weights, tokenizer_file = find_files(Path(self.path).expanduser(), self.opts)
        wordllama = _import_wordllama()
        from tokenizers import Tokenizer

        matrix = read_matrix(weights)
        tokenizer_json = read_tokenizer(tokenizer_file)
        # The package's own model object: it holds the rows as it computes with them (float32, contiguous)
        # and sets up its tokenizer as it tokenizes (no truncation, no special tokens added by `tokenize`).
        model = wordllama.WordLlamaInference(matrix, Tokenizer.from_str(tokenizer_json))
        table = model.embedding
        # Its tokenizer pads a batch to the longest text; `tokenize` hands out each text's own ids, so it
        # uses an unpadded twin with the same settings.
        tokenizer = Tokenizer.from_str(tokenizer_json)
        tokenizer.no_padding()
        tokenizer.no_truncation()
        vocabulary = tokenizer.get_vocab_size(with_added_tokens=True)
        if vocabulary > table.shape[0]:
            # The package clips such ids to the last row, which would serve wrong vectors without a word.
            raise BackendError(
                f"tokenizer {tokenizer_file} has {vocabulary} tokens but {weights} only {table.shape[0]} rows"
            )
        if not np.isfinite(table).all():
            raise BackendError(f"{weights} holds NaN or infinite values")
        self._table, self._tokenizer = table, tokenizer
        log.info(
            "wordllama %s (wordllama %s): %d tokens x %d dimensions, tokenizer %s, input limit %d",
            weights.name,
            getattr(wordllama, "__version__", "?"),
            table.shape[0],
            table.shape[1],
            tokenizer_file.name,
            self.opts.input_limit,
        )
        return ModelInfo(
            dimension=int(table.shape[1]),
            max_input_tokens=self.opts.input_limit,
            normalized=self.opts.normalize,
            # A batch costs a row lookup per token and no padding: large batches cost no latency to speak of.
            max_batch_size=256,
            max_batch_tokens=max(65_536, self.opts.input_limit),
            pads_to_longest=False,
            local_tokenizer=True,
            embeds_token_ids=True,
        )

    def close(self) -> None:
        self._table = self._tokenizer = None

    def load_tokenizer(self) -> bool:
        """The tokenizer alone (no weights read), set up as `load` sets it."""
        from tokenizers import Tokenizer

        _, tokenizer_file = find_files(Path(self.path).expanduser(), self.opts)
        tokenizer = Tokenizer.from_str(read_tokenizer(tokenizer_file))
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self._tokenizer = tokenizer
        return True

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        tokenizer = self._tokenizer
        if tokenizer is None:
            raise BackendError(f"model {self.model!r} is not loaded")
        # As the package tokenizes (WordLlamaInference.tokenize): no special tokens. One text is encoded on
        # the calling thread; a list goes to the tokenizers' thread pool.
        if len(texts) == 1:
            return [tokenizer.encode(texts[0], add_special_tokens=False).ids]
        return [e.ids for e in tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def token_spans(self, texts: Sequence[str], add_special_tokens: bool) -> list[list[TokenSpan]]:
        if self._tokenizer is None:
            raise BackendError(f"model {self.model!r} is not loaded")
        # The package's embeddings take no special tokens, so there are none to show.
        return tokenizer_spans(self._tokenizer, texts, add_special_tokens=False)

    def embed(self, texts: Sequence[str], token_ids: Sequence[Sequence[int]]) -> np.ndarray:
        """The mean of each input's rows, summed in the package's order (its `avg_pool`), so the vectors equal
        the package's own `embed` bit for bit; from the ids `tokenize` gave, so each text is tokenized once."""
        table = self._table
        if table is None:
            raise BackendError(f"model {self.model!r} is not loaded")
        out = np.empty((len(token_ids), table.shape[1]), dtype=np.float32)
        for row, ids in enumerate(token_ids):
            index = np.asarray(ids, dtype=np.intp)
            total = table[index[:_GATHER_CHUNK]].sum(axis=0, dtype=np.float32)
            for start in range(_GATHER_CHUNK, len(index), _GATHER_CHUNK):
                block = table[index[start : start + _GATHER_CHUNK]]
                # Carried into the block's first row, the running sum keeps one row-by-row order throughout.
                block[0] += total
                total = block.sum(axis=0, dtype=np.float32)
            # No ids (a direct caller's empty text) gives zeros, as in the package; never a division by zero.
            out[row] = total / np.float32(max(len(index), 1))
        # l2_normalize leaves a zero row at zero, where the package's norm=True would give NaN.
        return l2_normalize(out) if self.opts.normalize and len(out) else out
