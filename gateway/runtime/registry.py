"""Configured models: name/alias -> backend + batcher, loaded in the background, swapped on reload."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gateway.base import digest
from gateway.base.circuit import CircuitBreaker
from gateway.base.config import ConfigError, GatewayConfig, ModelConfig, check_reranker, convert_at
from gateway.base.errors import GatewayError
from gateway.plugin import Backend, BackendError, ModelInfo, Placement, Task, TokenSpan, check_info
from gateway.runtime import hf, quantize
from gateway.runtime.batching import Batcher
from gateway.runtime.calibration import Calibration
from gateway.runtime.inputs import Frame, prompt_length
from gateway.runtime.placement import DEFAULT, InProcess
from gateway.runtime.readiness import ModelState, Readiness

# Requests up to this many characters are tokenized on the event loop (local tokenizers only): tens of
# microseconds for the fast tokenizers, less than the hand-off to a thread and back.
_INLINE_CHARS = 2000

if TYPE_CHECKING:
    from gateway.shared.keys import ApiKey

#: Called after each backend batch: (model, inputs, tokens, seconds).
BatchObserver = Callable[[str, int, int, float], None]


log = logging.getLogger("gateway.registry")


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A model's config, validated against its backend (options converted to the backend's Struct)."""

    name: str
    config: ModelConfig
    backend_cls: type[Backend]
    options: Any
    # Whether its inputs go through the cache (a store is configured and the model does not opt out).
    cached: bool = False
    #: Where its batches run (gateway/runtime/placement.py), and that placement's validated options.
    placement_cls: type[Placement] = InProcess
    placement_options: Any = None
    #: The CPU cores this process's copy may use (`copies = "per-worker"` in a front worker); None: all.
    cores: int | None = None
    #: What the model does: its `task`, else what its folder is (hf.folder_task).
    task: Task = "embed"


