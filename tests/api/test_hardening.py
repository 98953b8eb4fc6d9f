"""What a hostile or careless client (or a hostile model folder) can try, and what the gateway does about it."""

from __future__ import annotations

import json
import logging
import os
import resource
import socket
import stat
import threading
import time
from collections.abc import Iterator
from typing import ClassVar

import httpx
import pytest

from gateway.base.config import ConfigError, parse_config

from ..conftest import FAKE_TOML, FakeBackend, make_app, partial_request, serve, until, uvicorn_server, wait_until

URL = "/v1/embeddings"


# -- 1. labels and log lines a client can choose ------------------------------------------------------------


def test_invented_methods_do_not_grow_the_metrics(fake_client):
    """h11 accepts any token as a method; each used to become a label value of every HTTP series."""
    fake_client.request("BREW", URL)  # the OTHER series exists from here on
    before = fake_client.get("/metrics").text
    for i in range(300):
        r = fake_client.request(f"X{i:04d}" + "M" * 200, URL)
        assert r.status_code == 405
    after = fake_client.get("/metrics").text
    assert 'method="OTHER"' in after and "MMMM" not in after
    assert abs(len(after) - len(before)) < 500, (len(before), len(after))


def test_a_client_chosen_path_stays_on_one_log_line(caplog):
    from gateway.base.observability import ACCESS_LOG, log_field

    assert log_field("/v1/embeddings") == "/v1/embeddings"
    assert log_field('/x\nrequest_id=forged "') == '"/x\\nrequest_id=forged \\""'
    assert log_field("/é") == '"/\\u00e9"'
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        ACCESS_LOG.add("rid", "GET", "/schema/x\nrequest_id=forged method=GET", 404, "-", "-", 1.0)
        ACCESS_LOG.flush()
    (line,) = [r.getMessage() for r in caplog.records if "rid" in r.getMessage()]
    assert "\n" not in line and 'path="/schema/x\\nrequest_id=forged method=GET"' in line


# -- 3. and 4. the token quota: charged for work done, checked before work is spent ------------------------


class Counting(FakeBackend):
    """The fake backend, counting tokenize calls."""

    name = "fake-counting"
    calls: ClassVar[list[int]] = []

    def tokenize(self, texts):
        Counting.calls.append(len(texts))
        return super().tokenize(texts)


class CountingPlugin:
    from gateway import hookimpl

    @staticmethod
    @hookimpl
    def register_backends(register):
        register(Counting)


KEYED = """
[[auth.keys]]
key = "quota-key-1234"
tokens_per_minute = 60
[models.fake]
backend = "fake-counting"
path = "."
[models.fake.options]
delay_s = 0.3
max_tokens = 64
"""
QUOTA = {"Authorization": "Bearer quota-key-1234"}


def _window(client):
    (key,) = [k for k in client.app.state.gateway.keys._keys if k.name != "key-1"]
    return key.tokens


def test_a_timed_out_request_is_charged_for_the_batches_that_ran_and_the_rest_is_never_computed():
    with serve(KEYED, plugins=(CountingPlugin,), keys="config") as client:
        FakeBackend.batches = []
        texts = [f"word{i}" for i in range(16)]  # 3 tokens each, 4 per batch, 0.3 s per batch
        r = client.post(URL, json={"model": "fake", "input": texts}, headers={**QUOTA, "X-Request-Timeout-Ms": "450"})
        assert r.status_code == 504 and "within 0.45s" in r.json()["error"]["message"]
        used = _window(client).in_use()
        # The others never will: a request the key sends next is answered, and the older request's inputs would
        # go first.
        assert client.post(URL, json={"model": "fake", "input": "next"}, headers=QUOTA).status_code == 200
        computed = {t for batch in FakeBackend.batches for t in batch} - {"next"}
        assert 4 <= len(computed) <= 8, computed  # one or two batches ran
        # 48 tokens charged, those of the batches taken (12 or 24) kept: the rest given back.
        assert used in (12, 24), used


