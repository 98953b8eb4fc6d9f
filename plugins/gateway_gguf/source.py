"""What the GGUF converter reads from a model folder (layout, config.json, weights, vocabulary) and why it
refuses one: a module of its own because it is the converter's whole input side, apart from the writing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from gateway.plugin import BackendError
from gateway.runtime import hf

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


class Source:
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
        #: "rerank" for a CrossEncoder folder (a sequence-classification head): its classifier is written too.
        self.task = hf.folder_task(root)
        self.activation = "sigmoid"
        if self.task == "rerank":
            why = _reranker_refusal(model_type, self.config)
            if why:
                raise BackendError(f"{root}: {why}")
            self.activation = cross_encoder_activation(root)
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
        for kind, params in rope_layers(cfg).items():
            if params.get("rope_type", "default") != "default":
                return f"RoPE scaling {params.get('rope_type')!r} ({kind}) is not written by this converter"
    return ""


def _reranker_refusal(model_type: str, cfg: dict[str, Any]) -> str:
    """Why this classifier cannot be a one-score reranker in llama.cpp's rank pooling, or "": its graph runs
    BERT's and RoBERTa's heads (the [CLS] state through a dense layer and tanh, then the output projection)."""
    if ARCHITECTURES[model_type] != "bert":
        return (
            f"a {model_type} classifier is not written as a GGUF reranker (the converter writes BERT and "
            "XLM-RoBERTa cross-encoders, whose heads llama.cpp's rank pooling runs)"
        )
    labels = cfg.get("id2label")
    n_labels = len(labels) if isinstance(labels, dict) and labels else int(cfg.get("num_labels", 1))
    if n_labels != 1:
        return f"the classifier has {n_labels} labels; a reranker gives one score per pair"
    return ""


def cross_encoder_activation(root: Path) -> str:
    """What `CrossEncoder.predict` applies by default to the folder's one logit, by sentence-transformers' rule:
    the torch activation its config names, else sigmoid for one label ("sigmoid" or "identity")."""
    config_file = root / "config_sentence_transformers.json"
    config = hf.read_json(config_file) if config_file.is_file() else {}
    named = config.get("activation_fn") if isinstance(config, dict) else None
    if named is None:
        return "sigmoid"
    kind = str(named).rsplit(".", 1)[-1]
    if str(named).startswith("torch.") and kind in ("Sigmoid", "Identity"):
        return kind.lower()
    raise BackendError(f"{config_file}: activation {named!r} is not supported in a GGUF (only Sigmoid and Identity)")


def rope_layers(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{layer type: RoPE parameters} from transformers 5's rope_parameters (one set, or one per layer type)."""
    params = cfg.get("rope_parameters")
    if not isinstance(params, dict):
        return {}
    if all(isinstance(v, dict) for v in params.values()):
        return {str(k): v for k, v in params.items()}
    return {"full_attention": params}
