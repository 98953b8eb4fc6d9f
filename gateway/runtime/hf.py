"""Hugging Face / sentence-transformers model folders, read the same way by every plugin and converter.

A sentence-transformers folder is a transformer (config.json, weights, tokenizer) plus `modules.json`,
which lists what runs after it: pooling (`1_Pooling/config.json`), usually Normalize, sometimes Dense
layers. This module reads that layout, names pooling modes with one vocabulary, and pools, projects (Dense) and
normalizes token states as sentence-transformers does, so that every runtime serves the same vectors.
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO, Literal, get_args

import numpy as np

from gateway.plugin import BackendError

log = logging.getLogger("gateway.hf")

#: Pooling modes, named as gateway.toml names them (sentence-transformers calls "last" "lasttoken").
Pooling = Literal["mean", "cls", "max", "last"]
POOLING_MODES: tuple[str, ...] = get_args(Pooling)

# sentence-transformers' names: the keys of an older 1_Pooling/config.json, and the `pooling_mode` values of
# newer ones (and of a loaded Pooling module).
_ST_POOLING: dict[str, Pooling] = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_lasttoken": "last",
    "mean": "mean",
    "cls": "cls",
    "max": "max",
    "lasttoken": "last",
}


def read_json(path: Path) -> Any:
    """A JSON file's content; BackendError naming the file when it cannot be read or parsed."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BackendError(f"cannot read {path}: {exc}") from exc


def pooling_name(st_mode: str) -> Pooling | None:
    """Our name for a sentence-transformers pooling mode, or None for one we do not implement."""
    return _ST_POOLING.get(st_mode)


def inside(root: Path, relative: str, what: str) -> Path:
    """`root / relative`, refused (BackendError) when it would leave `root`: model folders are not trusted
    to point at other files on the machine."""
    target = (root / relative).resolve()
    if not target.is_relative_to(root.resolve()):
        raise BackendError(f"{what}: path {relative!r} leaves the model folder {root}")
    return target


@dataclass(frozen=True, slots=True)
class Layout:
    """What `modules.json` says about a model folder (a plain Hugging Face folder has no modules)."""

    root: Path
    #: The transformer's own folder: config.json, weights and tokenizer files.
    transformer_dir: Path
    #: None when the folder names no pooling (then the caller's default applies).
    pooling: Pooling | None = None
    normalize: bool = False
    #: The input length sentence-transformers caps inputs at (see `_max_seq_length`), if the folder says.
    max_seq_length: int | None = None
    #: False when the Pooling module leaves prompt tokens out of the pooled vector (`include_prompt`).
    include_prompt: bool = True
    #: sentence-transformers lower-cases the text before its tokenizer (`do_lower_case`).
    do_lower_case: bool = False
    #: Module types other than Transformer, Pooling, Dense and Normalize (LayerNorm, custom code), or a Dense
    #: where it is not between pooling and Normalize: a runtime that cannot run them must refuse the model
    #: rather than serve different vectors.
    unsupported: tuple[str, ...] = ()
    #: The folders of the Dense modules that run after pooling and before Normalize, in order (`read_dense`).
    dense: tuple[Path, ...] = ()
    #: The folder holds a sentence-transformers `modules.json`.
    is_sentence_transformers: bool = False


