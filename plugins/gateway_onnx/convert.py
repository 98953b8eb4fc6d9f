"""`gateway convert SRC --to onnx --out DIR [--quantize int8]`: a Hugging Face / sentence-transformers
BERT-family encoder to an ONNX folder the onnx backend serves.

int8 is dynamic quantization of the MatMuls only, with per-channel QInt8 weights in a reduced range: of the
settings tried, the one that kept vectors closest to fp32 (bench/README.md, "int8 conversion"). The word
embedding Gather stays fp32, and per-channel scales carry most of the gain; 7-bit weights also avoid int16
saturation in the u8 x s8 multiply-add on CPUs without VNNI.

torch / transformers / onnx are imported inside `convert`: registering the converter must stay cheap.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from gateway.plugin import BackendError, Converter
from gateway.runtime import hf

from .backend import SEGMENT_MASK, SEGMENT_MASK_KEY, OnnxBackend, OnnxOptions

OPSET = 17
#: Graph metadata our converter writes: "packed" or "padded", why padded, the model's first position, and
#: whether attention is causal (the onnx backend checks a graph's inputs against these).
PACKING_KEY = "gateway.packing"
PACKING_REASON_KEY = "gateway.packing_reason"
POSITION_OFFSET_KEY = "gateway.position_offset"
CAUSAL_KEY = "gateway.causal_attention"
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


class _Mismatch(BackendError):
    """The written graph's vectors disagree with the source model's."""


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _bidirectional_window(model: Any) -> int | None:
    """The sliding window of a bidirectional Gemma 3 (EmbeddingGemma) as transformers runs it, or None for any
    other model: its forward takes a {layer type: mask} mapping instead of a 2D mask."""
    config = model.config
    if getattr(config, "model_type", "") != "gemma3_text" or not getattr(config, "use_bidirectional_attention", False):
        return None
    return int(config.sliding_window)


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
        out_dir.mkdir(parents=True, exist_ok=True)

        started = time.perf_counter()
        model, extra = self._load_torch(hf_dir, trust_remote_code)
        # Packing needs explicit positions restarting for each input (from the model's own first position:
        # RoBERTa's and MPNet's count from the padding index + 1) and, for a decoder, a causal mask inside each
        # input: both learnt by running the model, then baked into the graph.
        plan = self._plan(model, hf_dir)
        packed = "position_ids" in extra
        reason = "" if packed else f"{type(model).__name__} takes no position_ids"
        window = hf.local_attention(model.config.to_dict())
        if packed and window is not None:
            # transformers builds a local window from a 2D mask only: a packed 4D mask would bypass it.
            reason = f"local attention (window {window}) cannot be expressed in a packed mask"
            packed = False
        elif packed and plan.refused:
            reason, packed = plan.refused, False
        if reason:
            self.say(f"exporting a padded graph: {reason}")
        target = out_dir / "model.onnx"
        while True:
            with tempfile.TemporaryDirectory(prefix="gateway-onnx-", dir=out_dir) as tmp:
                fp32 = Path(tmp) / "model.onnx"
                self._export(model, extra, fp32, packed, plan)
                if quantize == "int8":
                    staged = Path(tmp) / "model.int8.onnx"
                    self._quantize(fp32, staged)
                else:
                    staged = fp32
                # Marked last, on the file served: quantizing writes a new graph.
                self._mark(staged, packed, plan, reason)
                # Replace atomically so a server reading DIR never sees half a file.
                os.replace(staged, target)
            self._copy_support_files(src_dir, hf_dir, out_dir, layout, dense)
            self.say(f"wrote {target} ({target.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - started:.1f}s")
            try:
                self._check(model, src_dir, out_dir, quantize)
                return
            except _Mismatch as exc:
                if not packed:
                    raise
                self.say(f"the packed graph disagrees with the source ({exc}); exporting a padded graph instead")
                packed, reason = False, f"the packed graph disagreed with the source ({exc})"

    def _load_torch(self, hf_dir: Path, trust_remote_code: bool) -> tuple[Any, list[str]]:
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
        self.say(f"loading {hf_dir}")
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
            raise BackendError(f"cannot load a model from {hf_dir}: {_one_line(exc)}") from exc
        model.eval()
        params = inspect.signature(model.forward).parameters
        if "input_ids" not in params or "attention_mask" not in params:
            raise BackendError(f"{hf_dir}: {type(model).__name__} is not an encoder taking input_ids/attention_mask")
        return model, [name for name in ("token_type_ids", "position_ids") if name in params]

    def _plan(self, model: Any, hf_dir: Path) -> hf.PackingPlan:
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
            self.say(f"cannot probe positions ({_one_line(exc)})")
            return hf.PackingPlan(position_offset=None, causal=False)

    @staticmethod
    def _mark(path: Path, packed: bool, plan: hf.PackingPlan, reason: str) -> None:
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

    def _export(self, model: Any, extra: list[str], path: Path, packed: bool, plan: hf.PackingPlan) -> None:
        import torch

        # transformers 5's forward takes more keyword arguments than the legacy exporter passes
        # positionally ("got multiple values for argument"): a wrapper fixes the inputs and calls by keyword.
        # DistilBERT/MPNet have no token types; a packed graph (gateway/runtime/packing.py) takes position ids and
        # reads attention_mask as segment ids (1, 2, ... per input of a row, 0 on padding), from which it
        # builds the block-diagonal mask. A plain 0/1 mask is one segment per row, so it still works.
        names = ["input_ids", "attention_mask"] + [n for n in extra if n != "position_ids" or packed]
        window = _bidirectional_window(model)

        class Wrapper(torch.nn.Module):
            def __init__(self, inner: Any) -> None:
                super().__init__()
                self.inner = inner

            def forward(self, *args: torch.Tensor) -> torch.Tensor:
                kwargs = dict(zip(names, args, strict=True))
                if packed:
                    seg = kwargs["attention_mask"]
                    same = seg[:, None, :, None] == seg[:, None, None, :]
                    if plan.causal:  # a decoder: each token sees its own input's earlier tokens only
                        n = seg.shape[1]
                        same = same & (torch.arange(n)[:, None] >= torch.arange(n)[None, :])
                    # Additive, as eager attention adds the mask to the scores.
                    kwargs["attention_mask"] = torch.where(same, 0.0, torch.finfo(torch.float32).min)
                    # Positions arrive from 0 for each input; the model's first one may be later.
                    kwargs["position_ids"] = kwargs["position_ids"] + int(plan.position_offset or 0)
                elif window is not None:
                    # Gemma 3 built bidirectional (EmbeddingGemma) makes its masks with torch.vmap, which the
                    # exporter cannot trace; it takes them ready-made: every real key on global layers, real keys
                    # within the window on sliding ones (transformers' _bidirectional_window_overlay).
                    keys = kwargs["attention_mask"][:, None, None, :] > 0
                    n = keys.shape[-1]
                    near = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).abs() < window
                    low = torch.finfo(torch.float32).min
                    kwargs["attention_mask"] = {
                        "full_attention": torch.where(keys, 0.0, low),
                        "sliding_attention": torch.where(keys & near, 0.0, low),
                    }
                return self.inner(**kwargs).last_hidden_state

        # A fresh Module is in training mode, and the exporter restores the wrapper's mode afterwards,
        # recursively: without eval() here the source model comes back with dropout on.
        wrapper = Wrapper(model).eval()
        # Rows with real padding (and, packed, two inputs in one row), so the traced graph sees a real mask.
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
        dummy = tuple(values[n] for n in names)
        axes = {name: {0: "batch", 1: "sequence"} for name in names}
        axes["last_hidden_state"] = {0: "batch", 1: "sequence"}
        self.say(f"exporting ONNX opset {OPSET} (inputs {', '.join(names)})")
        try:
            with torch.no_grad():
                torch.onnx.export(
                    wrapper,
                    dummy,
                    str(path),
                    input_names=names,
                    output_names=["last_hidden_state"],
                    dynamic_axes=axes,
                    opset_version=OPSET,
                    do_constant_folding=True,
                    dynamo=False,
                )
        except Exception as exc:
            raise BackendError(f"ONNX export failed: {_one_line(exc)}") from exc

    def _quantize(self, fp32: Path, int8: Path) -> None:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        self.say("quantizing MatMuls to int8 (dynamic, per-channel QInt8 weights, reduced range)")
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
            raise BackendError(f"int8 quantization failed: {_one_line(exc)}") from exc

    def _copy_support_files(
        self, src_dir: Path, hf_dir: Path, out_dir: Path, layout: hf.Layout, dense: tuple[hf.DenseLayer, ...]
    ) -> None:
        # Tokenizer and configs may sit in the Transformer module's subfolder (older sentence-transformers
        # layouts); everything lands flat in DIR, where the backend looks.
        for folder in dict.fromkeys((hf_dir, src_dir)):
            for name in _COPY_FILES:
                if (folder / name).is_file() and not (out_dir / name).exists():
                    shutil.copy2(folder / name, out_dir / name)
        modules_file = src_dir / "modules.json"
        if modules_file.is_file():
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

            self.say("no tokenizer.json in source; writing one from the fast tokenizer")
            try:
                AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True).save_pretrained(str(out_dir))
            except Exception as exc:
                raise BackendError(f"cannot build tokenizer.json from {hf_dir}: {_one_line(exc)}") from exc

    def _check(self, model: Any, src_dir: Path, out_dir: Path, quantize: str | None) -> None:
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
        want = hf.l2_normalize(self._reference(model, src_dir, texts, limit, pooling))
        cos = np.sum(got * want, axis=1)
        worst = min(cos)
        self.say(f"check vs the source on {len(cos)} texts: min cosine {worst:.5f}, mean {np.mean(cos):.5f}")
        floor = 0.95 if quantize else 0.999
        if worst < floor:
            text = texts[int(np.argmin(cos))]
            raise _Mismatch(f"converted model disagrees with the source: min cosine {worst:.4f} < {floor} on {text!r}")

    def _reference(self, model: Any, src_dir: Path, texts: list[str], limit: int, pooling: hf.Pooling) -> np.ndarray:
        import torch

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
                        f"(limit {st.max_seq_length} tokens): {_one_line(exc)}"
                    ) from exc
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
