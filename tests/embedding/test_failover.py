"""Failover inside one embedding space: config checks, the circuit breaker, and a real upstream killed and
brought back under load while its model's requests go to a local fallback."""

from __future__ import annotations

import base64
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence

import httpx
import numpy as np
import pytest

from gateway import Backend, BackendOverloaded, BackendUnavailable, InputRejected, hookimpl
from gateway.base.circuit import CircuitBreaker, CircuitState
from gateway.base.config import ConfigError, parse_config

from ..conftest import AUTH, FakeBackend, make_app, serve, uvicorn_server, wait_until
from ..upstream import UPSTREAM_KEY, Upstream

# -- config ---------------------------------------------------------------------------------------------------

_TWO = """
[models.a]
backend = "fake"
path = "."
{a}
[models.b]
backend = "fake"
path = "."
{b}
"""


@pytest.mark.parametrize(
    ("a", "b", "needle"),
    [
        (
            "embedding_space = 'x'\nfallbacks = ['b']",
            "embedding_space = 'y'",
            "`$.models.a.fallbacks[0]`: model 'b' is in embedding space 'y', not 'x'; a fallback must produce "
            "interchangeable vectors",
        ),
        ("embedding_space = 'x'\nfallbacks = ['b']", "", "model 'b' is in embedding space None, not 'x'"),
        ("fallbacks = ['b']", "embedding_space = 'x'", "`$.models.a.embedding_space`: required with fallbacks"),
        ("embedding_space = 'x'\nfallbacks = ['c']", "", "`$.models.a.fallbacks[0]`: no model named 'c'"),
        ("embedding_space = 'x'\nfallbacks = ['a']", "", "`$.models.a.fallbacks[0]`: 'a' is the model itself"),
        (
            "embedding_space = 'x'\nfallbacks = ['b', 'b']",
            "embedding_space = 'x'",
            "`$.models.a.fallbacks[1]`: 'b' is listed twice",
        ),
        ("[models.a.circuit]\nfailures = 0", "", "`$.models.a.circuit.failures`"),
        ("[models.a.circuit]\nopen = 3", "", "unknown field `open` - at `$.models.a.circuit`"),
    ],
)
def test_fallbacks_are_checked_at_config_load(a, b, needle):
    with pytest.raises(ConfigError) as info:
        parse_config(_TWO.format(a=a, b=b), "gw.toml")
    assert str(info.value).startswith("gw.toml: ")
    assert needle in str(info.value)


def test_fallbacks_in_one_space_are_accepted():
    config = parse_config(_TWO.format(a="embedding_space = 'x'\nfallbacks = ['b']", b="embedding_space = 'x'"))
    assert config.models["a"].fallbacks == ["b"]
    assert (config.models["a"].circuit.failures, config.models["a"].circuit.open_s) == (3, 5.0)


# -- the circuit breaker ----------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_circuit_opens_after_consecutive_failures_and_probes_back():
    clock = Clock()
    c = CircuitBreaker("m", failures=3, open_s=5, clock=clock)
    c.failure()
    c.failure()
    c.success()  # not consecutive: starts over
    c.failure()
    c.failure()
    assert c.state == CircuitState.CLOSED and c.allow()
    c.failure()
    assert c.state == CircuitState.OPEN and not c.allow()
    clock.now += 2
    assert c.retry_after() == pytest.approx(3)
    clock.now += 3
    assert c.state == CircuitState.HALF_OPEN
    assert c.allow()  # the probe
    assert not c.allow()  # one at a time
    c.failure()  # the probe failed: open again, for the full time
    assert c.state == CircuitState.OPEN and c.retry_after() == pytest.approx(5)
    clock.now += 5
    assert c.allow()
    clock.now += 5  # a probe that never reported (refused, cancelled) does not hold the circuit forever
    assert c.allow()
    c.success()
    assert c.state == CircuitState.CLOSED and c.allow() and c.allow()


# -- typed failures through the batcher ---------------------------------------------------------------------------


class TypedFailureBackend(FakeBackend):
    """Raises the typed failure a text names: "reject", "busy" or "down"; waits for company first."""

    name = "typed"

    def embed(self, texts: Sequence[str], token_ids: Sequence[Sequence[int]]) -> np.ndarray:
        if self.options.delay_s:
            time.sleep(self.options.delay_s)
        joined = " ".join(texts)
        if "reject" in joined:
            raise InputRejected("the runtime rejected an input")
        if "busy" in joined:
            raise BackendOverloaded("the runtime is busy", retry_after=7.2)
        if "down" in joined:
            raise BackendUnavailable("the runtime is down")
        return super().embed(texts, token_ids)


