"""A tiny random-weight cross-encoder converted to GGUF (f16 and q8_0) by `gateway convert --to gguf` and served by
the gguf backend (llama.cpp's rank pooling) through HTTP: scores against sentence-transformers'
`CrossEncoder.predict` on the source folder, on 1 query x 32 documents."""

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

pytest.importorskip("llama_cpp")

QUERY = "where is the capital of france"
DOCS = [
    "Paris is the capital of France.",
    "The quick brown fox jumps over the lazy dog.",
    "Berlin is in Germany.",
    "France borders Spain, Italy and Germany; its capital city is Paris.",
    "emoji 🙂 and résumé, naïve café",
    "a",
    "Madrid is the capital of Spain.",
    "The Eiffel Tower stands in Paris.",
    "Lyon is a large city in France.",
    "Rome was not built in a day.",
    "the capital",
    "where is it?",
    "France",
    "Capital letters start a sentence.",
    "The river Seine flows through Paris.",
    "東京は日本の首都です。",
    "¿Dónde está la biblioteca?",
    "Paris, France: population about two million.",
    "I love pizza 🍕🔥!",
    "Marseille is a port on the Mediterranean.",
    "The French Republic's seat of government is in Paris.",
    "Brussels is the capital of Belgium.",
    "What is the capital of France? Paris.",
    "Cats sleep most of the day.",
    "numbers 1 2 3 4 5 6 7 8 9 10",
    "The capital of France is not Lyon.",
    "A city of lights and cafés.",
    "Geography quiz: European capitals.",
    "Bordeaux is famous for its wine.",
    "Where is the capital? In the north of the country.",
    "quite a long document " * 8,
    " ".join(["paris"] * (LIMIT + 10)),  # over the limit: cut as predict cuts it (the requests truncate)
]
#: Stated floors, worst |relevance difference| (sigmoid of the logit) against predict on these 32 pairs. Measured
#: 2026-12-07 on builds of this tiny model (random weights, initializer range 0.3, which amplifies rounding):
#: f16 0.0007-0.0020 (an f32 GGUF of the same weights: 0.0004, llama.cpp's tanh-approximated GELU against
#: BERT's erf GELU), q8_0 0.026-0.044.
F16_FLOOR = 3e-3
Q8_FLOOR = 0.1
Q8_MIN_TAU = 0.85


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from gateway_gguf import GgufConverter

    root = tmp_path_factory.mktemp("gguf-rerank")
    # Seed 3: it spreads the 32 pairs widely (a relevance range of 0.67), so the floors below say something.
    src = build_cross_encoder(root / "ce", seed=3)
    out = {"source": src}
    for qtype in ("f16", "q8_0"):
        out[qtype] = root / f"ce-{qtype}.gguf"
        GgufConverter().convert(str(src), str(out[qtype]), argparse.Namespace(gguf_type=qtype))
    return out


@pytest.fixture(scope="module")
def client(folders: dict[str, Path]) -> Iterator[TestClient]:
    toml = "".join(f'[models.{n}]\nbackend = "gguf"\npath = "{folders[n]}"\ntask = "rerank"\n' for n in ("f16", "q8_0"))
    with serve(toml, plugins=()) as c:
        yield c


@pytest.fixture(scope="module")
def cross_encoder(folders: dict[str, Path]) -> Any:
    from sentence_transformers import CrossEncoder

    return CrossEncoder(str(folders["source"]), device="cpu")


@pytest.fixture(scope="module")
def want(cross_encoder: Any) -> np.ndarray:
    return np.asarray(cross_encoder.predict([(QUERY, d) for d in DOCS]))


def _relevance(client: TestClient, model: str, docs: list[str] = DOCS) -> tuple[np.ndarray, list[int]]:
    body = {"model": model, "query": QUERY, "documents": docs, "truncate": True}
    r = client.post("/v2/rerank", json=body)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    got = {x["index"]: x["relevance_score"] for x in results}
    return np.array([got[i] for i in range(len(docs))]), [x["index"] for x in results]


