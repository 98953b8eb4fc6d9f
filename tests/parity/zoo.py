"""A zoo of tiny random-weight embedding models, one per architecture people serve, built offline.

Each is a `transformers` config with two small layers and random weights (seeded), a tokenizer of the family's
kind trained by `tokenizers` on the bundled texts (once: committed in tests/parity/vocabs/, so every run builds
the same models; `python -m tests.parity.zoo --train` after the texts change) and then rebuilt by the family's
own tokenizer class (so its tokenizer.json is exactly what transformers runs), saved by sentence-transformers
with the pooling, normalization and prompts that the real family uses. The weights do not matter for correctness between
runtimes: the same weights must give the same vectors on every backend.

Plain functions, so tests (and a person at a shell) can build any of them into a folder of their own.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

#: The token limit of every zoo model (sentence-transformers' max_seq_length): small, so the tests can reach it.
LIMIT = 128
HIDDEN = 32
# Random weights with transformers' default initializer (0.02) give nearly equal vectors for any text; a
# larger one spreads them so that a wrong position or mask shows (shared/FACTS.md).
INIT = 0.3
VOCAB = 600
_ROOT = Path(__file__).resolve().parents[2]


@cache
def corpus() -> tuple[str, ...]:
    """The bundled English sentences and the adversarial texts (many scripts), to train tokenizers on."""
    from gateway.runtime import hf

    lines = (_ROOT / "bench" / "corpus.txt").read_text(encoding="utf-8").splitlines()
    return (*lines, *hf.adversarial_texts())


#: The trained tokenizer models, committed: the WordPiece and Unigram trainers break ties in a per-process order
#: (measured: two WordPiece and many Unigram outcomes over six runs), which made every run's zoo other models.
VOCABS = Path(__file__).resolve().parent / "vocabs"
_training = False


def _digest(model: Any, trainer: Any, normalizer: Any, pre_tokenizer: Any) -> str:
    """What a trained vocabulary depends on: the corpus and the settings (the trainer's own repr is not stable)."""
    specials = [t.content for t in trainer.special_tokens]
    settings = f"{model!r} {normalizer!r} {pre_tokenizer!r} vocab_size={trainer.vocab_size} specials={specials}"
    return hashlib.sha256("\n".join((settings, *corpus())).encode()).hexdigest()


def _trained(name: str, model: Any, trainer: Any, normalizer: Any = None, pre_tokenizer: Any = None) -> dict[str, Any]:
    """The `tokenizers` model trained on the corpus, as its JSON (vocab, merges): read from `VOCABS/name.json`,
    or trained afresh and written there while `train_vocabs` runs (`python -m tests.parity.zoo --train`)."""
    stored = VOCABS / f"{name}.json"
    digest = _digest(model, trainer, normalizer, pre_tokenizer)
    if not _training:
        saved = json.loads(stored.read_text(encoding="utf-8")) if stored.exists() else {}
        if saved.get("sha256") != digest:
            raise RuntimeError(
                f"{stored} is missing or was trained on other texts or settings (bench/corpus.txt, "
                "hf.adversarial_texts or the zoo changed): run `python -m tests.parity.zoo --train` and commit "
                "tests/parity/vocabs/"
            )
        return saved["model"]  # type: ignore[no-any-return]
    from tokenizers import Tokenizer

    tok = Tokenizer(model)
    if normalizer is not None:
        tok.normalizer = normalizer
    if pre_tokenizer is not None:
        tok.pre_tokenizer = pre_tokenizer
    tok.train_from_iterator(corpus(), trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = model["vocab"]
    if isinstance(vocab, dict):
        # The trainer hands out ids in a hash map's order: specials keep their ids; the rest are sorted.
        k = len(trainer.special_tokens)
        specials = sorted((t for t in vocab if vocab[t] < k), key=vocab.__getitem__)
        model["vocab"] = {t: i for i, t in enumerate(specials + sorted(t for t in vocab if vocab[t] >= k))}
    VOCABS.mkdir(exist_ok=True)
    record = {"sha256": digest, "model": model}
    stored.write_text(json.dumps(record, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    return model


def wordpiece_vocab(name: str, specials: list[str], unk: str) -> dict[str, int]:
    """A WordPiece vocabulary (BERT's normalizer and pre-tokenizer), specials first."""
    from tokenizers import models, normalizers, pre_tokenizers, trainers

    trainer = trainers.WordPieceTrainer(vocab_size=VOCAB, special_tokens=specials)
    model = _trained(
        name,
        models.WordPiece(unk_token=unk),
        trainer,
        normalizers.BertNormalizer(lowercase=True),
        pre_tokenizers.BertPreTokenizer(),
    )
    return dict(model["vocab"])


def bpe_model(name: str, specials: list[str], *, byte_level: bool) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges of a BPE: byte-level (GPT-2 / Qwen / ModernBERT) or SentencePiece-style over
    U+2581-marked words with byte fallback (Gemma)."""
    from tokenizers import models, normalizers, pre_tokenizers, trainers

    if byte_level:
        trainer = trainers.BpeTrainer(
            vocab_size=VOCAB, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
        model = _trained(name, models.BPE(), trainer, pre_tokenizer=pre_tokenizers.ByteLevel(add_prefix_space=False))
    else:
        # Gemma spells bytes it has no piece for as <0xNN>: those pieces must be in the vocabulary.
        trainer = trainers.BpeTrainer(
            vocab_size=VOCAB + 256, special_tokens=[*specials, *(f"<0x{b:02X}>" for b in range(256))]
        )
        model = _trained(
            name,
            models.BPE(unk_token="<unk>", byte_fallback=True),
            trainer,
            normalizers.Replace(" ", "\u2581"),
            pre_tokenizers.Split(" ", behavior="merged_with_previous"),
        )
    merges = [tuple(m.split(" ")) if isinstance(m, str) else (m[0], m[1]) for m in model["merges"]]
    return dict(model["vocab"]), merges


def unigram_vocab(name: str, specials: list[str]) -> list[tuple[str, float]]:
    """A SentencePiece Unigram vocabulary with scores (XLM-RoBERTa's kind), specials first."""
    from tokenizers import models, pre_tokenizers, trainers

    trainer = trainers.UnigramTrainer(vocab_size=VOCAB, special_tokens=specials, unk_token="<unk>")
    model = _trained(name, models.Unigram(), trainer, pre_tokenizer=pre_tokenizers.Metaspace())
    return [(str(piece), float(score)) for piece, score in model["vocab"]]


# -- the families ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """One architecture of the zoo, and how its real models are saved."""

    name: str
    #: What real models it stands for.
    stands_for: str
    pooling: str
    #: (config, tokenizer) built from scratch; the tokenizer is a transformers tokenizer object.
    build: Callable[[], tuple[Any, Any]]
    prompts: dict[str, str] = field(default_factory=dict)
    #: The prompt the tests ask for by name (an instruction or "query: " prefix).
    query_prompt: str | None = None
    #: Dense projections after pooling (EmbeddingGemma's 2): (in, out) per layer.
    dense: tuple[tuple[int, int], ...] = ()


def _bert() -> tuple[Any, Any]:
    from transformers import BertConfig, BertTokenizer

    vocab = wordpiece_vocab("bert", ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], "[UNK]")
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * HIDDEN,
        max_position_embeddings=LIMIT,
        initializer_range=INIT,
    )
    return config, BertTokenizer(vocab=vocab)


def _mpnet() -> tuple[Any, Any]:
    from transformers import MPNetConfig, MPNetTokenizer

    # As all-mpnet-base-v2: <pad> at 1 (MPNet's embeddings take 1 as the padding index whatever the config says).
    vocab = wordpiece_vocab("mpnet", ["<s>", "<pad>", "</s>", "[UNK]", "<mask>"], "[UNK]")
    config = MPNetConfig(
        vocab_size=len(vocab),
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * HIDDEN,
        # Positions count from the padding id + 1, as RoBERTa's.
        max_position_embeddings=LIMIT + vocab["<pad>"] + 1,
        pad_token_id=vocab["<pad>"],
        bos_token_id=vocab["<s>"],
        eos_token_id=vocab["</s>"],
        initializer_range=INIT,
    )
    return config, MPNetTokenizer(vocab=vocab)


def _xlm_roberta() -> tuple[Any, Any]:
    from transformers import XLMRobertaConfig, XLMRobertaTokenizer

    # XLMRobertaTokenizer wants <unk> at id 3.
    vocab = unigram_vocab("xlm-roberta", ["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    config = XLMRobertaConfig(
        vocab_size=len(vocab),
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * HIDDEN,
        max_position_embeddings=LIMIT + 2,
        type_vocab_size=1,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        initializer_range=INIT,
    )
    return config, XLMRobertaTokenizer(vocab=vocab)


def _modernbert() -> tuple[Any, Any]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import ModernBertConfig, PreTrainedTokenizerFast

    specials = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]", "<|endoftext|>"]
    vocab, merges = bpe_model("modernbert", specials, byte_level=True)
    # ModernBERT ships a plain tokenizer.json (OLMo's byte-level BPE with BERT's specials around it).
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        mask_token="[MASK]",
    )
    config = ModernBertConfig(
        vocab_size=len(vocab),
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=LIMIT,
        # A window shorter than the limit, so local attention matters on long inputs (real: 128 of 8192).
        local_attention=32,
        global_attn_every_n_layers=2,
        pad_token_id=vocab["[PAD]"],
        cls_token_id=vocab["[CLS]"],
        sep_token_id=vocab["[SEP]"],
        bos_token_id=vocab["[CLS]"],
        eos_token_id=vocab["[SEP]"],
        initializer_range=INIT,
    )
    return config, tokenizer


def _qwen3() -> tuple[Any, Any]:
    from tokenizers import processors
    from transformers import Qwen2Tokenizer, Qwen3Config

    vocab, merges = bpe_model("qwen3", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], byte_level=True)
    # Qwen3-Embedding pads on the left and ends every input with <|endoftext|>, the token it pools.
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, padding_side="left")
    eos = vocab["<|endoftext|>"]
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single="$A <|endoftext|>", pair="$A <|endoftext|> $B <|endoftext|>", special_tokens=[("<|endoftext|>", eos)]
    )
    config = Qwen3Config(
        vocab_size=len(vocab),
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=LIMIT,
        pad_token_id=eos,
        eos_token_id=eos,
        bos_token_id=eos,
        tie_word_embeddings=True,
        initializer_range=INIT,
    )
    return config, tokenizer


