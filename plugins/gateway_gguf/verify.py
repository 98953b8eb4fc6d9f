"""After writing: the GGUF's token ids and vectors checked against the source folder's own tokenizer and
sentence-transformers, a module of its own because it runs both runtimes, where the writing needs neither."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from gateway.plugin import BackendError
from gateway.runtime import hf

from .source import Source

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


def verify(source: Source, path: Path, qtype: str, say: Callable[[str], None]) -> None:
    """Token ids, then vectors, on the bundled adversarial texts, starting from text.

    llama.cpp's WordPiece is compared with tokenizer.json for the record: where they differ (Hangul,
    Indic marks, words over 100 characters) the backend does not use it, it tokenizes with the
    tokenizer.json the GGUF carries. The vectors must match sentence-transformers' own encode of the
    source folder (when sentence-transformers is installed), or the conversion fails.
    """
    try:
        import llama_cpp  # noqa: F401 - only probing that the runtime is installed
    except ImportError:
        say("llama-cpp-python missing: skipped the token-id and vector checks")
        return
    hf_tok = source.hf_tokenizer()
    if hf_tok is None:
        say("no tokenizer.json: skipped the token-id check; llama.cpp's own tokenizer will serve")
        return
    from . import _llama

    texts = [*VERIFY_TEXTS, *hf.adversarial_texts()]
    model = _llama.load_model(path, vocab_only=True)
    try:
        vocab = _llama.lib().llama_model_get_vocab(model)
        differ = [t for t in texts if _llama.tokenize(vocab, t) != hf_tok.encode(t).ids]
    finally:
        _llama.lib().llama_model_free(model)
    say(
        f"llama.cpp's tokenizer matches tokenizer.json on {len(texts) - len(differ)} of {len(texts)} texts; "
        "the GGUF carries tokenizer.json, which the gguf backend uses"
    )
    if source.task == "rerank":
        _check_scores(source, path, qtype, say)
    else:
        _check_vectors(source, path, list(hf.adversarial_texts()), qtype, say)


def _check_vectors(source: Source, path: Path, texts: list[str], qtype: str, say: Callable[[str], None]) -> None:
    """The GGUF's vectors against sentence-transformers' on `texts`; BackendError below the qtype's floor."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        say("sentence-transformers missing: skipped the vector check")
        return
    from .backend import GgufBackend, GgufOptions

    if not source.layout.is_sentence_transformers:
        say("not a sentence-transformers folder: skipped the vector check")
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
    say(f"vectors vs sentence-transformers on {len(texts)} adversarial texts: min cosine {cos[worst]:.5f}")
    floor = 0.999 if qtype == "f16" else 0.99
    if cos[worst] < floor:
        raise BackendError(
            f"the GGUF's vectors disagree with sentence-transformers on {texts[worst]!r}: "
            f"cosine {cos[worst]:.4f} < {floor}"
        )


#: Worst |logit difference| against CrossEncoder.predict a converted reranker may show, f16 and q8_0: about 3x
#: what tests/plugins/test_gguf_rerank.py's tiny cross-encoders show (f16 up to 0.006, q8_0 up to 0.12 on these
#: pairs), well under what a wrong head or lost token types cost there (0.95 and 2.8).
SCORE_TOLERANCE = {"f16": 0.02, "q8_0": 0.5}


def _check_scores(source: Source, path: Path, qtype: str, say: Callable[[str], None]) -> None:
    """The GGUF's rank scores against the source's `CrossEncoder.predict` logits on the same pairs; BackendError
    past the type's tolerance."""
    try:
        import torch
        from sentence_transformers import CrossEncoder
    except ImportError:
        say("sentence-transformers missing: skipped the score check")
        return
    from .backend import GgufBackend, GgufOptions

    pairs = hf.reranker_check_pairs()
    backend = GgufBackend(model="convert-check", path=str(path), options=GgufOptions(n_threads=1))
    backend.task = "rerank"
    try:
        backend.load()
        got = backend.score(pairs, backend.tokenize_pairs(pairs))
    finally:
        backend.close()
    cross = CrossEncoder(str(source.root), device="cpu", local_files_only=True)
    want = np.asarray(cross.predict(pairs, activation_fn=torch.nn.Identity(), show_progress_bar=False))
    worst = float(np.max(np.abs(got - want)))
    say(f"scores vs the source's CrossEncoder.predict on {len(pairs)} pairs: max |logit diff| {worst:.2e}")
    if worst > SCORE_TOLERANCE[qtype]:
        raise BackendError(f"the GGUF reranker disagrees with the source: max |logit diff| {worst:.2e}")
