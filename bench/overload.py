"""Overload: does a flood get fast answers (200 or 429), and what does a 429 cost? (issue 21)

    .venv/bin/python bench/overload.py [--models minilm,minilm-onnx-int8] [--duration 15] [--cpus 0]

For each model, one server (the model alone, as bench/run.py starts it), in this order:
  1. reference: 32 clients x 1 text with wrk, the throughput a well-behaved load gets;
  2. flood, retry at once: wrk, 256 connections x 8 texts, each connection sending again the moment it
     has an answer (what a naive client or a retry loop does);
  3. flood, polite: the same 256 x 8 with wrk, each refused connection waiting Retry-After before it sends
     again (bench/wrk/embed.lua with POLITE=1; wrk's latencies leave that wait out).
Reported: answers by status, p50/p99 latency of all answers, texts/s of the 200s against the reference,
the server's CPU per answer and an estimate of the CPU one 429 costs. `--cpus 0` pins the server to one
core (the model's speed halved: 429s should rise instead of latency).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as bench  # noqa: E402  (the server, wrk and corpus helpers of bench/run.py)


def one_model(args: argparse.Namespace, config: Any, name: str, corpus: list[str], work: Path) -> dict[str, Any]:
    cfg = work / f"{name}.toml"
    bench.write_model_config(config, name, cfg, access_log=False)
    cmd = [sys.executable, "-m", "gateway", "serve", "--config", str(cfg), "--port", str(args.port)]
    if args.cpus:
        cmd = ["taskset", "-c", args.cpus, *cmd]
    env = dict(os.environ, GATEWAY_API_KEYS=bench.API_KEY)
    server = bench.Server(cmd, args.port, work / f"server-{name}.log", "/ready", env)
    ok, why = server.ready(args.ready_timeout)
    if not ok:
        server.stop()
        return {"model": name, "error": why}
    try:
        single, several = work / f"{name}-1.jsonl", work / f"{name}-{args.texts}.jsonl"
        bench.write_bodies(single, name, corpus, 1)
        bench.write_bodies(several, name, corpus, args.texts)
        bench.run_wrk(args, args.port, single, 32, 3, "/v1/embeddings", "10s")  # warm-up
        out: dict[str, Any] = {"model": name}
        for label, bodies, connections, polite in (
            ("reference", single, 32, "0"),
            ("flood", several, args.connections, "0"),
            ("polite", several, args.connections, "1"),
        ):
            server.wait_idle()
            cpu = server.cpu_s()
            os.environ["POLITE"] = polite
            w = bench.run_wrk(args, args.port, bodies, connections, args.duration, "/v1/embeddings", "30s")
            w["server_cpu_s"] = server.cpu_s() - cpu
            out[label] = w
        os.environ.pop("POLITE", None)
        return out
    finally:
        server.stop()


def _answers(r: dict[str, Any]) -> tuple[int, int, int, float, float]:
    """(200s, 429s, others, p50 ms, p99 ms) of a wrk run."""
    errors = sum(r[k] for k in ("connect_errors", "read_errors", "write_errors", "timeouts"))
    return r["s200"], r["s429"], r["sother"] + errors, r["p50_us"] / 1000, r["p99_us"] / 1000


def summarize(result: dict[str, Any], args: argparse.Namespace) -> list[str]:
    if "error" in result:
        return [f"| {result['model']} | error: {result['error']} |"]
    ref = result["reference"]
    ref_rate = ref["s200"] / args.duration
    ref_cpu = ref["server_cpu_s"] / max(1, ref["requests"])  # per text: one text per request
    rows = [
        f"| {result['model']} | reference: 32 x 1 text | {ref['s200']} | - | - | {ref['p50_us'] / 1000:.0f} | "
        f"{ref['p99_us'] / 1000:.0f} | {ref_rate:.0f} | 1.00 | {ref_cpu * 1e6:.0f} | - |"
    ]
    for label, key in (("retry at once (wrk)", "flood"), ("honours Retry-After", "polite")):
        r = result[key]
        ok, refused, other, p50, p99 = _answers(r)
        rate = ok * args.texts / args.duration
        # The 200s at the reference's CPU per text; what is left, spread over the 429s.
        per_429 = (r["server_cpu_s"] - ok * args.texts * ref_cpu) / refused * 1e6 if refused else float("nan")
        per_answer = r["server_cpu_s"] / max(1, ok + refused) * 1e6
        rows.append(
            f"| {result['model']} | {label} | {ok} | {refused} | {other} | {p50:.0f} | {p99:.0f} | {rate:.0f} | "
            f"{rate / ref_rate:.2f} | {per_answer:.0f} | {per_429:.0f} |"
        )
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(bench.ROOT / "gateway.toml"))
    p.add_argument("--models", default="minilm,minilm-onnx-int8")
    p.add_argument("--duration", type=float, default=15.0)
    p.add_argument("--connections", type=int, default=256)
    p.add_argument("--texts", type=int, default=8, help="texts per request in the floods")
    p.add_argument("--cpus", help="taskset CPU list for the server (e.g. 0: one core)")
    p.add_argument("--port", type=int, default=8766)
    p.add_argument("--ready-timeout", type=float, default=180.0)
    p.add_argument("--wrk", default="/usr/bin/wrk")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args()
    sys.path.insert(0, str(bench.ROOT))
    from gateway.base.config import load_config

    config = load_config(args.config)
    corpus = bench.load_corpus()
    out = Path(args.out) / (time.strftime("%Y%m%d-%H%M%S") + "-overload")
    out.mkdir(parents=True)
    results = [one_model(args, config, name, corpus, out) for name in args.models.split(",")]
    (out / "results.json").write_text(json.dumps(results, indent=1))
    table = [
        f"Overload: {args.connections} connections x {args.texts} texts, {args.duration:g} s per run"
        + (f", server on CPUs {args.cpus}" if args.cpus else ""),
        "",
        "| model | client | 200 | 429 | other | p50 ms | p99 ms | texts/s of 200s | vs reference | "
        "server CPU us per answer | CPU us per 429 (est.) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        table += summarize(r, args)
    (out / "results.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
