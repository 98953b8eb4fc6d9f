"""`gateway convert SRC --to gguf --out FILE [--type f16|q8_0]`: an embedding model folder -> GGUF.

Written against the GGUF spec and what llama.cpp's embedding graphs read (`bert` for BERT and XLM-RoBERTa,
`modern-bert`, `qwen3`, `gemma-embedding`), with the keys and tensor names llama.cpp's own converter writes
for them at the runtime's version: hyper-parameters under `<arch>.*`, tensors named by gguf.TensorNameMap,
and a WordPiece vocabulary rewritten to llama.cpp's convention (word-start tokens carry U+2581, `##`
continuations lose the `##`, [bracketed] tokens are CONTROL). Dense modules after pooling go where llama.cpp
applies them itself (EmbeddingGemma's two projections), else under our own keys for the gateway to apply.
After writing, the GGUF's vectors are checked against sentence-transformers' own on the source folder: a
model that computes differently would serve quietly wrong vectors, so a mismatch fails the conversion.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from gateway import hf
from gateway.backend import BackendError, Converter

from .backend import HF_TOKENIZER_KEY, INCLUDE_PROMPT_KEY, MAX_SEQ_LENGTH_KEY, NORMALIZE_KEY

WORD_START = "\u2581"  # llama.cpp's "phantom space" before a word's first piece
# Token-id parity samples: casing, accents, punctuation, digits, CJK, emoji, symbols, odd whitespace.
VERIFY_TEXTS = (
    "hello world",
    "The quick brown fox jumps over the lazy dog.",
    "Crème brûlée, naïve façade; São Paulo — Zürich!",
    "東京は日本の首都です。北京欢迎你",
    "Emoji 🙂👍🏽 and symbols: $5.00 + 20% = ~@#^&*() [CLS] <b>x</b>",
    "  multiple   spaces\tand\nnewlines  ",
    "unbelievably antidisestablishmentarianism supercalifragilisticexpialidocious",
    "Привет, мир! Ελληνικά. עברית. العربية.",
    "[CLS] [unused0] [MASK] [cls] ##ing",
    "",
)
# HF tensors llama.cpp's bert graph does not use: the position-id buffer, the pooler (sentence-transformers
# pools itself) and masked-LM / NSP heads.
_SKIP_PREFIXES = ("pooler.", "cls.", "bert.pooler.")
_SKIP_SUFFIXES = ("position_ids",)


#: model_type -> the llama.cpp architecture we write for it (llama.cpp's embedding graphs that run it as
#: sentence-transformers does: bidirectional bert, or a causal decoder pooled at its last token).
ARCHITECTURES = {
    "bert": "bert",
    "xlm-roberta": "bert",
    "roberta": "bert",
    "qwen3": "qwen3",
    "modernbert": "modern-bert",
    "gemma3_text": "gemma-embedding",
}
#: Why the others are refused.
_REFUSED = {
    "mpnet": "llama.cpp has no MPNet graph: its relative attention bias has no counterpart",
}


class _Source:
    """What the converter needs from a sentence-transformers or plain Hugging Face BERT folder."""

    def __init__(self, root: Path) -> None:
        if not root.is_dir():
            raise BackendError(f"{root} is not a model folder")
        self.root = root
        layout = hf.read_layout(root)
        if layout.unsupported:
            # A Dense projection (or any module llama.cpp cannot run) would change the vectors.
            raise BackendError(
                f"{root}: sentence-transformers module {layout.unsupported[0]!r} is not supported by GGUF"
            )
        if layout.pooling == "max":
            raise BackendError(f"{root}: pooling 'max' is not supported by llama.cpp (mean, cls or last only)")
        self.model_dir = layout.transformer_dir  # the Transformer module's folder (weights, config.json, tokenizer)
        self.pooling = layout.pooling
        self.layout = layout
        self.normalize = layout.normalize
        self.max_seq_length = layout.max_seq_length
        self.prompts, self.default_prompt_name = hf.read_prompts(root)
        config_file = self.model_dir / "config.json"
        if not config_file.is_file():
            raise BackendError(f"{root} has no config.json (not a Hugging Face model folder)")
        self.config: dict[str, Any] = hf.read_json(config_file)
        model_type = str(self.config.get("model_type"))
        if model_type not in ARCHITECTURES:
            why = _REFUSED.get(model_type, "")
            raise BackendError(
                f"{root}: model_type {model_type!r} is not supported by the gguf converter"
                f"{f' ({why})' if why else ''}; it writes {', '.join(sorted(ARCHITECTURES))}"
            )
        self.model_type = model_type
        why = _arch_refusal(model_type, self.config)
        if why:
            raise BackendError(f"{root}: {why}")
        self.dense = hf.dense_layers(layout)
        if self.config.get("position_embedding_type", "absolute") != "absolute":
            raise BackendError(f"{root}: only absolute position embeddings are supported by llama.cpp's bert")
        # RoBERTa-style positions start after the padding index: llama.cpp's bert starts at 0, so the rows before
        # are cut from the table (as llama.cpp's own converter does).
        self.position_offset = hf.position_offset(self.config)

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """(HF name, float32 array) for every weight; safetensors (sharded or not) or pytorch_model.bin."""
        files = sorted(self.model_dir.glob("*.safetensors"))
        if files:
            from safetensors import safe_open

            for file in files:
                try:
                    with safe_open(str(file), framework="np") as fh:
                        for name in fh.keys():  # noqa: SIM118 - safe_open has no __iter__
                            yield name, fh.get_tensor(name)
                except (OSError, ValueError, RuntimeError) as exc:
                    # safetensors reports truncation/corruption as a SafetensorError (a RuntimeError kind)
                    raise BackendError(f"cannot read {file}: {exc}") from exc
            return
        bins = sorted(self.model_dir.glob("pytorch_model*.bin"))
        if not bins:
            raise BackendError(f"{self.model_dir} has no model.safetensors or pytorch_model.bin")
        try:
            import torch
        except ImportError as exc:
            raise BackendError(f"{bins[0].name} needs torch to read; install the `torch` extra") from exc
        for file in bins:
            try:
                state = torch.load(str(file), map_location="cpu", weights_only=True)
            except Exception as exc:  # torch raises many types for a bad pickle
                raise BackendError(f"cannot read {file}: {exc}") from exc
            for name, t in state.items():
                yield name, t.float().numpy() if t.is_floating_point() else t.numpy()

    def hf_tokenizer(self) -> Any:
        """tokenizer.json as sentence-transformers runs it (its lower-casing in, padding and truncation out);
        None without one (or without the tokenizers package)."""
        tok_file = self.model_dir / "tokenizer.json"
        try:
            import tokenizers
        except ImportError:
            return None
        if not tok_file.is_file():
            return None
        tok = tokenizers.Tokenizer.from_file(str(tok_file))
        tok.no_padding()  # tokenizer.json files often pin padding/truncation (all-MiniLM: 128)
        tok.no_truncation()
        if self.layout.do_lower_case:
            hf.lower_case(tok)
        return tok

    def tokenizer_json(self) -> dict[str, Any]:
        """tokenizer.json as JSON; BackendError without one (only WordPiece can do without)."""
        tok_file = self.model_dir / "tokenizer.json"
        if not tok_file.is_file():
            raise BackendError(f"{self.model_dir} has no tokenizer.json (needed for a {self.model_type} vocabulary)")
        data = hf.read_json(tok_file)
        if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
            raise BackendError(f"{tok_file}: not a tokenizers JSON file")
        return data

    def vocab(self) -> tuple[list[str], set[str], dict[str, Any]]:
        """The WordPiece vocabulary in id order, its special tokens, and the normalizer settings."""
        specials: set[str] = set()
        tok_file = self.model_dir / "tokenizer.json"
        if tok_file.is_file():
            tok = hf.read_json(tok_file)
            model = tok.get("model") or {}
            if model.get("type") != "WordPiece":
                raise BackendError(f"{tok_file}: tokenizer {model.get('type')!r} is not WordPiece")
            if model.get("continuing_subword_prefix", "##") != "##":
                raise BackendError(f"{tok_file}: only the `##` continuation prefix is supported")
            by_id = {int(i): t for t, i in model["vocab"].items()}
            for added in tok.get("added_tokens") or []:
                by_id.setdefault(int(added["id"]), added["content"])
                if added.get("special"):
                    specials.add(added["content"])
            normalizer = tok.get("normalizer") or {}
        else:
            vocab_file = self.model_dir / "vocab.txt"
            if not vocab_file.is_file():
                raise BackendError(f"{self.model_dir} has neither tokenizer.json nor vocab.txt")
            lines = vocab_file.read_text(encoding="utf-8").split("\n")
            if lines and lines[-1] == "":
                lines.pop()
            by_id = dict(enumerate(lines))
            tcfg_file = self.model_dir / "tokenizer_config.json"
            tcfg = hf.read_json(tcfg_file) if tcfg_file.is_file() else {}
            normalizer = {
                "lowercase": tcfg.get("do_lower_case", True),
                "strip_accents": tcfg.get("strip_accents"),
            }
            specials = {"[CLS]", "[SEP]", "[UNK]", "[PAD]", "[MASK]"}
        if sorted(by_id) != list(range(len(by_id))):
            raise BackendError(f"{self.model_dir}: vocabulary ids are not contiguous")
        return [by_id[i] for i in range(len(by_id))], specials, normalizer


def _arch_refusal(model_type: str, cfg: dict[str, Any]) -> str:
    """Why llama.cpp's graph for this model type would compute something else than transformers, or ""."""
    if model_type == "modernbert":
        biased = [k for k in ("attention_bias", "mlp_bias", "norm_bias") if cfg.get(k)]
        if biased:
            return f"llama.cpp's modern-bert graph has no biases ({', '.join(biased)} set in config.json)"
    if model_type == "gemma3_text":
        if not cfg.get("use_bidirectional_attention"):
            return "a Gemma 3 with causal attention is a text generator; llama.cpp's gemma-embedding is bidirectional"
        head_dim = cfg.get("head_dim")
        if cfg.get("query_pre_attn_scalar", head_dim) != head_dim:
            return "llama.cpp's gemma-embedding scales attention by head_dim, not query_pre_attn_scalar"
    if model_type in ("modernbert", "gemma3_text"):
        for kind, params in _rope_layers(cfg).items():
            if params.get("rope_type", "default") != "default":
                return f"RoPE scaling {params.get('rope_type')!r} ({kind}) is not written by this converter"
    return ""