class TypedPlugin:
    @staticmethod
    @hookimpl
    def register_backends(register: Callable[[type[Backend]], None]) -> None:
        register(TypedFailureBackend)


@pytest.fixture(scope="module")
def typed_server() -> Iterator[str]:
    toml = """
    [models.t]
    backend = "typed"
    path = "."
    circuit = {failures = 100, open_s = 1}
    [models.t.options]
    max_tokens = 64
    """
    import textwrap

    app = make_app(textwrap.dedent(toml), plugins=(TypedPlugin,))
    with uvicorn_server(app) as (url, _):
        yield url


def _post(url: str, model: str, texts: list[str], **kw: object) -> httpx.Response:
    return httpx.post(f"{url}/v1/embeddings", json={"model": model, "input": texts, **kw}, headers=AUTH, timeout=30)


def test_typed_failures_answer_their_status(typed_server):
    r = _post(typed_server, "t", ["please reject me"])
    assert (r.status_code, r.json()["error"]["code"], r.json()["error"]["param"]) == (400, "input_rejected", "input")
    assert r.json()["error"]["message"] == "the runtime rejected an input"
    r = _post(typed_server, "t", ["busy now"])
    assert (r.status_code, r.json()["error"]["code"], r.headers["retry-after"]) == (429, "backend_overloaded", "8")
    r = _post(typed_server, "t", ["down again"])
    assert (r.status_code, r.json()["error"]["code"]) == (502, "backend_unavailable")
    assert r.json()["error"]["message"] == "the runtime is down"


def test_a_rejected_input_fails_only_its_request_in_a_shared_batch(typed_server):
    # The fake model's batches take 4 inputs: 12 concurrent requests share batches with the bad one.
    texts = [f"fine text {i}" for i in range(11)] + ["reject this"]
    barrier = threading.Barrier(len(texts))

    def one(t: str) -> int:
        barrier.wait()
        return _post(typed_server, "t", [t]).status_code

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(texts)) as pool:
        statuses = list(pool.map(one, texts))
    assert statuses == [200] * 11 + [400]


# -- local failover ------------------------------------------------------------------------------------------------


def test_a_model_that_failed_to_load_hands_its_requests_to_its_fallback():
    toml = """
    [models.wl-broken]
    backend = "wordllama"
    path = "pkg:wordllama"
    embedding_space = "l2_supercat"
    fallbacks = ["wl"]
    [models.wl-broken.options]
    weights = "no-such-file.safetensors"

    [models.wl]
    backend = "wordllama"
    path = "pkg:wordllama"
    embedding_space = "l2_supercat"
    """
    with serve(toml, plugins=()) as client:
        r = client.post("/v1/embeddings", json={"model": "wl-broken", "input": ["hello world"]})
        assert r.status_code == 200, r.text
        assert (r.headers["x-served-model"], r.json()["model"]) == ("wl", "wl-broken")
        direct = client.post("/v1/embeddings", json={"model": "wl", "input": ["hello world"]})
        assert r.json()["data"] == direct.json()["data"] and r.json()["usage"] == direct.json()["usage"]
        metrics = client.get("/metrics").text
        assert 'gateway_failovers_total{fallback="wl",model="wl-broken",reason="not_ready"} 1.0' in metrics


# -- a remote model whose upstream dies under load ------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> Iterator[Upstream]:
    up = Upstream(tmp_path_factory.mktemp("failover")).start()
    yield up
    up.stop()


@pytest.fixture(scope="module")
def failover_server(upstream) -> Iterator[str]:
    import textwrap

    base = f"{upstream.url}/v1"
    toml = f"""
    [models.remote]
    backend = "openai"
    embedding_space = "l2_supercat"
    fallbacks = ["local"]
    circuit = {{failures = 2, open_s = 1.0}}
    [models.remote.options]
    base_url = "{base}"
    model = "wordllama"
    api_key_env = "FAILOVER_TEST_KEY"

    [models.alone]
    backend = "openai"
    circuit = {{failures = 2, open_s = 30}}
    [models.alone.options]
    base_url = "{base}"
    model = "wordllama"
    api_key_env = "FAILOVER_TEST_KEY"

    [models.local]
    backend = "wordllama"
    path = "pkg:wordllama"
    embedding_space = "l2_supercat"
    """
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FAILOVER_TEST_KEY", UPSTREAM_KEY)
        app = make_app(textwrap.dedent(toml), plugins=())
        with uvicorn_server(app) as (url, _):
            yield url


