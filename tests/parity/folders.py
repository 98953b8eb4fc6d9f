"""Model folders as users have them, built from the bundled all-MiniLM-L6-v2: re-saved by the locked
sentence-transformers, with prompts, with prompts left out of pooling, without Normalize, lower-cased by
sentence-transformers rather than its tokenizer, with another token limit.

Plain functions, so any test module (and the architectures zoo) can build what it needs into a session
temporary folder; each edit is what sentence-transformers itself reads, so its own `encode` on the folder
is the reference.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any


def resave(src: str | Path, dst: Path) -> Path:
    """`src` loaded and saved again by the installed sentence-transformers (its layout and config files)."""
    from sentence_transformers import SentenceTransformer

    SentenceTransformer(str(src), device="cpu").save(str(dst))
    return dst


def _edit_json(path: Path, **changes: Any) -> None:
    data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _modules(folder: Path) -> list[dict[str, Any]]:
    return json.loads((folder / "modules.json").read_text(encoding="utf-8"))


def derive(
    base: Path,
    dst: Path,
    *,
    prompts: dict[str, str] | None = None,
    default_prompt_name: str | None = None,
    include_prompt: bool | None = None,
    normalize: bool = True,
    lower_case: bool = False,
    model_max_length: int | None = None,
) -> Path:
    """A copy of the sentence-transformers folder `base` with these changes:

    - `prompts` / `default_prompt_name` in config_sentence_transformers.json;
    - `include_prompt` in the Pooling module's config;
    - `normalize=False`: the Normalize module dropped from modules.json;
    - `lower_case=True`: the tokenizer made case-sensitive and `do_lower_case: true` put in
      sentence_bert_config.json (sentence-transformers lower-cases, the tokenizer alone would not);
    - `model_max_length`: the token limit, where sentence-transformers 6 keeps it (tokenizer_config.json).
    """
    shutil.copytree(base, dst)
    if prompts is not None:
        _edit_json(dst / "config_sentence_transformers.json", prompts=prompts, default_prompt_name=default_prompt_name)
    modules = _modules(dst)
    if include_prompt is not None:
        pooling = next(m for m in modules if m["type"].endswith(".Pooling"))
        _edit_json(dst / pooling["path"] / "config.json", include_prompt=include_prompt)
    if not normalize:
        kept = [m for m in modules if not m["type"].endswith(".Normalize")]
        (dst / "modules.json").write_text(json.dumps(kept, indent=2) + "\n", encoding="utf-8")
    if lower_case:
        tokenizer = json.loads((dst / "tokenizer.json").read_text(encoding="utf-8"))
        # Accents still stripped as before: only the lower-casing moves to sentence-transformers.
        tokenizer["normalizer"].update(lowercase=False, strip_accents=True)
        (dst / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")
        # transformers 5 rebuilds a BERT normalizer from tokenizer_config.json: both files must agree.
        _edit_json(dst / "tokenizer_config.json", do_lower_case=False, strip_accents=True)
        _edit_json(dst / "sentence_bert_config.json", do_lower_case=True)
    if model_max_length is not None:
        _edit_json(dst / "tokenizer_config.json", model_max_length=model_max_length)
        _edit_json(dst / "sentence_bert_config.json", max_seq_length=None)
    return dst


#: The derived folders the parity tests serve on every backend (see `st_folders` in conftest.py).
FOLDERS: dict[str, dict[str, Any]] = {
    # As the installed sentence-transformers saves it: the limit only in tokenizer_config.json.
    "resaved": {},
    # A default prompt (E5/BGE style), pooled with the text.
    "prompted": {"prompts": {"query": "query: ", "passage": "passage: "}, "default_prompt_name": "query"},
    # The same prompts left out of pooling (INSTRUCTOR/GRIT style).
    "prompt-excluded": {
        "prompts": {"query": "Represent this sentence for searching: ", "passage": ""},
        "default_prompt_name": "query",
        "include_prompt": False,
    },
    # No Normalize module, lower-cased by sentence-transformers, and a limit that is no multiple of 16.
    "raw-lower-100": {"normalize": False, "lower_case": True, "model_max_length": 100},
}


def build_all(src: str | Path, root: Path) -> dict[str, Path]:
    """Every folder of FOLDERS under `root` (the re-saved one is the base of the others)."""
    base = resave(src, root / "resaved")
    out = {"resaved": base}
    for name, changes in FOLDERS.items():
        if changes:
            out[name] = derive(base, root / name, **changes)
    return out
