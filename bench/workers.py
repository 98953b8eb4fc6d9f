"""Front workers (issue 28): `[server] workers` = 1 against 2 (or more), in one run, on the default config.

    .venv/bin/python bench/workers.py [--workers 1,2] [--duration 8] [--rounds 1] [--skip storm] [--only wordllama]

One server per workers value, all up at once (gateway.toml's server settings and models minilm (torch),
minilm-onnx-int8 and wordllama, with `[cache] store = "memory"` but `cache = false` on those three, and a
fourth model `hits`, wordllama with the cache on, and a fifth, `copies`: wordllama with the cache off and
`copies = "per-worker"`, its own copy in each front (the same as `wordllama` with one worker). Every model
answers one int8 request first, so that calibration has finished before anything is measured. Then, point
by point, each server in turn (the order reversed every other round, so that a drift of the machine shows as
spread):
  - GET /health, wrk 64 connections;
  - cache hits: 32 clients x 1 text over 50 repeated texts (`hits`, warmed first: every answer a hit);
  - wordllama, torch and int8: 32 clients x 1 text and 4 clients x 32 texts over bench/corpus.txt;
  - wordllama per-worker (`copies`): 32 x 1 and 4 x 32;
  - the retry-at-once storm: 256 connections x 8 texts, each sending again the moment it has an answer.
For each: requests and texts/s, p50/p99, answers other than 200 (and for the storm 429 apart), and the CPU
each process spent per request, in microseconds: the fronts (all together), the runtime process's event loop
(its main thread) and its other threads (the models); with one worker, the one process's event loop and its
other threads. From those, a projection: requests/s on N cores = min((N - 1) / front CPU, 1 / runtime
loop CPU) with workers (one core left to the runtime), 1 / loop CPU with one process (one event loop, however
many cores). Results: results.json and results.md under bench/results/<timestamp>-workers/, and stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as bench  # noqa: E402  (server, wrk, corpus and TOML helpers of bench/run.py)

MODELS = ("minilm", "minilm-onnx-int8", "wordllama")
PROJECT_CORES = (16, 64)


# ----------------------------------------------------------------------------------- CPU by process role


def _ticks(stat: str) -> float:
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / bench.CLK_TCK


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _family(pid: int) -> list[int]:
    """`pid` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _read(f"/proc/{entry}/stat")
            if stat:
                children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def cpu_by_role(pid: int) -> dict[str, float]:
    """CPU seconds so far of the server (workers > 1) rooted at `pid`: "front" (every front worker), "loop" (the
    runtime process's main thread: its event loop) and "threads" (its other threads: model calls)."""
    out = {"front": 0.0, "loop": 0.0, "threads": 0.0}
    for p in _family(pid):
        cmd = _read(f"/proc/{p}/cmdline")
        total = _ticks(_read(f"/proc/{p}/stat") or "x) 0 0 0 0 0 0 0 0 0 0 0 0 0")
        if "gateway.processes.runtime_process" in cmd:
            main = _ticks(_read(f"/proc/{p}/task/{p}/stat") or "x) 0 0 0 0 0 0 0 0 0 0 0 0 0")
            out["loop"] += main
            out["threads"] += total - main
        elif "spawn_main" in cmd:
            out["front"] += total
    return out


def single_cpu(pid: int) -> dict[str, float]:
    """cpu_by_role for a one-process server: its main thread is both the front and the loop."""
    total = _ticks(_read(f"/proc/{pid}/stat") or "x) 0 0 0 0 0 0 0 0 0 0 0 0 0")
    main = _ticks(_read(f"/proc/{pid}/task/{pid}/stat") or "x) 0 0 0 0 0 0 0 0 0 0 0 0 0")
    return {"front": main, "loop": main, "threads": total - main}


# --------------------------------------------------------------------------------------------- servers


