"""Plugin manager: bundled and third-party backends load the same way, from one entry-point group."""

from __future__ import annotations

import importlib.metadata
import logging
from typing import TYPE_CHECKING

import pluggy

from . import hookspecs

if TYPE_CHECKING:
    from .backend import Backend, Converter


log = logging.getLogger("gateway.plugins")

#: Entry points that failed to import, by name -> reason (shown when a model asks for that backend).
BROKEN: dict[str, str] = {}


class PluginError(Exception):
    """Two plugins claim the same name, or a plugin registers something malformed."""


def get_plugin_manager(*, entry_points: bool = True) -> pluggy.PluginManager:
    """A fresh manager with the hookspecs and (by default) every `embedding_gateway` entry point loaded."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    if entry_points:
        _load_entry_points(pm)
    pm.check_pending()
    return pm


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    # pluggy's load_setuptools_entrypoints stops at the first plugin that fails to import; one broken
    # plugin (say, a missing optional runtime) must not take the other backends down with it.
    for ep in importlib.metadata.entry_points(group=hookspecs.PROJECT):
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        try:
            plugin = ep.load()
        except Exception as exc:
            BROKEN[ep.name] = f"{type(exc).__name__}: {exc}"
            log.warning("plugin %r (%s) failed to import: %s", ep.name, ep.value, BROKEN[ep.name])
            continue
        pm.register(plugin, name=ep.name)


def collect_backends(pm: pluggy.PluginManager) -> dict[str, type[Backend]]:
    """Backend classes by name; a name claimed twice is an error naming both plugins."""
    from .backend import Backend

    found: dict[str, type[Backend]] = {}
    owners: dict[str, str] = {}
    # Call each implementation on its own so a clash can name the plugin that registered each side.
    for impl in pm.hook.register_backends.get_hookimpls():
        plugin = impl.plugin_name

        def register(cls: type[Backend], plugin: str = plugin) -> None:
            if not (isinstance(cls, type) and issubclass(cls, Backend)):
                raise PluginError(f"plugin {plugin!r} registered {cls!r}, which is not a Backend subclass")
            name = getattr(cls, "name", None)
            if not isinstance(name, str) or not name:
                raise PluginError(f"plugin {plugin!r}: backend {cls.__qualname__} has no `name`")
            if name in found:
                raise PluginError(
                    f"backend name {name!r} is registered by both plugin {owners[name]!r} and plugin {plugin!r}"
                )
            found[name] = cls
            owners[name] = plugin

        impl.function(register=register)
    return found


def collect_converters(pm: pluggy.PluginManager) -> dict[str, Converter]:
    """Converters by target name (`gateway convert --to NAME`)."""
    found: dict[str, Converter] = {}

    def register(converter: Converter) -> None:
        if converter.name in found:
            raise PluginError(f"converter {converter.name!r} is registered twice")
        found[converter.name] = converter

    pm.hook.register_converters(register=register)
    return found