def read_layout(root: Path) -> Layout:
    """The layout of a model folder; BackendError when its files are unreadable or point outside it."""
    modules_file = root / "modules.json"
    if not modules_file.is_file():
        return Layout(root=root, transformer_dir=root, max_seq_length=_max_seq_length(root))
    modules = read_json(modules_file)
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise BackendError(f"{modules_file}: expected a JSON list of modules")
    transformer_dir = root
    pooling: Pooling | None = None
    include_prompt = True
    normalize = False
    unsupported: list[str] = []
    dense: list[Path] = []
    for module in modules:
        kind = str(module.get("type", ""))
        sub = inside(root, str(module.get("path", "")), str(modules_file))
        if kind.endswith(".Transformer"):
            transformer_dir = sub
        elif kind.endswith(".Normalize"):
            normalize = True
        elif kind.endswith(".Pooling"):
            pooling, include_prompt = _pooling(sub / "config.json")
        elif kind.endswith(".Dense") and pooling is not None and not normalize:
            dense.append(sub)
        else:
            unsupported.append(kind or repr(module))
    return Layout(
        root=root,
        transformer_dir=transformer_dir,
        pooling=pooling,
        normalize=normalize,
        max_seq_length=_max_seq_length(transformer_dir),
        include_prompt=include_prompt,
        do_lower_case=bool(_st_config(transformer_dir).get("do_lower_case", False)),
        unsupported=tuple(unsupported),
        dense=tuple(dense),
        is_sentence_transformers=True,
    )


def folder_task(root: Path) -> Literal["embed", "rerank"]:
    """ "rerank" for a sentence-transformers CrossEncoder folder (its config says so, or its transformer has a
    sequence-classification head and no pooling follows it), else "embed" (also for a folder that is
    missing or unreadable: loading it says what is wrong)."""
    try:
        st = _json_or(root / "config_sentence_transformers.json", {})
        config = _json_or(root / "config.json", {})
        modules = _json_or(root / "modules.json", [])
    except BackendError:
        return "embed"
    if isinstance(st, dict) and st.get("model_type") == "CrossEncoder":
        return "rerank"
    heads = (config.get("architectures") if isinstance(config, dict) else None) or []
    classifies = any(str(a).endswith("ForSequenceClassification") for a in heads)
    pooled = isinstance(modules, list) and any(
        isinstance(m, dict) and str(m.get("type", "")).endswith(".Pooling") for m in modules
    )
    return "rerank" if classifies and not pooled else "embed"


def _json_or(path: Path, default: Any) -> Any:
    return read_json(path) if path.is_file() else default


def _pooling(config_file: Path) -> tuple[Pooling, bool]:
    config = read_json(config_file)
    if not isinstance(config, dict):
        raise BackendError(f"{config_file}: expected a JSON object")
    if isinstance(config.get("pooling_mode"), str):
        modes = [config["pooling_mode"]]
    else:
        modes = [key for key, on in config.items() if key.startswith("pooling_mode") and on is True]
    names = [pooling_name(m) for m in modes]
    if len(names) != 1 or names[0] is None:
        raise BackendError(
            f"{config_file}: pooling {modes or 'none'} is not supported (one of {', '.join(POOLING_MODES)})"
        )
    return names[0], config.get("include_prompt", True) is not False


# The Transformer module's config file, by the names sentence-transformers tries in turn.
_ST_CONFIG_FILES = (
    "sentence_bert_config.json",
    "sentence_roberta_config.json",
    "sentence_distilbert_config.json",
    "sentence_camembert_config.json",
    "sentence_albert_config.json",
    "sentence_xlm-roberta_config.json",
    "sentence_xlnet_config.json",
)


def _st_config(folder: Path) -> dict[str, Any]:
    for name in _ST_CONFIG_FILES:
        if (folder / name).is_file():
            config = read_json(folder / name)
            return config if isinstance(config, dict) else {}
    return {}


