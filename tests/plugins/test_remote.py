"""Remote backend (`backend = "openai"`) against a real upstream: another gateway process on a free port.

Vectors and token counts through the front equal the upstream's own; every upstream failure reaches the
client as our error (status, code, a message without the upstream's key or body), with a line for the
operator.
"""

from __future__ import annotations

import base64
import importlib.metadata
import logging
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import msgspec
import numpy as np
import openai
import pytest

from gateway.base.config import ConfigError, parse_config
from gateway.runtime.plugins import load_plugins
from gateway.runtime.registry import build_specs

from ..api.test_batches import _client, _lines, _run
from ..conftest import SENTENCES, assert_import_is_light, serve
from ..upstream import LIMITED_KEY, ROOT, UPSTREAM_KEY, ScriptedUpstream, Upstream, free_port

pytest.importorskip("httpx")

WRONG_KEY = "wrong-upstream-key-42"
INT8 = ROOT / "models" / "minilm-onnx-int8"


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> Iterator[Upstream]:
    up = Upstream(tmp_path_factory.mktemp("upstream")).start()
    yield up
    up.stop()


@pytest.fixture(scope="module")
def stalled() -> Iterator[str]:
    """A server that accepts connections and never answers (a hung upstream)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    sock.close()


@pytest.fixture(scope="module")
def front(upstream, stalled):
    """The gateway under test, every remote model in one app."""
    base = f"{upstream.url}/v1"
    fixed = "dimension = 256\nmax_input_tokens = 8192"
    toml = f"""
    [models.wl]
    backend = "openai"
    [models.wl.options]
    base_url = "{base}"
    model = "wordllama"
    api_key_env = "REMOTE_TEST_KEY"

    [models.wl-float]
    backend = "openai"
    [models.wl-float.options]
    base_url = "{base}"
    model = "wordllama"
    api_key_env = "REMOTE_TEST_KEY"
    encoding_format = "float"

    [models.mini]
    backend = "openai"
    [models.mini.options]
    base_url = "{base}"
    model = "minilm-int8"
    api_key_env = "REMOTE_TEST_KEY"
    tokenizer = "{INT8}"

    [models.mini-upcount]
    backend = "openai"
    [models.mini-upcount.options]
    base_url = "{base}"
    model = "minilm-int8"
    api_key_env = "REMOTE_TEST_KEY"

    [models.badkey]
    backend = "openai"
    [models.badkey.options]
    base_url = "{base}"
    model = "wordllama"
    api_key_env = "REMOTE_WRONG_KEY"
    {fixed}

    [models.limited]
    backend = "openai"
    [models.limited.options]
    base_url = "{base}"
    model = "wordllama"
    api_key_env = "REMOTE_LIMITED_KEY"
    {fixed}

    [models.stalled]
    backend = "openai"
    [models.stalled.options]
    base_url = "{stalled}"
    timeout_s = 0.5
    {fixed}

    [models.dead]
    backend = "openai"
    circuit = {{failures = 2, open_s = 60}}
    [models.dead.options]
    base_url = "http://127.0.0.1:{free_port()}/v1"
    {fixed}

    [models.dead-at-load]
    backend = "openai"
    [models.dead-at-load.options]
    base_url = "http://127.0.0.1:{free_port()}/v1"

    [models.noenv]
    backend = "openai"
    [models.noenv.options]
    base_url = "{base}"
    api_key_env = "REMOTE_UNSET_VARIABLE"
    """
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REMOTE_TEST_KEY", UPSTREAM_KEY)
        mp.setenv("REMOTE_WRONG_KEY", WRONG_KEY)
        mp.setenv("REMOTE_LIMITED_KEY", LIMITED_KEY)
        mp.delenv("REMOTE_UNSET_VARIABLE", raising=False)
        with serve(toml, plugins=()) as client:
            yield client


def _post(client, model, texts, **extra):
    return client.post("/v1/embeddings", json={"model": model, "input": texts, **extra})


def _vectors(body: dict) -> np.ndarray:
    return np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in body["data"]])


def _error(r, status: int, code: str, *needles: str) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code, err
    for needle in needles:
        assert needle in err["message"], err["message"]
    for secret in (UPSTREAM_KEY, WRONG_KEY, LIMITED_KEY):
        assert secret not in r.text
    return err["message"]


# -- the plugin ---------------------------------------------------------------------------------------------


def test_registered_through_entry_point_and_import_is_light():
    from gateway_remote import OpenAIBackend

    eps = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="embedding_gateway")}
    assert eps["openai"] == "gateway_remote"
    assert load_plugins().backends()["openai"] is OpenAIBackend
    assert_import_is_light("gateway_remote", ["httpx", "tokenizers"])


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("[models.r.options]\nbase_url = 'ftp://x'\n", "base_url must be an http:// or https:// URL"),
        ("[models.r.options]\nbase_url = 'http://x'\napi_key = 'sk-1'\n", "unknown field `api_key`"),
        ("[models.r.options]\nbase_url = 'http://x'\ntimeout_s = 0\n", "`$.models.r.options.timeout_s`"),
        ("path = '.'\n[models.r.options]\nbase_url = 'http://x'\n", "`$.models.r.path`: backend 'openai' takes no"),
        ("", "missing required field `base_url` - at `$.models.r.options`"),
    ],
)
def test_options_are_checked_at_config_load(body, needle):
    toml = "[models.r]\nbackend = 'openai'\n" + body
    with pytest.raises(ConfigError) as info:
        build_specs(parse_config(toml, "gw.toml"), load_plugins().backends(), "gw.toml")
    assert needle in str(info.value)


def test_a_local_backend_still_needs_a_path():
    with pytest.raises(ConfigError, match=r"`\$.models.m.path`: backend 'wordllama' needs a model path"):
        build_specs(parse_config("[models.m]\nbackend = 'wordllama'\n"), load_plugins().backends())


# -- vectors and tokens ---------------------------------------------------------------------------------------


def test_vectors_and_usage_equal_the_upstreams(front, upstream):
    texts = SENTENCES[:6]
    r = _post(front, "wl", texts, encoding_format="base64")
    assert r.status_code == 200, r.text
    assert r.headers["x-served-model"] == "wl"
    own = upstream.embed("wordllama", texts)
    # Bit-exact: the same float32 bytes (cosine 1.0); usage is the upstream's own count.
    assert [d["embedding"] for d in r.json()["data"]] == [d["embedding"] for d in own["data"]]
    assert r.json()["usage"] == own["usage"]
    assert r.json()["model"] == "wl"
    card = next(m for m in front.get("/v1/models").json()["data"] if m["id"] == "wl")
    # Learned from the upstream's /v1/models card.
    assert (card["backend"], card["dimension"], card["max_input_tokens"]) == ("openai", 256, 8192)


def test_float_transfer_for_upstreams_without_base64(front, upstream):
    r = _post(front, "wl-float", SENTENCES[:3], encoding_format="base64")
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(_vectors(r.json()), _vectors(upstream.embed("wordllama", SENTENCES[:3])), atol=1e-9)


def test_dimensions_are_cut_by_the_front(front, upstream):
    r = _post(front, "wl", ["hello world"], dimensions=64)
    assert r.status_code == 400  # wl is not configured as Matryoshka here: the front's own check
    assert r.json()["error"]["code"] == "dimensions_not_supported"


def test_local_tokenizer_counts_as_the_upstream(front, upstream):
    texts = SENTENCES
    r = _post(front, "mini", texts, encoding_format="base64")
    assert r.status_code == 200, r.text
    own = upstream.embed("minilm-int8", texts)
    assert r.json()["usage"] == own["usage"]
    assert [d["embedding"] for d in r.json()["data"]] == [d["embedding"] for d in own["data"]]
    card = next(m for m in front.get("/v1/models").json()["data"] if m["id"] == "mini")
    assert (card["dimension"], card["max_input_tokens"]) == (384, 256)  # the limit from the tokenizer's folder
    # Over the limit: refused by the front, before any upstream call, with the count and the limit.
    r = _post(front, "mini", ["word " * 300])
    assert r.status_code == 400
    assert r.json()["error"] == {
        "message": "`input` has 302 tokens; model 'mini' accepts at most 256 tokens per input (set `truncate` to "
        "embed a part of it)",
        "type": "invalid_request_error",
        "param": "input",
        "code": "input_too_long",
    }


def test_without_a_tokenizer_the_upstreams_limit_error_is_a_400(front, upstream):
    r = _post(front, "mini-upcount", ["hello world"])
    assert r.status_code == 200 and r.json()["usage"] == upstream.embed("minilm-int8", ["hello world"])["usage"]
    r = _post(front, "mini-upcount", ["hello world", "word " * 300])
    msg = _error(r, 400, "input_rejected", "upstream of model 'mini-upcount' rejected the input")
    assert "HTTP 400, code 'input_too_long'" in msg
    assert "302 tokens" not in msg  # the upstream's own message (its body) is not passed on
    assert r.json()["error"]["param"] == "input"


def test_concurrent_requests_share_batches_and_the_upstreams_count(front, upstream):
    texts = [s for s in SENTENCES if len(s) < 200]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda t: _post(front, "wl", [t]), texts * 3))
    assert all(a.status_code == 200 for a in answers)
    alone = [upstream.embed("wordllama", [t])["usage"]["total_tokens"] for t in texts]
    # Requests that shared an upstream call split its count by their length: the total is the upstream's.
    assert sum(a.json()["usage"]["total_tokens"] for a in answers) == 3 * sum(alone)


# -- upstream failures ----------------------------------------------------------------------------------------


def test_upstream_refuses_our_key_502(front, caplog):
    with caplog.at_level(logging.ERROR, logger="gateway.remote"):
        r = _post(front, "badkey", ["hello"])
    _error(r, 502, "backend_unavailable", "refused the gateway's credentials (HTTP 401, code 'invalid_api_key')")
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "gateway.remote"]
    assert any("answered HTTP 401" in line and "/v1" in line for line in lines), lines
    assert not any(WRONG_KEY in line for line in lines)


def test_upstream_429_is_ours_with_its_retry_after(front):
    assert _post(front, "limited", ["hello"]).status_code == 200
    r = _post(front, "limited", ["hello again"])  # another text: the same one would be a hit in the front's cache
    _error(r, 429, "backend_overloaded", "upstream of model 'limited' is overloaded (HTTP 429")
    assert int(r.headers["retry-after"]) >= 1


def test_upstream_that_never_answers_504(front):
    r = _post(front, "stalled", ["hello"])
    _error(r, 504, "backend_timeout", "upstream of model 'stalled' did not answer within 0.5s")


def test_unreachable_upstream_502_then_the_circuit_opens_503(front):
    for _ in range(2):
        _error(_post(front, "dead", ["hello"]), 502, "backend_unavailable", "is unreachable (ConnectError)")
    r = _post(front, "dead", ["hello"])
    _error(r, 503, "circuit_open", "model 'dead' is failing and is not being sent requests for now")
    assert 50 <= int(r.headers["retry-after"]) <= 60


def test_upstream_down_at_load_or_key_unset_fails_the_model_only(front):
    cards = {m["id"]: m for m in front.get("/v1/models").json()["data"]}
    assert cards["dead-at-load"]["state"] == "failed"
    assert "cannot reach the upstream" in cards["dead-at-load"]["error"]
    assert cards["noenv"]["error"] == "environment variable REMOTE_UNSET_VARIABLE (options.api_key_env) is not set"
    _error(_post(front, "noenv", ["hello"]), 503, "model_unavailable", "REMOTE_UNSET_VARIABLE")
    assert _post(front, "wl", ["still serving"]).status_code == 200


def test_invalid_upstream_bodies_are_refused(upstream):
    """Decoding is strict: a wrong count of vectors or widths is the upstream's fault, never passed on."""
    from gateway_remote.backend import OpenAIBackend, OpenAIOptions, _Reply

    backend = OpenAIBackend(model="m", path="", options=OpenAIOptions(base_url=f"{upstream.url}/v1", dimension=4))
    backend._dimension = 4
    one = base64.b64encode(np.ones(4, "<f4").tobytes()).decode()
    ok = msgspec.json.decode(msgspec.json.encode({"data": [{"embedding": one, "index": 0}]}), type=_Reply)
    assert backend._vectors(ok, 1).tolist() == [[1, 1, 1, 1]]
    for data in ([{"embedding": one, "index": 1}], [], [{"embedding": one[:-4], "index": 0}]):
        reply = msgspec.json.decode(msgspec.json.encode({"data": data}), type=_Reply)
        with pytest.raises(ValueError):
            backend._vectors(reply, 1)


