"""A tiny random-weight cross-encoder converted to ONNX (fp32 and int8) by `gateway convert --to onnx` and served
by the onnx backend through HTTP: scores against sentence-transformers' `CrossEncoder.predict` on the source."""

from __future__ import annotations

import argparse
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
    " ".join(["paris"] * (LIMIT + 10)),  # over the limit: cut as predict cuts it (the requests truncate)
]
#: int8's stated floor: worst |relevance difference| against predict, with room for other CPUs' int8 kernels.
#: Random weights with a wide initializer are harsh on int8, most of all on the over-limit document (one token
#: repeated): its difference is the worst here, twice that of any of 64 corpus pairs (bench/README.md).
INT8_FLOOR = 0.15


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from gateway_onnx import OnnxConverter

    root = tmp_path_factory.mktemp("onnx-rerank")
    src = build_cross_encoder(root / "ce")
    out = {"source": src}
    for name, quantize in (("fp32", None), ("int8", "int8")):
        OnnxConverter().convert(str(src), str(root / name), argparse.Namespace(quantize=quantize))
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def client(folders: dict[str, Path]) -> Iterator[TestClient]:
    toml = "".join(f'[models.{n}]\nbackend = "onnx"\npath = "{folders[n]}"\n' for n in ("fp32", "int8"))
    with serve(toml, plugins=()) as c:
        yield c


@pytest.fixture(scope="module")
def want(folders: dict[str, Path]) -> Any:
    from sentence_transformers import CrossEncoder

    return CrossEncoder(str(folders["source"]), device="cpu").predict([(QUERY, d) for d in DOCS])


def _relevance(client: TestClient, model: str) -> np.ndarray:
    body = {"model": model, "query": QUERY, "documents": DOCS, "truncate": True}
    r = client.post("/v2/rerank", json=body)
    assert r.status_code == 200, r.text
    got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
    return np.array([got[i] for i in range(len(DOCS))])


def test_converted_folder_is_a_reranker(folders, client):
    assert hf.folder_task(folders["fp32"]) == "rerank"
    assert {m["id"]: m["state"] for m in client.get("/v1/models").json()["data"]} == {"fp32": "ready", "int8": "ready"}


def test_fp32_scores_equal_cross_encoder_predict(client, want):
    got = _relevance(client, "fp32")
    assert float(np.max(np.abs(got - want))) <= 1e-4
    assert list(np.argsort(-got, kind="stable")) == list(np.argsort(-want, kind="stable"))


def test_int8_scores_within_the_stated_floor(client, want):
    got = _relevance(client, "int8")
    assert float(np.max(np.abs(got - want))) <= INT8_FLOOR


def test_an_embedding_task_is_refused_for_the_reranker_graph(folders):
    with serve(f'[models.e]\nbackend = "onnx"\npath = "{folders["fp32"]}"\ntask = "embed"\n', plugins=()) as c:
        card = c.get("/v1/models").json()["data"][0]
        assert card["state"] == "failed" and 'serve it with task = "rerank"' in card["error"]


def test_xlm_roberta_reranker_fp32_scores_equal_predict(tmp_path):
    """The second architecture family, exported and served: XLM-RoBERTa's head and SentencePiece pairs."""
    from gateway_onnx import OnnxConverter
    from sentence_transformers import CrossEncoder

    src = build_cross_encoder(tmp_path / "xlmr", arch="xlm-roberta")
    OnnxConverter().convert(str(src), str(tmp_path / "fp32"), argparse.Namespace(quantize=None))
    want = CrossEncoder(str(src), device="cpu").predict([(QUERY, d) for d in DOCS])
    with serve(f'[models.x]\nbackend = "onnx"\npath = "{tmp_path / "fp32"}"\n', plugins=()) as c:
        got = _relevance(c, "x")
    assert float(np.max(np.abs(got - want))) <= 1e-4
    assert list(np.argsort(-got, kind="stable")) == list(np.argsort(-want, kind="stable"))
