"""Cache benchmark (issue 19): what the embedding cache gains on repeats, costs without them, and how the
Redis store behaves when shared and when it fails.

    .venv/bin/python bench/cache.py [--models minilm-onnx-int8,minilm] [--duration 10] [--rounds 3]

A redis-server is started on a free port (no persistence) and stopped at the end. Per model, one gateway
per store (the model alone, access log off; `[cache] store` = "off", "memory", and "redis" once per
`[redis] timeout_ms` of --redis-timeouts) is up at once and measured in turn, the cache emptied before
each run (POST /admin/cache/clear, and FLUSHALL for Redis):
  1. re-index: bench/corpus.txt sent twice, 4 clients x 32 texts per request (a Python client reading
     each answer whole): texts/s of each pass, the median of --reindex-reps (stores' order rotated);
  2. query-like: wrk, 32 clients x 1 text drawn from --query-texts distinct texts, after a 2 s warm-up on
     the same texts (a steady state, not a cold start): texts/s, p50/p99, hit rate;
  3. hit rate 0: wrk with bench/wrk/unique.lua, every text made unique by a counter: texts/s and the
     server's CPU per text against "off" within each round (the runs of a round back to back, their
     order rotated between rounds; CPU per text moves less than texts/s when others load the machine).
Then, on the first model only and once per Redis timeout:
  4. two gateways sharing the Redis: a text embedded through one is a hit on the other (both ways); a key
     with requests_per_minute = --limit-rpm hammered through both for --limit-seconds (2 client threads
     per gateway, no pause): 200s counted with their times, in the first 60 s and in any 60 s (alone:
     `--skip reindex,query,unique,fault --redis-timeouts 100`);
  5. fault: wrk (32 clients, repeated texts) on a redis-backed gateway whose requests carry a key with a
     (huge) rate limit, so both shared uses are exercised; redis-server SIGKILLed at --kill-at and started
     again at --restart-at; /metrics scraped every 0.5 s for 200s, cache hits/misses, the shared-state
     errors by use and the server's mean latency, per phase.
Writes results.json and results.md under bench/results/<timestamp>-cache/ and prints the markdown.
"""

from __future__ import annotations

import argparse
import bisect
import http.client
import itertools
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import msgspec

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as bench  # noqa: E402  (server, wrk, corpus and table helpers of bench/run.py)

EMBED_LUA = HERE / "wrk" / "embed.lua"
UNIQUE_LUA = HERE / "wrk" / "unique.lua"
URL_PATH = "/v1/embeddings"
LIMITED_KEY = "bench-limited-key-1"
FAULT_KEY = "bench-fault-key-1"


# ------------------------------------------------------------------------------------------------ redis


class RedisProc:
    """A Redis server (by default the Valkey binary the lock installs) on a fixed loopback port, no persistence;
    kill() and start() keep the port."""

    def __init__(self, binary: str, workdir: Path, log: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = bench.free_port(0)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log = log.open("a")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        import redis

        from gateway.shared import local_redis

        cmd = [self.binary, *local_redis.command(self.port, self.workdir)[1:]]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.05)
        client.close()

    def flush(self) -> None:
        import redis

        with redis.Redis(port=self.port) as client:
            client.flushall()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        self.kill()
        self.log.close()


# ------------------------------------------------------------------------------------------------ gateways


def store_of(label: str) -> tuple[str, float | None]:
    """("off" | "memory" | "redis", Redis' timeout_ms) of a store label: "off", "memory", "redis-50ms"."""
    if label.startswith("redis-"):
        return "redis", float(label.removeprefix("redis-").removesuffix("ms"))
    return label, None


def write_config(config: Any, model: str, dest: Path, label: str, redis_url: str, keys: list[tuple[str, int]]) -> Path:
    """A config holding only `model`, with the store `label` names and the keys with limits."""
    store, timeout_ms = store_of(label)
    server = msgspec.to_builtins(config.server)
    server.update(log_level="warning", access_log=False)
    lines = [*bench.toml_table("server", server), "", *bench.toml_table("cache", {"store": store}), ""]
    if store == "redis":
        lines += [*bench.toml_table("redis", {"url": redis_url, "timeout_ms": timeout_ms}), ""]
    lines += ["[auth]", "api_keys = []", ""]
    for key, per_minute in keys:
        lines += ["[[auth.keys]]", f"key = {json.dumps(key)}", f"requests_per_minute = {per_minute}", ""]
    lines += bench.toml_table(f"models.{json.dumps(model)}", msgspec.to_builtins(config.models[model]))
    dest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return dest


def start_gateway(cfg: Path, log: Path, timeout: float) -> bench.Server:
    server = bench.gateway_server(cfg, bench.free_port(0), log)
    ok, why = server.ready(timeout)
    if not ok:
        server.stop()
        raise RuntimeError(f"gateway on {cfg.name} not ready: {why} (see {log})")
    return server