def test_truncation_needs_a_count_before_sending(front):
    r = _post(front, "wl", ["word " * 300], truncate=True)
    _error(r, 400, "truncation_not_supported", "model 'wl' cannot truncate: its tokens are counted by its upstream")
    assert r.json()["error"]["param"] == "truncate"


# -- against a scripted upstream ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scripted() -> Iterator[ScriptedUpstream]:
    up = ScriptedUpstream()
    yield up
    up.close()


def _scripted_backend(up: ScriptedUpstream, **options):
    from gateway_remote.backend import OpenAIBackend, OpenAIOptions

    opts = OpenAIOptions(base_url=up.url, max_input_tokens=512, **options)
    backend = OpenAIBackend(model="m", path="", options=opts)
    backend.load()
    return backend


def test_timeout_bounds_the_whole_batch_when_the_upstream_trickles(scripted):
    """4 bytes every 0.3 s: each read is quick, the whole answer (175 bytes) would take over 13 s; `timeout_s = 1`
    ends it at about 1 s with a 504-kind failure (the circuit counts it, failover may follow)."""
    from gateway.plugin import BackendTimeout

    backend = _scripted_backend(scripted, dimension=4, timeout_s=1.0)
    try:
        scripted.trickle, scripted.every_s = 4, 0.3
        started = time.monotonic()
        with pytest.raises(BackendTimeout, match="the upstream of model 'm' did not answer within 1s"):
            backend.embed(["one", "two", "three"], [[], [], []])
        # Well under the 13 s the trickle takes (what a per-read timeout alone would wait), with room for a
        # loaded machine's pauses past the 1 s deadline.
        assert time.monotonic() - started < 4.0
        scripted.trickle = None
        assert backend.embed(["one"], [[]]).vectors.tolist() == [[1, 1, 1, 1]]  # the next batch is served
    finally:
        scripted.trickle = None
        backend.close()