def _positive(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _max_seq_length(folder: Path) -> int | None:
    """The token limit sentence-transformers (6, as 3 to 5) sets on a Transformer module in `folder`, or None
    when the folder does not say (then the position table decides).

    In order: `model_max_length` among the module config's tokenizer arguments (`processor_kwargs`, older
    `tokenizer_args`), else its `max_seq_length`; either is used as is. Else the tokenizer's own
    `model_max_length` (tokenizer_config.json, where sentence-transformers 6 saves the limit), capped at
    `max_position_embeddings` unless that is -1 (XLNet's "no limit").
    """
    config = _st_config(folder)
    for key in ("processor_kwargs", "tokenizer_args"):
        kwargs = config.get(key)
        if isinstance(kwargs, dict) and _positive(kwargs.get("model_max_length")):
            return _positive(kwargs["model_max_length"])
    if _positive(config.get("max_seq_length")):
        return _positive(config["max_seq_length"])
    tokenizer_config = folder / "tokenizer_config.json"
    limit = _positive(read_json(tokenizer_config).get("model_max_length")) if tokenizer_config.is_file() else None
    # transformers' "no limit" placeholder (1e30) is not a limit: the position table is.
    if limit is None or limit >= 10**12:
        return None
    positions = _position_table(folder)
    return min(limit, positions) if positions else limit


# Model types whose positions count from the padding index + 1 (transformers' create_position_ids_from_input_ids):
# that many rows of the position table are never an input's. MPNet's embeddings take 1 as the index whatever the
# config says.
_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text", "longformer", "mpnet"}


def position_offset(config: Mapping[str, Any]) -> int:
    """The position of an input's first token for a model of this config.json: 0, or the padding index + 1."""
    model_type = str(config.get("model_type", ""))
    if model_type not in _OFFSET_POSITIONS:
        return 0
    pad = 1 if model_type == "mpnet" else config.get("pad_token_id", 1)
    return int(pad) + 1 if isinstance(pad, int) and pad >= 0 else 0


def _position_table(folder: Path) -> int | None:
    """How many input positions the position table holds (its size less an offset), None when it does not say."""
    config = folder / "config.json"
    if not config.is_file():
        return None
    data = read_json(config)
    if not isinstance(data, dict) or not _positive(data.get("max_position_embeddings")):
        return None
    return _positive(int(data["max_position_embeddings"]) - position_offset(data))


def max_input_tokens(layout: Layout) -> int:
    """The input limit sentence-transformers applies to this folder (`_max_seq_length`, else the position
    table's size): one reading for every backend and converter."""
    if layout.max_seq_length:
        return layout.max_seq_length
    positions = _position_table(layout.transformer_dir)
    if positions:
        return positions
    log.warning("%s: no sentence_bert_config.json or config.json; assuming 512 input tokens", layout.root)
    return 512


def pool(hidden: np.ndarray, mask: np.ndarray, mode: Pooling) -> np.ndarray:
    """[n, seq, dim] token states of right-padded inputs -> [n, dim], pooling where `mask` is set (padding and
    any prompt left out are 0), as sentence-transformers 6 pools."""
    rows = np.arange(hidden.shape[0])
    if mode == "cls":
        # The first token pooled: [CLS], or the first after a prompt left out (sentence-transformers 6).
        return hidden[rows, np.argmax(mask > 0, axis=1)]
    if mode == "last":
        last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1] > 0, axis=1)
        return hidden[rows, last]
    m = mask[:, :, None].astype(hidden.dtype)
    if mode == "max":
        return np.where(m > 0, hidden, -np.inf).max(axis=1).astype(hidden.dtype)
    return (hidden * m).sum(axis=1) / np.clip(m.sum(axis=1), 1e-9, None)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (the epsilon torch's normalize uses, as sentence-transformers' Normalize)."""
    return x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)


# -- Dense projections after pooling (sentence-transformers' Dense module) --------------------------------

# The activations a Dense module names (torch.nn classes, constructed without arguments as sentence-transformers
# constructs them), in numpy: our name for each.
_ACTIVATIONS = {
    "Identity": "identity",
    "Tanh": "tanh",
    "ReLU": "relu",
    "Sigmoid": "sigmoid",
    "SiLU": "silu",
    "GELU": "gelu",
}


@dataclass(frozen=True, slots=True, eq=False)
class DenseLayer:
    """One sentence-transformers Dense module: `activation(x @ weight.T + bias)`, plus `x` (or `x @ residual.T`)
    when it uses a residual connection."""

    #: [out_features, in_features], as torch's nn.Linear stores it.
    weight: np.ndarray
    bias: np.ndarray | None
    #: One of the values of _ACTIVATIONS.
    activation: str
    use_residual: bool = False
    #: [out, in]: the residual's projection when in and out features differ.
    residual: np.ndarray | None = None

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    def tensors(self) -> dict[str, np.ndarray]:
        """The weights under the names sentence-transformers saves them with (model.safetensors)."""
        out = {"linear.weight": self.weight}
        if self.bias is not None:
            out["linear.bias"] = self.bias
        if self.residual is not None:
            out["residual.weight"] = self.residual
        return out

    def config(self) -> dict[str, Any]:
        """What travels beside the weights where a folder's config.json cannot (a GGUF key)."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "activation": self.activation,
            "use_residual": self.use_residual,
        }

    @classmethod
    def from_parts(cls, config: Mapping[str, Any], tensors: Mapping[str, np.ndarray], where: str) -> DenseLayer:
        """A layer from `config()` and `tensors()` (read back from a GGUF); BackendError when they disagree."""
        try:
            weight = np.asarray(tensors["linear.weight"], dtype=np.float32).reshape(
                int(config["out_features"]), int(config["in_features"])
            )
            bias = np.asarray(tensors["linear.bias"], dtype=np.float32) if config.get("bias") else None
            residual = tensors.get("residual.weight")
            if residual is not None:
                residual = np.asarray(residual, dtype=np.float32).reshape(weight.shape)
        except (KeyError, TypeError, ValueError) as exc:
            raise BackendError(f"{where}: the Dense layer it carries is incomplete or misshapen ({exc})") from exc
        activation = str(config.get("activation"))
        if activation not in _ACTIVATIONS.values():
            raise BackendError(
                f"{where}: Dense activation {activation!r} is not one of {sorted(_ACTIVATIONS.values())}"
            )
        layer = cls(weight, bias, activation, bool(config.get("use_residual")), residual)
        layer.check(where)
        return layer

    def check(self, where: str) -> None:
        if self.bias is not None and self.bias.shape != (self.out_features,):
            raise BackendError(f"{where}: Dense bias of shape {self.bias.shape} for {self.out_features} outputs")
        if self.use_residual and self.residual is None and self.in_features != self.out_features:
            raise BackendError(
                f"{where}: a residual Dense from {self.in_features} to {self.out_features} features "
                "has no residual.weight"
            )

    def __call__(self, x: np.ndarray) -> np.ndarray:
        y = x @ self.weight.T
        if self.bias is not None:
            y = y + self.bias
        y = _activate(y, self.activation)
        if self.use_residual:
            y = y + (x if self.residual is None else x @ self.residual.T)
        return y.astype(np.float32, copy=False)


