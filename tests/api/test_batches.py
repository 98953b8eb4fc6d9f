"""OpenAI's Batch API for embeddings (`/v1/files`, `/v1/batches`), driven by the official `openai` client."""

from __future__ import annotations

import base64
import io
import json
import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
from litestar.testing import TestClient

from gateway.base.config import ConfigError, KeyConfig, parse_config
from gateway.shared.keys import KeyStore

from ..conftest import API_KEY, AUTH, SENTENCES, FakeBackend, fake_vector, make_app, serve, wait_loaded, wait_until


def _toml(data_dir: Path, delay_s: float = 0.0, chunk_lines: int = 4, extra: str = "") -> str:
    return f"""
    [batches]
    data_dir = "{data_dir}"
    chunk_lines = {chunk_lines}
    {extra}

    [models.fake]
    backend = "fake"
    path = "."
    matryoshka_dimensions = [2, 4, 8]
    [models.fake.options]
    delay_s = {delay_s}
    """


def _client(http: TestClient, key: str = API_KEY) -> openai.OpenAI:
    """The official client, sending its requests through the test client (the app, its lifespan running)."""
    return openai.OpenAI(base_url=f"{http.base_url}/v1", api_key=key, http_client=http, max_retries=0)


def _line(custom_id: str, text: Any, **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/embeddings",
        "body": {"model": "fake", "input": text, **body},
    }


