"""Remote backends (issue 18): a gateway in front of a gateway, and failover with the upstream killed.

    .venv/bin/python bench/remote.py [--duration 10] [--models minilm-onnx-int8,wordllama]

1. Overhead: an upstream gateway serving each model, and a front gateway serving the same names through
   `backend = "openai"` (int8 MiniLM with a local tokenizer, wordllama counting upstream). wrk, 32 clients
   x 1 text, alternating: the upstream directly, then through the front, per model, same run.
2. Failover under load: a front with `remote` (openai -> an upstream's wordllama) falling back to `local`
   (wordllama in the front itself), circuit 3 failures / 2 s. wrk, 32 clients on `remote` for `--outage`
   seconds around an upstream SIGKILL and restart; /metrics scraped every 0.1 s for batches by model, the
   failovers by reason and the non-200 answers.
Writes results.json under bench/results/remote-<time>/ and prints the tables.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as bench  # noqa: E402  (server, wrk and corpus helpers)

INT8 = bench.ROOT / "models" / "minilm-onnx-int8"


def upstream_toml(port: int) -> str:
    return f"""
[server]
port = {port}
access_log = false
[cache]
store = "off"
[models.minilm-onnx-int8]
backend = "onnx"
path = "{INT8}"
[models.wordllama]
backend = "wordllama"
path = "pkg:wordllama"
"""


def front_toml(port: int, up: int) -> str:
    base = f"http://127.0.0.1:{up}/v1"
    return f"""
[server]
port = {port}
access_log = false
[cache]
store = "off"
[models.minilm-onnx-int8]
backend = "openai"
[models.minilm-onnx-int8.options]
base_url = "{base}"
api_key_env = "UPSTREAM_KEY"
tokenizer = "{INT8}"
[models.wordllama]
backend = "openai"
[models.wordllama.options]
base_url = "{base}"
api_key_env = "UPSTREAM_KEY"
"""


def failover_toml(port: int, up: int) -> str:
    return f"""
