"""Every bad request gets a clear OpenAI-shaped error (fake backend: this is about the core)."""

from __future__ import annotations

import time

import pytest

from ..conftest import AUTH, FAKE_TOML, serve

URL = "/api/v3/inference/embeddings"


def _error(r, status):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_missing_key(fake_client):
    r = fake_client.post(URL, json={"model": "fake", "input": "x"}, headers={"Authorization": ""})
    err = _error(r, 401)
    assert err["type"] == "authentication_error" and "missing API key" in err["message"]


@pytest.mark.parametrize("header", ["Bearer nope", "Basic dGVzdA==", "Bearer", "test-key"])
def test_wrong_key(fake_client, header):
    err = _error(fake_client.post(URL, json={"model": "fake", "input": "x"}, headers={"Authorization": header}), 401)
    assert "API key" in err["message"] or "Authorization" in err["message"]


def test_auth_checked_before_body(fake_client):
    r = fake_client.post(URL, content=b"{not json", headers={"Authorization": "Bearer nope"})
    _error(r, 401)


def test_unknown_model_lists_available(fake_client):
    err = _error(fake_client.post(URL, json={"model": "gpt-9", "input": "x"}), 404)
    assert err["param"] == "model" and err["code"] == "model_not_found"
    assert "'gpt-9' not found" in err["message"] and "available models: fake" in err["message"]


def test_alias_is_served_and_echoed(fake_client):
    r = fake_client.post(URL, json={"model": "fake-alias", "input": "x"})
    assert r.status_code == 200 and r.json()["model"] == "fake-alias"


@pytest.mark.parametrize(
    ("payload", "param", "needle"),
    [
        ({"model": "fake", "input": ""}, "input", "`input` is an empty string"),
        ({"model": "fake", "input": []}, "input", "must not be an empty list"),
        ({"model": "fake", "input": ["ok", ""]}, "input[1]", "`input[1]` is an empty string"),
        ({"model": "fake", "input": ["ok", 3]}, "input[1]", "`input[1]` is not a string"),
        ({"model": "fake", "input": [[1, 2, 3]]}, "input[0]", "token-id arrays are not accepted"),
        ({"model": "fake", "input": None}, "input", "Expected `str | array`, got `null`"),
        ({"model": "fake"}, "input", "missing required field `input`"),
        ({"input": "x"}, "model", "missing required field `model`"),
        ({"model": 7, "input": "x"}, "model", "Expected `str`, got `int`"),
        ({"model": "fake", "input": "x", "temperature": 1}, "temperature", "unknown field `temperature`"),
        ({"model": "fake", "input": "x", "encoding_format": "int4"}, "encoding_format", "Invalid enum value 'int4'"),
        ({"model": "fake", "input": "x", "dimensions": "eight"}, "dimensions", "Expected `int | null`, got `str`"),
        ({"model": "fake", "input": "x", "dimensions": 3}, "dimensions", "allowed: [2, 4, 8]"),
        ({"model": "fake", "input": "x", "dimensions": 16}, "dimensions", "larger than the model's dimension 8"),
    ],
)
def test_invalid_request(fake_client, payload, param, needle):
    err = _error(fake_client.post(URL, json=payload), 400)
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    assert needle in err["message"], err["message"]


def test_input_over_limit_names_count_and_limit(fake_client):
    words = " ".join(["w"] * 20)
    err = _error(fake_client.post(URL, json={"model": "fake", "input": ["a", words]}), 400)
    assert err["message"] == (
        "`input[1]` has 22 tokens; model 'fake' accepts at most 16 tokens per input "
        "(set `truncate` to embed a part of it)"
    )


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"{not json", "not valid JSON"),
        (b'{"model": "fake", "input": ', "not valid JSON: it ends early"),
        (b"", "request body is empty"),
        (b"[1, 2]", "must be a JSON object"),
        (b'"just a string"', "must be a JSON object"),
        (b'{"model": "fake", "input": "a\\ud800b"}', "unpaired UTF-16 surrogate"),
        (b'{"model": "fake", "input": "a\\udc00b"}', "unpaired UTF-16 surrogate"),
        (b'{"model": "fake", "input": "a\xffb"}', "not valid UTF-8: invalid start byte"),
        (b'{"model": "fake", "input": "x"} {}', "trailing characters after the JSON value at line 1, column 33"),
        (b'{"model": "fake",\n "input": NaN}', "NaN and Infinity are not JSON numbers"),
        (b'{"model": "fake",\n "input" "x"}', "unexpected character at line 2, column 10"),
        (b" \n ", "request body is empty"),
    ],
)
def test_malformed_json(fake_client, body, needle):
    err = _error(fake_client.post(URL, content=body, headers={"Content-Type": "application/json"}), 400)
    assert err["type"] == "invalid_request_error"
    assert err["code"] == ("invalid_value" if needle == "must be a JSON object" else "invalid_json")
    assert needle in err["message"]


