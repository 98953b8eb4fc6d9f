"""One client against the llama-cpp-python server and this gateway on the same GGUF files (issue 28).

    .venv/bin/python bench/gguf_one_client.py [--requests 300] [--warmup 50] [--rounds 3]
        [--models models/minilm-f16.gguf,models/minilm-q8_0.gguf] [--llama-pythonpath DIR_OR_WHEELS]

Starts, all at once and left idle between turns: one `python -m llama_cpp.server --embedding true` per GGUF
file (its defaults otherwise: n_ctx 2048, n_batch/n_ubatch 512, threads cpu/2 and cpu for a batch), and one
`gateway serve` holding every file as a model (`[cache] store = "off"`). Each server answers one int8 request
first (the gateway's calibration) and a warm-up. Then, round by round (the order reversed every other round,
so a drift of the machine shows as spread), one keep-alive httpx client sends `--requests` requests one after
the other, each with the same short text, to each server in turn; the body and the API key are the same for
both (`model` is the llama server's alias). Prints p50/p90 per server, model and round, the median round's
p50 ratio (gateway / llama server), and what differs in the answers themselves (vector norm, cosine between
the two servers' vectors, token counts), which is semantics, not overhead.

llama-cpp-python's server needs its `server` extra (fastapi, sse-starlette, starlette-context,
pydantic-settings). Where the venv lacks some, `--llama-pythonpath` (or $LLAMA_SERVER_PYTHONPATH) adds
folders or pure-Python wheels (`pip download --no-deps sse-starlette 'starlette-context<0.4'
pydantic-settings -d DIR`: a wheel is importable as a zip) to that server's PYTHONPATH only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as bench  # noqa: E402  (Server, free_port, toml helpers of bench/run.py)

TEXT = "How do I reset the password of my account?"


def llama_pythonpath(extra: str) -> str:
    parts: list[str] = []
    for entry in filter(None, extra.split(os.pathsep)):
        p = Path(entry)
        parts += sorted(str(w) for w in p.glob("*.whl")) if p.is_dir() and any(p.glob("*.whl")) else [str(p)]
    return os.pathsep.join([*parts, os.environ.get("PYTHONPATH", "")])


def llama_server(path: Path, alias: str, port: int, log: Path, extra_path: str) -> bench.Server:
    env = dict(os.environ, PYTHONPATH=llama_pythonpath(extra_path))
    cmd = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(path),
        "--model_alias",
        alias,
        "--embedding",
        "true",
        "--api_key",
        bench.API_KEY,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--verbose",
        "false",
    ]
    # /v1/models wants the key; the app (and the model in it) is built before uvicorn answers anything.
    return bench.Server(cmd, port, log, "/openapi.json", env)


def write_config(models: dict[str, Path], dest: Path) -> None:
    lines = ['[server]\nhost = "127.0.0.1"', "", "[auth]", "api_keys = []", "", "[cache]", 'store = "off"']
    for name, path in models.items():
        lines += ["", *bench.toml_table(f"models.{json.dumps(name)}", {"backend": "gguf", "path": str(path)})]
    dest.write_text("\n".join(lines) + "\n", encoding="utf-8")


def one_client(client: Any, port: int, body: dict[str, Any], n: int) -> list[float]:
    """Latencies (ms) of `n` sequential requests; any answer other than 200 stops the run."""
    url = f"http://127.0.0.1:{port}/v1/embeddings"
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = client.post(url, json=body)
        dt = time.perf_counter() - t0
        if r.status_code != 200:
            raise RuntimeError(f"port {port}: {r.status_code} {r.text[:300]}")
        out.append(dt * 1000)
    return out


def calibrated(client: Any, port: int, body: dict[str, Any], limit_s: float) -> None:
    """Until an int8 request succeeds: the model's calibration (int8 ranges, computed once on the first such
    request, in the background) is over before anything is measured. On a loaded machine it can take longer
    than the gateway's request timeout (504), and goes on meanwhile."""
    deadline = time.monotonic() + limit_s
    while True:
        r = client.post(
            f"http://127.0.0.1:{port}/v1/embeddings", json={**body, "encoding_format": "int8"}, timeout=limit_s
        )
        if r.status_code == 200:
            return
        if r.status_code != 504 or time.monotonic() > deadline:
            raise RuntimeError(f"calibration on port {port}: {r.status_code} {r.text[:300]}")


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def vector(client: Any, port: int, body: dict[str, Any]) -> tuple[list[float], int]:
    r = client.post(f"http://127.0.0.1:{port}/v1/embeddings", json=body)
    r.raise_for_status()
    data = r.json()
    return data["data"][0]["embedding"], int(data["usage"]["prompt_tokens"])


