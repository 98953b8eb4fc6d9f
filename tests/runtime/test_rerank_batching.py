"""The batcher in its scoring mode, with a fake reranker: pairs of concurrent requests share batches under the
token budget, each score goes back to its pair, and a backend that answers the wrong shape fails the batch."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import numpy as np
import pytest

from gateway import Backend, ModelInfo
from gateway.runtime.batching import Batcher, BatchFailed


class PairScorer(Backend):
    """Score = len(query) * 100 + len(document); records each batch of pairs as it starts."""

    name = "pair-scorer"

    def __init__(self, gate: threading.Event | None = None, wrong_shape: bool = False) -> None:
        super().__init__(model="pairs", path=".", options=None)
        self.gate, self.wrong_shape = gate, wrong_shape
        self.batches: list[list[tuple[str, str]]] = []
        self.threads: set[str] = set()

    def load(self) -> ModelInfo:
        return ModelInfo(dimension=1, max_input_tokens=100, normalized=False, task="rerank")

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return [[0] * len(t) for t in texts]

    def tokenize_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[list[int]]:
        return [[0] * (len(q) + len(d)) for q, d in pairs]

    def score(self, pairs: Sequence[tuple[str, str]], token_ids: Sequence[Sequence[int]]) -> np.ndarray:
        self.batches.append(list(pairs))
        self.threads.add(threading.current_thread().name)
        # A stall fails the batch, saying so (the batcher logs why), instead of computing it as if the test had
        # opened the gate: 60 s, which no machine's pause outlasts.
        if self.gate is not None and not self.gate.wait(60):
            raise RuntimeError("the test's gate stayed closed for 60 s")
        scores = np.array([len(q) * 100 + len(d) for q, d in pairs], dtype=np.float32)
        return scores.reshape(-1, 1) if self.wrong_shape else scores


def _scorer(backend: PairScorer, **kw: int) -> Batcher:
    return Batcher(backend, backend.load(), model="pairs", task="rerank", **kw)


async def _score(b: Batcher, query: str, docs: list[str]) -> np.ndarray:
    pairs = [(query, d) for d in docs]
    return (await b.embed(pairs, b.backend.tokenize_pairs(pairs)))[:, 0]


def test_pairs_of_concurrent_requests_share_batches_within_the_budget():
    gate = threading.Event()
    backend = PairScorer(gate)
    # 60 tokens a batch: the three waiting requests' pairs have 27, 33 and 39 tokens in all (one token a character).
    b = _scorer(backend, max_batch_size=16, max_batch_tokens=60)

    async def main() -> list[np.ndarray]:
        first = asyncio.ensure_future(_score(b, "hold", ["xxxxxx"]))
        while not backend.batches:  # the worker holds the first batch while the others queue
            await asyncio.sleep(0.005)
        rest = [asyncio.ensure_future(_score(b, q, [f"{q}-d{j}xx" for j in range(3)])) for q in ("qa", "qbb", "qccc")]
        await asyncio.sleep(0.05)
        gate.set()
        return await asyncio.gather(first, *rest)

    outs = asyncio.run(main())
    b.close()
    assert outs[0].tolist() == [406.0]
    for q, out in zip(("qa", "qbb", "qccc"), outs[1:], strict=True):
        assert out.tolist() == [len(q) * 100 + len(f"{q}-d{j}xx") for j in range(3)]
    # Nine waiting pairs went in batches mixing requests, none over the token budget.
    later = backend.batches[1:]
    assert sum(len(x) for x in later) == 9 and len(later) < 9
    assert any(len({q for q, _ in x}) > 1 for x in later), later
    assert all(sum(len(q) + len(d) for q, d in x) <= 60 for x in later)
    # Scored on the batcher's worker thread, never on the event loop.
    assert backend.threads == {"batcher-pairs-0"}


def test_wrong_shape_of_scores_fails_the_batch():
    b = _scorer(PairScorer(wrong_shape=True))
    with pytest.raises(BatchFailed, match="failed on a batch"):
        asyncio.run(_score(b, "q", ["a", "b"]))
    b.close()