def test_an_empty_token_quota_is_refused_before_tokenizing():
    with serve(KEYED, plugins=(CountingPlugin,), keys="config") as client:
        # The whole minute's quota in use now: nothing of it comes back for a minute, however slow the machine.
        _window(client).fill(60)
        Counting.calls = []
        r = client.post(URL, json={"model": "fake", "input": ["a"] * 50}, headers=QUOTA)
        assert r.status_code == 429 and "60 tokens per minute" in r.json()["error"]["message"]
        assert Counting.calls == []


def test_a_large_request_stops_tokenizing_at_its_first_input_over_the_limit():
    toml = "[server]\nmax_input_chars = 40000\n" + FAKE_TOML.replace('"fake"', '"fake-counting"', 1)
    with serve(toml, plugins=(CountingPlugin,)) as client:
        Counting.calls = []
        texts = ["w " * 10_000] * 10  # 20,000 characters each: about two per tokenizing step
        r = client.post(URL, json={"model": "fake", "input": ["ok", *texts]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "input[1]"
        assert sum(Counting.calls) <= 3, Counting.calls  # not all 11 inputs


# -- 5. one key cannot starve the others ---------------------------------------------------------------------


def test_keys_take_turns_and_a_flooding_key_cannot_fill_the_queue_for_others():
    import asyncio

    from gateway.runtime.batching import Batcher, QueueFull

    from ..runtime.test_batching import Recorder

    gate = threading.Event()
    backend = Recorder(gate=gate)
    b = Batcher(backend, backend.load(), model="rec", max_batch_size=4, max_queue=16)

    async def main():
        ids = backend.tokenize
        hold = asyncio.ensure_future(b.embed(["hold"], ids(["hold"]), owner="flood"))
        await until(lambda: backend.started == [["hold"]], "the first batch holds the worker")
        floods = [
            asyncio.ensure_future(b.embed([f"f{r}-{i}" for i in range(4)], ids(["xx"] * 4), owner="flood"))
            for r in range(4)
        ]
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull, match="16 inputs queued"):  # the flooding key is at the bound
            await b.embed(["more"], ids(["more"]), owner="flood")
        polite = asyncio.ensure_future(b.embed(["polite"], ids(["xx"]), owner="polite"))  # still admitted
        await asyncio.sleep(0.01)
        gate.set()
        await asyncio.gather(hold, polite, *floods)

    asyncio.run(main())
    b.close()
    # The polite key's one input went into the first batch after "hold", beside the flood's first inputs (its
    # length is theirs: a backend that pads groups similar lengths first).
    assert "polite" in backend.batches[1], backend.batches


# -- 6. slow clients ---------------------------------------------------------------------------------------


SLOW = "[server]\nheader_timeout_s = 1.0\nbody_timeout_s = 0.5\nsend_timeout_s = 1.0\n" + FAKE_TOML


# The half-open connections' own header deadline: far past the timed /health calls (about 0.5 s after the first
# connection here), so that the server closing them all at once does not land among the calls.
HALF_OPEN = SLOW.replace("header_timeout_s = 1.0", "header_timeout_s = 5.0")
# The client's end and the server's end of each half-open connection are file descriptors of this process.
HALF_OPEN_SOCKETS = 1000


@pytest.fixture
def open_files() -> Iterator[None]:
    """Room for both ends of the half-open connections and the rest: the soft RLIMIT_NOFILE raised up to the
    hard one (many machines start at 1024), or the test skipped where the hard limit is below that."""
    need = 2 * HALF_OPEN_SOCKETS + 500
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"needs {need} open files; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_half_open_connections_do_not_slow_health_and_are_closed_after_the_header_deadline(open_files):
    with uvicorn_server(make_app(HALF_OPEN)) as (url, _):
        host, port = url.removeprefix("http://").split(":")
        socks = []
        try:
            for _ in range(HALF_OPEN_SOCKETS):
                s = socket.create_connection((host, int(port)))
                s.sendall(b"GET /health HT")  # half a request line, then nothing
                socks.append(s)
            took = []
            with httpx.Client(base_url=url) as http:
                for _ in range(50):
                    t = time.perf_counter()
                    assert http.get("/health").status_code == 200
                    took.append(time.perf_counter() - t)
            took.sort()
            # A server that served /health behind the half-open connections would answer at their 5 s header
            # deadline; unslowed, each call takes milliseconds. A fifth of the deadline for the second-slowest
            # call leaves a loaded machine's pauses room and still tells the two apart.
            assert took[-2] < 1.0, took[-5:]
            # Closed by the server once past the header deadline (5 s): an empty read, not a timeout.
            for s in socks[:20]:
                s.settimeout(60)
                assert s.recv(100) == b""
        finally:
            for s in socks:
                s.close()


def test_a_body_that_stops_arriving_is_a_408():
    with uvicorn_server(make_app(SLOW)) as (url, _), partial_request(url, 100, '{"model": ') as s:
        s.settimeout(5)
        answer = s.recv(4096).decode()
        assert answer.startswith("HTTP/1.1 408"), answer
        assert "request body not received within 0.5s" in answer


def test_a_client_that_does_not_read_its_response_is_dropped():
    toml = SLOW + "[models.fake.options]\ndimension = 1024\nmax_tokens = 64\n"
    with uvicorn_server(make_app(toml)) as (url, server):
        host, port = url.removeprefix("http://").split(":")
        body = json.dumps({"model": "fake", "input": [f"text {i}" for i in range(2000)]}).encode()
        s = socket.create_connection((host, int(port)))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(
            f"POST {URL} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer test-key\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        try:
            deadline = time.monotonic() + 20
            while len(server.server_state.connections) and time.monotonic() < deadline:
                time.sleep(0.1)  # the response (about 20 MB of JSON) waits for a reader that never comes
            assert not server.server_state.connections, "the stalled connection should have been dropped"
        finally:
            s.close()


# -- 7. and 8. model folders are not trusted -----------------------------------------------------------------


def test_a_model_folder_cannot_run_its_own_code_without_trust_remote_code(tmp_path, minilm_path):
    import shutil

    folder = tmp_path / "hostile"
    shutil.copytree(minilm_path, folder)
    marker = tmp_path / "ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\nclass Evil: pass\n")
    modules = json.loads((folder / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "", "type": "evil.Evil"})
    (folder / "modules.json").write_text(json.dumps(modules))
    toml = f'[models.hostile]\nbackend = "torch"\npath = "{folder}"\n'
    with serve(toml, plugins=()) as client:
        r = client.post(URL, json={"model": "hostile", "input": "x"})
        assert r.status_code == 503
    assert not marker.exists(), "the model folder's code ran"


def test_module_paths_that_leave_the_model_folder_are_refused(tmp_path, minilm_path):
    import shutil

    from gateway_onnx import OnnxBackend

    from gateway.plugin import BackendError

    folder = tmp_path / "escape"
    shutil.copytree(minilm_path, folder)
    modules = json.loads((folder / "modules.json").read_text())
    modules[1]["path"] = "../../../etc"
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "model.onnx").write_bytes(b"")  # never read: the folder is refused first
    with pytest.raises(BackendError, match="leaves the model folder"):
        OnnxBackend(model="m", path=str(folder)).load()
    from gateway_onnx import OnnxConverter

    with pytest.raises(BackendError, match="leaves the model folder"):
        OnnxConverter().convert(str(folder), str(tmp_path / "out"), None)


