"""Rerank through HTTP on the fake reranker: both shapes, their answers and every error path, the task checks,
keys and limits, and pairs of concurrent requests scored in shared batches."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from litestar.testing import TestClient

from gateway.base.config import ConfigError, parse_config
from gateway.embedding.rerank import activate

from ..conftest import FakeReranker, fake_score, make_app, serve, wait_loaded, wait_until

TOML = """
[server]
max_documents_per_request = 5
max_input_chars = 200

[models.ranker]
backend = "fake-rerank"
path = "."
task = "rerank"
aliases = ["ranker-alias"]

[models.fake]
backend = "fake"
path = "."
"""
COHERE = ["/v1/rerank", "/v2/rerank", "/api/v3/inference/rerank"]
QUERY = "where do cats sleep"
DOCS = ["cats sleep on the sofa", "dogs bark", "where cats sleep all day long", "nothing here"]


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with serve(TOML) as c:
        yield c


def _sigmoid(x: float) -> float:
    return float(1 / (1 + np.exp(-x)))


@pytest.mark.parametrize("url", COHERE)
def test_cohere_shape_scores_sorted(client, url):
    r = client.post(url, json={"model": "ranker", "query": QUERY, "documents": DOCS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("rerank-") and body["model"] == "ranker"
    want = [_sigmoid(fake_score(QUERY, d)) for d in DOCS]
    order = sorted(range(len(DOCS)), key=lambda i: -want[i])
    assert [x["index"] for x in body["results"]] == order
    for x in body["results"]:
        assert abs(x["relevance_score"] - want[x["index"]]) < 1e-6
        assert "document" not in x
    # [CLS] query [SEP] document [SEP] per pair.
    tokens = sum(len(QUERY.split()) + len(d.split()) + 3 for d in DOCS)
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    assert body["meta"]["tokens"] == {"input_tokens": tokens}
    assert body["meta"]["billed_units"]["input_tokens"] == tokens


def test_cohere_top_n_documents_as_objects_and_returned(client):
    docs = [{"text": d} for d in DOCS[:2]] + DOCS[2:]
    r = client.post(
        "/v2/rerank",
        json={"model": "ranker-alias", "query": QUERY, "documents": docs, "top_n": 2, "return_documents": True},
    )
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 2
    assert [x["document"]["text"] for x in results] == [DOCS[x["index"]] for x in results]
    assert results[0]["relevance_score"] >= results[1]["relevance_score"]


def test_tei_shape_raw_scores_and_text(client):
    r = client.post("/rerank", json={"query": QUERY, "texts": DOCS, "raw_scores": True, "return_text": True})
    assert r.status_code == 200, r.text
    body = r.json()
    raw = [fake_score(QUERY, d) for d in DOCS]
    assert [x["index"] for x in body] == sorted(range(len(DOCS)), key=lambda i: -raw[i])
    for x in body:
        assert abs(x["score"] - raw[x["index"]]) < 1e-6 and x["text"] == DOCS[x["index"]]
    plain = client.post("/rerank", json={"query": QUERY, "texts": DOCS}).json()
    assert all(abs(x["score"] - _sigmoid(raw[x["index"]])) < 1e-6 and "text" not in x for x in plain)


def test_activation_matches_sigmoid_and_identity():
    raw = np.array([-3.0, 0.0, 2.5], dtype=np.float32)
    assert np.allclose(activate(raw, "sigmoid"), [_sigmoid(v) for v in raw])
    assert np.allclose(activate(raw, "identity"), raw)


LONG = " ".join(["word"] * 20)


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"model": "ranker", "query": "", "documents": ["a"]}, 400, "`query`"),
        ({"model": "ranker", "query": "q", "documents": []}, 400, "`documents`"),
        ({"model": "ranker", "query": "q", "documents": ["a", ""]}, 400, "`documents[1]`"),
        ({"model": "ranker", "query": "q", "documents": ["a"] * 6}, 400, "`documents` has 6 items; the limit is 5"),
        ({"model": "ranker", "query": "q", "documents": ["a", "b" * 201]}, 400, "`documents[1]` has 201 characters"),
        ({"model": "ranker", "query": "q", "documents": ["a", LONG]}, 400, "`documents[1]` has 24 tokens"),
        ({"model": "fake", "query": "q", "documents": ["a"]}, 400, 'is an embedding model (task "embed")'),
        ({"model": "nope", "query": "q", "documents": ["a"]}, 404, "model 'nope' not found"),
        ({"model": "ranker", "query": "q", "documents": ["a"], "extra": 1}, 400, "extra"),
        ({"model": "ranker", "query": "q", "documents": ["a"], "top_n": 0}, 400, "top_n"),
    ],
)
def test_cohere_errors(client, body, status, needle):
    r = client.post("/v1/rerank", json=body)
    assert r.status_code == status, r.text
    got = r.json()
    assert needle in got["message"], got
    assert got["error"]["message"] == got["message"]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"query": "q", "texts": []}, "`texts`"),
        ({"query": "q", "texts": ["a", LONG]}, "`texts[1]` has 24 tokens"),
        ({"query": "q", "texts": ["a"], "model": "fake"}, 'is an embedding model (task "embed")'),
        ({"query": "q", "texts": ["a"], "truncation_direction": "Left"}, "truncation_direction"),
    ],
)
def test_tei_errors(client, body, needle):
    r = client.post("/rerank", json=body)
    assert r.status_code == 400, r.text
    got = r.json()
    assert got["error_type"] == "Validation" and needle in got["error"], got


def test_truncate_cuts_pairs_and_counts_what_the_model_read(client):
    r = client.post("/v2/rerank", json={"model": "ranker", "query": "q", "documents": ["a", LONG], "truncate": True})
    assert r.status_code == 200, r.text
    # 5 tokens for ("q", "a"); the long pair is read up to the model's limit of 16.
    assert r.json()["usage"]["total_tokens"] == 5 + 16
    cohere = {"model": "ranker", "query": "q", "documents": [LONG], "max_tokens_per_doc": 4096}
    assert client.post("/v2/rerank", json=cohere).status_code == 200
    assert client.post("/rerank", json={"query": "q", "texts": [LONG], "truncate": True}).status_code == 200


def test_rerank_model_refused_on_embeddings(client):
    r = client.post("/v1/embeddings", json={"model": "ranker", "input": "hello"})
    assert r.status_code == 400
    assert 'is a rerank model (task "rerank")' in r.json()["error"]["message"]


def test_auth_and_key_access():
    keys = '\n[[auth.keys]]\nkey = "only-fake-key"\nmodels = ["fake"]\n'
    keys += '[[auth.keys]]\nkey = "ranker-key"\nmodels = ["ranker"]\nrequests_per_minute = 2\n'
    with TestClient(app=make_app(TOML + keys, keys="config")) as c:
        wait_loaded(c)
        body = {"model": "ranker", "query": "q", "documents": ["a"]}
        r = c.post("/v2/rerank", json=body)
        assert r.status_code == 401 and "message" in r.json()
        assert c.post("/rerank", json={"query": "q", "texts": ["a"]}).json()["error_type"] == "Unauthorized"
        r = c.post("/v2/rerank", json=body, headers={"Authorization": "Bearer only-fake-key"})
        assert r.status_code == 403 and "may not use model 'ranker'" in r.json()["message"]
        ok = {"Authorization": "Bearer ranker-key"}
        assert c.post("/v2/rerank", json=body, headers=ok).status_code == 200
        assert c.post("/rerank", json={"query": "q", "texts": ["a"]}, headers=ok).status_code == 200
        r = c.post("/rerank", json={"query": "q", "texts": ["a"]}, headers=ok)
        assert r.status_code == 429 and r.json()["error_type"] == "Overloaded", r.text


def test_backend_without_score_refused_at_load():
    with serve('[models.r]\nbackend = "fake"\npath = "."\ntask = "rerank"\n') as c:
        card = c.get("/v1/models").json()["data"][0]
        assert card["state"] == "failed"
        assert 'cannot serve a model with task = "rerank": it does not implement `score`' in card["error"]


def test_reranker_configured_as_embed_refused_at_load():
    with serve('[models.r]\nbackend = "fake-rerank"\npath = "."\ntask = "embed"\n') as c:
        card = c.get("/v1/models").json()["data"][0]
        assert card["state"] == "failed" and "loaded a model for task 'rerank'" in card["error"]


def test_config_refuses_embedding_keys_on_a_reranker():
    with pytest.raises(ConfigError, match=r"`\$.models.r.matryoshka_dimensions`: a model with task = \"rerank\""):
        parse_config('[models.r]\nbackend = "x"\ntask = "rerank"\nmatryoshka_dimensions = [2]\n')
    with pytest.raises(ConfigError, match=r"`\$.models.r.task`"):
        parse_config('[models.r]\nbackend = "x"\ntask = "classify"\n')


def test_concurrent_requests_share_batches():
    FakeReranker.batches, FakeReranker.gate = [], threading.Event()
    toml = '[models.ranker]\nbackend = "fake-rerank"\npath = "."\ntask = "rerank"\n'
    try:
        with serve(toml) as c:
            # One request holds the model; the three sent meanwhile queue behind it, then go in one batch.
            hold = {"query": "hold", "texts": ["x"]}
            first = threading.Thread(target=c.post, args=("/rerank",), kwargs={"json": hold})
            first.start()
            wait_until(lambda: FakeReranker.batches, "the first batch started")
            got: dict[int, Any] = {}

            def send(i: int) -> None:
                body = {"model": "ranker", "query": f"q{i}", "documents": [f"d{i} a", "b"]}
                got[i] = c.post("/v2/rerank", json=body)

            threads = [threading.Thread(target=send, args=(i,)) for i in range(3)]
            for t in threads:
                t.start()
            batcher = c.app.state.gateway.registry.find("ranker").batcher
            wait_until(lambda: batcher.queued == 6, "the three requests' pairs queued")
            FakeReranker.gate.set()
            for t in [first, *threads]:
                t.join()
    finally:
        FakeReranker.gate = None
    for i, r in got.items():
        assert r.status_code == 200, r.text
        want = {0: fake_score(f"q{i}", f"d{i} a"), 1: fake_score(f"q{i}", "b")}
        assert {x["index"]: x["relevance_score"] for x in r.json()["results"]} == pytest.approx(
            {k: _sigmoid(v) for k, v in want.items()}
        )
    # Seven pairs of four requests in two batches: the three waiting requests' pairs were merged.
    assert sorted(len(b) for b in FakeReranker.batches) == [1, 6], FakeReranker.batches