class _Gibberish:
    """A decoder that fails the way any msgspec version might, in words nobody can parse."""

    def decode(self, body):
        import msgspec

        raise msgspec.ValidationError("zut alors") if body.startswith(b"{") else msgspec.DecodeError("kaputt")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"model": "m", "input": ["ok", 3]}', "`input[1]` is not a string"),
        (b'{"model": "m", "input": []}', "`input` must not be an empty list"),
        (b'{"model": "m", "input": "x", "dimensions": "eight"}', "Expected `int | null`, got `str` - at `dimensions`"),
        (b'{"model": "m", "input": "x", "dimensions": 0}', "`dimensions` must be a positive integer"),
        # Each field takes the JSON type the schema states, nothing that merely converts to it.
        (b'{"model": "m", "input": "x", "dimensions": "8"}', "Expected `int | null`, got `str` - at `dimensions`"),
        (b'{"model": "m", "input": "x", "dimensions": 8.0}', "Expected `int | null`, got `float` - at `dimensions`"),
        (b'{"model": "m", "input": "x", "truncate": 0}', "Expected `bool | str | null`, got `int` - at `truncate`"),
        (b'{"model": "m"}', "invalid request: Object missing required field `input`"),
        (b'{"model": "m", "input": "x", "seed": 1}', "invalid request: Object contains unknown field `seed`"),
        (
            b'{"model": "m", "input": "x", "encoding_format": "int4"}',
            "Invalid enum value 'int4' - at `encoding_format`",
        ),
        (b'{"model": "m", "input": ', "request body is not valid JSON: it ends early"),
        (b'{"model": "m", "input": "\xff"}', "request body is not valid UTF-8: invalid start byte"),
    ],
)
def test_messages_do_not_come_from_the_decoders_wording(body, message):
    """What a client reads is worked out from the body itself: a decoder's own error text never reaches it."""
    from gateway.api.decoding import BodyDecoder
    from gateway.base.errors import GatewayError
    from gateway.base.schemas import EmbeddingRequest

    decoder = BodyDecoder(EmbeddingRequest)
    decoder._decoder = _Gibberish()  # type: ignore[assignment]
    with pytest.raises(GatewayError) as caught:
        decoder.decode(body)
    assert caught.value.status == 400 and message in caught.value.message
    assert "zut" not in caught.value.message and "kaputt" not in caught.value.message


def test_token_id_arrays_are_refused_with_a_hint(fake_client):
    err = _error(fake_client.post(URL, json={"model": "fake", "input": [[101, 7592, 102]]}), 400)
    assert err["param"] == "input[0]" and "token-id arrays are not accepted" in err["message"]


def test_huge_input_is_refused_before_tokenizing():
    toml = "[server]\nmax_input_chars = 50\n" + FAKE_TOML
    with serve(toml) as client:
        err = _error(client.post(URL, json={"model": "fake", "input": ["ok", "x" * 51]}), 400)
        assert err["message"] == "`input[1]` has 51 characters; the limit is 50 characters per input"


def test_request_larger_than_the_queue_is_a_400():
    with serve(FAKE_TOML + "[models.fake.batching]\nmax_queue = 3\n") as client:
        err = _error(client.post(URL, json={"model": "fake", "input": ["a", "b", "c", "d"]}), 400)
        assert "queues at most 3 inputs" in err["message"]


