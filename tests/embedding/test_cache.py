"""The embedding cache through HTTP: exact hits, partial hits, inputs computed once, keys by model identity,
the bound, clearing; and Redis (a real server: the Valkey binary the lock installs): sharing across gateways,
rate limits across them, and Redis failing under a running gateway."""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import threading
import time

import numpy as np
import pytest
from litestar.testing import TestClient

from gateway.base.config import parse_config
from gateway.base.digest import weights_digest
from gateway.shared.keys import KeyStore

from ..conftest import AUTH, FakeBackend, fake_vector, make_app, serve, until, wait_loaded, wait_until

URL = "/v1/embeddings"
TOML = """
[models.fake]
backend = "fake"
path = "."
aliases = ["fake-alias"]
matryoshka_dimensions = [2, 4, 8]

# The same backend and options under another name: the same model, so the same entries.
[models.twin]
backend = "fake"
path = "."

[models.other]
backend = "fake"
path = "."
options = {max_tokens = 15}

[models.uncached]
backend = "fake"
path = "."
cache = false

[models.slow]
backend = "fake"
path = "."
options = {delay_s = 0.3, fail_on = "boom"}
"""


@pytest.fixture
def client():
    FakeBackend.batches = []
    with serve(TOML) as c:
        yield c


def _computed() -> list[str]:
    return [t for batch in FakeBackend.batches for t in batch]


def _metric(client: TestClient, name: str, **labels: str) -> float:
    text = client.get("/metrics").text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(name) and (not labels or "{" + want + "}" in line or want in line):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_hit_is_bit_identical_with_the_same_usage(client):
    texts = ["hello world", "second text here"]
    first = client.post(URL, json={"model": "fake", "input": texts, "encoding_format": "base64"})
    assert first.headers["x-cache-hits"] == "0"
    FakeBackend.batches = []
    again = client.post(URL, json={"model": "fake", "input": texts, "encoding_format": "base64"})
    assert again.headers["x-cache-hits"] == "2"
    assert _computed() == []
    assert [d["embedding"] for d in again.json()["data"]] == [d["embedding"] for d in first.json()["data"]]
    assert again.json()["usage"] == first.json()["usage"] == {"prompt_tokens": 9, "total_tokens": 9}
    floats = client.post(URL, json={"model": "fake", "input": texts}).json()["data"]
    for d, text in zip(floats, texts, strict=True):
        np.testing.assert_array_equal(np.array(d["embedding"]), np.round(fake_vector(text).astype(np.float64), 9))


def test_partial_hits_compute_only_the_missing_inputs_in_order(client):
    texts = [f"text number {i}" for i in range(100)]
    client.post(URL, json={"model": "fake", "input": texts[::10] + texts[1::10] + texts[2::10]})
    FakeBackend.batches = []
    r = client.post(URL, json={"model": "fake", "input": texts, "encoding_format": "base64"})
    assert r.headers["x-cache-hits"] == "30"
    assert sorted(_computed()) == sorted(t for i, t in enumerate(texts) if i % 10 > 2)
    got = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in r.json()["data"]]
    assert [d["index"] for d in r.json()["data"]] == list(range(100))
    np.testing.assert_array_equal(np.stack(got), np.stack([fake_vector(t) for t in texts]))
    assert r.json()["usage"]["total_tokens"] == 5 * 100


def test_repeated_inputs_in_one_request_are_computed_once(client):
    r = client.post(URL, json={"model": "fake", "input": ["same", "other", "same", "same"]})
    assert r.status_code == 200
    assert sorted(_computed()) == ["other", "same"]
    data = r.json()["data"]
    assert data[0]["embedding"] == data[2]["embedding"] == data[3]["embedding"]
    assert r.json()["usage"]["total_tokens"] == 12