def _jsonl(lines: list[Any]) -> bytes:
    return b"".join((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n" for x in lines)


def _run(client: openai.OpenAI, lines: list[Any], timeout: float = 60) -> Any:
    uploaded = client.files.create(file=("in.jsonl", io.BytesIO(_jsonl(lines))), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
    return _finished(client, batch.id, timeout)


def _finished(client: openai.OpenAI, batch_id: str, timeout: float = 60) -> Any:
    done = ("completed", "failed", "cancelled", "expired")
    wait_until(lambda: client.batches.retrieve(batch_id).status in done, f"batch {batch_id} done", timeout)
    return client.batches.retrieve(batch_id)


def _lines(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(x) for x in client.files.content(file_id).content.splitlines()]


@pytest.fixture
def fake_batches(tmp_path: Path) -> Iterator[tuple[TestClient, openai.OpenAI]]:
    with serve(_toml(tmp_path)) as http:
        yield http, _client(http)


def test_round_trip_with_the_openai_client(fake_batches):
    http, client = fake_batches
    lines = [_line(f"req-{i}", f"text number {i}") for i in range(10)]
    lines.append(_line("dims", ["a b", "c"], dimensions=4, encoding_format="base64"))
    batch = _run(client, lines)
    assert batch.status == "completed" and batch.endpoint == "/v1/embeddings"
    assert batch.request_counts.total == 11 and batch.request_counts.completed == 11
    assert batch.request_counts.failed == 0 and batch.error_file_id is None
    assert batch.completed_at and batch.in_progress_at and batch.finalizing_at
    out = {x["custom_id"]: x for x in _lines(client, batch.output_file_id)}
    assert sorted(out) == sorted(x["custom_id"] for x in lines)
    for i in range(10):
        line = out[f"req-{i}"]
        assert line["error"] is None and line["response"]["status_code"] == 200
        assert line["id"].startswith("batch_req_") and line["response"]["request_id"]
        direct = http.post("/v1/embeddings", json={"model": "fake", "input": f"text number {i}"}).json()
        assert line["response"]["body"]["data"] == direct["data"]
        assert line["response"]["body"]["usage"] == direct["usage"]
    # Request options behave as on /v1/embeddings (here `dimensions` and base64).
    direct = http.post(
        "/v1/embeddings", json={"model": "fake", "input": ["a b", "c"], "dimensions": 4, "encoding_format": "base64"}
    ).json()
    assert out["dims"]["response"]["body"]["data"] == direct["data"]
    assert len(np.frombuffer(base64.b64decode(direct["data"][0]["embedding"]), "<f4")) == 4
    assert [b.id for b in client.batches.list()] == [batch.id]
    assert client.files.retrieve(batch.output_file_id).purpose == "batch_output"


def test_malformed_lines_go_to_the_error_file(fake_batches):
    _, client = fake_batches
    lines = [
        _line("good-1", "fine text"),
        b"{not json",
        _line("unknown-model", "x") | {"body": {"model": "nope", "input": "x"}},
        _line("empty", []),
        _line("too-long", " ".join(["w"] * 40)),
        {**_line("wrong-url", "x"), "url": "/v1/chat/completions"},
        _line("bad-field", "x", colour="red"),
        _line("good-2", ["two", "texts"]),
    ]
    batch = _run(client, lines)
    assert batch.status == "completed"
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (8, 2, 6)
    good = {x["custom_id"] for x in _lines(client, batch.output_file_id)}
    assert good == {"good-1", "good-2"}
    errors = {x["custom_id"]: x for x in _lines(client, batch.error_file_id)}
    assert set(errors) == {None, "unknown-model", "empty", "too-long", "wrong-url", "bad-field"}
    assert errors[None]["error"]["code"] == "invalid_json" and "line 2" in errors[None]["error"]["message"]
    assert errors["unknown-model"]["response"]["status_code"] == 404
    assert "nope" in errors["unknown-model"]["error"]["message"]
    assert errors["empty"]["response"]["status_code"] == 400
    assert errors["too-long"]["error"]["code"] == "input_too_long"
    assert errors["wrong-url"]["error"]["code"] == "invalid_url"
    assert "colour" in errors["bad-field"]["error"]["message"]
    body = errors["too-long"]["response"]["body"]["error"]
    assert body["type"] == "invalid_request_error" and body["code"] == "input_too_long"


def test_bad_requests_are_named(fake_batches):
    http, client = fake_batches
    with pytest.raises(openai.BadRequestError) as info:
        client.files.create(file=("in.jsonl", io.BytesIO(b'{"a": 1}\n')), purpose="fine-tune")
    assert "purpose" in info.value.message
    empty = client.files.create(file=("in.jsonl", io.BytesIO(b"\n\n")), purpose="batch")
    with pytest.raises(openai.BadRequestError) as info:
        client.batches.create(input_file_id=empty.id, endpoint="/v1/embeddings", completion_window="24h")
    assert info.value.code == "empty_file"
    uploaded = client.files.create(file=("in.jsonl", io.BytesIO(_jsonl([_line("a", "x")]))), purpose="batch")
    with pytest.raises(openai.BadRequestError) as info:
        client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert "/v1/chat/completions" in info.value.message and info.value.code == "invalid_endpoint"
    with pytest.raises(openai.NotFoundError) as info:
        client.batches.create(input_file_id="file-nope", endpoint="/v1/embeddings", completion_window="24h")
    assert "file-nope" in info.value.message
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="1h")
    batch = _finished(
        client, client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h").id
    )
    with pytest.raises(openai.BadRequestError) as info:
        client.batches.cancel(batch.id)
    assert "already completed" in info.value.message
    r = http.post("/v1/files", content=b"plain", headers={"Content-Type": "text/plain"})
    assert r.status_code == 400 and "multipart" in r.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve("file-nope")
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")


def test_file_bounds(tmp_path):
    with serve(_toml(tmp_path, extra="max_file_bytes = 100\nmax_lines = 2")) as http:
        client = _client(http)
        with pytest.raises(openai.APIStatusError) as info:
            client.files.create(file=("in.jsonl", io.BytesIO(b"x" * 5000)), purpose="batch")
        assert info.value.status_code in (400, 413) and "100" in info.value.message
        with pytest.raises(openai.BadRequestError) as info:
            client.files.create(file=("in.jsonl", io.BytesIO(b"{}\n{}\n{}\n")), purpose="batch")
        assert info.value.code == "too_many_lines"


def test_keys_see_only_their_own(tmp_path):
    keys = KeyStore(
        entries=[
            KeyConfig(key="key-alice", name="alice"),
            KeyConfig(key="key-bob", name="bob"),
            KeyConfig(key="key-root", name="root", admin=True),
        ]
    )
    with serve(_toml(tmp_path), keys=keys) as http:
        alice, bob, root = (_client(http, k) for k in ("key-alice", "key-bob", "key-root"))
        batch = _run(alice, [_line("a", "alice's text")])
        for call in (
            lambda: bob.batches.retrieve(batch.id),
            lambda: bob.batches.cancel(batch.id),
            lambda: bob.files.retrieve(batch.input_file_id),
            lambda: bob.files.content(batch.output_file_id),
            lambda: bob.files.delete(batch.output_file_id),
        ):
            with pytest.raises(openai.NotFoundError):
                call()
        with pytest.raises(openai.NotFoundError):
            bob.batches.create(input_file_id=batch.input_file_id, endpoint="/v1/embeddings", completion_window="24h")
        assert [b.id for b in bob.batches.list()] == [] and list(bob.files.list()) == []
        assert [b.id for b in root.batches.list()] == [batch.id]
        assert root.files.content(batch.output_file_id).content == alice.files.content(batch.output_file_id).content
        assert alice.files.delete(batch.input_file_id).deleted
        with pytest.raises(openai.NotFoundError):
            alice.files.retrieve(batch.input_file_id)


def test_list_pages(fake_batches):
    _, client = fake_batches
    uploaded = client.files.create(file=("in.jsonl", io.BytesIO(_jsonl([_line("a", "x")]))), purpose="batch")
    made = [
        client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h", metadata={"n": str(i)}
        ).id
        for i in range(3)
    ]
    first = client.batches.list(limit=2)
    assert [b.id for b in first.data] == made[::-1][:2] and first.has_more
    assert [b.id for b in client.batches.list(limit=2, after=first.data[-1].id).data] == made[:1]
    assert [b.id for b in client.batches.list()] == made[::-1]  # the client follows the pages itself
    assert client.batches.retrieve(made[1]).metadata == {"n": "1"}


def test_cancel_writes_what_was_computed(tmp_path):
    with serve(_toml(tmp_path, delay_s=0.05, chunk_lines=2)) as http:
        client = _client(http)
        uploaded = client.files.create(
            file=("in.jsonl", io.BytesIO(_jsonl([_line(f"r{i}", f"t {i}") for i in range(200)]))), purpose="batch"
        )
        batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
        wait_until(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 2, "a chunk done")
        assert client.batches.cancel(batch.id).status in ("cancelling", "cancelled")
        done = _finished(client, batch.id)
        assert done.status == "cancelled" and done.cancelled_at
        out = _lines(client, done.output_file_id)
        assert 2 <= len(out) == done.request_counts.completed < 200
        assert len(out) % 2 == 0  # whole chunks only


def _expected(n: int) -> dict[str, list[float]]:
    return {f"r{i}": np.round(fake_vector(f"t {i}").astype(np.float64), 9).tolist() for i in range(n)}


def test_a_restarted_gateway_finishes_the_job(tmp_path):
    n = 30
    lines = _jsonl([_line(f"r{i}", f"t {i}") for i in range(n)])
    with serve(_toml(tmp_path, delay_s=0.03, chunk_lines=3)) as http:
        client = _client(http)
        uploaded = client.files.create(file=("in.jsonl", io.BytesIO(lines)), purpose="batch")
        batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
        wait_until(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 6, "two chunks done")
    # Stopped between chunks; a chunk written but not recorded (a crash between the two) is dropped on resume.
    with open(tmp_path / "work" / f"{batch.id}.out", "ab") as f:
        f.write(b'{"custom_id": "r0", "torn": true}\n')
    with serve(_toml(tmp_path, chunk_lines=3)) as http:
        client = _client(http)
        stopped = client.batches.retrieve(batch.id)
        done = _finished(client, batch.id)
    assert stopped.request_counts.completed < n
    assert done.status == "completed" and done.request_counts.completed == n
    text = (tmp_path / "files" / f"{done.output_file_id}.jsonl").read_bytes()
    out = [json.loads(x) for x in text.splitlines()]
    ids = [x["custom_id"] for x in out]
    assert sorted(ids) == sorted(f"r{i}" for i in range(n))  # each exactly once
    assert {x["custom_id"]: x["response"]["body"]["data"][0]["embedding"] for x in out} == _expected(n)


def test_interactive_requests_are_served_while_a_job_runs(tmp_path, monkeypatch):
    """A client's request goes before the job's lines queued when it arrived (into the first batch the worker
    takes), and is answered while the job runs on."""
    FakeBackend.batches = []
    # Two job batches hold the fake's one worker until released: one holding the second chunk's first line (the
    # chunk's other lines queue behind it), and one of the last chunk's (the job cannot finish before the test
    # has looked at it). Events, not timings: a pause of the test does not change what it sees.
    holds = {"t 64": threading.Event(), "t 399": threading.Event()}
    held = {text: threading.Event() for text in holds}
    embed = FakeBackend.embed

    def holding(self: FakeBackend, texts: Any, token_ids: Any) -> Any:
        for text, release in holds.items():
            if text in texts:
                held[text].set()
                release.wait(60)
        return embed(self, texts, token_ids)

    monkeypatch.setattr(FakeBackend, "embed", holding)
    with serve(_toml(tmp_path, chunk_lines=64)) as http, ThreadPoolExecutor(1) as pool:
        try:
            client = _client(http)
            batcher = http.app.state.gateway.registry.find("fake").batcher
            lines = [_line(f"r{i}", f"t {i}") for i in range(400)]
            uploaded = client.files.create(file=("in.jsonl", io.BytesIO(_jsonl(lines))), purpose="batch")
            batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
            wait_until(held["t 64"].is_set, "the second chunk's first batch computing", 60)
            wait_until(lambda: len(batcher._idle) >= 40, "the second chunk's other lines queued", 60)
            answer = pool.submit(http.post, "/v1/embeddings", json={"model": "fake", "input": "interactive"})
            wait_until(lambda: batcher.queued >= 1, "the interactive request queued", 60)
            holds["t 64"].set()
            r = answer.result(60)
            assert r.status_code == 200
            # The worker's next batch after the held one is the client's, ahead of the job's queued lines.
            after = FakeBackend.batches[next(i for i, b in enumerate(FakeBackend.batches) if "t 64" in b) + 1]
            assert after == ["interactive"], FakeBackend.batches
            assert client.batches.retrieve(batch.id).status == "in_progress"
            # The job's lines merge into full background batches (twice the fake's max_batch_size of 4), not one
            # line per batch.
            job_batches = [b for b in FakeBackend.batches if b and b[0].startswith("t ")]
            assert job_batches and max(map(len, job_batches)) == 8
            client.batches.cancel(batch.id)
            holds["t 399"].set()
            assert _finished(client, batch.id).status in ("cancelled", "completed")
        finally:
            # Before the pool and the app close: they wait for what the holds keep.
            for release in holds.values():
                release.set()


def test_real_minilm_job_equals_the_embeddings_route(tmp_path, minilm_path):
    toml = f"""
    [batches]
    data_dir = "{tmp_path}"
    chunk_lines = 4

    [models.minilm]
    backend = "torch"
    path = "{minilm_path}"
    """
    with serve(toml, plugins=()) as http:
        client = _client(http)
        lines = [
            {"custom_id": f"s{i}", "method": "POST", "url": "/v1/embeddings", "body": {"model": "minilm", "input": s}}
            for i, s in enumerate(SENTENCES)
        ]
        batch = _run(client, lines, timeout=120)
        assert batch.status == "completed" and batch.request_counts.completed == len(SENTENCES)
        out = {x["custom_id"]: x["response"]["body"] for x in _lines(client, batch.output_file_id)}
        direct = client.embeddings.create(model="minilm", input=SENTENCES, encoding_format="float")
    for i, row in enumerate(direct.data):
        got = np.array(out[f"s{i}"]["data"][0]["embedding"])
        np.testing.assert_allclose(got, np.array(row.embedding), rtol=0, atol=1e-6)


def test_job_lines_are_not_bound_by_the_request_timeout(tmp_path):
    # 32 lines on a model computing 4 per 0.05 s: the last wait about 0.4 s, past the 0.2 s request timeout.
    with serve(
        _toml(tmp_path, delay_s=0.05, chunk_lines=32, extra="") + "\n[server]\nrequest_timeout_s = 0.2\n"
    ) as http:
        batch = _run(_client(http), [_line(f"r{i}", f"t {i}") for i in range(32)])
    assert batch.status == "completed" and batch.request_counts.failed == 0


def test_batches_config():
    config = parse_config('[batches]\ndata_dir = "jobs"\nchunk_lines = 8\n', "x.toml", Path("/srv/gw"))
    assert config.batches.data_dir == "/srv/gw/jobs" and config.batches.chunk_lines == 8
    assert parse_config("").batches.enabled and parse_config("").batches.max_lines == 50_000
    with pytest.raises(ConfigError, match=r"unknown field `bogus` - at `\$\.batches`"):
        parse_config("[batches]\nbogus = 1\n", "x.toml")
    with pytest.raises(ConfigError, match="chunk_lines"):
        parse_config("[batches]\nchunk_lines = 0\n", "x.toml")


def test_turned_off(tmp_path):
    with serve(_toml(tmp_path, extra="enabled = false")) as http:
        r = http.get("/v1/batches")
        assert r.status_code == 404 and "enabled = false" in r.json()["error"]["message"]
    assert not (tmp_path / "batches.sqlite3").exists()


def test_a_job_out_of_token_quota_waits_for_it(tmp_path, monkeypatch):
    from gateway.embedding import batch_runner
    from gateway.shared.windows import SlidingWindow

    monkeypatch.setattr(batch_runner, "_QUOTA_RECHECK_S", 0.02)
    keys = KeyStore(entries=[KeyConfig(key="key-q", name="q", tokens_per_minute=10)])
    now = [1000.0]
    key = keys.named("q")
    assert key is not None
    key.tokens = SlidingWindow(10, clock=lambda: now[0])
    with serve(_toml(tmp_path, chunk_lines=1), keys=keys) as http:
        client = _client(http, "key-q")
        # 4 tokens a line ([CLS] one two [SEP]) against 10 a minute: two lines, then the job waits for quota.
        uploaded = client.files.create(
            file=("in.jsonl", io.BytesIO(_jsonl([_line(f"r{i}", "one two") for i in range(3)]))), purpose="batch"
        )
        batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
        wait_until(lambda: client.batches.retrieve(batch.id).request_counts.completed == 2, "two lines done")
        waiting = client.batches.retrieve(batch.id)
        assert waiting.status == "in_progress" and waiting.request_counts.failed == 0
        now[0] += 62  # a minute on: the quota is back
        done = _finished(client, batch.id)
    assert done.status == "completed" and (done.request_counts.completed, done.request_counts.failed) == (3, 0)


def _create(client: openai.OpenAI, lines: list[Any], **kwargs: Any) -> Any:
    uploaded = client.files.create(file=("in.jsonl", io.BytesIO(_jsonl(lines))), purpose="batch")
    return client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h", **kwargs
    )