def _rope_layers(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{layer type: RoPE parameters} from transformers 5's rope_parameters (one set, or one per layer type)."""
    params = cfg.get("rope_parameters")
    if not isinstance(params, dict):
        return {}
    if all(isinstance(v, dict) for v in params.values()):
        return {str(k): v for k, v in params.items()}
    return {"full_attention": params}


def _swa_layers(cfg: dict[str, Any], n_layers: int) -> list[bool]:
    """Which layers attend in a sliding window, from config.json's layer_types (ModernBERT's
    global_attn_every_n_layers where it has none): written per layer, so llama.cpp needs no pattern rule."""
    types = cfg.get("layer_types")
    if isinstance(types, list) and len(types) == n_layers:
        return ["sliding" in str(t) for t in types]
    every = int(cfg.get("global_attn_every_n_layers") or 1)
    return [i % every != 0 for i in range(n_layers)]


def _runtime_dense(source: _Source, hidden: int) -> bool:
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


def _gguf_vocab(tokens: list[str], specials: set[str], n_rows: int) -> tuple[list[str], list[int]]:
    """llama.cpp's spelling of a WordPiece vocabulary and the token types.

    Only the tokenizer's special tokens are CONTROL: the backend tokenizes with llama.cpp's special-token
    parsing on, because the HF tokenizer also turns "[CLS]" typed in user text into the [CLS] id. Other
    bracketed tokens ([unused0], ...) never come out of HF's tokenizer, so they are UNUSED (a CONTROL one
    would be matched in text).
    """
    import gguf

    out: list[str] = []
    types: list[int] = []
    seen: set[str] = set()
    for tok in tokens:
        if tok in specials:
            text, kind = tok, gguf.TokenType.CONTROL
        elif len(tok) > 2 and tok.startswith("[") and tok.endswith("]"):
            text, kind = tok, gguf.TokenType.UNUSED
        elif tok.startswith("##") and len(tok) > 2:
            text, kind = tok[2:], gguf.TokenType.NORMAL
        else:
            text, kind = WORD_START + tok, gguf.TokenType.NORMAL
        if text in seen:
            # Two HF tokens with one llama.cpp spelling: the second can never be produced; keep the row
            # (ids must stay aligned with the embedding matrix) under a name nothing matches.
            text, kind = f"[gguf-duplicate-{len(out)}]", gguf.TokenType.UNUSED
        seen.add(text)
        out.append(text)
        types.append(int(kind))
    # An embedding matrix padded past the vocabulary (common for speed) needs a token per row.
    for i in range(len(out), n_rows):
        out.append(f"[PAD{i}]")
        types.append(int(gguf.TokenType.UNUSED))
    return out, types


class GgufConverter(Converter):
    name: ClassVar[str] = "gguf"
    help: ClassVar[str] = "GGUF for llama.cpp (BERT, XLM-RoBERTa, ModernBERT, Qwen3, EmbeddingGemma), f16 or q8_0"
    _qtype: str = "f16"

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
        self._qtype = qtype
        source = _Source(Path(src).expanduser())
        out_path = Path(out).expanduser()
        if out_path.is_dir():
            raise BackendError(f"--out {out_path} is a folder; give a file name such as model.gguf")
        out_path.parent.mkdir(parents=True, exist_ok=True)
        # Write beside the target and rename at the end: a failed run never leaves a half-written GGUF.
        part = out_path.with_name(out_path.name + ".part")
        try:
            self._write(source, part, qtype, gguf)
            self._verify(source, part)
            os.replace(part, out_path)
        finally:
            part.unlink(missing_ok=True)
        size = out_path.stat().st_size / 2**20
        self.say(f"wrote {out_path} ({size:.1f} MiB, {qtype}) in {time.perf_counter() - started:.1f}s")

    # -- writing -----------------------------------------------------------------------------------------

    def _write(self, source: _Source, path: Path, qtype: str, gguf: Any) -> None:
        cfg = source.config
        arch_name = ARCHITECTURES[source.model_type]
        arch = {
            "bert": gguf.MODEL_ARCH.BERT,
            "qwen3": gguf.MODEL_ARCH.QWEN3,
            "modern-bert": gguf.MODEL_ARCH.MODERN_BERT,
            "gemma-embedding": gguf.MODEL_ARCH.GEMMA_EMBEDDING,
        }[arch_name]
        try:
            n_layers = int(cfg["num_hidden_layers"])
            hidden = int(cfg["hidden_size"])
            n_ctx = int(cfg["max_position_embeddings"]) - source.position_offset
            ffn = int(cfg["intermediate_size"])
            heads = int(cfg["num_attention_heads"])
        except (KeyError, TypeError, ValueError) as exc:
            raise BackendError(f"{source.model_dir}/config.json lacks a hyper-parameter: {exc}") from exc
        pooling = source.pooling
        if pooling is None:
            pooling = "last" if arch_name == "qwen3" else "mean"
            self.say(f"no sentence-transformers pooling config; writing {pooling} pooling")
        if pooling != "mean" and pooling != "cls" and pooling != "last":
            raise BackendError(f"unsupported pooling {pooling!r}")

        tensor_map = gguf.TensorNameMap(arch, n_layers)
        ftype = gguf.LlamaFileType.MOSTLY_F16 if qtype == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0
        writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
        try:
            self.say(f"reading {source.model_dir} ({arch_name}, {n_layers} layers, dim {hidden}, {qtype})")
            n_vocab_rows = 0
            n_tensors = 0
            for hf_name, data in source.tensors():
                name = hf_name.removeprefix("bert.").removeprefix("roberta.")
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
                array, raw = self._encode(np.ascontiguousarray(data, dtype=np.float32), kind, qtype, gguf)
                if raw is None:
                    writer.add_tensor(new_name, array)
                else:
                    writer.add_tensor(new_name, array, raw_dtype=raw)
                n_tensors += 1
            if not n_vocab_rows:
                raise BackendError(f"{source.model_dir}: no word-embedding tensor found")
            runtime_dense = _runtime_dense(source, hidden)
            if runtime_dense:
                # Where and how llama.cpp's converter puts EmbeddingGemma's projections: the runtime applies them.
                for prefix, layer in zip(("dense_2", "dense_3"), source.dense, strict=True):
                    array, raw = self._encode(layer.weight, gguf.MODEL_TENSOR.DENSE_2_OUT, qtype, gguf)
                    writer.add_tensor(f"{prefix}.weight", array, raw_dtype=raw)
                    writer.add_dense_features_dims(prefix, layer.in_features, layer.out_features)
                    n_tensors += 1
            elif source.dense:
                # llama.cpp refuses tensors its graph does not create: the gateway applies these after pooling.
                self.say(f"{len(source.dense)} Dense module(s) stored for the gateway to apply after pooling")
                for i, layer in enumerate(source.dense):
                    writer.add_string(f"{hf.GGUF_DENSE_PREFIX}{i}.config", json.dumps(layer.config()))
                    for tname, values in layer.tensors().items():
                        flat = np.ascontiguousarray(values, dtype=np.float32).ravel()
                        writer.add_array(f"{hf.GGUF_DENSE_PREFIX}{i}.{tname}", [float(v) for v in flat])

            writer.add_name(source.root.name)
            writer.add_context_length(n_ctx)
            writer.add_embedding_length(hidden)
            writer.add_feed_forward_length(ffn)
            writer.add_block_count(n_layers)
            writer.add_head_count(heads)
            if arch_name in ("qwen3", "gemma-embedding"):
                head_dim = int(cfg.get("head_dim") or hidden // heads)
                writer.add_head_count_kv(int(cfg.get("num_key_value_heads") or heads))
                writer.add_key_length(head_dim)
                writer.add_value_length(head_dim)
                writer.add_rope_freq_base(float(_rope_theta(cfg)))
                writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
                # Qwen3 is a decoder: causal attention, as sentence-transformers runs it; EmbeddingGemma is not.
                writer.add_causal_attention(arch_name == "qwen3")
                if arch_name == "gemma-embedding":
                    self._add_windows(writer, cfg, n_layers, int(cfg["sliding_window"]))
            elif arch_name == "modern-bert":
                writer.add_head_count_kv(heads)
                writer.add_layer_norm_eps(float(cfg.get("norm_eps", 1e-5)))
                writer.add_causal_attention(False)
                writer.add_rope_scaling_type(gguf.RopeScalingType.NONE)
                # The FFN's gated activation (GELU -> GeGLU), under the key llama.cpp's converter uses.
                writer.add_string(f"{arch_name}.hidden_activation", str(cfg.get("hidden_activation", "gelu")))
                self._add_windows(writer, cfg, n_layers, int(cfg["local_attention"]))
            else:
                writer.add_layer_norm_eps(float(cfg.get("layer_norm_eps", 1e-12)))
                writer.add_causal_attention(False)
            writer.add_pooling_type(
                {"mean": gguf.PoolingType.MEAN, "cls": gguf.PoolingType.CLS, "last": gguf.PoolingType.LAST}[pooling]
            )
            writer.add_file_type(ftype)
            if qtype != "f16":
                writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            if source.max_seq_length:
                # Our own key (llama.cpp ignores it): the length sentence-transformers caps inputs at.
                writer.add_uint32(MAX_SEQ_LENGTH_KEY, source.max_seq_length)
            writer.add_bool(NORMALIZE_KEY, source.normalize)
            writer.add_bool(INCLUDE_PROMPT_KEY, source.layout.include_prompt)
            if source.prompts:
                # The folder's prompts travel with the file (the gateway applies them, as for the folder).
                writer.add_string(hf.GGUF_PROMPTS_KEY, json.dumps(source.prompts, ensure_ascii=False))
                if source.default_prompt_name:
                    writer.add_string(hf.GGUF_DEFAULT_PROMPT_KEY, source.default_prompt_name)
            hf_tokenizer = source.hf_tokenizer()
            if hf_tokenizer is not None:
                writer.add_string(HF_TOKENIZER_KEY, hf_tokenizer.to_str())
            kind = source.tokenizer_json()["model"].get("type") if source.model_type != "bert" else "WordPiece"
            if kind == "WordPiece":
                self._add_vocab(writer, source, n_vocab_rows, gguf)
            elif kind == "Unigram":
                _add_unigram(writer, source, n_vocab_rows, gguf)
            elif kind == "BPE" and source.tokenizer_json()["model"].get("byte_fallback"):
                _add_spm_bpe(writer, source, n_vocab_rows, gguf)
            elif kind == "BPE":
                _add_bpe(writer, source, n_vocab_rows, gguf)
            else:
                raise BackendError(f"{source.model_dir}: tokenizer model {kind!r} is not supported")

            self.say(f"writing {n_tensors} tensors to {path.name}")
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file(progress=False)
        except OSError as exc:
            raise BackendError(f"cannot write {path}: {exc}") from exc
        finally:
            writer.close()

    @staticmethod
    def _add_windows(writer: Any, cfg: dict[str, Any], n_layers: int, window: int) -> None:
        """Sliding-window attention as llama.cpp's symmetric window reads it (|i - j| <= window / 2: ModernBERT's
        local_attention and EmbeddingGemma's config.json sliding_window are both that full width), which layers
        use it, and each kind's RoPE base."""
        writer.add_sliding_window(window)
        writer.add_sliding_window_pattern(_swa_layers(cfg, n_layers))
        rope = _rope_layers(cfg)
        full = rope.get("full_attention", {}).get("rope_theta", cfg.get("global_rope_theta", _rope_theta(cfg)))
        writer.add_rope_freq_base(float(full))
        local = rope.get("sliding_attention", {}).get("rope_theta", cfg.get("local_rope_theta"))
        if local is not None:
            writer.add_rope_freq_base_swa(float(local))

    @staticmethod
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

    @staticmethod
    def _add_vocab(writer: Any, source: _Source, n_rows: int, gguf: Any) -> None:
        tokens, specials, normalizer = source.vocab()
        if len(tokens) > n_rows:
            raise BackendError(f"vocabulary has {len(tokens)} tokens but the embedding matrix only {n_rows} rows")
        index = {t: i for i, t in enumerate(tokens)}
        tcfg_file = source.model_dir / "tokenizer_config.json"
        tcfg = hf.read_json(tcfg_file) if tcfg_file.is_file() else {}

        def special(key: str, default: str) -> int:
            value = tcfg.get(key, default)
            if isinstance(value, dict):  # older configs store AddedToken dicts
                value = value.get("content", default)
            if value not in index:
                raise BackendError(f"special token {key}={value!r} is not in the vocabulary")
            return index[value]

        gguf_tokens, types = _gguf_vocab(tokens, specials, n_rows)
        writer.add_tokenizer_model("bert")
        writer.add_token_list(gguf_tokens)
        writer.add_token_types(types)
        writer.add_token_type_count(int(source.config.get("type_vocab_size", 2)))
        cls_id, sep_id = special("cls_token", "[CLS]"), special("sep_token", "[SEP]")
        # llama.cpp's WordPiece tokenizer adds BOS first and SEP last when asked for special tokens.
        writer.add_bos_token_id(cls_id)
        writer.add_eos_token_id(sep_id)
        writer.add_sep_token_id(sep_id)
        writer.add_unk_token_id(special("unk_token", "[UNK]"))
        writer.add_pad_token_id(special("pad_token", "[PAD]"))
        writer.add_mask_token_id(special("mask_token", "[MASK]"))
        writer.add_add_bos_token(True)
        writer.add_add_sep_token(True)
        writer.add_add_eos_token(False)
        # HF BertNormalizer: strip_accents None means "strip when lowercasing"; llama.cpp reads both keys.
        # sentence-transformers' own lower-casing (`do_lower_case`) counts too, for llama.cpp's tokenizer.
        lowercase = bool(normalizer.get("lowercase", True)) or source.layout.do_lower_case
        strip = normalizer.get("strip_accents")
        writer.add_bool("tokenizer.ggml.normalizer.lowercase", lowercase)
        strip_accents = lowercase if strip is None else bool(strip)
        writer.add_bool("tokenizer.ggml.normalizer.strip_accents", strip_accents)

    # -- verification ------------------------------------------------------------------------------------

    def _verify(self, source: _Source, path: Path) -> None:
        """Token ids, then vectors, on the bundled adversarial texts, starting from text.

        llama.cpp's WordPiece is compared with tokenizer.json for the record: where they differ (Hangul,
        Indic marks, words over 100 characters) the backend does not use it, it tokenizes with the
        tokenizer.json the GGUF carries. The vectors must match sentence-transformers' own encode of the
        source folder (when sentence-transformers is installed), or the conversion fails.
        """
        try:
            import llama_cpp  # noqa: F401 - only probing that the runtime is installed
        except ImportError:
            self.say("llama-cpp-python missing: skipped the token-id and vector checks")
            return
        hf_tok = source.hf_tokenizer()
        if hf_tok is None:
            self.say("no tokenizer.json: skipped the token-id check; llama.cpp's own tokenizer will serve")
            return
        from . import _llama

        texts = [*VERIFY_TEXTS, *hf.adversarial_texts()]
        model = _llama.load_model(path, vocab_only=True)
        try:
            vocab = _llama.lib().llama_model_get_vocab(model)
            differ = [t for t in texts if _llama.tokenize(vocab, t) != hf_tok.encode(t).ids]
        finally:
            _llama.lib().llama_model_free(model)
        self.say(
            f"llama.cpp's tokenizer matches tokenizer.json on {len(texts) - len(differ)} of {len(texts)} texts; "
            "the GGUF carries tokenizer.json, which the gguf backend uses"
        )
        self._check_vectors(source, path, list(hf.adversarial_texts()))

    def _check_vectors(self, source: _Source, path: Path, texts: list[str]) -> None:
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            self.say("sentence-transformers missing: skipped the vector check")
            return
        from .backend import GgufBackend, GgufOptions

        if not source.layout.is_sentence_transformers:
            self.say("not a sentence-transformers folder: skipped the vector check")
            return
        reference = SentenceTransformer(str(source.root), device="cpu", local_files_only=True)
        want = reference.encode(texts, prompt="", convert_to_numpy=True, normalize_embeddings=True)
        backend = GgufBackend(model="convert-check", path=str(path), options=GgufOptions(n_threads=1))
        try:
            backend.load()
            ids = backend.tokenize(texts)
            limit = backend._max_tokens
            got = backend.embed(texts, [i if len(i) <= limit else [*i[: limit - 1], i[-1]] for i in ids])
        finally:
            backend.close()
        got = hf.l2_normalize(got)
        cos = np.sum(got * want, axis=1)
        worst = int(np.argmin(cos))
        self.say(f"vectors vs sentence-transformers on {len(texts)} adversarial texts: min cosine {cos[worst]:.5f}")
        floor = 0.999 if self._qtype == "f16" else 0.99
        if cos[worst] < floor:
            raise BackendError(
                f"the GGUF's vectors disagree with sentence-transformers on {texts[worst]!r}: "
                f"cosine {cos[worst]:.4f} < {floor}"
            )


def _rope_theta(cfg: dict[str, Any]) -> float:
    """RoPE's base frequency, from transformers 5's rope_parameters or the older rope_theta."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and isinstance(params.get("rope_theta"), (int, float)):
        return float(params["rope_theta"])
    return float(cfg.get("rope_theta", 10_000.0))


def _added(tok: dict[str, Any]) -> dict[int, tuple[str, bool]]:
    return {int(a["id"]): (str(a["content"]), bool(a.get("special"))) for a in tok.get("added_tokens") or []}


def _vocab_by_id(tok: dict[str, Any], n_rows: int) -> tuple[dict[int, str], dict[int, tuple[str, bool]], list[str]]:
    """A tokenizer.json's vocabulary and added tokens by id, and the token list up to the highest id (a gap
    named as padding); a BackendError when the embedding matrix has fewer rows than that."""
    by_id = {int(i): str(t) for t, i in (tok["model"].get("vocab") or {}).items()}
    added = _added(tok)
    for i, (text, _special) in added.items():
        by_id.setdefault(i, text)
    size = max(by_id) + 1 if by_id else 0
    if size > n_rows:
        raise BackendError(f"vocabulary has {size} tokens but the embedding matrix only {n_rows} rows")
    return by_id, added, [by_id.get(i, f"[PAD{i}]") for i in range(size)]


def _pad_rows(tokens: list[str], types: list[int], n_rows: int, gguf: Any) -> None:
    # An embedding matrix padded past the vocabulary needs a token per row.
    for i in range(len(tokens), n_rows):
        tokens.append(f"[PAD{i}]")
        types.append(int(gguf.TokenType.UNUSED))


def _special_ids(writer: Any, tok: dict[str, Any], tcfg: dict[str, Any], index: dict[str, int]) -> None:
    """bos/eos/unk/pad/sep ids from tokenizer_config.json's names, where the vocabulary has them."""
    for key, add in (
        ("bos_token", writer.add_bos_token_id),
        ("eos_token", writer.add_eos_token_id),
        ("unk_token", writer.add_unk_token_id),
        ("pad_token", writer.add_pad_token_id),
        ("sep_token", writer.add_sep_token_id),
        ("cls_token", None),
    ):
        value = tcfg.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str) and value in index and add is not None:
            add(index[value])


