"""The running gateway's state: config, keys and models, replaced whole on reload."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass

import msgspec

from gateway.base.config import ConfigError, GatewayConfig, load_config
from gateway.base.observability import ModelStatus
from gateway.base.schemas import ReloadResult
from gateway.embedding.cache import Cache, MemoryStore
from gateway.plugin import Backend, Placement
from gateway.runtime.link import LinkStore, LinkWindow, RuntimeLink
from gateway.runtime.registry import BatchObserver, ModelSpec, ModelState, Registry, ServedModel, build_specs
from gateway.shared.keys import KeyStore
from gateway.shared.redis_state import RedisLink, RedisStore

log = logging.getLogger("gateway")

# [server] settings fixed when the server starts (the others follow a reload).
_RESTART_FIELDS = (
    "host",
    "port",
    "max_body_bytes",
    "access_log",
    "log_level",
    # uvicorn's settings (gateway/server.py), fixed when it starts.
    "header_timeout_s",
    "send_timeout_s",
    "keep_alive_s",
    "max_connections",
    "max_header_bytes",
    # The process layout (gateway/workers.py).
    "workers",
)


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
    so a request sees either the old or the new set, never a mix within one lookup.
    """

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
        self.keys = self._keys_for(config)
        self.registry = Registry(self._specs(config), on_batch=on_batch)
        self._reload_lock = asyncio.Lock()
        #: Called after each reload that took effect (say, to describe the new models in the API schema).
        self.on_reload: list[Callable[[], None]] = []
        #: How late the event loop runs what is due (seconds; see watch_loop_lag): a request waits about
        #: this long to be read, and again for its answer to go out.
        self.loop_lag = 0.0
        #: The runtime process: how many fronts have their copy of a per-worker model ready, of how many, and
        #: whether one failed (gateway/runtime_process.py sets it).
        self.copies: Callable[[str], tuple[int, int, bool]] | None = None
        #: The runtime process: has every front load the new config's per-worker copies before a reload swaps
        #: (their load failures, by model), and tells them to drop those when the reload does not happen.
        self.prepare_fronts: Callable[[GatewayConfig], Awaitable[dict[str, str]]] | None = None
        self.abort_fronts: Callable[[], None] | None = None
        # A front: the registry a reload prepared, put in service when the runtime's generation moves.
        self._pending: _Pending | None = None

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

    def _specs(self, config: GatewayConfig) -> dict[str, ModelSpec]:
        return build_specs(
            config, self.backends, self.config_path or "<config>", self.broken, self.placements, self.workers
        )

    def _keys_for(self, config: GatewayConfig) -> KeyStore:
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
        """Re-read the config file: load new/changed models beside the old ones, swap, retire the old.

        All or nothing: everything that can refuse the file (its models' specs, its keys) is checked before a
        model loads, the config, keys and models are swapped in one step, and a reload that fails or is
        cancelled after loading closes the models it loaded (the running ones never stop serving)."""
        if self.config_path is None:
            raise ConfigError("this gateway was not started from a config file; nothing to reload")
        async with self._reload_lock:
            loop = asyncio.get_running_loop()
            config = await loop.run_in_executor(None, load_config, self.config_path)
            specs = self._specs(config)
            keys = self._keys_for(config)
            old = self.registry
            new = Registry(specs, reuse=old.models, on_batch=self.on_batch)
            previous = {id(m) for m in old.models.values()}
            fresh = self._fresh(new, previous)
            try:
                # Loaded off the loop, one at a time, while the old models keep serving.
                await loop.run_in_executor(None, lambda: [m.load() for m in fresh if not m.elsewhere])
                kept_old = self._keep_working(old, new, fresh)
                failed = {m.name: m.error or "" for m in fresh if m.state == ModelState.FAILED}
                if self.prepare_fronts is not None:
                    # Every front loads its new per-worker copies now, beside the old: the swap below must find
                    # them ready in every front before this reload is answered.
                    failed.update(await self.prepare_fronts(config))
                result = ReloadResult(
                    status="reloaded",
                    added=sorted(n for n in new.models if n not in old.models),
                    changed=sorted(m.name for m in fresh if m.name in old.models and m.name not in kept_old),
                    removed=sorted(n for n in old.models if n not in new.models),
                    failed=failed,
                    models={n: self.state_of(m)[0] for n, m in new.models.items()},
                )
            except BaseException:
                # Refused or cancelled after loading: nothing was swapped, and what was loaded for it goes (once
                # its load ends, which a cancelled wait does not stop).
                for m in fresh:
                    m.retire_in_background(0.0)
                if self.abort_fronts is not None:
                    self.abort_fronts()
                raise
            restart = [f for f in _RESTART_FIELDS if getattr(config.server, f) != getattr(self.config.server, f)]
            if restart:
                log.warning("reload: [server] %s changed; that takes a restart to apply", ", ".join(restart))
            for table in ("cache", "redis"):
                if getattr(config, table) != getattr(self.config, table):
                    log.warning("reload: [%s] changed; that takes a restart to apply", table)
            # The one swap: no await between these assignments, so a request sees the old set or the new one.
            self.config, self.keys, self.registry = config, keys, new
            live = {id(m) for m in new.models.values()}
            for m in fresh:
                if id(m) in live:
                    m.calibrate_in_background(loop)
                else:
                    m.retire_in_background(0.0)  # failed to load, and the previous version kept serving
            for m in old.models.values():
                if id(m) not in live:
                    m.retire_in_background(config.server.request_timeout_s)
            log.info("config reloaded: %s", msgspec.json.encode(result).decode())
            for listener in self.on_reload:
                listener()
            return result

    def _fresh(self, new: Registry, previous: set[int]) -> list[ServedModel]:
        """The models of `new` not kept from the running registry (ids `previous`); those loaded elsewhere are
        marked so (never loaded here)."""
        fresh = [m for m in new.models.values() if id(m) not in previous]
        for m in fresh:
            if not self.here(m.spec):
                m.skip()
        return fresh

    def local_states(self) -> dict[str, str]:
        """A front: the state of its own copy of each per-worker model (the runtime's /ready adds them up); of
        the prepared reload's copies once there is one, which this front serves from its next request on (a
        model the reload adds is ready once every front has its copy loaded, whether or not it had a request)."""
        registry = self._pending.registry if self._pending is not None else self.registry
        return {name: m.state.value for name, m in registry.models.items() if not m.elsewhere}

    async def prepare(self, config: GatewayConfig) -> dict[str, str]:
        """A front worker: load `config`'s new per-worker copies beside the running ones (`swap` puts them in
        service); the load failures, by model. Errors in `config` itself raise ConfigError."""
        async with self._reload_lock:
            self.drop_prepared()
            keys = self._keys_for(config)
            old = self.registry
            new = Registry(self._specs(config), reuse=old.models, on_batch=self.on_batch)
            fresh = self._fresh(new, {id(m) for m in old.models.values()})
            local = [m for m in fresh if not m.elsewhere]
            await asyncio.get_running_loop().run_in_executor(None, lambda: [m.load() for m in local])
            kept = self._keep_working(old, new, local)
            self._pending = _Pending(config, keys, new, fresh)
            if self.link is not None:
                self.link.send_states()  # before the answer, on the same connection: the runtime has them first
            return {m.name: m.error or "" for m in local if m.state == ModelState.FAILED and m.name not in kept}

    def drop_prepared(self) -> None:
        """A front: forget a prepared reload that did not happen (its copies are closed)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            for m in pending.fresh:
                m.retire_in_background(0.0)
            if self.link is not None:
                self.link.send_states()

    def swap(self) -> bool:
        """A front: put the prepared reload in service (one step, no await); False when none is prepared."""
        pending, self._pending = self._pending, None
        if pending is None:
            return False
        old = self.registry
        self.config, self.keys, self.registry = pending.config, pending.keys, pending.registry
        live = {id(m) for m in pending.registry.models.values()}
        loop = asyncio.get_running_loop()
        for m in pending.fresh:
            if id(m) in live:
                m.calibrate_in_background(loop)
            else:
                m.retire_in_background(0.0)
        for m in old.models.values():
            if id(m) not in live:
                m.retire_in_background(pending.config.server.request_timeout_s)
        for listener in self.on_reload:
            listener()
        return True

    async def follow(self, config: GatewayConfig) -> None:
        """A front worker takes a config the runtime process has read without a prepared reload (a restarted
        runtime reads the file anew): its keys, limits, the models' description and its own per-worker copies."""
        await self.prepare(config)
        self.swap()

    @staticmethod
    def _keep_working(old: Registry, new: Registry, fresh: list[ServedModel]) -> list[str]:
        """Put back in `new` each working model whose changed version failed to load; their names."""
        kept: list[str] = []
        for m in fresh:
            prior = old.models.get(m.name)
            if m.state == ModelState.FAILED and prior is not None and prior.state == ModelState.READY:
                # A changed model that fails to load must not replace a working one.
                log.error("reload: model %r failed to load (%s); the previous version keeps serving", m.name, m.error)
                new.replace(prior)
                kept.append(m.name)
        return kept


@dataclass(eq=False)
class _Pending:
    """A front's reload, prepared (its per-worker copies loaded) and waiting for the runtime's swap."""

    config: GatewayConfig
    keys: KeyStore
    registry: Registry
    fresh: list[ServedModel]