def _swapped(want: np.ndarray, order: list[int]) -> list[tuple[int, int]]:
    """The pairs of documents (i, j) that predict ranks i over j and the answer ranks j over i."""
    rank = {doc: r for r, doc in enumerate(order)}
    n = len(want)
    return [(i, j) for i in range(n) for j in range(n) if want[i] > want[j] and rank[i] > rank[j]]


def test_the_converted_file_is_a_reranker_as_llama_cpp_reads_one(folders):
    import gguf

    meta = hf.read_gguf_metadata(folders["f16"])
    assert meta["bert.pooling_type"] == 4  # LLAMA_POOLING_TYPE_RANK
    assert meta["sentence_transformers.activation"] == "sigmoid"
    assert "tokenizer.huggingface.json" in meta
    names = {t.name for t in gguf.GGUFReader(str(folders["f16"])).tensors}
    assert {"cls.weight", "cls.bias", "cls.output.weight", "cls.output.bias", "token_types.weight"} <= names
    labels = gguf.GGUFReader(str(folders["f16"])).fields["bert.classifier.output_labels"]
    assert len(labels.data) == 1  # one score per pair (llama.cpp's n_cls_out)


@pytest.mark.parametrize(("model", "floor"), [("f16", F16_FLOOR), ("q8_0", Q8_FLOOR)])
def test_scores_equal_cross_encoder_predict(client, want, model, floor):
    got, order = _relevance(client, model)
    worst = float(np.max(np.abs(got - want)))
    print(f"gguf {model}: max |relevance diff| {worst:.2e} over {len(DOCS)} documents")
    assert worst <= floor
    # The scores spread (a wide initializer): the order is a real check.
    assert float(np.ptp(want)) > 0.3
    swapped = _swapped(want, order)
    n_pairs = len(DOCS) * (len(DOCS) - 1) // 2
    print(f"gguf {model}: {len(swapped)} of {n_pairs} pairs of documents swapped")
    if model == "f16":
        # Two documents may swap only where predict's own scores are closer than f16 rounding moves them.
        assert all(abs(want[i] - want[j]) <= 2 * floor for i, j in swapped), swapped
    else:
        # q8_0 moves scores by more than many gaps here: its stated floor on order is Kendall's tau >= 0.85
        # (measured 0.92-0.97 over six builds: 7 to 19 of 496 pairs swapped).
        assert 1 - 2 * len(swapped) / n_pairs >= Q8_MIN_TAU


def test_raw_scores_are_the_logits(client, cross_encoder):
    import torch

    r = client.post("/rerank", json={"query": QUERY, "texts": DOCS[:8], "raw_scores": True, "model": "f16"})
    assert r.status_code == 200, r.text
    logits = cross_encoder.predict([(QUERY, d) for d in DOCS[:8]], activation_fn=torch.nn.Identity())
    got = {x["index"]: x["score"] for x in r.json()}
    assert max(abs(got[i] - float(logits[i])) for i in range(8)) <= 1e-2


def test_pair_over_the_limit_refused_unless_truncated(client, cross_encoder):
    long = DOCS[-1]
    body = {"model": "f16", "query": QUERY, "documents": ["short", long]}
    r = client.post("/v1/rerank", json=body)
    assert r.status_code == 400 and f"accepts at most {LIMIT} tokens per query/document pair" in r.json()["message"]
    r = client.post("/v1/rerank", json={**body, "truncate": True})
    assert r.status_code == 200, r.text
    # Cut as predict cuts it (longest text first, to the model's limit): the same score.
    want = cross_encoder.predict([(QUERY, "short"), (QUERY, long)])
    got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
    assert abs(got[1] - float(want[1])) <= F16_FLOOR and abs(got[0] - float(want[0])) <= F16_FLOOR
    short = len(cross_encoder.tokenizer(QUERY, "short")["input_ids"])
    assert r.json()["usage"]["total_tokens"] == short + LIMIT