def test_jobs_take_turns(tmp_path):
    # A big job first, then a small one of another key: the small one finishes long before the big one.
    keys = KeyStore(entries=[KeyConfig(key="key-big", name="big"), KeyConfig(key="key-small", name="small")])
    with serve(_toml(tmp_path, delay_s=0.05, chunk_lines=2), keys=keys) as http:
        big_client, small_client = _client(http, "key-big"), _client(http, "key-small")
        big = _create(big_client, [_line(f"b{i}", f"big {i}") for i in range(300)])
        wait_until(lambda: big_client.batches.retrieve(big.id).request_counts.completed >= 2, "the big job started")
        small = _finished(small_client, _create(small_client, [_line(f"s{i}", f"small {i}") for i in range(6)]).id)
        assert small.status == "completed" and small.request_counts.completed == 6
        now = big_client.batches.retrieve(big.id)
        assert now.status == "in_progress" and now.request_counts.completed < 100, now.request_counts
        # Two jobs of one key take turns as well.
        other = _finished(big_client, _create(big_client, [_line(f"o{i}", f"other {i}") for i in range(4)]).id)
        assert other.status == "completed" and big_client.batches.retrieve(big.id).status == "in_progress"
        big_client.batches.cancel(big.id)
        _finished(big_client, big.id)