def write_config(config: Any, workers: int, dest: Path) -> None:
    """gateway.toml's server table (workers set) and the three models with the cache off, plus `hits`."""
    import msgspec

    server = msgspec.to_builtins(config.server)
    server["workers"] = workers
    lines = [*bench.toml_table("server", server), "", "[auth]", "api_keys = []", "", "[cache]", 'store = "memory"']
    for name in MODELS:
        model = msgspec.to_builtins(config.models[name])
        model["cache"] = False
        lines += ["", *bench.toml_table(f"models.{json.dumps(name)}", model)]
    hits = msgspec.to_builtins(config.models["wordllama"])
    hits.pop("aliases", None)
    lines += ["", *bench.toml_table("models.hits", hits)]
    copies = {**hits, "cache": False, "copies": "per-worker"}
    lines += ["", *bench.toml_table("models.copies", copies)]
    dest.write_text("\n".join(lines) + "\n", encoding="utf-8")


def post(port: int, body: dict[str, Any]) -> int:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/embeddings",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {bench.API_KEY}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=300) as r:
        return int(r.status)


def health_script(work: Path) -> Path:
    path = work / "health.lua"
    path.write_text(
        'wrk.method = "GET"\n'
        "done = function(summary, latency, requests)\n"
        '  io.write(string.format("WRKJSON {\\"requests\\": %d, \\"duration_us\\": %d, \\"p50_us\\": %d, '
        '\\"p99_us\\": %d, \\"errors\\": %d}\\n", summary.requests, summary.duration, latency:percentile(50), '
        "latency:percentile(99), summary.errors.connect + summary.errors.read + summary.errors.write + "
        "summary.errors.status + summary.errors.timeout))\nend\n"
    )
    return path


def wrk(args: argparse.Namespace, port: int, connections: int, script: Path, extra: list[str], path: str) -> dict:
    cmd = [args.wrk, f"-t{args.wrk_threads}", f"-c{connections}", f"-d{args.duration:g}s", "--timeout=30s"]
    cmd += ["-s", str(script), f"http://127.0.0.1:{port}{path}", "--", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=args.duration + 120)
    found = re.search(r"^WRKJSON (.*)$", proc.stdout, re.M)
    if found is None:
        raise RuntimeError(f"wrk failed (status {proc.returncode}): {proc.stdout[-500:]} {proc.stderr[-500:]}")
    return dict(json.loads(found.group(1)))


def point(args: argparse.Namespace, server: bench.Server, workers: int, spec: dict[str, Any]) -> dict[str, Any]:
    """One wrk run against `server`: rates, latency, answers and CPU per request by role."""
    cpu = cpu_by_role if workers > 1 else single_cpu
    m0, c0, sys0 = server.batch_metrics(), cpu(server.proc.pid), bench.cpu_jiffies()
    if spec["kind"] == "health":
        w = wrk(args, server.port, spec["connections"], spec["script"], [], "/health")
        w["s200"], w["s429"], w["sother"] = w["requests"] - w["errors"], 0, w["errors"]
    else:
        w = wrk(
            args,
            server.port,
            spec["connections"],
            bench.LUA,
            [str(spec["bodies"]), "/v1/embeddings", bench.API_KEY],
            "",
        )
    c1, sys1, m1 = cpu(server.proc.pid), bench.cpu_jiffies(), server.batch_metrics()
    secs = w["duration_us"] / 1e6
    answered = max(1, w["s200"] + w["s429"])
    row: dict[str, Any] = {
        "rps": w["s200"] / secs,
        "texts_per_s": w["s200"] * spec["texts"] / secs,
        "p50_ms": w["p50_us"] / 1000,
        "p99_ms": w["p99_us"] / 1000,
        "s429": w["s429"],
        "other": w["sother"] + sum(w.get(k, 0) for k in ("connect_errors", "read_errors", "write_errors", "timeouts")),
    }
    for role in ("front", "loop", "threads"):
        row[f"{role}_us"] = 1e6 * (c1[role] - c0[role]) / answered
    batches = m1.get("gateway_batch_size_count", 0) - m0.get("gateway_batch_size_count", 0)
    if batches > 0:
        row["batch_ms"] = 1000 * (m1["gateway_batch_seconds_sum"] - m0["gateway_batch_seconds_sum"]) / batches
    server_pct = 100 * sum(c1[r] - c0[r] for r in ("front", "threads")) / secs
    if workers > 1:
        server_pct += 100 * (c1["loop"] - c0["loop"]) / secs
    row["other_cpu_pct"] = max(0.0, bench.busy_pct(sys0, sys1, secs) - server_pct)
    server.wait_idle()
    wait_family_idle(server)
    time.sleep(args.pause)
    return row


