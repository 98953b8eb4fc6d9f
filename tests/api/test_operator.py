"""The operator's surface: models list, readiness, metrics, request ids, keys and limits, config reload."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.base.config import parse_config
from gateway.shared.keys import KeyStore, hash_key

from ..conftest import API_KEY, AUTH, FAKE_TOML, FakeBackend, fake_vector, serve, wait_loaded, wait_until

URL = "/v1/embeddings"


def test_models_list(fake_client):
    for path in ("/v1/models", "/api/v3/inference/models"):
        r = fake_client.get(path)
        assert r.status_code == 200
        body = r.json()
        assert body["object"] == "list"
        (card,) = body["data"]
        assert card == {
            "id": "fake",
            "object": "model",
            "created": card["created"],
            "owned_by": "embedding-gateway",
            "backend": "fake",
            "ready": True,
            "state": "ready",
            "dimension": 8,
            "max_input_tokens": 16,
            "matryoshka_dimensions": [2, 4, 8],
            "aliases": ["fake-alias"],
            "prompts": {},
            "default_prompt_name": None,
            "truncate": False,
            "fallbacks": [],
            "embedding_space": None,
            "error": None,
            "task": "embed",
        }


def test_models_list_needs_a_key(fake_client):
    assert fake_client.get("/v1/models", headers={"Authorization": ""}).status_code == 401


def test_ready_before_and_after_load():
    toml = FAKE_TOML + "[models.fake.options]\nload_delay_s = 1.0\n"
    with serve(toml, wait=False) as client:
        assert client.get("/health").json() == {"status": "ok", "models": {}}
        r = client.get("/ready")
        assert r.status_code == 503 and r.json()["models"] == {"fake": "loading"}
        # a request for a loading model waits for it instead of failing
        assert client.post(URL, json={"model": "fake", "input": "early"}).status_code == 200
        r = client.get("/ready")
        assert r.status_code == 200 and r.json() == {"status": "ready", "models": {"fake": "ready"}}


def test_metrics_count_requests_tokens_and_batches(fake_client):
    def value(text: str, name: str) -> float:
        return sum(
            s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == name and s.labels.get("model") == "fake" and s.labels.get("status", "200") == "200"
        )

    before = fake_client.get("/metrics").text
    r = fake_client.post(URL, json={"model": "fake", "input": ["one two", "three"]})
    assert r.status_code == 200
    after = fake_client.get("/metrics").text
    assert value(after, "gateway_tokens_total") - value(before, "gateway_tokens_total") == 7
    assert value(after, "gateway_inputs_total") - value(before, "gateway_inputs_total") == 2
    assert value(after, "gateway_embedding_requests_total") - value(before, "gateway_embedding_requests_total") == 1
    assert 'gateway_batch_size_count{model="fake"}' in after
    assert 'gateway_queue_depth{model="fake"} 0.0' in after
    assert 'gateway_model_ready{model="fake"} 1.0' in after
    # HTTP series under the names and labels of Litestar's Prometheus plugin.
    http = {"method": "POST", "path": URL, "status_code": "200", "app_name": "gateway"}

    def http_value(text: str, name: str) -> float:
        return sum(
            s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == name and s.labels == http
        )

    assert http_value(after, "gateway_http_requests_total") - http_value(before, "gateway_http_requests_total") == 1
    seconds = "gateway_http_request_duration_seconds_count"
    assert http_value(after, seconds) - http_value(before, seconds) == 1
    assert http_value(after, "gateway_http_requests_in_progress") == 0
    assert 'path="/metrics"' not in after


def test_request_id_is_honoured_or_generated(fake_client):
    r = fake_client.post(URL, json={"model": "fake", "input": "x"}, headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = fake_client.post(URL, json={"model": "nope", "input": "x"})
    assert r.status_code == 404 and len(r.headers["x-request-id"]) == 22
    r = fake_client.get("/health", headers={"X-Request-ID": "bad id with spaces"})
    assert r.headers["x-request-id"] != "bad id with spaces"


def test_access_log_has_no_keys_or_texts(fake_client, caplog):
    from gateway.base.observability import ACCESS_LOG

    with caplog.at_level("INFO", logger="gateway.access"):
        fake_client.post(URL, json={"model": "fake", "input": "secret text"}, headers={"X-Request-ID": "r-1"})
        ACCESS_LOG.flush()
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.access"]
    assert any("request_id=r-1" in line and "status=200" in line and "model=fake" in line for line in lines)
    assert not any("secret text" in line or API_KEY in line for line in lines)


def test_access_log_lines_arrive_in_order_stamped_when_each_request_ended(fake_client, caplog):
    with caplog.at_level("INFO", logger="gateway.access"):
        stamps = []
        for i in range(3):
            fake_client.post(URL, json={"model": "fake", "input": "x"}, headers={"X-Request-ID": f"order-{i}"})
            stamps.append(time.time())
            time.sleep(0.05)
        deadline = time.monotonic() + 5
        # No flush here: the background thread hands them on by itself, within its interval.
        while time.monotonic() < deadline:
            records = [r for r in caplog.records if r.name == "gateway.access" and "order-" in r.getMessage()]
            if len(records) == 3:
                break
            time.sleep(0.02)
    assert [r.getMessage().split()[0] for r in records] == [f"request_id=order-{i}" for i in range(3)]
    for record, stamp in zip(records, stamps, strict=True):
        assert stamp - 1.0 < record.created <= stamp  # the request's end, not the hand-over 0.1 s later


def test_access_log_follows_the_logger_level(fake_client, caplog):
    from gateway.base.observability import ACCESS_LOG

    with caplog.at_level("WARNING", logger="gateway.access"):
        fake_client.post(URL, json={"model": "fake", "input": "x"}, headers={"X-Request-ID": "quiet-1"})
    # Back at INFO before the hand-over: the line was never queued, so it cannot appear late.
    with caplog.at_level("INFO", logger="gateway.access"):
        ACCESS_LOG.flush()
    assert not [r for r in caplog.records if "quiet-1" in r.getMessage()]


def test_openapi_schema_documents_routes_and_errors(fake_client):
    schema = fake_client.get("/schema/openapi.json").json()
    paths = schema["paths"]
    for p in ("/v1/embeddings", "/api/v3/inference/embeddings", "/v1/models", "/health", "/ready", "/admin/reload"):
        assert p in paths
    responses = paths["/v1/embeddings"]["post"]["responses"]
    assert {"200", "400", "401", "403", "404", "413", "429", "500", "503", "504"} <= set(responses)
    assert "EmbeddingRequest" in str(schema["components"]["schemas"])


# --- keys ------------------------------------------------------------------------------------------------

KEYS_TOML = (
    FAKE_TOML
    + """
