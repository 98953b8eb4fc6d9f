"""Request options through HTTP on the fake backend: prompts, truncation, output types, `created`."""

from __future__ import annotations

import base64
import time

import numpy as np
import pytest

from gateway.base.config import ConfigError, parse_config
from gateway.runtime.quantize import Ranges, calibration_texts, quantize

from ..conftest import FakeBackend, fake_vector, serve

TOML = """
[models.fake]
backend = "fake"
path = "."
matryoshka_dimensions = [8, 16, 32]
prompts = {query = "query: ", document = "passage: ", long = "a b c d e f g h i j k l m n "}
options = {embeds_ids = true, dimension = 32}

[models.plain]
backend = "fake"
path = "."

[models.cutting]
backend = "fake"
path = "."
truncate = "start"
default_prompt_name = "query"
prompts = {query = "query: "}
options = {embeds_ids = true}
"""


@pytest.fixture(scope="module")
def client():
    with serve(TOML) as c:
        yield c


def post(client, **body):
    return client.post("/v1/embeddings", json={"model": "fake", **body})


def ids_vector(ids, dim=32):
    return fake_vector(" ".join(map(str, ids)), dim)


def test_prompt_name_prepends_the_prompt_and_counts_its_tokens(client):
    plain = post(client, input="hello world")
    prompted = post(client, input="hello world", prompt_name="query")
    assert plain.status_code == prompted.status_code == 200
    assert "x-prompt-name" not in plain.headers
    assert prompted.headers["x-prompt-name"] == "query"
    # The fake's ids are word lengths framed by 101/102: "query: hello world" is [101, 6, 5, 5, 102].
    np.testing.assert_allclose(prompted.json()["data"][0]["embedding"], ids_vector([101, 6, 5, 5, 102]), atol=1e-8)
    np.testing.assert_allclose(plain.json()["data"][0]["embedding"], ids_vector([101, 5, 5, 102]), atol=1e-8)
    assert plain.json()["usage"]["total_tokens"] == 4
    assert prompted.json()["usage"] == {"prompt_tokens": 5, "total_tokens": 5}


@pytest.mark.parametrize(
    ("input_type", "prompt"),
    [("query", "query"), ("search_query", "query"), ("document", "document"), ("search_document", "document")],
)
def test_input_type_maps_onto_prompt_names(client, input_type, prompt):
    r = post(client, input=["a", "bb"], input_type=input_type)
    assert r.status_code == 200
    assert r.headers["x-prompt-name"] == prompt
    words = len(("query: " if prompt == "query" else "passage: ").split()[0])
    expected = [ids_vector([101, words, 1, 102]), ids_vector([101, words, 2, 102])]
    np.testing.assert_allclose([d["embedding"] for d in r.json()["data"]], expected, atol=1e-8)


def test_input_type_without_a_matching_prompt_applies_none(client):
    r = post(client, input="hello", input_type="clustering")
    assert r.status_code == 200 and "x-prompt-name" not in r.headers
    np.testing.assert_allclose(r.json()["data"][0]["embedding"], ids_vector([101, 5, 102]), atol=1e-8)


def test_unknown_prompt_name_lists_the_models_prompts(client):
    r = post(client, input="hello", prompt_name="questions")
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "prompt_name" and err["code"] == "invalid_prompt_name"
    assert err["message"] == (
        "`prompt_name` 'questions' is not a prompt of model 'fake'; its prompts: 'document', 'long', 'query'"
    )
    r = client.post("/v1/embeddings", json={"model": "plain", "input": "x", "prompt_name": "query"})
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "`prompt_name` 'query' is not a prompt of model 'plain'; its prompts: none"


def test_prompt_name_and_input_type_together_are_refused(client):
    r = post(client, input="hello", prompt_name="query", input_type="document")
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "give `prompt_name` or `input_type`, not both"


def test_unknown_input_type_is_refused(client):
    r = post(client, input="hello", input_type="questions")
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "input_type" and "Invalid enum value 'questions'" in err["message"]


def test_default_prompt_applies_when_the_request_names_none(client):
    r = client.post("/v1/embeddings", json={"model": "cutting", "input": "hello"})
    assert r.status_code == 200
    assert r.headers["x-prompt-name"] == "query"
    assert r.json()["usage"]["total_tokens"] == 4


def test_models_list_their_prompts(client):
    cards = {c["id"]: c for c in client.get("/v1/models").json()["data"]}
    long = "a b c d e f g h i j k l m n "
    assert cards["fake"]["prompts"] == {"query": "query: ", "document": "passage: ", "long": long}
    assert cards["fake"]["default_prompt_name"] is None
    assert cards["cutting"]["default_prompt_name"] == "query" and cards["cutting"]["truncate"] == "start"
    assert cards["plain"]["prompts"] == {} and cards["plain"]["truncate"] is False