def test_identical_inputs_in_flight_across_requests_are_computed_once(client):
    results: list[int] = []

    def send() -> None:
        results.append(client.post(URL, json={"model": "slow", "input": ["shared text"]}).status_code)

    threads = [threading.Thread(target=send) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 4
    assert _computed() == ["shared text"]


def test_a_failed_computation_is_not_cached_and_waiters_compute_it_themselves(client):
    r = client.post(URL, json={"model": "slow", "input": ["boom here"]})
    assert r.status_code == 500
    FakeBackend.batches = []
    r = client.post(URL, json={"model": "slow", "input": ["boom here"]})
    assert r.status_code == 500 and r.headers.get("x-cache-hits") is None
    assert _computed() == ["boom here"]


def test_dimensions_and_output_types_come_from_one_entry(client):
    client.post(URL, json={"model": "fake", "input": ["cut me"]})
    FakeBackend.batches = []
    r = client.post(URL, json={"model": "fake", "input": ["cut me"], "dimensions": 4, "encoding_format": "base64"})
    assert r.headers["x-cache-hits"] == "1" and _computed() == []
    v = fake_vector("cut me")[:4]
    want = (v / np.linalg.norm(v)).astype("<f4")
    np.testing.assert_array_equal(np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), "<f4"), want)
    r = client.post(URL, json={"model": "fake", "input": ["cut me"], "encoding_format": "ubinary"})
    assert r.headers["x-cache-hits"] == "1"
    assert r.json()["data"][0]["embedding"] == np.packbits(fake_vector("cut me") > 0).tolist()


def test_entries_follow_the_model_not_its_name(client):
    client.post(URL, json={"model": "fake", "input": ["shared entry"]})
    assert client.post(URL, json={"model": "twin", "input": ["shared entry"]}).headers["x-cache-hits"] == "1"
    assert client.post(URL, json={"model": "fake-alias", "input": ["shared entry"]}).headers["x-cache-hits"] == "1"
    # Other options, other model: computed again.
    assert client.post(URL, json={"model": "other", "input": ["shared entry"]}).headers["x-cache-hits"] == "0"


def test_prompt_and_truncation_are_part_of_the_key():
    toml = TOML + '\n[models.prompted]\nbackend = "fake"\npath = "."\nprompts = {q = "query: "}\n'
    with serve(toml) as c:
        c.post(URL, json={"model": "prompted", "input": ["a text"]})
        r = c.post(URL, json={"model": "prompted", "input": ["a text"], "prompt_name": "q"})
        assert r.headers["x-cache-hits"] == "0"
        assert (
            c.post(URL, json={"model": "prompted", "input": ["a text"], "prompt_name": "q"}).headers["x-cache-hits"]
            == "1"
        )
        r = c.post(URL, json={"model": "prompted", "input": ["a text"], "truncate": True})
        assert r.headers["x-cache-hits"] == "0"


def test_truncated_inputs_are_reported_from_the_cache_too():
    toml = '[models.ids]\nbackend = "fake"\npath = "."\noptions = {embeds_ids = true}\n'
    long = " ".join(["word"] * 30)
    with serve(toml) as c:
        first = c.post(URL, json={"model": "ids", "input": [long, "short"], "truncate": True})
        again = c.post(URL, json={"model": "ids", "input": [long, "short"], "truncate": True})
        assert again.headers["x-cache-hits"] == "2"
        assert first.headers["x-truncated-inputs"] == again.headers["x-truncated-inputs"] == "1"
        assert first.json()["usage"] == again.json()["usage"] == {"prompt_tokens": 19, "total_tokens": 19}


def test_opt_out_and_store_off(client):
    for _ in range(2):
        r = client.post(URL, json={"model": "uncached", "input": ["never cached"]})
        assert "x-cache-hits" not in r.headers
    assert _computed() == ["never cached", "never cached"]
    with serve('[cache]\nstore = "off"\n' + TOML) as c:
        assert "x-cache-hits" not in c.post(URL, json={"model": "fake", "input": ["x"]}).headers
        r = c.post("/admin/cache/clear", json={})
        assert r.status_code == 400 and r.json()["error"]["code"] == "cache_off"