def semantics(client: Any, ports: dict[str, int], body: dict[str, Any], texts: list[str]) -> dict[str, Any]:
    """Norms, cosine and token counts of the two servers' answers on a few texts."""
    norms: dict[str, list[float]] = {"llama": [], "gateway": []}
    cosines, tokens = [], []
    for text in texts:
        got = {k: vector(client, port, {**body, "input": text}) for k, port in ports.items()}
        a, b = got["llama"][0], got["gateway"][0]
        na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(x * x for x in b))
        norms["llama"].append(na)
        norms["gateway"].append(nb)
        cosines.append(sum(x * y for x, y in zip(a, b, strict=True)) / (na * nb))
        tokens.append((got["llama"][1], got["gateway"][1]))
    return {
        "norm_llama": [round(min(norms["llama"]), 4), round(max(norms["llama"]), 4)],
        "norm_gateway": [round(min(norms["gateway"]), 4), round(max(norms["gateway"]), 4)],
        "min_cosine": round(min(cosines), 6),
        "prompt_tokens_equal": sum(a == b for a, b in tokens),
        "texts": len(texts),
        "prompt_tokens_first": tokens[0],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="models/minilm-f16.gguf,models/minilm-q8_0.gguf")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--text", default=TEXT)
    ap.add_argument("--port", type=int, default=8790)
    ap.add_argument("--ready-timeout", type=float, default=300)
    ap.add_argument("--llama-pythonpath", default=os.environ.get("LLAMA_SERVER_PYTHONPATH", ""))
    ap.add_argument("--skip", default="", help="comma-separated: llama, gateway")
    args = ap.parse_args()

    import httpx

    files = {Path(p).stem.replace("minilm-", ""): (bench.ROOT / p).resolve() for p in args.models.split(",")}
    out = bench.ROOT / "bench" / "results" / (time.strftime("%Y%m%d-%H%M%S") + "-gguf-one-client")
    out.mkdir(parents=True, exist_ok=True)
    names = {label: f"gguf-{label}" for label in files}
    cfg = out / "gateway.toml"
    write_config({names[label]: path for label, path in files.items()}, cfg)
    skip = set(filter(None, args.skip.split(",")))
    servers: dict[tuple[str, str], bench.Server] = {}
    port = args.port
    results: dict[str, Any] = {"text": args.text, "requests": args.requests, "rounds": {}, "semantics": {}}
    try:
        if "gateway" not in skip:
            gw = bench.gateway_server(cfg, bench.free_port(port), out / "gateway.log")
            for label in files:
                servers[("gateway", label)] = gw
        if "llama" not in skip:
            for label, path in files.items():
                port = bench.free_port(port + 1)
                servers[("llama", label)] = llama_server(
                    path, names[label], port, out / f"llama-{label}.log", args.llama_pythonpath
                )
        for key, server in servers.items():
            ok, why = server.ready(args.ready_timeout)
            if not ok:
                raise RuntimeError(f"{key}: {why}")
        headers = {"Authorization": f"Bearer {bench.API_KEY}"}
        with httpx.Client(headers=headers, timeout=60) as client:
            for (kind, label), server in servers.items():
                body = {"model": names[label], "input": args.text}
                if kind == "gateway":
                    calibrated(client, server.port, body, args.ready_timeout)
                one_client(client, server.port, body, args.warmup)
            kinds = sorted({k for k, _ in servers}, reverse=True)  # llama first in round 1
            for label in files:
                body = {"model": names[label], "input": args.text}
                if len(kinds) == 2:
                    corpus = bench.load_corpus()[:20]
                    ports = {k: servers[(k, label)].port for k in kinds}
                    results["semantics"][label] = semantics(client, ports, body, [args.text, *corpus])
                    print(f"{label}: {results['semantics'][label]}", flush=True)
                for r in range(args.rounds):
                    for kind in kinds if r % 2 == 0 else kinds[::-1]:
                        lat = one_client(client, servers[(kind, label)].port, body, args.requests)
                        row = {"p50": pct(lat, 0.5), "p90": pct(lat, 0.9), "mean": statistics.fmean(lat)}
                        results["rounds"].setdefault(f"{label}/{kind}", []).append(row)
                        print(
                            f"{label:>5} {kind:>8} round {r + 1}: p50 {row['p50']:.2f} ms  p90 {row['p90']:.2f} ms",
                            flush=True,
                        )
    finally:
        for server in {id(s): s for s in servers.values()}.values():
            server.stop()
    print("\n| model | llama-cpp-python p50 / p90 ms | gateway p50 / p90 ms | gateway / llama p50, each round |")
    print("|---|---|---|---|")
    for label in files:
        lr, gr = results["rounds"].get(f"{label}/llama"), results["rounds"].get(f"{label}/gateway")
        if not lr or not gr:
            continue
        ratios = [g["p50"] / ll["p50"] for g, ll in zip(gr, lr, strict=True)]
        lm, gm = statistics.median(x["p50"] for x in lr), statistics.median(x["p50"] for x in gr)
        l90, g90 = statistics.median(x["p90"] for x in lr), statistics.median(x["p90"] for x in gr)
        print(
            f"| {label} | {lm:.2f} / {l90:.2f} | {gm:.2f} / {g90:.2f} | "
            + " / ".join(f"{x:.2f}" for x in ratios)
            + " |"
        )
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