def test_prompt_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"`\$\.models\.m\.default_prompt_name`: 'q' is not one of the model's"):
        parse_config('[models.m]\nbackend = "fake"\npath = "."\nprompts = {d = "x"}\ndefault_prompt_name = "q"\n')
    with pytest.raises(ConfigError, match=r"`\$\.models\.m\.prompts`: a prompt name must not be empty"):
        parse_config('[models.m]\nbackend = "fake"\npath = "."\nprompts = {"" = "x"}\n')
    with pytest.raises(ConfigError, match=r"`\$\.models\.m\.truncate`"):
        parse_config('[models.m]\nbackend = "fake"\npath = "."\ntruncate = "middle"\n')


LONG = " ".join("w" * (i % 9 + 1) for i in range(40))  # 40 words: 42 ids, over the fake's 16


def test_over_long_input_is_refused_unless_truncating(client):
    r = post(client, input=LONG)
    assert r.status_code == 400
    assert r.json()["error"]["message"] == (
        "`input` has 42 tokens; model 'fake' accepts at most 16 tokens per input (set `truncate` to embed a part of it)"
    )


@pytest.mark.parametrize("truncate", [True, "end"])
def test_truncate_end_keeps_the_start_and_the_closing_token(client, truncate):
    words = [len(w) for w in LONG.split()]
    r = post(client, input=[LONG, "short one"], truncate=truncate)
    assert r.status_code == 200
    assert r.headers["x-truncated-inputs"] == "1"
    first, second = (d["embedding"] for d in r.json()["data"])
    np.testing.assert_allclose(first, ids_vector([101, *words[:14], 102]), atol=1e-8)
    np.testing.assert_allclose(second, ids_vector([101, 5, 3, 102]), atol=1e-8)
    assert r.json()["usage"]["total_tokens"] == 16 + 4  # what was embedded


def test_truncate_start_keeps_the_end_and_the_prompt(client):
    words = [len(w) for w in LONG.split()]
    r = post(client, input=LONG, truncate="start", prompt_name="query")
    assert r.status_code == 200
    assert r.headers["x-truncated-inputs"] == "1"
    np.testing.assert_allclose(r.json()["data"][0]["embedding"], ids_vector([101, 6, *words[-13:], 102]), atol=1e-8)
    assert r.json()["usage"]["total_tokens"] == 16


def test_model_default_truncation_and_a_request_turning_it_off(client):
    r = client.post("/v1/embeddings", json={"model": "cutting", "input": LONG})
    assert r.status_code == 200 and r.headers["x-truncated-inputs"] == "1"
    r = client.post("/v1/embeddings", json={"model": "cutting", "input": LONG, "truncate": False})
    assert r.status_code == 400 and r.json()["error"]["code"] == "input_too_long"
    r = client.post("/v1/embeddings", json={"model": "cutting", "input": "short"})
    assert r.headers["x-truncated-inputs"] == "0"


def test_a_prompt_longer_than_the_limit_cannot_be_cut_from_the_start(client):
    r = post(client, input=LONG, truncate="start", prompt_name="long")
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "prompt_name"
    assert err["message"] == "`input` cannot be cut to 16 tokens: its prompt takes 14 of them"


def test_truncation_is_refused_for_a_backend_that_embeds_text(client):
    r = client.post("/v1/embeddings", json={"model": "plain", "input": LONG, "truncate": True})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "truncate" and err["code"] == "truncation_not_supported"
    assert err["message"] == (
        "`input` has 42 tokens, over the limit of 16, and model 'plain' cannot truncate: its backend embeds the "
        "text itself, not the token ids the gateway would cut"
    )
    r = client.post("/v1/embeddings", json={"model": "plain", "input": "short", "truncate": True})
    assert r.status_code == 200 and r.headers["x-truncated-inputs"] == "0"


def test_unknown_truncation_side_is_refused(client):
    r = post(client, input="x", truncate="middle")
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "truncate"


def _calibration(dims=32):
    """What the gateway calibrates with: the bundled corpus's fake vectors (those within 16 tokens)."""
    texts = [t for t in calibration_texts() if len(t.split()) + 2 <= 16]
    vectors = np.stack([ids_vector([101, *(len(w) for w in t.split()), 102]) for t in texts])[:, :dims]
    return Ranges.fit(vectors / np.linalg.norm(vectors, axis=1, keepdims=True))


TEXTS = ["hello world", "a b c", "quantized vectors are small"]


def _floats(client, **extra):
    r = post(client, input=TEXTS, **extra)
    assert r.status_code == 200
    return np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)


@pytest.mark.parametrize("kind", ["int8", "uint8", "binary", "ubinary"])
def test_compact_types_as_json_integers_and_as_base64(client, kind):
    floats = _floats(client)
    expected = quantize(floats, kind, _calibration() if kind in ("int8", "uint8") else None)
    as_json = post(client, input=TEXTS, encoding_format=kind)
    assert as_json.status_code == 200
    got = np.array([d["embedding"] for d in as_json.json()["data"]])
    np.testing.assert_array_equal(got, expected)
    same = post(client, input=TEXTS, embedding_type=kind)
    assert [d["embedding"] for d in same.json()["data"]] == got.tolist()
    packed = post(client, input=TEXTS, encoding_format="base64", embedding_type=kind)
    assert packed.status_code == 200
    raw = [np.frombuffer(base64.b64decode(d["embedding"]), dtype=expected.dtype) for d in packed.json()["data"]]
    np.testing.assert_array_equal(np.stack(raw), expected)
    assert len(base64.b64decode(packed.json()["data"][0]["embedding"])) == (4 if kind in ("binary", "ubinary") else 32)
    assert as_json.json()["usage"] == packed.json()["usage"]


