"""`gateway convert SRC --to gguf --out FILE [--type f16|q8_0]`: an embedding model folder -> GGUF.

Written against the GGUF spec and what llama.cpp's embedding graphs read (`bert` for BERT and XLM-RoBERTa,
`modern-bert`, `qwen3`, `gemma-embedding`), with the keys and tensor names llama.cpp's own converter writes
for them at the runtime's version: hyper-parameters under `<arch>.*`, tensors named by gguf.TensorNameMap,
and a WordPiece vocabulary rewritten to llama.cpp's convention (word-start tokens carry U+2581, `##`
continuations lose the `##`, [bracketed] tokens are CONTROL). Dense modules after pooling go where llama.cpp
applies them itself (EmbeddingGemma's two projections), else under our own keys for the gateway to apply.
After writing, the GGUF's vectors are checked against sentence-transformers' own on the source folder: a
model that computes differently would serve quietly wrong vectors, so a mismatch fails the conversion.
This module writes the weights and the keys; source.py reads the folder, vocab.py writes the vocabulary and
verify.py checks the result.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from gateway.plugin import BackendError, Converter
from gateway.runtime import hf

from .backend import HF_TOKENIZER_KEY, INCLUDE_PROMPT_KEY, MAX_SEQ_LENGTH_KEY, NORMALIZE_KEY
from .rerank import ACTIVATION_KEY
from .source import ARCHITECTURES, Source, rope_layers
from .verify import verify
from .vocab import add_vocabulary

# HF tensors llama.cpp's bert graph does not use: the position-id buffer, the pooler (sentence-transformers
# pools itself) and masked-LM / NSP heads.
_SKIP_PREFIXES = ("pooler.", "cls.", "bert.pooler.")
_SKIP_SUFFIXES = ("position_ids",)
#: A cross-encoder's head -> llama.cpp's rank-pooling tensors (`cls`: dense then tanh on the [CLS] state;
#: `cls.output`: the one-score projection). BERT's head is its pooler then `classifier`; RoBERTa's is
#: `classifier.dense` then `classifier.out_proj` (its pooler unused). llama.cpp's own converter at this version
#: drops BERT's pooler and writes `classifier` alone as `cls.output`: the graph then skips the pooler's dense and
#: tanh, and the scores are not the model's (measured in tests/plugins/test_gguf_rerank.py), so we map it.
_BERT_HEAD = {"pooler.dense.": "cls.", "classifier.": "cls.output."}
_ROBERTA_HEAD = {"classifier.dense.": "cls.", "classifier.out_proj.": "cls.output."}


class GgufConverter(Converter):
    name: ClassVar[str] = "gguf"
    help: ClassVar[str] = "GGUF for llama.cpp (BERT, XLM-RoBERTa, ModernBERT, Qwen3, EmbeddingGemma), f16 or q8_0"

    def add_arguments(self, parser: Any) -> None:
        # The convert parser is shared by all converters: only `--type` is ours (dest kept distinct).
        parser.add_argument(
            "--type",
            dest="gguf_type",
            choices=("f16", "q8_0"),
            default="f16",
            help="gguf: weight type of the matrices (default f16; q8_0 is ~half the size)",
        )

    def convert(self, src: str, out: str, args: Any) -> None:
        try:
            import gguf
        except ImportError as exc:
            raise BackendError("converting to GGUF needs the gguf package: install the `gguf` extra") from exc
        qtype = getattr(args, "gguf_type", None) or "f16"
        if qtype not in ("f16", "q8_0"):
            raise BackendError(f"--type {qtype!r}: expected f16 or q8_0")
        started = time.perf_counter()
        source = Source(Path(src).expanduser())
        out_path = Path(out).expanduser()
        if out_path.is_dir():
            raise BackendError(f"--out {out_path} is a folder; give a file name such as model.gguf")
        out_path.parent.mkdir(parents=True, exist_ok=True)
        # Write beside the target and rename at the end: a failed run never leaves a half-written GGUF.
        part = out_path.with_name(out_path.name + ".part")
        try:
            self._write(source, part, qtype, gguf)
            verify(source, part, qtype, self.say)
            os.replace(part, out_path)
        finally:
            part.unlink(missing_ok=True)
        size = out_path.stat().st_size / 2**20
        self.say(f"wrote {out_path} ({size:.1f} MiB, {qtype}) in {time.perf_counter() - started:.1f}s")

    def _write(self, source: Source, path: Path, qtype: str, gguf: Any) -> None:
        """The GGUF file: weights, the Dense modules, the hyper-parameters, our own keys, then the vocabulary."""
        shape = _Shape.read(source, gguf)
        pooling = self._pooling(source, shape.arch_name)
        writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[shape.arch])
        try:
            self.say(
                f"reading {source.model_dir} ({shape.arch_name}, {shape.n_layers} layers, dim {shape.hidden}, {qtype})"
            )
            n_vocab_rows, n_tensors = _add_weights(writer, source, shape, qtype, gguf)
            n_tensors += self._add_dense(writer, source, shape.hidden, qtype, gguf)
            _add_hyperparameters(writer, source, shape, pooling, qtype, gguf)
            _add_gateway_keys(writer, source)
            add_vocabulary(writer, source, n_vocab_rows, gguf)
            self.say(f"writing {n_tensors} tensors to {path.name}")
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file(progress=False)
        except OSError as exc:
            raise BackendError(f"cannot write {path}: {exc}") from exc
        finally:
            writer.close()

    def _pooling(self, source: Source, arch_name: str) -> str:
        """The folder's pooling, or the architecture's usual one when it has no sentence-transformers config."""
        if source.task == "rerank":
            return "rank"  # llama.cpp's rank pooling: the [CLS] state through the classifier head
        pooling = source.pooling
        if pooling is None:
            pooling = "last" if arch_name == "qwen3" else "mean"
            self.say(f"no sentence-transformers pooling config; writing {pooling} pooling")
        if pooling not in ("mean", "cls", "last"):
            raise BackendError(f"unsupported pooling {pooling!r}")
        return pooling

    def _add_dense(self, writer: Any, source: Source, hidden: int, qtype: str, gguf: Any) -> int:
        """The Dense modules after pooling, where llama.cpp applies them or under our keys; the tensors added."""
        if _runtime_dense(source, hidden):
            # Where and how llama.cpp's converter puts EmbeddingGemma's projections: the runtime applies them.
            for prefix, layer in zip(("dense_2", "dense_3"), source.dense, strict=True):
                array, raw = _encode(layer.weight, gguf.MODEL_TENSOR.DENSE_2_OUT, qtype, gguf)
                writer.add_tensor(f"{prefix}.weight", array, raw_dtype=raw)
                writer.add_dense_features_dims(prefix, layer.in_features, layer.out_features)
            return len(source.dense)
        if source.dense:
            # llama.cpp refuses tensors its graph does not create: the gateway applies these after pooling.
            self.say(f"{len(source.dense)} Dense module(s) stored for the gateway to apply after pooling")
            for i, layer in enumerate(source.dense):
                writer.add_string(f"{hf.GGUF_DENSE_PREFIX}{i}.config", json.dumps(layer.config()))
                for tname, values in layer.tensors().items():
                    flat = np.ascontiguousarray(values, dtype=np.float32).ravel()
                    writer.add_array(f"{hf.GGUF_DENSE_PREFIX}{i}.{tname}", [float(v) for v in flat])
        return 0


@dataclass(frozen=True)
class _Shape:
    """The architecture written and its hyper-parameters from config.json."""

    arch_name: str
    arch: Any
    n_layers: int
    hidden: int
    n_ctx: int
    ffn: int
    heads: int

    @classmethod
    def read(cls, source: Source, gguf: Any) -> _Shape:
        cfg = source.config
        arch_name = ARCHITECTURES[source.model_type]
        arch = {
            "bert": gguf.MODEL_ARCH.BERT,
            "qwen3": gguf.MODEL_ARCH.QWEN3,
            "modern-bert": gguf.MODEL_ARCH.MODERN_BERT,
            "gemma-embedding": gguf.MODEL_ARCH.GEMMA_EMBEDDING,
        }[arch_name]
        try:
            return cls(
                arch_name=arch_name,
                arch=arch,
                n_layers=int(cfg["num_hidden_layers"]),
                hidden=int(cfg["hidden_size"]),
                n_ctx=int(cfg["max_position_embeddings"]) - source.position_offset,
                ffn=int(cfg["intermediate_size"]),
                heads=int(cfg["num_attention_heads"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BackendError(f"{source.model_dir}/config.json lacks a hyper-parameter: {exc}") from exc


# -- the weights -----------------------------------------------------------------------------------------


def _add_weights(writer: Any, source: Source, shape: _Shape, qtype: str, gguf: Any) -> tuple[int, int]:
    """The transformer's tensors under llama.cpp's names; (rows of the word embeddings, tensors added)."""
    arch_name = shape.arch_name
    tensor_map = gguf.TensorNameMap(shape.arch, shape.n_layers)
    head = _head_names(source)
    head_written: set[str] = set()
    n_vocab_rows = 0
    n_tensors = 0
    for hf_name, data in source.tensors():
        name = hf_name.removeprefix("bert.").removeprefix("roberta.")
        head_name = next((to + name[len(fr) :] for fr, to in head.items() if name.startswith(fr)), None)
        if head_name is not None:
            array, raw = _encode(np.ascontiguousarray(data, dtype=np.float32), None, qtype, gguf)
            writer.add_tensor(head_name, array, raw_dtype=raw)
            head_written.add(head_name)
            n_tensors += 1
            continue
        if name.startswith(_SKIP_PREFIXES) or name.endswith(_SKIP_SUFFIXES) or name == "lm_head.weight":
            continue
        if arch_name == "modern-bert" and name.startswith(("head.", "decoder.", "classifier.")):
            continue  # ModernBERT's masked-LM / classifier heads
        mapped = tensor_map.get_type_and_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise BackendError(f"tensor {hf_name!r} has no llama.cpp {arch_name} counterpart")
        kind, new_name = mapped
        if arch_name == "gemma-embedding" and name.endswith("norm.weight"):
            data = data + 1.0  # Gemma's RMSNorm scales by 1 + weight; llama.cpp's by the weight
        if kind == gguf.MODEL_TENSOR.TOKEN_EMBD:
            n_vocab_rows = data.shape[0]
        if kind == gguf.MODEL_TENSOR.POS_EMBD and source.position_offset:
            data = data[source.position_offset :]
        array, raw = _encode(np.ascontiguousarray(data, dtype=np.float32), kind, qtype, gguf)
        if raw is None:
            writer.add_tensor(new_name, array)
        else:
            writer.add_tensor(new_name, array, raw_dtype=raw)
        n_tensors += 1
    if not n_vocab_rows:
        raise BackendError(f"{source.model_dir}: no word-embedding tensor found")
    if head and not {"cls.weight", "cls.output.weight"} <= head_written:
        raise BackendError(f"{source.model_dir}: the cross-encoder's head is incomplete (wrote {sorted(head_written)})")
    return n_vocab_rows, n_tensors


def _head_names(source: Source) -> dict[str, str]:
    """HF prefix -> GGUF prefix of the classifier head's tensors (empty for an embedding model)."""
    if source.task != "rerank":
        return {}
    return _BERT_HEAD if source.model_type == "bert" else _ROBERTA_HEAD


