"""WordLlama plugin (`backend = "wordllama"`): loading, token counts, vectors and `dimensions` against the
wordllama package's own, errors, and the whole path through HTTP.

One model load per module (they take half a second each); the reference is the package's own `WordLlama.load`
on its bundled model, loaded offline as FACTS.md says.
"""

from __future__ import annotations

import base64
import importlib.metadata
import importlib.util
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import msgspec
import numpy as np
import pytest

pytest.importorskip("wordllama")

from gateway_static import WordLlamaBackend, WordLlamaOptions

from gateway.plugin import BackendError

from ..conftest import SENTENCES, assert_import_is_light, cosine, serve

#: The installed wordllama package's folder, found without importing it.
PKG = Path(importlib.util.find_spec("wordllama").submodule_search_locations[0])
WEIGHTS = PKG / "weights" / "l2_supercat_256.safetensors"
TOKENIZER = PKG / "tokenizers" / "l2_supercat_tokenizer_config.json"

TEXTS = [
    *SENTENCES,
    "Hello world!",
    "   ",  # whitespace only: tokens all the same, never an empty list
    "\n",
    "🦙",
    "<s> literal special-token text </s>",
]


def _load(path: Path | str = PKG, **options: object) -> WordLlamaBackend:
    backend = WordLlamaBackend(model="wl", path=str(path), options=WordLlamaOptions(**options))
    backend.load()
    return backend


def _package(trunc_dim: int | None = None):
    from wordllama import WordLlama

    return WordLlama.load(cache_dir=PKG, disable_download=True, trunc_dim=trunc_dim)


@pytest.fixture(scope="module")
def backend() -> WordLlamaBackend:
    return _load()


@pytest.fixture(scope="module")
def package():
    """The package's own model, loaded its own way: the reference for vectors and token ids."""
    return _package()


def _package_ids(package, texts: list[str]) -> list[list[int]]:
    # Its tokenizer pads a list to the longest text; the mask says which ids are the text's own.
    return [e.ids[: sum(e.attention_mask)] for e in package.tokenize(texts)]


# -- the plugin --------------------------------------------------------------------------------------------


def test_registered_through_entry_point():
    from gateway.runtime.plugins import load_plugins

    eps = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="embedding_gateway")}
    assert eps["wordllama"] == "gateway_static"
    assert load_plugins().backends()["wordllama"] is WordLlamaBackend


def test_import_is_light():
    assert_import_is_light("gateway_static", ["wordllama", "tokenizers", "safetensors", "pydantic", "requests", "toml"])


def test_options_are_strict_and_checked_at_config_load():
    from gateway.base.config import ConfigError, parse_config
    from gateway.runtime.plugins import load_plugins
    from gateway.runtime.registry import build_specs

    with pytest.raises(msgspec.ValidationError, match="unknown"):
        msgspec.convert({"max_input_tokens": 10}, WordLlamaOptions)
    with pytest.raises(msgspec.ValidationError, match=">= 1"):
        msgspec.convert({"input_limit": 0}, WordLlamaOptions)
    opts = msgspec.convert({"input_limit": 100, "normalize": False}, WordLlamaOptions)
    assert (opts.input_limit, opts.normalize, opts.weights, opts.tokenizer) == (100, False, None, None)
    toml = "[models.w]\nbackend = 'wordllama'\npath = 'pkg:wordllama'\n[models.w.options]\ntrunc_dim = 64\n"
    with pytest.raises(ConfigError, match=r"unknown field `trunc_dim` - at `\$.models.w.options`"):
        build_specs(parse_config(toml), load_plugins().backends())


def test_model_info(backend):
    info = backend.load()
    assert (info.dimension, info.max_input_tokens, info.normalized) == (256, 8192, True)
    assert info.local_tokenizer and not info.pads_to_longest
    assert info.max_batch_size == 256 and info.concurrent_batches == 1