[models.other]
backend = "fake"
path = "."
"""
)


def _keyed_client(auth_toml: str, monkeypatch=None, env: str | None = None):
    if monkeypatch is not None and env is not None:
        monkeypatch.setenv("GATEWAY_API_KEYS", env)
    config = parse_config(auth_toml + KEYS_TOML)
    return serve(auth_toml + KEYS_TOML, keys=KeyStore.from_config(config.auth))


def test_hashed_and_env_keys(monkeypatch):
    auth = f'[auth]\napi_keys = ["{hash_key("hashed-secret-1")}"]\n'
    with _keyed_client(auth, monkeypatch, env="env-key-1, env-key-2") as client:
        for key in ("hashed-secret-1", "env-key-1", "env-key-2"):
            r = client.post(URL, json={"model": "fake", "input": "x"}, headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200, key
        r = client.post(URL, json={"model": "fake", "input": "x"}, headers={"Authorization": f"Bearer {hash_key('x')}"})
        assert r.status_code == 401


def test_key_denied_a_model_gets_403_and_does_not_see_it():
    auth = '[[auth.keys]]\nkey = "limited-key-1"\nmodels = ["other"]\n'
    with _keyed_client(auth) as client:
        h = {"Authorization": "Bearer limited-key-1"}
        assert client.post(URL, json={"model": "other", "input": "x"}, headers=h).status_code == 200
        r = client.post(URL, json={"model": "fake-alias", "input": "x"}, headers=h)
        assert r.status_code == 403
        assert r.json()["error"] == {
            "message": "this API key may not use model 'fake-alias'",
            "type": "permission_error",
            "param": "model",
            "code": "model_not_allowed",
        }
        assert [m["id"] for m in client.get("/v1/models", headers=h).json()["data"]] == ["other"]
        r = client.post(URL, json={"model": "zzz", "input": "x"}, headers=h)
        assert r.status_code == 404 and r.json()["error"]["message"].endswith("available models: other")
        # a limited key is not an admin
        assert client.post("/admin/reload", headers=h).status_code == 403


def test_rate_limit_requests_then_recovery():
    auth = '[[auth.keys]]\nkey = "slow-key-12"\nrequests_per_minute = 120\n'
    with _keyed_client(auth) as client:
        h = {"Authorization": "Bearer slow-key-12"}
        started = time.monotonic()
        codes = [client.post(URL, json={"model": "fake", "input": "x"}, headers=h).status_code for _ in range(125)]
        assert codes == [200] * 120 + [429] * 5
        r = client.post(URL, json={"model": "fake", "input": "x"}, headers=h)
        assert r.status_code == 429
        assert (
            r.json()["error"]["type"] == "rate_limit_error"
            and "120 requests per minute" in r.json()["error"]["message"]
        )
        # A window, not a bucket: nothing comes back until the first requests' second has left the last minute,
        # 61 s after that second began, less the time these requests took (a bucket would say 1 s).
        assert 60 - (time.monotonic() - started) <= int(r.headers["retry-after"]) <= 61
        (key,) = [k for k in client.app.state.gateway.keys._keys if k.requests is not None]
        real = time.monotonic
        key.requests.clock = lambda: real() + 62  # a minute later, on the window's clock
        assert client.post(URL, json={"model": "fake", "input": "x"}, headers=h).status_code == 200


def test_rate_limit_tokens():
    auth = '[[auth.keys]]\nkey = "token-key-12"\ntokens_per_minute = 30\n'
    with _keyed_client(auth) as client:
        h = {"Authorization": "Bearer token-key-12"}
        body = {"model": "fake", "input": ["a b c d e f g h i j"] * 2}  # 24 tokens
        assert client.post(URL, json=body, headers=h).status_code == 200
        r = client.post(URL, json=body, headers=h)
        assert r.status_code == 429 and "30 tokens per minute" in r.json()["error"]["message"]
        assert int(r.headers["retry-after"]) >= 1


def test_tokens_of_a_failed_request_are_given_back():
    auth = '[[auth.keys]]\nkey = "token-key-12"\ntokens_per_minute = 30\n'
    broken = '[models.broken]\nbackend = "fake"\npath = "."\n[models.broken.options]\nfail_on = "boom"\n'
    config = parse_config(auth + KEYS_TOML + broken)
    with serve(auth + KEYS_TOML + broken, keys=KeyStore.from_config(config.auth)) as client:
        h = {"Authorization": "Bearer token-key-12"}
        r = client.post(URL, json={"model": "broken", "input": ["boom a b c d e f g h i"] * 2}, headers=h)
        assert r.status_code == 500  # 24 tokens charged, then the batch failed: charge returned
        body = {"model": "fake", "input": ["a b c d e f g h i j"] * 2}  # 24 tokens
        assert client.post(URL, json=body, headers=h).status_code == 200
        r = client.post(URL, json=body, headers=h)
        assert r.status_code == 429 and "30 tokens per minute" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    ("auth", "needle"),
    [
        ('[[auth.keys]]\nkey = "sha256:abc"\n', "64 hex digits"),
        ('[[auth.keys]]\nkey = "short"\n', "too short"),
        ('[[auth.keys]]\nkey = "long-enough-key"\nmodels = ["ghost"]\n', "no model named 'ghost'"),
        (
            '[[auth.keys]]\nkey = "long-enough-key"\nrequests_per_minute = 0\n',
            "Expected `int` >= 1 - at `$.auth.keys[0].requests_per_minute`",
        ),
        ('[[auth.keys]]\nkey = "long-enough-key"\nmodel = ["fake"]\n', "unknown field `model` - at `$.auth.keys[0]`"),
    ],
)
def test_invalid_key_config(auth, needle):
    from gateway.base.config import ConfigError

    with pytest.raises(ConfigError, match=None) as info:
        parse_config(auth + KEYS_TOML)
    assert needle in str(info.value)


# --- reload ----------------------------------------------------------------------------------------------


@contextmanager
def _steady_traffic(client, model: str) -> Iterator[list[int]]:
    """Requests for `model` sent back to back from before the block to after it (answered on both sides of it,
    however slow the machine); yields their statuses."""
    stop, results = threading.Event(), []

    def hammer() -> None:
        while not stop.is_set():
            results.append(client.post(URL, json={"model": model, "input": "steady traffic"}).status_code)

    t = threading.Thread(target=hammer)
    t.start()
    try:
        wait_until(lambda: results, "traffic flowing")
        yield results
        seen = len(results)
        wait_until(lambda: len(results) > seen + 1, "traffic after the block")  # one sent after it ended
    finally:
        stop.set()
        t.join()


def _reload(client, path, text):
    path.write_text(text)
    return client.post("/admin/reload")


def test_reload_adds_a_model_while_requests_keep_succeeding(tmp_path):
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(FAKE_TOML)
    with serve(config_path=cfg) as client:
        with _steady_traffic(client, "fake") as results:
            new = '[models.new]\nbackend = "fake"\npath = "."\n[models.new.options]\nload_delay_s = 0.5\n'
            r = _reload(client, cfg, FAKE_TOML + new)
        assert r.status_code == 200, r.text
        assert r.json()["added"] == ["new"] and r.json()["models"] == {"fake": "ready", "new": "ready"}
        assert results and set(results) == {200}
        assert client.post(URL, json={"model": "new", "input": "x"}).status_code == 200


def test_reload_switches_a_models_backend(tmp_path):
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(FAKE_TOML)
    with serve(config_path=cfg) as client:
        before = client.post(URL, json={"model": "fake", "input": "x"}).json()["data"][0]["embedding"]
        assert before == pytest.approx(fake_vector("x").tolist(), abs=1e-6)
        with _steady_traffic(client, "fake-alias") as results:
            r = _reload(client, cfg, FAKE_TOML.replace('backend = "fake"', 'backend = "fake-b"'))
        assert r.status_code == 200 and r.json()["changed"] == ["fake"]
        assert set(results) == {200}
        after = client.post(URL, json={"model": "fake", "input": "x"}).json()["data"][0]["embedding"]
        assert after == pytest.approx((-fake_vector("x")).tolist(), abs=1e-6)
        assert client.get("/v1/models").json()["data"][0]["backend"] == "fake-b"


def test_invalid_reload_is_refused_and_the_old_config_kept(tmp_path):
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(FAKE_TOML)
    with serve(config_path=cfg) as client:
        with _steady_traffic(client, "fake") as results:
            r = _reload(client, cfg, FAKE_TOML + "typo_key = 1\n")
        assert r.status_code == 400
        assert "reload refused, the running config is kept" in r.json()["error"]["message"]
        assert "unknown field `typo_key`" in r.json()["error"]["message"]
        assert set(results) == {200}
        assert client.post(URL, json={"model": "fake", "input": "x"}).status_code == 200


def test_reload_removes_a_model_and_a_broken_change_keeps_the_old_one(tmp_path):
    cfg = tmp_path / "gateway.toml"
    two = FAKE_TOML + '[models.gone]\nbackend = "fake"\npath = "."\n'
    cfg.write_text(two)
    with serve(config_path=cfg) as client:
        r = _reload(client, cfg, FAKE_TOML + "[models.fake.options]\nfail_load = true\n")
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["removed"] == ["gone"] and "refuses to load" in body["failed"]["fake"]
        assert body["models"] == {"fake": "ready"}  # the previous version keeps serving
        assert client.post(URL, json={"model": "fake", "input": "x"}).status_code == 200
        assert client.post(URL, json={"model": "gone", "input": "x"}).status_code == 404
        wait_loaded(client)


def test_graceful_shutdown_finishes_in_flight_requests():
    import httpx

    from ..conftest import make_app, uvicorn_server

    app = make_app(FAKE_TOML + "[models.fake.options]\ndelay_s = 1.0\n")
    with uvicorn_server(app) as (url, server):
        result: list[httpx.Response] = []
        t = threading.Thread(
            target=lambda: result.append(
                httpx.post(f"{url}/v1/embeddings", json={"model": "fake", "input": "x"}, headers=AUTH, timeout=10)
            )
        )
        FakeBackend.batches = []
        t.start()
        wait_until(lambda: FakeBackend.batches == [["x"]], "the request in flight")  # its batch is computing
        server.should_exit = True  # what SIGTERM does
        t.join()
    assert result[0].status_code == 200
    assert len(result[0].json()["data"][0]["embedding"]) == 8


def test_a_client_that_hangs_up_is_dropped_from_the_queue():
    import httpx

    from ..conftest import make_app, uvicorn_server

    FakeBackend.batches = []
    app = make_app(
        FAKE_TOML
        + '[models.fake.options]\ndelay_s = 0.8\nslow_on = "first"\n[models.fake.batching]\nmax_batch_size = 1\n'
    )
    with uvicorn_server(app) as (url, _):
        first = threading.Thread(
            target=lambda: httpx.post(f"{url}{URL}", json={"model": "fake", "input": "first"}, headers=AUTH, timeout=10)
        )
        first.start()
        wait_until(lambda: FakeBackend.batches == [["first"]], "the first batch computing")
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}{URL}", json={"model": "fake", "input": "abandoned"}, headers=AUTH, timeout=0.2)
        first.join()
        # Sent after it by the same key: had the abandoned request stayed queued, it would have gone first.
        r = httpx.post(f"{url}{URL}", json={"model": "fake", "input": "later"}, headers=AUTH, timeout=10)
        assert r.status_code == 200
        assert FakeBackend.batches == [["first"], ["later"]]


def test_reload_while_a_model_is_still_loading_loads_it_once(tmp_path):
    cfg = tmp_path / "gateway.toml"
    text = FAKE_TOML + "[models.fake.options]\nload_delay_s = 0.5\n"
    cfg.write_text(text)

    def workers() -> int:
        return sum(t.name.startswith("batcher-fake-") for t in threading.enumerate())

    before = workers()
    with serve(config_path=cfg, wait=False) as client:
        r = client.post("/admin/reload")
        assert r.status_code == 200 and r.json()["changed"] == [] and r.json()["added"] == []
        wait_loaded(client)
        time.sleep(0.2)
        assert workers() == before + 1


def test_reload_keeps_rate_limit_levels(tmp_path):
    cfg = tmp_path / "gateway.toml"
    cfg.write_text('[[auth.keys]]\nkey = "admin-key-1"\nadmin = true\nrequests_per_minute = 3\n' + FAKE_TOML)
    from gateway.base.config import load_config

    with serve(config_path=cfg, keys="config") as client:
        h = {"Authorization": "Bearer admin-key-1"}
        assert client.post(URL, json={"model": "fake", "input": "x"}, headers=h).status_code == 200
        assert client.post("/admin/reload", headers=h).status_code == 200  # the 2nd request of 3
        assert client.post(URL, json={"model": "fake", "input": "x"}, headers=h).status_code == 200
        assert client.post(URL, json={"model": "fake", "input": "x"}, headers=h).status_code == 429
    assert load_config(cfg).auth.keys[0].requests_per_minute == 3


def test_generated_key_gives_way_to_configured_keys_on_reload(tmp_path):
    from litestar.testing import TestClient

    from gateway.api.app import create_app
    from gateway.base.config import load_config
    from gateway.runtime.plugins import load_plugins

    from ..conftest import FakePlugin

    cfg = tmp_path / "gateway.toml"
    cfg.write_text(FAKE_TOML)
    plugins = load_plugins()
    plugins.register(FakePlugin)
    app = create_app(load_config(cfg), plugins=plugins, fallback_keys=KeyStore(["generated-key"]), config_path=cfg)
    with TestClient(app=app) as client:
        wait_loaded(client)
        old = {"Authorization": "Bearer generated-key"}
        assert client.post(URL, json={"model": "fake", "input": "x"}, headers=old).status_code == 200
        cfg.write_text('[auth]\napi_keys = ["configured-key"]\n' + FAKE_TOML)
        assert client.post("/admin/reload", headers=old).status_code == 200
        assert client.post(URL, json={"model": "fake", "input": "x"}, headers=old).status_code == 401
        new = {"Authorization": "Bearer configured-key"}
        assert client.post(URL, json={"model": "fake", "input": "x"}, headers=new).status_code == 200


def test_bad_env_key_is_a_config_error(monkeypatch):
    from gateway.base.config import AuthConfig, ConfigError

    monkeypatch.setenv("GATEWAY_API_KEYS", "sha256:zz")
    with pytest.raises(ConfigError, match="GATEWAY_API_KEYS: key 1: a sha256: key needs 64 hex digits"):
        KeyStore.from_config(AuthConfig())