[server]
port = {port}
access_log = false
[cache]
store = "off"
[models.remote]
backend = "openai"
embedding_space = "l2_supercat"
fallbacks = ["local"]
circuit = {{failures = 3, open_s = 2.0}}
[models.remote.options]
base_url = "http://127.0.0.1:{up}/v1"
model = "wordllama"
api_key_env = "UPSTREAM_KEY"
timeout_s = 5
[models.local]
backend = "wordllama"
path = "pkg:wordllama"
embedding_space = "l2_supercat"
"""


def start(config: Path, port: int, log: Path) -> bench.Server:
    env = dict(os.environ, GATEWAY_API_KEYS=bench.API_KEY, UPSTREAM_KEY=bench.API_KEY)
    cmd = [sys.executable, "-m", "gateway", "serve", "--config", str(config)]
    server = bench.Server(cmd, port, log, "/ready", env)
    ok, why = server.ready(120)
    if not ok:
        raise RuntimeError(f"{config.name}: {why}")
    return server


def overhead(args: argparse.Namespace, work: Path, corpus: list[str]) -> list[dict[str, Any]]:
    up_port, front_port = bench.free_port(args.port), bench.free_port(args.port + 1)
    (work / "upstream.toml").write_text(upstream_toml(up_port))
    (work / "front.toml").write_text(front_toml(front_port, up_port))
    up = start(work / "upstream.toml", up_port, work / "upstream.log")
    front = start(work / "front.toml", front_port, work / "front.log")
    rows = []
    try:
        for model in args.models.split(","):
            bodies = work / f"{model}-1.jsonl"
            bench.write_bodies(bodies, model, corpus, 1)
            for server in (up, front):
                bench.run_wrk(args, server.port, bodies, 32, 3, "/v1/embeddings", "30s")  # warm-up
            for server, where in ((up, "upstream directly"), (front, "front -> upstream")):
                up.wait_idle()
                front.wait_idle()
                cpu_up, cpu_front = up.cpu_s(), front.cpu_s()
                w = bench.run_wrk(args, server.port, bodies, 32, args.duration, "/v1/embeddings", "30s")
                secs = w["duration_us"] / 1e6
                rows.append(
                    {
                        "model": model,
                        "path": where,
                        "texts_per_s": w["s200"] / secs,
                        "p50_ms": w["p50_us"] / 1000,
                        "p99_ms": w["p99_us"] / 1000,
                        "non_200": w["s429"] + w["sother"],
                        "socket_errors": w["connect_errors"] + w["read_errors"] + w["write_errors"] + w["timeouts"],
                        "upstream_cpu_pct": 100 * (up.cpu_s() - cpu_up) / secs,
                        "front_cpu_pct": 100 * (front.cpu_s() - cpu_front) / secs,
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    finally:
        front.stop()
        up.stop()
    return rows


def scrape(port: int) -> dict[str, float]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics")
    with urllib.request.urlopen(req, timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(("gateway_batch_size_count", "gateway_failovers_total", "gateway_embedding_requests_total")):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def failover(args: argparse.Namespace, work: Path, corpus: list[str]) -> dict[str, Any]:
    up_port, front_port = bench.free_port(args.port + 2), bench.free_port(args.port + 3)
    (work / "upstream2.toml").write_text(upstream_toml(up_port))
    (work / "failover.toml").write_text(failover_toml(front_port, up_port))
    up = start(work / "upstream2.toml", up_port, work / "upstream2.log")
    front = start(work / "failover.toml", front_port, work / "failover.log")
    bodies = work / "remote-1.jsonl"
    bench.write_bodies(bodies, "remote", corpus, 1)
    samples: list[tuple[float, dict[str, float]]] = []
    events: dict[str, float] = {}
    stop = threading.Event()

    def scraper() -> None:
        while not stop.is_set():
            samples.append((time.monotonic(), scrape(front_port)))
            time.sleep(0.1)

    def chaos() -> None:
        nonlocal up
        time.sleep(args.kill_at)
        events["kill"] = time.monotonic()
        up.proc.send_signal(signal.SIGKILL)
        up.proc.wait()
        up.log.close()
        time.sleep(args.restart_after)
        events["restart"] = time.monotonic()
        up = bench.Server(
            [sys.executable, "-m", "gateway", "serve", "--config", str(work / "upstream2.toml")],
            up_port,
            work / "upstream2-again.log",
            "/ready",
            dict(os.environ, GATEWAY_API_KEYS=bench.API_KEY),
        )
        up.ready(60)
        events["upstream_ready"] = time.monotonic()

    try:
        bench.run_wrk(args, front_port, bodies, 32, 3, "/v1/embeddings", "30s")  # warm-up
        threads = [threading.Thread(target=scraper), threading.Thread(target=chaos)]
        events["start"] = time.monotonic()
        for t in threads:
            t.start()
        w = bench.run_wrk(args, front_port, bodies, 32, args.outage, "/v1/embeddings", "30s")
        stop.set()
        for t in threads:
            t.join()
    finally:
        front.stop()
        up.stop()
    t0 = events["start"]

    def first(pred: Any, after: float) -> float | None:
        for (_, a), (t, b) in itertools.pairwise(samples):
            if t >= after and pred(a, b):
                return t - t0
        return None

    def grew(key: str) -> Any:
        return lambda a, b: b.get(key, 0) > a.get(key, 0)

    remote_batches = 'gateway_batch_size_count{model="remote"}'
    unavailable = 'gateway_failovers_total{fallback="local",model="remote",reason="unavailable"}'
    opened = 'gateway_failovers_total{fallback="local",model="remote",reason="circuit_open"}'
    last = samples[-1][1]
    phases = {}
    bounds = [("before kill", t0, events["kill"]), ("upstream down", events["kill"], events["upstream_ready"])]
    bounds.append(("after return", events["upstream_ready"], samples[-1][0]))
    for label, a, b in bounds:
        s = [m for t, m in samples if a <= t <= b]
        ok = 'gateway_embedding_requests_total{model="remote",status="200"}'
        if len(s) >= 2:
            phases[label] = (s[-1].get(ok, 0) - s[0].get(ok, 0)) / max(b - a, 1e-9)
    result = {
        "wrk": w,
        "kill_s": events["kill"] - t0,
        "restart_s": events["restart"] - t0,
        "upstream_ready_s": events["upstream_ready"] - t0,
        "first_failover_s": first(grew(unavailable), events["kill"]),
        "circuit_open_s": first(grew(opened), events["kill"]),
        "failovers_unavailable": last.get(unavailable, 0),
        "failovers_circuit_open": last.get(opened, 0),
        "remote_batches_again_s": first(grew(remote_batches), events["upstream_ready"]),
        "non_200": {k: v for k, v in last.items() if "requests_total" in k and 'status="200"' not in k},
        "texts_per_s_by_phase": phases,
    }
    print(json.dumps(result, indent=1), flush=True)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="minilm-onnx-int8,wordllama")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--outage", type=float, default=30.0, help="seconds of load in the failover run")
    p.add_argument("--kill-at", type=float, default=8.0)
    p.add_argument("--restart-after", type=float, default=8.0)
    p.add_argument("--port", type=int, default=8790)
    p.add_argument("--wrk", default="/usr/bin/wrk")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--skip", choices=["overhead", "failover"])
    args = p.parse_args()
    work = Path(args.out) / time.strftime("remote-%Y%m%d-%H%M%S")
    work.mkdir(parents=True)
    corpus = bench.load_corpus()
    out: dict[str, Any] = {}
    if args.skip != "overhead":
        out["overhead"] = overhead(args, work, corpus)
    if args.skip != "failover":
        out["failover"] = failover(args, work, corpus)
    (work / "results.json").write_text(json.dumps(out, indent=1))
    print(f"results: {work / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