def test_token_ids_are_the_packages(backend, package):
    ids = backend.tokenize(TEXTS)
    assert ids == _package_ids(package, TEXTS)
    # One text takes another path through the tokenizer than a list; the ids must not differ.
    assert [backend.tokenize([t])[0] for t in TEXTS] == ids
    assert backend.tokenize(["Hello world!"]) == [[15043, 3186, 29991]]  # no <s>: the package adds none
    assert all(ids)


def test_vectors_are_the_packages_bit_for_bit(backend, package):
    got = backend.embed(TEXTS, backend.tokenize(TEXTS))
    assert got.dtype == np.float32 and got.shape == (len(TEXTS), 256)
    np.testing.assert_array_equal(got, package.embed(TEXTS, norm=True))
    assert np.isfinite(got).all()


def test_embed_uses_the_ids_it_is_given(backend):
    a, b = "The cat sat on the mat.", "Quarterly revenue grew by four percent."
    ids = backend.tokenize([a, b])
    swapped = backend.embed([a, b], [ids[1], ids[0]])
    np.testing.assert_array_equal(swapped, backend.embed([b, a], [ids[1], ids[0]]))
    assert cosine(swapped[0], backend.embed([a], [ids[0]])[0]) < 0.9


def test_long_input_is_averaged_whole_in_the_packages_order(backend, package):
    # Over the gathering chunk (rows are summed in slices) and over the served limit: a direct caller gets
    # the mean of every token, as from the package, which truncates nothing either.
    text = " ".join(f"token{i % 97} sentence {i}" for i in range(2500))
    ids = backend.tokenize([text])
    assert len(ids[0]) > 8192 + 4096
    np.testing.assert_array_equal(backend.embed([text], ids), package.embed([text], norm=True))


def test_never_nan(backend):
    out = backend.embed(["", "x"], [[], backend.tokenize(["x"])[0]])
    assert np.isfinite(out).all()
    assert not out[0].any() and abs(np.linalg.norm(out[1]) - 1) < 1e-6
    assert backend.embed([], []).shape == (0, 256)


def test_plain_means_when_not_normalized(package):
    raw = _load(normalize=False)
    assert raw.load().normalized is False
    np.testing.assert_array_equal(raw.embed(TEXTS, raw.tokenize(TEXTS)), package.embed(TEXTS))


def test_not_loaded_is_an_error():
    fresh = WordLlamaBackend(model="wl", path=str(PKG), options=None)
    with pytest.raises(BackendError, match="model 'wl' is not loaded"):
        fresh.tokenize(["x"])
    with pytest.raises(BackendError, match="model 'wl' is not loaded"):
        fresh.embed(["x"], [[1]])


# -- loading: files, offline, the host's logging -----------------------------------------------------------


def test_loads_with_no_network(monkeypatch, tmp_path, package):
    import requests

    def refuse(*args, **kwargs):
        raise AssertionError("the network was reached for")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(requests.Session, "request", refuse)
    monkeypatch.setenv("HOME", str(tmp_path))  # the package's downloader creates ~/.cache/wordllama
    backend = _load()
    np.testing.assert_array_equal(
        backend.embed(TEXTS[:3], backend.tokenize(TEXTS[:3])), package.embed(TEXTS[:3], norm=True)
    )
    assert list(tmp_path.iterdir()) == []