def wait_family_idle(server: bench.Server, limit: float = 120.0) -> None:
    """Until every process of `server` stops computing (queued work outlives wrk's clients)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        a = sum(cpu_by_role(server.proc.pid).values()) + server.cpu_s()
        time.sleep(0.5)
        if sum(cpu_by_role(server.proc.pid).values()) + server.cpu_s() - a < 0.05:
            return


def projection(row: dict[str, Any], workers: int, cores: int) -> float:
    """Requests/s the CPU per request allows on `cores` (see the module's docstring)."""
    loop = row["loop_us"] / 1e6
    if workers == 1:
        return 1 / loop if loop > 0 else float("inf")
    front = row["front_us"] / 1e6
    fronts = (cores - 1) / front if front > 0 else float("inf")
    return min(fronts, 1 / loop if loop > 0 else float("inf"))


# ------------------------------------------------------------------------------------------------- main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(bench.ROOT / "gateway.toml"))
    p.add_argument("--workers", default="1,2")
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--pause", type=float, default=1.0)
    p.add_argument("--wrk", default="/usr/bin/wrk")
    p.add_argument("--wrk-threads", type=int, default=1)
    p.add_argument("--skip", default="", help="comma-separated point groups to leave out: models,storm")
    p.add_argument("--only", default="", help="comma-separated starts of the point names to run (say: wordllama)")
    p.add_argument("--port", type=int, default=8790)
    p.add_argument("--ready-timeout", type=float, default=300.0)
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args()
    sys.path.insert(0, str(bench.ROOT))
    from gateway.base.config import load_config

    config = load_config(args.config)
    corpus = bench.load_corpus()
    out = Path(args.out) / (time.strftime("%Y%m%d-%H%M%S") + "-workers")
    out.mkdir(parents=True)
    skip = set(filter(None, args.skip.split(",")))

    specs: list[dict[str, Any]] = [
        {"name": "/health, 64 conn", "kind": "health", "connections": 64, "texts": 1, "script": health_script(out)}
    ]
    hits = out / "hits.jsonl"
    bench.write_bodies(hits, "hits", corpus[:50], 1)
    specs.append({"name": "cache hits 32 x 1", "kind": "hits", "connections": 32, "texts": 1, "bodies": hits})
    groups = [
        ("wordllama", "wordllama", ((32, 1), (4, 32))),
        ("torch", "minilm", ((32, 1), (4, 32))),
        ("int8", "minilm-onnx-int8", ((32, 1), (4, 32))),
        ("wordllama per-worker", "copies", ((32, 1), (4, 32))),
    ]
    if "models" not in skip:
        for label, model, shapes in groups:
            for clients, texts in shapes:
                bodies = out / f"{model}-{texts}.jsonl"
                bench.write_bodies(bodies, model, corpus, texts)
                specs.append(
                    {
                        "name": f"{label} {clients} x {texts}",
                        "kind": "model",
                        "connections": clients,
                        "texts": texts,
                        "bodies": bodies,
                    }
                )
    if "storm" not in skip:
        for label, model, _ in groups[:3]:
            bodies = out / f"{model}-8.jsonl"
            bench.write_bodies(bodies, model, corpus, 8)
            specs.append(
                {"name": f"storm {label} 256 x 8", "kind": "storm", "connections": 256, "texts": 8, "bodies": bodies}
            )

    only = tuple(filter(None, args.only.split(",")))
    if only:
        specs = [spec for spec in specs if spec["name"].startswith(only)]
    counts = [int(w) for w in args.workers.split(",")]
    servers: dict[int, bench.Server] = {}
    results: dict[str, Any] = {"workers": counts, "cores": os.cpu_count(), "duration_s": args.duration, "points": {}}
    try:
        for i, n in enumerate(counts):
            cfg = out / f"workers-{n}.toml"
            write_config(config, n, cfg)
            servers[n] = bench.gateway_server(cfg, bench.free_port(args.port + i), out / f"server-{n}.log")
        for n, server in servers.items():
            ok, why = server.ready(args.ready_timeout)
            if not ok:
                raise RuntimeError(f"workers={n}: {why}")
            # Calibration (int8 ranges) finished, and every model warm, before anything is measured.
            for model in (*MODELS, "hits", "copies"):
                post(server.port, {"model": model, "input": corpus[:4], "encoding_format": "int8"})
            for text in corpus[:50]:
                post(server.port, {"model": "hits", "input": text})
            wait_family_idle(server)
        for spec in specs:
            rows: dict[str, list[dict[str, Any]]] = {str(n): [] for n in counts}
            for r in range(args.rounds):
                for n in counts if r % 2 == 0 else counts[::-1]:
                    row = point(args, servers[n], n, spec)
                    rows[str(n)].append(row)
                    print(
                        f"{spec['name']:>22} workers={n} round {r + 1}: "
                        + ", ".join(f"{k} {v:.1f}" for k, v in row.items() if isinstance(v, float)),
                        flush=True,
                    )
            results["points"][spec["name"]] = rows
    finally:
        for server in servers.values():
            server.stop()
    (out / "results.json").write_text(json.dumps(results, indent=1))
    table = report(results)
    (out / "results.md").write_text(table)
    print(table)
    return 0


def _median(rows: list[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else float("nan")


def report(results: dict[str, Any]) -> str:
    counts = results["workers"]
    base = str(counts[0])
    head = ["point"] + [f"w={n} req/s" for n in counts] + [f"w={n}/w={base}" for n in counts[1:]]
    head += [f"w={n} p50/p99 ms" for n in counts] + [f"w={n} 429/other" for n in counts]
    head += [f"w={n} front/loop/threads us" for n in counts]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, rows in results["points"].items():
        rps = {n: _median(rows[str(n)], "rps") for n in counts}
        cells = [name] + [f"{rps[n]:.0f}" for n in counts] + [f"{rps[n] / rps[counts[0]]:.2f}" for n in counts[1:]]
        cells += [f"{_median(rows[str(n)], 'p50_ms'):.1f} / {_median(rows[str(n)], 'p99_ms'):.0f}" for n in counts]
        cells += [f"{_median(rows[str(n)], 's429'):.0f} / {_median(rows[str(n)], 'other'):.0f}" for n in counts]
        cells += [
            "/".join(f"{_median(rows[str(n)], f'{role}_us'):.0f}" for role in ("front", "loop", "threads"))
            for n in counts
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Projection from CPU per request (requests/s):", ""]
    lines += ["| point | " + " | ".join(f"w={n} on {c} cores" for n in counts for c in PROJECT_CORES) + " |"]
    lines += ["|---|" + "---|" * (len(counts) * len(PROJECT_CORES))]
    for name in ("/health, 64 conn", "cache hits 32 x 1", "wordllama 32 x 1", "wordllama per-worker 32 x 1"):
        if name not in results["points"]:
            continue
        rows = results["points"][name]
        cells = []
        for n in counts:
            mid = {k: _median(rows[str(n)], k) for k in ("front_us", "loop_us")}
            cells += [f"{projection(mid, n, c):.0f}" for c in PROJECT_CORES]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
