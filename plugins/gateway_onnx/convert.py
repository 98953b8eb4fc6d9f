"""`gateway convert SRC --to onnx --out DIR [--quantize int8]`: a Hugging Face / sentence-transformers
BERT-family encoder to an ONNX folder the onnx backend serves.

int8 is dynamic quantization of the MatMuls only, with per-channel QInt8 weights in a reduced range: of the
settings tried, the one that kept vectors closest to fp32 (bench/README.md, "int8 conversion"). The word
embedding Gather stays fp32, and per-channel scales carry most of the gain; 7-bit weights also avoid int16
saturation in the u8 x s8 multiply-add on CPUs without VNNI.

This module reads the source and lays out the folder; export.py writes the graph and check.py compares it with
the source. torch / transformers / onnx are imported inside functions: registering the converter must stay cheap.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from gateway.plugin import BackendError, Converter
from gateway.runtime import hf

from .check import CHECK_SENTENCES, check_folder
from .check import Mismatch as _Mismatch
from .export import export_graph, mark_graph, one_line, quantize_int8
from .rerank_convert import check_reranker, convert_reranker

# Small files a served model needs beside the graph; weights (safetensors/bin) are deliberately left out.
_COPY_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "merges.txt",
    "vocab.json",
    "sentencepiece.bpe.model",
    "spiece.model",
    "added_tokens.json",
    "config.json",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "README.md",
)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".h5", ".msgpack", ".onnx", ".ckpt")


class OnnxConverter(Converter):
    name: ClassVar[str] = "onnx"
    help: ClassVar[str] = "ONNX graph for the onnx backend (fp32, or dynamic int8 with --quantize int8)"

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--quantize",
            choices=["int8"],
            default=None,
            help="onnx: dynamic int8 weights (per-channel, reduced range); about 2.5x fp32 on CPU",
        )

    def convert(self, src: str, out: str, args: Any) -> None:
        src_dir = Path(src).expanduser()
        out_dir = Path(out).expanduser()
        quantize = getattr(args, "quantize", None)
        trust_remote_code = bool(getattr(args, "trust_remote_code", False))
        layout, dense = _read_source(src_dir, out_dir, trust_remote_code)
        if hf.folder_task(src_dir) == "rerank":
            convert_reranker(src_dir, out_dir, quantize, trust_remote_code, self.say)
            _copy_support_files(src_dir, layout.transformer_dir, out_dir, layout, dense, self.say)
            check_reranker(src_dir, out_dir, quantize, self.say)
            return
        hf_dir = layout.transformer_dir
        out_dir.mkdir(parents=True, exist_ok=True)

        started = time.perf_counter()
        model, extra = _load_torch(hf_dir, trust_remote_code, self.say)
        # Packing needs explicit positions restarting for each input (from the model's own first position:
        # RoBERTa's and MPNet's count from the padding index + 1) and, for a decoder, a causal mask inside each
        # input: both learnt by running the model, then baked into the graph.
        plan = _plan(model, hf_dir, self.say)
        packed, reason = _packing(model, extra, plan)
        if reason:
            self.say(f"exporting a padded graph: {reason}")
        target = out_dir / "model.onnx"
        while True:
            self._write_graph(model, extra, target, quantize, packed, plan, reason)
            _copy_support_files(src_dir, hf_dir, out_dir, layout, dense, self.say)
            self.say(f"wrote {target} ({target.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - started:.1f}s")
            try:
                self._check(model, src_dir, out_dir, quantize)
                return
            except _Mismatch as exc:
                if not packed:
                    raise
                self.say(f"the packed graph disagrees with the source ({exc}); exporting a padded graph instead")
                packed, reason = False, f"the packed graph disagreed with the source ({exc})"

    def _write_graph(
        self,
        model: Any,
        extra: list[str],
        target: Path,
        quantize: str | None,
        packed: bool,
        plan: hf.PackingPlan,
        reason: str,
    ) -> None:
        """Export (and quantize) in a scratch folder beside `target`, mark the graph, then move it into place."""
        with tempfile.TemporaryDirectory(prefix="gateway-onnx-", dir=target.parent) as tmp:
            fp32 = Path(tmp) / "model.onnx"
            export_graph(model, extra, fp32, packed, plan, self.say)
            if quantize == "int8":
                staged = Path(tmp) / "model.int8.onnx"
                quantize_int8(fp32, staged, self.say)
            else:
                staged = fp32
            # Marked last, on the file served: quantizing writes a new graph.
            mark_graph(staged, packed, plan, reason)
            # Replace atomically so a server reading DIR never sees half a file.
            os.replace(staged, target)

    def _check(self, model: Any, src_dir: Path, out_dir: Path, quantize: str | None) -> None:
        """The written folder against the source model (check.check_folder); raises _Mismatch when they differ."""
        check_folder(model, src_dir, out_dir, quantize, self.say)


def _read_source(src_dir: Path, out_dir: Path, trust_remote_code: bool) -> tuple[hf.Layout, tuple[hf.DenseLayer, ...]]:
    """The source folder's layout and Dense layers, refusing what the onnx backend could not serve before any
    minutes of export."""
    if not src_dir.is_dir():
        raise BackendError(f"source {src_dir} is not a folder (expected a Hugging Face model folder)")
    layout = hf.read_layout(src_dir)
    hf_dir = layout.transformer_dir
    if not (hf_dir / "config.json").is_file():
        raise BackendError(f"source {hf_dir} has no config.json: not a Hugging Face model folder")
    if layout.unsupported:
        # The graph holds the transformer only; the onnx backend pools, projects (Dense) and normalizes.
        raise BackendError(
            f"{src_dir}: sentence-transformers module {layout.unsupported[0]!r} is not supported "
            "by the onnx backend (it would serve other vectors); serve this model with the torch backend"
        )
    # Read now: a Dense the backend cannot run (a custom activation) is refused before minutes of export.
    dense = hf.dense_layers(layout, trust_remote_code)
    if out_dir.resolve() == src_dir.resolve():
        raise BackendError("--out must differ from the source folder")
    return layout, dense


def _load_torch(hf_dir: Path, trust_remote_code: bool, say: Callable[[str], None]) -> tuple[Any, list[str]]:
    """The transformers model in eval mode, and which of token_type_ids / position_ids its forward takes."""
    import inspect

    try:
        import onnx  # noqa: F401 - torch.onnx.export needs it; fail before minutes of work
        import torch  # noqa: F401
        from transformers import AutoModel
    except ImportError as exc:
        raise BackendError(
            f"ONNX conversion needs torch, transformers and onnx ({exc.name} is missing): "
            "pip install 'embedding-gateway[torch,onnx]'"
        ) from exc
    say(f"loading {hf_dir}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        # Eager attention traces to plain MatMul/Softmax, which every onnxruntime provider runs.
        model = AutoModel.from_pretrained(
            str(hf_dir),
            local_files_only=True,
            trust_remote_code=trust_remote_code,
            attn_implementation="eager",
        )
    except Exception as exc:
        raise BackendError(f"cannot load a model from {hf_dir}: {one_line(exc)}") from exc
    model.eval()
    params = inspect.signature(model.forward).parameters
    if "input_ids" not in params or "attention_mask" not in params:
        raise BackendError(f"{hf_dir}: {type(model).__name__} is not an encoder taking input_ids/attention_mask")
    return model, [name for name in ("token_type_ids", "position_ids") if name in params]


def _plan(model: Any, hf_dir: Path, say: Callable[[str], None]) -> hf.PackingPlan:
    """Where the model's positions start and whether it attends causally (gateway.hf.probe_packing)."""
    import torch
    from tokenizers import Tokenizer

    tok_file = hf_dir / "tokenizer.json"
    ids = Tokenizer.from_file(str(tok_file)).encode(CHECK_SENTENCES[1]).ids if tok_file.is_file() else []
    vocab = int(model.config.vocab_size)
    ids = [i % vocab for i in ids] if len(ids) > 2 else [i % vocab for i in (5, 17, 29, 41, 53, 67, 71)]
    pad = getattr(model.config, "pad_token_id", None)

    def forward(ids: list[int], positions: list[int] | None) -> np.ndarray:
        with torch.no_grad():
            ids_t = torch.tensor([ids])
            kwargs: dict[str, Any] = {"input_ids": ids_t, "attention_mask": torch.ones_like(ids_t)}
            if positions is not None:
                kwargs["position_ids"] = torch.tensor([positions])
            return model(**kwargs).last_hidden_state[0].numpy()

    try:
        return hf.probe_packing(forward, ids, pad if isinstance(pad, int) else None)
    except Exception as exc:  # a forward without explicit positions: padded, as before
        say(f"cannot probe positions ({one_line(exc)})")
        return hf.PackingPlan(position_offset=None, causal=False)