def test_the_memory_store_is_bounded_by_bytes_and_counts_evictions():
    # One entry: 4 + 8 * 4 bytes of value and 51 of key; 500 bytes hold five.
    with serve("[cache]\nmax_bytes = 500\n" + TOML) as c:
        before = _metric(c, "gateway_cache_evictions_total", store="memory")
        c.post(URL, json={"model": "fake", "input": [f"entry {i}" for i in range(20)]})
        assert _metric(c, "gateway_cache_evictions_total", store="memory") - before == 15
        assert 0 < _metric(c, "gateway_cache_bytes", store="memory") <= 500
        r = c.post(URL, json={"model": "fake", "input": [f"entry {i}" for i in range(20)]})
        assert r.headers["x-cache-hits"] == "5"  # the five most recent


def test_lookups_are_counted_by_model(client):
    hits = _metric(client, "gateway_cache_lookups_total", model="fake", result="hit")
    client.post(URL, json={"model": "fake", "input": ["m1", "m2"]})
    client.post(URL, json={"model": "fake", "input": ["m1", "m3"]})
    assert _metric(client, "gateway_cache_lookups_total", model="fake", result="hit") - hits == 1


def test_admin_clear_per_model_or_all(client):
    client.post(URL, json={"model": "fake", "input": ["to clear"]})
    client.post(URL, json={"model": "other", "input": ["to clear"]})
    r = client.post("/admin/cache/clear", json={"model": "fake-alias"})
    assert r.status_code == 200 and r.json() == {"removed": 1}
    assert client.post(URL, json={"model": "fake", "input": ["to clear"]}).headers["x-cache-hits"] == "0"
    assert client.post(URL, json={"model": "other", "input": ["to clear"]}).headers["x-cache-hits"] == "1"
    assert client.post("/admin/cache/clear").json()["removed"] >= 2
    r = client.post("/admin/cache/clear", json={"model": "nope"})
    assert r.status_code == 404
    r = client.post("/admin/cache/clear", json={"model": "uncached"})
    assert r.status_code == 400 and r.json()["error"]["message"] == (
        "model 'uncached' is not cached (not loaded, or `cache = false`)"
    )


def test_admin_clear_needs_an_admin_key():
    auth = '[[auth.keys]]\nkey = "user-key-123"\nadmin = false\n'
    config = parse_config(auth + TOML)
    with serve(auth + TOML, keys=KeyStore.from_config(config.auth)) as c:
        r = c.post("/admin/cache/clear", headers={"Authorization": "Bearer user-key-123"})
        assert r.status_code == 403
        assert c.post("/admin/cache/clear", headers={"Authorization": ""}).status_code == 401


class FileBackend(FakeBackend):
    """Vectors seeded by its weight file's content; the default fingerprint (a digest of that file)."""

    name = "fake-file"

    def load(self):
        with open(self.path, "rb") as f:
            self.seed = f.read().decode()
        return super().load()

    def fingerprint(self) -> bytes:
        return super(FakeBackend, self).fingerprint()

    def embed(self, texts, token_ids):
        return np.stack([fake_vector(self.seed + t) for t in texts])


class FilePlugin:
    from gateway import hookimpl

    @staticmethod
    @hookimpl
    def register_backends(register):
        register(FileBackend)