def _failing_append(monkeypatch: pytest.MonkeyPatch, doomed: dict[str, int]) -> None:
    """Writing a chunk of the batches in `doomed` fails (a full disk) as many times as each one's count says."""
    from gateway.embedding import batch_runner

    append = batch_runner._append
    monkeypatch.setattr(batch_runner, "_BACKOFF_S", 0.05)
    monkeypatch.setattr(batch_runner, "_RETRIES", 2)

    def failing(out: Path, *args: Any) -> Any:
        if doomed.get(out.stem, 0) > 0:
            doomed[out.stem] -= 1
            raise OSError(28, "No space left on device")
        return append(out, *args)

    monkeypatch.setattr(batch_runner, "_append", failing)


def test_a_job_that_keeps_failing_fails_and_never_blocks_the_others(tmp_path, monkeypatch):
    doomed: dict[str, int] = {}
    _failing_append(monkeypatch, doomed)
    with serve(_toml(tmp_path, delay_s=0.02, chunk_lines=2)) as http:
        client = _client(http)
        bad = _create(client, [_line(f"r{i}", f"t {i}") for i in range(40)])
        doomed[bad.id] = 10**6
        good = _finished(client, _create(client, [_line(f"g{i}", f"good {i}") for i in range(20)]).id)
        assert good.status == "completed" and good.request_counts.completed == 20
        failed = _finished(client, bad.id)
    assert failed.status == "failed" and failed.failed_at
    (error,) = failed.errors.data
    assert error.code == "internal_error" and "No space left on device" in error.message
    assert "3 times" in error.message  # the first try and two retries


