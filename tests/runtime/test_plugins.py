"""Backends plug in through the `embedding_gateway` hook, bundled or third-party, with no core change."""

from __future__ import annotations

import importlib.metadata
import sys
import textwrap
import types

import pytest

from gateway import ModelInfo, hookimpl
from gateway.runtime.plugins import PluginError, load_plugins
from gateway.runtime.registry import build_specs

from ..conftest import FAKE_TOML, FakeBackend, FakePlugin, fake_vector, serve


def test_bundled_backends_come_from_entry_points():
    eps = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="embedding_gateway")}
    assert eps["torch"] == "gateway_torch"
    assert "torch" in load_plugins().backends()


def _add_entry_point(monkeypatch, name: str, value: str) -> None:
    """As if an installed distribution declared `name = value` in the `embedding_gateway` group."""
    ep = importlib.metadata.EntryPoint(name, value, "embedding_gateway")
    real = importlib.metadata.entry_points

    def entry_points(**kw):
        found = real(**kw)
        return importlib.metadata.EntryPoints([*found, ep]) if kw.get("group") == "embedding_gateway" else found

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)


def test_third_party_backend_via_entry_point(monkeypatch, tmp_path):
    """An installed distribution's entry point is all it takes: the gateway serves its model from config."""
    module = types.ModuleType("acme_gateway_backend")
    module.register_backends = FakePlugin.register_backends  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "acme_gateway_backend", module)
    _add_entry_point(monkeypatch, "acme", "acme_gateway_backend")
    plugins = load_plugins()
    assert plugins.manager.get_plugin("acme") is module
    assert plugins.backends()["fake"] is FakeBackend

    with serve(FAKE_TOML, plugins=()) as client:  # nothing registered by hand
        r = client.post("/v1/embeddings", json={"model": "fake", "input": ["a b", "c"]})
        assert r.status_code == 200
        assert r.json()["data"][1]["embedding"] == pytest.approx(fake_vector("c").tolist(), abs=1e-6)


def test_broken_plugin_does_not_take_the_others_down(monkeypatch):
    _add_entry_point(monkeypatch, "brokenbackend", "no_such_module_xyz")
    plugins = load_plugins()
    backends = plugins.backends()
    assert "torch" in backends
    assert "No module named 'no_such_module_xyz'" in plugins.broken["brokenbackend"]
    from gateway.base.config import ConfigError, parse_config

    config = parse_config('[models.m]\nbackend = "brokenbackend"\npath = "."\n')
    with pytest.raises(ConfigError, match="plugin 'brokenbackend' failed to import"):
        build_specs(config, backends, broken=plugins.broken)


def test_duplicate_backend_name_names_both_plugins():
    class Other:
        @staticmethod
        @hookimpl
        def register_backends(register):
            register(FakeBackend)

    plugins = load_plugins(entry_points=False)
    plugins.register(FakePlugin, name="first")
    plugins.register(Other, name="second")
    with pytest.raises(PluginError, match=r"'fake' is registered by both plugin '(first|second)' and plugin"):
        plugins.backends()


def test_registering_a_non_backend_is_an_error():
    class Bad:
        @staticmethod
        @hookimpl
        def register_backends(register):
            register(object)

    plugins = load_plugins(entry_points=False)
    plugins.register(Bad, name="bad")
    with pytest.raises(PluginError, match=r"plugin 'bad' registered .* not a Backend subclass"):
        plugins.backends()


def test_backend_options_validated_with_key_path():
    from gateway.base.config import ConfigError, parse_config

    plugins = load_plugins()
    plugins.register(FakePlugin)
    config = parse_config(textwrap.dedent(FAKE_TOML) + "[models.fake.options]\ndimensoin = 4\n")
    with pytest.raises(ConfigError, match=r"unknown field `dimensoin` - at `\$.models.fake.options`"):
        build_specs(config, plugins.backends())


def _plugin_for(cls):
    class Plugin:
        @staticmethod
        @hookimpl
        def register_backends(register):
            register(cls)

    return Plugin


def _plugin_with(cls):
    plugins = load_plugins(entry_points=False)
    plugins.register(_plugin_for(cls), name="acme")
    return plugins


