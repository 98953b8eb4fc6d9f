"""Rerank with `[server] workers` > 1: the fronts hand each query to the runtime process, which scores the pairs
of every front in its batches; the answer equals sentence-transformers' on the same folder."""

from __future__ import annotations

import httpx

from ..parity.zoo import build_cross_encoder
from .test_workers import ADMIN, LIMIT, LIMITED, Cluster


def test_rerank_through_the_runtime_process(tmp_path):
    from sentence_transformers import CrossEncoder

    folder = build_cross_encoder(tmp_path / "ce")
    toml = f"""
    [auth]
    api_keys = ["{ADMIN}"]
    [[auth.keys]]
    key = "{LIMITED}"
    requests_per_minute = {LIMIT}
    [models.ranker]
    backend = "torch"
    path = "{folder}"
    """
    cluster = Cluster(tmp_path, toml=toml)
    try:
        docs = ["the capital of france is paris", "dogs bark", "paris"]
        want = CrossEncoder(str(folder), device="cpu").predict([("capital of france", d) for d in docs])
        auth = {"Authorization": f"Bearer {ADMIN}"}
        for _ in range(4):  # new connections: the kernel spreads them over both fronts
            r = httpx.post(
                f"{cluster.url}/v2/rerank",
                json={"model": "ranker", "query": "capital of france", "documents": docs},
                headers=auth,
                timeout=60,
            )
            assert r.status_code == 200, r.text
            got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
            assert max(abs(got[i] - float(want[i])) for i in range(3)) <= 1e-4
        r = httpx.post(f"{cluster.url}/rerank", json={"query": "q", "texts": [""]}, headers=auth, timeout=60)
        assert r.status_code == 400 and r.json()["error_type"] == "Validation", r.text
        r = httpx.post(f"{cluster.url}/v1/embeddings", json={"model": "ranker", "input": "x"}, headers=auth, timeout=60)
        assert r.status_code == 400 and "is a rerank model" in r.json()["error"]["message"]
        # The limited key's requests are counted once each, across the fronts.
        limited = {"Authorization": f"Bearer {LIMITED}"}
        codes = [
            httpx.post(f"{cluster.url}/rerank", json={"query": "q", "texts": ["a"]}, headers=limited).status_code
            for _ in range(LIMIT + 1)
        ]
        assert codes == [200] * LIMIT + [429], codes
    finally:
        cluster.stop()
