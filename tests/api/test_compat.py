"""The TEI, Ollama and Cohere shapes, through their real clients (unmodified, from the lock's test extra) against a
real `gateway serve` process on wordllama: each answers what the OpenAI route answers for the same text and
options, and each bad input is a 4xx in the shape that route's clients expect, which the client raises as its own
error type."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cohere
import httpx
import huggingface_hub.constants
import numpy as np
import ollama
import pytest
from huggingface_hub import InferenceClient
from huggingface_hub.errors import HfHubHTTPError
from litestar.testing import TestClient

from gateway import Backend, hookimpl

from ..conftest import AUTH, FakeBackend, make_app, serve, wait_loaded
from ..upstream import ROOT, free_port, serve_process

KEY = "compat-key-123"
#: A key that may use only `other`, not wordllama (the model TEI's route serves).
OTHER_KEY = "compat-other-key"
TEXTS = ["The food was delicious.", "A man is playing a guitar.", "Das Essen war köstlich."]
LONG = " ".join(["word"] * 40)  # 40 tokens (wordllama adds no special tokens), over the limit of 32


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("compat")
    port = free_port()
    config = tmp / "gateway.toml"
    config.write_text(
        f"""
[server]
port = {port}
access_log = false
max_items_per_request = 8

[auth]
api_keys = ["{KEY}"]
[[auth.keys]]
key = "{OTHER_KEY}"
models = ["other"]

[models.wordllama]
backend = "wordllama"
path = "pkg:wordllama"
matryoshka_dimensions = [64, 128, 256]
max_input_tokens = 32
prompts = {{query = "query: ", document = "passage: "}}