def test_401_carries_a_bearer_challenge(fake_client):
    r = fake_client.post(URL, json={"model": "fake", "input": "x"}, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"


def test_too_many_items():
    toml = "[server]\nmax_items_per_request = 3\n" + FAKE_TOML
    with serve(toml) as client:
        err = _error(client.post(URL, json={"model": "fake", "input": ["a", "b", "c", "d"]}), 400)
        assert "4 items" in err["message"] and "limit is 3" in err["message"]


def test_too_many_tokens_per_request():
    toml = "[server]\nmax_tokens_per_request = 10\n" + FAKE_TOML
    with serve(toml) as client:
        err = _error(client.post(URL, json={"model": "fake", "input": ["a b c", "d e f", "g h"]}), 400)
        assert err["code"] == "too_many_tokens" and "14 tokens" in err["message"] and "limit is 10" in err["message"]


def test_body_too_large():
    toml = "[server]\nmax_body_bytes = 1000\n" + FAKE_TOML
    with serve(toml) as client:
        err = _error(client.post(URL, json={"model": "fake", "input": "x" * 5000}), 413)
        assert "too large" in err["message"]


def test_body_too_large_without_a_content_length():
    # Sent in chunks, so only the bytes that arrive tell: refused once past the limit.
    toml = "[server]\nmax_body_bytes = 1000\n" + FAKE_TOML
    with serve(toml) as client:
        chunks = (b'{"model": "fake", "input": "', *[b"x" * 400] * 4, b'"}')
        r = client.post(URL, content=iter(chunks), headers={"Content-Type": "application/json"})
        assert "content-length" not in r.request.headers
        assert "too large" in _error(r, 413)["message"]


def test_unknown_route_and_method(fake_client):
    assert "no route" in _error(fake_client.get("/v2/nothing"), 404)["message"]
    for method in ("GET", "PUT", "DELETE", "PATCH"):
        r = fake_client.request(method, URL)
        assert _error(r, 405)["message"] == "Method Not Allowed"
        assert r.headers["allow"] == "POST, OPTIONS"
    r = fake_client.options("/v1/embeddings")
    assert r.status_code == 204 and set(r.headers["allow"].split(", ")) == {"POST", "OPTIONS"}
    assert fake_client.head(URL).status_code == 405


def test_a_client_gone_while_sending_its_body_is_a_499_and_nothing_breaks():
    import httpx

    from ..conftest import make_app, partial_request, uvicorn_server

    with uvicorn_server(make_app(FAKE_TOML)) as (url, _):
        with partial_request(url, 500, '{"model": "fake", ', URL):
            time.sleep(0.2)
        r = httpx.post(f"{url}{URL}", json={"model": "fake", "input": "still here"}, headers=AUTH, timeout=10)
        assert r.status_code == 200
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            metrics = httpx.get(f"{url}/metrics", headers=AUTH, timeout=10).text
            if 'status_code="499"' in metrics:
                break
            time.sleep(0.05)
        series = 'method="POST",path="/api/v3/inference/embeddings",status_code="499"'
        assert f'gateway_http_requests_total{{app_name="gateway",{series}}} 1.0' in metrics


def test_failing_batch_is_a_500_with_an_id_and_the_server_keeps_serving():
    toml = FAKE_TOML + '\n[models.fake.options]\nfail_on = "explode"\n'
    with serve(toml) as client:
        err = _error(client.post(URL, json={"model": "fake", "input": ["fine", "please explode"]}), 500)
        assert err["type"] == "api_error" and "error id" in err["message"] and err["code"]
        assert "Traceback" not in err["message"]
        ok = client.post(URL, json={"model": "fake", "input": "still fine"})
        assert ok.status_code == 200


def test_model_that_fails_to_load_is_503_while_others_serve():
    toml = (
        FAKE_TOML
        + """
    [models.broken]
    backend = "fake"
    path = "."
    [models.broken.options]
    fail_load = true

    [models.missing]
    backend = "fake"
    path = "/nonexistent/model/dir"
    """
    )
    with serve(toml) as client:
        err = _error(client.post(URL, json={"model": "broken", "input": "x"}), 503)
        assert "refuses to load" in err["message"]
        err = _error(client.post(URL, json={"model": "missing", "input": "x"}), 503)
        # The path is cut to its last part: clients need not learn the server's file system.
        assert "model path .../dir does not exist" in err["message"] and "/nonexistent" not in err["message"]
        assert client.post(URL, json={"model": "fake", "input": "x"}).status_code == 200
        ready = client.get("/ready")
        assert ready.status_code == 503
        assert ready.json()["models"] == {"fake": "ready", "broken": "failed", "missing": "failed"}