def _gemma3() -> tuple[Any, Any]:
    from transformers import Gemma3TextConfig, GemmaTokenizer

    vocab, merges = bpe_model("gemma3", ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"], byte_level=False)
    # EmbeddingGemma wraps each input in <bos> ... <eos>.
    tokenizer = GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=True)
    config = Gemma3TextConfig(
        vocab_size=len(vocab),
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=LIMIT,
        # EmbeddingGemma: bidirectional attention, sliding-window layers beside global ones.
        use_bidirectional_attention=True,
        sliding_window=32,
        layer_types=["sliding_attention", "full_attention"],
        query_pre_attn_scalar=16,
        pad_token_id=vocab["<pad>"],
        eos_token_id=vocab["<eos>"],
        bos_token_id=vocab["<bos>"],
        initializer_range=INIT,
    )
    return config, tokenizer


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "bert-cls",
            "bge-small/base/large-en-v1.5 (BERT, WordPiece, CLS pooling)",
            "cls",
            _bert,
            prompts={"query": "Represent this sentence for searching relevant passages: ", "passage": ""},
            query_prompt="query",
        ),
        Family("mpnet", "all-mpnet-base-v2 (MPNet, relative attention bias)", "mean", _mpnet),
        Family(
            "xlm-roberta",
            "bge-m3, multilingual-e5 (XLM-RoBERTa, SentencePiece Unigram, positions after the padding id)",
            "mean",
            _xlm_roberta,
            prompts={"query": "query: ", "passage": "passage: "},
            query_prompt="query",
        ),
        Family(
            "modernbert",
            "gte-modernbert, nomic-embed-text-v1.5-style (ModernBERT: rotary, local/global attention, byte BPE)",
            "mean",
            _modernbert,
            prompts={"query": "search_query: ", "document": "search_document: "},
            query_prompt="query",
        ),
        Family(
            "qwen3",
            "Qwen3-Embedding (decoder: causal attention, last-token pooling, left padding, instructions)",
            "lasttoken",
            _qwen3,
            prompts={
                "query": "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:",
                "document": "",
            },
            query_prompt="query",
        ),
        Family(
            "gemma3",
            "EmbeddingGemma (Gemma 3, bidirectional, sliding window, SentencePiece BPE, Dense projections)",
            "mean",
            _gemma3,
            prompts={"query": "task: search result | query: ", "document": "title: none | text: "},
            query_prompt="query",
            dense=((HIDDEN, 2 * HIDDEN), (2 * HIDDEN, HIDDEN)),
        ),
    )
}


