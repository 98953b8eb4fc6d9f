"""Rerank (issue 34): 1 query x 64 documents through HTTP against `CrossEncoder.predict` in-process on the same
folder, and against Infinity's `/rerank` where it runs here; ratios in one run, rounds alternated.

    .venv/bin/python bench/rerank.py [--folder DIR] [--documents 64] [--requests 30] [--rounds 3]
                                     [--threads 0] [--infinity-bin PATH]

The reranker: a local sentence-transformers CrossEncoder folder (--folder), else the tests' tiny random-weight
BERT reranker built into a temp folder. The gateway (`python -m gateway serve`, torch backend, task = "rerank",
cache off) and Infinity (`infinity_emb v2 --engine torch`, from its own venv: --infinity-bin, $INFINITY_BIN or
PATH; skipped with the reason when absent) each answer one client at a time (a keep-alive connection, one
request in flight): per round, `--requests` requests to each server in turn and as many `predict` calls here,
so that the machine's load hits all alike. `predict` runs with its default batch size (32), as the gateway's
torch reranker batches pairs (32 a batch). Prints the per-call p50 and pairs/s of each, the ratios per round,
and the scores' max |diff| against `predict` (parity).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as bench  # noqa: E402  (server helpers, corpus)


class Client:
    """One keep-alive HTTP/1.1 connection to a local server, posting JSON."""

    def __init__(self, port: int, headers: dict[str, str]) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        self.headers = {"Content-Type": "application/json", **headers}

    def post(self, path: str, body: dict[str, Any]) -> Any:
        try:
            self.conn.request("POST", path, body=json.dumps(body), headers=self.headers)
            response = self.conn.getresponse()
        except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
            # The server closed the idle keep-alive connection while the other sides ran: a new one.
            self.conn.close()
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
            self.conn.request("POST", path, body=json.dumps(body), headers=self.headers)
            response = self.conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"POST {path}: HTTP {response.status}: {data[:300]!r}")
        return json.loads(data)

    def close(self) -> None:
        self.conn.close()


def build_tiny(dst: Path) -> Path:
    """The tests' tiny random-weight BERT reranker (tests/parity/zoo.py), saved as a CrossEncoder folder."""
    sys.path.insert(0, str(bench.ROOT))
    from tests.parity.zoo import build_cross_encoder

    return build_cross_encoder(dst / "tiny-ce")


def timed(call: Any, n: int) -> list[float]:
    """Seconds of each of `n` calls."""
    out = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        out.append(time.perf_counter() - start)
    return out