@pytest.mark.parametrize(
    ("usage", "counted"),
    [
        ({"prompt_tokens": 5, "total_tokens": 5}, 5),
        ({"prompt_tokens": 0, "total_tokens": 6}, 6),
        ({"prompt_tokens": 0, "total_tokens": 0}, 3),
        ({"prompt_tokens": -40, "total_tokens": -40}, 3),
        ({"prompt_tokens": 10**9, "total_tokens": 10**9}, 3),
        (None, 3),
    ],
)
def test_an_upstreams_usage_is_charged_only_when_it_can_be_true(scripted, usage, counted):
    """A reported 0 would charge nothing (and refund the estimate), a negative count refund others' charges, a
    huge one lock the key out: what cannot be true gives way to the local estimate (len // 4 + 1 = 3 here)."""
    backend = _scripted_backend(scripted, dimension=4)
    try:
        scripted.usage = usage
        assert backend.embed(["hello world"], [[]]).tokens == counted
    finally:
        scripted.usage = None
        backend.close()


def test_the_width_learned_from_the_upstream_names_the_model(scripted):
    """An upstream model swapped for one of another width under the same name: the gateway's cache identity
    changes with it (the learned width is part of it), so old entries are never met."""
    backends = [_scripted_backend(scripted), _scripted_backend(scripted, dimension=4)]
    try:
        scripted.dimension = 8
        backends.append(_scripted_backend(scripted))
        before, fixed, after = backends
        assert after._dimension == 8
        assert before.fingerprint() != after.fingerprint()
        assert before.fingerprint() == fixed.fingerprint()
    finally:
        scripted.dimension = 4
        for backend in backends:
            backend.close()


