"""Models on Ray Serve replicas ([models.X.ray]), end to end through HTTP on a small local Ray started by the
gateway itself: the same vectors and token counts as in-process, a replica killed mid-batch costs no request,
Ray missing or unreachable fails only the model that asks for it, and nothing of Ray outlives the gateway."""

from __future__ import annotations

import io
import itertools
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from ..conftest import API_KEY, AUTH, SENTENCES, cosine, fake_vector, make_app, serve, uvicorn_server, wait_until

MODELS = Path(__file__).resolve().parents[2] / "models"
INT8 = MODELS / "minilm-onnx-int8"
GGUF = MODELS / "minilm-f16.gguf"

pytestmark = pytest.mark.skipif(not INT8.is_dir() or not GGUF.is_file(), reason="needs `make models`")


def ray_processes(tmp: str) -> list[str]:
    """Live processes started for the Ray whose temp dir is `tmp` (they inherit RAY_TMPDIR; zombies are gone)."""
    found = []
    mark = f"RAY_TMPDIR={tmp}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            name = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        if mark in environ and state != "Z":
            found.append(f"{proc.name} {name}")
    return found


@pytest.fixture(scope="module")
def ray_tmp() -> Iterator[str]:
    """A Ray temp dir of this module's own (short: Ray's socket paths must fit in 107 bytes)."""
    tmp = tempfile.mkdtemp(prefix="gw-ray-", dir="/tmp")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_TMPDIR", tmp)
        yield tmp
    shutil.rmtree(tmp, ignore_errors=True)


def test_missing_ray_fails_only_the_model_that_asks_for_it(monkeypatch, ray_tmp):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the `ray` extra were not installed
    toml = f"""
    [models.fake]
    backend = "fake"
    path = "."

    [models.int8-ray]
    backend = "onnx"
    path = "{INT8}"
    [models.int8-ray.ray]
    replicas = 1
    """
    with serve(toml) as client:
        r = client.post("/v1/embeddings", json={"model": "int8-ray", "input": "hello"})
        assert r.status_code == 503
        message = r.json()["error"]["message"]
        assert "model 'int8-ray' is not available" in message
        assert "pip install 'embedding-gateway[ray]'" in message
        assert client.post("/v1/embeddings", json={"model": "fake", "input": "hello"}).status_code == 200
        assert client.get("/ready").json()["models"] == {"fake": "ready", "int8-ray": "failed"}
    assert not ray_processes(ray_tmp)


def test_unreachable_cluster_fails_only_that_model(ray_tmp):
    toml = f"""
    [models.fake]
    backend = "fake"
    path = "."

    [models.int8-ray]
    backend = "onnx"
    path = "{INT8}"
    [models.int8-ray.ray]
    address = "127.0.0.1:1"
    """
    with serve(toml) as client:
        r = client.post("/v1/embeddings", json={"model": "int8-ray", "input": "hello"})
        assert r.status_code == 503
        assert "cannot reach Ray at '127.0.0.1:1'" in r.json()["error"]["message"]
        assert client.post("/v1/embeddings", json={"model": "fake", "input": "hello"}).status_code == 200
    assert not ray_processes(ray_tmp)


#: Each architecture of the zoo (tests/zoo.py) on Ray, on the cheapest backend that runs it (one replica each).
ZOO_ON_RAY = {
    "bert-cls": "gguf",
    "xlm-roberta": "gguf",
    "qwen3": "gguf",
    "mpnet": "onnx",
    "modernbert": "gguf",
    "gemma3": "gguf",
}


