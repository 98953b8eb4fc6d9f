"""The real Cohere client, unmodified, against a running gateway: `ClientV2.rerank` posts /v2/rerank and reads
our answer; a bad request raises its own error type with our message."""

from __future__ import annotations

import pytest

from ..conftest import API_KEY, fake_score, make_app, uvicorn_server

cohere = pytest.importorskip("cohere")  # the lock's test extra installs it

TOML = '[models.ranker]\nbackend = "fake-rerank"\npath = "."\ntask = "rerank"\n'


def test_cohere_client_v2_rerank():
    with uvicorn_server(make_app(TOML)) as (url, _):
        client = cohere.ClientV2(base_url=url, api_key=API_KEY)
        docs = ["cats sleep all day", "dogs bark", "where do cats sleep"]
        got = client.rerank(model="ranker", query="where do cats sleep", documents=docs, top_n=2)
        want = sorted(range(3), key=lambda i: -fake_score("where do cats sleep", docs[i]))[:2]
        assert [r.index for r in got.results] == want
        assert got.results[0].relevance_score >= got.results[1].relevance_score
        assert got.meta is not None and got.meta.billed_units.search_units == 1
        with pytest.raises(cohere.BadRequestError) as err:
            client.rerank(model="ranker", query="q", documents=[])
        assert "`documents`" in str(err.value.body)
