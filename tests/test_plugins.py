"""Backends plug in through the `embedding_gateway` hook, bundled or third-party, with no core change."""

from __future__ import annotations

import importlib.metadata
import sys
import textwrap
import types

import pytest

from gateway import hookimpl
from gateway.plugins import BROKEN, PluginError, collect_backends, get_plugin_manager
from gateway.registry import build_specs

from .conftest import FAKE_TOML, FakeBackend, FakePlugin, fake_vector, serve


def test_bundled_backends_come_from_entry_points():
    eps = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="embedding_gateway")}
    assert eps["torch"] == "gateway_torch"
    assert "torch" in collect_backends(get_plugin_manager())


def test_third_party_backend_via_entry_point(monkeypatch, tmp_path):
    """An installed distribution's entry point is all it takes: the gateway serves its model from config."""
    module = types.ModuleType("acme_gateway_backend")
    module.register_backends = FakePlugin.register_backends  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "acme_gateway_backend", module)
    ep = importlib.metadata.EntryPoint("acme", "acme_gateway_backend", "embedding_gateway")
    real = importlib.metadata.entry_points

    def entry_points(**kw):
        found = real(**kw)
        return importlib.metadata.EntryPoints([*found, ep]) if kw.get("group") == "embedding_gateway" else found

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    pm = get_plugin_manager()
    assert pm.get_plugin("acme") is module
    assert collect_backends(pm)["fake"] is FakeBackend

    with serve(FAKE_TOML, plugins=()) as client:  # nothing registered by hand
        r = client.post("/v1/embeddings", json={"model": "fake", "input": ["a b", "c"]})
        assert r.status_code == 200
        assert r.json()["data"][1]["embedding"] == pytest.approx(fake_vector("c").tolist(), abs=1e-6)


def test_broken_plugin_does_not_take_the_others_down(monkeypatch):
    ep = importlib.metadata.EntryPoint("brokenbackend", "no_such_module_xyz", "embedding_gateway")
    real = importlib.metadata.entry_points
    monkeypatch.setattr(
        importlib.metadata,
        "entry_points",
        lambda **kw: (
            importlib.metadata.EntryPoints([*real(**kw), ep]) if kw.get("group") == "embedding_gateway" else real(**kw)
        ),
    )
    backends = collect_backends(get_plugin_manager())
    assert "torch" in backends
    assert "No module named 'no_such_module_xyz'" in BROKEN["brokenbackend"]
    from gateway.config import ConfigError, parse_config

    config = parse_config('[models.m]\nbackend = "brokenbackend"\npath = "."\n')
    with pytest.raises(ConfigError, match="plugin 'brokenbackend' failed to import"):
        build_specs(config, backends)


def test_duplicate_backend_name_names_both_plugins():
    class Other:
        @staticmethod
        @hookimpl
        def register_backends(register):
            register(FakeBackend)

    pm = get_plugin_manager(entry_points=False)
    pm.register(FakePlugin, name="first")
    pm.register(Other, name="second")
    with pytest.raises(PluginError, match=r"'fake' is registered by both plugin '(first|second)' and plugin"):
        collect_backends(pm)


def test_registering_a_non_backend_is_an_error():
    class Bad:
        @staticmethod
        @hookimpl
        def register_backends(register):
            register(object)

    pm = get_plugin_manager(entry_points=False)
    pm.register(Bad, name="bad")
    with pytest.raises(PluginError, match=r"plugin 'bad' registered .* not a Backend subclass"):
        collect_backends(pm)


def test_backend_options_validated_with_key_path():
    from gateway.config import ConfigError, parse_config

    pm = get_plugin_manager()
    pm.register(FakePlugin)
    config = parse_config(textwrap.dedent(FAKE_TOML) + "[models.fake.options]\ndimensoin = 4\n")
    with pytest.raises(ConfigError, match=r"unknown field `dimensoin` - at `\$.models.fake.options`"):
        build_specs(config, collect_backends(pm))