def _vector(r: httpx.Response) -> np.ndarray:
    return np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), dtype="<f4")


def test_upstream_killed_under_load_fails_over_then_comes_back(failover_server, upstream):
    url = failover_server
    before = _post(url, "remote", ["hello world"], encoding_format="base64")
    assert before.status_code == 200 and before.headers["x-served-model"] == "remote"
    cards = {c["id"]: c for c in httpx.get(f"{url}/v1/models", headers=AUTH).json()["data"]}
    assert (cards["remote"]["fallbacks"], cards["remote"]["embedding_space"]) == (["local"], "l2_supercat")
    assert (cards["alone"]["fallbacks"], cards["local"]["embedding_space"]) == ([], "l2_supercat")
    local = _post(url, "local", ["hello world"], encoding_format="base64")
    assert np.array_equal(_vector(before), _vector(local))  # one space: the same vectors either way

    outcomes: Counter[tuple[int, str]] = Counter()
    lock = threading.Lock()
    stop = threading.Event()

    def client(i: int) -> None:
        with httpx.Client(headers=AUTH, timeout=30) as http:
            n = 0
            while not stop.is_set():
                r = http.post(f"{url}/v1/embeddings", json={"model": "remote", "input": [f"text {i} {n}"]})
                n += 1
                with lock:
                    outcomes[(r.status_code, r.headers.get("x-served-model", r.text))] += 1

    def seen(outcome: tuple[int, str]) -> bool:
        with lock:
            return outcomes[outcome] > 0

    def failed_over(reason: str) -> bool:
        return (
            f'gateway_failovers_total{{fallback="local",model="remote",reason="{reason}"}}'
            in httpx.get(f"{url}/metrics").text
        )

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: seen((200, "remote")), "load flowing to the upstream")
        upstream.kill()
        # Load while it is dead: its failure, then the open circuit, send requests to the fallback.
        wait_until(lambda: seen((200, "local")) and failed_over("unavailable"), "failover on the upstream's failure")
        wait_until(lambda: failed_over("circuit_open"), "failover on the open circuit")
        # Without a fallback: the upstream's failure, then the open circuit, each with its own status.
        statuses = [_post(url, "alone", ["x"]) for _ in range(3)]
        # An input the cache holds is still answered by the model whose circuit is open.
        cached = _post(url, "remote", ["hello world"], encoding_format="base64")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert set(outcomes) <= {(200, "remote"), (200, "local")}, outcomes
    assert outcomes[(200, "remote")] and outcomes[(200, "local")]
    assert [s.status_code for s in statuses] == [502, 502, 503]
    assert "is unreachable" in statuses[0].json()["error"]["message"]
    assert statuses[2].json()["error"]["code"] == "circuit_open"
    assert (cached.status_code, cached.headers["x-served-model"], cached.headers["x-cache-hits"]) == (
        200,
        "remote",
        "1",
    )
    assert np.array_equal(_vector(cached), _vector(before))

    metrics = httpx.get(f"{url}/metrics").text
    assert 'gateway_failovers_total{fallback="local",model="remote",reason="unavailable"}' in metrics
    assert 'gateway_failovers_total{fallback="local",model="remote",reason="circuit_open"}' in metrics
    assert 'gateway_circuit_state{model="alone"} 2.0' in metrics  # open
    assert 'gateway_circuit_state{model="local"} 0.0' in metrics

    upstream.start()  # same port: the half-open probe finds it and traffic returns
    deadline = time.monotonic() + 20
    served = ""
    n = 0
    while served != "remote" and time.monotonic() < deadline:
        n += 1
        r = _post(url, "remote", [f"back again {n}"], encoding_format="base64")  # new texts: not from the cache
        assert r.status_code == 200
        served = r.headers["x-served-model"]
        time.sleep(0.1)
    assert served == "remote"
    assert np.array_equal(
        _vector(_post(url, "remote", ["back again 1"], encoding_format="base64")),
        _vector(_post(url, "local", ["back again 1"], encoding_format="base64")),
    )
    assert 'gateway_circuit_state{model="remote"} 0.0' in httpx.get(f"{url}/metrics").text  # closed again
