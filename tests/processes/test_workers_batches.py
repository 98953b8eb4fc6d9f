"""The Batch API with `[server] workers` = 2: the fronts write files and rows, the runtime process runs the job."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import openai

from ..conftest import wait_until
from .test_workers import ADMIN, Cluster

TOML = f"""
[auth]
api_keys = ["{ADMIN}"]
[models.wordllama]
backend = "wordllama"
path = "pkg:wordllama"
[models.local]
backend = "wordllama"
path = "pkg:wordllama"
copies = "per-worker"
"""


def test_a_job_runs_at_the_runtime_and_equals_the_embeddings_route(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, extra=f'[batches]\ndata_dir = "{tmp_path / "batches"}"\nchunk_lines = 8\n', toml=TOML)
    try:
        client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key=ADMIN, max_retries=0)
        texts = [f"sentence number {i} about batches" for i in range(40)]
        lines = [
            {
                "custom_id": f"c{i}",
                "method": "POST",
                "url": "/v1/embeddings",
                "body": {"model": "wordllama", "input": t},
            }
            for i, t in enumerate(texts)
        ]
        lines.append(
            {"custom_id": "copy", "method": "POST", "url": "/v1/embeddings", "body": {"model": "local", "input": "x"}}
        )
        data = b"".join(json.dumps(x).encode() + b"\n" for x in lines)
        uploaded = client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
        batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
        wait_until(lambda: client.batches.retrieve(batch.id).status == "completed", "the job done", 120)
        done = client.batches.retrieve(batch.id)
        assert (done.request_counts.completed, done.request_counts.failed) == (40, 1)
        out = {
            x["custom_id"]: x["response"]["body"]["data"][0]["embedding"]
            for x in map(json.loads, client.files.content(done.output_file_id).content.splitlines())
        }
        direct = client.embeddings.create(model="wordllama", input=texts, encoding_format="float")
        np.testing.assert_allclose(
            np.array([out[f"c{i}"] for i in range(40)]), np.array([d.embedding for d in direct.data]), atol=1e-6
        )
        (error,) = map(json.loads, client.files.content(done.error_file_id).content.splitlines())
        assert error["custom_id"] == "copy" and error["error"]["code"] == "model_not_in_runtime"
        assert "per-worker" in error["error"]["message"]
    finally:
        cluster.stop()