@pytest.fixture(scope="module")
def ray_gateway(
    ray_tmp, minilm_path, tmp_path_factory, zoo_converted, tiny_cross_encoder
) -> Iterator[tuple[str, Any, Path]]:
    """One gateway serving every bundled backend twice, in-process and on Ray (int8 on 2 replicas x 1 CPU), a
    slow fake model on 2 replicas, each zoo architecture on Ray, and the tiny torch reranker twice; the gateway
    starts its own Ray and must leave nothing behind."""
    started = tmp_path_factory.mktemp("started")
    # name: backend, path, [options], [ray]; jit off: the trace takes seconds to check at load, same vectors.
    pairs = {
        "torch": ("torch", minilm_path, "jit = false", "num_cpus = 0"),
        "int8": ("onnx", INT8, "", "replicas = 2\nnum_cpus = 1"),
        "gguf": ("gguf", GGUF, "", "num_cpus = 0"),
        "wordllama": ("wordllama", "pkg:wordllama", "", "num_cpus = 0"),
        "ce": ("torch", tiny_cross_encoder, "threads = 1", "num_cpus = 0"),
    }
    parts = []
    for name, (backend, path, options, ray) in pairs.items():
        extra = "matryoshka_dimensions = [64, 128, 256]\n" if backend == "wordllama" else ""
        for model in (name, f"{name}-ray"):
            parts.append(f'[models.{model}]\nbackend = "{backend}"\npath = "{path}"\n{extra}')
            parts.append(f"[models.{model}.options]\n{options}\n")
        parts.append(f"[models.{name}-ray.ray]\n{ray}\n")
    parts.append(
        f'[models.fake-ray]\nbackend = "fake"\npath = "."\n[models.fake-ray.options]\ndelay_s = 0.5\n'
        f'started_dir = "{started}"\nreject_on = "REJECT"\n[models.fake-ray.ray]\nreplicas = 2\nnum_cpus = 0\n'
    )
    for family, backend in ZOO_ON_RAY.items():
        options = {"torch": "threads = 1\njit = false", "onnx": "intra_op_threads = 1", "gguf": "n_threads = 1"}
        parts.append(
            f'[models.zoo-{family}]\nbackend = "{backend}"\npath = "{zoo_converted[backend][family]}"\n'
            f"[models.zoo-{family}.options]\n{options[backend]}\n[models.zoo-{family}.ray]\nnum_cpus = 0\n"
        )
    parts.append(f'[batches]\ndata_dir = "{tmp_path_factory.mktemp("batches")}"\n')
    app = make_app("\n".join(parts))
    with uvicorn_server(app) as (url, _server):
        yield url, app, started
    import ray

    assert not ray.is_initialized()
    assert not ray_processes(ray_tmp)


def _embed(url: str, model: str, texts: Any, **extra: Any) -> httpx.Response:
    return httpx.post(f"{url}/v1/embeddings", json={"model": model, "input": texts, **extra}, headers=AUTH, timeout=120)


@pytest.mark.parametrize("name", ["torch", "int8", "gguf", "wordllama"])
def test_same_vectors_and_tokens_as_in_process(ray_gateway, name):
    url, app, _ = ray_gateway
    texts = SENTENCES[:8]
    here, there = _embed(url, name, texts).json(), _embed(url, f"{name}-ray", texts).json()
    assert there["usage"] == here["usage"]
    for a, b in zip(here["data"], there["data"], strict=True):
        assert cosine(a["embedding"], b["embedding"]) >= 0.99999
    # Tokens are counted in front, by the backend's tokenizer loaded without its weights.
    backend = app.state.gateway.registry.resolve(f"{name}-ray").backend
    assert backend._local_tokenizer
    # Limits are checked in front too, with the in-process model's message.
    too_long = " ".join(["word"] * 9000)
    a, b = _embed(url, name, too_long), _embed(url, f"{name}-ray", too_long)
    assert (a.status_code, a.json()["error"]["message"].replace(f"'{name}'", "M")) == (
        b.status_code,
        b.json()["error"]["message"].replace(f"'{name}-ray'", "M"),
    )
    assert b.status_code == 400


