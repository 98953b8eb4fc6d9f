"""`copies = "per-worker"` with `[server] workers` > 1: each front worker loads its own copy of the model and
computes its requests; the runtime process does not load it, and still counts the keys' limits, holds the cache
and answers /ready for all. A real `gateway serve` with two front workers, over HTTP."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from gateway.base.config import ConfigError, parse_config
from gateway.runtime.plugins import load_plugins
from gateway.runtime.registry import build_specs

from ..conftest import serve, wait_until
from .test_workers import ADMIN, Cluster, _runtime_pid, _vectors

LIMITED = "copies-limited-key"
TOKENS = "copies-tokens-key1"
LIMIT = 5
TOKEN_LIMIT = 40
MODELS = """
[models.copied]
backend = "wordllama"
path = "pkg:wordllama"
copies = "per-worker"
matryoshka_dimensions = [64, 256]
[models.wordllama]
backend = "wordllama"
path = "pkg:wordllama"
"""
TOML = f"""
[auth]
api_keys = ["{ADMIN}"]
[[auth.keys]]
key = "{LIMITED}"
requests_per_minute = {LIMIT}
[[auth.keys]]
key = "{TOKENS}"
tokens_per_minute = {TOKEN_LIMIT}
{MODELS}"""
AUTH = {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("copies"), toml=TOML)
    try:
        yield c
    finally:
        c.stop()


def _by_worker(cluster: Cluster, key: str, body: dict, at_least: int = 1) -> dict[str, list[httpx.Response]]:
    """Answers by worker pid, on fresh connections until both workers have answered `at_least` times each."""
    seen: dict[str, list[httpx.Response]] = {}
    deadline = time.monotonic() + 60
    while len(seen) < 2 or min(map(len, seen.values())) < at_least:
        assert time.monotonic() < deadline, f"one worker answered everything: {list(seen)}"
        r = cluster.post(key, body)
        seen.setdefault(r.headers["x-gateway-worker"], []).append(r)
    return seen


def test_both_workers_compute_it_with_the_single_process_vectors(cluster):
    texts = ["a copy in every front", "computed where it was asked", "x"]
    with serve(TOML, keys="config") as local:  # workers = 1: the key changes nothing
        for fmt, dims in (("base64", None), ("float", 64), ("int8", None)):
            body = {"model": "copied", "input": texts, "encoding_format": fmt, "dimensions": dims}
            mine = local.post("/v1/embeddings", json=body, headers=AUTH).json()
            for answers in _by_worker(cluster, ADMIN, body).values():
                theirs = answers[0].json()
                assert [d["embedding"] for d in theirs["data"]] == [d["embedding"] for d in mine["data"]], fmt
                assert theirs["usage"] == mine["usage"]


def test_the_runtime_does_not_load_it_and_ready_counts_the_copies(cluster):
    log = cluster.log.read_text()
    assert "runtime process: model 'copied' is not loaded here: each front worker loads its own copy" in log
    # Two copies (one per front) and one shared model (the runtime's): a copy at the runtime would make it 3.
    assert log.count("model 'copied' ready") == 2 and log.count("model 'wordllama' ready") == 1
    ready = httpx.get(f"{cluster.url}/ready", headers=AUTH).json()
    assert ready == {
        "status": "ready",
        "models": {"copied": "ready", "wordllama": "ready"},
        "replicas": {"copied": "2/2"},
        "workers": "2/2",
    }
    cards = {m["id"]: m for m in httpx.get(f"{cluster.url}/v1/models", headers=AUTH).json()["data"]}
    assert (cards["copied"]["dimension"], cards["copied"]["ready"]) == (256, True)
    metrics = httpx.get(f"{cluster.url}/metrics").text
    assert 'gateway_model_ready{model="copied"} 1.0' in metrics


def test_a_keys_request_limit_holds_across_the_copies(cluster):
    statuses: dict[str, list[int]] = {}
    deadline = time.monotonic() + 60
    while len(statuses) < 2 or sum(map(len, statuses.values())) < LIMIT + 3:
        assert time.monotonic() < deadline, f"one worker answered everything: {statuses}"
        r = cluster.post(LIMITED, {"model": "copied", "input": "hello"})
        statuses.setdefault(r.headers["x-gateway-worker"], []).append(r.status_code)
    codes = [c for cs in statuses.values() for c in cs]
    assert codes.count(200) == LIMIT and set(codes) == {200, 429}, statuses


def test_a_keys_token_limit_holds_across_the_copies(cluster):
    # As many requests as their tokens fit in the key's minute, whichever front computes them.
    body = {"model": "copied", "input": "one two three four five six seven"}
    tokens = cluster.post(ADMIN, body).json()["usage"]["total_tokens"]
    fits = TOKEN_LIMIT // tokens
    statuses: dict[str, list[int]] = {}
    deadline = time.monotonic() + 60
    while len(statuses) < 2 or sum(map(len, statuses.values())) < fits + 3:
        assert time.monotonic() < deadline, f"one worker answered everything: {statuses}"
        r = cluster.post(TOKENS, body)
        statuses.setdefault(r.headers["x-gateway-worker"], []).append(r.status_code)
        if r.status_code == 429:
            assert "tokens per minute" in r.json()["error"]["message"]
    codes = [c for cs in statuses.values() for c in cs]
    assert codes.count(200) == fits and set(codes) == {200, 429}, statuses


def test_a_hit_computed_by_one_copy_is_served_by_the_other_and_cleared(cluster):
    body = {"model": "copied", "input": f"cached at the runtime {uuid.uuid4()}", "encoding_format": "base64"}
    first = cluster.post(ADMIN, body)
    assert first.status_code == 200 and first.headers["x-cache-hits"] == "0"
    deadline = time.monotonic() + 60
    while True:
        assert time.monotonic() < deadline, "no other worker answered"
        again = cluster.post(ADMIN, body)
        if again.headers["x-gateway-worker"] != first.headers["x-gateway-worker"]:
            break
    assert again.status_code == 200 and again.headers["x-cache-hits"] == "1"
    assert (_vectors(again) == _vectors(first)).all()
    cleared = httpx.post(f"{cluster.url}/admin/cache/clear", json={"model": "copied"}, headers=AUTH)
    assert cleared.status_code == 200 and cleared.json()["removed"] >= 1, cleared.text
    # One cache, at the runtime: no front keeps the cleared entry.
    assert cluster.post(ADMIN, body).headers["x-cache-hits"] == "0"


def test_a_reload_swaps_the_copy_in_every_front_before_it_answers(cluster):
    original = cluster.config.read_text()
    body = {"model": "copied", "input": "one two three four five six seven eight"}
    try:
        changed = original.replace('copies = "per-worker"', 'copies = "per-worker"\nmax_input_tokens = 4')
        added = '\n[models.added]\nbackend = "wordllama"\npath = "pkg:wordllama"\ncopies = "per-worker"\n'
        cluster.config.write_text(changed + added)
        loads = cluster.log.read_text().count("model 'copied' ready")
        r = httpx.post(f"{cluster.url}/admin/reload", headers=AUTH, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["changed"] == ["copied"] and r.json()["added"] == ["added"]
        assert r.json()["models"] == {"copied": "ready", "wordllama": "ready", "added": "ready"}
        # Both fronts loaded the new copies before the answer, and the runtime none.
        log = cluster.log.read_text()
        assert log.count("model 'copied' ready") == loads + 2 and log.count("model 'added' ready") == 2
        # Ready at once, with no request to either front since: both have their copy of the added model.
        ready = httpx.get(f"{cluster.url}/ready", headers=AUTH).json()
        assert ready["status"] == "ready" and ready["replicas"] == {"copied": "2/2", "added": "2/2"}, ready
        for answers in _by_worker(cluster, ADMIN, body).values():
            assert answers[0].status_code == 400, answers[0].text
            assert "accepts at most 4 tokens" in answers[0].json()["error"]["message"]
        assert httpx.get(f"{cluster.url}/ready").status_code == 200
    finally:
        cluster.config.write_text(original)
        assert httpx.post(f"{cluster.url}/admin/reload", headers=AUTH, timeout=60).status_code == 200
    for answers in _by_worker(cluster, ADMIN, body).values():
        assert answers[0].status_code == 200


def test_per_worker_copies_are_refused_where_they_make_no_sense():
    with pytest.raises(ConfigError, match=r"Invalid enum value 'per-process' - at `\$.models.m.copies`"):
        parse_config('[models.m]\nbackend = "wordllama"\npath = "x"\ncopies = "per-process"\n')
    with pytest.raises(ConfigError, match=r'`\$.models.m.copies`: "per-worker" cannot go with `\[models.m.ray\]`'):
        parse_config('[models.m]\nbackend = "wordllama"\npath = "x"\ncopies = "per-worker"\n[models.m.ray]\n')
    fallback = """
