"""Soak: minutes of mixed valid and invalid requests at high concurrency against the real server.

    .venv/bin/python bench/soak.py [--duration 300] [--connections 64] [--config gateway.toml]

Pass: no valid request fails (a 429 under overload, with Retry-After, is an answer in time and is counted
apart), no invalid one gets a 5xx, no socket errors or timeouts, and the server's
RSS grows less than 5% over the run (mean of the last fifth of the samples against the first fifth; the
single readings at start and end are printed too). Prints one JSON line and a
verdict; exits 1 on failure.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import API_KEY, ROOT, free_port, gateway_server, load_corpus


def invalid_bodies(models: list[str], corpus: list[str]) -> list[str]:
    """Every kind of bad request the gateway must refuse with a 4xx."""
    m = models[0]
    return [
        "{not json",
        "",
        "[1, 2, 3]",
        json.dumps({"model": m}),
        json.dumps({"model": m, "input": ""}),
        json.dumps({"model": m, "input": []}),
        json.dumps({"model": m, "input": ["ok", 7]}),
        json.dumps({"model": m, "input": [[101, 2023, 102]]}),
        json.dumps({"model": "no-such-model", "input": "x"}),
        json.dumps({"model": m, "input": "x", "dimensions": 7}),
        json.dumps({"model": m, "input": "x", "temperature": 0.5}),
        json.dumps({"model": m, "input": " ".join(["word"] * 400)}),
        json.dumps({"model": m, "input": "x", "encoding_format": "int8"}),
        '{"model": "' + m + '", "input": "a\\ud800b"}',  # an unpaired surrogate escape
        json.dumps({"model": m, "input": random.choice(corpus) * 2000}),
    ]


def write_bodies(path: Path, models: list[str], corpus: list[str], invalid_share: float, n: int) -> None:
    rng = random.Random(7)
    bad = invalid_bodies(models, corpus)
    with path.open("w") as f:
        for _ in range(n):
            if rng.random() < invalid_share:
                f.write("i\t" + rng.choice(bad).replace("\n", " ") + "\n")
            else:
                texts = rng.sample(corpus, rng.choice((1, 1, 1, 2, 4, 8)))
                body = {"model": rng.choice(models), "input": texts if len(texts) > 1 else texts[0]}
                if rng.random() < 0.3:
                    body["encoding_format"] = "base64"
                f.write("v\t" + json.dumps(body) + "\n")


def _trend(samples: list[float]) -> float | None:
    k = len(samples) // 5
    if k == 0:
        return None
    first, last = sum(samples[:k]) / k, sum(samples[-k:]) / k
    return round((last - first) / first * 100, 2)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "gateway.toml"))
    p.add_argument("--models", help="comma-separated (default: every model in the config)")
    p.add_argument("--duration", type=int, default=300, help="seconds of load (default 300)")
    p.add_argument("--warmup", type=int, default=30, help="seconds before the start RSS is read")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--invalid-share", type=float, default=0.3)
    args = p.parse_args()

    from gateway.base.config import load_config

    config = load_config(args.config)
    models = args.models.split(",") if args.models else list(config.models)
    corpus = load_corpus()
    work = Path(tempfile.mkdtemp(prefix="gw-soak-"))
    bodies = work / "bodies.tsv"
    write_bodies(bodies, models, corpus, args.invalid_share, 5000)
    port = free_port(18600)
    server = gateway_server(Path(args.config), port, work / "server.log")
    try:
        ok, why = server.ready(600)
        if not ok:
            print(f"server not ready: {why}", file=sys.stderr)
            return 1
        rss_ready = server.rss_mb()
        url = f"http://127.0.0.1:{port}"
        wrk = ["wrk", "-t1", f"-c{args.connections}", "--timeout=60s", "-s", str(ROOT / "bench/wrk/soak.lua"), url]
        subprocess.run([*wrk[:3], f"-d{args.warmup}s", *wrk[3:], "--", str(bodies), API_KEY], capture_output=True)
        server.wait_idle()
        rss_start = server.rss_mb()
        started = time.time()
        proc = subprocess.Popen(
            [*wrk[:3], f"-d{args.duration}s", *wrk[3:], "--", str(bodies), API_KEY],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        # RSS along the run: a leak climbs steadily, a pool or arena warming up levels off.
        samples: list[float] = []
        while proc.poll() is None:
            time.sleep(min(10, max(1, args.duration // 30)))
            rss = server.rss_mb()
            if rss is not None:
                samples.append(round(rss, 1))
        out = subprocess.CompletedProcess(proc.args, proc.returncode, *proc.communicate())
        line = next((x for x in out.stdout.splitlines() if x.startswith("SOAKJSON ")), None)
        if line is None:
            print(out.stdout, out.stderr, file=sys.stderr)
            return 1
        server.wait_idle()
        rss_end = server.rss_mb()
        result = json.loads(line[len("SOAKJSON ") :])
        errors_in_log = sum(
            1
            for x in (work / "server.log").read_text(errors="replace").splitlines()
            if " ERROR " in x or "Traceback" in x
        )
        result.update(
            models=models,
            seconds=round(time.time() - started),
            rss_ready_mb=rss_ready,
            rss_start_mb=rss_start,
            rss_end_mb=rss_end,
            rss_growth_pct=round((rss_end - rss_start) / rss_start * 100, 2) if rss_start and rss_end else None,
            rss_samples_mb=samples,
            # One reading swings with the heap (freed, then trimmed); compare the first and last fifths.
            rss_trend_pct=_trend(samples),
            error_lines_in_log=errors_in_log,
        )
        print(json.dumps(result))
        checks = {
            # A 429 (with Retry-After) is how an overloaded server answers in time; anything else is a failure.
            "no failed valid request": result["valid_bad"] == 0 and result["valid_ok"] > 0,
            "no 5xx for invalid requests": result["invalid_5xx"] == 0 and result["invalid_2xx"] == 0,
            "no socket errors or timeouts": not any(
                result[k] for k in ("connect_errors", "read_errors", "write_errors", "timeouts")
            ),
            "RSS growth under 5%": result["rss_trend_pct"] is not None and result["rss_trend_pct"] < 5,
        }
        for name, passed in checks.items():
            print(("PASS " if passed else "FAIL ") + name)
        print(f"server log: {work / 'server.log'}")
        return 0 if all(checks.values()) else 1
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