def test_a_changed_weight_file_never_serves_old_entries(tmp_path):
    from ..conftest import FakePlugin

    weights = tmp_path / "weights.bin"
    weights.write_text("version one")
    config = tmp_path / "gateway.toml"
    config.write_text(f'[models.m]\nbackend = "fake-file"\npath = "{weights}"\n')
    app = make_app("", config_path=config, plugins=(FakePlugin, FilePlugin))
    with TestClient(app=app) as c:
        c.headers.update(AUTH)
        wait_loaded(c)
        old = c.post(URL, json={"model": "m", "input": ["text"]}).json()["data"][0]["embedding"]
        assert c.post(URL, json={"model": "m", "input": ["text"]}).headers["x-cache-hits"] == "1"
        weights.write_text("version two")
        config.write_text(config.read_text() + "aliases = ['m2']\n")  # a spec change: the model reloads
        assert c.post("/admin/reload").json()["changed"] == ["m"]
        r = c.post(URL, json={"model": "m", "input": ["text"]})
        assert r.headers["x-cache-hits"] == "0"
        assert r.json()["data"][0]["embedding"] != old
        np.testing.assert_allclose(r.json()["data"][0]["embedding"], fake_vector("version two" + "text"), atol=1e-8)


def test_weights_digest_follows_content_not_names(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / "model.bin").write_bytes(b"weights")
        (d / "__pycache__").mkdir()
        (d / "__pycache__" / "x.pyc").write_bytes(d.name.encode())
    assert weights_digest(str(a)) == weights_digest(str(b))
    (b / "model.bin").write_bytes(b"weights, changed")
    assert weights_digest(str(a)) != weights_digest(str(b))


# -- Redis ---------------------------------------------------------------------------------------------------


def _redis_toml(redis_url: str, extra: str = "") -> str:
    # A deadline no busy test machine misses (as in test_limits): a call that missed it would be a cache miss or a
    # per-process rate limit, which these tests would take for a wrong answer.
    return f'[cache]\nstore = "redis"\n[redis]\nurl = "{redis_url}"\ntimeout_ms = 3000\n' + extra + TOML


def _written(redis_server, entries: int) -> None:
    """Wait for the cache's writes, which go out in the background, until Redis holds `entries` entries."""
    client = redis_server.client()
    wait_until(lambda: len(client.keys("gateway:cache:*")) == entries, f"{entries} cache entries in Redis")


def test_redis_is_shared_by_two_gateways(redis_server):
    redis_server.client().flushall()
    toml = _redis_toml(redis_server.url)
    with serve(toml) as one, serve(toml) as two:
        r = one.post(URL, json={"model": "fake", "input": ["from one", "both"], "encoding_format": "base64"})
        assert r.headers["x-cache-hits"] == "0"
        _written(redis_server, 2)
        FakeBackend.batches = []
        other = two.post(URL, json={"model": "fake", "input": ["from one", "both"], "encoding_format": "base64"})
        assert other.headers["x-cache-hits"] == "2" and _computed() == []
        assert other.json()["data"] == r.json()["data"] and other.json()["usage"] == r.json()["usage"]


def test_redis_key_names_hold_no_text_and_no_key(redis_server):
    redis_server.client().flushall()
    auth = '[[auth.keys]]\nkey = "secret-key-42"\nrequests_per_minute = 100\n'
    config = parse_config(_redis_toml(redis_server.url) + auth)
    with serve(_redis_toml(redis_server.url) + auth, keys="config") as c:
        assert config.auth.keys
        r = c.post(
            URL, json={"model": "fake", "input": ["private text"]}, headers={"Authorization": "Bearer secret-key-42"}
        )
        assert r.status_code == 200
        _written(redis_server, 1)
    names = [n.decode() for n in redis_server.client().keys("*")]
    assert any(n.startswith("gateway:cache:") for n in names) and any(n.startswith("gateway:window:") for n in names)
    for name in names:
        assert "private" not in name and "secret" not in name
        assert re.fullmatch(r"gateway:(cache:[0-9a-f]+|window(-calls)?:[0-9a-f]+:requests:100)", name), name


