"""Torch backend: sentence-transformers, loaded from a local folder (never a hub)."""

from __future__ import annotations

import copy
import ctypes
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import msgspec
import numpy as np

from gateway import Backend, BackendError, ModelInfo, hookimpl
from gateway.plugin import TokenSpan, tokenizer_spans
from gateway.runtime.hf import (
    POOLING_MODES,
    PackingPlan,
    PromptLengths,
    l2_normalize,
    local_attention,
    lower_case,
    pooling_name,
    probe_packing,
    read_layout,
)
from gateway.runtime.packing import pack, pool
from gateway_torch.rerank import CrossEncoderScoring

log = logging.getLogger("gateway.torch")

# Inputs of different lengths, so the load-time check covers positions restarting inside a row.
_PROBES = (
    "a",
    "The quick brown fox jumps over the lazy dog.",
    "Packing puts several inputs in one row of the batch; this one is longer than the others on purpose.",
)
# One input of a few hundred tokens (cut to the model's limit) beside them: attention that depends on distance
# (a local window) only shows on inputs longer than its window.
_LONG_PROBE = " ".join(f"clause {i} of a long input checks attention far from each token." for i in range(40))


class TorchOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    device: str = "cpu"
    # torch intra-op threads; None leaves torch's default (all cores).
    threads: int | None = None
    # None: as the model defines (a Normalize module); True/False force it.
    normalize: bool | None = None
    # Inputs share batch rows of this many tokens, with no padding (gateway/runtime/packing.py); 0 pads each batch
    # to its longest input instead. Checked against the model's own encode at load, and turned off with a
    # warning for a model where the two disagree (e.g. positions that do not start at 0).
    pack_tokens: Annotated[int, msgspec.Meta(ge=0, le=65_536)] = 64
    # Run the packed forward as a TorchScript trace: no Python per layer, and the GIL is free while it runs
    # (the event loop shares it; bench/README.md, "torch"). Checked against the eager model at load (several
    # shapes); eager where a model does not trace.
    jit: bool = True
    # Batches run at once, each on its own share of the threads (packed path only): two single-threaded
    # batches beat one batch split over 2 threads once anything else wants a core, as the event loop does
    # (bench/README.md, "parallel_batches"). A batch that runs alone still gets every thread.
    parallel_batches: Annotated[int, msgspec.Meta(ge=1, le=64)] = 1