def test_binary_is_the_sign_bits_packed_as_sentence_transformers_does(client):
    floats = _floats(client)
    ubin = np.array([d["embedding"] for d in post(client, input=TEXTS, encoding_format="ubinary").json()["data"]])
    bits = np.unpackbits(ubin.astype(np.uint8), axis=1)
    np.testing.assert_array_equal(bits, (floats > 0).astype(np.uint8))
    binary = np.array([d["embedding"] for d in post(client, input=TEXTS, encoding_format="binary").json()["data"]])
    np.testing.assert_array_equal(binary, ubin - 128)


def test_int8_follows_dimensions_with_ranges_of_the_cut_vectors(client):
    floats = _floats(client, dimensions=16)
    r = post(client, input=TEXTS, dimensions=16, encoding_format="int8")
    got = np.array([d["embedding"] for d in r.json()["data"]])
    assert got.shape == (3, 16)
    np.testing.assert_array_equal(got, quantize(floats, "int8", _calibration(16)))
    r = post(client, input=TEXTS, dimensions=16, encoding_format="base64", embedding_type="binary")
    assert len(base64.b64decode(r.json()["data"][0]["embedding"])) == 2


def test_int8_dequantizes_close_to_the_floats(client):
    floats = _floats(client)
    ranges = _calibration()
    got = np.array([d["embedding"] for d in post(client, input=TEXTS, encoding_format="uint8").json()["data"]])
    back = got * ranges.steps + ranges.starts
    # Within half a step of the float, once values beyond the calibrated range are clipped to its ends.
    clipped = np.clip(floats, ranges.starts, ranges.starts + 255 * ranges.steps)
    assert (np.abs(back - clipped) <= ranges.steps / 2 + 1e-6).all()


def test_contradicting_output_types_and_bad_dimensions_are_refused(client):
    r = post(client, input="x", encoding_format="int8", embedding_type="binary")
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "embedding_type"
    assert err["message"].startswith("`embedding_type` 'binary' contradicts `encoding_format` 'int8'")
    r = post(client, input="x", encoding_format="binary", dimensions=12)
    assert r.status_code == 400 and r.json()["error"]["param"] == "dimensions"
    r = post(client, input="x", embedding_type="int4")
    assert r.status_code == 400 and r.json()["error"]["param"] == "embedding_type"
    r = client.post("/v1/embeddings", json={"model": "plain", "input": "x", "encoding_format": "int8", "dimensions": 4})
    assert r.status_code == 400 and r.json()["error"]["code"] == "dimensions_not_supported"


def test_calibration_runs_once_per_model_through_its_batches():
    FakeBackend.batches = []
    with serve(TOML) as c:
        rs = [post(c, input=f"text {i}", encoding_format="int8") for i in range(3)]
        assert all(r.status_code == 200 for r in rs)
        calibration = [b for b in FakeBackend.batches if len(b) > 1]
        assert sum(len(b) for b in calibration) == len([t for t in calibration_texts() if len(t.split()) + 2 <= 16])


def test_calibrate_at_load_embeds_the_corpus_before_any_int8_request():
    toml = TOML.replace(
        '[models.plain]\nbackend = "fake"\npath = "."\n',
        '[models.plain]\nbackend = "fake"\npath = "."\ncalibrate = "load"\n',
    )
    assert 'calibrate = "load"' in toml
    texts = [t for t in calibration_texts() if len(t.split()) + 2 <= 16]
    FakeBackend.batches = []
    with serve(toml) as c:
        deadline = time.monotonic() + 10
        while sum(len(b) for b in FakeBackend.batches) < len(texts):
            assert time.monotonic() < deadline, "no calibration at load"
            time.sleep(0.02)
        # Only the model configured for it calibrated; an int8 request then computes nothing more than its input.
        assert sum(len(b) for b in FakeBackend.batches) == len(texts)
        FakeBackend.batches = []
        r = post(c, model="plain", input="after load", encoding_format="int8")
        assert r.status_code == 200 and FakeBackend.batches == [["after load"]]


def test_calibrate_takes_load_or_first_use():
    with pytest.raises(ConfigError, match=r"`\$\.models\.m\.calibrate`"):
        parse_config('[models.m]\nbackend = "fake"\ncalibrate = "sometimes"\n')


def test_created_is_unix_seconds_as_a_float(client):
    before = time.time()
    r = post(client, input="x")
    raw = r.text
    created = r.json()["created"]
    assert isinstance(created, float) and created.is_integer()
    assert int(before) <= created <= time.time()
    assert f'"created":{created!r}' in raw  # 1705329600.0, with its fraction written
