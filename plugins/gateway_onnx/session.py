"""Building the onnx backend's runtime: finding the graph in a model folder, opening an onnxruntime session from
`OnnxOptions`, and reading what the graph takes and gives; a module of its own, apart from the backend's
per-batch call.

onnxruntime is imported inside the functions: the core imports every plugin at start.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.plugin import BackendError

if TYPE_CHECKING:
    import onnxruntime

# The metadata entry `gateway convert` writes into a graph that reads attention_mask as segment ids (1, 2, ...
# per input of a row): only such a graph may be packed. Any other graph reads a non-zero mask as "attend".
SEGMENT_MASK_KEY = "gateway.attention_mask"
SEGMENT_MASK = "segment_ids"
#: Graph metadata naming what the graph computes: "rerank" for a cross-encoder's logits (absent: an encoder).
TASK_KEY = "gateway.task"


def model_files(path: str, file: str) -> tuple[Path, Path]:
    """(model folder, ONNX file) for a backend's `path` and `options.file`."""
    root = Path(path)
    # A path straight to an .onnx file is accepted too: its folder is the model folder.
    if root.is_file() and root.suffix == ".onnx":
        return root.parent, root
    if not root.is_dir():
        raise BackendError(f"model folder {root} does not exist")
    onnx_file = root / file
    if not onnx_file.is_file():
        found = sorted(str(p.relative_to(root)) for p in root.rglob("*.onnx"))
        hint = (
            f"; .onnx files there: {', '.join(found[:5])} (set options.file)"
            if found
            else ("; convert one with `gateway convert SRC --to onnx --out DIR`")
        )
        raise BackendError(f"ONNX file {onnx_file} not found{hint}")
    return root, onnx_file


def _providers(wanted: list[str]) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = list(wanted) or ["CPUExecutionProvider"]
    missing = [p for p in wanted if p not in available]
    if missing:
        extra = (
            " (CUDA needs the onnxruntime-gpu package and a visible GPU)"
            if any("CUDA" in p or "Tensorrt" in p for p in missing)
            else ""
        )
        raise BackendError(
            f"execution provider(s) {', '.join(missing)} not available in this onnxruntime build"
            f"{extra}; available: {', '.join(available)}"
        )
    return wanted


def open_session(onnx_file: Path, opts: Any) -> onnxruntime.InferenceSession:
    """An inference session on `onnx_file` with the optimization level, threads, spinning and providers of
    `opts` (an OnnxOptions)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[opts.graph_optimization]
    if opts.intra_op_threads is not None:
        so.intra_op_num_threads = opts.intra_op_threads
    elif opts.parallel_batches > 1:
        so.intra_op_num_threads = max(1, (os.cpu_count() or 1) // opts.parallel_batches)
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if opts.allow_spinning else "0")
    providers = _providers(opts.providers)
    try:
        return ort.InferenceSession(str(onnx_file), sess_options=so, providers=providers)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BackendError(f"cannot load ONNX model {onnx_file}: {reason}") from exc


@dataclass(frozen=True)
class GraphIO:
    """What a graph takes and gives, as the backend feeds and reads it."""

    input_names: list[str]
    #: Inputs declared int32 (the backend builds int64 arrays and casts these).
    int32_inputs: set[str]
    #: The output the backend reads.
    output_index: int
    #: True when that output is already a sentence embedding (no pooling here).
    pooled_output: bool
    #: True when our converter marked the graph as reading attention_mask as segment ids.
    segment_mask: bool


def read_graph(session: onnxruntime.InferenceSession, onnx_file: Path) -> GraphIO:
    """The session's inputs (refused unless an encoder's) and the output to read: per-token states by name,
    else the first 3-D one, else a sentence embedding."""
    if session.get_modelmeta().custom_metadata_map.get(TASK_KEY) == "rerank":
        raise BackendError(f'{onnx_file} is a reranker\'s graph (its logits): serve it with task = "rerank"')
    inputs = session.get_inputs()
    input_names = [i.name for i in inputs]
    unknown = set(input_names) - {"input_ids", "attention_mask", "token_type_ids", "position_ids"}
    if unknown or "input_ids" not in input_names:
        raise BackendError(
            f"{onnx_file}: inputs {input_names} are not an encoder's "
            "(expected input_ids, attention_mask and optionally token_type_ids, position_ids)"
        )
    output_index, pooled = _output(session, onnx_file)
    return GraphIO(
        input_names=input_names,
        int32_inputs={i.name for i in inputs if i.type == "tensor(int32)"},
        output_index=output_index,
        pooled_output=pooled,
        segment_mask=session.get_modelmeta().custom_metadata_map.get(SEGMENT_MASK_KEY) == SEGMENT_MASK,
    )


def _output(session: onnxruntime.InferenceSession, onnx_file: Path) -> tuple[int, bool]:
    """(index, already pooled) of the output to read."""
    outputs = session.get_outputs()
    # Per-token states are pooled here; a graph that already pools (a 2-D output) is used as is.
    by_name = {o.name: i for i, o in enumerate(outputs)}
    for name in ("last_hidden_state", "token_embeddings"):
        if name in by_name:
            return by_name[name], False
    for i, o in enumerate(outputs):
        if len(o.shape) == 3:
            return i, False
    for name in ("sentence_embedding", "pooler_output"):
        if name in by_name:
            return by_name[name], True
    raise BackendError(f"{onnx_file}: no [batch, sequence, hidden] output among {list(by_name)}")
