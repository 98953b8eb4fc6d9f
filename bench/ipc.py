"""What the front-to-runtime link costs per request (`[server] workers` > 1), in CPU on each side.

    .venv/bin/python bench/ipc.py [--calls 3000] [--width 384] [--in-flight 1,32]

Starts a runtime-side server in a subprocess (gateway/processes/runtime_process.py's RuntimeServer, its `embed` call
answered with constant vectors: no model, no batcher) and calls it from this process with gateway/
runtime_link.py's client, exactly the messages a front sends: the decoded request, the key's digest, and back
float32 vectors with their notes. Prints microseconds of process CPU per call on each side, for a 1-text
and a 32-text request, one call at a time and with calls in flight together.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _server(socket_path: str, width: int) -> None:
    import msgspec
    import numpy as np

    from gateway.processes import runtime_process
    from gateway.runtime.link import EmbedArgs, Vectors

    async def embed(gw: Any, raw: msgspec.Raw, notes: dict[str, Any]) -> Vectors:
        args = msgspec.msgpack.decode(raw, type=EmbedArgs)
        texts = [args.body.input] if isinstance(args.body.input, str) else args.body.input
        notes.update(model="m", served_by="m", tokens=len(texts), inputs=len(texts), headers={"X-Cache-Hits": "0"})
        rows = np.full((len(texts), width), 0.5, np.float32)
        return Vectors(rows.tobytes(), len(texts), len(texts), "float", False, None, None, notes)

    async def cpu(gw: Any, raw: msgspec.Raw, notes: dict[str, Any]) -> float:
        return time.process_time()

    runtime_process.OPS.update(embed=embed, cpu=cpu)

    async def main() -> None:
        server = runtime_process.RuntimeServer(None)  # type: ignore[arg-type]
        await asyncio.start_unix_server(server.connection, socket_path, limit=1 << 30)
        print("ready", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


async def _measure(socket_path: str, calls: int, texts: int, in_flight: int) -> dict[str, float]:
    from gateway.base.schemas import EmbeddingRequest
    from gateway.runtime.link import EmbedArgs, RuntimeLink

    link = RuntimeLink(socket_path)
    body = EmbeddingRequest(model="m", input=["a sentence of about ten words, as a query would be"] * texts)
    args = EmbedArgs(body, b"\x01" * 32, None)
    for _ in range(200):  # warm-up
        await link.embed(args)

    async def worker(n: int) -> None:
        for _ in range(n):
            await link.embed(args)

    server_before = await link.call("cpu", None, float)
    before, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(calls // in_flight) for _ in range(in_flight)))
    client_cpu, wall = time.process_time() - before, time.perf_counter() - wall
    server_cpu = await link.call("cpu", None, float) - server_before
    await link.close()
    done = calls // in_flight * in_flight
    return {
        "texts": texts,
        "in_flight": in_flight,
        "front_us": round(client_cpu / done * 1e6, 1),
        "runtime_us": round(server_cpu / done * 1e6, 1),
        "wall_us": round(wall / done * 1e6, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--width", type=int, default=384, help="vector width (MiniLM: 384)")
    parser.add_argument("--in-flight", default="1,32")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        _server(args.serve, args.width)
        return
    folder = tempfile.mkdtemp(prefix="gateway-ipc-")
    path = os.path.join(folder, "runtime.sock")
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", path, "--width", str(args.width)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        for texts in (1, 32):
            for in_flight in (int(n) for n in args.in_flight.split(",")):
                print(json.dumps(asyncio.run(_measure(path, args.calls, texts, in_flight))), flush=True)
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    main()