# -- 9. keys -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "auth",
    [
        '[auth]\napi_keys = ["the-same-key-1"]\n[[auth.keys]]\nkey = "the-same-key-1"\nmodels = ["fake"]\n',
        '[auth]\napi_keys = ["the-same-key-1", "sha256:'
        + __import__("hashlib").sha256(b"the-same-key-1").hexdigest()
        + '"]\n',
    ],
)
def test_a_key_listed_twice_is_refused(auth):
    with pytest.raises(ConfigError, match=r"the same key as `\$.auth.api_keys\[0\]`; a key may be listed once"):
        parse_config(auth + FAKE_TOML)


def test_an_env_key_that_is_also_in_the_config_is_refused(monkeypatch):
    from gateway.shared.keys import KeyStore

    config = parse_config('[[auth.keys]]\nkey = "restricted-key-1"\nmodels = ["fake"]\n' + FAKE_TOML)
    monkeypatch.setenv("GATEWAY_API_KEYS", "restricted-key-1")
    with pytest.raises(ConfigError, match="GATEWAY_API_KEYS: key 1 is also in the config file"):
        KeyStore.from_config(config.auth)


def test_trace_logging_which_would_log_keys_is_not_offered():
    with pytest.raises(ConfigError, match=r"Invalid enum value 'trace' - at `\$.server.log_level`"):
        parse_config('[server]\nlog_level = "trace"\n')


