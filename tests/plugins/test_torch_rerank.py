"""A tiny random-weight cross-encoder on torch, through HTTP: scores equal sentence-transformers'
`CrossEncoder.predict` on the same folder, in the same order; TEI's raw scores are its logits."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from litestar.testing import TestClient

from gateway.runtime import hf

from ..conftest import serve
from ..parity.zoo import LIMIT, build_cross_encoder

QUERY = "where is the capital of france"
DOCS = [
    "Paris is the capital of France.",
    "The quick brown fox jumps over the lazy dog.",
    "Berlin is in Germany.",
    "France borders Spain, Italy and Germany; its capital city is Paris.",
    "emoji 🙂 and résumé, naïve café",
    "a",
]


@pytest.fixture(scope="module")
def cross_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_cross_encoder(tmp_path_factory.mktemp("rerank") / "tiny-ce")


@pytest.fixture(scope="module")
def cross_encoder(cross_folder: Path) -> Any:
    from sentence_transformers import CrossEncoder

    return CrossEncoder(str(cross_folder), device="cpu")


@pytest.fixture(scope="module")
def client(cross_folder: Path) -> Iterator[TestClient]:
    # The first model's task comes from its folder (a CrossEncoder); the second says it.
    toml = f"""
    [models.tiny-ce]
    backend = "torch"
    path = "{cross_folder}"

    [models.tiny-ce-said]
    backend = "torch"
    path = "{cross_folder}"
    task = "rerank"
    """
    with serve(toml, plugins=()) as c:
        yield c


def test_folder_recognised_as_a_reranker(cross_folder, client):
    assert hf.folder_task(cross_folder) == "rerank"
    cards = {m["id"]: (m["state"], m["task"]) for m in client.get("/v1/models").json()["data"]}
    assert cards == {"tiny-ce": ("ready", "rerank"), "tiny-ce-said": ("ready", "rerank")}


@pytest.mark.parametrize("model", ["tiny-ce", "tiny-ce-said"])
def test_scores_equal_cross_encoder_predict(client, cross_encoder, model):
    r = client.post("/v2/rerank", json={"model": model, "query": QUERY, "documents": DOCS})
    assert r.status_code == 200, r.text
    body = r.json()
    want = cross_encoder.predict([(QUERY, d) for d in DOCS])
    got = {x["index"]: x["relevance_score"] for x in body["results"]}
    assert max(abs(got[i] - float(want[i])) for i in range(len(DOCS))) <= 1e-4
    assert [x["index"] for x in body["results"]] == list(np.argsort(-want, kind="stable"))
    # The real tokens of every pair, as the model's tokenizer joins them.
    tokens = sum(len(ids) for ids in cross_encoder.tokenizer([QUERY] * len(DOCS), DOCS)["input_ids"])
    assert body["usage"]["total_tokens"] == tokens


def test_tei_raw_scores_are_logits(client, cross_encoder):
    import torch

    r = client.post("/rerank", json={"query": QUERY, "texts": DOCS, "raw_scores": True, "model": "tiny-ce"})
    assert r.status_code == 200, r.text
    logits = cross_encoder.predict([(QUERY, d) for d in DOCS], activation_fn=torch.nn.Identity())
    got = {x["index"]: x["score"] for x in r.json()}
    assert max(abs(got[i] - float(logits[i])) for i in range(len(DOCS))) <= 1e-4
    # The scores spread (random weights with a wide initializer): the order is a real check.
    assert float(np.ptp(logits)) > 0.1


def test_pair_over_the_limit_refused_unless_truncated(client, cross_encoder):
    long = " ".join(["paris"] * (LIMIT + 10))
    body = {"model": "tiny-ce", "query": QUERY, "documents": ["short", long]}
    r = client.post("/v1/rerank", json=body)
    assert r.status_code == 400 and "`documents[1]` has" in r.json()["message"], r.text
    assert f"accepts at most {LIMIT} tokens per query/document pair" in r.json()["message"]
    r = client.post("/v1/rerank", json={**body, "truncate": True})
    assert r.status_code == 200, r.text
    # Cut as predict cuts it (longest first, to the model's limit): the same score.
    want = cross_encoder.predict([(QUERY, "short"), (QUERY, long)])
    got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
    assert abs(got[1] - float(want[1])) <= 1e-4 and abs(got[0] - float(want[0])) <= 1e-4
    short = len(cross_encoder.tokenizer(QUERY, "short")["input_ids"])
    assert r.json()["usage"]["total_tokens"] == short + LIMIT


def test_embedding_route_refuses_the_reranker(client):
    r = client.post("/v1/embeddings", json={"model": "tiny-ce", "input": "hello"})
    assert r.status_code == 400 and "is a rerank model" in r.json()["error"]["message"]


def test_multi_label_classifier_refused_at_load(tmp_path):
    folder = build_cross_encoder(tmp_path / "three", num_labels=3)
    with serve(f'[models.c]\nbackend = "torch"\npath = "{folder}"\ntask = "rerank"\n', plugins=()) as c:
        card = c.get("/v1/models").json()["data"][0]
        assert card["state"] == "failed" and "3 labels; a reranker gives one score per pair" in card["error"]


def test_xlm_roberta_reranker_scores_equal_predict(tmp_path):
    """The second architecture family: XLM-RoBERTa's head (dense, tanh, out_proj) and SentencePiece pairs."""
    from sentence_transformers import CrossEncoder

    folder = build_cross_encoder(tmp_path / "xlmr", arch="xlm-roberta")
    want = CrossEncoder(str(folder), device="cpu").predict([(QUERY, d) for d in DOCS])
    with serve(f'[models.x]\nbackend = "torch"\npath = "{folder}"\n', plugins=()) as c:
        r = c.post("/v2/rerank", json={"model": "x", "query": QUERY, "documents": DOCS})
    assert r.status_code == 200, r.text
    got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
    assert max(abs(got[i] - float(want[i])) for i in range(len(DOCS))) <= 1e-4
    assert [x["index"] for x in r.json()["results"]] == list(np.argsort(-want, kind="stable"))
