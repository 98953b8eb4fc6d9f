"""A real upstream for the remote backend's tests: this gateway, started as its own process on a free port."""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def serve_process(config: Path, log: Path, *args: str) -> subprocess.Popen[bytes]:
    """`python -m gateway serve --config CONFIG [ARGS...]` as a real server process, offline, its output appended
    to `log`, with only the keys its config names (GATEWAY_API_KEYS is left out of its environment)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("GATEWAY_API_KEYS", None)
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(config), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
        )


UPSTREAM_KEY = "upstream-key-123"
#: A key the upstream limits to one request a minute: its second request gets the upstream's 429.
LIMITED_KEY = "limited-key-1234"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Upstream:
    """`python -m gateway serve` on `port` with wordllama and the int8 MiniLM (and `models`, more TOML tables);
    start, kill, start again."""

    def __init__(self, tmp: Path, port: int | None = None, models: str = "") -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = tmp / f"upstream-{self.port}.toml"
        self.log = tmp / f"upstream-{self.port}.log"
        self.config.write_text(
            textwrap.dedent(
                f"""
                [server]
                port = {self.port}
                access_log = false
                [auth]
                api_keys = ["{UPSTREAM_KEY}"]
                [[auth.keys]]
                key = "{LIMITED_KEY}"
                requests_per_minute = 1
                [models.wordllama]
                backend = "wordllama"
                path = "pkg:wordllama"
                [models.minilm-int8]
                backend = "onnx"
                path = "{ROOT / "models" / "minilm-onnx-int8"}"
                """
            )
            + textwrap.dedent(models)
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> Upstream:
        self.proc = serve_process(self.config, self.log)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{self.url}/ready", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"upstream did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL, as a crashed host would go: no graceful shutdown, connections reset."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None

    def embed(self, model: str, texts: list[str]) -> dict:
        """The upstream's own answer, asked directly (base64)."""
        r = httpx.post(
            f"{self.url}/v1/embeddings",
            json={"model": model, "input": texts, "encoding_format": "base64"},
            headers={"Authorization": f"Bearer {UPSTREAM_KEY}"},
            timeout=30,
        )
        r.raise_for_status()
        return r.json()


class ScriptedUpstream:
    """A tiny OpenAI-shaped upstream in a thread, answering what the test sets: vectors of `dimension` ones,
    `usage` as given (None: no usage), and a body trickled `trickle` bytes every `every_s` seconds."""

    def __init__(self, dimension: int = 4) -> None:
        import http.server
        import json
        import threading

        import numpy as np

        self.dimension = dimension
        self.usage: dict | None = None
        self.trickle: int | None = None
        self.every_s = 0.0
        me = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_POST(self) -> None:
                texts = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["input"]
                one = base64.b64encode(np.ones(me.dimension, "<f4").tobytes()).decode()
                reply: dict = {"data": [{"embedding": one, "index": i} for i in range(len(texts))]}
                if me.usage is not None:
                    reply["usage"] = me.usage
                body = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                step = me.trickle or len(body)
                for at in range(0, len(body), step):
                    try:
                        self.wfile.write(body[at : at + step])
                        self.wfile.flush()
                    except OSError:  # the client gave up
                        return
                    if me.trickle:
                        time.sleep(me.every_s)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
