"""The gguf backend's rerank half: a cross-encoder GGUF (`gateway convert --to gguf` on a CrossEncoder folder)
scored by llama.cpp's rank pooling, its pairs tokenized and cut as sentence-transformers' `CrossEncoder.predict`
does (a mixin of GgufBackend, which loads it for `task = "rerank"`).

llama.cpp's BERT graph adds the token-type embedding of type 0 to every token ("token types are hardcoded to
zero" in its bert graph), where BERT reads a pair's second text as type 1. For a model whose two type rows
differ, each pair therefore goes in as input vectors (llama.cpp's `batch.embd`, which replaces only the
word-embedding lookup): the word row plus `type[t] - type[0]`, to which the graph adds `type[0]` and the
position row itself, which is BERT's sum.
"""

from __future__ import annotations

import ctypes
import math
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gateway.plugin import BackendError, ModelInfo
from gateway.runtime import hf

from . import _llama

#: llama.cpp's LLAMA_POOLING_TYPE_RANK (llama.h): the [CLS] state through the classifier head, one score per
#: sequence from llama_get_embeddings_seq.
POOLING_RANK = 4
#: Our key: the activation `CrossEncoder.predict` applies by default ("sigmoid" or "identity").
ACTIVATION_KEY = "sentence_transformers.activation"


class _TokenTable:
    """The GGUF's word-embedding rows (dequantized on demand) and its token-type rows, read with gguf's reader
    (memory-mapped: only the rows a batch uses are converted)."""

    def __init__(self, path: Path) -> None:
        import gguf

        reader = gguf.GGUFReader(str(path))
        tensors = {t.name: t for t in reader.tensors}
        words, types = tensors.get("token_embd.weight"), tensors.get("token_types.weight")
        if words is None:
            raise BackendError(f"{path}: no token_embd.weight tensor")
        self._reader = reader  # keeps the memory map open
        self._words = words.data
        self._kind = words.tensor_type
        self._plain = words.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
        self._dequantize = gguf.quants.dequantize
        self.types = np.asarray(types.data, dtype=np.float32) if types is not None else None
        try:
            self.rows([0])  # a weight type gguf's reader cannot dequantize fails here, not on a request
        except (NotImplementedError, ValueError) as exc:
            raise BackendError(f"{path}: cannot read token_embd.weight ({words.tensor_type.name}): {exc}") from exc

    def rows(self, ids: Sequence[int]) -> np.ndarray:
        picked = self._words[np.asarray(ids, dtype=np.int64)]
        if self._plain:
            return picked.astype(np.float32)
        return np.asarray(self._dequantize(picked, self._kind), dtype=np.float32)