def test_rate_limits_hold_across_gateways_sharing_redis(redis_server):
    redis_server.client().flushall()
    auth = '[[auth.keys]]\nkey = "limited-key-1"\nrequests_per_minute = 6\n'
    toml = _redis_toml(redis_server.url) + auth
    h = {"Authorization": "Bearer limited-key-1"}
    with serve(toml, keys="config") as one, serve(toml, keys="config") as two:
        codes = [c.post(URL, json={"model": "fake", "input": "x"}, headers=h).status_code for c in (one, two) * 5]
    assert codes.count(200) == 6 and codes.count(429) == 4, codes


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_redis_down_serves_uncached_and_comes_back(redis_server):
    redis_server.client().flushall()
    auth = '[[auth.keys]]\nkey = "limited-key-2"\nrequests_per_minute = 1000\n'
    toml = _redis_toml(redis_server.url, "").replace('url = "', 'retry_after_s = 0.2\nurl = "') + auth
    h = {"Authorization": "Bearer limited-key-2"}
    records = _Records()
    logging.getLogger("gateway.redis").addHandler(records)
    with serve(toml, keys="config") as c:
        errors = _metric(c, "gateway_shared_state_errors_total", use="cache")
        c.post(URL, json={"model": "fake", "input": ["kept"]}, headers=h)
        _written(redis_server, 1)
        redis_server.stop()
        try:
            started = time.monotonic()
            for i in range(10):
                r = c.post(URL, json={"model": "fake", "input": ["kept", f"new {i}"]}, headers=h)
                assert r.status_code == 200 and r.headers["x-cache-hits"] == "0"
            assert time.monotonic() - started < 5  # refused at once, then skipped while down: no deadline waited
            assert _metric(c, "gateway_shared_state_errors_total", use="cache") > errors
            assert _metric(c, "gateway_shared_state_errors_total", use="rate_limits") > 0
            # Logged once per outage, for each use (the cache and the limits keep their own health).
            failed = [m for m in records.messages if "failed" in m]
            assert sorted(m.split(" failed for ")[1].split()[0] for m in failed) == ["cache", "rate_limits"], failed
        finally:
            redis_server.start()
        deadline = time.monotonic() + 20
        while True:
            c.post(URL, json={"model": "fake", "input": ["again"]}, headers=h)
            time.sleep(0.1)
            r = c.post(URL, json={"model": "fake", "input": ["again"]}, headers=h)
            if r.headers["x-cache-hits"] == "1":
                break
            assert time.monotonic() < deadline, "the cache did not come back"
            time.sleep(0.2)
        assert any("is back" in m for m in records.messages)
    logging.getLogger("gateway.redis").removeHandler(records)


def test_admin_clear_on_redis(redis_server):
    redis_server.client().flushall()
    with serve(_redis_toml(redis_server.url)) as c:
        c.post(URL, json={"model": "fake", "input": ["a", "b"]})
        c.post(URL, json={"model": "other", "input": ["a"]})
        _written(redis_server, 3)
        assert c.post("/admin/cache/clear", json={"model": "fake"}).json() == {"removed": 2}
        assert c.post("/admin/cache/clear").json() == {"removed": 1}


def test_redis_config_errors():
    with pytest.raises(Exception, match=r"`\$\.cache\.store`: \"redis\" needs a `\[redis\]` table"):
        parse_config('[cache]\nstore = "redis"\n')
    with pytest.raises(Exception, match=r"`\$\.redis\.timeout_ms`"):
        parse_config('[redis]\nurl = "redis://x"\ntimeout_ms = 0\n')


def test_an_unreachable_redis_at_start_does_not_stop_serving():
    asyncio.get_event_loop_policy()  # (no loop needed: the app runs its own)
    records = _Records()
    logging.getLogger("gateway.redis").addHandler(records)
    try:
        with serve(_redis_toml("redis://127.0.0.1:9/0")) as c:
            r = c.post(URL, json={"model": "fake", "input": ["still served"]})
            assert r.status_code == 200 and r.headers["x-cache-hits"] == "0"
    finally:
        logging.getLogger("gateway.redis").removeHandler(records)
    # The operator who has no Redis running is told how to start one.
    (failed,) = [m for m in records.messages if "failed" in m]
    assert "redis at redis://127.0.0.1:9/0 failed for cache" in failed
    assert "Is a server running there? For local use, `gateway redis-server` starts the one installed" in failed