def test_a_batch_api_job_on_ray_replicas_equals_the_embeddings_route(ray_gateway):
    # A job's lines are batched in front and computed by the replicas, as requests are.
    url, _, _ = ray_gateway
    bodies = [{"model": m, "input": s} for m in ("int8-ray", "gguf-ray") for s in SENTENCES[:4]]
    lines = [{"custom_id": f"j{i}", "method": "POST", "url": "/v1/embeddings", "body": b} for i, b in enumerate(bodies)]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0)
    jsonl = "".join(json.dumps(x) + "\n" for x in lines).encode()
    uploaded = client.files.create(file=("in.jsonl", io.BytesIO(jsonl)), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
    wait_until(lambda: client.batches.retrieve(batch.id).status == "completed", "the job on Ray", timeout=120)
    out = client.files.content(client.batches.retrieve(batch.id).output_file_id).content.splitlines()
    got = {x["custom_id"]: x["response"]["body"] for x in map(json.loads, out)}
    assert len(got) == len(bodies)
    for i, body in enumerate(bodies):
        want = _embed(url, body["model"], body["input"]).json()
        assert got[f"j{i}"]["usage"] == want["usage"]
        # int8 vectors move with their batch-mates (dynamic quantization's per-batch scale).
        assert cosine(got[f"j{i}"]["data"][0]["embedding"], want["data"][0]["embedding"]) >= 0.999


def test_rerank_on_ray_equals_in_process(ray_gateway):
    """A reranker's pairs go to its replica (tokens and scores there): the same order, scores and tokens as the
    same model in-process, relevance (Cohere's shape) and logits (TEI's) alike."""
    from .test_torch_rerank import DOCS, QUERY

    url, _, _ = ray_gateway
    body = {"query": QUERY, "documents": DOCS}
    here = httpx.post(f"{url}/v2/rerank", json={"model": "ce", **body}, headers=AUTH, timeout=120).json()
    r = httpx.post(f"{url}/v2/rerank", json={"model": "ce-ray", **body}, headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text
    there = r.json()
    assert [x["index"] for x in there["results"]] == [x["index"] for x in here["results"]]
    for a, b in zip(here["results"], there["results"], strict=True):
        assert abs(a["relevance_score"] - b["relevance_score"]) <= 1e-6
    assert there["usage"] == here["usage"]
    tei = {"query": QUERY, "texts": DOCS, "raw_scores": True}
    logits = [
        {x["index"]: x["score"] for x in httpx.post(f"{url}/rerank", json={"model": m, **tei}, headers=AUTH).json()}
        for m in ("ce", "ce-ray")
    ]
    assert max(abs(logits[0][i] - logits[1][i]) for i in range(len(DOCS))) <= 1e-5


@pytest.mark.parametrize("family", list(ZOO_ON_RAY))
def test_each_architecture_on_ray_as_sentence_transformers(ray_gateway, zoo_folders, family):
    """The zoo's architectures placed on Ray replicas: the vectors and token counts of sentence-transformers'
    own encode of the folder (one query-prompted request, lengths to past the limit, truncated)."""
    from sentence_transformers import SentenceTransformer

    from ..parity.zoo import FAMILIES, position_texts

    url, _, _ = ray_gateway
    texts = [*SENTENCES[:4], *position_texts()]
    prompt_name = FAMILIES[family].query_prompt
    body = {"truncate": True, **({"prompt_name": prompt_name} if prompt_name else {})}
    r = _embed(url, f"zoo-{family}", texts, **body)
    assert r.status_code == 200, r.text
    st = SentenceTransformer(str(zoo_folders[family]), device="cpu")
    want = st.encode(texts, prompt_name=prompt_name, show_progress_bar=False)
    floor = 0.999 if ZOO_ON_RAY[family] == "gguf" else 0.9999
    assert min(cosine(d["embedding"], w) for d, w in zip(r.json()["data"], want, strict=True)) >= floor
    prompt = st.prompts.get(prompt_name or "", "")
    ids = st.tokenizer([prompt + t for t in texts])["input_ids"]
    assert r.json()["usage"]["total_tokens"] == sum(min(len(i), st.max_seq_length) for i in ids)


def test_dimensions_on_ray(ray_gateway):
    url, _, _ = ray_gateway
    here = _embed(url, "wordllama", SENTENCES[:3], dimensions=64).json()
    there = _embed(url, "wordllama-ray", SENTENCES[:3], dimensions=64).json()
    for a, b in zip(here["data"], there["data"], strict=True):
        assert len(b["embedding"]) == 64
        assert cosine(a["embedding"], b["embedding"]) >= 0.99999


def test_ready_and_metrics_show_replicas(ray_gateway):
    url, _, _ = ray_gateway
    body = httpx.get(f"{url}/ready", headers=AUTH).json()
    assert body["replicas"]["int8-ray"] == "2/2"
    assert body["replicas"]["gguf-ray"] == "1/1"
    assert "int8" not in body["replicas"]  # in-process: no replicas
    metrics = httpx.get(f"{url}/metrics").text
    assert 'gateway_replicas_ready{model="int8-ray"} 2.0' in metrics
    assert 'gateway_replicas{model="int8-ray"} 2.0' in metrics


def test_one_status_call_a_period_for_all_models_on_ray(ray_gateway, monkeypatch):
    """Replica counts of every model on Ray come from one serve.status() a second, not one per model: each costs
    the front about 8 ms of CPU (bench/README.md, "Ray: the front's CPU per batch")."""
    from gateway_ray.front import _STATUS_EVERY_S
    from ray import serve

    url, _, _ = ray_gateway
    on_ray = list(httpx.get(f"{url}/ready", headers=AUTH).json()["replicas"])
    assert len(on_ray) >= 10

    def running() -> bool:
        counts = httpx.get(f"{url}/ready", headers=AUTH).json()["replicas"].values()
        return all(int(count.split("/")[0]) > 0 for count in counts)

    # The poller looks every 0.1 s until each model's replicas first run (its counts are what /ready shows), then
    # once a period: counted from then on.
    wait_until(running, "every model's replicas running", 120)
    calls: list[float] = []
    real = serve.status

    def counted() -> Any:
        calls.append(time.monotonic())
        return real()

    monkeypatch.setattr(serve, "status", counted)
    try:
        wait_until(lambda: len(calls) >= 3, "three serve.status() calls", 60)
    finally:
        monkeypatch.setattr(serve, "status", real)
    # One call a period for all of them: a call per model would come len(on_ray) times a period, most gaps near
    # 0. A loaded machine only makes the gaps longer.
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    assert min(gaps) >= 0.9 * _STATUS_EVERY_S, f"gaps {gaps} between serve.status() calls, {len(on_ray)} models"
    assert [t.name for t in threading.enumerate()].count("ray-status") == 1


def _stopped(pid: int) -> bool:
    """Whether process `pid` is stopped (by SIGSTOP)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
    except OSError:
        return False


def _kill_mid_batch(
    url: str, started: Path, texts: list[str], result: dict[str, httpx.Response]
) -> tuple[int, list[str]]:
    """Sends `texts` to fake-ray and SIGKILLs the replica computing them while it certainly still is: its pid and
    the texts sent.

    The fake sleeps its delay_s (0.5 s) after touching its file: a replica stopped (SIGSTOP) less than that after
    the file's time is still inside the batch, and dies there. A test paused past that (a loaded machine) lets the
    replica go on, waits for the answer and tries again (other texts: the cache holds the answered ones), rather
    than killing a replica that may be done."""
    for attempt in range(5):
        sent = texts if attempt == 0 else [f"{t} ({attempt})" for t in texts]
        for f in started.iterdir():
            f.unlink()
        result.clear()
        thread = threading.Thread(target=lambda sent=sent: result.setdefault("r", _embed(url, "fake-ray", sent)))
        thread.start()
        wait_until(lambda: any(started.iterdir()), "the batch started", 60)
        mark = next(started.iterdir())
        victim = int(mark.name)
        os.kill(victim, signal.SIGSTOP)
        wait_until(lambda pid=victim: _stopped(pid), "the replica stopped", 60)
        # The file's time is the kernel's coarse clock, at or before the touch: this errs on the safe side.
        if time.time() - mark.stat().st_mtime < 0.4:
            os.kill(victim, signal.SIGKILL)
            thread.join(60)
            return victim, sent
        os.kill(victim, signal.SIGCONT)
        thread.join(60)
    pytest.fail("five tries stopped the replica only after its batch's 0.5 s")


def test_replica_killed_mid_batch_costs_no_request(ray_gateway, caplog):
    url, _, started = ray_gateway
    result: dict[str, httpx.Response] = {}
    victim, texts = _kill_mid_batch(url, started, ["killed mid batch", "still answered"], result)
    r = result["r"]
    assert r.status_code == 200, r.text
    for item, text in zip(r.json()["data"], texts, strict=True):
        np.testing.assert_allclose(item["embedding"], fake_vector(text), atol=1e-6)
    assert any("a replica was lost during embed" in rec.getMessage() for rec in caplog.records)
    # The batch ran again on a replica that is not the dead one, and Ray Serve restarts the dead one.
    assert {int(f.name) for f in started.iterdir()} - {victim}
    deadline = time.monotonic() + 60
    while httpx.get(f"{url}/ready", headers=AUTH).json()["replicas"]["fake-ray"] != "2/2":
        assert time.monotonic() < deadline, "the killed replica did not come back"
        time.sleep(0.2)


def test_a_typed_failure_in_a_replica_reaches_the_client_as_in_process(ray_gateway, caplog):
    """InputRejected raised by the backend in its replica: 400 with its own message (no remote traceback), only
    for the request that holds the input, and no retry (the replica is fine)."""
    url, _, _ = ray_gateway
    results: dict[str, httpx.Response] = {}
    texts = {"bad": ["fine", "please REJECT me"], "good": ["also fine"]}
    threads = [
        threading.Thread(target=lambda k=k: results.setdefault(k, _embed(url, "fake-ray", texts[k]))) for k in texts
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results["bad"].status_code == 400
    assert results["bad"].json()["error"]["message"] == "fake rejects inputs with 'REJECT'"
    assert results["good"].status_code == 200
    assert not any("a replica was lost" in rec.getMessage() for rec in caplog.records)


def test_replicas_that_cannot_be_placed_fail_only_that_model(ray_gateway):
    """A model asking for more CPUs than the Ray has: failed with Ray Serve's reason, its replicas removed; the
    gateway's other models (and the Ray they share) serve on."""
    url, _, _ = ray_gateway
    toml = f"""
    [models.too-big]
    backend = "onnx"
    path = "{INT8}"
    [models.too-big.ray]
    num_cpus = 64
    start_timeout_s = 2
    """
    with serve(toml, plugins=()) as client:
        r = client.post("/v1/embeddings", json={"model": "too-big", "input": "hello"})
        assert r.status_code == 503
        assert "the replicas were not running after 2s" in r.json()["error"]["message"]
    assert _embed(url, "int8-ray", ["still here"]).status_code == 200


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("replicas = 2\nmax_replicas = 3", "set `replicas`, or `min_replicas` and `max_replicas` for autoscaling"),
        ("min_replicas = 1", "`min_replicas` needs `max_replicas` - at `$.models.m.ray`"),
        ("replica = 2", "unknown field `replica` - at `$.models.m.ray`"),
        ("num_cpus = -1", "Expected `float` >= 0.0 - at `$.models.m.ray.num_cpus`"),
    ],
)
def test_ray_table_is_checked_with_its_key_path(table, message):
    from gateway.base.config import ConfigError, parse_config
    from gateway.runtime.plugins import load_plugins
    from gateway.runtime.registry import build_specs

    plugins = load_plugins()
    config = parse_config(f'[models.m]\nbackend = "onnx"\npath = "."\n[models.m.ray]\n{table}\n')
    with pytest.raises(ConfigError) as info:
        build_specs(config, plugins.backends(), "x.toml", placements=plugins.placements())
    assert str(info.value).startswith("x.toml: ")
    assert message in str(info.value)