[models.other]
backend = "wordllama"
path = "pkg:wordllama"
"""
    )
    proc = serve_process(config, tmp / "serve.log")
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(base, proc, tmp / "serve.log")
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _wait_ready(base: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{base}/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the gateway did not serve: {log.read_text()[-3000:]}")
        time.sleep(0.1)


def openai_answer(url: str, texts: list[str], **options: Any) -> dict[str, Any]:
    """What /v1/embeddings answers for `texts` on wordllama with `options`: the reference for every shape."""
    body = {"model": "wordllama", "input": texts, **options}
    r = httpx.post(f"{url}/v1/embeddings", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def openai_route(url: str, texts: list[str], **options: Any) -> list[Any]:
    return [d["embedding"] for d in openai_answer(url, texts, **options)["data"]]


# -- the real clients --------------------------------------------------------------------------------------------


def test_huggingface_hub_feature_extraction(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The tests run with HF_HUB_OFFLINE=1 (no hub), which also stops huggingface_hub's client from calling any URL:
    # this one is the local gateway.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    client = InferenceClient(model=f"{url}/embed", token=KEY)
    for text in TEXTS:
        got = client.feature_extraction(text)
        assert got.shape == (1, 256)
        # The same numbers: a model's unit vectors are not scaled again for `normalize`.
        np.testing.assert_array_equal(got[0], np.float32(openai_route(url, [text])[0]))
    got = client.feature_extraction(TEXTS[0], prompt_name="query", dimensions=64)
    np.testing.assert_allclose(got[0], openai_route(url, TEXTS[:1], prompt_name="query", dimensions=64)[0], atol=1e-6)
    got = client.feature_extraction(LONG, truncate=True, truncation_direction="left")
    np.testing.assert_allclose(got[0], openai_route(url, [LONG], truncate="start")[0], atol=1e-6)
    with pytest.raises(HfHubHTTPError) as caught:
        client.feature_extraction(LONG, truncate=False)
    assert caught.value.response.status_code == 400
    assert caught.value.response.json() == {
        "error": "`inputs` has 40 tokens; model 'wordllama' accepts at most 32 tokens per input "
        "(set `truncate` to embed a part of it)",
        "error_type": "Validation",
    }


def test_ollama_embed_and_legacy_embeddings(url: str) -> None:
    client = ollama.Client(host=url, headers={"Authorization": f"Bearer {KEY}"})
    got = client.embed(model="wordllama", input=TEXTS, keep_alive="5m", options={"num_ctx": 512})
    assert got.model == "wordllama"
    np.testing.assert_allclose(got.embeddings, openai_route(url, TEXTS), atol=1e-6)
    assert got.prompt_eval_count == openai_answer(url, TEXTS)["usage"]["total_tokens"]
    assert got.total_duration > 0 and got.load_duration == 0
    got = client.embed(model="wordllama:latest", input=TEXTS[0], dimensions=128)
    np.testing.assert_allclose(got.embeddings, openai_route(url, TEXTS[:1], dimensions=128), atol=1e-6)
    # Ollama truncates by default; `truncate=False` refuses what is over the limit.
    got = client.embed(model="wordllama", input=LONG)
    np.testing.assert_allclose(got.embeddings, openai_route(url, [LONG], truncate=True), atol=1e-6)
    legacy = client.embeddings(model="wordllama", prompt=TEXTS[1])
    np.testing.assert_allclose(legacy.embedding, openai_route(url, TEXTS[1:2])[0], atol=1e-6)
    with pytest.raises(ollama.ResponseError) as caught:
        client.embed(model="nomic-embed-text", input="hello")
    assert caught.value.status_code == 404
    assert "'nomic-embed-text' not found" in caught.value.error


def test_cohere_embed_by_type(url: str) -> None:
    client = cohere.ClientV2(base_url=url, api_key=KEY)
    got = client.embed(
        model="wordllama",
        texts=TEXTS,
        input_type="search_query",
        embedding_types=["float", "int8", "ubinary", "base64"],
        output_dimension=64,
    )
    same = {"input_type": "search_query", "dimensions": 64}
    np.testing.assert_allclose(got.embeddings.float_, openai_route(url, TEXTS, **same), atol=1e-6)
    assert got.embeddings.int8 == openai_route(url, TEXTS, encoding_format="int8", **same)
    assert got.embeddings.ubinary == openai_route(url, TEXTS, encoding_format="ubinary", **same)
    assert got.embeddings.base64 == openai_route(url, TEXTS, encoding_format="base64", **same)
    assert got.texts == TEXTS and got.response_type == "embeddings_by_type"
    tokens = openai_answer(url, TEXTS, input_type="search_query")["usage"]["total_tokens"]
    assert got.meta is not None and got.meta.billed_units is not None
    assert got.meta.billed_units.input_tokens == tokens
    # START keeps the end of an input over the limit, as /v1/embeddings' "start" does.
    got = client.embed(model="wordllama", texts=[LONG], input_type="search_document", truncate="START")
    np.testing.assert_allclose(
        got.embeddings.float_, openai_route(url, [LONG], input_type="search_document", truncate="start"), atol=1e-6
    )
    with pytest.raises(cohere.errors.BadRequestError) as caught:
        client.embed(model="wordllama", texts=[LONG], input_type="search_document", truncate="NONE")
    assert caught.value.status_code == 400
    # 42: the 40 words and the two of the document prompt ("passage: ") that `search_document` puts in front.
    assert caught.value.body["message"] == (
        "`texts` has 42 tokens; model 'wordllama' accepts at most 32 tokens per input "
        "(set `truncate` to embed a part of it)"
    )


# -- bad input, route by route, in each route's error shape --------------------------------------------------------

_OVER = "`{at}` has 40 tokens; model 'wordllama' accepts at most 32 tokens per input (set `truncate` to embed a part"
BAD = [
    # TEI: 400 in TEI's body, "Empty" for an empty input from the pipeline, "Validation" for the rest.
    ("/embed", {"inputs": []}, 400, "`inputs` must not be an empty list"),
    ("/embed", {"inputs": ["a"] * 9}, 400, "`inputs` has 9 items; the limit is 8 per request"),
    ("/embed", {"inputs": LONG, "truncate": False}, 400, _OVER.format(at="inputs")),
    ("/embed", {"inputs": "a", "truncation_direction": "Middle"}, 400, "`truncation_direction`"),
    ("/embed", {"inputs": "a", "model": "wordllama"}, 400, "`model`"),
    # Ollama: {"error": ...} with our statuses.
    ("/api/embed", {"model": "wordllama", "input": []}, 400, "`input` must not be an empty list"),
    ("/api/embed", {"model": "wordllama", "input": ["a"] * 9}, 400, "`input` has 9 items; the limit is 8"),
    ("/api/embed", {"model": "wordllama", "input": LONG, "truncate": False}, 400, _OVER.format(at="input")),
    ("/api/embed", {"model": "llama3", "input": "a"}, 404, "model 'llama3' not found"),
    ("/api/embed", {"model": "wordllama", "input": "a", "truncate": "yes"}, 400, "`truncate`"),
    ("/api/embeddings", {"model": "wordllama", "prompt": ""}, 400, "`prompt`"),
    ("/api/embeddings", {"model": "llama3", "prompt": "a"}, 404, "model 'llama3' not found"),
    # Cohere: {"id", "message"}.
    ("/v2/embed", {"model": "wordllama", "texts": []}, 400, "`texts` must not be an empty list"),
    ("/v2/embed", {"model": "wordllama", "texts": ["a"] * 9}, 400, "`texts` has 9 items; the limit is 8"),
    ("/v2/embed", {"model": "wordllama", "texts": [LONG], "truncate": "NONE"}, 400, _OVER.format(at="texts")),
    ("/v2/embed", {"model": "command-r", "texts": ["a"]}, 404, "model 'command-r' not found"),
    ("/v2/embed", {"model": "wordllama", "texts": ["a"], "embedding_types": ["int4"]}, 400, "`embedding_types[0]`"),
    ("/v2/embed", {"model": "wordllama", "texts": ["a"], "output_dimension": 32}, 400, "`output_dimension` 32 is not"),
]


def _message(path: str, body: dict[str, Any]) -> str:
    if path == "/v2/embed":
        assert set(body) == {"id", "message"}, body
        return body["message"]  # type: ignore[no-any-return]
    assert set(body) == ({"error", "error_type"} if path == "/embed" else {"error"}), body
    return body["error"]  # type: ignore[no-any-return]


@pytest.mark.parametrize(("path", "body", "status", "says"), BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_is_a_4xx_in_the_routes_shape(url: str, path: str, body: dict[str, Any], status: int, says: str):
    r = httpx.post(f"{url}{path}", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert r.status_code == status, r.text
    assert says in _message(path, r.json()), r.text


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/embed", {"inputs": "a"}),
        ("/api/embed", {"model": "wordllama", "input": "a"}),
        ("/v2/embed", {"model": "wordllama", "texts": ["a"]}),
    ],
)
def test_keys_apply_as_on_the_openai_route(url: str, path: str, body: dict[str, Any]) -> None:
    r = httpx.post(f"{url}{path}", json=body)
    assert r.status_code == 401 and "API key" in _message(path, r.json()), r.text
    r = httpx.post(f"{url}{path}", json=body, headers={"Authorization": f"Bearer {OTHER_KEY}"})
    assert r.status_code == 403, r.text
    assert _message(path, r.json()) == "this API key may not use model 'wordllama'"


def test_an_empty_text_is_named(url: str) -> None:
    r = httpx.post(f"{url}/embed", json={"inputs": ["a", ""]}, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and r.json()["error_type"] == "Validation", r.text
    assert "`inputs[1]`" in r.json()["error"], r.text


# -- TEI's /tokenize ------------------------------------------------------------------------------------------------


def test_tei_tokenize_shows_the_tokens_the_model_counts(url: str) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(f"{url}/tokenize", json={"inputs": TEXTS}, headers=auth)
    assert r.status_code == 200, r.text
    for text, tokens in zip(TEXTS, r.json(), strict=True):
        assert len(tokens) == openai_answer(url, [text])["usage"]["total_tokens"]
        assert all(t["text"] == text[t["start"] : t["stop"]] and not t["special"] for t in tokens), tokens
    # The prompt is tokenized in front, as an embedding request with `prompt_name` has it.
    r = httpx.post(f"{url}/tokenize", json={"inputs": "hello", "prompt_name": "query"}, headers=auth)
    tokens = r.json()[0]
    assert len(tokens) == openai_answer(url, ["hello"], prompt_name="query")["usage"]["total_tokens"]
    assert "".join(t["text"] for t in tokens).replace(" ", "") == "query:hello"


def test_tei_tokenize_marks_special_tokens_on_a_bert_model() -> None:
    toml = f'[models.minilm]\nbackend = "onnx"\npath = "{ROOT / "models" / "minilm-onnx"}"\n'
    with serve(toml, plugins=()) as client:
        r = client.post("/tokenize", json={"inputs": ["Hello wörld!"]})
        assert r.status_code == 200, r.text
        assert r.json() == [
            [
                {"id": 101, "text": "[CLS]", "special": True, "start": None, "stop": None},
                {"id": 7592, "text": "Hello", "special": False, "start": 0, "stop": 5},
                {"id": 2088, "text": "wörld", "special": False, "start": 6, "stop": 11},
                {"id": 999, "text": "!", "special": False, "start": 11, "stop": 12},
                {"id": 102, "text": "[SEP]", "special": True, "start": None, "stop": None},
            ]
        ]
        ids = client.post("/v1/embeddings", json={"model": "minilm", "input": "Hello wörld!"}).json()["usage"]
        assert ids["total_tokens"] == 5
        r = client.post("/tokenize", json={"inputs": "Hello wörld!", "add_special_tokens": False})
        assert [t["id"] for t in r.json()[0]] == [7592, 2088, 999]


class _NoSpans(FakeBackend):
    """A backend that keeps the contract's default: it cannot show its tokens."""

    name = "nospans"
    token_spans = Backend.token_spans


class _NoSpansPlugin:
    @staticmethod
    @hookimpl
    def register_backends(register: Any) -> None:
        register(_NoSpans)


def test_tei_tokenize_on_a_backend_that_cannot_show_tokens_says_so() -> None:
    app = make_app('[models.n]\nbackend = "nospans"\npath = "."\n', plugins=(_NoSpansPlugin,))
    with TestClient(app=app) as client:
        wait_loaded(client)
        r = client.post("/tokenize", json={"inputs": "a b"}, headers=AUTH)
    assert r.status_code == 400, r.text
    assert r.json() == {
        "error": "model 'n' cannot show its tokens: backend 'nospans' gives no token text or offsets",
        "error_type": "Validation",
    }
