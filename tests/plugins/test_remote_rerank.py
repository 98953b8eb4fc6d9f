"""The remote backend serving rerank models: a gateway in front of a gateway (tests/upstream.py) whose torch
reranker scores a tiny random-weight cross-encoder. Through the front, in each upstream shape (Cohere's, TEI's),
the order and the scores equal the upstream's own; an upstream that is down fails as for embeddings (502, then the
circuit's 503)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from ..conftest import serve
from ..parity.zoo import LIMIT
from ..upstream import UPSTREAM_KEY, Upstream, free_port

QUERY = "where is the capital of france"
DOCS = [
    "Paris is the capital of France.",
    "The quick brown fox jumps over the lazy dog.",
    "Berlin is in Germany.",
    "France borders Spain, Italy and Germany; its capital city is Paris.",
    "emoji 🙂 and résumé, naïve café",
    "a",
]
LONG = " ".join(["paris"] * (LIMIT + 10))
UP = {"Authorization": f"Bearer {UPSTREAM_KEY}"}


@pytest.fixture(scope="module")
def cross_folder(tiny_cross_encoder: Path) -> Path:
    return tiny_cross_encoder


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory, cross_folder: Path) -> Iterator[Upstream]:
    models = f"""
    [models.tiny-ce]
    backend = "torch"
    path = "{cross_folder}"
    task = "rerank"
    [models.tiny-ce.options]
    threads = 1
    """
    up = Upstream(tmp_path_factory.mktemp("upstream"), models=models).start(timeout=180)
    yield up
    up.stop()


@pytest.fixture(scope="module")
def front(upstream: Upstream, cross_folder: Path) -> Iterator[object]:
    v1 = f"{upstream.url}/v1"
    key = 'api_key_env = "REMOTE_TEST_KEY"'
    toml = f"""
    [models.ce]
    backend = "openai"
    task = "rerank"
    [models.ce.options]
    base_url = "{v1}"
    model = "tiny-ce"
    {key}

    [models.ce-tok]
    backend = "openai"
    task = "rerank"
    [models.ce-tok.options]
    base_url = "{v1}"
    model = "tiny-ce"
    tokenizer = "{cross_folder}"
    {key}

    [models.ce-tei]
    backend = "openai"
    task = "rerank"
    [models.ce-tei.options]
    base_url = "{upstream.url}"
    rerank_api = "tei"
    model = "tiny-ce"
    max_input_tokens = {LIMIT}
    {key}

    [models.ce-identity]
    backend = "openai"
    task = "rerank"
    [models.ce-identity.options]
    base_url = "{v1}"
    model = "tiny-ce"
    score_activation = "identity"
    {key}

    [models.not-a-reranker]
    backend = "openai"
    task = "rerank"
    [models.not-a-reranker.options]
    base_url = "{v1}"
    model = "minilm-int8"
    {key}

    [models.ce-dead]
    backend = "openai"
    task = "rerank"
    circuit = {{failures = 2, open_s = 60}}
    [models.ce-dead.options]
    base_url = "http://127.0.0.1:{free_port()}/v1"
    max_input_tokens = {LIMIT}
    score_activation = "sigmoid"
    """
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REMOTE_TEST_KEY", UPSTREAM_KEY)
        with serve(toml, plugins=()) as client:
            yield client


def _direct(upstream: Upstream, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{upstream.url}{path}", json={"model": "tiny-ce", **body}, headers=UP, timeout=60)


def _by_index(results: list[dict], field: str) -> dict[int, float]:
    return {x["index"]: x[field] for x in results}


@pytest.mark.parametrize("model", ["ce", "ce-tok", "ce-tei"])
def test_scores_and_order_equal_the_upstreams(front, upstream, model):
    body = {"query": QUERY, "documents": DOCS}
    want = _direct(upstream, "/v2/rerank", body).json()
    r = front.post("/v2/rerank", json={"model": model, **body})
    assert r.status_code == 200, r.text
    got = r.json()
    assert [x["index"] for x in got["results"]] == [x["index"] for x in want["results"]]
    a, b = _by_index(got["results"], "relevance_score"), _by_index(want["results"], "relevance_score")
    assert max(abs(a[i] - b[i]) for i in range(len(DOCS))) <= 1e-6
    # The scores spread (a wide initializer): the order is a real check.
    assert max(b.values()) - min(b.values()) > 0.02
    # Tokens: the local tokenizer's count, or the upstream's usage (Cohere's shape reports it), equal its own;
    # TEI's shape reports none, so the front charges its estimate.
    if model != "ce-tei":
        assert got["usage"] == want["usage"]
    # TEI's raw scores through the front are the upstream's logits (recovered from relevance in Cohere's shape).
    raw = front.post("/rerank", json={"model": model, "query": QUERY, "texts": DOCS, "raw_scores": True})
    assert raw.status_code == 200, raw.text
    logits = _by_index(
        _direct(upstream, "/rerank", {"query": QUERY, "texts": DOCS, "raw_scores": True}).json(), "score"
    )
    mine = _by_index(raw.json(), "score")
    assert max(abs(mine[i] - logits[i]) for i in range(len(DOCS))) <= 1e-5


def test_identity_passes_the_upstreams_relevance_on_as_is(front, upstream):
    want = _by_index(
        _direct(upstream, "/v2/rerank", {"query": QUERY, "documents": DOCS}).json()["results"], "relevance_score"
    )
    r = front.post("/rerank", json={"model": "ce-identity", "query": QUERY, "texts": DOCS, "raw_scores": True})
    assert r.status_code == 200, r.text
    got = _by_index(r.json(), "score")
    # As is, to float32 (what `score` returns, as every backend's scores).
    assert max(abs(got[i] - want[i]) for i in range(len(DOCS))) <= 1e-6
    cards = {m["id"]: m for m in front.get("/v1/models").json()["data"]}
    assert cards["ce-identity"]["score_activation"] == "identity"
    assert cards["ce"]["score_activation"] == "sigmoid"  # read from the upstream's own card


def test_one_batch_of_several_queries_is_scored_per_query(front, upstream):
    """The core's batches merge pairs of requests with different queries; a rerank API takes one query a call."""
    backend = front.app.state.gateway.registry.resolve("ce-tok").backend
    other = "berlin germany"
    pairs = [(QUERY, DOCS[0]), (other, DOCS[2]), (QUERY, DOCS[3]), (other, DOCS[0])]
    ids = backend.tokenize_pairs(pairs)
    got = backend.score(pairs, ids)
    for query in (QUERY, other):
        docs = [d for q, d in pairs if q == query]
        raw = _direct(upstream, "/rerank", {"query": query, "texts": docs, "raw_scores": True}).json()
        want = _by_index(raw, "score")
        mine = [float(s) for (q, _), s in zip(pairs, got, strict=True) if q == query]
        assert np.allclose(mine, [want[i] for i in range(len(docs))], atol=1e-5)