def test_a_backend_that_leaves_part_of_the_contract_out_is_refused_at_registration():
    import numpy as np

    from gateway import Backend, ModelInfo

    class NoTokenizer(Backend):
        name = "no-tokenizer"

        def load(self):
            return ModelInfo(dimension=2, max_input_tokens=8, normalized=False)

        def embed(self, texts, token_ids):
            return np.zeros((len(texts), 2), np.float32)

    with pytest.raises(PluginError, match=r"plugin 'acme': backend .*NoTokenizer does not implement tokenize"):
        _plugin_with(NoTokenizer).backends()

    class OldEmbed(NoTokenizer):
        name = "old-embed"

        def tokenize(self, texts):
            return [[1] for _ in texts]

        def embed(self, texts):  # the signature before token ids
            return np.zeros((len(texts), 2), np.float32)

    with pytest.raises(PluginError, match=r"backend .*OldEmbed: embed must take \(texts, token_ids\)"):
        _plugin_with(OldEmbed).backends()

    class NoWork(Backend):
        # `embed` is optional for a backend that scores pairs instead; one that does neither serves nothing.
        name = "no-work"

        def load(self):
            return ModelInfo(dimension=2, max_input_tokens=8, normalized=False)

        def tokenize(self, texts):
            return [[1] for _ in texts]

    with pytest.raises(PluginError, match=r"backend .*NoWork implements neither `embed` nor `score`"):
        _plugin_with(NoWork).backends()


@pytest.mark.parametrize(
    ("returned", "reason"),
    [
        ("dict", "load() returned dict, not a ModelInfo"),
        ("zero-batch", "load() returned an invalid ModelInfo: Expected `int` >= 1 - at `$.max_batch_size`"),
    ],
)
def test_what_load_declares_is_checked_and_a_bad_declaration_fails_that_model(returned, reason):
    """A ModelInfo out of range fails the load with a reason naming the backend and model (503), not the
    first request (500); the other models serve."""
    from ..conftest import FakeBackend

    class Declares(FakeBackend):
        name = "declares"

        def load(self):
            if returned == "dict":
                return {"dimension": 8}
            return ModelInfo(dimension=8, max_input_tokens=16, normalized=True, max_batch_size=0)

    toml = FAKE_TOML + '\n[models.odd]\nbackend = "declares"\npath = "."\n'
    with serve(toml, plugins=(FakePlugin, _plugin_for(Declares))) as client:
        r = client.post("/v1/embeddings", json={"model": "odd", "input": "x"})
        assert r.status_code == 503
        assert f"backend 'declares' (model 'odd'): {reason}" in r.json()["error"]["message"]
        assert client.post("/v1/embeddings", json={"model": "fake", "input": "x"}).status_code == 200


def _readme_plugin() -> str:
    """The plugin example of README.md, as a user would copy it."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Writing a backend plugin", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readme_plugin_example_plugs_in_through_an_entry_point_and_serves(monkeypatch, tmp_path):
    import numpy as np

    package = tmp_path / "acme_backend"
    package.mkdir()
    (package / "__init__.py").write_text(_readme_plugin())
    monkeypatch.syspath_prepend(str(tmp_path))
    _add_entry_point(monkeypatch, "acme", "acme_backend")
    import acme_backend

    toml = '[models.words]\nbackend = "hashing"\npath = "."\n[models.words.options]\ndimension = 64\n'
    with serve(toml, plugins=()) as client:
        r = client.post("/v1/embeddings", json={"model": "words", "input": ["the food was good", "good food"]})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["usage"]["total_tokens"] == 6
        got = np.array([d["embedding"] for d in body["data"]])
        assert got.shape == (2, 64)
        backend = acme_backend.HashingBackend(model="m", path=".", options=acme_backend.HashingOptions(dimension=64))
        backend.load()
        texts = ["the food was good", "good food"]
        np.testing.assert_allclose(got, backend.embed(texts, backend.tokenize(texts)), atol=1e-6)
        card = client.get("/v1/models").json()["data"][0]
        assert card["backend"] == "hashing" and card["dimension"] == 64