def _add_unigram(writer: Any, source: _Source, n_rows: int, gguf: Any) -> None:
    """A SentencePiece Unigram vocabulary (XLM-RoBERTa's) as llama.cpp's `t5` (UGM) tokenizer. The gateway
    tokenizes with the tokenizer.json the file carries; this vocabulary is what llama.cpp itself needs."""
    tok = source.tokenizer_json()
    pieces = tok["model"].get("vocab") or []
    added = _added(tok)
    tokens: list[str] = []
    scores: list[float] = []
    types: list[int] = []
    unk = tok["model"].get("unk_id")
    for i, (piece, score) in enumerate(pieces):
        tokens.append(str(piece))
        scores.append(float(score))
        if i == unk:
            types.append(int(gguf.TokenType.UNKNOWN))
        elif i in added and added[i][1]:
            types.append(int(gguf.TokenType.CONTROL))
        else:
            types.append(int(gguf.TokenType.NORMAL))
    if len(tokens) > n_rows:
        raise BackendError(f"vocabulary has {len(tokens)} tokens but the embedding matrix only {n_rows} rows")
    _pad_rows(tokens, types, n_rows, gguf)
    scores += [-10000.0] * (len(tokens) - len(scores))
    writer.add_tokenizer_model("t5")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_token_type_count(int(source.config.get("type_vocab_size", 1)))
    tcfg_file = source.model_dir / "tokenizer_config.json"
    _special_ids(
        writer, tok, hf.read_json(tcfg_file) if tcfg_file.is_file() else {}, {t: i for i, t in enumerate(tokens)}
    )
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(True)