def _packing(model: Any, extra: list[str], plan: hf.PackingPlan) -> tuple[bool, str]:
    """Whether the graph is written packed, and the reason when it is not."""
    packed = "position_ids" in extra
    reason = "" if packed else f"{type(model).__name__} takes no position_ids"
    window = hf.local_attention(model.config.to_dict())
    if packed and window is not None:
        # transformers builds a local window from a 2D mask only: a packed 4D mask would bypass it.
        reason = f"local attention (window {window}) cannot be expressed in a packed mask"
        packed = False
    elif packed and plan.refused:
        reason, packed = plan.refused, False
    return packed, reason


def _copy_support_files(
    src_dir: Path,
    hf_dir: Path,
    out_dir: Path,
    layout: hf.Layout,
    dense: tuple[hf.DenseLayer, ...],
    say: Callable[[str], None],
) -> None:
    """Tokenizer, configs, the sentence-transformers modules and their Dense weights beside the graph."""
    # Tokenizer and configs may sit in the Transformer module's subfolder (older sentence-transformers
    # layouts); everything lands flat in DIR, where the backend looks.
    for folder in dict.fromkeys((hf_dir, src_dir)):
        for name in _COPY_FILES:
            if (folder / name).is_file() and not (out_dir / name).exists():
                shutil.copy2(folder / name, out_dir / name)
    _write_modules(src_dir, out_dir)
    # The Dense weights travel beside the graph (the backend applies them after pooling), as safetensors
    # whatever the source saved, so serving needs no torch.
    from safetensors.numpy import save_file

    for folder, layer in zip(layout.dense, dense, strict=True):
        target = out_dir / folder.relative_to(src_dir.resolve())
        target.mkdir(parents=True, exist_ok=True)
        save_file(layer.tensors(), str(target / "model.safetensors"))
    if not (out_dir / "tokenizer.json").is_file():
        # Older repos ship only vocab.txt; the fast tokenizer serializes one tokenizer.json from it.
        from transformers import AutoTokenizer

        say("no tokenizer.json in source; writing one from the fast tokenizer")
        try:
            AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True).save_pretrained(str(out_dir))
        except Exception as exc:
            raise BackendError(f"cannot build tokenizer.json from {hf_dir}: {one_line(exc)}") from exc


def _write_modules(src_dir: Path, out_dir: Path) -> None:
    """modules.json with the Transformer module at DIR itself (where the graph is), and the other modules'
    folders copied without weights."""
    modules_file = src_dir / "modules.json"
    if not modules_file.is_file():
        return
    modules = json.loads(modules_file.read_text(encoding="utf-8"))
    for module in modules:
        sub = str(module.get("path", ""))
        if str(module.get("type", "")).endswith(".Transformer"):
            module["path"] = ""
        elif sub and hf.inside(src_dir, sub, str(modules_file)).is_dir():
            shutil.copytree(
                hf.inside(src_dir, sub, str(modules_file)),
                hf.inside(out_dir, sub, str(modules_file)),
                dirs_exist_ok=True,
                ignore=shutil.ignore_patterns(*(f"*{s}" for s in _WEIGHT_SUFFIXES)),
            )
    (out_dir / "modules.json").write_text(json.dumps(modules, indent=2) + "\n", encoding="utf-8")