def test_loading_leaves_the_root_logger_alone():
    # A fresh process: the package's import calls logging.basicConfig(level=INFO), which would give the
    # host's root logger a stderr handler and INFO level.
    code = textwrap.dedent(
        f"""
        import logging
        from gateway_static import WordLlamaBackend
        root = logging.getLogger()
        before = (list(root.handlers), root.level)
        WordLlamaBackend(model="wl", path={str(PKG)!r}, options=None).load()
        import sys
        assert "wordllama" in sys.modules
        assert (list(root.handlers), root.level) == before, (root.handlers, root.level)
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _model_dir(tmp_path: Path, matrix: np.ndarray | None = None, name: str = "model.safetensors") -> Path:
    """A user's WordLlama model folder: a safetensors matrix and the bundled tokenizer as tokenizer.json."""
    from safetensors.numpy import save_file

    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    if matrix is None:
        matrix = np.random.default_rng(0).standard_normal((32000, 16)).astype(np.float16)
    save_file({"embedding.weight": matrix}, str(folder / name))
    shutil.copy(TOKENIZER, folder / "tokenizer.json")
    return folder


def test_a_users_model_folder_and_file(tmp_path):
    from tokenizers import Tokenizer
    from wordllama import WordLlamaInference

    folder = _model_dir(tmp_path)
    matrix = np.random.default_rng(0).standard_normal((32000, 16)).astype(np.float16)
    reference = WordLlamaInference(matrix, Tokenizer.from_file(str(TOKENIZER))).embed(TEXTS, norm=True)
    for backend in (_load(folder), _load(folder / "model.safetensors")):
        assert backend.load().dimension == 16
        np.testing.assert_array_equal(backend.embed(TEXTS, backend.tokenize(TEXTS)), reference)


def test_files_named_by_options(tmp_path):
    folder = tmp_path / "cache"
    (folder / "weights").mkdir(parents=True)
    (folder / "tokenizers").mkdir()
    for name in ("l2_supercat_256.safetensors", "other_64.safetensors"):
        shutil.copy(WEIGHTS, folder / "weights" / name)
    shutil.copy(TOKENIZER, folder / "tokenizers" / "a.json")
    shutil.copy(TOKENIZER, folder / "tokenizers" / "b.json")
    with pytest.raises(BackendError, match=r"2 \*\.safetensors weights files in .*; set options.weights to one"):
        _load(folder)
    with pytest.raises(BackendError, match=r"2 tokenizer JSON files in .*; set options.tokenizer to one"):
        _load(folder, weights="weights/other_64.safetensors")
    backend = _load(folder, weights="weights/other_64.safetensors", tokenizer="tokenizers/b.json")
    assert backend.load().dimension == 256


@pytest.mark.parametrize(
    ("setup", "options", "needle"),
    [
        (lambda d: d / "absent", {}, r"WordLlama model path .*absent does not exist"),
        (lambda d: d, {}, r"no \*\.safetensors weights found in .*; set options.weights"),
        (
            lambda d: _model_dir(d),
            {"weights": "nope.safetensors"},
            r"options.weights: .*nope.safetensors is not a file",
        ),
        (lambda d: _model_dir(d), {"tokenizer": "t.json"}, r"options.tokenizer: .*t\.json is not a file"),
        (
            lambda d: _model_dir(d) / "model.safetensors",
            {"weights": "x.safetensors"},
            "options.weights is set, but path .* is already a weights file",
        ),
    ],
)
def test_missing_files_are_named(tmp_path, setup, options, needle):
    with pytest.raises(BackendError, match=needle):
        _load(setup(tmp_path), **options)


def test_no_tokenizer_is_named(tmp_path):
    folder = _model_dir(tmp_path)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(BackendError, match=r"no tokenizer JSON found in .*tokenizers/ or tokenizer/ subfolder"):
        _load(folder)


@pytest.mark.parametrize(
    ("break_it", "needle"),
    [
        (lambda d: (d / "model.safetensors").write_bytes(b"not safetensors"), "cannot read WordLlama weights"),
        (lambda d: (d / "tokenizer.json").write_text("{oops"), r"cannot load tokenizer .*tokenizer\.json"),
        (
            lambda d: _model_dir(d.parent, np.zeros((32000,), np.float32)),
            r"float32 \[32000\], not a float matrix \[vocabulary, dimension\]",
        ),
        (lambda d: _model_dir(d.parent, np.zeros((32000, 4), np.int8)), r"int8 \[32000, 4\], not a float matrix"),
        (
            lambda d: _model_dir(d.parent, np.zeros((1000, 4), np.float32)),
            r"tokenizer .*tokenizer\.json has 32000 tokens but .*model\.safetensors only 1000 rows",
        ),
        (
            lambda d: _model_dir(d.parent, np.full((32000, 4), np.nan, np.float32)),
            r"model\.safetensors holds NaN or infinite values",
        ),
    ],
)
def test_bad_model_files_fail_the_load_with_a_reason(tmp_path, break_it, needle):
    folder = _model_dir(tmp_path)
    break_it(folder)
    with pytest.raises(BackendError, match=needle):
        _load(folder)


def test_other_tensor_names(tmp_path):
    from safetensors.numpy import save_file

    folder = _model_dir(tmp_path)
    matrix = np.ones((32000, 4), np.float32)
    save_file({"weights": matrix}, str(folder / "model.safetensors"))
    assert _load(folder).load().dimension == 4  # the only tensor, whatever its name
    save_file({"a": matrix, "b": matrix}, str(folder / "model.safetensors"))
    with pytest.raises(BackendError, match=r"holds no 'embedding.weight' tensor \(it has 2: \['a', 'b'\]\)"):
        _load(folder)


# -- HTTP, through the app ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    empty = tmp_path_factory.mktemp("empty")
    toml = f"""
    [models.wordllama]
    backend = "wordllama"
    path = "pkg:wordllama"
    aliases = ["word-llama-l2-supercat"]
    matryoshka_dimensions = [64, 128, 256]

    [models.wordllama-short]
    backend = "wordllama"
    path = "pkg:wordllama"
    max_input_tokens = 16

    [models.wordllama-raw]
    backend = "wordllama"
    path = "{PKG}"
    matryoshka_dimensions = [64]
    options = {{ normalize = false, input_limit = 12000 }}

    [models.wordllama-broken]
    backend = "wordllama"
    path = "{empty}"
    """
    with serve(toml, plugins=()) as client:
        yield client


def _post(client, **body):
    return client.post("/v1/embeddings", json=body)


def _vectors(response) -> np.ndarray:
    """The response's vectors, bit-exact (base64 is the float32 bytes)."""
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    return np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in data])


