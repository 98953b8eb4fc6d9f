"""The Batch API against a real crash: `gateway serve` killed (SIGKILL, no shutdown) mid-job, started again on the
same data folder, finishes the job with every line exactly once and the vectors of an uninterrupted run."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import textwrap
from pathlib import Path

import httpx
import numpy as np
import openai

from ..conftest import wait_until
from ..upstream import free_port, serve_process

KEY = "batch-kill-key-1"
N = 3000


def _start(config: Path, log: Path, url: str) -> subprocess.Popen[bytes]:
    proc = serve_process(config, log)

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway serve exited: {log.read_text()[-3000:]}")
        try:
            return httpx.get(f"{url}/ready", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(ready, f"the server on {url} ready ({log})", 120)
    return proc


def test_a_killed_gateway_finishes_the_job_on_restart(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config, log = tmp_path / "gateway.toml", tmp_path / "gateway.log"
    # wordllama is real and fast; one line a chunk makes thousands of chunks, so the kill lands mid-job.
    config.write_text(
        textwrap.dedent(
            f"""
            [server]
            port = {port}
            access_log = false
            [auth]
            api_keys = ["{KEY}"]
            [batches]
            data_dir = "{tmp_path / "data"}"
            chunk_lines = 1
            [models.wordllama]
            backend = "wordllama"
            path = "pkg:wordllama"
            """
        )
    )
    texts = [f"line {i} of a corpus about {'cats' if i % 2 else 'ships'} and number {i * 7}" for i in range(N)]
    data = b"".join(
        json.dumps(
            {
                "custom_id": f"c{i}",
                "method": "POST",
                "url": "/v1/embeddings",
                "body": {"model": "wordllama", "input": t},
            }
        ).encode()
        + b"\n"
        for i, t in enumerate(texts)
    )
    proc = _start(config, log, url)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        uploaded = client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
        batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
        wait_until(lambda: client.batches.retrieve(batch.id).request_counts.completed > 0, "a chunk done", 60)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        proc = _start(config, log, url)
        counts = client.batches.retrieve(batch.id).request_counts
        assert 0 < counts.completed < N, counts  # killed mid-job
        wait_until(lambda: client.batches.retrieve(batch.id).status == "completed", "the job done", 180)
        done = client.batches.retrieve(batch.id)
        assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (N, N, 0)
        assert done.error_file_id is None
        out = [json.loads(x) for x in client.files.content(done.output_file_id).content.splitlines()]
        ids = [x["custom_id"] for x in out]
        assert len(ids) == N and set(ids) == {f"c{i}" for i in range(N)}  # each exactly once
        vectors = {x["custom_id"]: x["response"]["body"]["data"][0]["embedding"] for x in out}
        got = np.array([vectors[f"c{i}"] for i in range(N)])
        want = np.array(
            [
                d.embedding
                for start in range(0, N, 1000)
                for d in client.embeddings.create(
                    model="wordllama", input=texts[start : start + 1000], encoding_format="float"
                ).data
            ]
        )
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