def post(port: int, body: dict[str, Any], key: str = bench.API_KEY, path: str = URL_PATH) -> tuple[int, Any]:
    """(status, headers) of one POST with a JSON body."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            r.read()
            return r.status, r.headers
    except urllib.error.HTTPError as exc:
        exc.read()
        return exc.code, exc.headers


def clear(server: bench.Server, label: str, redis: RedisProc) -> None:
    """Empty the cache a run starts with (and, for Redis, every rate-limit window too)."""
    store, _ = store_of(label)
    if store == "off":
        return
    status, _ = post(server.port, {}, path="/admin/cache/clear")
    if status != 200:
        raise RuntimeError(f"/admin/cache/clear answered {status}")
    if store == "redis":
        redis.flush()


# ------------------------------------------------------------------------------------------------ metrics

_SERIES = re.compile(r"^([A-Za-z_:][\w:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def scrape(port: int) -> list[tuple[str, dict[str, str], float]]:
    """Every series of /metrics as (name, labels, value); [] when the server does not answer."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {bench.API_KEY}"}
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        m = _SERIES.match(line)
        if m and not line.startswith("#"):
            out.append((m[1], dict(_LABEL.findall(m[2] or "")), float(m[3])))
    return out


def total(series: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    """The sum of the series called `name` whose labels include `labels`."""
    return sum(v for n, ls, v in series if n == name and all(ls.get(k) == x for k, x in labels.items()))


def hits_misses(series: list[tuple[str, dict[str, str], float]], model: str) -> tuple[float, float]:
    name = "gateway_cache_lookups_total"
    return total(series, name, model=model, result="hit"), total(series, name, model=model, result="miss")


# ------------------------------------------------------------------------------------------------ load


def run_wrk(
    args: argparse.Namespace, port: int, script: Path, script_args: list[str], connections: int, duration: float
) -> dict[str, Any]:
    cmd = [args.wrk, "-t1", f"-c{connections}", f"-d{duration:g}s", "--timeout=30s", "-s", str(script)]
    cmd += [f"http://127.0.0.1:{port}", "--", *script_args]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=duration + 120)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    for line in proc.stdout.splitlines():
        if line.startswith("WRKJSON "):
            out: dict[str, Any] = json.loads(line[8:])
            out["wrk_cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            out["socket_errors"] = sum(out[k] for k in ("connect_errors", "read_errors", "write_errors", "timeouts"))
            return out
    raise RuntimeError(f"wrk failed (status {proc.returncode}): {proc.stdout[-500:]} {proc.stderr[-500:]}")


def wrk_point(
    args: argparse.Namespace,
    server: bench.Server,
    model: str,
    script: Path,
    script_args: list[str],
    connections: int = 32,
) -> dict[str, Any]:
    """One wrk run of --duration against `server`: texts/s (one text per request), latency, hit rate, CPU."""
    m0, cpu0, sys0 = scrape(server.port), server.cpu_s(), bench.cpu_jiffies()
    w = run_wrk(args, server.port, script, script_args, connections, args.duration)
    cpu1, sys1, m1 = server.cpu_s(), bench.cpu_jiffies(), scrape(server.port)
    secs = w["duration_us"] / 1e6
    (h0, x0), (h1, x1) = hits_misses(m0, model), hits_misses(m1, model)
    lookups = (h1 - h0) + (x1 - x0)
    row = {
        "texts_per_s": w["s200"] / secs,
        "p50_ms": w["p50_us"] / 1000,
        "p99_ms": w["p99_us"] / 1000,
        "non_200": w["s429"] + w["sother"],
        "socket_errors": w["socket_errors"],
        "hits": h1 - h0,
        "hit_rate": (h1 - h0) / lookups if lookups else None,
        "server_cpu_pct": 100 * (cpu1 - cpu0) / secs,
        "wrk_cpu_pct": 100 * w["wrk_cpu_s"] / secs,
    }
    batches = total(m1, "gateway_batch_size_count", model=model) - total(m0, "gateway_batch_size_count", model=model)
    inputs = total(m1, "gateway_batch_size_sum", model=model) - total(m0, "gateway_batch_size_sum", model=model)
    row["mean_batch"] = inputs / batches if batches else None
    # The server's CPU per answered text: steadier than texts/s when other processes take CPU meanwhile.
    row["cpu_ms_per_text"] = 1000 * (cpu1 - cpu0) / w["s200"] if w["s200"] else None
    # Whatever else ran on the machine meanwhile (it is shared): a large figure makes the run suspect.
    row["other_cpu_pct"] = max(0.0, bench.busy_pct(sys0, sys1, secs) - row["server_cpu_pct"] - row["wrk_cpu_pct"])
    server.wait_idle()
    time.sleep(args.pause)
    return row


def reindex_pass(port: int, model: str, texts: list[str], per: int, clients: int) -> dict[str, Any]:
    """`texts` in requests of `per`, sent by `clients` threads taking the next request in turn."""
    chunks = [texts[i : i + per] for i in range(0, len(texts), per)]
    lock = threading.Lock()
    todo = iter([(json.dumps({"model": model, "input": c}).encode(), len(c)) for c in chunks])
    got = {"ok_texts": 0, "non_200": 0, "hits": 0}
    headers = {"Authorization": f"Bearer {bench.API_KEY}", "Content-Type": "application/json"}

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while True:
            with lock:
                item = next(todo, None)
            if item is None:
                break
            body, n = item
            conn.request("POST", URL_PATH, body, headers)
            r = conn.getresponse()
            r.read()  # the whole answer, as a client that uses it must
            with lock:
                if r.status == 200:
                    got["ok_texts"] += n
                    got["hits"] += int(r.getheader("x-cache-hits") or 0)
                else:
                    got["non_200"] += 1
        conn.close()

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    secs = time.perf_counter() - t0
    return {"texts_per_s": got["ok_texts"] / secs, "seconds": secs, "hits": got["hits"], "non_200": got["non_200"]}


# ------------------------------------------------------------------------------------------------ phases


def reindex(
    args: argparse.Namespace, servers: dict[str, bench.Server], model: str, corpus: list[str], redis: RedisProc
) -> dict[str, Any]:
    print(f"== {model}: re-index, {len(corpus)} texts twice, 4 clients x 32", flush=True)
    reps: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = {s: [] for s in servers}
    for rep in range(args.reindex_reps):
        bench.wait_quiet(args, f"re-index rep {rep + 1}")
        for store in rotated(list(servers), rep):
            server = servers[store]
            clear(server, store, redis)
            one = reindex_pass(server.port, model, corpus, 32, 4)
            two = reindex_pass(server.port, model, corpus, 32, 4)
            reps[store].append((one, two))
            print(
                f"   {store:>6} rep {rep + 1}: pass 1 {one['texts_per_s']:6.0f}/s ({one['hits']} hits), "
                f"pass 2 {two['texts_per_s']:6.0f}/s ({two['hits']} hits), non-200 "
                f"{one['non_200'] + two['non_200']}",
                flush=True,
            )
            server.wait_idle()
            time.sleep(args.pause)
    out = {}
    for store, pairs in reps.items():
        p1 = statistics.median(a["texts_per_s"] for a, _ in pairs)
        p2 = statistics.median(b["texts_per_s"] for _, b in pairs)
        out[store] = {
            "pass1": p1,
            "pass2": p2,
            "pass2_hits": statistics.median(b["hits"] for _, b in pairs),
            "non_200": sum(a["non_200"] + b["non_200"] for a, b in pairs),
            "reps": pairs,
        }
    return out


def query_like(
    args: argparse.Namespace, servers: dict[str, bench.Server], model: str, texts: list[str], work: Path, redis: Any
) -> dict[str, Any]:
    print(f"== {model}: query-like, 32 clients x 1 text from {len(texts)} distinct texts", flush=True)
    bodies = work / f"{model}-query.jsonl"
    bench.write_bodies(bodies, model, texts, 1)
    script_args = [str(bodies), URL_PATH, bench.API_KEY]
    rounds: dict[str, list[dict[str, Any]]] = {s: [] for s in servers}
    ceilings: list[float] = []
    for r in range(args.rounds):
        bench.wait_quiet(args, f"query-like round {r + 1}")
        # The HTTP front's ceiling on this machine now: GET /health, same clients, on the "off" gateway.
        ceilings.append(health_rps(args, servers["off"].port))
        print(f"   /health round {r + 1}: {ceilings[-1]:.0f} requests/s", flush=True)
        for store in rotated(list(servers), r):
            server = servers[store]
            clear(server, store, redis)
            run_wrk(args, server.port, EMBED_LUA, script_args, 32, 2)  # warm-up: the steady state is measured
            server.wait_idle()
            row = wrk_point(args, server, model, EMBED_LUA, script_args)
            rounds[store].append(row)
            print(f"   {store:>6} round {r + 1}: {line(row)}", flush=True)
    out = summarize_rounds(rounds)
    for summary in out.values():
        summary["vs_health"] = statistics.median(
            row["texts_per_s"] / c for row, c in zip(summary["rounds"], ceilings, strict=True)
        )
    out["off"]["health_rps_rounds"] = ceilings
    return out


def health_rps(args: argparse.Namespace, port: int) -> float:
    """Requests/s of GET /health at 32 connections for --duration: what the HTTP front answers with no work."""
    cmd = [args.wrk, "-t1", "-c32", f"-d{args.duration:g}s", f"http://127.0.0.1:{port}/health"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=args.duration + 60)
    found = re.search(r"Requests/sec:\s+([0-9.]+)", proc.stdout)
    if found is None or "Non-2xx" in proc.stdout:
        raise RuntimeError(f"wrk on /health failed: {proc.stdout[-500:]} {proc.stderr[-500:]}")
    time.sleep(args.pause)
    return float(found.group(1))


def unique(
    args: argparse.Namespace, servers: dict[str, bench.Server], model: str, corpus: list[str], work: Path, redis: Any
) -> dict[str, Any]:
    print(f"== {model}: hit rate 0, 32 clients x 1 unique text", flush=True)
    bodies = work / f"{model}-unique.tsv"
    with bodies.open("w", encoding="utf-8") as f:
        for text in corpus:
            # Split where the text ends: unique.lua puts " TAG-N" there.
            head, tail = json.dumps({"model": model, "input": text + "\0"}, ensure_ascii=False).split("\\u0000")
            f.write(f"{head}\t{tail}\n")
    rounds: dict[str, list[dict[str, Any]]] = {s: [] for s in servers}
    for r in range(args.unique_rounds):
        bench.wait_quiet(args, f"hit-rate-0 round {r + 1}")
        for store in rotated(list(servers), r):
            server = servers[store]
            clear(server, store, redis)
            tag = f"{store}{r}x{time.monotonic_ns()}"
            row = wrk_point(args, server, model, UNIQUE_LUA, [str(bodies), URL_PATH, bench.API_KEY, tag])
            rounds[store].append(row)
            print(f"   {store:>6} round {r + 1}: {line(row)}", flush=True)
    return summarize_rounds(rounds)


def rotated(items: list[str], k: int) -> list[str]:
    k %= len(items)
    return items[k:] + items[:k]


def line(row: dict[str, Any]) -> str:
    hit = "-" if row["hit_rate"] is None else f"{100 * row['hit_rate']:.1f}%"
    return (
        f"{row['texts_per_s']:7.1f} texts/s  p50 {row['p50_ms']:6.1f} ms  p99 {row['p99_ms']:6.1f} ms  "
        f"hits {hit}  non-200 {row['non_200']}  sock err {row['socket_errors']}  "
        f"srv cpu {row['server_cpu_pct']:.0f}%  other cpu {row['other_cpu_pct']:.0f}%  "
        f"mean batch {bench.fmt(row['mean_batch'])}"
    )


def summarize_rounds(rounds: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per store: the median round's figures, and its texts/s against "off" round by round."""
    out: dict[str, Any] = {}
    for store, rows in rounds.items():
        pairs = list(zip(rows, rounds["off"], strict=True))
        ratios = [row["texts_per_s"] / off["texts_per_s"] for row, off in pairs]
        cpu = [
            r["cpu_ms_per_text"] / o["cpu_ms_per_text"]
            for r, o in pairs
            if r["cpu_ms_per_text"] and o["cpu_ms_per_text"]
        ]
        med = sorted(rows, key=lambda r: r["texts_per_s"])[(len(rows) - 1) // 2]
        out[store] = {
            **med,
            "vs_off": statistics.median(ratios),
            "vs_off_rounds": ratios,
            "cpu_vs_off": statistics.median(cpu) if cpu else None,
            "non_200_all": sum(r["non_200"] + r["socket_errors"] for r in rows),
            "rounds": rows,
        }
    return out


def shared(
    args: argparse.Namespace, config: Any, model: str, label: str, redis: RedisProc, work: Path, out: Path
) -> dict[str, Any]:
    n, secs = args.limit_rpm, args.limit_seconds
    print(f"== {model}, {label}: two gateways on one Redis; a key limited to {n}/min for {secs:g} s", flush=True)
    redis.flush()
    cfg = write_config(config, model, work / f"{model}-shared-{label}.toml", label, redis.url, [(LIMITED_KEY, n)])
    a = start_gateway(cfg, out / f"server-shared-{label}-a.log", args.ready_timeout)
    try:
        b = start_gateway(cfg, out / f"server-shared-{label}-b.log", args.ready_timeout)
    except RuntimeError:
        a.stop()
        raise
    res: dict[str, Any] = {"rpm": n, "seconds": secs}
    try:
        stamp = time.time_ns()
        # Right after start, then once each gateway has served a request and a second has passed.
        for when in ("fresh", "warm"):
            if when == "warm":
                for server in (a, b):
                    post(server.port, {"model": model, "input": f"warm-up {stamp}"})
                time.sleep(2)
            for first, second, way in ((a, b, "a_then_b"), (b, a, "b_then_a")):
                texts = [
                    f"embedded through one gateway, asked of the other: {way} {when} {stamp} {i}" for i in range(8)
                ]
                s1, h1 = post(first.port, {"model": model, "input": texts})
                time.sleep(0.5)  # the first gateway writes its entries in the background
                s2, h2 = post(second.port, {"model": model, "input": texts})
                res[f"{when}_{way}"] = got = {
                    "status": [s1, s2],
                    "first_hits": int(h1.get("x-cache-hits") or -1),
                    "second_hits": int(h2.get("x-cache-hits") or -1),
                    "texts": len(texts),
                }
                print(f"   {when} {way}: {got}", flush=True)
        before = [scrape(p) for p in (a.port, b.port)]
        res["limit"] = lim = hammer([a.port, b.port], model, secs)
        after = [scrape(p) for p in (a.port, b.port)]
        lim["rate_limit_errors"] = [
            total(y, "gateway_shared_state_errors_total", use="rate_limits")
            - total(x, "gateway_shared_state_errors_total", use="rate_limits")
            for x, y in zip(before, after, strict=True)
        ]
        print(
            f"   200s: {lim['ok']} ({lim['ok_by_gateway']} by gateway), 429s: {lim['s429']}, other: {lim['other']}; "
            f"by 10 s: {lim['ok_by_10s']}; first 60 s: {lim['ok_first_60s']}; most in any 60 s: "
            f"{lim['max_any_60s_sent']} (sent) / {lim['max_any_60s_answered']} (answered); rate-limit calls "
            f"without Redis: {lim['rate_limit_errors']}",
            flush=True,
        )
    finally:
        a.stop()
        b.stop()
    return res


def hammer(ports: list[int], model: str, seconds: float, threads_per_port: int = 2) -> dict[str, Any]:
    """LIMITED_KEY's requests through every port, back to back, for `seconds`: 200s with their times (when each
    was sent and when its answer came: the server admitted it in between)."""
    body = json.dumps({"model": model, "input": "a request against a per-key limit"}).encode()
    headers = {"Authorization": f"Bearer {LIMITED_KEY}", "Content-Type": "application/json"}
    lock = threading.Lock()
    oks: list[tuple[float, int, float]] = []
    counts = {"s429": 0, "other": 0, "errors": 0}
    t0 = time.monotonic()

    def worker(port: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while (now := time.monotonic()) - t0 < seconds:
            try:
                conn.request("POST", URL_PATH, body, headers)
                r = conn.getresponse()
                r.read()
            except (OSError, http.client.HTTPException):
                with lock:
                    counts["errors"] += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                continue
            with lock:
                if r.status == 200:
                    oks.append((now - t0, port, time.monotonic() - t0))
                elif r.status == 429:
                    counts["s429"] += 1
                else:
                    counts["other"] += 1
        conn.close()

    threads = [threading.Thread(target=worker, args=(p,)) for p in ports for _ in range(threads_per_port)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    windows = int(seconds // 10)
    return {
        "ok": len(oks),
        "ok_by_gateway": [sum(1 for _, p, _ in oks if p == port) for port in ports],
        "ok_by_10s": [sum(1 for t, _, _ in oks if 10 * k <= t < 10 * (k + 1)) for k in range(windows)],
        "ok_after_5s": sum(1 for t, _, _ in oks if t >= 5),
        "ok_first_60s": sum(1 for t, _, _ in oks if t < 60),
        "max_any_60s_sent": most_in_60s([t for t, _, _ in oks]),
        "max_any_60s_answered": most_in_60s([t for _, _, t in oks]),
        **counts,
    }


def most_in_60s(times: list[float]) -> int:
    """The most of `times` in any closed 60 s window (those starting at one of them hold the most)."""
    times = sorted(times)
    return max((bisect.bisect_right(times, t + 60) - i for i, t in enumerate(times)), default=0)


def fault(
    args: argparse.Namespace,
    config: Any,
    model: str,
    label: str,
    texts: list[str],
    redis: RedisProc,
    work: Path,
    out: Path,
) -> dict[str, Any]:
    print(
        f"== {model}, {label}: fault, wrk {args.fault_seconds:g} s, redis killed at {args.kill_at:g} s, "
        f"started again at {args.restart_at:g} s",
        flush=True,
    )
    redis.flush()
    cfg = write_config(config, model, work / f"{model}-fault-{label}.toml", label, redis.url, [(FAULT_KEY, 10**8)])
    server = start_gateway(cfg, out / f"server-fault-{label}.log", args.ready_timeout)
    bodies = work / f"{model}-query.jsonl"
    bench.write_bodies(bodies, model, texts, 1)
    script_args = [str(bodies), URL_PATH, FAULT_KEY]
    samples: list[tuple[float, list[tuple[str, dict[str, str], float]]]] = []
    events: dict[str, float] = {}
    stop = threading.Event()

    def scraper() -> None:
        while not stop.is_set():
            samples.append((time.monotonic(), scrape(server.port)))
            stop.wait(0.5)

    def chaos() -> None:
        if stop.wait(args.kill_at):
            return
        events["kill"] = time.monotonic()
        redis.kill()
        if stop.wait(args.restart_at - args.kill_at):
            return
        events["restart"] = time.monotonic()
        redis.start()
        events["redis_ready"] = time.monotonic()

    try:
        run_wrk(args, server.port, EMBED_LUA, script_args, 32, 3)  # warm-up: the cache holds the texts
        server.wait_idle()
        threads = [threading.Thread(target=scraper), threading.Thread(target=chaos)]
        events["start"] = time.monotonic()
        for t in threads:
            t.start()
        w = run_wrk(args, server.port, EMBED_LUA, script_args, 32, args.fault_seconds)
        stop.set()
        for t in threads:
            t.join()
        after = scrape(server.port)
    finally:
        stop.set()
        server.stop()
        if redis.proc is None or redis.proc.poll() is not None:
            redis.start()
    t0 = events["start"]

    def at(t: float) -> list[tuple[str, dict[str, str], float]]:
        """The last sample taken at or before t (the first if none)."""
        found = samples[0][1]
        for ts, s in samples:
            if ts > t:
                break
            found = s
        return found

    def when(t: float) -> float:
        return max((ts for ts, _ in samples if ts <= t), default=samples[0][0])

    first_hit = None
    if "restart" in events:
        for (_, s0), (ts, s1) in itertools.pairwise(samples):
            if ts > events["restart"] and hits_misses(s1, model)[0] > hits_misses(s0, model)[0]:
                first_hit = ts
                break
    end = samples[-1][0]
    bounds = [("redis up", t0 + 1, events.get("kill", end))]
    if "kill" in events:
        bounds.append(("redis down", events["kill"] + 1, events.get("restart", end)))
    if "restart" in events:
        bounds.append(("restarted, before hits", events["restart"], first_hit or end))
    if first_hit:
        bounds.append(("hits back", first_hit, end))
    phases = []
    for label, a, b in bounds:
        s0, s1 = at(a), at(b)
        dt = when(b) - when(a)
        if dt <= 0:
            continue
        (h0, x0), (h1, x1) = hits_misses(s0, model), hits_misses(s1, model)
        ok = "gateway_embedding_requests_total"
        lat_sum = "gateway_http_request_duration_seconds_sum"
        lat_n = "gateway_http_request_duration_seconds_count"
        served = total(s1, lat_n, path=URL_PATH) - total(s0, lat_n, path=URL_PATH)
        phases.append(
            {
                "phase": label,
                "from_s": when(a) - t0,
                "to_s": when(b) - t0,
                "texts_per_s": (total(s1, ok, model=model, status="200") - total(s0, ok, model=model, status="200"))
                / dt,
                "hit_rate": (h1 - h0) / ((h1 - h0) + (x1 - x0)) if (h1 - h0) + (x1 - x0) else None,
                "mean_ms": 1000 * (total(s1, lat_sum, path=URL_PATH) - total(s0, lat_sum, path=URL_PATH)) / served
                if served
                else None,
                "cache_errors": total(s1, "gateway_shared_state_errors_total", use="cache")
                - total(s0, "gateway_shared_state_errors_total", use="cache"),
                "rate_limit_errors": total(s1, "gateway_shared_state_errors_total", use="rate_limits")
                - total(s0, "gateway_shared_state_errors_total", use="rate_limits"),
            }
        )
    res = {
        "wrk": w,
        "non_200": w["s429"] + w["sother"],
        "socket_errors": w["socket_errors"],
        "kill_s": events["kill"] - t0 if "kill" in events else None,
        "restart_s": events["restart"] - t0 if "restart" in events else None,
        "first_hit_after_restart_s": first_hit - events["restart"] if first_hit and "restart" in events else None,
        "errors_before": {u: total(samples[0][1], "gateway_shared_state_errors_total", use=u) for u in USES},
        "errors_after": {u: total(after, "gateway_shared_state_errors_total", use=u) for u in USES},
        "phases": phases,
    }
    for p in phases:
        print(f"   {p}", flush=True)
    print(
        f"   non-200 {res['non_200']}, socket errors {res['socket_errors']}; shared-state errors "
        f"{res['errors_before']} -> {res['errors_after']}; first hit {res['first_hit_after_restart_s']} s "
        "after the restart",
        flush=True,
    )
    return res


USES = ("cache", "rate_limits")


# ------------------------------------------------------------------------------------------------ output


def report(results: dict[str, Any], args: argparse.Namespace) -> str:
    fmt, table = bench.fmt, bench.md_table
    md = [
        f"# Cache benchmark {results['started']}",
        "",
        f"{os.cpu_count()} CPUs, load average at start {results['loadavg_start']:.2f}, at end "
        f"{results['loadavg_end']:.2f}; wrk 1 thread, {args.duration:g} s per run, {args.rounds} rounds "
        f"({args.unique_rounds} at hit rate 0; the median round by texts/s shown; `vs off` columns are the "
        "medians of the per-round ratios).",
    ]
    rows = []
    for model, m in results["models"].items():
        for store, r in m.get("reindex", {}).items():
            off = m["reindex"]["off"]["pass1"]
            cells = [model, store, r["pass1"], r["pass2"], r["pass2"] / r["pass1"], r["pass1"] / off]
            rows.append([*cells, r["pass2_hits"], r["non_200"]])
    if rows:
        md += ["", f"## Re-index: the corpus sent twice, 4 clients x 32 texts (median of {args.reindex_reps})", ""]
        head = ["model", "store", "pass 1 texts/s", "pass 2 texts/s", "pass 2 / pass 1", "pass 1 / off pass 1"]
        md.append(table([*head, "pass 2 hits", "non-200"], rows))
    for key, title in (
        ("query", f"Query-like: 32 clients x 1 text drawn from {args.query_texts} texts, after a 2 s warm-up"),
        ("unique", "Hit rate 0: 32 clients x 1 text, every text unique"),
    ):
        rows = []
        for model, m in results["models"].items():
            for store, r in m.get(key, {}).items():
                hit = None if r["hit_rate"] is None else f"{100 * r['hit_rate']:.1f}%"
                rounds = " / ".join(f"{x:.2f}" for x in r["vs_off_rounds"])
                cells = [model, store, r["texts_per_s"], r["p50_ms"], r["p99_ms"], hit, r["vs_off"], rounds]
                rows.append([*cells, r["cpu_ms_per_text"], r["cpu_vs_off"], r["mean_batch"], r["non_200_all"]])
        if rows:
            head = ["model", "store", "texts/s", "p50 ms", "p99 ms", "hit rate", "vs off", "vs off, each round"]
            head += ["server CPU ms/text", "CPU/text vs off", "mean batch", "non-200 + socket errors"]
            md += ["", f"## {title}", "", table(head, rows)]
        for model, m in results["models"].items():
            q = m.get(key, {})
            if key == "query" and "health_rps_rounds" in q.get("off", {}):
                ceilings = " / ".join(f"{c:.0f}" for c in q["off"]["health_rps_rounds"])
                parts = ", ".join(f"{store} {r['vs_health']:.2f}" for store, r in q.items())
                md += [
                    "",
                    f"{model}: the HTTP front's ceiling, GET /health at 32 connections on the same server before "
                    f"each round: {ceilings} requests/s; texts/s as a share of it (median of rounds): {parts}.",
                ]
    for label, sh in results["shared"].items():
        lim = sh["limit"]

        def hits(when: str, sh: dict[str, Any] = sh) -> str:
            got = [(way.replace("_then_", " then "), sh[f"{when}_{way}"]) for way in ("a_then_b", "b_then_a")]
            return ", ".join(f"{way}: {g['second_hits']}/{g['texts']}" for way, g in got)

        md += [
            "",
            f"## Two gateways, one Redis ({results['shared_model']}, {label})",
            "",
            f"- Texts embedded through one gateway, then asked of the other (hits/texts): right after start "
            f"{hits('fresh')}; once both had served a request {hits('warm')}.",
            f"- Key limited to {sh['rpm']} requests/minute, hammered through both for {sh['seconds']:g} s: "
            f"{lim['ok']} answers of 200 ({' + '.join(map(str, lim['ok_by_gateway']))} by gateway), "
            f"{lim['s429']} of 429, {lim['other']} other, {lim['errors']} connection errors; by 10 s: "
            f"{', '.join(map(str, lim['ok_by_10s']))}; {lim['ok_first_60s']} in the first 60 s, at most "
            f"{lim['max_any_60s_sent']} in any 60 s by the time each was sent ({lim['max_any_60s_answered']} by "
            f"its answer's); the window allows {sh['rpm']} in any 60 s. Limit checks that went without Redis "
            f"(per-process windows): {' + '.join(f'{x:.0f}' for x in lim['rate_limit_errors'])}.",
        ]
    off = results["models"].get(results["shared_model"], {}).get("query", {}).get("off")
    for label, fa in results["fault"].items():
        rows = [
            [
                p["phase"],
                f"{p['from_s']:.1f}-{p['to_s']:.1f}",
                p["texts_per_s"],
                None if p["hit_rate"] is None else f"{100 * p['hit_rate']:.1f}%",
                p["mean_ms"],
                p["cache_errors"],
                p["rate_limit_errors"],
            ]
            for p in fa["phases"]
        ]
        md += [
            "",
            f"## Fault: redis-server killed under load ({results['shared_model']}, {label}, 32 clients, "
            "repeated texts)",
            "",
            f"Killed at {fmt(fa['kill_s'])} s, started again at {fmt(fa['restart_s'])} s of {args.fault_seconds:g}"
            f" s; non-200 answers: {fa['non_200']}, socket errors: {fa['socket_errors']}; "
            f"gateway_shared_state_errors_total {fa['errors_before']} before, {fa['errors_after']} after; "
            f"first cache hit {fmt(fa['first_hit_after_restart_s'])} s after the restart."
            + (
                f" For reference, store off in the query-like run: {off['texts_per_s']:.0f} texts/s, "
                f"p50 {off['p50_ms']:.1f} ms."
                if off
                else ""
            ),
            "",
            table(["phase", "s", "texts/s", "hit rate", "server mean ms", "cache errors", "rate-limit errors"], rows),
        ]
    return "\n".join(md) + "\n"


# ------------------------------------------------------------------------------------------------ main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(bench.ROOT / "gateway.toml"))
    p.add_argument("--models", default="minilm-onnx-int8", help="comma-separated (default: minilm-onnx-int8)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run (default 10)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the query-like runs (default 3)")
    p.add_argument("--unique-rounds", type=int, default=5, help="rounds of the hit-rate-0 runs (default 5)")
    p.add_argument("--reindex-reps", type=int, default=3, help="re-index repetitions per store (median kept)")
    p.add_argument("--query-texts", type=int, default=50, help="distinct texts of the query-like runs")
    p.add_argument("--limit-rpm", type=int, default=60, help="requests_per_minute of the limited key")
    p.add_argument("--limit-seconds", type=float, default=60.0, help="how long the limited key is hammered")
    p.add_argument("--fault-seconds", type=float, default=40.0)
    p.add_argument("--kill-at", type=float, default=10.0)
    p.add_argument("--restart-at", type=float, default=20.0)
    p.add_argument(
        "--redis-timeouts",
        type=lambda v: [float(x) for x in v.split(",") if x.strip()],
        default=[100.0, 500.0],
        help="[redis] timeout_ms of the Redis stores measured (default 100,500; 100 is the config's default)",
    )
    p.add_argument("--skip", default="", help="comma-separated phases to skip: reindex,query,unique,shared,fault")
    p.add_argument("--pause", type=float, default=1.0)
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=30.0,
        help="before each round, wait up to this many seconds for other processes to go quiet (default 30)",
    )
    p.add_argument("--quiet-pct", type=float, default=25.0, help="'quiet': others use under this %% of a core")
    p.add_argument("--ready-timeout", type=float, default=180.0)
    p.add_argument("--wrk", default=shutil.which("wrk") or "/usr/bin/wrk")
    p.add_argument("--redis-server", default=None, help="server binary (default: the one the lock installs)")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args()
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    sys.path.insert(0, str(bench.ROOT))
    from gateway.shared import local_redis

    args.redis_server = args.redis_server or str(local_redis.binary())
    for exe, what in ((args.wrk, "wrk"), (args.redis_server, "redis-server")):
        if not Path(exe).exists():
            print(f"error: {what} not found at {exe} (Debian/Ubuntu: apt-get install {what})", file=sys.stderr)
            return 2
    from gateway.base.config import load_config

    config = load_config(args.config)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in config.models]
    if unknown:
        print(f"error: not in {args.config}: {', '.join(unknown)}", file=sys.stderr)
        return 2
    corpus = bench.load_corpus()
    # Spread over the corpus: short and long texts alike.
    repeated = corpus[:: max(1, len(corpus) // args.query_texts)][: args.query_texts]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) / f"{stamp}-cache"
    out.mkdir(parents=True)
    work = out / "work"
    work.mkdir()
    results: dict[str, Any] = {
        "started": stamp,
        "loadavg_start": os.getloadavg()[0],
        "args": vars(args),
        "models": {},
        "shared_model": models[0],
        "shared": {},
        "fault": {},
    }
    redis_labels = [f"redis-{ms:g}ms" for ms in args.redis_timeouts]
    labels = ["off", "memory", *redis_labels]
    redis = RedisProc(args.redis_server, work, out / "redis.log")
    redis.start()
    try:
        for model in models:
            m: dict[str, Any] = {}
            results["models"][model] = m
            if not {"reindex", "query", "unique"} - skip:
                continue
            servers: dict[str, bench.Server] = {}
            try:
                for label in labels:
                    cfg = write_config(config, model, work / f"{model}-{label}.toml", label, redis.url, [])
                    servers[label] = start_gateway(cfg, out / f"server-{model}-{label}.log", args.ready_timeout)
                for server in servers.values():
                    # The runtime's first calls are slow (shapes, allocations): warmed on texts never measured.
                    reindex_pass(server.port, model, [f"warm-up: {t}" for t in corpus[:256]], 32, 4)
                    server.wait_idle()
                if "reindex" not in skip:
                    m["reindex"] = reindex(args, servers, model, corpus, redis)
                if "query" not in skip:
                    m["query"] = query_like(args, servers, model, repeated, work, redis)
                if "unique" not in skip:
                    m["unique"] = unique(args, servers, model, corpus, work, redis)
            finally:
                for server in servers.values():
                    server.stop()
        for label in redis_labels:
            if "shared" not in skip:
                results["shared"][label] = shared(args, config, models[0], label, redis, work, out)
            if "fault" not in skip:
                results["fault"][label] = fault(args, config, models[0], label, repeated, redis, work, out)
    finally:
        redis.stop()
    results["loadavg_end"] = os.getloadavg()[0]
    md = report(results, args)
    (out / "results.md").write_text(md, encoding="utf-8")
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
    print()
    print(md)
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
