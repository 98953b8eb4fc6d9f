"""Prompts, truncation and compact output types on the real models, every bundled backend, through HTTP.

The ONNX and GGUF files are the ones `make models` writes (what `make serve` and `make test` use); the
torch and ONNX folders are copies (links) with prompts in their config_sentence_transformers.json, which
is how a model that ships prompts arrives.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ..conftest import cosine, serve

pytest.importorskip("sentence_transformers")
pytest.importorskip("onnxruntime")
pytest.importorskip("llama_cpp")
pytest.importorskip("wordllama")

MODELS = Path(__file__).resolve().parents[2] / "models"
PROMPTS = {"query": "query: ", "document": "passage: "}
QUESTION = "What is the capital of France?"
# About 440 tokens: over MiniLM's 256.
LONG = " ".join(f"Sentence {i} of a long document about the rivers and mountains of Europe." for i in range(30))


def _folder_with_prompts(src: Path, dest: Path) -> Path:
    # Copied (the weights linked): a model folder's own files may not point outside it.
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("model.onnx", "model.safetensors"))
    for weights in ("model.onnx", "model.safetensors"):
        if (src / weights).exists():
            (dest / weights).symlink_to(src / weights)
    (dest / "config_sentence_transformers.json").write_text(json.dumps({"prompts": PROMPTS}))
    return dest


@pytest.fixture(scope="module")
def client(minilm_path, tmp_path_factory):
    for needed in ("minilm-onnx/model.onnx", "minilm-f16.gguf"):
        assert (MODELS / needed).exists(), f"models/{needed} is missing: run `make models`"
    root = tmp_path_factory.mktemp("prompted")
    torch_dir = _folder_with_prompts(Path(minilm_path), root / "torch")
    onnx_dir = _folder_with_prompts(MODELS / "minilm-onnx", root / "onnx")
    toml = f"""
    [models.torch]
    backend = "torch"
    path = "{torch_dir}"

    [models.onnx]
    backend = "onnx"
    path = "{onnx_dir}"

    # A GGUF file has no folder to read prompts from: the operator names them.
    [models.gguf]
    backend = "gguf"
    path = "{MODELS / "minilm-f16.gguf"}"
    prompts = {{query = "query: ", document = "passage: "}}
    options = {{n_threads = 1}}

    [models.wordllama]
    backend = "wordllama"
    path = "pkg:wordllama"
    max_input_tokens = 32
    matryoshka_dimensions = [64, 128, 256]
    prompts = {{query = "query: "}}
    """
    with serve(toml, plugins=()) as c:
        yield c


BACKENDS = ["torch", "onnx", "gguf"]


def _embed(client, model, **body):
    r = client.post("/v1/embeddings", json={"model": model, **body})
    assert r.status_code == 200, r.text
    return r


def _vectors(r):
    return np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)


def test_prompts_come_from_the_model_folder_without_config(client):
    cards = {c["id"]: c for c in client.get("/v1/models").json()["data"]}
    assert cards["torch"]["prompts"] == PROMPTS and cards["onnx"]["prompts"] == PROMPTS
    assert cards["gguf"]["prompts"] == PROMPTS


@pytest.mark.parametrize("model", [*BACKENDS, "wordllama"])
def test_a_prompt_changes_the_vector_and_counts_its_tokens(client, model):
    plain = _embed(client, model, input=QUESTION)
    prompted = _embed(client, model, input=QUESTION, prompt_name="query")
    assert prompted.headers["x-prompt-name"] == "query"
    assert cosine(_vectors(plain)[0], _vectors(prompted)[0]) < 0.999
    assert prompted.json()["usage"]["total_tokens"] > plain.json()["usage"]["total_tokens"]


def test_the_prompt_is_what_sentence_transformers_applies(client, st_model):
    for model in BACKENDS:
        got = _vectors(_embed(client, model, input=[QUESTION, "Paris"], input_type="search_document"))
        want = st_model.encode([QUESTION, "Paris"], prompt="passage: ", normalize_embeddings=True)
        for a, b in zip(got, want, strict=True):
            assert cosine(a, b) > 0.9999, model
    counts = {m: _embed(client, m, input=QUESTION, prompt_name="query").json()["usage"] for m in BACKENDS}
    assert len({c["total_tokens"] for c in counts.values()}) == 1, counts
    assert counts["torch"]["total_tokens"] == len(st_model.tokenizer("query: " + QUESTION)["input_ids"])


@pytest.mark.parametrize("side", ["end", "start"])
def test_every_backend_cuts_at_the_same_token(client, st_model, side):
    got = {}
    for model in BACKENDS:
        r = client.post("/v1/embeddings", json={"model": model, "input": [LONG, QUESTION], "truncate": side})
        assert r.status_code == 200, r.text
        assert r.headers["x-truncated-inputs"] == "1"
        assert r.json()["usage"]["total_tokens"] == 256 + len(st_model.tokenizer(QUESTION)["input_ids"])
        got[model] = _vectors(r)
    for model in BACKENDS[1:]:
        assert cosine(got[model][0], got["torch"][0]) > 0.999, model
    if side == "end":
        # sentence-transformers itself cuts at its max_seq_length (256), keeping the start.
        assert cosine(got["torch"][0], st_model.encode(LONG, normalize_embeddings=True)) > 0.9999
    else:
        ids = st_model.tokenizer(LONG)["input_ids"]
        kept = st_model.tokenizer.decode(ids[len(ids) - 255 : -1])
        assert cosine(got["torch"][0], st_model.encode(kept, normalize_embeddings=True)) > 0.999


def test_wordllama_truncates_at_its_configured_limit(client):
    r = client.post("/v1/embeddings", json={"model": "wordllama", "input": LONG, "truncate": True, "dimensions": 64})
    assert r.status_code == 200
    assert r.json()["usage"]["total_tokens"] == 32 and r.headers["x-truncated-inputs"] == "1"
    assert len(r.json()["data"][0]["embedding"]) == 64


@pytest.mark.parametrize("model", ["onnx", "wordllama"])
def test_compact_types_stay_close_to_the_floats(client, model):
    texts = ["A man is playing a guitar.", "A woman is slicing an onion.", QUESTION]
    # base64: the exact float32 values (JSON's 9 decimals turn a tiny positive value into 0).
    raw = _embed(client, model, input=texts, encoding_format="base64").json()["data"]
    floats = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in raw])
    uint8, int8 = (
        np.array([d["embedding"] for d in _embed(client, model, input=texts, encoding_format=kind).json()["data"]])
        for kind in ("uint8", "int8")
    )
    np.testing.assert_array_equal(int8, uint8 - 128)
    # One affine scale per dimension: wherever one text's float is larger, so is (or equal) its step.
    for a in range(len(texts)):
        for b in range(len(texts)):
            assert (uint8[a][floats[a] > floats[b]] >= uint8[b][floats[a] > floats[b]]).all()
    assert uint8.min() >= 0 and uint8.max() <= 255 and len(set(uint8.ravel())) > 50
    ubinary = np.array(
        [d["embedding"] for d in _embed(client, model, input=texts, encoding_format="ubinary").json()["data"]]
    )
    np.testing.assert_array_equal(np.unpackbits(ubinary.astype(np.uint8), axis=1), (floats > 0).astype(np.uint8))


@pytest.mark.parametrize("model", [*BACKENDS, "wordllama"])
def test_cached_vectors_equal_uncached_bit_for_bit(client, model):
    texts = [f"{model} caches this sentence, number {i}." for i in range(3)]
    dims = {"dimensions": 64} if model == "wordllama" else {}
    first = _embed(client, model, input=texts, encoding_format="base64", **dims)
    first_float = _embed(client, model, input=texts, **dims)
    assert first.headers["x-cache-hits"] == "0" and first_float.headers["x-cache-hits"] == "3"
    again = _embed(client, model, input=texts, encoding_format="base64", **dims)
    assert again.headers["x-cache-hits"] == "3"
    assert again.json()["data"] == first.json()["data"] and again.json()["usage"] == first.json()["usage"]
    # The float answer from the cache is the uncached base64 vector, written with 9 decimals.
    raw = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in first.json()["data"]])
    np.testing.assert_array_equal(
        _vectors(first_float).astype(np.float64), np.float32(np.round(raw.astype(np.float64), 9))
    )
