"""The gateway process's CPU per batch for a model on Ray Serve, and Ray's 1 replica against in-process.

    .venv/bin/python bench/ray_front.py [--batches 60] [--rounds 2] [--profile]

No HTTP: RayBackend.embed (what the batcher calls) is driven directly with batches of 32 corpus texts,
tokenized beforehand (the front tokenizes the same way whatever the placement). One local Ray started by the
backend itself, int8 MiniLM (ONNX) on 1 replica (num_cpus 1, the same options as in-process), beside the same
model in-process. Per variant, in turns: 1 batch in flight (what the batcher keeps for one replica), then 2
threads each keeping one in flight.
Reported: texts/s, and the gateway process's CPU per batch (time.process_time: all its threads), split by thread
name from /proc/self/task (Ray's driver runs in threads of its own). In-process that CPU is the model's compute;
on Ray it is what Ray costs the front. --profile: cProfile of the calling thread over the Ray variant.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import run as bench  # noqa: E402 - bench/run.py: the corpus

INT8 = ROOT / "models" / "minilm-onnx-int8"
TICK = os.sysconf("SC_CLK_TCK")


def thread_cpu() -> Counter[str]:
    """CPU seconds of this process's live threads, summed by thread name."""
    out: Counter[str] = Counter()
    for task in Path("/proc/self/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # Group numbered threads (a pool's workers) under one name.
        out[name.rstrip("0123456789_-")] += (int(fields[11]) + int(fields[12])) / TICK
    return out


def drive(
    embed: Callable[[list[str], list[list[int]]], Any],
    batches: list[tuple[list[str], list[list[int]]]],
    n: int,
    clients: int,
) -> dict[str, Any]:
    """`n` calls of `embed` over `batches`, `clients` at a time; texts/s and this process's CPU per batch."""
    lock = threading.Lock()
    next_i = [0]

    def worker() -> None:
        while True:
            with lock:
                i = next_i[0]
                if i >= n:
                    return
                next_i[0] += 1
            texts, ids = batches[i % len(batches)]
            embed(texts, ids)

    threads_before = thread_cpu()
    cpu0, t0 = time.process_time(), time.perf_counter()
    workers = [threading.Thread(target=worker) for _ in range(clients)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
    threads = thread_cpu()
    threads.subtract(threads_before)
    texts = sum(len(batches[i % len(batches)][0]) for i in range(n))
    top = {k: round(v * 1000 / n, 1) for k, v in threads.most_common(6) if v > 0}
    return {"texts_s": texts / wall, "cpu_ms_per_batch": cpu * 1000 / n, "threads_ms_per_batch": top}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=60, help="batches per point")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds measured idle")
    parser.add_argument("--models", type=int, default=1, help="models on Ray in the process (only the first driven)")
    args = parser.parse_args()
    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="gw-rb-", dir="/tmp"))

    from gateway_onnx.backend import OnnxBackend, OnnxOptions
    from gateway_ray import RayOptions
    from gateway_ray.front import RayBackend

    corpus = bench.load_corpus()
    local = OnnxBackend(model="int8", path=str(INT8), options=OnnxOptions())
    local.load()
    batches = []
    for start in range(0, len(corpus) - 32, 32):
        texts = corpus[start : start + 32]
        batches.append((texts, [list(ids) for ids in local.tokenize(texts)]))
    remote = RayBackend(
        OnnxBackend,
        model="int8-ray",
        path=str(INT8),
        options=OnnxOptions(),
        trust_remote_code=False,
        ray=RayOptions(replicas=1, num_cpus=1),
    )
    remote.load()
    # More models on Ray beside it, as a gateway may have (each one more set of Ray's per-model threads and calls).
    others = [
        RayBackend(
            OnnxBackend,
            model=f"int8-ray-{i}",
            path=str(INT8),
            options=OnnxOptions(intra_op_threads=1),
            trust_remote_code=False,
            ray=RayOptions(replicas=1, num_cpus=0),
        )
        for i in range(1, args.models)
    ]
    for other in others:
        other.load()
    try:
        for texts, ids in batches[:4]:  # warm both
            local.embed(texts, ids)
            remote.embed(texts, ids)
        results: dict[str, list[dict[str, Any]]] = {}
        # What Ray costs the gateway process with nothing to do (its driver's and the status poller's threads).
        idle_before, cpu0 = thread_cpu(), time.process_time()
        time.sleep(args.idle)
        idle = thread_cpu()
        idle.subtract(idle_before)
        idle_ms = (time.process_time() - cpu0) * 1000 / args.idle
        print(
            f"idle, Ray connected, {args.models} model(s) on Ray: {idle_ms:.1f} ms of CPU per second: "
            + ", ".join(f"{k} {v * 1000 / args.idle:.1f}" for k, v in idle.most_common(6) if v > 0)
        )
        for r in range(args.rounds):
            order = [("in-process", local.embed), ("1 replica", remote.embed)]
            for name, fn in order if r % 2 == 0 else order[::-1]:
                for clients in (1, 2):
                    key = f"{name}, {clients} x 32"
                    results.setdefault(key, []).append(drive(fn, batches, args.batches, clients))
        print("| variant | texts/s (rounds) | gateway CPU ms/batch (rounds) | by thread, ms/batch (last round) |")
        print("|---|---|---|---|")
        for key, runs in results.items():
            rates = ", ".join(f"{x['texts_s']:.0f}" for x in runs)
            cpus = ", ".join(f"{x['cpu_ms_per_batch']:.1f}" for x in runs)
            threads = ", ".join(f"{k} {v}" for k, v in runs[-1]["threads_ms_per_batch"].items())
            print(f"| {key} | {rates} | {cpus} | {threads} |")
        for clients in (1, 2):
            ratio = [
                b["texts_s"] / a["texts_s"]
                for a, b in zip(
                    results[f"in-process, {clients} x 32"], results[f"1 replica, {clients} x 32"], strict=True
                )
            ]
            print(f"1 replica / in-process at {clients} x 32: " + ", ".join(f"{x:.2f}" for x in ratio))
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            for i in range(args.batches):
                remote.embed(*batches[i % len(batches)])
            prof.disable()
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
            print(out.getvalue())
    finally:
        for other in others:
            other.close()
        remote.close()
        local.close()


if __name__ == "__main__":
    main()
