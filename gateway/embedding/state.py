"""The running gateway's state: config, keys and models, replaced whole on reload."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator, Mapping

from gateway.base.config import GatewayConfig
from gateway.base.observability import ModelStatus
from gateway.base.schemas import ReloadResult
from gateway.embedding.batch_store import StoreHandle
from gateway.embedding.cache import Cache, MemoryStore
from gateway.embedding.reload import Reloader
from gateway.plugin import Backend, Placement
from gateway.runtime.link import LinkStore, LinkWindow, RuntimeLink
from gateway.runtime.registry import BatchObserver, ModelSpec, ModelState, Registry, ServedModel, build_specs
from gateway.shared.keys import KeyStore
from gateway.shared.redis_state import RedisLink, RedisStore

log = logging.getLogger("gateway")


def _cache(config: GatewayConfig, redis: RedisLink | None, link: RuntimeLink | None) -> Cache | None:
    if config.cache.store == "off":
        return None
    if link is not None:
        # A front worker's per-worker models use the runtime's store, so that every front sees one cache and a
        # clear reaches them all (a hit costs the front one round trip on the link).
        return Cache(LinkStore(link, config.cache.store))
    if config.cache.store == "redis":
        assert redis is not None  # the config check refuses "redis" without [redis]
        return Cache(RedisStore(redis, config.cache.ttl_s))
    return Cache(MemoryStore(config.cache.max_bytes))


class Gateway:
    """Everything a request needs.

    `config`, `keys` and `registry` are replaced whole on reload (one assignment each, on the event loop),
    so a request sees either the old or the new set, never a mix within one lookup (`reloader`,
    gateway/embedding/reload.py, does it).
    """

    #: The runtime process: how many fronts have their copy of a per-worker model ready, of how many, and
    #: whether one failed (gateway/processes/runtime_process.py sets it).
    copies: Callable[[str], tuple[int, int, bool]] | None = None
    #: Tells this process's Batch API job runner, if it has one, that a job was created or cancelled.
    poke_batches: Callable[[], None] | None = None
    #: Whether a lifespan of the app runs this gateway (models loaded, job runner started): a second one at the
    #: same time (a test harness's own, as schemathesis starts) leaves everything to the first.
    running: bool = False

    def __init__(
        self,
        config: GatewayConfig,
        backends: Mapping[str, type[Backend]],
        *,
        broken: Mapping[str, str] | None = None,
        keys: KeyStore | None = None,
        fallback_keys: KeyStore | None = None,
        config_path: str | None = None,
        on_batch: BatchObserver | None = None,
        placements: Mapping[str, type[Placement]] | None = None,
        link: RuntimeLink | None = None,
        runtime: bool = False,
    ) -> None:
        """`broken`: plugins that failed to import; `keys`: fixed keys (the config's are ignored);
        `fallback_keys`: used while the config names no key; `on_batch`: told of every backend batch;
        `placements`: where batches may run, by name (default: in-process only); `link`: this is a front
        worker, and the runtime process at the other end of `link` owns the models, cache and limits (its
        registry here loads only the models with `copies = "per-worker"`, and describes the others); `runtime`:
        this is the runtime process, which loads every model but those."""
        self.config = config
        self.backends = backends
        self.placements = placements
        self.broken = broken or {}
        self.config_path = config_path
        self.on_batch = on_batch
        self._fixed_keys = keys
        self._fallback_keys = fallback_keys
        self.link = link
        self.runtime = runtime
        # A front's per-worker copies share the machine with the other fronts'.
        self.workers = config.server.worker_count() if link is not None else 1
        # Shared state (Redis) and the cache are set up once, from the config the server started with; a front
        # worker has neither (the runtime process does).
        shared = config.redis is not None and link is None
        self.redis = RedisLink(config.redis, lag=lambda: self.loop_lag) if shared and config.redis else None
        self.cache = _cache(config, self.redis, link)
        self.keys = KeyStore()
        self.keys = self.keys_for(config)
        self.registry = Registry(self.specs_for(config), on_batch=on_batch)
        #: Called after each reload that took effect (say, to describe the new models in the API schema).
        self.on_reload: list[Callable[[], None]] = []
        #: How late the event loop runs what is due (seconds; see watch_loop_lag): a request waits about
        #: this long to be read, and again for its answer to go out.
        self.loop_lag = 0.0
        #: Builds the next config's keys and models and swaps them in (a reload; at a front, prepare and swap).
        self.reloader = Reloader(self)
        #: The Batch API's store (None: turned off; a reload keeps its folder).
        self.batches = StoreHandle(config.batches.data_dir) if config.batches.enabled else None

    def here(self, spec: ModelSpec) -> bool:
        """Whether this process loads the model: one process loads all; with workers, the runtime the shared
        ones and each front its own copy of the per-worker ones."""
        if self.link is not None:
            return spec.config.copies == "per-worker"
        return not (self.runtime and spec.config.copies == "per-worker")

    def state_of(self, model: ServedModel) -> tuple[str, tuple[int, int] | None]:
        """A model's state for /ready and /v1/models, and (ready, total) of its copies or replicas: at the runtime
        process, a per-worker model is as ready as the fronts' copies are."""
        if model.elsewhere and self.copies is not None:
            ready, total, failed = self.copies(model.name)
            state = ModelState.READY if ready == total else ModelState.FAILED if failed else ModelState.LOADING
            return state.value, (ready, total)
        return model.state.value, model.replicas

    async def watch_loop_lag(self, every_s: float = 0.05) -> None:
        """Measure the event loop's lag for as long as the app runs: rises at once, decays over a second."""
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + every_s
            await asyncio.sleep(every_s)
            late = max(0.0, loop.time() - due)
            self.loop_lag = late if late > self.loop_lag else self.loop_lag + 0.05 * (late - self.loop_lag)

    async def close_shared(self) -> None:
        """Close the cache and the Redis link (at shutdown)."""
        if self.cache is not None:
            await self.cache.close()
        if self.redis is not None:
            await self.redis.close()

    def specs_for(self, config: GatewayConfig) -> dict[str, ModelSpec]:
        """The specs of `config`'s models (ConfigError where one is refused)."""
        return build_specs(
            config, self.backends, self.config_path or "<config>", self.broken, self.placements, self.workers
        )

    def keys_for(self, config: GatewayConfig) -> KeyStore:
        """`config`'s keys (the fixed or fallback ones where they apply), counted where this process counts them."""
        if self._fixed_keys is not None:
            return self._fixed_keys
        shared = self.redis if config.redis is not None and config.redis.rate_limits else None
        keys = KeyStore.from_config(config.auth, previous=self.keys, shared=shared)
        keys = keys if keys or self._fallback_keys is None else self._fallback_keys
        if self.link is not None:
            # A front's keys are counted where every front's requests meet: at the runtime.
            keys = keys.counted_by(lambda key, limit, what: LinkWindow(self.link, key.digest, limit, what))  # type: ignore[arg-type]
        return keys

    def model_status(self) -> Iterator[ModelStatus]:
        """Each model's live figures, for the metrics' gauges."""
        for name, model in self.registry.models.items():
            b = model.batcher
            ready = self.state_of(model)[0] == ModelState.READY
            circuit = int(model.circuit.state)
            if b is None:
                yield ModelStatus(name, 0, ready, circuit=circuit)
            else:
                yield ModelStatus(
                    name, b.queued, ready, b.predicted_wait(), b.drain_rate, model.replicas, circuit=circuit
                )

    async def reload(self) -> ReloadResult:
        """Re-read the config file and swap in its keys and models, all or nothing (Reloader.reload)."""
        return await self.reloader.reload()

    def local_states(self) -> dict[str, str]:
        """A front: the state of its own copy of each per-worker model (the runtime's /ready adds them up); of
        the prepared reload's copies once there is one, which this front serves from its next request on (a
        model the reload adds is ready once every front has its copy loaded, whether or not it had a request)."""
        registry = self.reloader.prepared or self.registry
        return {name: m.state.value for name, m in registry.models.items() if not m.elsewhere}

    async def prepare(self, config: GatewayConfig) -> dict[str, str]:
        """A front worker: load `config`'s new per-worker copies beside the running ones (Reloader.prepare)."""
        return await self.reloader.prepare(config)

    def drop_prepared(self) -> None:
        """A front: forget a prepared reload that did not happen (Reloader.drop_prepared)."""
        self.reloader.drop_prepared()

    def swap(self) -> bool:
        """A front: put the prepared reload in service; False when none is prepared (Reloader.swap)."""
        return self.reloader.swap()

    async def follow(self, config: GatewayConfig) -> None:
        """A front worker takes a config the runtime process has read without a prepared reload (Reloader.follow)."""
        await self.reloader.follow(config)
