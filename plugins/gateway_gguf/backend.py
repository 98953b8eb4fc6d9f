"""llama.cpp backend: serves an embedding GGUF (e.g. one written by `gateway convert --to gguf`).

llama_cpp is imported inside methods (gguf only by the converter): the core imports every plugin at
start-up, and a plugin nobody configured must neither cost import time nor fail for a missing extra.

Why not `llama_cpp.Llama` (see _llama.py for loading): its `embed` truncates an over-long input by
cutting off the final [SEP] (so vectors differ from sentence-transformers' truncation), returns Python lists
of floats, and packs up to 512 tokens / n_batch sequences per call. We drive the llama.cpp batch API
directly, pack at most `seqs_per_call` sequences and one micro-batch of tokens per call (attention over a
packed batch grows with its square), and copy pooled vectors straight into numpy.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import msgspec
import numpy as np

from gateway.plugin import Backend, BackendError, ModelInfo
from gateway.runtime import hf
from gateway.runtime.hf import l2_normalize

from . import _llama
from .rerank import POOLING_RANK, GgufScoring

log = logging.getLogger("gateway.gguf")

Pooling = Literal["mean", "cls", "last"]

#: Metadata key (written by our converter) holding sentence-transformers' `max_seq_length`: the length the
#: model was trained for, smaller than its position table. The torch and ONNX backends cap inputs at the
#: same value, so one model answers the same inputs whichever runtime serves it.
MAX_SEQ_LENGTH_KEY = "sentence_transformers.max_seq_length"
#: Whether the source folder ends in a Normalize module (our converter writes it).
NORMALIZE_KEY = "sentence_transformers.normalize"
#: False when the source folder's pooling leaves prompt tokens out (`include_prompt`).
INCLUDE_PROMPT_KEY = "sentence_transformers.include_prompt"
#: The source folder's tokenizer.json, as sentence-transformers runs it (lower-casing included, no padding):
#: llama.cpp's WordPiece cuts some text differently (Hangul, Indic marks, words over 100 characters), so the
#: backend tokenizes with this and hands llama.cpp the ids. The key is the one llama.cpp's converter uses.
HF_TOKENIZER_KEY = "tokenizer.huggingface.json"

# llama.cpp's pooling enum (llama.h): the GGUF key `<arch>.pooling_type` and context params use it.
_POOLING_IDS: dict[str, int] = {"mean": 1, "cls": 2, "last": 3}
_POOLING_NAMES = {v: k for k, v in _POOLING_IDS.items()}
_GGUF_MAGIC = b"GGUF"

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]


def _cpu_count() -> int:
    # Affinity, not the host's core count: containers often pin us to fewer cores than they show.
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def check_magic(path: Path) -> None:
    """Fail early, with a plain reason, on a file that is not GGUF at all (llama.cpp's own error is terse)."""
    try:
        with path.open("rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise BackendError(f"cannot open GGUF file {path}: {exc.strerror or exc}") from exc
    if magic != _GGUF_MAGIC:
        raise BackendError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")


def _meta(lib: Any, model: Any, key: str) -> str | None:
    """A GGUF metadata value as text (llama.cpp keeps them all), or None when absent."""
    buf = ctypes.create_string_buffer(256)
    n = lib.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    return buf.value.decode("utf-8", errors="replace") if n >= 0 else None


def _meta_int(lib: Any, model: Any, key: str) -> int | None:
    value = _meta(lib, model, key)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


class GgufOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """`[models.X.options]` for `backend = "gguf"`."""

    #: CPU threads for llama.cpp; default: every core this process may run on.
    n_threads: PositiveInt | None = None
    #: Pooling of token states; default: the GGUF's `<arch>.pooling_type`.
    pooling: Pooling | None = None
    #: Return unit-length vectors. None: as the source model did (the GGUF's sentence_transformers.normalize,
    #: written by our converter; unit length for a GGUF without it, as llama.cpp's own server returns).
    normalize: bool | None = None
    #: Overrides of llama.cpp's context sizes. By default all three equal the model's input limit, so any
    #: accepted input fits one micro-batch (llama.cpp aborts an encoder batch larger than n_ubatch). A
    #: smaller n_ubatch lowers max_input_tokens to it.
    n_ctx: PositiveInt | None = None
    n_batch: PositiveInt | None = None
    n_ubatch: PositiveInt | None = None
    #: Most sequences packed into one llama.cpp call (a call also never exceeds n_ubatch tokens): each call
    #: has a fixed graph and thread start-up cost (bench/README.md, "gguf"), and the token cap keeps the
    #: packed attention small. llama.cpp's mean-pooling graph needs n_ubatch to be a multiple of it (see
    #: `micro_batch`).
    seqs_per_call: PositiveInt = 16
    #: llama.cpp's extra weight buffers (repacked / AMX kernels). Off: on AVX-512+AMX machines the AMX int8
    #: kernel for Q8_0 crashed the process with SIGILL; f16 never uses them.
    extra_buffers: bool = False


def gguf_file(path: str) -> Path:
    """The GGUF file `path` names: the file itself, or the one .gguf file in a folder."""
    found = Path(path).expanduser()
    if not found.exists():
        raise BackendError(f"GGUF file {found} does not exist")
    if found.is_dir():
        ggufs = sorted(found.glob("*.gguf"))
        if len(ggufs) != 1:
            raise BackendError(f"{found} is a folder with {len(ggufs)} .gguf files; point `path` at one file")
        found = ggufs[0]
    check_magic(found)
    return found


@dataclass(frozen=True)
class _Extras:
    """What our converter wrote beside llama.cpp's keys: the tokenizer, normalize, prompts, Dense layers."""

    dense: tuple[hf.DenseLayer, ...]
    # The source's own tokenizer (None for a GGUF without one: llama.cpp's tokenizer then).
    hf_tok: Any
    normalize: bool
    prompt_lengths: hf.PromptLengths | None


def _read_extras(path: Path, opts: GgufOptions) -> _Extras:
    meta = hf.read_gguf_metadata(path, arrays_under=hf.GGUF_DENSE_PREFIX)
    hf_tok = None
    if isinstance(meta.get(HF_TOKENIZER_KEY), str):
        from tokenizers import Tokenizer

        try:
            hf_tok = Tokenizer.from_str(meta[HF_TOKENIZER_KEY])
        except Exception as exc:
            raise BackendError(f"{path}: the tokenizer it carries ({HF_TOKENIZER_KEY}) cannot be read: {exc}") from exc
        hf_tok.no_padding()
        hf_tok.no_truncation()
    normalize = meta.get(NORMALIZE_KEY)
    prompt_lengths = None
    if meta.get(INCLUDE_PROMPT_KEY) is False:
        prompts, _ = hf.read_prompts(path)
        if prompts and hf_tok is None:
            raise BackendError(f"{path}: leaves its prompts out of pooling but carries no tokenizer.json")
        specials = hf.special_ids(hf_tok) if hf_tok is not None else set()
        layout = hf.Layout(root=path, transformer_dir=path, include_prompt=False)
        tok = hf_tok

        def tokenize(texts: Sequence[str]) -> list[list[int]]:
            return [list(e.ids) for e in tok.encode_batch(list(texts))]

        prompt_lengths = hf.prompt_lengths(layout, prompts, tokenize, specials)
    return _Extras(
        dense=hf.gguf_dense_layers(path, meta),
        hf_tok=hf_tok,
        normalize=opts.normalize if opts.normalize is not None else normalize is not False,
        prompt_lengths=prompt_lengths,
    )


def micro_batch(limit: int, n_ubatch: int | None, seqs: int) -> int:
    """llama.cpp's micro-batch size for inputs of up to `limit` tokens and `seqs` sequences per call.

    When it reserves its graphs, llama.cpp rounds the micro-batch up to a multiple of the sequence count
    but keeps one output per requested token; the mean-pooling product then gets operands of different
    sizes, fails GGML_ASSERT(ggml_can_mul_mat) and aborts the process (e.g. 256 tokens with 12, 3 or 5
    sequences). So the default is the limit rounded up to a multiple of `seqs` (a little more scratch
    memory, nothing else), and an explicit n_ubatch that is not a multiple is refused at load.
    """
    if n_ubatch is None:
        return -(-limit // seqs) * seqs
    if n_ubatch % seqs:
        lower, upper = n_ubatch // seqs * seqs, -(-n_ubatch // seqs) * seqs
        choices = f"{lower} or {upper}" if lower else f"{upper}"
        raise BackendError(
            f"options.n_ubatch = {n_ubatch} is not a multiple of seqs_per_call = {seqs}: llama.cpp's pooling "
            f"graph cannot be built for it (the runtime would abort); use n_ubatch = {choices}, or change "
            "seqs_per_call"
        )
    return n_ubatch


def _pooled_by_hand(
    lib: Any, ctx: Any, batch: Any, seqs: list[list[int]], skip: list[int], dim: int, pooling: Any
) -> np.ndarray:
    """Each input's token states from a context that returns them, pooled here as sentence-transformers pools,
    leaving out its first `skip` tokens (a prompt that the source model's pooling excludes)."""
    out = np.empty((len(seqs), dim), dtype=np.float32)
    for i, tokens in enumerate(seqs):
        _llama.fill_batch(batch, [tokens])
        rc = lib.llama_decode(ctx, batch)
        if rc != 0:
            raise BackendError(f"llama.cpp decode failed (code {rc}) on an input of {len(tokens)} tokens")
        ptr = lib.llama_get_embeddings(ctx)
        states = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), (len(tokens), dim)).copy()
        mask = hf.exclude_prompts(np.ones((1, len(tokens)), dtype=np.int64), [skip[i]])
        out[i] = hf.pool(states[None], mask, pooling)[0]
    return out


class GgufBackend(GgufScoring, Backend):
    """One GGUF embedding model, or reranker (`task = "rerank"`), in llama.cpp (CPU)."""

    name: ClassVar[str] = "gguf"
    Options: ClassVar[type[msgspec.Struct]] = GgufOptions

    @classmethod
    def within_cores(cls, options: Any, cores: int) -> Any:
        # Unset, llama.cpp takes every core this process may run on.
        return options if options.n_threads else msgspec.structs.replace(options, n_threads=cores)

    def __init__(self, *, model: str, path: str, options: Any, trust_remote_code: bool = False) -> None:
        super().__init__(model=model, path=path, options=options, trust_remote_code=trust_remote_code)
        self.opts: GgufOptions = options if isinstance(options, GgufOptions) else GgufOptions()
        # One llama context holds one set of activations and output buffers: calls must not interleave.
        self._lock = threading.Lock()
        self._lib: Any = None
        self._model: Any = None
        self._ctx: Any = None
        # Created on first use: a context that returns token states (for prompts left out of pooling).
        self._token_ctx: Any = None
        self._threads = 1
        self._pooling: hf.Pooling = "mean"
        self._vocab: Any = None
        self._batch: Any = None
        self._dim = 0
        self._max_tokens = 0
        self._n_ubatch = 0
        self._n_batch = 0
        self._seqs_per_call = 1
        self._normalize = True
        # The source's own tokenizer (None for a GGUF without one: llama.cpp's tokenizer then).
        self._hf_tok: Any = None
        self._prompt_lengths: hf.PromptLengths | None = None
        # Dense layers the runtime does not apply itself (our converter's keys), applied after pooling.
        self._dense: tuple[hf.DenseLayer, ...] = ()

    # -- loading -----------------------------------------------------------------------------------------

    def load_tokenizer(self) -> bool:
        """The GGUF's tokenizer alone: the source's tokenizer.json it carries, else llama.cpp's own from the
        vocabulary (vocab_only: no weights, no context)."""
        lib = _llama.lib()
        path = gguf_file(self.path)
        self.close()
        self._take_extras(path)
        model = _llama.load_model(path, vocab_only=True)
        self._lib, self._model, self._vocab = lib, model, lib.llama_model_get_vocab(model)
        return True

    def _take_extras(self, path: Path) -> None:
        extras = _read_extras(path, self.opts)
        self._dense, self._hf_tok = extras.dense, extras.hf_tok
        self._normalize, self._prompt_lengths = extras.normalize, extras.prompt_lengths

    def load(self) -> ModelInfo:
        lib = _llama.lib()
        path = gguf_file(self.path)
        threads = self.opts.n_threads or _cpu_count()
        self._seqs_per_call = min(self.opts.seqs_per_call, int(lib.llama_max_parallel_sequences()))
        self.close()  # a second load() replaces the first model instead of leaking it
        self._take_extras(path)
        # Metadata llama.cpp reads comes from llama.cpp itself after loading the weights (mmap).
        model = _llama.load_model(path, extra_buffers=self.opts.extra_buffers)
        try:
            arch = _meta(lib, model, "general.architecture") or "?"
            if self.task == "rerank":
                self._check_reranker(lib, model, path, arch)
            ctx, pooling = self._new_context(lib, model, path, arch, threads)
        except BackendError:
            lib.llama_model_free(model)
            raise
        self._lib, self._model, self._ctx = lib, model, ctx
        self._threads, self._pooling = threads, _POOLING_NAMES.get(pooling, "mean")
        self._vocab = lib.llama_model_get_vocab(model)
        self._dim = int(lib.llama_model_n_embd(model))
        if self._dense and self._dense[0].in_features != self._dim:
            dim = self._dim
            self.close()
            raise BackendError(f"{path}: its first Dense layer takes {self._dense[0].in_features} features, not {dim}")
        # One reusable batch: token, pos, seq_id and logits arrays sized for a full micro-batch.
        self._batch = lib.llama_batch_init(self._n_batch, 0, 1)
        if self.task == "rerank":
            return self._load_reranker(lib, path)
        log.info(
            "gguf %s: arch=%s dim=%d max_input_tokens=%d pooling=%s threads=%d seqs_per_call=%d",
            path.name,
            arch,
            self._dim,
            self._max_tokens,
            self._pooling,
            threads,
            self.opts.seqs_per_call,
        )
        return ModelInfo(
            dimension=self._dense[-1].out_features if self._dense else self._dim,
            max_input_tokens=self._max_tokens,
            normalized=self._normalize,
            # A core batch of 32 becomes a few packed llama.cpp calls (see seqs_per_call).
            max_batch_size=32,
            # Sequences are packed token by token into llama.cpp's batch: nothing is padded, nothing to split.
            pads_to_longest=False,
            local_tokenizer=True,
            embeds_token_ids=True,
        )

    def _new_context(self, lib: Any, model: Any, path: Path, arch: str, threads: int) -> tuple[Any, int]:
        """llama.cpp's context for the model: its sizes from the input limit and the options, its pooling."""
        o = self.opts
        limit = int(lib.llama_model_n_ctx_train(model))
        if limit < 1:
            raise BackendError(f"{path}: the GGUF declares no context length ({arch}.context_length)")
        seq_len = _meta_int(lib, model, MAX_SEQ_LENGTH_KEY)
        if seq_len is not None and 0 < seq_len < limit:
            limit = seq_len
        n_ubatch = micro_batch(limit, o.n_ubatch, self._seqs_per_call)
        n_batch = max(o.n_batch or n_ubatch, n_ubatch)
        n_ctx = max(o.n_ctx or n_batch, n_batch)
        # llama.cpp encodes a whole sequence in one micro-batch: an input longer than n_ubatch aborts
        # the process (GGML_ASSERT), so the advertised limit never exceeds it.
        self._max_tokens = min(limit, n_ubatch)
        self._n_ubatch, self._n_batch = n_ubatch, n_batch
        pooling = _POOLING_IDS[o.pooling] if o.pooling else _meta_int(lib, model, f"{arch}.pooling_type")
        if pooling == POOLING_RANK and self.task != "rerank":
            raise BackendError(f'{path} is a reranker (llama.cpp rank pooling): serve it with task = "rerank"')
        if pooling not in _POOLING_NAMES and self.task != "rerank":
            raise BackendError(
                f"{path}: the GGUF declares no usable pooling ({arch}.pooling_type={pooling!r}); "
                "set options.pooling to 'mean', 'cls' or 'last'"
            )
        ctx = _llama.new_context(
            model,
            n_ctx=n_ctx,
            n_batch=n_batch,
            n_ubatch=n_ubatch,
            n_seq_max=self._seqs_per_call,
            threads=threads,
            pooling=pooling,
        )
        return ctx, pooling

    def close(self) -> None:
        with self._lock:
            lib = self._lib
            if lib is None:
                return
            if self._batch is not None:
                lib.llama_batch_free(self._batch)
            self._free_scoring(lib)
            if self._ctx is not None:
                lib.llama_free(self._ctx)
            if self._token_ctx is not None:
                lib.llama_free(self._token_ctx)
            if self._model is not None:
                lib.llama_model_free(self._model)
            self._batch = self._ctx = self._token_ctx = self._model = self._vocab = None

    # -- tokens ------------------------------------------------------------------------------------------

    def _tokenize(self, text: str) -> list[int]:
        # llama.cpp adds [CLS] ... [SEP] as the HF tokenizer does, and maps special-token text typed in the
        # input ("[SEP]") to its id as HF does; our converter types only real special tokens CONTROL.
        if self._hf_tok is not None:
            return list(self._hf_tok.encode(text).ids)
        vocab = self._vocab
        if vocab is None:
            raise BackendError(f"model {self.model!r} is not loaded")
        return _llama.tokenize(vocab, text)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        # No lock: llama_tokenize only reads the vocabulary, and each call has its own output buffer (the
        # core stops calling a model before it closes it).
        if self._hf_tok is not None and len(texts) > 1:
            return [list(e.ids) for e in self._hf_tok.encode_batch(list(texts))]
        return [self._tokenize(t) for t in texts]

    # -- embeddings --------------------------------------------------------------------------------------

    def _truncate(self, tokens: list[int]) -> list[int]:
        # The core rejects over-long inputs; a direct caller gets sentence-transformers' truncation (keep
        # the leading tokens and the final [SEP]) instead of a llama.cpp abort.
        if len(tokens) <= self._max_tokens:
            return tokens
        return [*tokens[: self._max_tokens - 1], tokens[-1]]

    def _run(self, seqs: list[list[int]], out: np.ndarray, rows: list[int]) -> None:
        """Encode `seqs` in one llama.cpp call and write their pooled vectors into out[rows]."""
        lib, ctx, batch = self._lib, self._ctx, self._batch
        _llama.fill_batch(batch, seqs)
        _llama.decode(lib, ctx, batch, f"a batch of {len(seqs)} inputs")
        for s, row in enumerate(rows):
            ptr = _llama.pooled(lib, ctx, s, "llama.cpp returned no pooled embedding (is the GGUF an embedding model?)")
            out[row] = np.ctypeslib.as_array(ptr, (self._dim,))

    def embed(self, texts: Sequence[str], token_ids: Sequence[Sequence[int]]) -> np.ndarray:
        """Vectors from llama.cpp's own ids, which `tokenize` handed out: each input is tokenized once."""
        seqs = [self._truncate(list(ids)) for ids in token_ids]
        if self._prompt_lengths is not None:
            skip = self._prompt_lengths(texts)
            if any(skip):
                return self._embed_without_prompts(seqs, skip)
        out = np.empty((len(seqs), self._dim), dtype=np.float32)
        with self._lock:
            if self._ctx is None:
                raise BackendError(f"model {self.model!r} is closed")
            for rows in _llama.calls([len(t) for t in seqs], self._seqs_per_call, self._n_ubatch):
                self._run([seqs[i] for i in rows], out, rows)
        out = hf.apply_dense(out, self._dense)
        return l2_normalize(out) if self._normalize and len(out) else out

    def _embed_without_prompts(self, seqs: list[list[int]], skip: list[int]) -> np.ndarray:
        """llama.cpp pools every token of a sequence in its graph; to leave a prompt out, each input runs with
        a second context that returns token states, pooled here as sentence-transformers pools."""
        with self._lock:
            if self._ctx is None:
                raise BackendError(f"model {self.model!r} is closed")
            if self._token_ctx is None:
                self._token_ctx = _llama.new_context(
                    self._model,
                    n_ctx=self._n_ubatch,
                    n_batch=self._n_ubatch,
                    n_ubatch=self._n_ubatch,
                    n_seq_max=1,
                    threads=self._threads,
                    pooling=0,  # LLAMA_POOLING_TYPE_NONE: one state per token
                )
            out = _pooled_by_hand(self._lib, self._token_ctx, self._batch, seqs, skip, self._dim, self._pooling)
        # A Dense the runtime applies ran on each token's state here: it is linear with no bias (see the
        # converter's _runtime_dense), so pooling afterwards gives the same vector.
        out = hf.apply_dense(out, self._dense)
        return l2_normalize(out) if self._normalize and len(out) else out
