"""Torch backend: sentence-transformers, loaded from a local folder (never a hub)."""

from __future__ import annotations

import copy
import os
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from gateway import Backend, BackendError, ModelInfo, hookimpl

if TYPE_CHECKING:
    import numpy as np


class TorchOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    device: str = "cpu"
    # torch intra-op threads; None leaves torch's default (all cores).
    threads: int | None = None
    # None: as the model defines (a Normalize module); True/False force it.
    normalize: bool | None = None


class TorchBackend(Backend):
    """A sentence-transformers model run by torch."""

    name = "torch"
    Options = TorchOptions
    default_max_batch_size = 32
    default_max_batch_tokens = 16_384
    # A call costs about as much as 128 tokens of compute (bench/run.py raw figures: about 13 ms fixed per
    # call, about 0.1 ms per token).
    call_overhead_tokens = 128

    def load(self) -> ModelInfo:
        """Load the SentenceTransformer and a private copy of its tokenizer for counting."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        # OpenMP workers spin after each parallel region by default; beside an event loop on few cores that
        # spinning is stolen time (read once, when torch's OpenMP starts).
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        try:
            import torch
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            raise BackendError(f"the torch backend needs the `torch` extra: {exc}") from exc
        try:
            from sentence_transformers.sentence_transformer.modules import Normalize
        except ImportError:  # sentence-transformers < 6
            from sentence_transformers.models import Normalize
        opts: TorchOptions = self.options
        if opts.threads:
            torch.set_num_threads(opts.threads)
        try:
            # str(): SentenceTransformer treats a Path as a hub id.
            model = SentenceTransformer(
                str(self.path), device=opts.device, trust_remote_code=self.trust_remote_code, local_files_only=True
            )
        except Exception as exc:
            raise BackendError(f"cannot load sentence-transformers model from {self.path}: {exc}") from exc
        model.eval()
        self._torch = torch
        self._model = model
        self._lock = threading.Lock()
        has_normalize = any(isinstance(m, Normalize) for m in model)
        self._normalize = bool(opts.normalize) and not has_normalize
        normalized = has_normalize if opts.normalize is None else opts.normalize
        self._counter = self._make_counter(model.tokenizer)
        limit = model.max_seq_length or getattr(model.tokenizer, "model_max_length", None) or 512
        dim = model.get_embedding_dimension() if hasattr(model, "get_embedding_dimension") else None
        dim = dim or model.get_sentence_embedding_dimension()
        if normalized is False and has_normalize:
            raise BackendError("normalize = false, but the model itself ends in a Normalize module")
        return ModelInfo(dimension=int(dim), max_input_tokens=int(limit), normalized=normalized)

    @staticmethod
    def _make_counter(tokenizer: Any) -> Callable[[Sequence[str]], list[int]]:
        # A private copy: the encode path mutates its tokenizer's truncation settings on every call, and a
        # Rust tokenizer being mutated cannot be read from another thread ("Already borrowed").
        fast = getattr(tokenizer, "backend_tokenizer", None)
        if fast is not None:
            fast = copy.deepcopy(fast)
            fast.no_padding()
            fast.no_truncation()
            return lambda texts: [len(e.ids) for e in fast.encode_batch(list(texts))]
        slow = copy.deepcopy(tokenizer)
        return lambda texts: [len(ids) for ids in slow(list(texts), truncation=False)["input_ids"]]

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens with [CLS]/[SEP] (what the model consumes), untruncated."""
        return self._counter(texts)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """One forward pass over the whole batch (the core already sized and sorted it)."""
        import numpy as np

        with self._lock, self._torch.inference_mode():
            out = self._model.encode(
                list(texts),
                batch_size=max(1, len(texts)),
                convert_to_numpy=True,
                normalize_embeddings=self._normalize,
                show_progress_bar=False,
            )
        return np.asarray(out, dtype=np.float32)

    def close(self) -> None:
        """Drop the model so its memory can be reclaimed."""
        self._model = None


@hookimpl(trylast=True)
def register_backends(register: Callable[[type[Backend]], None]) -> None:
    """The bundled torch backend."""
    register(TorchBackend)
