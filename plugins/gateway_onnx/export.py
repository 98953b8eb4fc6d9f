"""Writing the graph for `gateway convert --to onnx`: tracing a transformers model to ONNX, quantizing it to int8
and marking the packing decision in its metadata; a module of its own, as these are the converter's torch- and
onnx-heavy jobs, apart from reading the source folder and checking the result.

torch / onnx / onnxruntime.quantization are imported inside the functions: registering the converter must stay
cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.plugin import BackendError
from gateway.runtime import hf

from .session import SEGMENT_MASK, SEGMENT_MASK_KEY, TASK_KEY

OPSET = 17
#: Graph metadata our converter writes: "packed" or "padded", why padded, the model's first position, and
#: whether attention is causal (the onnx backend checks a graph's inputs against these).
PACKING_KEY = "gateway.packing"
PACKING_REASON_KEY = "gateway.packing_reason"
POSITION_OFFSET_KEY = "gateway.position_offset"
CAUSAL_KEY = "gateway.causal_attention"


def one_line(exc: BaseException) -> str:
    """An exception's first line (its type where it has no text), for a readable error message."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _bidirectional_window(model: Any) -> int | None:
    """The sliding window of a bidirectional Gemma 3 (EmbeddingGemma) as transformers runs it, or None for any
    other model: its forward takes a {layer type: mask} mapping instead of a 2D mask."""
    config = model.config
    if getattr(config, "model_type", "") != "gemma3_text" or not getattr(config, "use_bidirectional_attention", False):
        return None
    return int(config.sliding_window)


def _packed_mask(seg: Any, causal: bool) -> Any:
    """The additive block-diagonal mask of a packed row, from its segment ids (1, 2, ... per input, 0 on padding)."""
    import torch

    same = seg[:, None, :, None] == seg[:, None, None, :]
    if causal:  # a decoder: each token sees its own input's earlier tokens only
        n = seg.shape[1]
        same = same & (torch.arange(n)[:, None] >= torch.arange(n)[None, :])
    # Additive, as eager attention adds the mask to the scores.
    return torch.where(same, 0.0, torch.finfo(torch.float32).min)


def _bidirectional_masks(mask: Any, window: int) -> dict[str, Any]:
    """Gemma 3 built bidirectional (EmbeddingGemma) makes its masks with torch.vmap, which the exporter cannot
    trace; it takes them ready-made: every real key on global layers, real keys within the window on sliding
    ones (transformers' _bidirectional_window_overlay)."""
    import torch

    keys = mask[:, None, None, :] > 0
    n = keys.shape[-1]
    near = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).abs() < window
    low = torch.finfo(torch.float32).min
    return {
        "full_attention": torch.where(keys, 0.0, low),
        "sliding_attention": torch.where(keys & near, 0.0, low),
    }


def _wrap(model: Any, names: list[str], packed: bool, plan: hf.PackingPlan) -> Any:
    """A module whose forward takes exactly `names`, positionally, and calls the model by keyword.

    transformers 5's forward takes more keyword arguments than the legacy exporter passes positionally ("got
    multiple values for argument"): the wrapper fixes the inputs and calls by keyword. DistilBERT/MPNet have no
    token types; a packed graph (gateway/runtime/packing.py) takes position ids and reads attention_mask as segment ids
    (1, 2, ... per input of a row, 0 on padding), from which it builds the block-diagonal mask. A plain 0/1 mask
    is one segment per row, so it still works.
    """
    import torch

    window = _bidirectional_window(model)

    class Wrapper(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *args: torch.Tensor) -> torch.Tensor:
            kwargs = dict(zip(names, args, strict=True))
            if packed:
                kwargs["attention_mask"] = _packed_mask(kwargs["attention_mask"], plan.causal)
                # Positions arrive from 0 for each input; the model's first one may be later.
                kwargs["position_ids"] = kwargs["position_ids"] + int(plan.position_offset or 0)
            elif window is not None:
                kwargs["attention_mask"] = _bidirectional_masks(kwargs["attention_mask"], window)
            return self.inner(**kwargs).last_hidden_state

    # A fresh Module is in training mode, and the exporter restores the wrapper's mode afterwards,
    # recursively: without eval() here the source model comes back with dropout on.
    return Wrapper(model).eval()


def _example_inputs(model: Any, names: list[str], packed: bool) -> tuple[Any, ...]:
    """Rows with real padding (and, packed, two inputs in one row), so the traced graph sees a real mask."""
    import torch

    ids = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102], [101, 7592, 102, 101, 2088, 102, 0]])
    ids = ids.clamp(max=model.config.vocab_size - 1)
    if packed:
        mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 2, 2, 2, 0]])
        positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 0, 1, 2, 0]])
    else:
        mask = (ids != 0).long()
        positions = torch.arange(ids.shape[1]).expand_as(ids)
    values = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    values["position_ids"] = positions
    return tuple(values[n] for n in names)


