"""What a hostile client can do to a running gateway, measured (issue 22's evidence).

    .venv/bin/python bench/hostile.py [--model minilm-onnx-int8] [--seconds 20]

One server (the model alone, two keys) and three attacks, one after the other:
  1. 300 requests, each with a different invented 2000-character method, sent without a key: the size of
     /metrics before and after (and before the first such request, which adds the one OTHER series);
  2. 1000 connections that send half a request line and stop: /health latency while they are open, and how
     many the server has closed after its header deadline;
  3. one key flooding the model (4 threads sending 2048 one-letter inputs per request) while a polite key
     sends one text every 0.2 s: the polite key's statuses and latency percentiles.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as bench  # noqa: E402  (the server helpers of bench/run.py)

FLOOD_KEY, POLITE_KEY = "flood-key-0001", "polite-key-0001"


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))] if values else float("nan")


def invented_methods(port: int) -> dict[str, Any]:
    import httpx

    def size() -> int:
        return len(httpx.get(f"http://127.0.0.1:{port}/metrics").text)

    def invent(i: int) -> None:
        with socket.create_connection(("127.0.0.1", port)) as s:
            method = f"X{i:04d}".ljust(2000, "M")
            s.sendall(f"{method} /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode())
            s.recv(4096)

    fresh = size()
    invent(-1)  # the first one adds the OTHER series, once
    before = size()
    for i in range(300):
        invent(i)
    return {"metrics_bytes_fresh": fresh, "metrics_bytes_before": before, "metrics_bytes_after": size()}


def half_open(port: int, connections: int, header_timeout: float) -> dict[str, Any]:
    import httpx

    socks = []
    for _ in range(connections):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"GET /health HT")
        socks.append(s)
    took = []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
        for _ in range(100):
            t = time.perf_counter()
            client.get("/health")
            took.append(time.perf_counter() - t)
    time.sleep(header_timeout + 1)
    closed = 0
    for s in socks:
        s.settimeout(0.5)
        with contextlib.suppress(OSError):
            closed += s.recv(10) == b""
        s.close()
    return {
        "connections": connections,
        "health_p50_ms": statistics.median(took) * 1000,
        "health_p99_ms": percentile(took, 0.99) * 1000,
        "closed_after_deadline": closed,
    }


def flood_and_polite(port: int, model: str, seconds: float) -> dict[str, Any]:
    import httpx

    stop = time.monotonic() + seconds
    flood_statuses: dict[int, int] = {}
    polite: list[tuple[int, float]] = []
    big = json.dumps({"model": model, "input": ["a"] * 2048})

    def flood() -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
            while time.monotonic() < stop:
                r = c.post("/v1/embeddings", content=big, headers={"Authorization": f"Bearer {FLOOD_KEY}"})
                flood_statuses[r.status_code] = flood_statuses.get(r.status_code, 0) + 1

    threads = [threading.Thread(target=flood) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(1)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
        i = 0
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            r = c.post(
                "/v1/embeddings",
                json={"model": model, "input": f"a polite query number {i}"},
                headers={"Authorization": f"Bearer {POLITE_KEY}"},
            )
            polite.append((r.status_code, time.perf_counter() - t0))
            i += 1
            time.sleep(0.2)
    for t in threads:
        t.join()
    ok = [took for status, took in polite if status == 200]
    return {
        "flood_statuses": flood_statuses,
        "polite_statuses": {s: sum(1 for x, _ in polite if x == s) for s in {x for x, _ in polite}},
        "polite_p50_ms": statistics.median(ok) * 1000 if ok else None,
        "polite_p99_ms": percentile(ok, 0.99) * 1000 if ok else None,
        "polite_max_ms": max(ok) * 1000 if ok else None,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(bench.ROOT / "gateway.toml"))
    p.add_argument("--model", default="minilm-onnx-int8")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--connections", type=int, default=1000)
    p.add_argument("--port", type=int, default=8767)
    args = p.parse_args()
    sys.path.insert(0, str(bench.ROOT))
    from gateway.base.config import load_config

    config = load_config(args.config)
    out = bench.HERE / "results" / (time.strftime("%Y%m%d-%H%M%S") + "-hostile")
    out.mkdir(parents=True)
    cfg = out / "gateway.toml"
    bench.write_model_config(config, args.model, cfg, access_log=True)
    cfg.write_text(
        cfg.read_text().replace("[auth]\napi_keys = []\n", "")
        + f'\n[[auth.keys]]\nkey = "{FLOOD_KEY}"\n\n[[auth.keys]]\nkey = "{POLITE_KEY}"\n'
    )
    cmd = [sys.executable, "-m", "gateway", "serve", "--config", str(cfg), "--port", str(args.port)]
    server = bench.Server(cmd, args.port, out / "server.log", "/health", dict(os.environ))
    ok, why = server.ready(180)
    if not ok:
        print(why)
        return 1
    try:
        import httpx

        while httpx.get(f"http://127.0.0.1:{args.port}/ready").status_code != 200:
            time.sleep(0.5)
        results = {
            "invented_methods": invented_methods(args.port),
            "half_open": half_open(args.port, args.connections, config.server.header_timeout_s),
            "flood_and_polite": flood_and_polite(args.port, args.model, args.seconds),
        }
    finally:
        server.stop()
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