def _add_bpe(writer: Any, source: _Source, n_rows: int, gguf: Any) -> None:
    """A byte-level BPE vocabulary (Qwen's) as llama.cpp's `gpt2` tokenizer with its merges."""
    tok = source.tokenizer_json()
    by_id, added, tokens = _vocab_by_id(tok, n_rows)
    types = [
        int(
            gguf.TokenType.CONTROL
            if i in added and added[i][1]
            else gguf.TokenType.USER_DEFINED
            if i in added
            else gguf.TokenType.NORMAL
            if i in by_id
            else gguf.TokenType.UNUSED
        )
        for i in range(len(tokens))
    ]
    _pad_rows(tokens, types, n_rows, gguf)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"].get("merges") or []]
    writer.add_tokenizer_model("gpt2")
    bert_style = source.model_type == "modernbert"
    writer.add_tokenizer_pre({"qwen3": "qwen2", "modernbert": "modern-bert"}.get(source.model_type, "default"))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    tcfg_file = source.model_dir / "tokenizer_config.json"
    tcfg = dict(hf.read_json(tcfg_file)) if tcfg_file.is_file() else {}
    if bert_style:
        # As llama.cpp's converter writes ModernBERT: its own tokenizer wraps the text in [CLS] ... [SEP] too (the
        # gateway uses tokenizer.json; a llama.cpp server reading this file does not).
        tcfg.setdefault("bos_token", tcfg.get("cls_token"))
        tcfg.setdefault("eos_token", tcfg.get("sep_token"))
    _special_ids(writer, tok, tcfg, {t: i for i, t in enumerate(tokens)})
    writer.add_add_bos_token(bert_style)
    if bert_style:
        writer.add_add_eos_token(True)


