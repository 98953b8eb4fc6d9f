"""Checking a converted folder against its source model on the same texts, after `gateway convert --to onnx`
wrote it: a module of its own, as the check serves the folder through the onnx backend and encodes the source
with sentence-transformers or transformers, apart from writing the graph.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from gateway.plugin import BackendError
from gateway.runtime import hf

from .backend import OnnxBackend, OnnxOptions
from .export import one_line

# Checked after every conversion: varied lengths and scripts so a padding or quantization fault shows.
CHECK_SENTENCES = (
    "hello world",
    "A man is playing a guitar on stage.",
    "Das Wetter ist heute schön, aber morgen soll es regnen.",
    "東京は日本の首都です。",
    "I love pizza 🍕🔥!",
    "The quick brown fox jumps over the lazy dog. " * 12,
    "¿Dónde está la biblioteca? Está al lado del café.",
    "Quantum entanglement describes correlations between particles that persist over distance.",
)


class Mismatch(BackendError):
    """The written graph's vectors disagree with the source model's."""


def check_folder(model: Any, src_dir: Path, out_dir: Path, quantize: str | None, say: Callable[[str], None]) -> None:
    """Compare the written graph with the source model on the same texts, each side tokenizing them itself
    (a check fed the backend's own ids would not see a tokenizer fault), so a broken export fails here,
    not in serving. The reference is sentence-transformers' encode of the source folder where it is
    one, else the transformers model with its own tokenizer, pooled the same way."""
    texts = [*CHECK_SENTENCES, *hf.adversarial_texts()]
    backend = OnnxBackend(model="convert-check", path=str(out_dir), options=OnnxOptions())
    backend.load()
    try:
        got = hf.l2_normalize(backend.embed(texts, backend.tokenize(texts)))
        limit, pooling = backend._max_tokens, backend._pooling
    finally:
        backend.close()
    want = hf.l2_normalize(reference_vectors(model, src_dir, texts, limit, pooling))
    cos = np.sum(got * want, axis=1)
    worst = min(cos)
    say(f"check vs the source on {len(cos)} texts: min cosine {worst:.5f}, mean {np.mean(cos):.5f}")
    floor = 0.95 if quantize else 0.999
    if worst < floor:
        text = texts[int(np.argmin(cos))]
        raise Mismatch(f"converted model disagrees with the source: min cosine {worst:.4f} < {floor} on {text!r}")


def reference_vectors(model: Any, src_dir: Path, texts: list[str], limit: int, pooling: hf.Pooling) -> np.ndarray:
    """The source's vectors for `texts`: sentence-transformers' where the folder is one (and it is installed),
    else the transformers model's own, pooled as the backend pools."""
    layout = hf.read_layout(src_dir)
    if layout.is_sentence_transformers:
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            pass
        else:
            st = SentenceTransformer(str(src_dir), device="cpu", local_files_only=True)
            try:
                # prompt="": the texts as given, never the folder's default prompt.
                return np.asarray(st.encode(texts, prompt="", convert_to_numpy=True), dtype=np.float32)
            except (IndexError, RuntimeError) as exc:
                # A folder whose token limit is beyond what its position table can hold (an XLM-RoBERTa
                # whose max_position_embeddings has no room for the padding offset) fails here.
                raise BackendError(
                    f"sentence-transformers itself cannot encode the check texts with {src_dir} "
                    f"(limit {st.max_seq_length} tokens): {one_line(exc)}"
                ) from exc
    return _transformers_vectors(model, layout, texts, limit, pooling)


def _transformers_vectors(
    model: Any, layout: hf.Layout, texts: list[str], limit: int, pooling: hf.Pooling
) -> np.ndarray:
    """The transformers model on its own tokenizer's ids, one text at a time, pooled by `pooling`."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(layout.transformer_dir), local_files_only=True)
    rows = []
    with torch.no_grad():
        for text in texts:
            enc = tokenizer(
                text.lower() if layout.do_lower_case else text,
                truncation=True,
                max_length=limit,
                return_tensors="pt",
            )
            hidden = model(**enc).last_hidden_state.numpy()
            rows.append(hf.pool(hidden, enc["attention_mask"].numpy(), pooling)[0])
    return np.stack(rows)