def test_a_pair_over_the_limit_is_cut_upstream_only_when_counted_here(front, upstream):
    body = {"query": QUERY, "documents": ["short", LONG], "truncate": True}
    want = _direct(upstream, "/v2/rerank", body).json()
    r = front.post("/v2/rerank", json={"model": "ce-tok", **body})
    assert r.status_code == 200, r.text
    assert _by_index(r.json()["results"], "relevance_score") == pytest.approx(
        _by_index(want["results"], "relevance_score"), abs=1e-6
    )
    assert r.json()["usage"] == want["usage"]
    # Refused before sending without truncation, with the model's own words.
    r = front.post("/v2/rerank", json={"model": "ce-tok", "query": QUERY, "documents": ["short", LONG]})
    assert r.status_code == 400 and f"accepts at most {LIMIT} tokens" in r.json()["message"], r.text
    # Without a local tokenizer the front cannot cut: refused, and the upstream's own limit error is a 400.
    r = front.post("/v2/rerank", json={"model": "ce", **body})
    assert r.status_code == 400 and r.json()["error"]["code"] == "truncation_not_supported", r.text
    r = front.post("/v2/rerank", json={"model": "ce", "query": QUERY, "documents": ["short", LONG]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "input_rejected", r.text


def test_an_upstream_model_that_is_not_a_reranker_fails_at_load(front):
    cards = {m["id"]: m for m in front.get("/v1/models").json()["data"]}
    assert cards["not-a-reranker"]["state"] == "failed"
    error = cards["not-a-reranker"]["error"]
    assert "the upstream's model 'minilm-int8' is not a reranker (the upstream lists it with task 'embed')" in error
    assert front.post("/v2/rerank", json={"model": "ce", "query": QUERY, "documents": DOCS}).status_code == 200


def test_upstream_down_502_then_the_circuit_opens_503(front):
    body = {"model": "ce-dead", "query": QUERY, "documents": DOCS}
    for _ in range(2):
        r = front.post("/v2/rerank", json=body)
        assert r.status_code == 502, r.text
        assert r.json()["error"]["code"] == "backend_unavailable"
        assert "is unreachable (ConnectError)" in r.json()["message"]
    r = front.post("/rerank", json={"model": "ce-dead", "query": QUERY, "texts": DOCS})
    assert r.status_code == 503, r.text
    assert "model 'ce-dead' is failing and is not being sent requests for now" in r.json()["error"]
    assert 50 <= int(r.headers["retry-after"]) <= 60


def test_logits_from_sigmoid_relevance_and_bad_answers():
    """The inversion behind a Cohere-shaped upstream's scores, at its edges; answers that are not one score per
    document, or not a sigmoid's output, are refused (the backend turns that into a 502)."""
    from gateway_remote import rerank

    x = np.array([-30.0, -3.5, 0.0, 0.25, 12.0], dtype=np.float32).astype(np.float64)
    p = 1 / (1 + np.exp(-x))
    assert np.allclose(rerank.logits(p), x, atol=1e-6)
    edge = rerank.logits(np.array([0.0, 1.0]))
    assert np.isfinite(edge).all() and edge[0] < -700 and edge[1] > 36
    ok = (
        b'{"results": [{"index": 1, "relevance_score": 0.2}, {"index": 0, "relevance_score": 0.5}], '
        b'"usage": {"total_tokens": 9}}'
    )
    scores, reported = rerank.reply("cohere", ok, 2, "sigmoid")
    assert np.allclose(scores, [0.0, np.log(0.2 / 0.8)]) and 9 in reported
    with pytest.raises(ValueError, match="no sigmoid gives"):
        rerank.reply("cohere", ok.replace(b"0.2", b"1.5"), 2, "sigmoid")
    assert rerank.reply("cohere", ok.replace(b"0.2", b"1.5"), 2, "identity")[0][1] == 1.5
    with pytest.raises(ValueError, match=r"indices not 0\.\.2"):
        rerank.reply("tei", b'[{"index": 0, "score": 1.0}, {"index": 0, "score": 2.0}]', 3, "sigmoid")