def _activate(y: np.ndarray, name: str) -> np.ndarray:
    if name == "tanh":
        return np.tanh(y)
    if name == "relu":
        return np.maximum(y, 0)
    if name == "sigmoid":
        return 1 / (1 + np.exp(-y))
    if name == "silu":
        return y / (1 + np.exp(-y))
    if name == "gelu":  # torch's exact GELU (approximate="none"), as nn.GELU() computes it
        from scipy.special import erf

        return 0.5 * y * (1 + erf(y / np.sqrt(2)))
    return y


def _activation_name(config: Mapping[str, Any], where: Path, trust_remote_code: bool) -> str:
    """Our name for the activation a Dense config names, as sentence-transformers 6 resolves it: a missing one
    is Tanh (the constructor's default), and a path outside torch is Tanh too unless remote code is trusted."""
    path = config.get("activation_function")
    if path is None:
        return "tanh"
    path = str(path)
    if not path.startswith("torch."):
        if not trust_remote_code:
            return "tanh"
        raise BackendError(f"{where}: Dense activation {path!r} is custom code, which only the torch backend runs")
    name = _ACTIVATIONS.get(path.rsplit(".", 1)[-1])
    if name is None or not path.startswith("torch.nn."):
        raise BackendError(
            f"{where}: Dense activation {path!r} is not supported outside the torch backend "
            f"(one of {', '.join(f'torch.nn.{k}' for k in _ACTIVATIONS)})"
        )
    return name


