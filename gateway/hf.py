"""Hugging Face / sentence-transformers model folders, read the same way by every plugin and converter.

A sentence-transformers folder is a transformer (config.json, weights, tokenizer) plus `modules.json`,
which lists what runs after it: pooling (`1_Pooling/config.json`), usually Normalize, sometimes Dense
layers. This module reads that layout, names pooling modes with one vocabulary, and pools and normalizes
token states as sentence-transformers does, so that every runtime serves the same vectors.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

from .backend import BackendError

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
    #: The input length sentence-transformers caps inputs at (sentence_bert_config.json), if given.
    max_seq_length: int | None = None
    #: Module types after pooling other than Normalize (Dense, LayerNorm, custom code): a runtime that cannot
    #: run them must refuse the model rather than serve different vectors.
    unsupported: tuple[str, ...] = ()
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
    normalize = False
    unsupported: list[str] = []
    for module in modules:
        kind = str(module.get("type", ""))
        sub = inside(root, str(module.get("path", "")), str(modules_file))
        if kind.endswith(".Transformer"):
            transformer_dir = sub
        elif kind.endswith(".Normalize"):
            normalize = True
        elif kind.endswith(".Pooling"):
            pooling = _pooling(sub / "config.json")
        else:
            unsupported.append(kind or repr(module))
    return Layout(
        root=root,
        transformer_dir=transformer_dir,
        pooling=pooling,
        normalize=normalize,
        max_seq_length=_max_seq_length(root, transformer_dir),
        unsupported=tuple(unsupported),
        is_sentence_transformers=True,
    )


def _pooling(config_file: Path) -> Pooling:
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
    return names[0]


def _max_seq_length(*folders: Path) -> int | None:
    for folder in dict.fromkeys(folders):
        config = folder / "sentence_bert_config.json"
        if config.is_file():
            value = read_json(config).get("max_seq_length")
            if isinstance(value, int) and value > 0:
                return value
    return None


def max_input_tokens(layout: Layout) -> int:
    """The input limit sentence-transformers applies: max_seq_length, else the position table's size."""
    if layout.max_seq_length:
        return layout.max_seq_length
    config = layout.transformer_dir / "config.json"
    if config.is_file():
        value = read_json(config).get("max_position_embeddings")
        if isinstance(value, int) and value > 0:
            return value
    log.warning("%s: no sentence_bert_config.json or config.json; assuming 512 input tokens", layout.root)
    return 512


def pool(hidden: np.ndarray, mask: np.ndarray, mode: Pooling) -> np.ndarray:
    """[n, seq, dim] token states of right-padded inputs -> [n, dim], ignoring the padding."""
    if mode == "cls":
        return hidden[:, 0]
    if mode == "last":
        last = mask.sum(axis=1).astype(np.int64) - 1
        return hidden[np.arange(hidden.shape[0]), last]
    m = mask[:, :, None].astype(hidden.dtype)
    if mode == "max":
        return np.where(m > 0, hidden, -np.inf).max(axis=1).astype(hidden.dtype)
    return (hidden * m).sum(axis=1) / np.clip(m.sum(axis=1), 1e-9, None)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (the epsilon torch's normalize uses, as sentence-transformers' Normalize)."""
    return x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)


def read_prompts(folder: Path) -> tuple[dict[str, str], str | None]:
    """Named prompts and the default prompt's name from a model folder's config_sentence_transformers.json
    (empty when the folder has none, as sentence-transformers reads it); BackendError when they are malformed."""
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
