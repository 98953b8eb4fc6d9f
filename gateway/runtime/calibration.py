"""int8/uint8 calibration of one model: its corpus embedded once, in the background, and the ranges per output size.

Its own module because it is a job of its own: the model only serves the batches it asks for."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Protocol

import numpy as np

from gateway.base.config import ModelConfig
from gateway.plugin import BackendError, ModelInfo
from gateway.runtime import hf, quantize
from gateway.runtime.batching import Batcher, Progress
from gateway.runtime.readiness import ModelState, Readiness

log = logging.getLogger("gateway.registry")


class Calibrated(Protocol):
    """What calibration asks of its model (registry.ServedModel): its tokens, its batches and their size."""

    info: ModelInfo | None
    batcher: Batcher | None

    @property
    def max_input_tokens(self) -> int: ...

    async def tokenize(self, texts: list[str]) -> list[list[int]]: ...

    def estimate(self, texts: list[str]) -> list[int]: ...

    async def embed(self, texts: list[str], token_ids: list[list[int]], **admission: Any) -> np.ndarray: ...


class Calibration:
    """A model's int8/uint8 ranges per output size, from its calibration corpus's vectors (computed once)."""

    def __init__(self, model: Calibrated, config: ModelConfig, readiness: Readiness) -> None:
        self._model = model
        self._config = config
        self._readiness = readiness
        self.name = readiness.name
        # The corpus's full vectors once computed, the computation while it runs, and the ranges per output size.
        self._vectors: np.ndarray | None = None
        self._computing: asyncio.Future[np.ndarray] | None = None
        self._ranges: dict[int, quantize.Ranges] = {}

    async def ranges(self, dims: int | None) -> quantize.Ranges:
        """int8/uint8 ranges for vectors cut to `dims` (None: whole), from the calibration corpus embedded
        once by this model (the first request that needs them waits for it; later ones share it)."""
        info = self._model.info
        assert info is not None
        size = dims or info.dimension
        found = self._ranges.get(size)
        if found is not None:
            return found
        if self._vectors is None:
            loop = asyncio.get_running_loop()
            if self._computing is None or self._computing.get_loop() is not loop:
                self._computing = loop.create_task(self._corpus_vectors())
            # Shielded: a request that times out must not cancel the calibration others wait for.
            try:
                self._vectors = await asyncio.shield(self._computing)
            except Exception:
                self._computing = None  # the next request tries again
                raise
        vectors = self._vectors[:, :size]
        if size != info.dimension and info.normalized:
            vectors = hf.l2_normalize(vectors)
        ranges = self._ranges[size] = quantize.Ranges.fit(vectors)
        return ranges

    async def now(self) -> None:
        """Compute the int8/uint8 ranges now (`calibrate = "load"`): every size this model serves. A failure
        is logged; the first request that needs the ranges tries again."""
        assert self._model.info is not None
        sizes = [None, *(self._config.matryoshka_dimensions or [])]
        try:
            for size in sizes:
                await self.ranges(size)
        except Exception as exc:
            if self._readiness.state == ModelState.READY:
                log.warning("model %r: calibration at load failed (%s); int8/uint8 requests will retry", self.name, exc)

    def in_background(self, loop: asyncio.AbstractEventLoop) -> None:
        """From any thread: start `now` on `loop` when the model is ready and configured for it."""
        if self._readiness.state == ModelState.READY and self._config.calibrate == "load":
            with contextlib.suppress(RuntimeError):  # the loop closed while this model loaded: shutting down
                asyncio.run_coroutine_threadsafe(self.now(), loop)

    async def _corpus_vectors(self) -> np.ndarray:
        model = self._model
        texts = quantize.calibration_texts(self._config.calibration_corpus)
        assert model.info is not None
        if not model.info.counts_tokens:
            return await self._in_pieces(texts, [[] for _ in texts], model.estimate(texts))
        ids = await model.tokenize(texts)
        fits = [i for i, one in enumerate(ids) if len(one) <= model.max_input_tokens]
        if not fits:
            raise BackendError(f"model {self.name!r}: no text of the calibration corpus fits its token limit")
        log.info("model %r: embedding %d calibration texts for int8/uint8", self.name, len(fits))
        return await self._in_pieces([texts[i] for i in fits], [ids[i] for i in fits], None)

    async def _in_pieces(self, texts: list[str], ids: list[list[int]], sizes: list[int] | None) -> np.ndarray:
        """The corpus's vectors, sent to the batcher one batch-sized piece at a time as background work: it
        never takes the queue room clients need (whatever `max_queue` is), and runs only while no client
        input waits."""
        assert self._model.batcher is not None
        step = self._model.batcher.max_batch_size
        parts = []
        for start in range(0, len(texts), step):
            end = start + step
            parts.append(
                await self._model.embed(
                    texts[start:end],
                    ids[start:end],
                    owner="(calibration)",
                    progress=Progress(),
                    sizes=sizes[start:end] if sizes is not None else None,
                    background=True,
                )
            )
        return np.concatenate(parts)