def _dense_tensors(folder: Path) -> dict[str, np.ndarray]:
    file = folder / "model.safetensors"
    if file.is_file():
        from safetensors.numpy import load_file

        try:
            return {k: np.asarray(v, dtype=np.float32) for k, v in load_file(str(file)).items()}
        except (OSError, ValueError, RuntimeError, TypeError) as exc:  # TypeError: a dtype numpy lacks (bf16)
            raise BackendError(f"cannot read {file}: {exc}") from exc
    file = folder / "pytorch_model.bin"
    if not file.is_file():
        raise BackendError(f"{folder}: a Dense module without model.safetensors or pytorch_model.bin")
    try:
        import torch
    except ImportError as exc:
        raise BackendError(f"{file} needs torch to read (or convert the model, which writes safetensors)") from exc
    try:
        state = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad pickle
        raise BackendError(f"cannot read {file}: {exc}") from exc
    return {k: v.float().numpy() for k, v in state.items()}


def read_dense(folder: Path, trust_remote_code: bool = False) -> DenseLayer:
    """A Dense module's folder (config.json and weights), read as sentence-transformers 6 loads it."""
    config = read_json(folder / "config.json")
    if not isinstance(config, dict):
        raise BackendError(f"{folder}/config.json: expected a JSON object")
    for key in ("module_input_name", "module_output_name"):
        if config.get(key) not in (None, "sentence_embedding"):
            raise BackendError(f"{folder}: a Dense module on {config[key]!r} (not the sentence embedding)")
    tensors = _dense_tensors(folder)
    weight = tensors.get("linear.weight")
    try:
        n_in, n_out = int(config["in_features"]), int(config["out_features"])
    except (KeyError, TypeError, ValueError) as exc:
        raise BackendError(f"{folder}/config.json: no in_features/out_features ({exc})") from exc
    if weight is None or weight.shape != (n_out, n_in):
        shape = None if weight is None else weight.shape
        raise BackendError(f"{folder}: linear.weight of shape {shape}, expected {(n_out, n_in)}")
    # The constructor's default is a bias; the weights decide whether one was saved.
    bias = tensors.get("linear.bias") if config.get("bias", True) else None
    if config.get("bias", True) and bias is None:
        raise BackendError(f"{folder}: config.json says bias but the weights have no linear.bias")
    layer = DenseLayer(
        weight=weight,
        bias=bias,
        activation=_activation_name(config, folder, trust_remote_code),
        use_residual=bool(config.get("use_residual", False)),
        residual=tensors.get("residual.weight"),
    )
    layer.check(str(folder))
    return layer


def dense_layers(layout: Layout, trust_remote_code: bool = False) -> tuple[DenseLayer, ...]:
    """The folder's Dense modules after pooling, in order, checked to chain (each one's input is the last's
    output)."""
    layers = tuple(read_dense(folder, trust_remote_code) for folder in layout.dense)
    for before, after, folder in zip(layers, layers[1:], layout.dense[1:], strict=False):
        if before.out_features != after.in_features:
            raise BackendError(
                f"{folder}: takes {after.in_features} features, the Dense before gives {before.out_features}"
            )
    return layers


def apply_dense(x: np.ndarray, layers: Sequence[DenseLayer]) -> np.ndarray:
    """Pooled vectors [n, dim] through the Dense layers, as sentence-transformers runs them (before Normalize)."""
    for layer in layers:
        x = layer(np.asarray(x, dtype=np.float32))
    return x


