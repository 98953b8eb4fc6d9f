"""The onnx backend's rerank half: a cross-encoder graph from `gateway convert --to onnx` (its classifier's
logits), scored on pairs tokenized and cut as sentence-transformers' `CrossEncoder.predict` does (a mixin of
OnnxBackend, which loads it for `task = "rerank"`)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gateway.plugin import BackendError, ModelInfo
from gateway.runtime import hf

from .session import TASK_KEY, open_session


class OnnxScoring:
    """`score` and `tokenize_pairs` on a cross-encoder graph (`_load_reranker`)."""

    options: Any
    trust_remote_code: bool
    _count_tok: Any
    _embed_tok: Any
    _pad_id: int
    _max_tokens: int

    def _load_reranker(self, model_dir: Path, onnx_file: Path) -> ModelInfo:
        """The session on a graph our converter marked as a reranker's, and the folder's activation."""
        session = open_session(onnx_file, self.options)
        task = session.get_modelmeta().custom_metadata_map.get(TASK_KEY)
        outputs = [o.name for o in session.get_outputs()]
        if task != "rerank" or "logits" not in outputs:
            raise BackendError(
                f"{onnx_file} is not a reranker's graph (outputs {outputs}); convert a CrossEncoder folder with "
                "`gateway convert SRC --to onnx --out DIR`"
            )
        self._scores_session = session
        self._score_inputs = {i.name: i.type for i in session.get_inputs()}
        self._score_lock = threading.Lock()
        return ModelInfo(
            dimension=1,
            max_input_tokens=self._max_tokens,
            normalized=False,
            call_overhead_tokens=24,
            local_tokenizer=True,
            task="rerank",
            score_activation=_activation(model_dir, self.trust_remote_code),
        )

    def tokenize_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[list[int]]:
        """Each pair's ids as the tokenizer joins two texts ([CLS] q [SEP] d [SEP] for BERT), untruncated."""
        return [e.ids for e in self._count_tok.encode_batch([(q, d) for q, d in pairs])]

    def score(self, pairs: Sequence[tuple[str, str]], token_ids: Sequence[Sequence[int]]) -> np.ndarray:
        """The graph's logits for the pairs, each cut to the model's limit longest text first (as `predict`
        cuts a pair), padded to the longest."""
        encodings = self._embed_tok.encode_batch([(q, d) for q, d in pairs])
        width = max(len(e.ids) for e in encodings)
        ids = np.full((len(encodings), width), self._pad_id, dtype=np.int64)
        types = np.zeros_like(ids)
        mask = np.zeros_like(ids)
        for row, e in enumerate(encodings):
            ids[row, : len(e.ids)] = e.ids
            types[row, : len(e.ids)] = e.type_ids
            mask[row, : len(e.ids)] = 1
        arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        feed = {
            name: arrays[name].astype(np.int32) if kind == "tensor(int32)" else arrays[name]
            for name, kind in self._score_inputs.items()
        }
        logits = self._scores_session.run(["logits"], feed)[0]
        return np.asarray(logits, dtype=np.float32).reshape(len(pairs))


def _activation(model_dir: Path, trust_remote_code: bool) -> Any:
    """What `CrossEncoder.predict` applies by default to this folder's one logit, by sentence-transformers'
    own rule: the activation its config names (a torch one; another only with trust_remote_code, which this
    backend cannot run), else sigmoid for one label."""
    config_file = model_dir / "config_sentence_transformers.json"
    config = hf.read_json(config_file) if config_file.is_file() else {}
    named = config.get("activation_fn") if isinstance(config, dict) else None
    if named is None or (not str(named).startswith("torch.") and not trust_remote_code):
        return "sigmoid"
    kind = str(named).rsplit(".", 1)[-1]
    if kind in ("Sigmoid", "Identity"):
        return kind.lower()
    raise BackendError(f"{config_file}: activation {named!r} is not supported (only Sigmoid and Identity)")
