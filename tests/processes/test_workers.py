"""`[server] workers` > 1: a real `gateway serve` with two front workers and one runtime process, over HTTP."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.base.config import ConfigError, parse_config

from ..conftest import serve, wait_until
from ..upstream import free_port, serve_process

ADMIN = "workers-admin-key-1"
LIMITED = "workers-limited-key"
LIMIT = 5
TOML = f"""
[auth]
api_keys = ["{ADMIN}"]
[[auth.keys]]
key = "{LIMITED}"
requests_per_minute = {LIMIT}
[models.wordllama]
backend = "wordllama"
path = "pkg:wordllama"
"""


def _descendants(pid: int) -> set[int]:
    """Every process below `pid`, from /proc (no psutil here)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Cluster:
    """`python -m gateway serve` with `workers` front workers, debug logging (answers name their worker)."""

    def __init__(self, tmp: Path, workers: int = 2, extra: str = "", toml: str = TOML) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = tmp / f"workers-{self.port}.toml"
        self.log = tmp / f"workers-{self.port}.log"
        server = f'[server]\nport = {self.port}\nworkers = {workers}\nlog_level = "debug"\naccess_log = false\n'
        self.config.write_text(server + extra + textwrap.dedent(toml))
        self.proc = serve_process(self.config, self.log)
        wait_until(self._ready, f"the server on {self.url} ready ({self.log})", 120)

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"gateway serve exited: {self.log.read_text()[-3000:]}")
        try:
            return httpx.get(f"{self.url}/ready", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def post(self, key: str, body: dict, client: httpx.Client | None = None) -> httpx.Response:
        """One request on a fresh connection (the kernel spreads new connections over the workers)."""
        send = client.post if client is not None else httpx.post
        return send(f"{self.url}/v1/embeddings", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("workers"))
    try:
        yield c
    finally:
        c.stop()


def _vectors(response: httpx.Response) -> np.ndarray:
    return np.array([np.frombuffer(base64.b64decode(d["embedding"]), np.float32) for d in response.json()["data"]])


def test_workers_setting_is_checked():
    assert parse_config("[server]\nworkers = 3\n").server.worker_count() == 3
    assert parse_config('[server]\nworkers = "auto"\n').server.worker_count() == (os.cpu_count() or 1)
    assert parse_config("").server.worker_count() == 1
    for bad in ("0", '"many"', "1.5", "true"):
        with pytest.raises(ConfigError, match=r'`\$.server.workers` must be a whole number >= 1 or "auto", got'):
            parse_config(f"[server]\nworkers = {bad}\n")


def test_models_ready_and_vectors_equal_the_single_process(cluster):
    models = httpx.get(f"{cluster.url}/v1/models", headers={"Authorization": f"Bearer {ADMIN}"}).json()["data"]
    assert [(m["id"], m["dimension"], m["ready"]) for m in models] == [("wordllama", 256, True)]
    ready = httpx.get(f"{cluster.url}/ready", headers={"Authorization": f"Bearer {ADMIN}"})
    assert ready.status_code == 200 and ready.json()["models"] == {"wordllama": "ready"}
    texts = ["the front and the runtime", "one batch for every worker", "x"]
    with serve(TOML, keys="config") as local:
        for fmt in ("base64", "float", "int8"):
            body = {"model": "wordllama", "input": texts, "encoding_format": fmt}
            mine = local.post("/v1/embeddings", json=body, headers={"Authorization": f"Bearer {ADMIN}"}).json()
            theirs = cluster.post(ADMIN, body).json()
            assert [d["embedding"] for d in theirs["data"]] == [d["embedding"] for d in mine["data"]], fmt
            assert theirs["usage"] == mine["usage"]
    # An error raised at the runtime comes back whole.
    r = cluster.post(ADMIN, {"model": "nope", "input": "x"})
    assert r.status_code == 404 and "nope" in r.json()["error"]["message"]


def test_a_keys_request_limit_holds_across_workers(cluster):
    statuses: dict[str, list[int]] = {}
    deadline = time.monotonic() + 60
    # Fresh connections until both workers have answered for the key, LIMIT + some more requests in all.
    while len(statuses) < 2 or sum(map(len, statuses.values())) < LIMIT + 3:
        assert time.monotonic() < deadline, f"one worker answered everything: {statuses}"
        r = cluster.post(LIMITED, {"model": "wordllama", "input": "hello"})
        statuses.setdefault(r.headers["x-gateway-worker"], []).append(r.status_code)
    codes = [c for cs in statuses.values() for c in cs]
    assert codes.count(200) == LIMIT and set(codes) == {200, 429}, statuses


def test_a_hit_computed_by_one_worker_is_served_by_another(cluster):
    text = f"computed once, at the runtime {uuid.uuid4()}"
    body = {"model": "wordllama", "input": text, "encoding_format": "base64"}
    first = cluster.post(ADMIN, body)
    assert first.status_code == 200 and first.headers["x-cache-hits"] == "0"
    deadline = time.monotonic() + 60
    while True:
        assert time.monotonic() < deadline, "no other worker answered"
        again = cluster.post(ADMIN, body)
        if again.headers["x-gateway-worker"] != first.headers["x-gateway-worker"]:
            break
    assert again.status_code == 200 and again.headers["x-cache-hits"] == "1"
    np.testing.assert_array_equal(_vectors(again), _vectors(first))


def _both_workers(cluster: Cluster, key: str, body: dict) -> dict[str, list[int]]:
    """Statuses by worker pid, of requests on fresh connections until both workers have answered."""
    seen: dict[str, list[int]] = {}
    deadline = time.monotonic() + 60
    while len(seen) < 2:
        assert time.monotonic() < deadline, f"one worker answered everything: {seen}"
        r = cluster.post(key, body)
        seen.setdefault(r.headers["x-gateway-worker"], []).append(r.status_code)
    return seen


def _http_requests(cluster: Cluster) -> float:
    text = httpx.get(f"{cluster.url}/metrics").text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "gateway_http_requests_total" and sample.labels["path"] == "/v1/embeddings":
                total += sample.value
    return total


def test_metrics_add_up_every_worker_and_the_runtime(cluster):
    before = _http_requests(cluster)
    seen = _both_workers(cluster, ADMIN, {"model": "wordllama", "input": "counted"})
    sent = sum(map(len, seen.values()))
    assert _http_requests(cluster) - before == sent
    text = httpx.get(f"{cluster.url}/metrics").text
    assert 'gateway_model_ready{model="wordllama"} 1.0' in text  # the runtime's gauges
    assert 'gateway_batch_size_count{model="wordllama"}' in text  # the runtime's counters, from its own files


def test_ready_counts_the_workers(cluster):
    r = httpx.get(f"{cluster.url}/ready")
    assert r.status_code == 200 and r.json() == {"status": "ready", "models": {}, "workers": "2/2"}


def test_admin_models_comes_from_the_runtime(cluster):
    # The console's models panel with workers: the runtime process holds the models and their queues.
    r = httpx.get(f"{cluster.url}/admin/models", headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200, r.text
    [model] = r.json()["data"]
    assert (model["id"], model["placement"], model["circuit"], model["card"]["state"]) == (
        "wordllama",
        "in-process",
        "closed",
        "ready",
    )


def test_admin_check_runs_at_the_runtime(cluster):
    # `gateway check --url` and the console's check panel with workers: the models are in the runtime process.
    r = httpx.get(f"{cluster.url}/admin/check", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=120)
    assert r.status_code == 200, r.text
    [row] = r.json()["rows"]
    assert row["model"] == "wordllama" and row["spearman"] > 0.5, row
    r = httpx.get(f"{cluster.url}/admin/check", params={"models": "nope"}, headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 404 and "nope" in r.json()["error"]["message"], r.text


def test_reload_and_sighup_reach_every_worker_before_the_answer(cluster):
    original = cluster.config.read_text()
    body = {"model": "wordllama", "input": "after the reload"}
    try:
        cluster.config.write_text(original + '\n[[auth.keys]]\nkey = "workers-new-key-1"\n')
        r = httpx.post(f"{cluster.url}/admin/reload", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)
        assert r.status_code == 200, r.text
        # No worker may answer with the old keys once the reload is answered: the new key works on both.
        assert all(codes == [200] * len(codes) for codes in _both_workers(cluster, "workers-new-key-1", body).values())
        cluster.config.write_text(original + '\n[[auth.keys]]\nkey = "workers-new-key-2"\n')
        cluster.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: cluster.post("workers-new-key-2", body).status_code == 200, "the SIGHUP reload", 60)
        seen = _both_workers(cluster, "workers-new-key-2", body)
        assert all(codes == [200] * len(codes) for codes in seen.values()), seen
        gone = _both_workers(cluster, "workers-new-key-1", body)
        assert all(codes == [401] * len(codes) for codes in gone.values()), gone
    finally:
        cluster.config.write_text(original)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


class _Load:
    """Threads sending single-text requests on fresh connections until stopped; each answer's status (or the
    transport error's name) with the worker that gave it."""

    def __init__(self, cluster: Cluster, threads: int = 4, texts: int = 1) -> None:
        self.cluster = cluster
        self.texts = texts
        self.stop = threading.Event()
        self.results: list[tuple[str, object]] = []
        self.sent_by = [0] * threads
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]
        for t in self.threads:
            t.start()

    def _run(self, n: int) -> None:
        i = 0
        while not self.stop.is_set():
            i += 1
            tag = uuid.uuid4()
            body = {"model": "wordllama", "input": [f"load {n} {i} {k} {tag} " * 3 for k in range(self.texts)]}
            self.sent_by[n] += 1
            try:
                r = self.cluster.post(ADMIN, body)
                self.results.append(
                    (r.headers.get("x-gateway-worker", "?"), r.status_code if r.status_code == 200 else r.text)
                )
            except httpx.TransportError as exc:
                self.results.append(("?", type(exc).__name__))

    def unanswered(self) -> int:
        return sum(self.sent_by) - len(self.results)

    def finish(self) -> list[tuple[str, object]]:
        self.stop.set()
        for t in self.threads:
            t.join(120)
        return self.results


def test_a_killed_worker_is_restarted_and_costs_only_its_own_requests(tmp_path):
    c = Cluster(tmp_path)
    try:
        load = _Load(c)
        wait_until(lambda: len({w for w, _ in load.results}) >= 2, "both workers answering", 60)
        victim = int(next(w for w, status in load.results if w != "?"))
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: len({w for w, _ in load.results} - {str(victim), "?"}) >= 2, "a new worker answering", 120)
        results = load.finish()
        lost = [r for r in results if r[1] != 200]
        # At most the requests the dead worker held (one per client thread), and only as lost connections.
        assert len(lost) <= len(load.threads) and all(r[0] == "?" for r in lost), lost
        wait_until(lambda: httpx.get(f"{c.url}/ready").json().get("workers") == "2/2", "2/2 workers ready", 60)
    finally:
        c.stop()