def _encode(data: np.ndarray, kind: Any, qtype: str, gguf: Any) -> tuple[np.ndarray, Any]:
    """The tensor as stored: (array, raw GGML type or None for plain numpy dtypes)."""
    # Biases and norms are tiny and precision-sensitive: f32. Token-type embeddings stay f32 as
    # llama.cpp adds them to f32 activations directly (and they are 2 rows).
    if data.ndim < 2 or kind == gguf.MODEL_TENSOR.TOKEN_TYPES:
        return data, None
    if qtype == "q8_0" and data.shape[-1] % 32 == 0:
        try:
            q8 = gguf.GGMLQuantizationType.Q8_0
            return gguf.quants.quantize(data, q8), q8
        except (gguf.quants.QuantError, NotImplementedError):
            pass  # rows not a multiple of the block: f16 below
    return data.astype(np.float16), None


def _runtime_dense(source: Source, hidden: int) -> bool:
    """Whether llama.cpp applies the folder's Dense modules itself: its gemma-embedding graph multiplies the
    pooled vector by dense_2 then dense_3, with no bias and no activation, from and back to the hidden size."""
    d = source.dense
    return (
        ARCHITECTURES[source.model_type] == "gemma-embedding"
        and len(d) == 2
        and all(x.bias is None and x.activation == "identity" and not x.use_residual for x in d)
        and d[0].in_features == hidden
        and d[1].out_features == hidden
    )