def test_a_job_that_fails_a_few_times_is_retried_and_completes(tmp_path, monkeypatch):
    doomed: dict[str, int] = {}
    _failing_append(monkeypatch, doomed)
    with serve(_toml(tmp_path, delay_s=0.02, chunk_lines=2)) as http:
        client = _client(http)
        batch = _create(client, [_line(f"r{i}", f"t {i}") for i in range(20)])
        doomed[batch.id] = 2
        done = _finished(client, batch.id)
        out = _lines(client, done.output_file_id)
    assert done.status == "completed" and done.request_counts.completed == 20 and doomed[batch.id] == 0
    assert sorted(x["custom_id"] for x in out) == sorted(f"r{i}" for i in range(20))  # each exactly once


def test_a_job_past_its_window_expires(tmp_path):
    n = 200
    with serve(_toml(tmp_path, delay_s=0.05, chunk_lines=2, extra="completion_window_s = 1")) as http:
        client = _client(http)
        batch = _create(client, [_line(f"r{i}", f"t {i}") for i in range(n)])
        assert batch.expires_at == batch.created_at + 1
        done = _finished(client, batch.id)
        out, errors = _lines(client, done.output_file_id), _lines(client, done.error_file_id)
    assert done.status == "expired" and done.expired_at and done.expired_at >= done.expires_at
    counts = done.request_counts
    assert counts.completed == len(out) < n and counts.failed == len(errors) and counts.completed + counts.failed == n
    assert sorted(x["custom_id"] for x in out + errors) == sorted(f"r{i}" for i in range(n))  # each exactly once
    assert all(x["response"] is None and x["error"]["code"] == "batch_expired" for x in errors)
    assert "completion window expired" in errors[0]["error"]["message"]


