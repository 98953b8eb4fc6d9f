"""Plugin manager: bundled and third-party backends load the same way, from one entry-point group."""

from __future__ import annotations

import importlib.metadata
import inspect
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pluggy

from gateway import plugin as contract

if TYPE_CHECKING:
    from gateway.plugin import Backend, Converter, Placement


log = logging.getLogger("gateway.plugins")


class PluginError(Exception):
    """Two plugins claim the same name, or a plugin registers something malformed."""


@dataclass
class Plugins:
    """The plugin manager, and the entry points that failed to import (name -> reason), which are named
    when a model asks for their backend."""

    manager: pluggy.PluginManager
    broken: dict[str, str] = field(default_factory=dict)

    def register(self, plugin: object, name: str | None = None) -> None:
        """Add a plugin object (tests, embedding applications) beside the installed ones."""
        self.manager.register(plugin, name=name)

    def backends(self) -> dict[str, type[Backend]]:
        """Backend classes by name; a name claimed twice, or a class that breaks the contract, is an error
        naming its plugin."""
        found: dict[str, type[Backend]] = {}
        owners: dict[str, str] = {}
        # Each implementation is called on its own so a clash can name the plugin behind each side.
        for impl in self.manager.hook.register_backends.get_hookimpls():
            plugin = impl.plugin_name

            def register(cls: type[Backend], plugin: str = plugin) -> None:
                name = _check_backend(cls, plugin)
                if name in found:
                    raise PluginError(
                        f"backend name {name!r} is registered by both plugin {owners[name]!r} and plugin {plugin!r}"
                    )
                found[name] = cls
                owners[name] = plugin

            impl.function(register=register)
        return found

    def placements(self) -> dict[str, type[Placement]]:
        """Placement classes by name (the in-process default among them); a name claimed twice is an error."""
        found: dict[str, type[Placement]] = {}

        def register(cls: type[Placement]) -> None:
            if cls.name in found:
                raise PluginError(f"placement {cls.name!r} is registered twice")
            found[cls.name] = cls

        self.manager.hook.register_placements(register=register)
        return found

    def converters(self) -> dict[str, Converter]:
        """Converters by target name (`gateway convert --to NAME`)."""
        found: dict[str, Converter] = {}

        def register(converter: Converter) -> None:
            if converter.name in found:
                raise PluginError(f"converter {converter.name!r} is registered twice")
            found[converter.name] = converter

        self.manager.hook.register_converters(register=register)
        return found


def load_plugins(*, entry_points: bool = True) -> Plugins:
    """A fresh manager with the hookspecs and (by default) every `embedding_gateway` entry point loaded."""
    pm = pluggy.PluginManager(contract.PROJECT)
    pm.add_hookspecs(contract)
    plugins = Plugins(pm)
    # The default placement is a plugin of the core, registered through the same hook as any other.
    from gateway.runtime import placement

    pm.register(placement, name="gateway.placement")
    if entry_points:
        _load_entry_points(plugins)
    pm.check_pending()
    return plugins


def _load_entry_points(plugins: Plugins) -> None:
    # pluggy's load_setuptools_entrypoints stops at the first plugin that fails to import; one broken
    # plugin (say, a missing optional runtime) must not take the other backends down with it.
    pm = plugins.manager
    for ep in importlib.metadata.entry_points(group=contract.PROJECT):
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        try:
            plugin = ep.load()
        except Exception as exc:
            plugins.broken[ep.name] = f"{type(exc).__name__}: {exc}"
            log.warning("plugin %r (%s) failed to import: %s", ep.name, ep.value, plugins.broken[ep.name])
            continue
        pm.register(plugin, name=ep.name)


def _check_backend(cls: object, plugin: str) -> str:
    """The backend's name, once its class is known to keep the contract (PluginError naming it if not)."""
    from gateway.plugin import Backend

    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise PluginError(f"plugin {plugin!r} registered {cls!r}, which is not a Backend subclass")
    where = f"plugin {plugin!r}: backend {cls.__qualname__}"
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise PluginError(f"{where} has no `name`")
    missing = sorted(getattr(cls, "__abstractmethods__", ()))
    if missing:
        raise PluginError(f"{where} does not implement {', '.join(missing)}")
    if cls.embed is Backend.embed and not cls.can_score():
        raise PluginError(f"{where} implements neither `embed` nor `score`")
    try:
        inspect.signature(cls.embed).bind(None, ["text"], [[1]])
    except TypeError:
        raise PluginError(f"{where}: embed must take (texts, token_ids)") from None
    return name
