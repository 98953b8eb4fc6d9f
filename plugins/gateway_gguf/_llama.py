"""Thin layer over llama-cpp-python's C bindings (llama_cpp.llama_cpp), used instead of `llama_cpp.Llama`.

Why not `Llama`: it cannot turn off llama.cpp's "extra buffer types" (`use_extra_bufts`), and on our
AVX-512/AMX machines the AMX int8 kernel those buffers select for Q8_0 weights died with SIGILL
(`tilezero` in libggml-cpu.so), taking the whole server down. Loading through the C API lets us keep them
off, and also gives us llama.cpp's own error text for BackendError instead of "failed to load model".
"""

from __future__ import annotations

import ctypes
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from gateway.plugin import BackendError

_init_lock = threading.Lock()
_initialized = False
# Recent llama.cpp warnings/errors: quoted in BackendError when a load fails. The C callback object
# must stay referenced for as long as llama.cpp may call it (module lifetime).
_recent: deque[str] = deque(maxlen=20)
_callback: Any = None
# ggml_log_level in ggml.h (NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5); llama-cpp-python's own
# _logger.py still documents an older numbering.
_GGML_LOG_WARN, _GGML_LOG_ERROR, _GGML_LOG_CONT = 3, 4, 5


def lib() -> Any:
    """The llama_cpp module, initialized once (backend init, quiet logging)."""
    global _initialized, _callback
    try:
        import llama_cpp
    except ImportError as exc:
        raise BackendError(
            "the gguf backend needs llama-cpp-python: install the `gguf` extra (pip install 'embedding-gateway[gguf]')"
        ) from exc
    with _init_lock:
        if not _initialized:
            last_level = [0]

            def on_log(level: int, text: bytes, _user: Any) -> None:
                # llama.cpp logs model details at INFO on every load; keep only what explains a failure.
                if level == _GGML_LOG_CONT:
                    level = last_level[0]
                last_level[0] = level
                if level in (_GGML_LOG_WARN, _GGML_LOG_ERROR) and text:
                    _recent.append(text.decode("utf-8", errors="replace").strip())

            _callback = llama_cpp.llama_log_callback(on_log)
            llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
            _initialized = True
    return llama_cpp


def _reason() -> str:
    # The last lines say what failed ("... data is not within the file bounds ..."); drop the generic
    # "failed to load model" trailer that follows every failure.
    lines = [line for line in _recent if line and not line.endswith("failed to load model")]
    _recent.clear()
    return "; ".join(lines[-2:]) if lines else "see the llama.cpp log"


def load_model(path: Path, *, vocab_only: bool = False, extra_buffers: bool = False) -> Any:
    """A llama_model pointer (free with llama_model_free); BackendError with llama.cpp's reason on failure."""
    ll = lib()
    params = ll.llama_model_default_params()
    params.n_gpu_layers = 0
    params.vocab_only = vocab_only
    if "use_extra_bufts" in dict(params._fields_):  # older bindings lack the field (and the feature)
        params.use_extra_bufts = extra_buffers
    _recent.clear()
    model = ll.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise BackendError(f"llama.cpp cannot load {path}: {_reason()}")
    return model


def new_context(
    model: Any, *, n_ctx: int, n_batch: int, n_ubatch: int, n_seq_max: int, threads: int, pooling: int
) -> Any:
    ll = lib()
    params = ll.llama_context_default_params()
    params.n_ctx = n_ctx
    params.n_batch = n_batch
    params.n_ubatch = n_ubatch
    params.n_seq_max = n_seq_max
    params.n_threads = threads
    params.n_threads_batch = threads  # encoding a batch of tokens uses the batch thread count
    params.embeddings = True
    params.pooling_type = pooling
    params.kv_unified = True  # n_ctx is not divided between sequences
    _recent.clear()
    ctx = ll.llama_init_from_model(model, params)
    if not ctx:
        raise BackendError(f"llama.cpp cannot create a context: {_reason()}")
    return ctx


def tokenize(vocab: Any, text: str) -> list[int]:
    """Token ids with [CLS] ... [SEP]; special-token text in the input maps to its id, as in HF tokenizers."""
    ll = lib()
    data = text.encode("utf-8")
    # WordPiece yields at most one token per byte, plus the two added special tokens.
    size = len(data) + 2
    buf = (ll.llama_token * size)()
    n = ll.llama_tokenize(vocab, data, len(data), buf, size, True, True)
    if n < 0:  # cannot happen for WordPiece, but the API's contract is "negative = needed size"
        size = -n
        buf = (ll.llama_token * size)()
        n = ll.llama_tokenize(vocab, data, len(data), buf, size, True, True)
        if n < 0:
            raise BackendError(f"llama.cpp could not tokenize an input of {len(data)} bytes")
    return buf[:n]


def fill_batch(batch: Any, seqs: Sequence[Sequence[int]], tokens: bool = True) -> None:
    """llama.cpp's batch holding `seqs`, token by token, sequence i under sequence id i, every state kept;
    `tokens` False: only the tokens' places (the caller wrote their input vectors into `batch.embd`)."""
    k = 0
    for s, ids in enumerate(seqs):
        for p, tok in enumerate(ids):
            if tokens:
                batch.token[k] = tok
            batch.pos[k] = p
            batch.n_seq_id[k] = 1
            batch.seq_id[k][0] = s
            batch.logits[k] = True
            k += 1
    batch.n_tokens = k


def calls(lengths: Sequence[int], per_call: int, n_ubatch: int) -> Iterator[list[int]]:
    """The inputs of each llama.cpp call, by index: consecutive ones, up to `per_call` sequences and one
    micro-batch of `n_ubatch` tokens."""
    chunk: list[int] = []
    used = 0
    for i, n in enumerate(lengths):
        if chunk and (len(chunk) >= per_call or used + n > n_ubatch):
            yield chunk
            chunk, used = [], 0
        chunk.append(i)
        used += n
    if chunk:
        yield chunk


def decode(lib: Any, ctx: Any, batch: Any, what: str) -> None:
    """One llama.cpp call on `batch` (`what` names it in the error)."""
    mem = lib.llama_get_memory(ctx)
    if mem:  # encoder-only models have no KV cache; a decoder-style one must start clean each call
        lib.llama_memory_clear(mem, True)
    rc = lib.llama_decode(ctx, batch)
    if rc != 0:
        raise BackendError(f"llama.cpp decode failed (code {rc}) on {what}")


def pooled(lib: Any, ctx: Any, seq: int, missing: str) -> Any:
    """Sequence `seq`'s pooled output of the last call, as a float pointer (BackendError `missing` if none)."""
    ptr = lib.llama_get_embeddings_seq(ctx, seq)
    if not ptr:
        raise BackendError(missing)
    return ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float))
