"""`gateway convert --to onnx` for a sentence-transformers CrossEncoder folder: its sequence-classification
head's logits as the graph's output (fp32, or dynamic int8 as for encoders), checked against the source's
`CrossEncoder.predict` on the same pairs. torch / transformers / onnx are imported inside the functions."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from gateway.plugin import BackendError
from gateway.runtime import hf

from .export import export_scores_graph, mark_task, one_line, quantize_int8

#: Worst |logit difference| a converted reranker may show against its source (fp32; int8 is reported).
FP32_TOLERANCE = 1e-3


def convert_reranker(
    src_dir: Path, out_dir: Path, quantize: str | None, trust_remote_code: bool, say: Callable[[str], None]
) -> None:
    """Export the folder's classifier to `out_dir/model.onnx` (and quantize it), marked as a reranker's graph."""
    import inspect

    try:
        import onnx  # noqa: F401 - the exporter needs it: fail before any work
        from transformers import AutoModelForSequenceClassification
    except ImportError as exc:
        raise BackendError(f"ONNX conversion needs torch, transformers and onnx ({exc.name} is missing)") from exc
    say(f"loading {src_dir} (a cross-encoder: exporting its classifier's logits)")
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(src_dir), local_files_only=True, trust_remote_code=trust_remote_code, attn_implementation="eager"
        ).eval()
    except Exception as exc:
        raise BackendError(f"cannot load a sequence-classification model from {src_dir}: {one_line(exc)}") from exc
    if model.config.num_labels != 1:
        raise BackendError(f"{src_dir} has {model.config.num_labels} labels; a reranker gives one score per pair")
    params = inspect.signature(model.forward).parameters
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if "token_type_ids" in params else [])
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gateway-onnx-", dir=out_dir) as tmp:
        staged = Path(tmp) / "model.onnx"
        export_scores_graph(model, names, staged, say)
        if quantize == "int8":
            quantize_int8(staged, Path(tmp) / "model.int8.onnx", say)
            staged = Path(tmp) / "model.int8.onnx"
        mark_task(staged, "rerank")
        os.replace(staged, out_dir / "model.onnx")


def check_reranker(src_dir: Path, out_dir: Path, quantize: str | None, say: Callable[[str], None]) -> float:
    """The written folder served by the onnx backend against `CrossEncoder.predict` on the source, logits on
    the same pairs; BackendError past FP32_TOLERANCE for fp32 (int8's worst is said). Returns the worst."""
    import torch
    from sentence_transformers import CrossEncoder

    from .backend import OnnxBackend, OnnxOptions

    pairs = hf.reranker_check_pairs()
    backend = OnnxBackend(model="convert-check", path=str(out_dir), options=OnnxOptions())
    backend.task = "rerank"
    backend.load()
    try:
        got = backend.score(pairs, backend.tokenize_pairs(pairs))
    finally:
        backend.close()
    want = CrossEncoder(str(src_dir), device="cpu").predict(pairs, activation_fn=torch.nn.Identity())
    worst = float(np.max(np.abs(got - np.asarray(want, dtype=np.float32))))
    say(f"check vs the source's CrossEncoder.predict on {len(pairs)} pairs: max |logit diff| {worst:.2e}")
    if not quantize and worst > FP32_TOLERANCE:
        raise BackendError(f"converted reranker disagrees with the source: max |logit diff| {worst:.2e}")
    return worst
