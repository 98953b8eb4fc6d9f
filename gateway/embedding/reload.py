"""Reloading a running gateway: the next config's keys and registry built beside the running ones, the models that
still work kept, one swap; at a front worker, the two steps (prepare, swap) the runtime process drives. A module
of its own because the all-or-nothing reload is a job apart from the running state it replaces
(gateway/embedding/state.py)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import msgspec

from gateway.base.config import ConfigError, GatewayConfig, load_config
from gateway.base.schemas import ReloadResult
from gateway.runtime.link import RuntimeLink
from gateway.runtime.registry import BatchObserver, ModelSpec, ModelState, Registry, ServedModel
from gateway.shared.keys import KeyStore

log = logging.getLogger("gateway")

# [server] settings fixed when the server starts (the others follow a reload).
_RESTART_FIELDS = (
    "host",
    "port",
    "max_body_bytes",
    "access_log",
    "log_level",
    # uvicorn's settings (gateway/api/server.py), fixed when it starts.
    "header_timeout_s",
    "send_timeout_s",
    "keep_alive_s",
    "max_connections",
    "max_header_bytes",
    # The process layout (gateway/processes/supervisor.py).
    "workers",
)


class Reloadable(Protocol):
    """What a reload reads and replaces: the running gateway (gateway/embedding/state.py's Gateway)."""

    config: GatewayConfig
    keys: KeyStore
    registry: Registry
    config_path: str | None
    on_batch: BatchObserver | None
    on_reload: list[Callable[[], None]]
    link: RuntimeLink | None

    def specs_for(self, config: GatewayConfig) -> dict[str, ModelSpec]: ...

    def keys_for(self, config: GatewayConfig) -> KeyStore: ...

    def here(self, spec: ModelSpec) -> bool: ...

    def state_of(self, model: ServedModel) -> tuple[str, tuple[int, int] | None]: ...


@dataclass(eq=False)
class _Next:
    """A reload's next set, built beside the running one; `fresh`: its models not kept from the running registry
    (at a front, a prepared reload waiting for the runtime's swap)."""

    config: GatewayConfig
    keys: KeyStore
    registry: Registry
    fresh: list[ServedModel]


class Reloader:
    """Replaces a gateway's `config`, `keys` and `registry` whole (one assignment each, on the event loop, no
    await between), so a request sees either the old or the new set, never a mix within one lookup."""

    def __init__(self, gw: Reloadable) -> None:
        self.gw = gw
        self._lock = asyncio.Lock()
        #: The runtime process: has every front load the new config's per-worker copies before a reload swaps
        #: (their load failures, by model), and tells them to drop those when the reload does not happen.
        self.prepare_fronts: Callable[[GatewayConfig], Awaitable[dict[str, str]]] | None = None
        self.abort_fronts: Callable[[], None] | None = None
        # A front: the reload prepared, put in service when the runtime's generation moves.
        self._pending: _Next | None = None

    @property
    def prepared(self) -> Registry | None:
        """A front: the registry of the reload prepared and not yet swapped in, if any."""
        return self._pending.registry if self._pending is not None else None

    async def reload(self) -> ReloadResult:
        """Re-read the config file: load new/changed models beside the old ones, swap, retire the old.

        All or nothing: everything that can refuse the file (its models' specs, its keys) is checked before a
        model loads, the config, keys and models are swapped in one step, and a reload that fails or is
        cancelled after loading closes the models it loaded (the running ones never stop serving)."""
        if self.gw.config_path is None:
            raise ConfigError("this gateway was not started from a config file; nothing to reload")
        async with self._lock:
            loop = asyncio.get_running_loop()
            config = await loop.run_in_executor(None, load_config, self.gw.config_path)
            old = self.gw.registry
            new = self._next(config, old)
            try:
                result = await self._load(new, old)
            except BaseException:
                # Refused or cancelled after loading: nothing was swapped, and what was loaded for it goes (once
                # its load ends, which a cancelled wait does not stop).
                for m in new.fresh:
                    m.retire_in_background(0.0)
                if self.abort_fronts is not None:
                    self.abort_fronts()
                raise
            _warn_restart(self.gw.config, config)
            self._swap_in(new)
            log.info("config reloaded: %s", msgspec.json.encode(result).decode())
            self._tell_listeners()
            return result

    async def prepare(self, config: GatewayConfig) -> dict[str, str]:
        """A front worker: load `config`'s new per-worker copies beside the running ones (`swap` puts them in
        service); the load failures, by model. Errors in `config` itself raise ConfigError."""
        async with self._lock:
            self.drop_prepared()
            old = self.gw.registry
            new = self._next(config, old)
            local = [m for m in new.fresh if not m.elsewhere]
            await asyncio.get_running_loop().run_in_executor(None, lambda: [m.load() for m in local])
            kept = _keep_working(old, new.registry, local)
            self._pending = new
            if self.gw.link is not None:
                self.gw.link.send_states()  # before the answer, on the same connection: the runtime has them first
            return {m.name: m.error or "" for m in local if m.state == ModelState.FAILED and m.name not in kept}

    def drop_prepared(self) -> None:
        """A front: forget a prepared reload that did not happen (its copies are closed)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            for m in pending.fresh:
                m.retire_in_background(0.0)
            if self.gw.link is not None:
                self.gw.link.send_states()

    def swap(self) -> bool:
        """A front: put the prepared reload in service (one step, no await); False when none is prepared."""
        pending, self._pending = self._pending, None
        if pending is None:
            return False
        self._swap_in(pending)
        self._tell_listeners()
        return True

    async def follow(self, config: GatewayConfig) -> None:
        """A front worker takes a config the runtime process has read without a prepared reload (a restarted
        runtime reads the file anew): its keys, limits, the models' description and its own per-worker copies."""
        await self.prepare(config)
        self.swap()

    def _next(self, config: GatewayConfig, old: Registry) -> _Next:
        """`config`'s keys and registry, built beside `old` (the running one): the models it keeps as they are,
        the others new and not loaded yet, those loaded elsewhere marked so (never loaded here)."""
        specs = self.gw.specs_for(config)
        keys = self.gw.keys_for(config)
        registry = Registry(specs, reuse=old.models, on_batch=self.gw.on_batch)
        previous = {id(m) for m in old.models.values()}
        fresh = [m for m in registry.models.values() if id(m) not in previous]
        for m in fresh:
            if not self.gw.here(m.spec):
                m.skip()
        return _Next(config, keys, registry, fresh)

    async def _load(self, new: _Next, old: Registry) -> ReloadResult:
        """Load `new`'s fresh models here and every front's new per-worker copies, keeping each working model of
        `old` whose changed version failed; what the reload answers."""
        fresh = new.fresh
        # Loaded off the loop, one at a time, while the old models keep serving.
        await asyncio.get_running_loop().run_in_executor(None, lambda: [m.load() for m in fresh if not m.elsewhere])
        kept_old = _keep_working(old, new.registry, fresh)
        failed = {m.name: m.error or "" for m in fresh if m.state == ModelState.FAILED}
        if self.prepare_fronts is not None:
            # Every front loads its new per-worker copies now, beside the old: the swap must find them ready in
            # every front before this reload is answered.
            failed.update(await self.prepare_fronts(new.config))
        models = new.registry.models
        return ReloadResult(
            status="reloaded",
            added=sorted(n for n in models if n not in old.models),
            changed=sorted(m.name for m in fresh if m.name in old.models and m.name not in kept_old),
            removed=sorted(n for n in old.models if n not in models),
            failed=failed,
            models={n: self.gw.state_of(m)[0] for n, m in models.items()},
        )

    def _swap_in(self, new: _Next) -> None:
        """The one swap, then the fresh models in service calibrate and the others, and the old ones replaced,
        retire."""
        gw = self.gw
        old = gw.registry
        # No await between these assignments, so a request sees the old set or the new one.
        gw.config, gw.keys, gw.registry = new.config, new.keys, new.registry
        live = {id(m) for m in new.registry.models.values()}
        loop = asyncio.get_running_loop()
        for m in new.fresh:
            if id(m) in live:
                m.calibrate_in_background(loop)
            else:
                m.retire_in_background(0.0)  # failed to load, and the previous version kept serving
        for m in old.models.values():
            if id(m) not in live:
                m.retire_in_background(new.config.server.request_timeout_s)

    def _tell_listeners(self) -> None:
        for listener in self.gw.on_reload:
            listener()


def _warn_restart(running: GatewayConfig, config: GatewayConfig) -> None:
    """Warn of the settings in `config` that differ from the `running` ones and only a restart applies."""
    restart = [f for f in _RESTART_FIELDS if getattr(config.server, f) != getattr(running.server, f)]
    if restart:
        log.warning("reload: [server] %s changed; that takes a restart to apply", ", ".join(restart))
    for table in ("cache", "redis"):
        if getattr(config, table) != getattr(running, table):
            log.warning("reload: [%s] changed; that takes a restart to apply", table)


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
