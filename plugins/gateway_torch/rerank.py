"""The torch backend's rerank half: a sentence-transformers CrossEncoder folder, scored as
`CrossEncoder.predict` scores it (a mixin of TorchBackend, which loads this when the model's task is "rerank")."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from gateway import BackendError, ModelInfo


class CrossEncoderScoring:
    """`score` and `tokenize_pairs` on a loaded CrossEncoder (`_load_reranker`)."""

    model: str
    path: str
    options: Any
    trust_remote_code: bool

    def _load_reranker(self, torch: Any) -> ModelInfo:
        """Load the folder as a CrossEncoder; BackendError when it is not one with a single score per pair, or
        when its activation is not one the core can apply."""
        from sentence_transformers import CrossEncoder

        try:
            # str(): sentence-transformers treats a Path as a hub id.
            cross = CrossEncoder(
                str(self.path),
                device=self.options.device,
                trust_remote_code=self.trust_remote_code,
                local_files_only=True,
            )
        except Exception as exc:
            raise BackendError(f"cannot load a sentence-transformers CrossEncoder from {self.path}: {exc}") from exc
        if cross.num_labels != 1:
            raise BackendError(
                f"{self.path} is a classifier with {cross.num_labels} labels; a reranker gives one score per pair"
            )
        self._cross = cross
        self._torch_module = torch
        self._cross_lock = threading.Lock()
        tokenizer = cross.tokenizer
        self._counter = lambda texts: list(tokenizer(list(texts), truncation=False)["input_ids"])
        limit = cross.max_seq_length or getattr(tokenizer, "model_max_length", None) or 512
        return ModelInfo(
            dimension=1,
            max_input_tokens=int(limit),
            normalized=False,
            max_batch_size=32,
            call_overhead_tokens=128,
            local_tokenizer=True,
            task="rerank",
            score_activation=_activation(cross.activation_fn, torch),
        )

    def tokenize_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[list[int]]:
        """The ids of each pair as the CrossEncoder's tokenizer joins them ([CLS] q [SEP] d [SEP] for BERT),
        untruncated."""
        tokenizer = self._cross.tokenizer
        return list(tokenizer([q for q, _ in pairs], [d for _, d in pairs], truncation=False)["input_ids"])

    def score(self, pairs: Sequence[tuple[str, str]], token_ids: Sequence[Sequence[int]]) -> np.ndarray:
        """The logits `CrossEncoder.predict` computes for the pairs (its own tokenizing, and its cut of a pair
        over the limit, longest text first), before its activation."""
        torch = self._torch_module
        with self._cross_lock, torch.inference_mode():
            logits = self._cross.predict(
                list(pairs),
                activation_fn=torch.nn.Identity(),
                batch_size=max(1, len(pairs)),
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return np.asarray(logits, dtype=np.float32).reshape(len(pairs))


def _activation(fn: Any, torch: Any) -> Any:
    """The core's name for the CrossEncoder's default activation (what `predict` applies unless told)."""
    if isinstance(fn, torch.nn.Sigmoid):
        return "sigmoid"
    if fn is None or isinstance(fn, torch.nn.Identity):
        return "identity"
    raise BackendError(
        f"the CrossEncoder's activation {type(fn).__name__} is not supported (only Sigmoid and Identity): its "
        "relevance scores could not be computed as sentence-transformers computes them"
    )