def test_gateway_redis_server_starts_the_locked_server_on_the_configs_port(tmp_path):
    import socket
    import subprocess
    import sys

    import redis

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "gateway.toml"
    config.write_text(f'[cache]\nstore = "redis"\n[redis]\nurl = "redis://127.0.0.1:{port}/0"\n')
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "redis-server", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        client = redis.Redis(port=port, socket_connect_timeout=0.2)
        wait_until(lambda: _pings(client), "the server answering PING")
        assert client.info("server")["valkey_version"].startswith("9.1")
        client.close()
    finally:
        proc.terminate()
        out = proc.communicate(timeout=20)[0].decode()
    assert f"on redis://127.0.0.1:{port} (nothing kept on disk" in out
    # A URL naming another host is refused with what to do instead.
    config.write_text('[cache]\nstore = "redis"\n[redis]\nurl = "redis://cache.internal:6379/0"\n')
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "redis-server", "--config", str(config)], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "`[redis] url` is redis://cache.internal: `gateway redis-server` starts a server on this machine only" in (
        done.stderr
    )


def _pings(client) -> bool:
    import redis

    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def test_the_quota_is_charged_as_if_uncached():
    # 30 tokens a minute: "a b c" is 5 tokens; six inputs of it are 30 whether computed, repeated or cached.
    auth = '[[auth.keys]]\nkey = "quota-key-12"\ntokens_per_minute = 30\n'
    config = parse_config(auth + TOML)
    with serve(auth + TOML, keys=KeyStore.from_config(config.auth)) as c:
        h = {"Authorization": "Bearer quota-key-12"}
        r = c.post(URL, json={"model": "fake", "input": ["a b c"] * 6}, headers=h)
        assert r.status_code == 200 and r.json()["usage"]["total_tokens"] == 30
        r = c.post(URL, json={"model": "fake", "input": ["a b c"]}, headers=h)
        assert r.status_code == 429 and "30 tokens per minute" in r.json()["error"]["message"]


def test_a_redis_outage_does_not_hand_out_a_fresh_budget(redis_server):
    redis_server.client().flushall()
    auth = '[[auth.keys]]\nkey = "limited-key-3"\nrequests_per_minute = 6\n'
    h = {"Authorization": "Bearer limited-key-3"}
    with serve(_redis_toml(redis_server.url) + auth, keys="config") as c:
        assert [c.post(URL, json={"model": "fake", "input": "x"}, headers=h).status_code for _ in range(5)] == [200] * 5
        redis_server.stop()
        try:
            # This process's own window carries on from the shared use last seen (5 of 6), not from 0.
            codes = [c.post(URL, json={"model": "fake", "input": "x"}, headers=h).status_code for _ in range(4)]
            assert codes.count(200) == 1 and codes.count(429) == 3, codes
        finally:
            redis_server.start()


def _commands(redis_server, name: str) -> int:
    stats = redis_server.client().info("commandstats").get(f"cmdstat_{name}", {})
    return int(stats.get("calls", 0))