def _runtime_pid(cluster: Cluster) -> int | None:
    pids = [
        p for p in _descendants(cluster.proc.pid) if "gateway.processes.runtime_process" in _cmdline(p) and _alive(p)
    ]
    return pids[0] if len(pids) == 1 else None


def test_a_killed_runtime_is_restarted_and_its_requests_retried(tmp_path):
    c = Cluster(tmp_path)
    try:
        old = _runtime_pid(c)
        assert old is not None
        load = _Load(c, threads=4, texts=100)
        wait_until(lambda: len(load.results) >= 4, "answers under load", 120)
        # Stopped before it is killed, so that requests are certainly in flight at it: a runtime killed at a
        # random moment was often between requests (CI saw no retry), the fronts' parsing and encoding being
        # most of a request's time. A stopped runtime takes no more answers out: every client's next request
        # is sent and waits at it (a second is ample for a front to pass it on).
        os.kill(old, signal.SIGSTOP)
        wait_until(lambda: load.unanswered() == len(load.threads), "a request from every client", 60)
        time.sleep(1)
        os.kill(old, signal.SIGKILL)
        wait_until(lambda: _runtime_pid(c) not in (None, old), "a new runtime process", 60)
        done = len(load.results)
        wait_until(lambda: len(load.results) >= done + 8, "answers from the new runtime", 120)
        results = load.finish()
        # Every request answered: those in flight were retried once, on the new runtime (the fronts reconnect to
        # a runtime that answers, never to the dying one's socket).
        assert [r for r in results if r[1] != 200] == []
        assert "retrying it once" in c.log.read_text()
        wait_until(lambda: httpx.get(f"{c.url}/ready").json().get("workers") == "2/2", "2/2 workers ready", 60)
    finally:
        c.stop()