def infinity_server(args: argparse.Namespace, folder: Path, work: Path, out: Path) -> tuple[Any, str]:
    """Infinity serving `folder` (its Server), or (None, why not)."""
    want = args.infinity_bin or os.environ.get("INFINITY_BIN") or "infinity_emb"
    exe = shutil.which(want)
    if exe is None:
        return None, (
            f"infinity_emb executable not found ({want!r}): Infinity skipped; install infinity-emb[server,torch] "
            "in a separate venv and pass --infinity-bin or set INFINITY_BIN"
        )
    port = bench.free_port(args.port + 1)
    cmd = [exe, "v2", "--model-id", str(folder), "--served-model-name", "ce", "--engine", "torch", "--device", "cpu"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--no-model-warmup"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DO_NOT_TRACK="1", INFINITY_HOME=str(work))
    server = bench.Server(cmd, port, out / "server-infinity.log", "/health", env)
    ok, why = server.ready(args.ready_timeout)
    if not ok:
        server.stop()
        return None, f"infinity did not start: {why}"
    return server, ""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--folder", help="a local CrossEncoder folder (default: build the tiny random BERT reranker)")
    p.add_argument("--documents", type=int, default=64)
    p.add_argument("--requests", type=int, default=30, help="calls to each side per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads, here and in the gateway (0: torch's)")
    p.add_argument("--port", type=int, default=8790)
    p.add_argument("--ready-timeout", type=float, default=180.0)
    p.add_argument("--infinity-bin", help="infinity_emb executable (default: $INFINITY_BIN, else on PATH)")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-rerank-"))
    out = bench.HERE / "results" / time.strftime("rerank-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    folder = Path(args.folder).resolve() if args.folder else build_tiny(work)
    corpus = bench.load_corpus()
    query, documents = corpus[0], corpus[1 : 1 + args.documents]
    pairs = [(query, d) for d in documents]

    import torch
    from sentence_transformers import CrossEncoder

    if args.threads:
        torch.set_num_threads(args.threads)
    cross = CrossEncoder(str(folder), device="cpu")
    want = cross.predict(pairs, show_progress_bar=False)

    threads = f"\n[models.ce.options]\nthreads = {args.threads}\n" if args.threads else ""
    config = work / "gateway.toml"
    config.write_text(
        f'[server]\naccess_log = false\n[cache]\nstore = "off"\n'
        f'[models.ce]\nbackend = "torch"\npath = "{folder}"\ntask = "rerank"\n{threads}'
    )
    port = bench.free_port(args.port)
    gateway = bench.gateway_server(config, port, out / "server-gateway.log")
    ok, why = gateway.ready(args.ready_timeout)
    if not ok:
        print(f"the gateway did not start: {why}")
        gateway.stop()
        return 1
    infinity, skipped = infinity_server(args, folder, work, out)
    if infinity is None:
        print(skipped, flush=True)
    try:
        gw = Client(port, {"Authorization": f"Bearer {bench.API_KEY}"})
        # predict cuts a pair over the model's limit (longest text first): the gateway does when asked to.
        body = {"model": "ce", "query": query, "documents": documents, "truncate": True}
        got = gw.post("/v2/rerank", body)
        diff = max(abs(r["relevance_score"] - float(want[r["index"]])) for r in got["results"])
        order = [r["index"] for r in got["results"]] == sorted(range(len(want)), key=lambda i: -want[i])
        print(f"parity: max |diff| {diff:.2e} against predict, same order: {order}", flush=True)
        inf = Client(infinity.port, {}) if infinity is not None else None
        sides: dict[str, Any] = {
            "gateway /v2/rerank": lambda: gw.post("/v2/rerank", body),
            "predict in-process": lambda: cross.predict(pairs, show_progress_bar=False),
        }
        if inf is not None:
            # Infinity cuts over-long pairs by itself (and its body has no `truncate`).
            plain = {"model": "ce", "query": query, "documents": documents}
            sides["infinity /rerank"] = lambda: inf.post("/rerank", plain)
        for call in sides.values():  # warm-up: first-call costs out of the figures
            for _ in range(3):
                call()
        rounds: list[dict[str, float]] = []
        for k in range(args.rounds):
            p50 = {}
            for name, call in sides.items():
                call()  # untimed: a reconnect after the other sides' turn stays out of the figures
                p50[name] = statistics.median(timed(call, args.requests))
            rounds.append(p50)
            ratios = ", ".join(
                f"{name} {p50[name] / p50['predict in-process']:.2f}x" for name in p50 if not name.startswith("predict")
            )
            line = ", ".join(f"{name} {v * 1000:.1f} ms" for name, v in p50.items())
            print(f"round {k + 1}: p50 {line}; against predict: {ratios}", flush=True)
        print(f"\n{args.documents} documents a call, {args.requests} calls per side per round, median of rounds:")
        print("| side | p50 ms | pairs/s | p50 / predict, median of rounds (range) |")
        print("|---|---|---|---|")
        results: dict[str, Any] = {"parity_max_diff": diff, "same_order": order, "rounds": rounds}
        for name in sides:
            v = statistics.median(r[name] for r in rounds)
            per_round = [r[name] / r["predict in-process"] for r in rounds]
            results[name] = {"p50_ms": v * 1000, "ratios": per_round}
            ratio, low, high = statistics.median(per_round), min(per_round), max(per_round)
            print(f"| {name} | {v * 1000:.1f} | {args.documents / v:.0f} | {ratio:.2f} ({low:.2f}-{high:.2f}) |")
        if infinity is None:
            results["infinity"] = {"skipped": skipped}
        (out / "results.json").write_text(json.dumps(results, indent=2))
        print(f"\nresults: {out / 'results.json'}")
    finally:
        gateway.stop()
        if infinity is not None:
            infinity.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