def test_redis_lookups_and_writes_of_one_loop_turn_go_out_as_one_call_each(redis_server):
    from gateway.base.config import RedisConfig
    from gateway.shared.redis_state import RedisLink, RedisStore

    redis_server.client().flushall()

    async def main():
        store = RedisStore(RedisLink(RedisConfig(url=redis_server.url, prefix="coalesce")), ttl_s=60)
        try:

            async def written():
                await until(lambda: not (store._tasks or store._pending_writes), "the writes sent")

            store.put_many([(b"warm", b"up")])  # the first write also loads the script
            await written()
            writes = _commands(redis_server, "evalsha")
            store.put_many([(b"w%d" % i, b"v%d" % i) for i in range(3)])
            store.put_many([(b"x", b"vx")])
            await written()
            assert _commands(redis_server, "evalsha") == writes + 1

            mgets = _commands(redis_server, "mget")
            got = await asyncio.gather(
                store.get_many([b"w0", b"nothing"]), store.get_many([b"x"]), store.get_many([b"w2", b"w1"])
            )
            assert got == [[b"v0", None], [b"vx"], [b"v2", b"v1"]]
            assert _commands(redis_server, "mget") == mgets + 1

            # A caller that gives up leaves the others their answers.
            gone = asyncio.ensure_future(store.get_many([b"w0"]))
            kept = asyncio.ensure_future(store.get_many([b"w1"]))
            await asyncio.sleep(0)
            gone.cancel()
            assert await kept == [b"v1"]
            assert gone.cancelled()
            assert 0 < redis_server.client().ttl(b"coalesce:cache:" + b"x".hex().encode()) <= 60

            # Redis restarted without the write script: it is sent again.
            redis_server.client().script_flush()
            store.put_many([(b"after", b"flush")])
            await written()
            assert await store.get_many([b"after"]) == [b"flush"]
        finally:
            await store.close()

    asyncio.run(main())


def test_a_malformed_or_mismatched_entry_is_a_counted_miss_never_a_500(redis_server):
    """A shared store returns what anyone wrote: an entry cut short, of another width or holding NaN is
    computed again (and rewritten), counted as an invalid lookup, and never fails the request."""
    redis_server.client().flushall()
    with serve(_redis_toml(redis_server.url)) as c:
        first = c.post(URL, json={"model": "fake", "input": ["mangled"]})
        _written(redis_server, 1)
        r = redis_server.client()
        (name,) = r.keys("gateway:cache:*")
        from gateway.embedding.cache import Entry

        other_width = Entry(np.ones(4, dtype=np.float32), 1).pack()  # the fake model's vectors have 8
        for bad in (b"\x01\x00", r.get(name)[:-2], r.get(name) + b"\x00\x00\x80\x7f", other_width):
            r.set(name, bad)
            invalid = _metric(c, "gateway_cache_lookups_total", model="fake", result="invalid")
            again = c.post(URL, json={"model": "fake", "input": ["mangled"]})
            assert again.status_code == 200, again.text
            assert again.headers["x-cache-hits"] == "0"
            assert again.json()["data"] == first.json()["data"]
            assert _metric(c, "gateway_cache_lookups_total", model="fake", result="invalid") == invalid + 1
            # Rewritten whole by the request that computed it.
            wait_until(lambda bad=bad: r.get(name) != bad, "the entry rewritten")


def test_entries_are_checked_on_unpack():
    from gateway.embedding.cache import Cache, Entry, MemoryStore

    good = Entry(np.arange(4, dtype=np.float32), 7, cut=True)
    assert Entry.unpack(good.pack(), 4).vector.tolist() == [0, 1, 2, 3] and Entry.unpack(good.pack()).cut
    for raw, dimension, needle in (
        (b"", None, "malformed entry of 0 bytes"),
        (good.pack()[:4], None, "malformed entry of 4 bytes"),
        (good.pack()[:-1], None, "malformed entry of 19 bytes"),
        (good.pack(), 8, "entry of width 4, the model's is 8"),
        (Entry(np.array([1.0, np.nan], dtype=np.float32), 1).pack(), 2, "NaN or infinite"),
    ):
        with pytest.raises(ValueError, match=needle):
            Entry.unpack(raw, dimension)

    async def lookup() -> list[Entry | None]:
        cache = Cache(MemoryStore(1 << 20))
        cache.store.put_many([(b"k1", good.pack()), (b"k2", good.pack()[:-1])])
        return await cache.lookup("m", [b"k1", b"k2", b"k3"], dimension=4)

    found = asyncio.run(lookup())
    assert found[0] is not None and found[0].tokens == 7 and found[1] is None and found[2] is None