class TorchBackend(CrossEncoderScoring, Backend):
    """A sentence-transformers model run by torch (a CrossEncoder for `task = "rerank"`)."""

    name = "torch"
    Options = TorchOptions

    @classmethod
    def within_cores(cls, options: Any, cores: int) -> Any:
        # torch's default takes every core, and N front workers' copies would each take them all.
        return options if options.threads else msgspec.structs.replace(options, threads=cores)

    def load(self) -> ModelInfo:
        """Load the SentenceTransformer and a private copy of its tokenizer for counting."""
        torch, sentence_transformer, normalize_module = _import_torch()
        opts: TorchOptions = self.options
        if opts.threads:
            torch.set_num_threads(opts.threads)
        if self.task == "rerank":
            return self._load_reranker(torch)
        try:
            # str(): SentenceTransformer treats a Path as a hub id.
            model = sentence_transformer(
                str(self.path), device=opts.device, trust_remote_code=self.trust_remote_code, local_files_only=True
            )
        except Exception as exc:
            raise BackendError(f"cannot load sentence-transformers model from {self.path}: {exc}") from exc
        model.eval()
        self._torch, self._model, self._lock = torch, model, threading.Lock()
        has_normalize = any(isinstance(m, normalize_module) for m in model)
        self._normalize = bool(opts.normalize) and not has_normalize
        normalized = has_normalize if opts.normalize is None else opts.normalize
        self._read_tokenizer_and_prompts(model)
        limit = model.max_seq_length or getattr(model.tokenizer, "model_max_length", None) or 512
        dim = model.get_embedding_dimension() if hasattr(model, "get_embedding_dimension") else None
        dim = dim or model.get_sentence_embedding_dimension()
        if normalized is False and has_normalize:
            raise BackendError("normalize = false, but the model itself ends in a Normalize module")
        self._unit = bool(normalized)
        self._packer = self._make_packer(model, opts.pack_tokens) if opts.pack_tokens else None
        # Padded batches run from the ids counted on arrival too (so the core can truncate for them), padded
        # by the model's own tokenizer on its own side (left for Qwen3), through every module of the model.
        self._max_tokens = int(limit)
        self._pads_ids = self._packer is None and _pads_ids(model)
        self._threads = torch.get_num_threads()
        self._running = 0
        self._parallel = opts.parallel_batches if self._packer is not None else 1
        self._trim = _HeapTrimmer()
        return ModelInfo(
            dimension=int(dim),
            max_input_tokens=int(limit),
            normalized=normalized,
            # Batch size and per-call cost: bench/README.md, "torch".
            max_batch_size=32,
            concurrent_batches=self._parallel,
            # Packed rows carry no padding: the core need not split batches by length.
            pads_to_longest=self._packer is None,
            call_overhead_tokens=128,
            local_tokenizer=True,
            embeds_token_ids=self._packer is not None or self._pads_ids,
        )

    def _read_tokenizer_and_prompts(self, model: Any) -> None:
        """The counting tokenizer and the model's prompts, as the core sends texts (prompt in front)."""
        # sentence-transformers 6 puts a Lowercase step into its tokenizer for `do_lower_case`; older ones
        # lower-case the text: the counter's copy gets the step either way.
        lower = bool(getattr(model[0], "do_lower_case", False))
        self._counter = self._make_counter(model.tokenizer, lower)
        # The folder's prompts arrive in front of the texts (the core prepends them): found again here so that
        # sentence-transformers neither adds its default prompt a second time nor pools a prompt it leaves out.
        self._prompts = PromptLengths(
            {k: v for k, v in model.prompts.items() if v}, self.tokenize, set(model.tokenizer.all_special_ids)
        )
        self._include_prompt = getattr(model[1], "include_prompt", True) if len(model) > 1 else True

    def _make_packer(self, model: Any, row_tokens: int) -> _Packer | None:
        """The packed forward, or None (with a warning saying why) where the model cannot be packed or its packed
        vectors differ from its own encode."""
        first, mode, why = _packable(model)
        if why:
            log.warning("model %r: packing off (%s); batches are padded", self.model, why)
            return None
        packer = _Packer(model, first, mode, row_tokens, self._unit)
        try:
            plan = packer.probe(self._torch)
        except Exception as exc:  # a forward that takes no explicit positions
            plan, why = None, f"{type(exc).__name__}: {exc}".splitlines()[0]
        else:
            why = plan.refused
        if plan is None or why:
            log.warning("model %r: packing off (%s); batches are padded", self.model, why)
            return None
        packer.plan = plan
        if not self._packed_agrees(packer):
            return None
        if self.options.jit:
            why = packer.trace(self._torch)
            if why:
                log.warning("model %r: TorchScript off (%s); the packed forward runs eagerly", self.model, why)
        return packer

    def _packed_agrees(self, packer: _Packer) -> bool:
        """Whether the packed forward gives the model's own vectors on the probes (warning when not)."""
        # The texts as the core sends them: also with each of the model's prompts in front.
        probes = [*_PROBES, _LONG_PROBE]
        probes += [prompt + text for prompt, _ in self._prompts.prompts for text in _PROBES[1:]]
        try:
            reference = self._encode(probes)
            skip = self._prompts(probes) if not self._include_prompt else None
            packed = packer.embed(probes, self._torch, row_tokens=10_000, skip=skip)  # all in one row
            cosine = float(
                np.min(
                    np.sum(reference * packed, axis=1)
                    / np.linalg.norm(reference, axis=1)
                    / np.linalg.norm(packed, axis=1)
                )
            )
        except Exception as exc:  # a model whose forward takes no position_ids or mask of this shape
            log.warning("model %r: packing off (%s: %s); batches are padded", self.model, type(exc).__name__, exc)
            return False
        if not cosine > 0.9999:
            log.warning(
                "model %r: packing off (packed vectors differ, cosine %.6f); batches are padded", self.model, cosine
            )
            return False
        return True

    @staticmethod
    def _make_counter(tokenizer: Any, lower: bool) -> Callable[[Sequence[str]], list[list[int]]]:
        fast = getattr(tokenizer, "backend_tokenizer", None)
        if fast is not None:
            return _fast_counter(fast, lower)
        slow = copy.deepcopy(tokenizer)
        if lower:
            return lambda texts: list(slow([t.lower() for t in texts], truncation=False)["input_ids"])
        return lambda texts: list(slow(list(texts), truncation=False)["input_ids"])

    def load_tokenizer(self) -> bool:
        """The fast tokenizer alone, from the transformer folder's tokenizer.json (no torch, no weights); False
        for a model without one. The lower-casing is what the packed path applies (the usual case; a caller
        comparing with the loaded model finds any difference)."""
        from tokenizers import Tokenizer

        layout = read_layout(Path(self.path))
        file = layout.transformer_dir / "tokenizer.json"
        if not file.is_file():
            return False
        self._counter = _fast_counter(Tokenizer.from_file(str(file)), layout.do_lower_case)
        return True

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids with [CLS]/[SEP] (what the model consumes; the model's lower-casing applied), untruncated."""
        return self._counter(texts)

    def token_spans(self, texts: Sequence[str], add_special_tokens: bool) -> list[list[TokenSpan]]:
        """From the counting tokenizer when it is a fast one (a slow tokenizer has no offsets to show)."""
        if not isinstance(self._counter, _FastCounter):
            raise NotImplementedError
        return tokenizer_spans(self._counter.tokenizer, texts, add_special_tokens)

    def embed(self, texts: Sequence[str], token_ids: Sequence[Sequence[int]]) -> np.ndarray:
        """One forward pass over the whole batch (the core already sized and sorted it): packed, on the ids
        counted on arrival, or padded through the model's own encode."""
        try:
            if self._packer is None:
                if self._pads_ids and all(len(ids) <= self._max_tokens for ids in token_ids):
                    return self._encode_ids(texts, token_ids)
                return self._encode(texts)
            skip = self._prompts(texts) if not self._include_prompt else None
            if self._parallel == 1:
                with self._lock:
                    return self._packer.embed(texts, self._torch, ids=token_ids, skip=skip)
            with self._lock:
                self._running += 1
                # torch's thread count belongs to the calling thread: a batch alone gets them all, batches
                # side by side share them.
                share = self._threads if self._running == 1 else max(1, self._threads // self._parallel)
            try:
                self._torch.set_num_threads(share)
                return self._packer.embed(texts, self._torch, ids=token_ids, skip=skip)
            finally:
                with self._lock:
                    self._running -= 1
        finally:
            self._trim()

    def _encode_ids(self, texts: Sequence[str], token_ids: Sequence[Sequence[int]]) -> np.ndarray:
        """The model's own modules on ids padded as its tokenizer pads them: what `encode` runs after
        tokenizing. Inputs whose prompt is left out of pooling go in groups of one prompt length (the Pooling
        module takes one per batch)."""
        skip = self._prompts(texts) if not self._include_prompt else [0] * len(texts)
        groups: dict[int, list[int]] = {}
        for i, k in enumerate(skip):
            groups.setdefault(k, []).append(i)
        out = np.empty((len(texts), 0), dtype=np.float32)
        model = self._model
        with self._lock, self._torch.inference_mode():
            for k, rows in groups.items():
                features = dict(
                    model.tokenizer.pad({"input_ids": [list(token_ids[i]) for i in rows]}, return_tensors="pt")
                )
                features = {name: t.to(model.device) for name, t in features.items()}
                features["modality"] = "text"
                if k:
                    features["prompt_length"] = k
                part = model.forward(features)["sentence_embedding"].float().cpu().numpy()
                if out.shape[1] == 0:
                    out = np.empty((len(texts), part.shape[1]), dtype=np.float32)
                out[rows] = part
        return l2_normalize(out) if self._normalize else out

    def _encode(self, texts: Sequence[str]) -> np.ndarray:
        """The model's own encode on texts that already carry their prompt. Each group of texts with one prompt
        goes in with that prompt split off again and passed as `prompt` (where the model pools without it,
        sentence-transformers needs to know it), and `prompt=""` for none: never its default a second time."""
        groups: dict[str, list[int]] = {}
        for i, text in enumerate(texts):
            prompt = self._prompts.prompt_of(text)[0] if not self._include_prompt else ""
            groups.setdefault(prompt, []).append(i)
        out = np.empty((len(texts), 0), dtype=np.float32)
        with self._lock, self._torch.inference_mode():
            for prompt, rows in groups.items():
                part = self._model.encode(
                    [texts[i][len(prompt) :] for i in rows],
                    prompt=prompt,
                    batch_size=max(1, len(rows)),
                    convert_to_numpy=True,
                    normalize_embeddings=self._normalize,
                    show_progress_bar=False,
                )
                if out.shape[1] == 0:
                    out = np.empty((len(texts), part.shape[1]), dtype=np.float32)
                out[rows] = part
        return out

    def close(self) -> None:
        """Drop the model so its memory can be reclaimed."""
        self._model = None
        self._packer = None
        self._cross = None


def _import_torch() -> tuple[Any, Any, type]:
    """torch, SentenceTransformer and its Normalize module, after the environment they read at import."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # OpenMP workers spin after each parallel region by default; beside an event loop on few cores that
    # spinning is stolen time (read once, when torch's OpenMP starts).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import torch
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise BackendError(f"the torch backend needs the `torch` extra: {exc}") from exc
    try:
        from sentence_transformers.sentence_transformer.modules import Normalize
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.models import Normalize
    return torch, SentenceTransformer, Normalize


def _packable(model: Any) -> tuple[Any, Any, str]:
    """(transformer module, pooling mode, "") where the model's modules can run packed, else the reason why not
    in the last place."""
    modules = list(model)
    first, second, rest = modules[0], modules[1] if len(modules) > 1 else None, modules[2:]
    st_mode = getattr(second, "pooling_mode", None)
    if st_mode is None and hasattr(second, "get_pooling_mode_str"):  # sentence-transformers < 6
        st_mode = second.get_pooling_mode_str()
    mode = pooling_name(str(st_mode))
    why = ""
    if not hasattr(first, "auto_model") or getattr(first, "backend", "torch") != "torch":
        why = "its first module is not a transformers model"
    elif mode is None:
        why = f"pooling mode {st_mode!r} is not one of {', '.join(POOLING_MODES)}"
    elif any(type(m).__name__ != "Normalize" for m in rest):
        why = "modules after pooling other than Normalize"
    elif getattr(model.tokenizer, "backend_tokenizer", None) is None:
        why = "no fast tokenizer"
    elif (window := local_attention(first.auto_model.config.to_dict())) is not None:
        # transformers builds the local window from a 2D mask; a packed 4D mask would bypass it.
        why = f"local attention (window {window}) cannot be expressed in a packed mask"
    return first, mode, why


def _pads_ids(model: Any) -> bool:
    """Whether the model is a text transformer whose tokenizer can pad ids (then padded batches need no text)."""
    first = model[0] if len(model) else None
    tokenizer = getattr(model, "tokenizer", None)
    return (
        hasattr(first, "auto_model")
        and getattr(first, "backend", "torch") == "torch"
        and callable(getattr(tokenizer, "pad", None))
        and getattr(tokenizer, "backend_tokenizer", None) is not None
    )


class _FastCounter:
    """Counts with a private copy of the fast tokenizer: the encode path mutates its tokenizer's truncation
    settings on every call, and a Rust tokenizer being mutated cannot be read from another thread ("Already
    borrowed")."""

    def __init__(self, fast: Any, lower: bool) -> None:
        self.tokenizer = copy.deepcopy(fast)
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        if lower:
            lower_case(self.tokenizer)

    def __call__(self, texts: Sequence[str]) -> list[list[int]]:
        if len(texts) == 1:
            # On this thread: encode_batch hands even one text to the tokenizers' thread pool, whose threads
            # then wait for a core beside torch's (bench/README.md, "Tokenizing one text").
            return [self.tokenizer.encode(texts[0]).ids]
        return [e.ids for e in self.tokenizer.encode_batch(list(texts))]


def _fast_counter(fast: Any, lower: bool) -> Callable[[Sequence[str]], list[list[int]]]:
    return _FastCounter(fast, lower)


class _Packer:
    """Runs the transformer on packed rows and pools per input, as the model's own modules would."""

    def __init__(self, model: Any, transformer: Any, mode: Any, row_tokens: int, unit: bool) -> None:
        self.net = transformer.auto_model
        self.device = model.device
        self.dtype = self.net.dtype
        self.mode = mode
        self.row_tokens = row_tokens
        self.unit = unit
        self.max_tokens = int(model.max_seq_length or 512)
        tok = copy.deepcopy(model.tokenizer.backend_tokenizer)
        tok.no_padding()
        tok.enable_truncation(self.max_tokens)
        if getattr(transformer, "do_lower_case", False):
            lower_case(tok)
        self.tok = tok
        pad = model.tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else 0
        self.traced: Any = None
        # Set by `probe` before the packer is used: where positions start, whether attention is causal.
        self.plan = PackingPlan(position_offset=0, causal=False)

    def probe(self, torch: Any) -> PackingPlan:
        """Where the model's positions start and whether it attends causally, learnt from one input."""

        def forward(ids: list[int], positions: list[int] | None) -> np.ndarray:
            with torch.inference_mode():
                ids_t = torch.tensor([ids], device=self.device)
                kwargs: dict[str, Any] = {"input_ids": ids_t, "attention_mask": torch.ones_like(ids_t)}
                if positions is not None:
                    kwargs["position_ids"] = torch.tensor([positions], device=self.device)
                return self.net(**kwargs).last_hidden_state[0].float().cpu().numpy()

        return probe_packing(forward, self.tok.encode(_PROBES[2]).ids, self.pad_id)

    def _eager(self, input_ids: Any, mask: Any, position_ids: Any) -> Any:
        return self.net(input_ids=input_ids, attention_mask=mask, position_ids=position_ids).last_hidden_state

    def _inputs(
        self,
        texts: Sequence[str],
        torch: Any,
        row_tokens: int | None = None,
        ids: Sequence[Sequence[int]] | None = None,
    ) -> tuple[Any, tuple[Any, ...]]:
        if ids is None or any(len(i) > self.max_tokens for i in ids):
            ids = [e.ids for e in self.tok.encode_batch(list(texts))]
        batch = pack(ids, row_tokens or self.row_tokens, self.pad_id)
        segments = torch.from_numpy(batch.segments).to(self.device)
        same = segments[:, :, None] == segments[:, None, :]
        if self.plan.causal:  # a decoder: each token sees its own input's earlier tokens only
            same = same & torch.ones(same.shape[-2:], dtype=torch.bool, device=self.device).tril()
        # Additive, which both eager attention (adds it to the scores) and SDPA read the same way.
        mask = torch.where(same[:, None], 0.0, torch.finfo(self.dtype).min).to(self.dtype)
        ids_t = torch.from_numpy(batch.input_ids).to(self.device)
        positions = torch.from_numpy(batch.position_ids + int(self.plan.position_offset or 0)).to(self.device)
        return batch, (ids_t, mask, positions)

    def trace(self, torch: Any) -> str:
        """Swap in a frozen TorchScript trace of the forward; the reason when it cannot be used."""
        import warnings

        outer = self

        class Forward(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.net = outer.net

            def forward(self, input_ids: Any, mask: Any, position_ids: Any) -> Any:
                return outer._eager(input_ids, mask, position_ids)

        long_text = " ".join(["tokens"] * (self.max_tokens + 8))  # truncated to the model's limit
        shapes = [list(_PROBES), [_PROBES[0]], [_PROBES[2], long_text, *_PROBES], [long_text]]
        # TorchScript's default (profiling) executor re-specialises the graph on the shapes it sees; with the
        # shapes of live traffic it got slower pass after pass, where the simple executor held its speed
        # (bench/README.md, "torch"). Private, process-wide switch; absent in some future torch, the default
        # executor runs.
        switch = getattr(torch._C, "_jit_set_profiling_executor", None)
        if switch is not None:
            switch(False)
        # Tracing reads config attributes that transformers warns about (loss_type); nothing to act on.
        hf_log = logging.getLogger("transformers")
        level = hf_log.level
        hf_log.setLevel(logging.ERROR)
        try:
            with torch.inference_mode(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the tracer's warnings are about Python values we do not vary
                _, example = self._inputs(list(_PROBES) * 3, torch, row_tokens=16)
                traced = torch.jit.freeze(torch.jit.trace(Forward().eval(), example, check_trace=False))
                for texts in shapes:
                    _, args = self._inputs(texts, torch)
                    diff = float((traced(*args) - self._eager(*args)).abs().max())
                    if not diff < 1e-4:
                        return f"the trace differs from the model by {diff:.2g} at shape {tuple(args[0].shape)}"
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}".splitlines()[0]
        finally:
            hf_log.setLevel(level)
        self.traced = traced
        return ""

    def embed(
        self,
        texts: Sequence[str],
        torch: Any,
        row_tokens: int | None = None,
        ids: Sequence[Sequence[int]] | None = None,
        skip: Sequence[int] | None = None,
    ) -> np.ndarray:
        with torch.inference_mode():
            batch, args = self._inputs(texts, torch, row_tokens, ids)
            hidden = (self.traced or self._eager)(*args).float().cpu().numpy()
        vectors = pool(hidden, batch.spans, self.mode, skip)
        return l2_normalize(vectors) if self.unit else vectors


class _HeapTrimmer:
    """Hands freed memory back to the OS at most once a second (glibc only).

    Batches of ever-different shapes leave glibc's heap fragmented, and torch's freed activations stay in
    the process: without trims the resident size of a torch model kept climbing over mixed batches
    (bench/README.md, "torch"). A trim takes milliseconds, hence at most once a second.
    """

    def __init__(self, every_s: float = 1.0) -> None:
        self.every_s = every_s
        self._last = time.monotonic()
        try:
            self._malloc_trim: Callable[[int], int] | None = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc
            self._malloc_trim = None

    def __call__(self) -> None:
        now = time.monotonic()
        if self._malloc_trim is not None and now - self._last > self.every_s:
            self._last = now
            self._malloc_trim(0)


@hookimpl(trylast=True)
def register_backends(register: Callable[[type[Backend]], None]) -> None:
    """The bundled torch backend."""
    register(TorchBackend)