def test_http_vectors_and_tokens_are_the_packages(client, package):
    r = _post(client, model="word-llama-l2-supercat", input=TEXTS, encoding_format="base64")
    np.testing.assert_array_equal(_vectors(r), package.embed(TEXTS, norm=True))
    body = r.json()
    assert body["model"] == "word-llama-l2-supercat"
    assert [d["index"] for d in body["data"]] == list(range(len(TEXTS)))
    total = sum(len(ids) for ids in _package_ids(package, TEXTS))
    assert body["usage"] == {"prompt_tokens": total, "total_tokens": total}


def test_http_single_string_and_floats(client, package):
    r = _post(client, model="wordllama", input="Hello world!")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    got = np.array(body["data"][0]["embedding"])
    assert got.shape == (256,)
    assert np.abs(got - package.embed(["Hello world!"], norm=True)[0]).max() <= 5e-10


@pytest.mark.parametrize("dims", [64, 128, 256])
def test_http_dimensions_equal_the_packages_truncated_model(client, dims):
    r = _post(client, model="wordllama", input=TEXTS, dimensions=dims, encoding_format="base64")
    got = _vectors(r)
    want = _package(trunc_dim=dims).embed(TEXTS, norm=True)
    assert got.shape == (len(TEXTS), dims)
    # Cut from the unit 256-value vector and re-normalized vs pooled from the cut table: one rounding apart.
    assert np.abs(got - want).max() < 1e-6
    assert min(cosine(g, w) for g, w in zip(got, want, strict=True)) > 1 - 1e-6
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-6)