class GgufScoring:
    """`tokenize_pairs` and `score` on a reranker GGUF (`_load_reranker`)."""

    path: str
    model: str
    opts: Any
    _lock: threading.Lock
    _lib: Any
    _ctx: Any
    _model: Any
    _hf_tok: Any
    _max_tokens: int
    _n_ubatch: int
    _n_batch: int
    _seqs_per_call: int
    _dim: int
    # The word and token-type rows (None: pairs go in as token ids) and the input-vector batch, set by a load.
    _table: _TokenTable | None = None
    _embd_batch: Any = None
    _rerank_meta: dict[str, Any]

    close: Callable[[], None]  # GgufBackend's

    def _check_reranker(self, lib: Any, model: Any, path: Path, arch: str) -> None:
        """BackendError saying why llama.cpp cannot score pairs with this GGUF as its source scores them."""
        self._rerank_meta = hf.read_gguf_metadata(path)
        why = self._reranker_refusal(lib, model, path, arch, self._rerank_meta)
        if why:
            raise BackendError(why)

    def _reranker_refusal(self, lib: Any, model: Any, path: Path, arch: str, meta: dict[str, Any]) -> str:
        missing = [f for f in ("llama_model_n_cls_out", "llama_get_embeddings_seq") if not hasattr(lib, f)]
        if missing:
            return (
                f"this llama-cpp-python build has no {', '.join(missing)}: it cannot return llama.cpp's rank "
                "scores (upgrade llama-cpp-python)"
            )
        if self.opts.pooling is not None:
            return f"options.pooling = {self.opts.pooling!r} does not apply to a reranker (the GGUF pools by rank)"
        pooling = meta.get(f"{arch}.pooling_type")
        if pooling != POOLING_RANK:
            return (
                f"{path} is not a reranker GGUF ({arch}.pooling_type is {pooling!r}, not rank = {POOLING_RANK}); "
                "convert a CrossEncoder folder with `gateway convert SRC --to gguf`"
            )
        n_out = int(lib.llama_model_n_cls_out(model))
        if n_out != 1:
            return f"{path} has {n_out} classifier outputs; a reranker gives one score per pair"
        if self._hf_tok is None:
            return (
                f"{path} carries no tokenizer.json (tokenizer.huggingface.json): the pairs could not be joined "
                "and cut as the source model's tokenizer does; convert the folder with `gateway convert --to gguf`"
            )
        return ""

    def _load_reranker(self, lib: Any, path: Path) -> ModelInfo:
        """The rest of a reranker's load, after its context (closed again on failure)."""
        try:
            return self._reranker_info(lib, path, self._rerank_meta)
        except BackendError:
            self.close()
            raise

    def _free_scoring(self, lib: Any) -> None:
        if self._embd_batch is not None:
            lib.llama_batch_free(self._embd_batch)
        self._embd_batch = self._table = None

    def _reranker_info(self, lib: Any, path: Path, meta: dict[str, Any]) -> ModelInfo:
        """The table for token types and the pair tokenizer; a probe pair checks that a score comes back."""
        table = _TokenTable(path)
        types = table.types
        # Type rows that all equal row 0 change nothing: token ids go in as they are (cheaper).
        self._table = table if types is not None and len(types) > 1 and np.any(types[1:] != types[0]) else None
        if self._table is not None:
            self._embd_batch = lib.llama_batch_init(self._n_batch, self._dim, 1)
        pair_tok = type(self._hf_tok).from_str(self._hf_tok.to_str())
        pair_tok.enable_truncation(max_length=self._max_tokens)  # longest text first, as predict cuts a pair
        self._pair_tok = pair_tok
        probe = self.score([("probe", "a document")], [])
        if not math.isfinite(float(probe[0])):
            raise BackendError(f"{path}: llama.cpp's rank pooling returned {float(probe[0])} for a probe pair")
        activation = meta.get(ACTIVATION_KEY, "sigmoid")
        if activation not in ("sigmoid", "identity"):
            raise BackendError(f"{path}: {ACTIVATION_KEY} = {activation!r} (expected sigmoid or identity)")
        return ModelInfo(
            dimension=1,
            max_input_tokens=self._max_tokens,
            normalized=False,
            max_batch_size=32,
            pads_to_longest=False,
            local_tokenizer=True,
            task="rerank",
            score_activation=activation,
        )

    def tokenize_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[list[int]]:
        """Each pair's ids as the source's tokenizer joins two texts ([CLS] q [SEP] d [SEP]), untruncated."""
        return [list(e.ids) for e in self._hf_tok.encode_batch([(q, d) for q, d in pairs])]

    def score(self, pairs: Sequence[tuple[str, str]], token_ids: Sequence[Sequence[int]]) -> np.ndarray:
        """llama.cpp's rank score (the classifier's logit) per pair, each cut to the limit longest text first."""
        encodings = self._pair_tok.encode_batch([(q, d) for q, d in pairs])
        seqs = [(list(e.ids), list(e.type_ids)) for e in encodings]
        out = np.empty(len(seqs), dtype=np.float32)
        with self._lock:
            if self._ctx is None:
                raise BackendError(f"model {self.model!r} is closed")
            for rows in _llama.calls([len(ids) for ids, _ in seqs], self._seqs_per_call, self._n_ubatch):
                self._score_run([seqs[i] for i in rows], out, rows)
        return out

    def _score_run(self, seqs: list[tuple[list[int], list[int]]], out: np.ndarray, rows: list[int]) -> None:
        lib, ctx = self._lib, self._ctx
        if self._table is None:
            batch = self._batch
            _llama.fill_batch(batch, [ids for ids, _ in seqs])
        else:
            batch = self._embd_batch
            self._fill_vectors(batch, seqs)
        _llama.decode(lib, ctx, batch, f"a batch of {len(seqs)} pairs")
        for s, row in enumerate(rows):
            out[row] = _llama.pooled(lib, ctx, s, "llama.cpp returned no rank score (is the GGUF a reranker?)")[0]

    def _fill_vectors(self, batch: Any, seqs: list[tuple[list[int], list[int]]]) -> None:
        """The batch as input vectors: each token's word row plus its type's difference from type 0."""
        table = self._table
        types = table.types
        ids = [t for s, _ in seqs for t in s]
        vectors = table.rows(ids)
        kinds = np.fromiter((t for _, ts in seqs for t in ts), dtype=np.int64, count=len(ids))
        vectors += (types - types[0])[kinds]
        flat = np.ascontiguousarray(vectors, dtype=np.float32).ravel()
        ctypes.memmove(batch.embd, flat.ctypes.data, flat.nbytes)
        _llama.fill_batch(batch, [tokens for tokens, _ in seqs], tokens=False)