# -- the metadata ----------------------------------------------------------------------------------------


def _add_hyperparameters(writer: Any, source: Source, shape: _Shape, pooling: str, qtype: str, gguf: Any) -> None:
    """llama.cpp's `<arch>.*` keys: sizes, attention, norms, RoPE and windows, pooling, file type."""
    cfg, arch_name, heads = source.config, shape.arch_name, shape.heads
    writer.add_name(source.root.name)
    writer.add_context_length(shape.n_ctx)
    writer.add_embedding_length(shape.hidden)
    writer.add_feed_forward_length(shape.ffn)
    writer.add_block_count(shape.n_layers)
    writer.add_head_count(heads)
    if arch_name in ("qwen3", "gemma-embedding"):
        head_dim = int(cfg.get("head_dim") or shape.hidden // heads)
        writer.add_head_count_kv(int(cfg.get("num_key_value_heads") or heads))
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_freq_base(float(_rope_theta(cfg)))
        writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
        # Qwen3 is a decoder: causal attention, as sentence-transformers runs it; EmbeddingGemma is not.
        writer.add_causal_attention(arch_name == "qwen3")
        if arch_name == "gemma-embedding":
            _add_windows(writer, cfg, shape.n_layers, int(cfg["sliding_window"]))
    elif arch_name == "modern-bert":
        writer.add_head_count_kv(heads)
        writer.add_layer_norm_eps(float(cfg.get("norm_eps", 1e-5)))
        writer.add_causal_attention(False)
        writer.add_rope_scaling_type(gguf.RopeScalingType.NONE)
        # The FFN's gated activation (GELU -> GeGLU), under the key llama.cpp's converter uses.
        writer.add_string(f"{arch_name}.hidden_activation", str(cfg.get("hidden_activation", "gelu")))
        _add_windows(writer, cfg, shape.n_layers, int(cfg["local_attention"]))
    else:
        writer.add_layer_norm_eps(float(cfg.get("layer_norm_eps", 1e-12)))
        writer.add_causal_attention(False)
    kinds = gguf.PoolingType
    writer.add_pooling_type({"mean": kinds.MEAN, "cls": kinds.CLS, "last": kinds.LAST, "rank": kinds.RANK}[pooling])
    if pooling == "rank":
        # llama.cpp sizes `cls.output` and the score it returns per sequence by the labels (one here).
        labels = cfg.get("id2label") or {"0": "LABEL_0"}
        writer.add_classifier_output_labels([str(v) for _, v in sorted(labels.items(), key=lambda kv: int(kv[0]))])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if qtype == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
    if qtype != "f16":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_gateway_keys(writer: Any, source: Source) -> None:
    """Our own keys (llama.cpp ignores them): the length cap, normalize, prompts and the HF tokenizer."""
    if source.max_seq_length:
        # Our own key (llama.cpp ignores it): the length sentence-transformers caps inputs at.
        writer.add_uint32(MAX_SEQ_LENGTH_KEY, source.max_seq_length)
    writer.add_bool(NORMALIZE_KEY, source.normalize)
    if source.task == "rerank":
        # What CrossEncoder.predict applies to the logit by default: the backend names it to the core.
        writer.add_string(ACTIVATION_KEY, source.activation)
    writer.add_bool(INCLUDE_PROMPT_KEY, source.layout.include_prompt)
    if source.prompts:
        # The folder's prompts travel with the file (the gateway applies them, as for the folder).
        writer.add_string(hf.GGUF_PROMPTS_KEY, json.dumps(source.prompts, ensure_ascii=False))
        if source.default_prompt_name:
            writer.add_string(hf.GGUF_DEFAULT_PROMPT_KEY, source.default_prompt_name)
    hf_tokenizer = source.hf_tokenizer()
    if hf_tokenizer is not None:
        writer.add_string(HF_TOKENIZER_KEY, hf_tokenizer.to_str())


def _add_windows(writer: Any, cfg: dict[str, Any], n_layers: int, window: int) -> None:
    """Sliding-window attention as llama.cpp's symmetric window reads it (|i - j| <= window / 2: ModernBERT's
    local_attention and EmbeddingGemma's config.json sliding_window are both that full width), which layers
    use it, and each kind's RoPE base."""
    writer.add_sliding_window(window)
    writer.add_sliding_window_pattern(_swa_layers(cfg, n_layers))
    rope = rope_layers(cfg)
    full = rope.get("full_attention", {}).get("rope_theta", cfg.get("global_rope_theta", _rope_theta(cfg)))
    writer.add_rope_freq_base(float(full))
    local = rope.get("sliding_attention", {}).get("rope_theta", cfg.get("local_rope_theta"))
    if local is not None:
        writer.add_rope_freq_base_swa(float(local))


def _swa_layers(cfg: dict[str, Any], n_layers: int) -> list[bool]:
    """Which layers attend in a sliding window, from config.json's layer_types (ModernBERT's
    global_attn_every_n_layers where it has none): written per layer, so llama.cpp needs no pattern rule."""
    types = cfg.get("layer_types")
    if isinstance(types, list) and len(types) == n_layers:
        return ["sliding" in str(t) for t in types]
    every = int(cfg.get("global_attn_every_n_layers") or 1)
    return [i % every != 0 for i in range(n_layers)]


def _rope_theta(cfg: dict[str, Any]) -> float:
    """RoPE's base frequency, from transformers 5's rope_parameters or the older rope_theta."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and isinstance(params.get("rope_theta"), (int, float)):
        return float(params["rope_theta"])
    return float(cfg.get("rope_theta", 10_000.0))