def test_second_segment_token_types_reach_llama_cpp(client, want):
    """llama.cpp's BERT graph adds token type 0 to every token; the backend feeds the pair as input vectors
    carrying type 1 for the document. Fed as plain token ids instead, this model's scores move far off."""
    backend = client.app.state.gateway.registry.models["f16"].backend
    assert backend._table is not None
    pairs = [(QUERY, d) for d in DOCS]
    with_types = backend.score(pairs, [])
    table, backend._table = backend._table, None
    try:
        all_zero = backend.score(pairs, [])
    finally:
        backend._table = table
    logits = np.log(want / (1 - want))
    print(f"token ids alone (type 0 everywhere): max |logit diff| {np.max(np.abs(all_zero - logits)):.3f}")
    assert float(np.max(np.abs(with_types - logits))) <= 0.01
    assert float(np.max(np.abs(all_zero - logits))) > 0.5


def test_reranker_served_as_an_embedding_model_is_refused(folders):
    with serve(f'[models.e]\nbackend = "gguf"\npath = "{folders["f16"]}"\n', plugins=()) as c:
        card = c.get("/v1/models").json()["data"][0]
        assert card["state"] == "failed" and 'serve it with task = "rerank"' in card["error"]


def test_pooling_option_refused_for_a_reranker(folders):
    toml = f'[models.r]\nbackend = "gguf"\npath = "{folders["f16"]}"\ntask = "rerank"\n'
    toml += '[models.r.options]\npooling = "cls"\n'
    with serve(toml, plugins=()) as c:
        card = c.get("/v1/models").json()["data"][0]
        assert card["state"] == "failed" and "options.pooling = 'cls' does not apply to a reranker" in card["error"]


def test_multi_label_classifier_refused_by_the_converter(tmp_path):
    from gateway_gguf import GgufConverter

    from gateway.plugin import BackendError

    folder = build_cross_encoder(tmp_path / "three", num_labels=3)
    with pytest.raises(BackendError, match="3 labels; a reranker gives one score per pair"):
        GgufConverter().convert(str(folder), str(tmp_path / "x.gguf"), argparse.Namespace(gguf_type="f16"))


def test_an_embedding_gguf_is_refused_as_a_reranker(tmp_path):
    from gateway_gguf import GgufConverter

    from ..parity.zoo import build

    folder = build("bert-cls", tmp_path / "embedder")
    out = tmp_path / "embedder.gguf"
    GgufConverter().convert(str(folder), str(out), argparse.Namespace(gguf_type="f16"))
    with serve(f'[models.r]\nbackend = "gguf"\npath = "{out}"\ntask = "rerank"\n', plugins=()) as c:
        card = c.get("/v1/models").json()["data"][0]
        assert card["state"] == "failed", card
        assert "is not a reranker GGUF (bert.pooling_type is 2, not rank = 4)" in card["error"]


def test_xlm_roberta_reranker_scores_equal_predict(tmp_path):
    from gateway_gguf import GgufConverter
    from sentence_transformers import CrossEncoder

    src = build_cross_encoder(tmp_path / "xlmr", arch="xlm-roberta")
    out = tmp_path / "xlmr-f16.gguf"
    GgufConverter().convert(str(src), str(out), argparse.Namespace(gguf_type="f16"))
    want = np.asarray(CrossEncoder(str(src), device="cpu").predict([(QUERY, d) for d in DOCS]))
    with serve(f'[models.x]\nbackend = "gguf"\npath = "{out}"\ntask = "rerank"\n', plugins=()) as c:
        got, order = _relevance(c, "x")
    worst = float(np.max(np.abs(got - want)))
    print(f"gguf xlm-roberta f16: max |relevance diff| {worst:.2e} over {len(DOCS)} documents")
    assert worst <= F16_FLOOR
    assert all(abs(want[i] - want[j]) <= 2 * F16_FLOOR for i, j in _swapped(want, order))