def test_http_dimensions_on_plain_means_are_the_packages_exactly(client):
    # Not normalized: the cut is the package's truncated model's output, bit for bit.
    r = _post(client, model="wordllama-raw", input=TEXTS, dimensions=64, encoding_format="base64")
    np.testing.assert_array_equal(_vectors(r), _package(trunc_dim=64).embed(TEXTS))


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (
            {"model": "wordllama", "dimensions": 32},
            "`dimensions` 32 is not allowed for model 'wordllama'; allowed: [64, 128, 256]",
        ),
        (
            {"model": "wordllama", "dimensions": 100},
            "`dimensions` 100 is not allowed for model 'wordllama'; allowed: [64, 128, 256]",
        ),
        ({"model": "wordllama", "dimensions": 512}, "`dimensions` 512 is larger than the model's dimension 256"),
        ({"model": "wordllama", "dimensions": 0}, "`dimensions` must be a positive integer"),
        (
            {"model": "wordllama-short", "dimensions": 64},
            "model 'wordllama-short' does not support `dimensions` (it is not configured as Matryoshka)",
        ),
    ],
)
def test_http_dimensions_refused(client, body, needle):
    r = _post(client, input="x", **body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["type"], err["param"]) == ("invalid_request_error", "dimensions")
    assert needle in err["message"]


def _text_of(n_tokens: int) -> str:
    return " ".join(["word"] * n_tokens)  # "▁word" once per word


def test_http_input_limit(client, backend):
    assert len(backend.tokenize([_text_of(8192)])[0]) == 8192
    r = _post(client, model="wordllama", input=_text_of(8192))
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["total_tokens"] == 8192
    r = _post(client, model="wordllama", input=["ok", _text_of(8193)])
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"], err["code"]) == ("input[1]", "input_too_long")
    assert "`input[1]` has 8193 tokens" in err["message"] and "at most 8192 tokens" in err["message"]


def test_http_limits_from_config_and_options(client):
    r = _post(client, model="wordllama-short", input=_text_of(17))
    assert r.status_code == 400, r.text
    msg = r.json()["error"]["message"]
    assert "`input` has 17 tokens" in msg and "'wordllama-short' accepts at most 16 tokens" in msg
    assert _post(client, model="wordllama-short", input=_text_of(16)).status_code == 200
    assert _post(client, model="wordllama-raw", input=_text_of(12000)).status_code == 200
    r = _post(client, model="wordllama-raw", input=_text_of(12001))
    assert r.status_code == 400 and "has 12001 tokens" in r.json()["error"]["message"]


def test_http_whitespace_only_is_a_unit_vector(client):
    got = _vectors(_post(client, model="wordllama", input=["   ", "\t", "\n\n"], encoding_format="base64"))
    assert np.isfinite(got).all() and np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-6)


def test_http_models_lists_it(client):
    cards = {c["id"]: c for c in client.get("/v1/models").json()["data"]}
    card = cards["wordllama"]
    assert (card["backend"], card["state"], card["dimension"]) == ("wordllama", "ready", 256)
    assert card["max_input_tokens"] == 8192 and card["matryoshka_dimensions"] == [64, 128, 256]
    assert card["aliases"] == ["word-llama-l2-supercat"]
    assert cards["wordllama-short"]["max_input_tokens"] == 16
    assert cards["wordllama-raw"]["max_input_tokens"] == 12000


def test_http_a_model_that_fails_to_load_answers_503(client):
    cards = {c["id"]: c for c in client.get("/v1/models").json()["data"]}
    assert cards["wordllama-broken"]["state"] == "failed"
    assert "no *.safetensors weights found" in cards["wordllama-broken"]["error"]
    r = _post(client, model="wordllama-broken", input="x")
    assert r.status_code == 503, r.text
    assert "no *.safetensors weights found in" in r.json()["error"]["message"]
    assert "set options.weights" in r.json()["error"]["message"]


def test_default_config_serves_it():
    from gateway.base.config import load_config

    model = load_config(Path(__file__).resolve().parents[2] / "gateway.toml").models["wordllama"]
    assert (model.backend, model.matryoshka_dimensions) == ("wordllama", [64, 128, 256])
    assert "dleemiller/word-llama-l2-supercat" in model.aliases
    assert Path(model.path) == PKG
