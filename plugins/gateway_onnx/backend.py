"""onnxruntime backend for BERT-family encoders exported by `gateway convert --to onnx` (or any ONNX file
whose inputs are input_ids / attention_mask [/ token_type_ids] and whose output is per-token states).

onnxruntime, tokenizers and friends are imported inside methods: the core imports every plugin at start,
and a plugin nobody configured must not cost a second of import time or fail for a missing extra.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import msgspec
import numpy as np

from gateway.plugin import Backend, BackendError, ModelInfo, TokenSpan, tokenizer_spans
from gateway.runtime import hf, packing

from .rerank import OnnxScoring
from .session import SEGMENT_MASK, SEGMENT_MASK_KEY, model_files, open_session, read_graph

if TYPE_CHECKING:
    import onnxruntime
    import tokenizers

log = logging.getLogger("gateway.onnx")

_GRAPH_LEVELS = ("disable", "basic", "extended", "all")
# Rows per onnxruntime call when `embed` gets more inputs than a core batch (benchmarks, direct use):
# sorting by length and running in slices keeps padding low without huge activations.
_SLICE = 64
# The segment-mask marks live with the graph reading (session.py); still importable from here, as before.
__all__ = ["SEGMENT_MASK", "SEGMENT_MASK_KEY", "OnnxBackend", "OnnxOptions"]


class OnnxOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """`[models.X.options]` for `backend = "onnx"`."""

    # None: onnxruntime's default (one thread per physical core).
    intra_op_threads: Annotated[int, msgspec.Meta(ge=1)] | None = None
    # onnxruntime's workers busy-wait between runs (its default): lower latency for a lone client, a little
    # less throughput under load (bench/README.md, "onnx"). Off suits a machine shared with busy processes.
    allow_spinning: bool = True
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    providers: list[str] = msgspec.field(default_factory=lambda: ["CPUExecutionProvider"])
    # The ONNX file inside the model folder (an int8 conversion is its own folder with its own model.onnx).
    file: str = "model.onnx"
    # None: from 1_Pooling/config.json when the folder is a sentence-transformers model, else mean.
    pooling: hf.Pooling | None = None
    # None: True exactly when modules.json lists a Normalize module.
    normalize: bool | None = None
    # With a graph from `gateway convert` (it takes position_ids): inputs share rows of this many tokens
    # with no padding (gateway/runtime/packing.py); 0 pads each batch to its longest input instead.
    pack_tokens: Annotated[int, msgspec.Meta(ge=0, le=65_536)] = 64
    # Batches run at once (sessions are safe to run from several threads); with intra_op_threads unset,
    # each gets an equal share of the cores. Two single-threaded batches beat one batch over 2 threads once
    # anything else wants a core (bench/README.md, "parallel_batches"); it costs latency when a batch runs
    # alone.
    parallel_batches: Annotated[int, msgspec.Meta(ge=1, le=64)] = 1


class OnnxBackend(OnnxScoring, Backend):
    name: ClassVar[str] = "onnx"
    Options: ClassVar[type[msgspec.Struct]] = OnnxOptions

    @classmethod
    def within_cores(cls, options: Any, cores: int) -> Any:
        # Unset, each of the parallel batches takes an equal share of every core: here, of `cores`.
        if options.intra_op_threads is not None:
            return options
        return msgspec.structs.replace(options, intra_op_threads=max(1, cores // options.parallel_batches))

    _session: onnxruntime.InferenceSession
    _count_tok: tokenizers.Tokenizer
    _embed_tok: tokenizers.Tokenizer

    def __init__(self, *, model: str, path: str, options: Any = None, trust_remote_code: bool = False) -> None:
        super().__init__(model=model, path=path, options=options or OnnxOptions(), trust_remote_code=trust_remote_code)
        self._input_names: list[str] = []
        self._int32_inputs: set[str] = set()
        self._output_index = 0
        self._pooled_output = False
        self._packed = False
        self._use_ids = False
        self._pooling: hf.Pooling = "mean"
        self._normalize = False
        self._pad_id = 0
        self._max_tokens = 0
        self._dimension = 0
        # Leading tokens of each input left out of pooling (a prompt under `include_prompt: false`).
        self._prompt_lengths: hf.PromptLengths | None = None
        # The folder's Dense modules, applied after pooling (EmbeddingGemma's projections).
        self._dense: tuple[hf.DenseLayer, ...] = ()

    # -- loading ------------------------------------------------------------------------------------
    def load(self) -> ModelInfo:
        import onnxruntime  # noqa: F401 - a missing extra is reported before anything about the folder

        model_dir, onnx_file = model_files(self.path, self.options.file)
        if self.task == "rerank":
            self._max_tokens = hf.max_input_tokens(hf.read_layout(model_dir))
            self._count_tok, self._embed_tok, self._pad_id = _tokenizers(model_dir, onnx_file, False, self._max_tokens)
            return self._load_reranker(model_dir, onnx_file)
        self._read_folder(model_dir, onnx_file)
        self._open_session(onnx_file)
        try:
            probe = self.embed(["warm up"], self.tokenize(["warm up"]))
        except BackendError:
            raise
        except Exception as exc:
            raise BackendError(f"ONNX model {onnx_file} failed a test inference: {exc}") from exc
        self._dimension = int(probe.shape[1])
        log.info(
            "loaded %s (%s, pooling=%s, normalize=%s, max %d tokens, providers %s)",
            onnx_file,
            self._dimension,
            self._pooling,
            self._normalize,
            self._max_tokens,
            self._session.get_providers(),
        )
        return ModelInfo(
            dimension=self._dimension,
            max_input_tokens=self._max_tokens,
            normalized=self._normalize,
            concurrent_batches=self.options.parallel_batches,
            pads_to_longest=not self._packed,
            # The per-call cost in tokens of compute: bench/README.md, "onnx".
            call_overhead_tokens=24,
            local_tokenizer=True,
            embeds_token_ids=self._use_ids,
        )

    def _read_folder(self, model_dir: Path, onnx_file: Path) -> None:
        """What the folder says beside the graph: its modules (pooling, Dense, Normalize), limit and tokenizer."""
        opts: OnnxOptions = self.options
        layout = hf.read_layout(model_dir)
        if layout.unsupported:
            # LayerNorm, custom modules: serving without them would return other vectors, silently.
            raise BackendError(f"{model_dir}: module {layout.unsupported[0]!r} is not supported by the onnx backend")
        self._dense = hf.dense_layers(layout, self.trust_remote_code)
        self._pooling = opts.pooling or layout.pooling or "mean"
        self._normalize = layout.normalize if opts.normalize is None else opts.normalize
        self._max_tokens = hf.max_input_tokens(layout)
        self._load_tokenizer(model_dir, onnx_file, layout)

    def _open_session(self, onnx_file: Path) -> None:
        """The onnxruntime session, and how each batch feeds it and reads it (session.py)."""
        self._session = open_session(onnx_file, self.options)
        graph = read_graph(self._session, onnx_file)
        self._input_names, self._int32_inputs = graph.input_names, graph.int32_inputs
        self._output_index, self._pooled_output = graph.output_index, graph.pooled_output
        # Packed only where our converter marked the graph as reading attention_mask as segment ids: a foreign
        # graph with position_ids (optimum's, say) would let the inputs sharing a row attend to each other.
        self._packed = graph.segment_mask and "position_ids" in self._input_names and self.options.pack_tokens > 0
        # Both paths run on ids alone (a single text's token types are all 0), so the ids counted on arrival
        # are reused in the batch, and the core can cut over-long inputs for requests that ask it to.
        self._use_ids = not self._pooled_output

    def load_tokenizer(self) -> bool:
        """The tokenizer alone, from the model folder's tokenizer.json (no session, no weights)."""
        model_dir, onnx_file = model_files(self.path, self.options.file)
        layout = hf.read_layout(model_dir)
        self._max_tokens = hf.max_input_tokens(layout)
        self._load_tokenizer(model_dir, onnx_file, layout)
        return True

    def _load_tokenizer(self, model_dir: Path, onnx_file: Path, layout: hf.Layout) -> None:
        self._count_tok, self._embed_tok, self._pad_id = _tokenizers(
            model_dir, onnx_file, layout.do_lower_case, self._max_tokens
        )
        prompts, _ = hf.read_prompts(model_dir)
        self._prompt_lengths = hf.prompt_lengths(layout, prompts, self.tokenize, hf.special_ids(self._count_tok))

    # -- serving ------------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        if len(texts) == 1:
            # On this thread: encode_batch hands even one text to the tokenizers' thread pool, whose threads
            # then wait for a core beside the runtime's (bench/README.md, "Tokenizing one text").
            return [self._count_tok.encode(texts[0]).ids]
        return [e.ids for e in self._count_tok.encode_batch(list(texts))]

    def token_spans(self, texts: Sequence[str], add_special_tokens: bool) -> list[list[TokenSpan]]:
        return tokenizer_spans(self._count_tok, texts, add_special_tokens)

    def _feed(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        feed = {
            name: arrays[name].astype(np.int32) if name in self._int32_inputs else arrays[name]
            for name in self._input_names
        }
        return np.asarray(self._session.run(None, feed)[self._output_index], dtype=np.float32)

    def _run_packed(self, token_ids: Sequence[Sequence[int]], skip: Sequence[int] | None) -> np.ndarray:
        batch = packing.pack(token_ids, self.options.pack_tokens, self._pad_id)
        hidden = self._feed(
            {
                "input_ids": batch.input_ids,
                "attention_mask": batch.segments,
                "position_ids": batch.position_ids,
                "token_type_ids": np.zeros_like(batch.input_ids),
            }
        )
        return hf.apply_dense(packing.pool(hidden, batch.spans, self._pooling, skip), self._dense)

    def _run(self, encodings: Sequence[Sequence[int]], skip: Sequence[int] | None) -> np.ndarray:
        width = max(len(e) for e in encodings)
        n = len(encodings)
        ids = np.full((n, width), self._pad_id, dtype=np.int64)
        mask = np.zeros((n, width), dtype=np.int64)
        # One text per input: its token types are all 0 (BERT's first segment).
        types = np.zeros((n, width), dtype=np.int64)
        for row, enc in enumerate(encodings):
            k = len(enc)
            ids[row, :k] = enc
            mask[row, :k] = 1
        arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        if "position_ids" in self._input_names:  # a packed graph with packing off
            arrays["position_ids"] = np.tile(np.arange(width, dtype=np.int64), (n, 1))
        out = self._feed(arrays)
        if self._pooled_output:
            # A graph's own sentence embedding (an optimum export of a sentence-transformers model) already
            # ran the folder's modules.
            return out
        return hf.apply_dense(hf.pool(out, hf.exclude_prompts(mask, skip or []), self._pooling), self._dense)

    def embed(self, texts: Sequence[str], token_ids: Sequence[Sequence[int]]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self._dimension), dtype=np.float32)
        skip = self._prompt_lengths(texts) if self._prompt_lengths is not None else None
        if not self._use_ids or any(len(ids) > self._max_tokens for ids in token_ids):
            token_ids = [e.ids for e in self._embed_tok.encode_batch(list(texts))]
        if self._use_ids and self._packed:
            # Slices bound the activations; packing needs no sorting.
            vectors = np.concatenate(
                [
                    self._run_packed(token_ids[s : s + _SLICE], skip[s : s + _SLICE] if skip else None)
                    for s in range(0, len(token_ids), _SLICE)
                ]
            )
        else:
            vectors = self._embed_padded(token_ids, skip)
        if self._normalize:
            vectors = hf.l2_normalize(vectors)
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def _embed_padded(self, encodings: Sequence[Sequence[int]], skip: Sequence[int] | None) -> np.ndarray:
        if len(encodings) <= _SLICE:
            return self._run(encodings, skip)
        order = sorted(range(len(encodings)), key=lambda i: len(encodings[i]))
        parts = [
            self._run(
                [encodings[i] for i in order[s : s + _SLICE]],
                [skip[i] for i in order[s : s + _SLICE]] if skip else None,
            )
            for s in range(0, len(order), _SLICE)
        ]
        vectors = np.empty((len(encodings), parts[0].shape[1]), dtype=np.float32)
        vectors[order] = np.concatenate(parts)
        return vectors

    def close(self) -> None:
        # Dropping the session frees its arena; the core drops the backend right after.
        self.__dict__.pop("_session", None)
        self.__dict__.pop("_scores_session", None)