def read_prompts(folder: Path) -> tuple[dict[str, str], str | None]:
    """Named prompts and the default prompt's name from a model folder's config_sentence_transformers.json
    (empty when the folder has none, as sentence-transformers reads it), or from the metadata our GGUF
    converter copies them into; BackendError when they are malformed."""
    if folder.is_file() and folder.suffix == ".gguf":
        meta = read_gguf_metadata(folder)
        path = folder
        data = {
            "prompts": json.loads(str(meta.get(GGUF_PROMPTS_KEY) or "{}")),
            "default_prompt_name": meta.get(GGUF_DEFAULT_PROMPT_KEY) or None,
        }
    else:
        path = folder / "config_sentence_transformers.json"
        if not folder.is_dir() or not path.is_file():
            return {}, None
        data = read_json(path)
    prompts = data.get("prompts") or {} if isinstance(data, dict) else None
    default = data.get("default_prompt_name") if isinstance(data, dict) else None
    if not isinstance(prompts, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()):
        raise BackendError(f"{path}: `prompts` must map names to strings")
    if default is not None and default not in prompts:
        raise BackendError(f"{path}: default_prompt_name {default!r} is not one of its prompts")
    return prompts, default


# -- prompts left out of pooling (`include_prompt: false`) ------------------------------------------------


class PromptLengths:
    """How many leading tokens of each input sentence-transformers leaves out of pooling when the Pooling
    module says `include_prompt: false`: the applied prompt's own token count, less a trailing special
    token (its [SEP]), so its [CLS] is left out too (sentence-transformers 6, Transformer._get_prompt_length).

    The core hands a backend the prompted text, not the prompt: the prompt is found again as the longest of
    the model's prompts that the text starts with. A text that starts with a prompt's exact wording without
    that prompt being chosen is read as prompted (the one place this differs from sentence-transformers).
    """

    def __init__(
        self,
        prompts: Mapping[str, str],
        tokenize: Callable[[Sequence[str]], list[list[int]]],
        special_ids: set[int],
    ) -> None:
        texts = sorted({p for p in prompts.values() if p}, key=len, reverse=True)
        ids = tokenize(texts) if texts else []
        self.prompts: list[tuple[str, int]] = [
            (text, len(one) - (1 if one and one[-1] in special_ids else 0))
            for text, one in zip(texts, ids, strict=True)
        ]

    def prompt_of(self, text: str) -> tuple[str, int]:
        """The prompt `text` starts with and its length in tokens; ("", 0) for none."""
        return next(((p, n) for p, n in self.prompts if text.startswith(p)), ("", 0))

    def __call__(self, texts: Sequence[str]) -> list[int]:
        """Tokens to leave out of pooling at the start of each text (0 where it carries no prompt)."""
        return [self.prompt_of(t)[1] for t in texts]


def prompt_lengths(
    layout: Layout, prompts: Mapping[str, str], tokenize: Callable[[Sequence[str]], list[list[int]]], specials: set[int]
) -> PromptLengths | None:
    """A `PromptLengths` for a folder whose pooling leaves prompts out and that has prompts; else None."""
    if layout.include_prompt or not any(prompts.values()):
        return None
    return PromptLengths(prompts, tokenize, specials)


def exclude_prompts(mask: np.ndarray, skip: Sequence[int]) -> np.ndarray:
    """A right-padded attention mask [n, seq] with the first `skip[i]` tokens of row i masked out for pooling."""
    if not any(skip):
        return mask
    mask = mask.copy()
    for row, k in enumerate(skip):
        mask[row, :k] = 0
    return mask


# -- lower-casing (`do_lower_case`) ----------------------------------------------------------------------


def lower_case(tokenizer: Any) -> None:
    """Put a Lowercase step in front of a `tokenizers.Tokenizer`'s normalizer unless it has one, exactly as
    sentence-transformers 6 does for `do_lower_case: true` (so both cut the same text into the same ids)."""
    from tokenizers.normalizers import Lowercase
    from tokenizers.normalizers import Sequence as NormalizerSequence

    normalizer = tokenizer.normalizer
    if isinstance(normalizer, Lowercase):
        return
    if isinstance(normalizer, NormalizerSequence) and any(isinstance(n, Lowercase) for n in normalizer):
        return
    steps: list[Any] = [Lowercase()]
    if isinstance(normalizer, NormalizerSequence):
        steps += list(normalizer)
    elif normalizer is not None:
        steps.append(normalizer)
    tokenizer.normalizer = NormalizerSequence(steps)