[models.a]
backend = "wordllama"
path = "x"
copies = "per-worker"
embedding_space = "s"
fallbacks = ["b"]
[models.b]
backend = "wordllama"
path = "x"
embedding_space = "s"
"""
    with pytest.raises(ConfigError, match=r"`\$.models.a.fallbacks\[0\]`: model 'b' has copies = 'shared'"):
        parse_config(fallback)
    remote = parse_config(
        '[models.r]\nbackend = "openai"\ncopies = "per-worker"\n[models.r.options]\nbase_url = "http://h"\n'
    )
    with pytest.raises(ConfigError, match=r"`\$.models.r.copies`: backend 'openai' cannot have \"per-worker\" copies"):
        build_specs(remote, load_plugins().backends())


def test_a_fronts_copy_gets_its_share_of_the_cores():
    from gateway_gguf.backend import GgufBackend
    from gateway_onnx.backend import OnnxBackend
    from gateway_torch import TorchBackend

    config = parse_config(MODELS)
    backends = load_plugins().backends()
    specs = build_specs(config, backends, workers=2)
    assert specs["copied"].cores == max(1, (os.cpu_count() or 1) // 2) and specs["wordllama"].cores is None
    assert build_specs(config, backends)["copied"].cores is None  # one process: every core
    assert TorchBackend.within_cores(TorchBackend.Options(), 3).threads == 3
    assert TorchBackend.within_cores(TorchBackend.Options(threads=8), 3).threads == 8  # configured: kept
    assert OnnxBackend.within_cores(OnnxBackend.Options(parallel_batches=2), 4).intra_op_threads == 2
    assert GgufBackend.within_cores(GgufBackend.Options(), 1).n_threads == 1


def test_a_killed_runtime_leaves_the_copies_serving(tmp_path):
    c = Cluster(tmp_path, toml=TOML)
    try:
        runtime = _runtime_pid(c)
        assert runtime is not None
        os.kill(runtime, signal.SIGKILL)
        # The fronts compute it themselves: the lookups and limits wait for the new runtime, nothing fails.
        seen = _by_worker(c, ADMIN, {"model": "copied", "input": f"while the runtime restarts {uuid.uuid4()}"})
        assert all(r.status_code == 200 for answers in seen.values() for r in answers), seen
        wait_until(lambda: _runtime_pid(c) not in (None, runtime), "a new runtime process", 60)
        # The new runtime learns of the fronts' copies when they connect again.
        wait_until(lambda: httpx.get(f"{c.url}/ready").status_code == 200, "ready again", 60)
        assert httpx.get(f"{c.url}/ready", headers=AUTH).json()["replicas"] == {"copied": "2/2"}
        assert c.log.read_text().count("model 'copied' ready") == 2  # the copies were not loaded again
    finally:
        c.stop()