def build(
    name: str,
    dst: Path,
    *,
    seed: int = 0,
    dense: tuple[tuple[int, int, bool, str], ...] | None = None,
    **config_changes: Any,
) -> Path:
    """The family `name` as a sentence-transformers folder at `dst` (its raw transformer beside it), with
    `config_changes` made to its transformers config (a broken folder on purpose, say), and `dense` (in, out,
    bias, torch.nn activation class name) instead of the family's Dense modules."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer
    from transformers import AutoModel

    family = FAMILIES[name]
    config, tokenizer = family.build()
    for key, value in config_changes.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    raw = dst.with_name(dst.name + "-hf")
    AutoModel.from_config(config).eval().save_pretrained(str(raw))
    tokenizer.model_max_length = LIMIT
    tokenizer.save_pretrained(str(raw))
    modules: list[Any] = [Transformer(str(raw), max_seq_length=LIMIT)]
    modules.append(Pooling(HIDDEN, pooling_mode=family.pooling))
    layers = dense if dense is not None else tuple((n_in, n_out, False, "Identity") for n_in, n_out in family.dense)
    for n_in, n_out, bias, activation in layers:
        modules.append(Dense(n_in, n_out, bias=bias, activation_function=getattr(torch.nn, activation)()))
    modules.append(Normalize())
    st = SentenceTransformer(modules=modules, device="cpu", prompts=family.prompts or None)
    st.save(str(dst))
    return dst


def build_zoo(root: Path, names: list[str] | None = None) -> dict[str, Path]:
    """Every family (or those named) under `root`, one folder each."""
    return {name: build(name, root / name) for name in names or FAMILIES}


def position_texts() -> Iterator[str]:
    """Texts that stress positions: one token to past the limit (truncated), in a mixed order."""
    words = [w for line in corpus()[:60] for w in line.split()]
    for n in (1, 3, 180, 2, 40, 7, 90, 15, 64, 5, 120, 30):
        yield " ".join(words[:n]) if n > 1 else "a"


#: What a backend refuses, and the words its refusal must carry (the test cells and the README's table).
REFUSED: dict[tuple[str, str], str] = {
    ("mpnet", "gguf"): "llama.cpp has no MPNet graph",
}


def convert(converter: Any, src: Path, out: Path, *args: str) -> None:
    """`gateway convert SRC --to X --out OUT ARGS` through the converter's own argument parser."""
    import argparse

    parser = argparse.ArgumentParser()
    converter.add_arguments(parser)
    converter.convert(str(src), str(out), parser.parse_args(list(args)))