def special_ids(tokenizer: Any) -> set[int]:
    """The ids of a `tokenizers.Tokenizer`'s special tokens ([CLS], [SEP], [PAD], ...)."""
    return {int(i) for i, token in tokenizer.get_added_tokens_decoder().items() if token.special}


# -- attention that packing cannot express ---------------------------------------------------------------


def local_attention(config: Mapping[str, Any]) -> int | None:
    """The window of a model's local (sliding-window) attention layers, from its config.json; None when every
    layer attends globally. transformers builds such windows from a plain 2D mask only: a packed 4D mask
    passes through unchanged, so packed rows would attend over the whole row in those layers."""
    for key in ("local_attention", "sliding_window", "attention_window"):
        value = config.get(key)
        if isinstance(value, list):
            value = max((v for v in value if isinstance(v, int)), default=None)
        if _positive(value):
            layer_types = config.get("layer_types")
            if isinstance(layer_types, list) and not any("sliding" in str(t) or "local" in str(t) for t in layer_types):
                continue
            return _positive(value)
    return None


# -- what packing must know about a model's positions and attention ---------------------------------------


@dataclass(frozen=True, slots=True)
class PackingPlan:
    """How a model can run packed rows (gateway/runtime/packing.py), found by running it (`probe_packing`)."""

    #: The position of each input's first token: 0, or RoBERTa's / MPNet's padding index + 1. None when no
    #: offset reproduces the model's own positions (then packing is refused).
    position_offset: int | None
    #: Each token attends only to those before it (a decoder such as Qwen3): the packed mask is causal within
    #: each input, not only block-diagonal.
    causal: bool

    @property
    def refused(self) -> str:
        """Why packing cannot run, or ""."""
        if self.position_offset is None:
            return "no position offset reproduces the model's own positions"
        return ""


def probe_packing(
    forward: Callable[[list[int], list[int] | None], np.ndarray], ids: list[int], pad_id: int | None
) -> PackingPlan:
    """Run one unpadded input through `forward(ids, positions)` ([seq, dim] states; positions None: the model's
    own) to learn where its positions start and whether its attention is causal.

    Positions: RoBERTa, XLM-RoBERTa and MPNet count from the padding index + 1 (MPNet's index is 1 whatever its
    config says); a packed row passes explicit positions, which must start there. Causality: a decoder's
    earlier tokens do not change when the last one does; a bidirectional model's do.
    """
    own = forward(ids, None)
    offset = None
    candidates = [0, 2] + ([pad_id + 1] if pad_id is not None and pad_id >= 0 else [])
    for k in dict.fromkeys(candidates):
        try:
            states = forward(ids, list(range(k, k + len(ids))))
        except (IndexError, RuntimeError):  # past the position table
            continue
        if np.allclose(states, own, atol=1e-4, rtol=1e-3):
            offset = k
            break
    changed = [*ids[:-1], ids[0] if ids[-1] != ids[0] else ids[1]]
    other = forward(changed, None)
    causal = bool(np.allclose(own[:-1], other[:-1], atol=1e-5, rtol=1e-4))
    return PackingPlan(position_offset=offset, causal=causal)


# -- the bundled adversarial texts -----------------------------------------------------------------------


@cache
def adversarial_texts() -> tuple[str, ...]:
    """gateway/data/adversarial.txt: many scripts, marks, long words, hashes, URLs, emoji, odd whitespace.
    Every converter check and the parity tests run on these."""
    raw = resources.files("gateway").joinpath("data/adversarial.txt").read_text(encoding="utf-8")
    return tuple(json.loads(line) for line in raw.splitlines() if line.strip() and not line.startswith("#"))