def _tokenizers(
    model_dir: Path, onnx_file: Path, lower: bool, max_tokens: int
) -> tuple[tokenizers.Tokenizer, tokenizers.Tokenizer, int]:
    """(counting tokenizer, embedding tokenizer, pad id) from the folder's tokenizer.json: the first neither
    pads nor truncates, the second truncates at `max_tokens`."""
    from tokenizers import Tokenizer

    candidates = [model_dir / "tokenizer.json", onnx_file.parent / "tokenizer.json"]
    tok_file = next((p for p in candidates if p.is_file()), None)
    if tok_file is None:
        raise BackendError(
            f"no tokenizer.json in {model_dir}; `gateway convert` writes one, or save the model's fast tokenizer there"
        )
    try:
        tok = Tokenizer.from_file(str(tok_file))
    except Exception as exc:
        raise BackendError(f"cannot load tokenizer {tok_file}: {exc}") from exc
    # Keep the file's pad id before dropping its padding: all-MiniLM's tokenizer.json pads every input
    # to a fixed 128 and truncates at 128, neither of which sentence-transformers uses.
    padding = tok.padding
    if padding is not None:
        pad_id = int(padding["pad_id"])
    else:
        pad = tok.token_to_id("[PAD]") if tok.token_to_id("[PAD]") is not None else tok.token_to_id("<pad>")
        pad_id = int(pad or 0)
    tok.no_padding()
    tok.no_truncation()
    if lower:
        # sentence-transformers lower-cases before a tokenizer that may not (a cased vocabulary).
        hf.lower_case(tok)
    # A second copy truncates at the model limit, as sentence-transformers does; the core normally
    # rejects longer inputs first, but a position beyond the embedding table would crash the graph.
    embed_tok = Tokenizer.from_str(tok.to_str())
    embed_tok.enable_truncation(max_length=max_tokens)
    return tok, embed_tok, pad_id
