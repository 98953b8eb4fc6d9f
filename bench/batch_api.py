"""The Batch API through a real `gateway serve`, against `gateway embed-file`; interactive latency during a job;
a server killed mid-job (issue 35)

    .venv/bin/python bench/batch_api.py [--config gateway.toml] [--models minilm,minilm-onnx-int8] [--n 20000]
                                        [--rounds 1] [--latency-requests 300] [--variants default]
                                        [--skip restart] [--kill-at 0.5]

Corpus: bench/embed_file.py's (the STS-B sentences, every split, round again up to `--n`). For each round, each
model in turn, `gateway embed-file` and the Batch API alternate (embed-file first in odd rounds, the job first
in even ones), so that drift hits both alike:
  embed-file: bench/embed_file.py's run (its own process, cache off, its printed texts/s);
  server: `gateway serve` on a config holding that model alone, cache off, a fresh batches folder, the model's
      `[batching]` as `--variants` names (`default`, or `key=value+key=value` pairs added to it, `options.K=V`
      for the backend's option K; `;` between variants: each gets a server of its own); after /ready, one
      int8 request waits out the calibration (`calibrate = "load"` on torch runs in the batcher's background
      lane: it must not be measured as the job); then
      (a) idle: `--latency-requests` POST /v1/embeddings of one text each from one keep-alive client (c1);
          the job alone: the official `openai` client uploads the JSONL, creates the batch and polls (every
          0.1 s) until it is completed; texts/s from `batches.create` to the poll that saw it completed;
      (b) the same job again, the c1 client sending requests all the while (at most twice the job's time alone,
          "c1 capped" when it stopped before the job ended): p50/p99 during, and that job's texts/s (the
          client takes CPU from the job on 2 cores: both figures are the trade);
      (c) (first variant only, unless `--skip restart`) the job a third time; when `--kill-at` of its lines are
          done the server gets SIGKILL, starts again (same folder) and the job finishes: every custom_id once,
          the largest |difference| of its vectors from (a)'s (beside (b)'s from (a)'s: int8's dynamic
          quantization makes a vector depend on its batch-mates, so two uninterrupted runs differ too), and
          what the restart cost (job time minus (a)'s).
Results: markdown tables on stdout and bench/results/<timestamp>-batch-api/results.json. Run it under
`flock /tmp/bench.lock` on a shared machine.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import embed_file  # noqa: E402  (the corpus, embed-file's run and its config)
import run as bench  # noqa: E402  (Server, write_model_config, free_port)

DONE = ("completed", "failed", "cancelled", "expired")


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


def parse_variants(spec: str) -> list[tuple[str, dict[str, Any]]]:
    """`default;background_batch_ms=20+return_wait=0.2` -> [(label, {batching overrides})]."""
    out: list[tuple[str, dict[str, Any]]] = []
    for part in spec.split(";"):
        part = part.strip()
        overrides: dict[str, Any] = {}
        if part and part != "default":
            for pair in part.split("+"):
                k, v = pair.split("=", 1)
                overrides[k.strip()] = json.loads(v)
        out.append((part or "default", overrides))
    return out


class Gateway:
    """One `gateway serve` on `config`, with an openai client and a keep-alive httpx client for c1 requests."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config, self.log = config, log
        self.port = bench.free_port(18_000 + os.getpid() % 1000)
        self.server: bench.Server | None = None

    def start(self, model: str, limit_s: float = 300) -> float:
        """Starts the server and waits for /ready and the model's calibration; the seconds it took."""
        import httpx

        started = time.perf_counter()
        self.server = bench.gateway_server(self.config, self.port, self.log)
        ok, why = self.server.ready(limit_s)
        if not ok:
            raise SystemExit(f"server not ready: {why}; log {self.log}")
        with httpx.Client(timeout=limit_s) as c:
            body = {"model": model, "input": ["calibrated yet?"], "encoding_format": "int8"}
            while True:  # an int8 request waits for the ranges; 504 past the request timeout, calibration goes on
                r = c.post(self.url("/v1/embeddings"), json=body, headers=self.headers())
                if r.status_code == 200:
                    break
                if r.status_code != 504 or time.perf_counter() - started > limit_s:
                    raise SystemExit(f"calibration: {r.status_code} {r.text[:300]}")
        return time.perf_counter() - started

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @staticmethod
    def headers() -> dict[str, str]:
        return {"Authorization": f"Bearer {bench.API_KEY}"}

    def openai(self) -> Any:
        import openai

        return openai.OpenAI(base_url=self.url("/v1"), api_key=bench.API_KEY, max_retries=5, timeout=120)

    def kill(self) -> None:
        assert self.server is not None
        self.server.proc.send_signal(signal.SIGKILL)
        self.server.proc.wait()
        self.server.log.close()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