def test_duplicate_custom_ids_fail_the_batch(fake_batches):
    _, client = fake_batches
    lines = [_line("a", "x"), _line("b", "y"), _line("a", "z"), _line("c", "w"), _line("b", "v"), b"{oops"]
    batch = _create(client, lines)
    assert batch.status == "failed" and batch.failed_at and batch.output_file_id is None
    assert [(e.code, e.line, e.param) for e in batch.errors.data] == [
        ("duplicate_custom_id", 3, "custom_id"),
        ("duplicate_custom_id", 5, "custom_id"),
    ]
    assert "'a'" in batch.errors.data[0].message and "unique" in batch.errors.data[0].message
    assert client.batches.retrieve(batch.id).status == "failed"


def test_usage_counts_the_jobs_tokens(tmp_path):
    with serve(_toml(tmp_path, delay_s=0.05, chunk_lines=2)) as http:
        client = _client(http)
        batch = _create(client, [_line(f"r{i}", "one two three " * (i % 5)) for i in range(60)] + [_line("bad", [])])
        assert batch.usage.input_tokens == 0 and batch.usage.total_tokens == 0
        wait_until(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 4, "two chunks done")
        midway = client.batches.retrieve(batch.id)
        done = _finished(client, batch.id)
        out = _lines(client, done.output_file_id)
    total = sum(x["response"]["body"]["usage"]["prompt_tokens"] for x in out)
    assert 0 < midway.usage.input_tokens < total
    usage = done.usage
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (total, 0, total)
    assert usage.input_tokens_details.cached_tokens == 0 and usage.output_tokens_details.reasoning_tokens == 0


def test_a_finish_cut_short_is_done_again_without_losing_the_output(tmp_path):
    # Stopped after the work file became the output file but before the database said so: the next start
    # finishes the job again and the output file keeps its lines.
    import sqlite3

    lines = [_line(f"r{i}", f"t {i}") for i in range(6)]
    with serve(_toml(tmp_path)) as http:
        client = _client(http)
        batch = _run(client, lines)
        before = client.files.content(batch.output_file_id).content
    db = sqlite3.connect(tmp_path / "batches.sqlite3")
    with db:
        db.execute(
            "UPDATE batches SET status = 'finalizing', completed_at = NULL, output_file_id = NULL WHERE id = ?",
            (batch.id,),
        )
        db.execute("DELETE FROM files WHERE id = ?", (batch.output_file_id,))
    db.close()
    with serve(_toml(tmp_path)) as http:
        client = _client(http)
        done = _finished(client, batch.id)
        assert done.status == "completed" and done.output_file_id == batch.output_file_id
        assert client.files.content(done.output_file_id).content == before