class _Slow:
    """An embeddings request whose body stops halfway until released: in flight at a front for as long as needed."""

    def __init__(self, cluster: Cluster, texts: int) -> None:
        body = json.dumps({"model": "wordllama", "input": [f"slow {k} {uuid.uuid4()}" for k in range(texts)]})
        self.half = len(body) // 2
        self.body = body.encode()
        self.release = threading.Event()
        self.response: httpx.Response | Exception | None = None
        headers = {"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"}
        self.thread = threading.Thread(target=self._send, args=(cluster, headers), daemon=True)
        self.thread.start()

    def _chunks(self) -> Iterator[bytes]:
        yield self.body[: self.half]
        self.release.wait(120)
        yield self.body[self.half :]

    def _send(self, cluster: Cluster, headers: dict[str, str]) -> None:
        try:
            self.response = httpx.post(
                f"{cluster.url}/v1/embeddings",
                content=self._chunks(),
                headers={**headers, "Content-Length": str(len(self.body))},
                timeout=120,
            )
        except Exception as exc:
            self.response = exc


def _gauge(cluster: Cluster, name: str, **labels: str) -> float:
    """The sum of gauge `name`'s samples with `labels` in /metrics."""
    text = httpx.get(f"{cluster.url}/metrics").text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def _in_progress(cluster: Cluster) -> float:
    return _gauge(cluster, "gateway_http_requests_in_progress", path="/v1/embeddings")