def _add_spm_bpe(writer: Any, source: _Source, n_rows: int, gguf: Any) -> None:
    """A SentencePiece-style BPE with byte fallback (Gemma's: U+2581-marked words, <0xNN> byte pieces) as
    llama.cpp's `llama` (SPM) tokenizer, as llama.cpp's converter writes Gemma's. The gateway tokenizes with
    the tokenizer.json the file carries; this vocabulary is what llama.cpp itself needs to load."""
    tok = source.tokenizer_json()
    by_id, added, tokens = _vocab_by_id(tok, n_rows)
    unk = tok["model"].get("unk_token")
    types = []
    for i, text in enumerate(tokens):
        if i in added and added[i][1]:
            kind = gguf.TokenType.CONTROL
        elif text == unk:
            kind = gguf.TokenType.UNKNOWN
        elif len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            kind = gguf.TokenType.BYTE
        elif i in by_id:
            kind = gguf.TokenType.USER_DEFINED if i in added else gguf.TokenType.NORMAL
        else:
            kind = gguf.TokenType.UNUSED
        types.append(int(kind))
    _pad_rows(tokens, types, n_rows, gguf)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    # SPM merges by score: earlier pieces (more frequent merges) first.
    writer.add_token_scores([-float(i) for i in range(len(tokens))])
    writer.add_token_types(types)
    writer.add_add_space_prefix(False)
    tcfg_file = source.model_dir / "tokenizer_config.json"
    _special_ids(
        writer, tok, hf.read_json(tcfg_file) if tcfg_file.is_file() else {}, {t: i for i, t in enumerate(tokens)}
    )
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(True)
