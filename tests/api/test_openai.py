"""The official `openai` package, unmodified, against the gateway served by uvicorn on a real socket."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import numpy as np
import openai
import pytest

from ..conftest import API_KEY, SENTENCES, cosine, make_app, uvicorn_server


@pytest.fixture(scope="module")
def base_url(minilm_path: str) -> Iterator[str]:
    toml = f"""
    [models.minilm]
    backend = "torch"
    path = "{minilm_path}"
    matryoshka_dimensions = [128, 256, 384]
    """
    with uvicorn_server(make_app(toml, plugins=())) as (url, _):
        yield url


@pytest.fixture(params=["/v1", "/api/v3/inference"])
def client(base_url: str, request) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + request.param, api_key=API_KEY, max_retries=0)


def test_float_and_base64_agree(client, st_model):
    floats = client.embeddings.create(model="minilm", input=SENTENCES[:3], encoding_format="float")
    default = client.embeddings.create(model="minilm", input=SENTENCES[:3])  # the client asks for base64
    b64 = client.embeddings.create(model="minilm", input=SENTENCES[:3], encoding_format="base64")
    expected = st_model.encode(SENTENCES[:3])
    for i in range(3):
        assert floats.data[i].index == i
        # Asked for explicitly, base64 comes back as the string; the client decodes only its own default.
        decoded = np.frombuffer(base64.b64decode(b64.data[i].embedding), dtype="<f4")
        np.testing.assert_allclose(floats.data[i].embedding, decoded, rtol=0, atol=1e-7)
        np.testing.assert_array_equal(np.asarray(default.data[i].embedding, dtype=np.float32), decoded)
        assert cosine(floats.data[i].embedding, expected[i]) > 0.9999
    assert floats.usage.total_tokens == floats.usage.prompt_tokens > 0
    assert floats.model == "minilm"


def test_dimensions(client):
    r = client.embeddings.create(model="minilm", input="cut me", dimensions=128)
    v = np.array(r.data[0].embedding)
    assert v.shape == (128,) and abs(np.linalg.norm(v) - 1) < 1e-5


def test_errors_are_typed_exceptions(client, base_url):
    with pytest.raises(openai.NotFoundError) as info:
        client.embeddings.create(model="nope", input="x")
    assert "available models: minilm" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model="minilm", input="x", dimensions=100)
    assert info.value.body["param"] == "dimensions"
    bad = openai.OpenAI(base_url=base_url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.embeddings.create(model="minilm", input="x")


def test_models_list(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["minilm"]