def test_a_job_over_several_backends_and_options_equals_the_embeddings_route(tmp_path):
    # Job lines take the same pipeline as /v1/embeddings on every backend: ONNX, GGUF (llama.cpp) and wordllama,
    # with `dimensions`, a prompt-free list input and base64 output among the lines.
    root = Path(__file__).resolve().parents[2]
    toml = f"""
    [batches]
    data_dir = "{tmp_path}"
    chunk_lines = 3

    [models.onnx]
    backend = "onnx"
    path = "{root / "models/minilm-onnx"}"
    [models.gguf]
    backend = "gguf"
    path = "{root / "models/minilm-q8_0.gguf"}"
    [models.wordllama]
    backend = "wordllama"
    path = "pkg:wordllama"
    matryoshka_dimensions = [64, 128, 256]
    """
    bodies = [
        {"model": "onnx", "input": SENTENCES[0]},
        {"model": "onnx", "input": SENTENCES[1:4], "encoding_format": "base64"},
        {"model": "gguf", "input": SENTENCES[4]},
        {"model": "gguf", "input": SENTENCES[5:7]},
        {"model": "wordllama", "input": SENTENCES[7], "dimensions": 64},
        {"model": "wordllama", "input": SENTENCES[:3]},
    ]
    lines = [{"custom_id": f"l{i}", "method": "POST", "url": "/v1/embeddings", "body": b} for i, b in enumerate(bodies)]
    with serve(toml, plugins=()) as http:
        client = _client(http)
        batch = _run(client, lines, timeout=180)
        assert batch.status == "completed" and batch.request_counts.completed == len(bodies), batch
        out = {x["custom_id"]: x["response"]["body"] for x in _lines(client, batch.output_file_id)}
        for i, body in enumerate(bodies):
            direct = http.post("/v1/embeddings", json=body, headers={"Authorization": f"Bearer {API_KEY}"})
            assert direct.status_code == 200, direct.text
            want, got = direct.json(), out[f"l{i}"]
            assert got["model"] == want["model"] and got["usage"] == want["usage"], (got["usage"], want["usage"])
            for a, b in zip(got["data"], want["data"], strict=True):
                np.testing.assert_allclose(_vector(a["embedding"]), _vector(b["embedding"]), rtol=0, atol=1e-5)


def _vector(value: Any) -> np.ndarray:
    if isinstance(value, str):
        return np.frombuffer(base64.b64decode(value), dtype=np.float32)
    return np.array(value, dtype=np.float32)


def test_a_second_lifespan_on_the_running_app_changes_nothing(tmp_path, caplog):
    """A harness that starts the app's lifespan again while it runs (schemathesis does) gets no second set of
    models or job runner, and its end closes nothing the first still serves."""
    FakeBackend.batches = []
    app = make_app(_toml(tmp_path))
    gateway_log = logging.getLogger("gateway")  # its records do not reach the root logger, where caplog listens
    gateway_log.addHandler(caplog.handler)
    try:
        with TestClient(app=app, timeout=60) as http:
            http.headers.update(AUTH)
            wait_loaded(http)
            gw = app.state.gateway
            registry, poke = gw.registry, gw.poke_batches
            with TestClient(app=app, timeout=60) as again:
                assert gw.registry is registry and gw.poke_batches is poke  # nothing loaded or started twice
                r = again.post("/v1/embeddings", json={"model": "fake", "input": "through the second"}, headers=AUTH)
                assert r.status_code == 200, r.text
                batch = _run(_client(again), [_line(f"r{i}", f"twice? {i}") for i in range(12)])
                assert batch.status == "completed" and batch.request_counts.completed == 12
            assert "lifespan started again" in caplog.text
            # Each job line computed once (one runner), and the models and the job store still serve after its end.
            computed = [t for b in FakeBackend.batches for t in b if t.startswith("twice? ")]
            assert sorted(computed) == sorted(f"twice? {i}" for i in range(12))
            assert http.post("/v1/embeddings", json={"model": "fake", "input": "after it"}).status_code == 200
            assert _run(_client(http), [_line("a", "after the second lifespan")]).status == "completed"
    finally:
        gateway_log.removeHandler(caplog.handler)