def build_specs(
    config: GatewayConfig,
    backends: Mapping[str, type[Backend]],
    where: str = "<config>",
    broken: Mapping[str, str] | None = None,
    placements: Mapping[str, type[Placement]] | None = None,
    workers: int = 1,
) -> dict[str, ModelSpec]:
    """Check each model's backend exists and its options fit the backend's Options Struct (and its placement's
    table, if it names one, that placement's Options Struct).

    `broken`: plugins that failed to import, by name, and why (named when a model asks for one of them).
    `placements`: by name (default: in-process only). `workers`: the front workers sharing the machine, for
    a front's specs (its `copies = "per-worker"` models get their share of the cores).
    """
    specs: dict[str, ModelSpec] = {}
    placements = placements or {DEFAULT: InProcess}
    for name, model in config.models.items():
        cls = _backend_of(name, model, backends, broken or {}, where)
        options = convert_at(model.options, cls.Options, f"$.models.{name}.options", where)
        if model.copies == "per-worker" and cls.per_worker_refused is not None:
            raise ConfigError(
                f'{where}: `$.models.{name}.copies`: backend {model.backend!r} cannot have "per-worker" copies: '
                f"{cls.per_worker_refused}"
            )
        cores = max(1, (os.cpu_count() or 1) // workers) if workers > 1 and model.copies == "per-worker" else None
        cached = config.cache.store != "off" and model.cache
        placement_cls, placement_options = _placement_of(name, model, placements, where)
        task = _task_of(name, model, where)
        specs[name] = ModelSpec(
            name=name,
            config=model,
            backend_cls=cls,
            options=options,
            cached=cached,
            placement_cls=placement_cls,
            placement_options=placement_options,
            cores=cores,
            task=task,
        )
    _check_fallback_tasks(specs, where)
    return specs


def _task_of(name: str, model: ModelConfig, where: str) -> Task:
    """The model's task: configured, else recognised from its folder (a CrossEncoder folder reranks); a
    recognised reranker is checked as a configured one is."""
    if model.task is not None:
        return model.task
    task = hf.folder_task(Path(model.path)) if model.path is not None else "embed"
    if task == "rerank":
        check_reranker(name, model, f"{where} (its folder at {model.path} is a CrossEncoder)")
    return task


def _check_fallback_tasks(specs: Mapping[str, ModelSpec], where: str) -> None:
    # A reranker takes no fallbacks (config checks it); an embedding model's fallback must embed too.
    for name, spec in specs.items():
        for i, other in enumerate(spec.config.fallbacks):
            if other in specs and specs[other].task != spec.task:
                raise ConfigError(
                    f"{where}: `$.models.{name}.fallbacks[{i}]`: model {other!r} has task {specs[other].task!r}, "
                    f"not {spec.task!r}"
                )


def _backend_of(
    name: str, model: ModelConfig, backends: Mapping[str, type[Backend]], broken: Mapping[str, str], where: str
) -> type[Backend]:
    """The backend class `model` names, installed and given a path exactly when it takes one."""
    cls = backends.get(model.backend)
    if cls is None:
        available = ", ".join(sorted(backends)) or "none installed"
        hint = (
            f"; plugin {model.backend!r} failed to import: {broken[model.backend]}" if model.backend in broken else ""
        )
        raise ConfigError(
            f"{where}: `$.models.{name}.backend`: unknown backend {model.backend!r} (available: {available}){hint}"
        )
    if (model.path is None) == cls.uses_path:
        need = "needs a model path" if cls.uses_path else "takes no path (see its options)"
        raise ConfigError(f"{where}: `$.models.{name}.path`: backend {model.backend!r} {need}")
    return cls


def _placement_of(
    name: str, model: ModelConfig, placements: Mapping[str, type[Placement]], where: str
) -> tuple[type[Placement], Any]:
    """Where `model`'s batches run (its `ray` table, else in-process) and that placement's validated options."""
    placement, table = (DEFAULT, None) if model.ray is None else ("ray", model.ray)
    placement_cls = placements.get(placement)
    if placement_cls is None:
        raise ConfigError(f"{where}: `$.models.{name}.{placement}`: no placement plugin {placement!r} is installed")
    return placement_cls, convert_at(table or {}, placement_cls.Options, f"$.models.{name}.{placement}", where)


def configured_prompts(config: ModelConfig) -> tuple[dict[str, str], str | None]:
    """A model's named prompts and default prompt: its config's, else its folder's config_sentence_transformers.json
    (BackendError when that file is malformed)."""
    if config.prompts is not None:
        return dict(config.prompts), config.default_prompt_name
    if config.path is None:
        return {}, None
    return hf.read_prompts(Path(config.path))


def check_paths(specs: Mapping[str, ModelSpec]) -> list[str]:
    """Problems with model paths that exist nowhere (check-config reports them; serve marks the model failed)."""
    return [
        f"`$.models.{name}.path`: {spec.config.path} does not exist"
        for name, spec in specs.items()
        if spec.config.path is not None and not Path(spec.config.path).exists()
    ]


@dataclass(eq=False)
class ServedModel:
    """One configured model and its lifecycle: loading, serving its batches, retiring on reload (its
    readiness and its int8/uint8 calibration are parts of their own)."""

    spec: ModelSpec
    on_batch: BatchObserver | None = None
    backend: Backend | None = None
    info: ModelInfo | None = None
    batcher: Batcher | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    # One tokenizer thread per model for large requests, and for every request of a backend without
    # `local_tokenizer`: such tokenizers need not be safe for concurrent use.
    _tokenize: ThreadPoolExecutor | None = None
    inflight: int = 0
    # Named prompts (configured, or from the model folder) and the default one's name.
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    # The special tokens around each input's ids (truncation keeps them), and each prompt's own token count.
    frame: Frame = field(default_factory=lambda: Frame(head=0, tail=0))
    prompt_tokens: dict[str, int] = field(default_factory=dict)
    # The cache's name for this model (digest.identity): None when its inputs are not cached.
    identity: bytes | None = None
    circuit: CircuitBreaker = field(init=False)
    readiness: Readiness = field(init=False)
    calibration: Calibration = field(init=False)
    #: Loaded by other processes, never here (with `[server] workers` > 1: a per-worker model at the runtime
    #: process, a shared one at a front worker): this entry only describes it.
    elsewhere: bool = False

    def __post_init__(self) -> None:
        c = self.spec.config.circuit
        self.circuit = CircuitBreaker(self.spec.name, c.failures, c.open_s)
        self.readiness = Readiness(self.spec.name)
        self.calibration = Calibration(self, self.spec.config, self.readiness)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def state(self) -> ModelState:
        return self.readiness.state

    @property
    def error(self) -> str | None:
        """Why the load failed, as the server's log has it."""
        return self.readiness.error

    @property
    def max_input_tokens(self) -> int:
        assert self.info is not None
        return _limit(self.spec, self.info)

    @property
    def replicas(self) -> tuple[int, int] | None:
        """(ready, total) replicas of a model whose batches run elsewhere; None for one in this process."""
        return self.backend.replicas() if self.backend is not None else None

    def load(self) -> None:
        """Construct and load the backend (blocking); failures leave the model `failed` with a reason."""
        spec = self.spec
        started = time.perf_counter()
        try:
            backend = _placed(spec)
            info = _checked_info(spec, backend, backend.load())
            try:
                self._read_prompts(backend, info)
                if spec.cached:
                    self.identity = digest.identity(
                        spec.config.backend, spec.options, backend.fingerprint(), _limit(spec, info)
                    )
            except Exception:
                backend.close()
                raise
            self.batcher = _batcher(spec, backend, info, self.on_batch, self.circuit)
            self._tokenize = ThreadPoolExecutor(1, thread_name_prefix=f"tokenize-{spec.name}")
            self.backend, self.info, self.readiness.state = backend, info, ModelState.READY
            log.info(
                "model %r ready (%s, dim %d, max %d tokens) in %.1fs",
                spec.name,
                spec.config.backend,
                info.dimension,
                self.max_input_tokens,
                time.perf_counter() - started,
            )
        except Exception as exc:  # a broken model must not take the others down
            reason = str(exc) if isinstance(exc, BackendError) else f"{type(exc).__name__}: {exc}"
            self.readiness.failed(reason)
            log.error("model %r failed to load: %s", spec.name, reason, exc_info=not isinstance(exc, BackendError))
        finally:
            self.readiness.finished()

    def skip(self) -> None:
        """Never load this model here (see `elsewhere`): it stays `loading`, and retiring it waits for nothing."""
        self.elsewhere = True
        self.readiness.finished()

    @property
    def is_ready(self) -> bool:
        """Loaded and serving now (no waiting)."""
        return self.readiness.is_ready

    async def ready(self, timeout: float) -> None:
        """Wait for the load to finish; 503 if it failed or is still running after `timeout`."""
        await self.readiness.ready(timeout)

    @property
    def public_error(self) -> str | None:
        """The load error as clients may read it (see Readiness.public_error)."""
        return self.readiness.public_error

    def circuit_refusal(self) -> GatewayError | None:
        """The 503 for work while this model's circuit is open; None when work may reach it (in the half-open
        state, the caller that gets None takes the one probe)."""
        if self.circuit.allow():
            return None
        retry = max(1, math.ceil(self.circuit.retry_after()))
        return GatewayError(
            503,
            f"model {self.name!r} is failing and is not being sent requests for now; retry in {retry}s",
            code="circuit_open",
            headers={"Retry-After": str(retry)},
        )

    def _read_prompts(self, backend: Backend, info: ModelInfo) -> None:
        """The model's prompts, how its ids are framed, and each prompt's token count (in the load thread)."""
        self.prompts, self.default_prompt_name = configured_prompts(self.spec.config)
        if not info.counts_tokens:
            # Its tokens are counted upstream: no frame to keep, and prompts are charged within the inputs.
            self.prompt_tokens = dict.fromkeys(self.prompts, 0)
            return
        self.frame = Frame.of(backend.tokenize)
        self.prompt_tokens = {n: prompt_length(backend.tokenize, p, self.frame) for n, p in self.prompts.items()}

    def prompt_names(self) -> list[str]:
        """The model's prompt names: once loaded, what it serves; before, what its config or folder names."""
        if self.info is not None:
            return list(self.prompts)
        try:
            return list(configured_prompts(self.spec.config)[0])
        except BackendError:
            return []

    async def ranges(self, dims: int | None) -> quantize.Ranges:
        """int8/uint8 ranges for vectors cut to `dims` (None: whole); see Calibration.ranges."""
        return await self.calibration.ranges(dims)

    def calibrate_in_background(self, loop: asyncio.AbstractEventLoop) -> None:
        """From any thread: start calibrating on `loop` when the model is ready and configured for it."""
        self.calibration.in_background(loop)

    @contextmanager
    def in_use(self) -> Iterator[None]:
        """Mark a request as using this model (a retired model closes only when none does)."""
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1

    def retire(self, grace_s: float) -> None:
        """Close once loaded and no request uses it any more (blocking: run it in its own thread)."""
        self.readiness.wait()
        deadline = time.monotonic() + grace_s
        while self.inflight and time.monotonic() < deadline:
            time.sleep(0.05)
        self.close()
        log.info("model %r (%s) unloaded", self.name, self.spec.config.backend)

    def retire_in_background(self, grace_s: float) -> None:
        """`retire` on a thread of its own (the shared executor must not wait on in-flight requests)."""
        threading.Thread(target=self.retire, args=(grace_s,), name=f"retire-{self.name}", daemon=True).start()

    async def tokenize(self, texts: list[str]) -> list[list[int]]:
        """The backend's token ids for each text (their lengths are the counts)."""
        backend, info = self.backend, self.info
        assert backend is not None and info is not None and self._tokenize is not None
        if info.local_tokenizer and sum(len(t) for t in texts) <= _INLINE_CHARS:
            return backend.tokenize(texts)
        return await asyncio.get_running_loop().run_in_executor(self._tokenize, backend.tokenize, texts)

    async def token_spans(self, texts: list[str], add_special_tokens: bool) -> list[list[TokenSpan]]:
        """The backend's tokens of each text with their text and offsets, on the model's tokenizer thread; 400
        when its backend cannot show them, or when it runs in another process."""
        backend = self.backend
        if backend is None or self.elsewhere:
            raise GatewayError(
                400,
                f"model {self.name!r} runs in the runtime process, whose tokens this worker cannot show "
                "(`[server] workers` > 1)",
                code="tokenize_not_supported",
            )
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._tokenize, backend.token_spans, texts, add_special_tokens)
        except NotImplementedError:
            raise GatewayError(
                400,
                f"model {self.name!r} cannot show its tokens: backend {self.spec.config.backend!r} gives no "
                "token text or offsets",
                code="tokenize_not_supported",
            ) from None

    def estimate(self, texts: list[str]) -> list[int]:
        """Tokens per text as guessed from its length, for a backend that cannot count them up front (only
        batches and admission use it: about 4 characters per token in English, at least 1)."""
        return [len(t) // 4 + 1 for t in texts]

    def precheck(self, **admission: Any) -> None:
        """QueueFull now if the model would refuse any request of this caller (see Batcher.precheck)."""
        assert self.batcher is not None
        self.batcher.precheck(**admission)

    async def embed(self, texts: list[str], token_ids: list[list[int]], **admission: Any) -> np.ndarray:
        """Vectors for `texts`, computed in the model's batches (`admission`: see Batcher.embed)."""
        assert self.batcher is not None
        return await self.batcher.embed(texts, token_ids, **admission)

    async def tokenize_pairs(self, pairs: list[tuple[str, str]]) -> list[list[int]]:
        """A rerank model's token ids for each (query, document) pair, on its tokenizer thread."""
        backend = self.backend
        assert backend is not None and self._tokenize is not None
        return await asyncio.get_running_loop().run_in_executor(self._tokenize, backend.tokenize_pairs, pairs)

    async def score(self, pairs: list[tuple[str, str]], token_ids: list[list[int]], **admission: Any) -> np.ndarray:
        """A rerank model's raw scores for `pairs` (float32 [n]), computed in its batches with other requests'
        pairs (`admission`: see Batcher.embed)."""
        assert self.batcher is not None
        return (await self.batcher.embed(pairs, token_ids, **admission))[:, 0]

    def close(self) -> None:
        """Finish queued work, then release the model."""
        if self.batcher is not None:
            self.batcher.close()
        if self._tokenize is not None:
            # A tokenization still running (its request timed out) must finish before the backend goes.
            self._tokenize.shutdown(wait=True, cancel_futures=True)
        if self.backend is not None:
            try:
                self.backend.close()
            except Exception:
                log.exception("closing model %r", self.name)
        self.readiness.state = ModelState.UNLOADED


def _limit(spec: ModelSpec, info: ModelInfo) -> int:
    """The model's tokens per input: its own limit, or the configured one when lower."""
    configured = spec.config.max_input_tokens
    return min(info.max_input_tokens, configured) if configured else info.max_input_tokens


def _placed(spec: ModelSpec) -> Backend:
    """The model's backend, constructed where its placement runs it (not loaded yet), told the model's task."""
    if spec.config.path is not None and not Path(spec.config.path).exists():
        raise BackendError(f"model path {spec.config.path} does not exist")
    if spec.task == "rerank" and not spec.backend_cls.can_score():
        raise BackendError(
            f'backend {spec.config.backend!r} cannot serve a model with task = "rerank": it does not implement '
            "`score` (query/document pairs in, one score each out; see docs/plugins.md)"
        )
    # A front worker's copy gets its share of the cores; the cache's identity keeps the configured options.
    options = spec.options if spec.cores is None else spec.backend_cls.within_cores(spec.options, spec.cores)
    backend = spec.placement_cls(spec.placement_options).place(
        spec.backend_cls,
        model=spec.name,
        path=spec.config.path or "",
        options=options,
        trust_remote_code=spec.config.trust_remote_code,
    )
    if spec.task == "rerank" and not backend.can_score():
        # A placement's stand-in (one that runs the backend elsewhere) must carry the pairs there too.
        raise BackendError(
            f"placement {spec.placement_cls.name!r} cannot run `score` for backend {spec.config.backend!r}, "
            'so it cannot serve a model with task = "rerank"'
        )
    backend.task = spec.task
    return backend


def _checked_info(spec: ModelSpec, backend: Backend, loaded: ModelInfo) -> ModelInfo:
    """What the loaded backend said of itself, checked against the model's config (the backend is closed when
    it does not fit)."""
    try:
        info = check_info(backend, loaded)
    except BackendError:
        backend.close()
        raise
    if info.task != spec.task:
        backend.close()
        raise BackendError(
            f"backend {spec.config.backend!r} loaded a model for task {info.task!r}, but the model is configured "
            f"for task {spec.task!r} (set `task` in gateway.toml, or check the folder)"
        )
    dims = spec.config.matryoshka_dimensions or []
    too_big = [d for d in dims if d > info.dimension]
    if too_big:
        backend.close()
        raise BackendError(f"matryoshka_dimensions {too_big} exceed the model's dimension {info.dimension}")
    configured = spec.config.max_input_tokens
    if configured and configured > info.max_input_tokens:
        log.warning(
            "model %r: max_input_tokens = %d is above the model's own limit %d; using %d",
            spec.name,
            configured,
            info.max_input_tokens,
            info.max_input_tokens,
        )
    return info


def _batcher(
    spec: ModelSpec, backend: Backend, info: ModelInfo, on_batch: BatchObserver | None, circuit: CircuitBreaker
) -> Batcher:
    """The model's batches, as its `[batching]` table configures them."""
    b = spec.config.batching
    return Batcher(
        backend,
        info,
        model=spec.name,
        max_batch_size=b.max_batch_size,
        max_batch_tokens=b.max_batch_tokens,
        max_wait_ms=b.max_wait_ms,
        return_wait=b.return_wait,
        background_batch_ms=b.background_batch_ms,
        background_grace_ms=b.background_grace_ms,
        background_batch_size=b.background_batch_size,
        max_queue=b.max_queue,
        on_batch=on_batch,
        circuit=circuit,
        task=info.task,
    )


@dataclass(frozen=True, slots=True)
class ModelHandle:
    """One request's model, taken from the registry once: the model asked for, then its configured fallbacks in
    order (a reload that swaps the registry meanwhile does not change what the request uses)."""

    model: ServedModel
    chain: tuple[ServedModel, ...]


class Registry:
    """Names and aliases -> ServedModel. Replaced as a whole on reload, so lookups never see a half state."""

    def __init__(
        self,
        specs: Mapping[str, ModelSpec],
        reuse: Mapping[str, ServedModel] | None = None,
        on_batch: BatchObserver | None = None,
    ) -> None:
        """`reuse`: loaded models of a previous registry; one whose spec is unchanged is kept as is.
        `on_batch`: told of every batch of every model (metrics)."""
        self.models: dict[str, ServedModel] = {}
        for name, spec in specs.items():
            old = (reuse or {}).get(name)
            # A model still loading with the same spec is kept too: loading it twice would only leak one.
            unchanged = old is not None and old.spec == spec and old.state in (ModelState.READY, ModelState.LOADING)
            self.models[name] = old if unchanged and old is not None else ServedModel(spec, on_batch)
        self._index()

    def _index(self) -> None:
        self._names: dict[str, ServedModel] = {}
        for model in self.models.values():
            self._names[model.name] = model
            for alias in model.spec.config.aliases:
                self._names[alias] = model

    def replace(self, model: ServedModel) -> None:
        """Put `model` in place of the one with its name (before this registry goes live)."""
        self.models[model.name] = model
        self._index()

    def find(self, name: str) -> ServedModel | None:
        """The model called `name` (or aliased so), or None."""
        return self._names.get(name)

    def resolve(self, name: str, key: ApiKey | None = None) -> ServedModel:
        """The model called `name` (or aliased so); 404 listing what exists (what `key` may use)."""
        model = self._names.get(name)
        if model is None:
            visible = [n for n in self.models if key is None or key.may_use(n)]
            available = ", ".join(sorted(visible)) or "none"
            raise GatewayError(
                404, f"model {name!r} not found; available models: {available}", param="model", code="model_not_found"
            )
        return model

    def chain(self, model: ServedModel) -> list[ServedModel]:
        """`model` and then its configured fallbacks, in order."""
        return [model, *(self.models[name] for name in model.spec.config.fallbacks if name in self.models)]

    def handle(self, name: str, key: ApiKey | None = None) -> ModelHandle:
        """What a request uses of the model called `name` (or aliased so): it and its fallbacks; 404 as `resolve`,
        403 when `key` may not use it."""
        model = self.resolve(name, key)
        if key is not None and not key.may_use(model.name):
            raise GatewayError(403, f"this API key may not use model {name!r}", param="model", code="model_not_allowed")
        return ModelHandle(model, tuple(self.chain(model)))

    def load_all(
        self,
        loop: asyncio.AbstractEventLoop | None = None,
        here: Callable[[ModelSpec], bool] | None = None,
        loaded: Callable[[], None] | None = None,
    ) -> threading.Thread:
        """Load every model in one background thread (one at a time: loading in parallel only thrashes);
        with `loop`, the models calibrated at load start calibrating there as each becomes ready. `here`: which
        models this process loads (the others are skipped, see ServedModel.skip); `loaded`: called (in the
        loading thread) after each model's load."""
        for model in self.models.values():
            if here is not None and not here(model.spec):
                model.skip()

        def run() -> None:
            for model in self.models.values():
                if model.elsewhere:
                    continue
                model.load()
                if loop is not None:
                    model.calibrate_in_background(loop)
                if loaded is not None:
                    loaded()

        t = threading.Thread(target=run, name="model-loader", daemon=True)
        t.start()
        return t

    def close(self) -> None:
        for model in self.models.values():
            model.close()
