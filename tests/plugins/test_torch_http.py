"""The real all-MiniLM-L6-v2 on torch, end to end through HTTP."""

from __future__ import annotations

import time

import numpy as np
import pytest

from ..conftest import SENTENCES, cosine

URLS = ["/api/v3/inference/embeddings", "/v1/embeddings"]


@pytest.mark.parametrize("url", URLS)
def test_single_string_shape(torch_client, st_model, url):
    before = int(time.time())
    r = torch_client.post(url, json={"model": "minilm", "input": "hello world"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "embedding"
    assert body["id"].startswith("embed-")
    assert body["model"] == "minilm"
    assert isinstance(body["created"], float) and before - 1 <= body["created"] <= time.time() + 1
    assert len(body["data"]) == 1
    item = body["data"][0]
    assert item["object"] == "embedding" and item["index"] == 0
    assert len(item["embedding"]) == 384
    # [CLS] hello world [SEP]
    assert body["usage"] == {"prompt_tokens": 4, "total_tokens": 4}


def test_list_matches_sentence_transformers(torch_client, st_model):
    r = torch_client.post("/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": SENTENCES})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "all-MiniLM-L6-v2"
    assert [d["index"] for d in body["data"]] == list(range(len(SENTENCES)))
    expected = st_model.encode(SENTENCES)
    for got, want in zip(body["data"], expected, strict=True):
        assert cosine(got["embedding"], want) > 0.9999
    counts = [len(ids) for ids in st_model.tokenizer(SENTENCES)["input_ids"]]
    assert body["usage"]["total_tokens"] == sum(counts)


def test_each_text_alone_equals_in_a_list(torch_client):
    together = torch_client.post("/v1/embeddings", json={"model": "minilm", "input": SENTENCES[:4]}).json()
    for i, text in enumerate(SENTENCES[:4]):
        alone = torch_client.post("/v1/embeddings", json={"model": "minilm", "input": text}).json()
        assert cosine(alone["data"][0]["embedding"], together["data"][i]["embedding"]) > 0.9999


def test_matryoshka_dimensions(torch_client):
    full = torch_client.post("/v1/embeddings", json={"model": "minilm-mrl", "input": "a cut vector"}).json()
    r = torch_client.post("/v1/embeddings", json={"model": "minilm-mrl", "input": "a cut vector", "dimensions": 128})
    assert r.status_code == 200, r.text
    cut = np.array(r.json()["data"][0]["embedding"])
    assert cut.shape == (128,)
    assert abs(np.linalg.norm(cut) - 1) < 1e-5
    prefix = np.array(full["data"][0]["embedding"][:128])
    assert cosine(cut, prefix) > 0.99999


@pytest.mark.parametrize(
    ("body", "param", "needle"),
    [
        ({"model": "minilm", "input": "x", "dimensions": 128}, "dimensions", "not configured as Matryoshka"),
        ({"model": "minilm-mrl", "input": "x", "dimensions": 0}, "dimensions", "positive integer"),
        ({"model": "minilm-mrl", "input": "x", "dimensions": -3}, "dimensions", "positive integer"),
        (
            {"model": "minilm-mrl", "input": "x", "dimensions": 512},
            "dimensions",
            "larger than the model's dimension 384",
        ),
        ({"model": "minilm-mrl", "input": "x", "dimensions": 100}, "dimensions", "allowed: [64, 128, 256, 384]"),
        ({"model": "minilm-mrl", "input": "x", "dimensions": 1.5}, "dimensions", "Expected `int | null`"),
    ],
)
def test_dimensions_errors(torch_client, body, param, needle):
    r = torch_client.post("/v1/embeddings", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    assert needle in err["message"]


def test_input_over_the_models_limit(torch_client):
    text = "word " * 300
    r = torch_client.post("/v1/embeddings", json={"model": "minilm", "input": ["ok", text]})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "input[1]" and err["code"] == "input_too_long"
    assert "302 tokens" in err["message"] and "at most 256" in err["message"]


def test_configured_limit_lower_than_the_models(torch_client):
    r = torch_client.post("/v1/embeddings", json={"model": "minilm-mrl", "input": "word " * 200})
    assert r.status_code == 400
    assert "202 tokens" in r.json()["error"]["message"] and "at most 128" in r.json()["error"]["message"]


def test_input_at_the_limit_is_accepted(torch_client):
    r = torch_client.post("/v1/embeddings", json={"model": "minilm", "input": "word " * 254})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["total_tokens"] == 256


def test_concurrent_requests_equal_single_requests(torch_client):
    """Requests merged into shared batches get exactly the answers they get alone."""
    from concurrent.futures import ThreadPoolExecutor

    texts = [f"{s} #{i}" for i, s in enumerate(SENTENCES * 3)]
    alone = {
        t: torch_client.post("/v1/embeddings", json={"model": "minilm", "input": t}).json()["data"][0]["embedding"]
        for t in texts
    }

    def call(i: int):
        group = texts[i : i + 1 + i % 3]
        r = torch_client.post("/v1/embeddings", json={"model": "minilm", "input": group})
        assert r.status_code == 200, r.text
        return group, r.json()

    with ThreadPoolExecutor(16) as pool:
        for group, body in pool.map(call, range(len(texts))):
            assert [d["index"] for d in body["data"]] == list(range(len(group)))
            for t, d in zip(group, body["data"], strict=True):
                assert cosine(alone[t], d["embedding"]) > 0.9999
