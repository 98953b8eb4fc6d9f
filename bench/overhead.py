"""The gateway's own CPU per embedding request, with a model that costs nothing.

    taskset -c 0 .venv/bin/python bench/overhead.py [--clients 32] [--requests 3200] [--rounds 3]
        [--no-access-log] 2>/dev/null

Drives the ASGI app in-process (no sockets, no HTTP parsing) with concurrent single-text requests to a
backend that returns constant vectors, and prints the process CPU time per request: what the framework,
auth, batching, metrics, logging and response encoding cost on top of the runtime. CPU time, not
requests/s, because it barely moves with the machine's noise; compare two trees by running this in each,
one after the other. Pin it to one core (`taskset -c 0`) to keep the scheduler out of the figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from corpus import sentences  # noqa: E402

from gateway import Backend, ModelInfo, hookimpl  # noqa: E402
from gateway.api.app import create_app  # noqa: E402
from gateway.base.config import parse_config  # noqa: E402
from gateway.runtime.plugins import load_plugins  # noqa: E402
from gateway.shared.keys import KeyStore  # noqa: E402

KEY = "overhead-key"


class ZeroCostBackend(Backend):
    """Word counts for tokens, one constant unit vector per text."""

    name = "zero-cost"

    def load(self) -> ModelInfo:
        return ModelInfo(
            dimension=384,
            max_input_tokens=256,
            normalized=True,
            max_batch_size=64,
            pads_to_longest=False,
            local_tokenizer=True,
        )

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return [[101, *range(len(t.split())), 102] for t in texts]

    def embed(self, texts: Sequence[str], token_ids: Sequence[Sequence[int]]) -> np.ndarray:
        vectors = np.zeros((len(texts), 384), np.float32)
        vectors[:, 0] = 1.0
        return vectors


class ZeroCostPlugin:
    @staticmethod
    @hookimpl
    def register_backends(register: Callable[[type[Backend]], None]) -> None:
        register(ZeroCostBackend)


async def _lifespan_startup(app: Any) -> asyncio.Future[None]:
    inbox: asyncio.Queue[dict[str, str]] = asyncio.Queue()
    await inbox.put({"type": "lifespan.startup"})
    started = asyncio.Event()

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "lifespan.startup.complete":
            started.set()

    lifespan = asyncio.ensure_future(app({"type": "lifespan", "state": {}}, inbox.get, send))
    await started.wait()
    return lifespan  # kept referenced: the app's lifespan runs until the process ends


async def _request(app: Any, body: bytes, statuses: dict[int, int]) -> None:
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await asyncio.Event().wait()  # the client never hangs up
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses[message["status"]] = statuses.get(message["status"], 0) + 1

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/embeddings",
        "raw_path": b"/v1/embeddings",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"bench"),
            (b"content-type", b"application/json"),
            (b"authorization", f"Bearer {KEY}".encode()),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }
    await app(scope, receive, send)


async def measure(args: argparse.Namespace) -> None:
    toml = f"[server]\naccess_log = {'false' if args.no_access_log else 'true'}\n"
    toml += f'[models.zero]\nbackend = "zero-cost"\npath = "{ROOT}"\n'
    plugins = load_plugins()
    plugins.register(ZeroCostPlugin)
    app = create_app(parse_config(toml, "overhead.toml", None), plugins=plugins, keys=KeyStore([KEY]))
    lifespan = await _lifespan_startup(app)
    model = app.state.gateway.registry.models["zero"]
    while model.state != "ready":
        await asyncio.sleep(0.01)
    bodies = [json.dumps({"model": "zero", "input": t}).encode() for t in sentences(500)]
    statuses: dict[int, int] = {}
    per_client = max(1, args.requests // args.clients)

    async def client(k: int, n: int) -> None:
        for i in range(n):
            await _request(app, bodies[(k * n + i) % len(bodies)], statuses)

    await asyncio.gather(*(client(k, 20) for k in range(args.clients)))  # warm-up
    figures = []
    for _ in range(args.rounds):
        cpu = time.process_time()
        await asyncio.gather(*(client(k, per_client) for k in range(args.clients)))
        figures.append((time.process_time() - cpu) / (per_client * args.clients) * 1e6)
    assert not lifespan.done()
    bad = {s: n for s, n in statuses.items() if s != 200}
    print(
        f"CPU per request: best {min(figures):.0f} us, median {sorted(figures)[len(figures) // 2]:.0f} us "
        f"({args.clients} clients, {per_client * args.clients} requests x {args.rounds} rounds, "
        f"access log {'off' if args.no_access_log else 'on'}){f'; non-200: {bad}' if bad else ''}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=3200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-access-log", action="store_true")
    args = parser.parse_args()
    import uvloop

    uvloop.run(measure(args))
    # The model's worker threads and the app's lifespan are left to the process exit.
    os._exit(0)


if __name__ == "__main__":
    main()