def convert_zoo(folders: dict[str, Path], root: Path) -> dict[str, dict[str, Path]]:
    """{cell: {family: path}}: torch serves the folders; onnx (fp32, int8) and gguf (f16, q8_0) are converted
    by `gateway convert` wherever the family is not refused."""
    from gateway_gguf import GgufConverter
    from gateway_onnx import OnnxConverter

    out: dict[str, dict[str, Path]] = {"torch": dict(folders), "onnx": {}, "onnx-int8": {}, "gguf": {}, "gguf-q8_0": {}}
    for family, folder in folders.items():
        if (family, "onnx") not in REFUSED:
            convert(OnnxConverter(), folder, root / f"{family}-onnx")
            out["onnx"][family] = root / f"{family}-onnx"
            convert(OnnxConverter(), folder, root / f"{family}-onnx-int8", "--quantize", "int8")
            out["onnx-int8"][family] = root / f"{family}-onnx-int8"
        if (family, "gguf") not in REFUSED:
            for kind, cell in (("f16", "gguf"), ("q8_0", "gguf-q8_0")):
                convert(GgufConverter(), folder, root / f"{family}-{kind}.gguf", "--type", kind)
                out[cell][family] = root / f"{family}-{kind}.gguf"
    return out


def build_cross_encoder(dst: Path, *, seed: int = 0, num_labels: int = 1, arch: str = "bert") -> Path:
    """A tiny random-weight reranker (a sequence-classification head with `num_labels`) saved by
    sentence-transformers as a CrossEncoder folder at `dst`: BERT with WordPiece, or `arch="xlm-roberta"` (its
    head: classifier.dense, tanh, classifier.out_proj; a SentencePiece tokenizer)."""
    import torch
    from sentence_transformers import CrossEncoder
    from transformers import BertForSequenceClassification, XLMRobertaForSequenceClassification

    config, tokenizer = _xlm_roberta() if arch == "xlm-roberta" else _bert()
    head = XLMRobertaForSequenceClassification if arch == "xlm-roberta" else BertForSequenceClassification
    config.num_labels = num_labels
    torch.manual_seed(seed)
    raw = dst.with_name(dst.name + "-hf")
    head(config).eval().save_pretrained(str(raw))
    tokenizer.model_max_length = LIMIT
    tokenizer.save_pretrained(str(raw))
    CrossEncoder(str(raw), device="cpu").save(str(dst))
    return dst


def train_vocabs() -> None:
    """Train every family's tokenizer on the corpus again and write it to `VOCABS` (after the corpus changed)."""
    global _training
    _training = True
    try:
        for family in FAMILIES.values():
            family.build()
    finally:
        _training = False


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", action="store_true", help="train the tokenizers again into tests/parity/vocabs/")
    if parser.parse_args().train:
        train_vocabs()