def c1_latencies(gw: Gateway, model: str, texts: list[str], stop: threading.Event | None, count: int) -> list[float]:
    """One keep-alive client, one text per request, each sent when the last was answered: ms each. Runs `count`
    requests, or (with `stop`) until it is set."""
    import httpx

    out: list[float] = []
    with httpx.Client(timeout=60, headers=gw.headers()) as c:
        k = 0
        while (stop is None and k < count) or (stop is not None and not stop.is_set()):
            body = {"model": model, "input": texts[k % len(texts)]}
            t0 = time.perf_counter()
            r = c.post(gw.url("/v1/embeddings"), json=body)
            dt = (time.perf_counter() - t0) * 1000
            if r.status_code != 200:
                raise RuntimeError(f"c1: {r.status_code} {r.text[:300]}")
            out.append(dt)
            k += 1
    return out


def upload(client: Any, model: str, texts: list[str]) -> str:
    lines = (
        json.dumps(
            {"custom_id": f"t{i}", "method": "POST", "url": "/v1/embeddings", "body": {"model": model, "input": t}}
        )
        for i, t in enumerate(texts)
    )
    data = ("\n".join(lines) + "\n").encode()
    return str(client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch").id)


def run_job(client: Any, file_id: str, kill_when: int | None = None) -> tuple[str, float, Any]:
    """Creates a batch of `file_id` and polls it until done (or until `kill_when` lines are done: then returns
    at once, status "killpoint"); its id, the seconds from create to the poll that saw it, the batch."""
    started = time.perf_counter()
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/embeddings", completion_window="24h")
    while True:
        got = client.batches.retrieve(batch.id)
        if got.status in DONE:
            return batch.id, time.perf_counter() - started, got
        if kill_when is not None and got.request_counts is not None and got.request_counts.completed >= kill_when:
            return batch.id, time.perf_counter() - started, "killpoint"
        time.sleep(0.1)


def wait_job(client: Any, batch_id: str) -> Any:
    while True:
        got = client.batches.retrieve(batch_id)
        if got.status in DONE:
            return got
        time.sleep(0.1)


def outputs(client: Any, batch: Any) -> dict[str, list[list[float]]]:
    """custom_id -> the vectors of each output line that carries it (a list, so that a duplicate shows)."""
    out: dict[str, list[list[float]]] = {}
    if batch.output_file_id is None:
        return out
    for line in client.files.content(batch.output_file_id).content.splitlines():
        row = json.loads(line)
        out.setdefault(row["custom_id"], []).append(row["response"]["body"]["data"][0]["embedding"])
    return out


def compare(n: int, ref: dict[str, list[list[float]]], got: dict[str, list[list[float]]]) -> dict[str, Any]:
    import numpy as np

    ids = {f"t{i}" for i in range(n)}
    lost = len(ids - set(got))
    dup = sum(len(v) - 1 for v in got.values())
    diffs = [float(np.abs(np.asarray(got[k][0]) - np.asarray(ref[k][0])).max()) for k in ids if k in got and k in ref]
    return {"lost": lost, "duplicated": dup, "extra": len(set(got) - ids), "max_abs_diff": max(diffs, default=None)}


def serve_variant(
    args: argparse.Namespace,
    model: str,
    label: str,
    overrides: dict[str, Any],
    texts: list[str],
    work: Path,
    restart: bool,
) -> dict[str, Any]:
    """One server with this `[batching]`: idle c1, the job alone, the job with c1, and (if `restart`) the kill."""
    import msgspec

    from gateway.base.config import load_config

    config = load_config(args.config)
    # `options.K=V`: the backend's own option K (the runtime's threads, say); the rest are `[batching]` keys.
    options = {k.split(".", 1)[1]: v for k, v in overrides.items() if k.startswith("options.")}
    batching = {k: v for k, v in overrides.items() if not k.startswith("options.")}
    if options:
        spec = config.models[model]
        config.models[model] = msgspec.structs.replace(spec, options={**spec.options, **options})
    tag = f"{model}-{label}".replace("=", "").replace("+", "_").replace(".", "")
    path = work / f"{tag}.toml"
    bench.write_model_config(config, model, path, access_log=False, **batching)
    data = work / f"{tag}-data"
    with path.open("a", encoding="utf-8") as f:
        f.write(f"\n[batches]\ndata_dir = {json.dumps(str(data))}\n")
    gw = Gateway(path, work / f"{tag}.log")
    row: dict[str, Any] = {"variant": label, "overrides": overrides}
    probe = texts[: max(1, min(len(texts), 500))]
    try:
        row["start_s"] = gw.start(model, args.ready_timeout)
        client = gw.openai()
        c1_latencies(gw, model, probe, None, 30)  # warm-up
        idle = c1_latencies(gw, model, probe, None, args.latency_requests)
        row["idle_p50"], row["idle_p99"] = statistics.median(idle), pct(idle, 0.99)
        file_id = upload(client, model, texts)
        _, seconds, alone = run_job(client, file_id)
        assert alone.status == "completed", alone
        row["job_s"], row["job_rate"] = seconds, len(texts) / seconds
        reference = outputs(client, alone)
        row["job_check"] = compare(len(texts), reference, reference)
        stop = threading.Event()
        during: list[float] = []
        thread = threading.Thread(target=lambda: during.extend(c1_latencies(gw, model, probe, stop, 0)))
        thread.start()
        # A client sending without pause could hold a job back for good (background_grace_ms): c1 stops after
        # twice the job's time alone, and the job then finishes on its own; "c1 capped" says so.
        cap = threading.Timer(2 * row["job_s"] + 5, stop.set)
        cap.start()
        try:
            _, seconds, busy = run_job(client, file_id)
        finally:
            row["c1_capped"] = stop.is_set()
            stop.set()
            cap.cancel()
            thread.join()
        row["busy_job_s"], row["busy_job_rate"] = seconds, len(texts) / seconds
        row["during_p50"], row["during_p99"], row["during_n"] = (
            statistics.median(during),
            pct(during, 0.99),
            len(during),
        )
        row["p50_ratio"] = row["during_p50"] / row["idle_p50"]
        row["busy_check"] = compare(len(texts), reference, outputs(client, busy))
        if restart:
            row["restart"] = kill_mid_job(args, gw, model, client, file_id, len(texts), reference, row["job_s"])
    finally:
        gw.stop()
    return row


def kill_mid_job(
    args: argparse.Namespace,
    gw: Gateway,
    model: str,
    client: Any,
    file_id: str,
    n: int,
    reference: dict[str, list[list[float]]],
    alone_s: float,
) -> dict[str, Any]:
    """(c): SIGKILL when `--kill-at` of the lines are done, start again, wait for the end; the checks."""
    started = time.perf_counter()
    batch_id, _, status = run_job(client, file_id, kill_when=int(n * args.kill_at))
    if status != "killpoint":
        return {"error": f"the job ended ({status.status}) before {args.kill_at:.0%} of it was seen done"}
    seen = client.batches.retrieve(batch_id).request_counts.completed
    gw.kill()
    killed = time.perf_counter()
    start_s = gw.start(model, args.ready_timeout)
    client = gw.openai()
    final = wait_job(client, batch_id)
    total = time.perf_counter() - started
    check = compare(n, reference, outputs(client, final))
    return {
        "status": final.status,
        "done_at_kill": seen,
        "killed_after_s": killed - started,
        "restart_s": start_s,
        "total_s": total,
        "cost_s": total - alone_s,
        **check,
        "completed": final.request_counts.completed,
        "failed": final.request_counts.failed,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "gateway.toml"))
    p.add_argument("--models", default="minilm,minilm-onnx-int8")
    p.add_argument("--n", type=int, default=20_000)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--latency-requests", type=int, default=300)
    p.add_argument("--variants", default="default", help="`;`-separated: default, or k=v+k=v [batching] overrides")
    p.add_argument("--skip", default="", help="restart, embed-file (comma-separated)")
    p.add_argument("--kill-at", type=float, default=0.5)
    p.add_argument("--ready-timeout", type=float, default=300)
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    variants = parse_variants(args.variants)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results_dir = HERE / "results" / f"{stamp}-batch-api"
    results_dir.mkdir(parents=True, exist_ok=True)
    # embed-file's own knobs, at its defaults
    ef_args = argparse.Namespace(config=args.config, window=4096, request_size=256, request_chars=8192, concurrency=2)
    texts = embed_file.corpus(args.n)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus_path = work / "corpus.jsonl"
        corpus_path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
        for round_ in range(args.rounds):
            for model in args.models.split(","):
                row: dict[str, Any] = {"round": round_ + 1, "model": model}
                ef_config = embed_file.model_config(ef_args, model, work / f"{model}-ef.toml")

                def ef(row: dict[str, Any] = row, cfg: Path = ef_config, model: str = model) -> None:
                    if "embed-file" not in skip:
                        row["embed_file"] = embed_file.run_embed_file(ef_args, cfg, model, corpus_path, work)

                def jobs(row: dict[str, Any] = row, model: str = model) -> None:
                    row["variants"] = [
                        serve_variant(args, model, label, o, texts, work, k == 0 and "restart" not in skip)
                        for k, (label, o) in enumerate(variants)
                    ]

                for step in (ef, jobs) if round_ % 2 == 0 else (jobs, ef):
                    step()
                if "embed_file" in row:
                    for v in row["variants"]:
                        v["vs_embed_file"] = v["job_rate"] / row["embed_file"]["rate"]
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    (results_dir / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    report(rows, args)
    print(f"\n{args.n} texts; results in {results_dir}")
    return 0


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(
        "| round | model | variant | embed-file texts/s | job alone texts/s | ratio | c1 p50 idle | c1 p50 during "
        "| p50 ratio | c1 p99 idle / during | job texts/s with c1 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ef = r.get("embed_file", {}).get("rate", float("nan"))
        for v in r["variants"]:
            print(
                f"| {r['round']} | {r['model']} | {v['variant']} | {ef:.0f} | {v['job_rate']:.0f} | "
                f"{v['job_rate'] / ef:.2f} | {v['idle_p50']:.1f} ms | {v['during_p50']:.1f} ms | "
                f"{v['p50_ratio']:.2f} | {v['idle_p99']:.1f} / {v['during_p99']:.1f} ms | {v['busy_job_rate']:.0f}"
                f"{' (c1 capped)' if v.get('c1_capped') else ''} |"
            )
    restarts = [(r, v["restart"], v["busy_check"]) for r in rows for v in r["variants"] if "restart" in v]
    if restarts:
        print(
            "\n| round | model | done at kill | status | lost | duplicated | max abs diff vs uninterrupted | the same, "
            "two uninterrupted runs | restart (start + calibration) | job time, uninterrupted / killed | cost |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r, x, floor in restarts:
            if "error" in x:
                print(f"| {r['round']} | {r['model']} | {x['error']} |")
                continue
            alone = x["total_s"] - x["cost_s"]
            print(
                f"| {r['round']} | {r['model']} | {x['done_at_kill']} / {args.n} | {x['status']} | {x['lost']} | "
                f"{x['duplicated']} | {x['max_abs_diff']:.2g} | {floor['max_abs_diff']:.2g} | {x['restart_s']:.1f} s | "
                f"{alone:.1f} / "
                f"{x['total_s']:.1f} s | {x['cost_s']:.1f} s |"
            )


if __name__ == "__main__":
    sys.exit(main())