# -- the front's failures, on a fake handle (no Ray needed) ---------------------------------------------------


class _Lost(Exception):
    """Stands for RayActorError: the replica running the call died."""


class _NeverRaised(Exception):
    pass


class _Handle:
    """A Serve handle whose every call ends in `error`; records the batch sizes sent and the cancellations."""

    def __init__(self, error: BaseException) -> None:
        self.error = error
        self.calls: list[int] = []
        self.cancelled = 0

    @property
    def embed(self) -> Any:
        handle = self

        class _Response:
            def __init__(self, texts: list[str]) -> None:
                handle.calls.append(len(texts))

            def result(self, timeout_s: float) -> Any:
                raise handle.error

            def cancel(self) -> None:
                handle.cancelled += 1

        class _Method:
            def remote(self, texts: list[str], ids: list[list[int]]) -> _Response:
                return _Response(texts)

        return _Method()


@pytest.mark.parametrize(
    ("error", "calls", "cancelled", "kind", "message"),
    [
        (TimeoutError(), [4], 1, "BackendTimeout", "model 'm': its replica did not answer within 0.5s"),
        (_Lost("actor died"), [4, 4], 0, "BackendUnavailable", "model 'm': its replicas were lost twice"),
    ],
)
def test_a_ray_batch_that_times_out_or_keeps_losing_replicas_opens_the_circuit(error, calls, cancelled, kind, message):
    """The real RayBackend and Batcher on a fake handle: a timeout (cancelled) or a replica lost on the retry too
    is a typed failure of the whole batch, sent no more (not re-run per request), and counted by the circuit so
    that the model's fallbacks take over."""
    import asyncio

    from gateway_ray import RayOptions
    from gateway_ray.front import RayBackend

    from gateway.base.circuit import CircuitBreaker, CircuitState
    from gateway.plugin import ModelInfo
    from gateway.runtime.batching import Batcher

    from ..conftest import FakeBackend, FakeOptions

    backend = RayBackend(
        FakeBackend,
        model="m",
        path=".",
        options=FakeOptions(),
        trust_remote_code=False,
        ray=RayOptions(batch_timeout_s=0.5),
    )
    handle = _Handle(error)
    backend._handle, backend._lost, backend._failed = handle, (_Lost,), _NeverRaised
    circuit = CircuitBreaker("m", failures=1, open_s=60)
    info = ModelInfo(dimension=8, max_input_tokens=16, normalized=True, max_batch_size=4)
    batcher = Batcher(backend, info, model="m", circuit=circuit, max_wait_ms=200)

    async def main() -> list[Any]:
        calls = [batcher.embed([f"text {i}"], [[101, 4, 102]]) for i in range(4)]
        return await asyncio.gather(*calls, return_exceptions=True)

    try:
        answers = asyncio.run(main())
    finally:
        batcher.close()
    status = 504 if kind == "BackendTimeout" else 502
    full = message if kind == "BackendTimeout" else message + " running this batch"
    assert [(type(a).__name__, getattr(a, "status", None), str(a)) for a in answers] == [(kind, status, full)] * 4
    assert handle.calls == calls and handle.cancelled == cancelled
    assert circuit.state == CircuitState.OPEN