def reranker_check_pairs() -> list[tuple[str, str]]:
    """The (query, document) pairs every reranker converter's check scores against CrossEncoder.predict: several
    scripts, and one document over a small model's limit (cut as predict cuts it)."""
    queries = ("what is the capital of france", "¿dónde está la biblioteca?", "東京")
    documents = (
        "Paris is the capital and most populous city of France.",
        "The library is next to the café.",
        "東京は日本の首都です。",
        "I love pizza 🍕🔥!",
        "The quick brown fox jumps over the lazy dog. " * 40,
    )
    return [(q, d) for q in queries for d in documents]


# -- GGUF metadata (the keys our converter adds; no gguf package in the core) -----------------------------

GGUF_PROMPTS_KEY = "sentence_transformers.prompts"
GGUF_DEFAULT_PROMPT_KEY = "sentence_transformers.default_prompt_name"
#: Dense layers the runtime does not apply itself, applied by the gateway after pooling: under this prefix,
#: `<i>.config` (JSON of DenseLayer.config) and `<i>.<tensor name>` (float32 arrays, row-major).
GGUF_DENSE_PREFIX = "sentence_transformers.dense."
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def _gguf_string(fh: BinaryIO) -> str:
    (n,) = struct.unpack("<Q", fh.read(8))
    return fh.read(n).decode("utf-8", errors="replace")


def _gguf_value(fh: BinaryIO, kind: int, keep_array: bool = False) -> Any:
    if kind == 8:
        return _gguf_string(fh)
    if kind == 9:  # arrays (the vocabulary) are skipped unless asked for: only the Dense weights are needed
        item, n = struct.unpack("<IQ", fh.read(12))
        if item in _GGUF_SCALARS:
            fmt = _GGUF_SCALARS[item]
            if keep_array:
                return np.frombuffer(fh.read(struct.calcsize(fmt) * n), dtype=np.dtype(fmt)).copy()
            fh.seek(struct.calcsize(fmt) * n, 1)
        else:
            for _ in range(n):
                _gguf_value(fh, item)
        return None
    fmt = _GGUF_SCALARS.get(kind)
    if fmt is None:
        raise ValueError(f"unknown GGUF value type {kind}")
    return struct.unpack(fmt, fh.read(struct.calcsize(fmt)))[0]


def read_gguf_metadata(path: Path, arrays_under: str | None = None) -> dict[str, Any]:
    """A GGUF file's scalar and string metadata, and the numeric arrays of keys that start with `arrays_under`
    (numpy; other arrays left out); BackendError when it is not GGUF."""
    try:
        with path.open("rb") as fh:
            if fh.read(4) != b"GGUF":
                raise BackendError(f"{path} is not a GGUF file")
            _version, _tensors, n_kv = struct.unpack("<IQQ", fh.read(20))
            meta: dict[str, Any] = {}
            for _ in range(n_kv):
                key = _gguf_string(fh)
                (kind,) = struct.unpack("<I", fh.read(4))
                value = _gguf_value(fh, kind, arrays_under is not None and key.startswith(arrays_under))
                if value is not None:
                    meta[key] = value
            return meta
    except (OSError, struct.error, ValueError) as exc:
        raise BackendError(f"cannot read the metadata of {path}: {exc}") from exc


def gguf_dense_layers(path: Path, meta: Mapping[str, Any]) -> tuple[DenseLayer, ...]:
    """The Dense layers our GGUF converter stored under GGUF_DENSE_PREFIX (read with that prefix's arrays)."""
    layers = []
    while isinstance(config := meta.get(f"{GGUF_DENSE_PREFIX}{len(layers)}.config"), str):
        prefix = f"{GGUF_DENSE_PREFIX}{len(layers)}."
        tensors = {
            k.removeprefix(prefix): v for k, v in meta.items() if k.startswith(prefix) and k != prefix + "config"
        }
        try:
            parsed = json.loads(config)
        except ValueError as exc:
            raise BackendError(f"{path}: {prefix}config is not JSON: {exc}") from exc
        layers.append(DenseLayer.from_parts(parsed, tensors, f"{path} ({prefix}*)"))
    return tuple(layers)