def test_the_generated_key_can_go_to_an_owner_only_file(tmp_path):
    import subprocess
    import sys

    config = tmp_path / "g.toml"
    config.write_text("[server]\nport = 0\n")
    key_file = tmp_path / "key"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config), "--key-file", str(key_file)],
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []

    def read() -> None:
        for line in proc.stderr or ():
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        # Said once the file is written (the file exists, empty, a moment before its key is in it).
        wait_until(lambda: any("this run's key is in" in line for line in lines), "the key file announced", 60)
        key = key_file.read_text().strip()
        assert key.startswith("gw-") and stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    finally:
        proc.terminate()
        proc.wait(30)
        reader.join(30)
    err = "".join(lines)
    assert key not in err and f"this run's key is in {key_file}" in err


# -- 10. what anonymous callers see ------------------------------------------------------------------------


def test_readiness_is_open_but_names_models_only_to_a_key():
    with serve(FAKE_TOML + '\n[models.gone]\nbackend = "fake"\npath = "/nowhere/at/all"\n') as client:
        anonymous = client.get("/ready", headers={"Authorization": ""})
        assert anonymous.status_code == 503 and anonymous.json() == {"status": "not ready", "models": {}}
        keyed = client.get("/ready")
        assert keyed.json()["models"] == {"fake": "ready", "gone": "failed"}
        err = client.post(URL, json={"model": "gone", "input": "x"}).json()["error"]["message"]
        assert ".../all does not exist" in err and "/nowhere" not in err
        (card,) = [c for c in client.get("/v1/models").json()["data"] if c["id"] == "gone"]
        assert "/nowhere" not in card["error"]


def test_metrics_can_require_a_key():
    with serve("[server]\nmetrics_require_key = true\n" + FAKE_TOML) as client:
        assert client.get("/metrics", headers={"Authorization": ""}).status_code == 401
        assert client.get("/metrics").status_code == 200
    with serve(FAKE_TOML) as client:
        assert client.get("/metrics", headers={"Authorization": ""}).status_code == 200


# -- 11. the schema says what the API enforces -------------------------------------------------------------


def test_the_request_schema_states_the_constraints_and_the_configured_models():
    with serve("[server]\nmax_items_per_request = 7\nmax_input_chars = 99\n" + FAKE_TOML) as client:
        schema = client.get("/schema/openapi.json").json()
    body = schema["components"]["schemas"]["EmbeddingRequest"]
    props = body["properties"]
    assert props["model"]["enum"] == ["fake", "fake-alias"]
    text, texts = props["input"]["anyOf"]
    assert text == {"type": "string", "minLength": 1, "maxLength": 99, "description": text["description"]}
    assert texts["minItems"] == 1 and texts["maxItems"] == 7 and texts["items"]["minLength"] == 1
    assert props["dimensions"]["anyOf"][0] == {"type": "integer", "enum": [2, 4, 8]}
    assert body["additionalProperties"] is False
    params = schema["paths"]["/v1/embeddings"]["post"]["parameters"]
    assert any(p["name"] == "X-Request-Timeout-Ms" and p["in"] == "header" for p in params)


def test_the_schema_follows_a_reload(tmp_path):
    cfg = tmp_path / "g.toml"
    cfg.write_text(FAKE_TOML)
    with serve(config_path=cfg) as client:
        cfg.write_text(FAKE_TOML + '\n[models.second]\nbackend = "fake"\npath = "."\n')
        assert client.post("/admin/reload").status_code == 200
        enum = client.get("/schema/openapi.json").json()["components"]["schemas"]["EmbeddingRequest"]
        assert enum["properties"]["model"]["enum"] == ["fake", "fake-alias", "second"]
