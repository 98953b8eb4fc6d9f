"""The tokenizer's vocabulary in the spelling llama.cpp reads: WordPiece as `bert`, SentencePiece Unigram as
`t5`, byte-level BPE as `gpt2` and SentencePiece-style BPE as `llama`; a module of its own because each
tokenizer kind has its own rules for token types, special ids and padding rows."""

from __future__ import annotations

from typing import Any

from gateway.plugin import BackendError
from gateway.runtime import hf

from .source import Source

WORD_START = "\u2581"  # llama.cpp's "phantom space" before a word's first piece


def add_vocabulary(writer: Any, source: Source, n_rows: int, gguf: Any) -> None:
    """The vocabulary of `source`'s tokenizer, for an embedding matrix of `n_rows` rows."""
    kind = source.tokenizer_json()["model"].get("type") if source.model_type != "bert" else "WordPiece"
    if kind == "WordPiece":
        _add_wordpiece(writer, source, n_rows, gguf)
    elif kind == "Unigram":
        _add_unigram(writer, source, n_rows, gguf)
    elif kind == "BPE" and source.tokenizer_json()["model"].get("byte_fallback"):
        _add_spm_bpe(writer, source, n_rows, gguf)
    elif kind == "BPE":
        _add_bpe(writer, source, n_rows, gguf)
    else:
        raise BackendError(f"{source.model_dir}: tokenizer model {kind!r} is not supported")


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


def _add_wordpiece(writer: Any, source: Source, n_rows: int, gguf: Any) -> None:
    """A WordPiece vocabulary as llama.cpp's `bert` tokenizer, with its special ids and normalizer settings."""
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


def _add_unigram(writer: Any, source: Source, n_rows: int, gguf: Any) -> None:
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


def _add_bpe(writer: Any, source: Source, n_rows: int, gguf: Any) -> None:
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


def _add_spm_bpe(writer: Any, source: Source, n_rows: int, gguf: Any) -> None:
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