def test_a_batch_api_job_on_a_remote_model_equals_the_embeddings_route(upstream, tmp_path, monkeypatch):
    # A job's lines reach the upstream through the same remote backend (batched, failover-aware) as requests.
    monkeypatch.setenv("REMOTE_TEST_KEY", UPSTREAM_KEY)
    toml = f"""
    [batches]
    data_dir = "{tmp_path}"
    chunk_lines = 2

    [models.wl]
    backend = "openai"
    [models.wl.options]
    base_url = "{upstream.url}/v1"
    model = "wordllama"
    api_key_env = "REMOTE_TEST_KEY"
    """
    bodies = [{"model": "wl", "input": s} for s in SENTENCES[:5]] + [{"model": "wl", "input": SENTENCES[5:8]}]
    lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/embeddings", "body": b} for i, b in enumerate(bodies)]
    with serve(toml, plugins=()) as http:
        client: openai.OpenAI = _client(http)
        batch = _run(client, lines, timeout=120)
        assert batch.status == "completed" and batch.request_counts.completed == len(bodies), batch
        out = {x["custom_id"]: x["response"]["body"] for x in _lines(client, batch.output_file_id)}
        for i, body in enumerate(bodies):
            want = _post(http, "wl", body["input"]).json()
            got = out[f"r{i}"]
            assert got["usage"] == want["usage"]
            for a, b in zip(got["data"], want["data"], strict=True):
                np.testing.assert_allclose(a["embedding"], b["embedding"], rtol=0, atol=1e-6)