def export_graph(
    model: Any, extra: list[str], path: Path, packed: bool, plan: hf.PackingPlan, say: Callable[[str], None]
) -> None:
    """Trace `model` to an fp32 ONNX graph at `path`: inputs input_ids, attention_mask and those of `extra` it
    takes (position_ids only when packed), output last_hidden_state, batch and sequence dynamic."""

    names = ["input_ids", "attention_mask"] + [n for n in extra if n != "position_ids" or packed]
    wrapper = _wrap(model, names, packed, plan)
    dummy = _example_inputs(model, names, packed)
    axes = {name: {0: "batch", 1: "sequence"} for name in names}
    axes["last_hidden_state"] = {0: "batch", 1: "sequence"}
    say(f"exporting ONNX opset {OPSET} (inputs {', '.join(names)})")
    _trace(wrapper, dummy, path, names, "last_hidden_state", axes)


def quantize_int8(fp32: Path, int8: Path, say: Callable[[str], None]) -> None:
    """Dynamic int8 of the MatMuls only, per-channel QInt8 weights in a reduced range (the module docstring of
    convert.py says why)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    say("quantizing MatMuls to int8 (dynamic, per-channel QInt8 weights, reduced range)")
    try:
        quantize_dynamic(
            model_input=str(fp32),
            model_output=str(int8),
            per_channel=True,
            reduce_range=True,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul"],
        )
    except Exception as exc:
        raise BackendError(f"int8 quantization failed: {one_line(exc)}") from exc


def mark_graph(path: Path, packed: bool, plan: hf.PackingPlan, reason: str) -> None:
    """Record the packing decision in the graph's metadata (read back by the onnx backend and by people);
    a packed graph also says that it reads attention_mask as segment ids."""
    import onnx

    graph = onnx.load(str(path))
    marks = {
        # The backend packs only graphs that say they read attention_mask as segment ids.
        **({SEGMENT_MASK_KEY: SEGMENT_MASK} if packed else {}),
        PACKING_KEY: "packed" if packed else "padded",
        PACKING_REASON_KEY: reason,
        POSITION_OFFSET_KEY: str(plan.position_offset if plan.position_offset is not None else ""),
        CAUSAL_KEY: "true" if plan.causal else "false",
    }
    kept = [p for p in graph.metadata_props if p.key not in marks]
    del graph.metadata_props[:]
    graph.metadata_props.extend(kept)
    for key, value in marks.items():
        graph.metadata_props.add(key=key, value=value)
    onnx.save(graph, str(path))


def export_scores_graph(model: Any, names: list[str], path: Path, say: Callable[[str], None]) -> None:
    """Trace a sequence-classification `model` to an fp32 ONNX graph at `path`: inputs `names` (input_ids,
    attention_mask[, token_type_ids]), output `logits` [batch, labels], batch and sequence dynamic."""
    import torch

    class Scores(torch.nn.Module):
        # By keyword, as `_wrap` calls an encoder (transformers 5 takes more arguments than are passed).
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *args: torch.Tensor) -> torch.Tensor:
            return self.inner(**dict(zip(names, args, strict=True))).logits

    dummy = _example_inputs(model, names, packed=False)
    if "token_type_ids" in names and getattr(model.config, "type_vocab_size", 1) > 1:
        # A BERT pair's second text has token type 1: the traced graph must take it (XLM-R has one type only).
        types = dummy[names.index("token_type_ids")]
        types[:, 4:] = 1
    axes = {name: {0: "batch", 1: "sequence"} for name in names}
    axes["logits"] = {0: "batch"}
    say(f"exporting the classifier's logits, ONNX opset {OPSET} (inputs {', '.join(names)})")
    _trace(Scores(model).eval(), dummy, path, names, "logits", axes)


def _trace(
    module: Any, dummy: tuple[Any, ...], path: Path, names: list[str], output: str, axes: dict[str, Any]
) -> None:
    """torch.onnx.export's legacy tracer (the graph every onnxruntime provider runs), at our opset, one output."""
    import torch

    try:
        with torch.no_grad():
            torch.onnx.export(
                module,
                dummy,
                str(path),
                input_names=names,
                output_names=[output],
                dynamic_axes=axes,
                opset_version=OPSET,
                do_constant_folding=True,
                dynamo=False,
            )
    except Exception as exc:
        raise BackendError(f"ONNX export failed: {one_line(exc)}") from exc


def mark_task(path: Path, task: str) -> None:
    """Record what the graph computes in its metadata (the onnx backend refuses a graph of another task)."""
    import onnx

    graph = onnx.load(str(path))
    kept = [p for p in graph.metadata_props if p.key != TASK_KEY]
    del graph.metadata_props[:]
    graph.metadata_props.extend(kept)
    graph.metadata_props.add(key=TASK_KEY, value=task)
    onnx.save(graph, str(path))