def test_a_dead_processs_live_gauges_leave_the_metrics(tmp_path):
    c = Cluster(tmp_path)
    try:
        # The runtime's cache holds a vector: its bytes are the runtime's live gauge.
        assert c.post(ADMIN, {"model": "wordllama", "input": "kept in the cache"}).status_code == 200
        assert _gauge(c, "gateway_cache_bytes") > 0
        runtime = _runtime_pid(c)
        assert runtime is not None
        os.kill(runtime, signal.SIGKILL)
        wait_until(lambda: _runtime_pid(c) not in (None, runtime), "a new runtime process", 60)
        wait_until(lambda: httpx.get(f"{c.url}/ready").status_code == 200, "ready again", 60)
        # The new runtime's cache is empty, and so is the sum.
        wait_until(lambda: _gauge(c, "gateway_cache_bytes") == 0, "the dead runtime's cache bytes gone", 30)
        # A request held at a front is in progress there; its worker dies with it.
        held = _Slow(c, 10)
        wait_until(lambda: _in_progress(c) == 1, "the request in progress", 60)
        fronts = {p for p in _descendants(c.proc.pid) if "spawn_main" in _cmdline(p) and _alive(p)}
        assert len(fronts) == 2, fronts
        for pid in fronts:
            os.kill(pid, signal.SIGKILL)
        held.release.set()
        held.thread.join(60)
        wait_until(lambda: httpx.get(f"{c.url}/ready").json().get("workers") == "2/2", "2/2 workers ready", 60)
        wait_until(lambda: _in_progress(c) == 0, "the dead worker's request gone from in progress", 30)
    finally:
        c.stop()


def _runtime_socket(runtime: int) -> str:
    environ = Path(f"/proc/{runtime}/environ").read_text().split("\0")
    return dict(item.split("=", 1) for item in environ if "=" in item)["GATEWAY_RUNTIME_SOCKET"]


def _listening(path: str) -> bool:
    """Whether the runtime process still takes new connections on its socket."""
    probe = socket.socket(socket.AF_UNIX)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


@pytest.mark.parametrize("everyone", [False, True], ids=["supervisor", "every-process"])
def test_sigterm_drains_the_requests_in_flight(tmp_path, everyone):
    c = Cluster(tmp_path)
    family = _descendants(c.proc.pid)
    # The runtime process and two front workers at least (multiprocessing adds its resource tracker).
    assert len(family) >= 3, family
    runtime = _runtime_pid(c)
    assert runtime is not None
    path = _runtime_socket(runtime)
    slow = [_Slow(c, 1000) for _ in range(4)]
    wait_until(lambda: _in_progress(c) == len(slow), "the requests in flight at the fronts", 60)
    # `kill <pid>` and docker signal the supervisor; systemd (KillMode=control-group) and Ctrl-C signal every
    # process at once, the runtime included.
    for pid in [c.proc.pid, *family] if everyone else [c.proc.pid]:
        os.kill(pid, signal.SIGTERM)
    # The fronts are shutting down (and so is the runtime, when signalled) before the requests go on.
    wait_until(lambda: c.log.read_text().count("Shutting down") >= 2, "both fronts shutting down", 60)
    if everyone:
        wait_until(lambda: not _listening(path), "the runtime's socket closed", 60)
    for request in slow:
        request.release.set()
    for request in slow:
        request.thread.join(120)
        assert isinstance(request.response, httpx.Response), request.response
        assert request.response.status_code == 200, request.response.text
        assert len(request.response.json()["data"]) == 1000
    assert c.proc.wait(120) == 0
    wait_until(lambda: not any(_alive(p) for p in family), f"no process of {family} left", 30)
