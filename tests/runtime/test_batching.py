"""The per-model batcher, with a fake backend: order, sizes, budgets, isolation, cancellation, backpressure."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from typing import Any, ClassVar

import msgspec
import numpy as np
import pytest

from gateway import Backend, ModelInfo
from gateway.runtime.batching import Batcher, BatchFailed, QueueFull

from ..conftest import FAKE_TOML, FakeBackend, fake_gate, fake_vector, serve, until, wait_until


class Recorder(Backend):
    """One token per character; records each batch (as it starts, and once past the gate) and the ids that came
    with each text."""

    name = "recorder"

    def __init__(self, delay: float = 0.0, fail_on: str | None = None, gate: threading.Event | None = None) -> None:
        super().__init__(model="rec", path=".", options=None)
        self.delay, self.fail_on, self.gate = delay, fail_on, gate
        self.batches: list[list[str]] = []
        # Batches handed to `embed`, before the gate: a test holding the worker waits for its first one here.
        self.started: list[list[str]] = []
        self.seen: list[tuple[str, list[int]]] = []

    def load(self) -> ModelInfo:
        return ModelInfo(dimension=8, max_input_tokens=100, normalized=True)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return [[ord(c) for c in t] for t in texts]

    def embed(self, texts: Sequence[str], token_ids: Sequence[Sequence[int]]) -> np.ndarray:
        self.started.append(list(texts))
        # A stall fails the batch, saying so (the batcher logs why), instead of computing it as if the test had
        # opened the gate: 60 s, which no machine's pause outlasts.
        if self.gate is not None and not self.gate.wait(60):
            raise RuntimeError("the test's gate stayed closed for 60 s")
        self.batches.append(list(texts))
        self.seen.extend((t, list(i)) for t, i in zip(texts, token_ids, strict=True))
        if self.delay:
            time.sleep(self.delay)
        if self.fail_on and any(self.fail_on in t for t in texts):
            raise ValueError("bad batch")
        return np.stack([fake_vector(t) for t in texts])


def _batcher(backend: Backend, info: dict[str, Any] | None = None, **kw) -> Batcher:
    """A batcher for `backend`, whose ModelInfo gets `info`'s fields."""
    kw.setdefault("max_batch_size", 8)
    kw.setdefault("max_batch_tokens", 10_000)
    return Batcher(backend, msgspec.structs.replace(backend.load(), **(info or {})), model="rec", **kw)


async def _embed(b: Batcher, texts: list[str]) -> np.ndarray:
    return await b.embed(texts, b.backend.tokenize(texts))


def test_results_in_input_order_across_merged_requests():
    backend = Recorder(delay=0.02)
    b = _batcher(backend)

    async def main():
        reqs = [[f"r{i}-{'x' * (i * 7 % 5)}-{j}" for j in range(i % 4 + 1)] for i in range(20)]
        outs = await asyncio.gather(*(_embed(b, r) for r in reqs))
        for texts, out in zip(reqs, outs, strict=True):
            assert out.shape == (len(texts), 8)
            for t, v in zip(texts, out, strict=True):
                np.testing.assert_allclose(v, fake_vector(t), rtol=1e-6)

    asyncio.run(main())
    b.close()
    assert max(len(x) for x in backend.batches) > 1, "concurrent requests should share batches"
    assert all(len(x) <= 8 for x in backend.batches)
    # inside a batch, inputs are sorted by length (less padding)
    assert all([len(t) for t in x] == sorted(len(t) for t in x) for x in backend.batches)


def test_a_large_request_is_split_into_backend_sized_batches():
    backend = Recorder()
    b = _batcher(backend, max_batch_size=4)
    texts = [f"t{i}" for i in range(10)]
    out = asyncio.run(_embed(b, texts))
    b.close()
    assert [len(x) for x in backend.batches] == [4, 4, 2]
    np.testing.assert_allclose(out[7], fake_vector("t7"), rtol=1e-6)


def test_token_budget_bounds_the_padded_batch():
    backend = Recorder()
    b = _batcher(backend, max_batch_size=100, max_batch_tokens=40)
    texts = ["a" * 10] * 3 + ["b" * 20] * 2 + ["c" * 5] * 4
    asyncio.run(_embed(b, texts))
    b.close()
    for batch in backend.batches:
        assert max(len(t) for t in batch) * len(batch) <= 40 or len(batch) == 1
    assert sum(len(x) for x in backend.batches) == len(texts)


def test_a_backend_without_padding_gets_inputs_in_turn_with_a_token_budget():
    """Packed (or one-at-a-time) runtimes: no length sorting or padded budget, just turns and summed tokens."""
    gate = threading.Event()
    backend = Recorder(gate=gate)
    b = _batcher(backend, {"pads_to_longest": False}, max_batch_size=4, max_batch_tokens=24)

    async def main() -> None:
        first = asyncio.create_task(_embed(b, ["x"]))  # holds the worker until the others are queued
        await until(lambda: backend.started == [["x"]], "the first batch holds the worker")
        big = asyncio.create_task(_embed(b, ["b" * 10, "b" * 10, "b" * 10]))
        await asyncio.sleep(0.01)
        small = asyncio.create_task(_embed(b, ["a" * 2, "a" * 3]))
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.gather(first, big, small)

    asyncio.run(main())
    b.close()
    # Turns: big, small, big, small (4 inputs, 25 tokens), trimmed to the budget: 22 tokens, where a padding
    # budget would count 3 x 10. Each batch reaches the backend sorted by length.
    assert backend.batches[1:] == [["a" * 2, "b" * 10, "b" * 10], ["a" * 3, "b" * 10]]


def test_small_requests_share_batches_with_a_large_one():
    """A single text queued behind a 40-text request does not wait for the 40: requests take turns."""
    gate = threading.Event()
    backend = Recorder(gate=gate)
    b = _batcher(backend, max_batch_size=4)

    async def main():
        first = asyncio.ensure_future(_embed(b, ["hold"]))
        await until(lambda: backend.started == [["hold"]], "the first batch holds the worker")
        big = asyncio.ensure_future(_embed(b, [f"big{i}" for i in range(40)]))
        await asyncio.sleep(0.01)
        small = asyncio.ensure_future(_embed(b, ["small"]))
        await asyncio.sleep(0.01)
        gate.set()
        await asyncio.gather(first, big, small)

    asyncio.run(main())
    b.close()
    assert backend.batches[0] == ["hold"]
    assert any("small" in x for x in backend.batches[1:3]), backend.batches
    assert sorted(t for x in backend.batches for t in x if t.startswith("big")) == sorted(f"big{i}" for i in range(40))


class Misbehaving(Recorder):
    def __init__(self, result) -> None:
        super().__init__()
        self.result = result

    def embed(self, texts, token_ids):
        out = super().embed(texts, token_ids)
        return self.result(out) if any("bad" in t for t in texts) else out


@pytest.mark.parametrize(
    "result",
    [
        lambda out: out[:, :, None],  # wrong rank
        lambda out: out[:-1],  # too few rows
        lambda out: out * np.nan,  # NaN
        lambda out: [[0.0] * 8],  # not an array at all
    ],
)
def test_garbage_from_a_backend_fails_that_batch_and_the_worker_lives(result):
    b = _batcher(Misbehaving(result), max_batch_size=1)

    async def main():
        with pytest.raises(BatchFailed):
            await _embed(b, ["bad one"])
        out = await _embed(b, ["good one"])
        np.testing.assert_allclose(out[0], fake_vector("good one"), rtol=1e-6)

    asyncio.run(main())
    b.close()


def test_several_workers_return_every_row_exactly():
    b = _batcher(Recorder(), {"concurrent_batches": 4}, max_batch_size=1)

    async def main():
        reqs = [[f"r{i}-{j}" for j in range(3)] for i in range(60)]
        outs = await asyncio.gather(*(_embed(b, r) for r in reqs))
        for texts, out in zip(reqs, outs, strict=True):
            np.testing.assert_allclose(out, np.stack([fake_vector(t) for t in texts]), rtol=1e-6)

    asyncio.run(main())
    b.close()


def test_single_input_larger_than_budget_still_runs():
    backend = Recorder()
    b = _batcher(backend, max_batch_tokens=5)
    out = asyncio.run(_embed(b, ["x" * 50]))
    b.close()
    assert out.shape == (1, 8)


def test_a_failing_batch_fails_only_its_own_requests():
    gate = threading.Event()
    backend = Recorder(fail_on="poison", gate=gate)
    b = _batcher(backend, max_batch_size=2)

    async def main():
        first = asyncio.ensure_future(_embed(b, ["hold"]))  # occupies the worker while the rest queue
        await until(lambda: backend.started == [["hold"]], "the first batch holds the worker")
        bad = asyncio.ensure_future(_embed(b, ["poison", "p2"]))
        good = asyncio.ensure_future(_embed(b, ["fine", "also fine"]))
        await asyncio.sleep(0.05)
        gate.set()
        results = await asyncio.gather(first, bad, good, return_exceptions=True)
        assert isinstance(results[1], BatchFailed)
        assert isinstance(results[0], np.ndarray) and isinstance(results[2], np.ndarray)
        # the worker survives
        assert (await _embed(b, ["after"])).shape == (1, 8)

    asyncio.run(main())
    b.close()
    # the good request shared the failed batch, then was retried on its own
    assert any("poison" in x and "fine" in x for x in backend.batches)
    assert ["fine", "also fine"] in backend.batches or ["fine"] in backend.batches


def test_cancelled_request_is_dropped_from_the_queue():
    gate = threading.Event()
    backend = Recorder(gate=gate)
    b = _batcher(backend)

    async def main():
        first = asyncio.ensure_future(_embed(b, ["running"]))
        await until(lambda: backend.started == [["running"]], "the first batch holds the worker")
        doomed = asyncio.ensure_future(_embed(b, ["never computed"]))
        await asyncio.sleep(0.01)
        assert b.queued == 1
        doomed.cancel()
        await asyncio.sleep(0.01)
        assert b.queued == 0
        gate.set()
        await first
        await _embed(b, ["later"])

    asyncio.run(main())
    b.close()
    assert ["never computed"] not in backend.batches
    assert all("never computed" not in x for x in backend.batches)


def test_queue_full_is_refused_at_once():
    gate = threading.Event()
    backend = Recorder(gate=gate)
    b = _batcher(backend, max_queue=3)

    async def main():
        first = asyncio.ensure_future(_embed(b, ["running"]))
        await until(lambda: backend.started == [["running"]], "the first batch holds the worker")
        queued = asyncio.ensure_future(_embed(b, ["q1", "q2"]))
        await asyncio.sleep(0.01)
        started = time.perf_counter()
        with pytest.raises(QueueFull, match="2 inputs queued"):
            await _embed(b, ["q3", "q4"])
        # Refused while the gate still holds the worker, so without waiting for room: room would come only once the
        # test opens the gate, or its 60 s run out. The bound is far under that, not the microseconds a refusal
        # takes (a loaded machine may pause this thread meanwhile).
        assert time.perf_counter() - started < 10.0 and not gate.is_set()
        gate.set()
        await asyncio.gather(first, queued)

    asyncio.run(main())
    b.close()


def test_queue_full_over_http_is_429_with_retry_after():
    toml = (
        FAKE_TOML + "[models.fake.options]\ndelay_s = 0.5\n[models.fake.batching]\nmax_queue = 2\nmax_batch_size = 1\n"
    )
    with serve(toml) as client:
        results: list[int] = []
        headers: list[str | None] = []

        def call(text: str) -> None:
            r = client.post("/v1/embeddings", json={"model": "fake", "input": [text, text + " x"]})
            results.append(r.status_code)
            headers.append(r.headers.get("retry-after"))
            if r.status_code == 429:
                assert r.json()["error"]["type"] == "rate_limit_error"
                assert "overloaded" in r.json()["error"]["message"]

        threads = [threading.Thread(target=call, args=(f"t{i}",)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert 429 in results and 200 in results
        assert set(results) <= {200, 429}
        # Retry-After is how long the queue takes to drain enough, at the rate measured so far.
        assert all(h is not None and int(h) >= 1 for s, h in zip(results, headers, strict=True) if s == 429)


def test_health_answers_while_a_long_batch_computes():
    with serve(FAKE_TOML) as client, fake_gate() as gate:
        FakeBackend.batches, FakeBackend.finished = [], []
        slow = threading.Thread(
            target=client.post, args=("/v1/embeddings",), kwargs={"json": {"model": "fake", "input": "hold"}}
        )
        slow.start()
        wait_until(lambda: FakeBackend.holding == [["hold"]], "the batch held at the gate")
        assert client.get("/health").status_code == 200
        # Answered while the batch was still held (computing): it did not wait for the batch, nor did the batch
        # block the event loop (health would then have come only after the gate's wait ended).
        assert FakeBackend.holding == [["hold"]]
        gate.set()
        slow.join()
        assert ["hold"] in FakeBackend.finished


def test_timeout_is_504():
    toml = "[server]\nrequest_timeout_s = 0.3\n" + FAKE_TOML + "[models.fake.options]\ndelay_s = 1.5\n"
    with serve(toml) as client:
        r = client.post("/v1/embeddings", json={"model": "fake", "input": "slow"})
        assert r.status_code == 504
        assert "did not finish within 0.3s" in r.json()["error"]["message"]
        assert client.get("/health").status_code == 200


def _served_pair(backend_cls: type[Backend]) -> dict[str, Any]:
    """Loaded ServedModels: "a" on `backend_cls`, "b" on the plain fake backend."""
    from gateway.base.config import parse_config
    from gateway.runtime.registry import ServedModel, build_specs

    from ..conftest import FakeBackend

    toml = f'[models.a]\nbackend = "{backend_cls.name}"\npath = "."\n[models.b]\nbackend = "fake"\npath = "."\n'
    specs = build_specs(parse_config(toml, "t.toml", None), {backend_cls.name: backend_cls, "fake": FakeBackend})
    models = {name: ServedModel(spec) for name, spec in specs.items()}
    for m in models.values():
        m.load()
    return models


def test_small_requests_tokenize_on_the_loop_large_ones_in_a_thread():
    """A local tokenizer is called on the event loop for small requests (no thread hand-offs); large
    requests, and backends whose tokenizer may do I/O, go to the model's tokenizer thread."""

    from ..conftest import FakeBackend

    class Local(FakeBackend):
        name = "fake-local"
        threads: ClassVar[list[str]] = []

        def load(self) -> ModelInfo:
            return msgspec.structs.replace(super().load(), local_tokenizer=True)

        def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
            Local.threads.append(threading.current_thread().name)
            return super().tokenize(texts)

    models = _served_pair(Local)
    Local.threads = []  # the load's own calls (the ids' framing) are not what this is about

    async def main() -> None:
        here = threading.current_thread().name
        assert await models["a"].tokenize(["two words"]) == [[101, 3, 5, 102]]
        assert Local.threads == [here]
        await models["a"].tokenize(["word " * 500])  # 2500 characters
        assert Local.threads[-1].startswith("tokenize-a")

    asyncio.run(main())
    FakeBackend.batches = []
    assert asyncio.run(models["b"].tokenize(["x"])) == [[101, 1, 102]]  # the plain fake: through its thread
    for m in models.values():
        m.close()


def test_token_ids_travel_with_their_inputs_through_merged_batches():
    backend = Recorder(delay=0.01)
    b = _batcher(backend, max_batch_size=5)

    async def main():
        reqs = [[f"q{i}-{'y' * (i % 3)}-{j}" for j in range(i % 4 + 1)] for i in range(12)]
        outs = await asyncio.gather(*(_embed(b, r) for r in reqs))
        for r, out in zip(reqs, outs, strict=True):
            np.testing.assert_allclose(out, np.stack([fake_vector(t) for t in r]), rtol=1e-6)

    asyncio.run(main())
    b.close()
    assert len(backend.batches) > 1 and max(len(x) for x in backend.batches) <= 5
    assert backend.seen and all(ids == [ord(c) for c in t] for t, ids in backend.seen)


def test_served_model_tokenizes_once_and_hands_the_ids_on():
    """Counts are the lengths of `tokenize`'s ids, and those ids reach `embed` with their texts."""

    from ..conftest import FakeBackend

    class Counting(FakeBackend):
        name = "fake-ids"
        calls: ClassVar[int] = 0
        got: ClassVar[list[list[list[int]]]] = []

        def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
            Counting.calls += 1
            return [[101, *range(len(t.split())), 102] for t in texts]

        def embed(self, texts: Sequence[str], token_ids: Sequence[Sequence[int]]) -> np.ndarray:
            Counting.got.append([list(i) for i in token_ids])
            return super().embed(texts, token_ids)

    models = _served_pair(Counting)
    Counting.calls = 0  # the load's own call (the ids' framing) is not what this is about

    async def main() -> None:
        ids = await models["a"].tokenize(["two words", "one"])
        assert ids == [[101, 0, 1, 102], [101, 0, 102]]
        out = await models["a"].embed(["two words", "one"], ids)
        assert out.shape == (2, 8)
        assert sorted(Counting.got[-1]) == sorted(ids)
        assert Counting.calls == 1

    asyncio.run(main())
    for m in models.values():
        m.close()


def _closed_loop(b: Batcher, clients: int, rounds: int) -> None:
    async def client(c: int) -> None:
        for r in range(rounds):
            await _embed(b, [f"c{c}-r{r}"])
            # The round trip back to the server takes a moment, longer for some clients than for others.
            await asyncio.sleep(0.002 * c)

    async def main() -> None:
        await asyncio.gather(*(client(c) for c in range(clients)))

    asyncio.run(main())


def test_return_wait_keeps_a_closed_loop_of_clients_in_one_batch():
    """Clients that each await their answer before sending again: without the wait the worker takes what
    queued during the last batch and the clients split into alternating part batches; with it, the worker
    waits (briefly) for the ones it just answered."""
    full = {}
    for wait in (0.0, 1.0):
        # A 50 ms batch: the wait (1.0 x 50 ms) covers the clients' 14 ms spread with 36 ms to spare, and without
        # it the worker would have to stall longer than that spread for them all to come back in time.
        backend = Recorder(delay=0.05)
        b = _batcher(backend, max_batch_size=8, return_wait=wait)
        _closed_loop(b, clients=8, rounds=10)
        b.close()
        sizes = [len(x) for x in backend.batches]
        assert sum(sizes) == 80, sizes
        full[wait] = (sum(size == 8 for size in sizes), sizes)
    # Counted in full batches, not in calls: a pause of a loaded machine may split one round or join the halves
    # of one, so each mode is allowed three such rounds. Measured here: 10 of 10 full with the wait, 1 without.
    assert full[1.0][0] >= 7, full[1.0]
    assert full[0.0][0] <= 3, full[0.0]


def test_return_wait_never_delays_a_lone_client_or_one_after_a_quiet_spell():
    backend = Recorder(delay=0.05)
    # A share far above the config's cap of 1: a wrongful wait would add 20 x 50 ms, which no pause of a loaded
    # machine passes for (at 1, it would add 50 ms, which one does).
    b = _batcher(backend, max_batch_size=8, return_wait=20.0)

    async def main() -> list[float]:
        took = []
        for _ in range(4):
            t = time.perf_counter()
            await _embed(b, ["alone"])
            took.append(time.perf_counter() - t)
        t = time.perf_counter()
        await asyncio.gather(*(_embed(b, [f"burst{i}"]) for i in range(6)))
        # Longer than the burst's batch took, however slow the machine: its clients are not coming back.
        await asyncio.sleep(max(0.12, 2 * (time.perf_counter() - t)))
        t = time.perf_counter()
        await _embed(b, ["after a pause"])
        took.append(time.perf_counter() - t)
        return took

    took = asyncio.run(main())
    b.close()
    assert max(took) < 0.6, took  # a 50 ms batch and its hand-offs; a wrongful wait would be 1 s more


@pytest.mark.parametrize("kw", [{"max_wait_ms": 300}, {"return_wait": 1.0}])
def test_requests_cancelled_while_a_worker_waits_for_more_do_not_kill_it(kw):
    """A worker waiting to fill its batch finds the queue emptied by cancellations (clients gone): it must
    go back to waiting, not crash (a dead worker hangs every later request of the model)."""
    gate = threading.Event()
    backend = Recorder(delay=0.15, gate=gate)
    b = _batcher(backend, max_batch_size=8, **kw)

    async def main() -> None:
        # return_wait: a batch answers 2 requests, so the worker then expects 2 back and waits. The 2 queue while a
        # first batch holds the worker, so they share the next batch however slow the machine.
        hold = asyncio.ensure_future(_embed(b, ["hold"]))
        await until(lambda: backend.started == [["hold"]], "the first batch holds the worker")
        warm = asyncio.gather(_embed(b, ["warm 1"]), _embed(b, ["warm 2"]))
        await until(lambda: b.queued == 2, "both queued")
        gate.set()
        await asyncio.gather(hold, warm)
        assert backend.batches == [["hold"], ["warm 1", "warm 2"]]
        given_up = asyncio.ensure_future(_embed(b, ["given up on"]))
        await asyncio.sleep(0)  # queued: the worker now waits for more
        assert b.queued == 1
        given_up.cancel()  # the client goes (at once: a timer could fire after the worker's wait on a slow machine)
        with pytest.raises(asyncio.CancelledError):
            await given_up
        await asyncio.sleep(0.4)  # past any wait: the worker has looked at its (empty) queue again
        # A dead worker never answers; a live one at once (the bound is only there to end the test).
        out = await asyncio.wait_for(_embed(b, ["still served"]), 20.0)
        np.testing.assert_allclose(out[0], fake_vector("still served"), rtol=1e-6)

    asyncio.run(main())
    b.close()
    assert "given up on" not in [t for x in backend.batches for t in x]


@pytest.mark.parametrize("ms", [0.0, 10.0])
def test_background_batches_are_cut_to_background_batch_ms_of_work(ms):
    """With `background_batch_ms`, a background batch holds at most that long's tokens at the measured drain
    rate (at least one input), so a client input arriving meanwhile waits about that long at most; without it,
    background batches are `background_batch_size` (default: twice max_batch_size)."""
    backend = Recorder(delay=0.04)
    b = _batcher(backend, max_batch_size=8, background_batch_ms=ms)
    background = [f"bg{i:08d}" for i in range(16)]  # 10 tokens each

    async def main() -> np.ndarray:
        # One client batch of 10 tokens in at least 40 ms: the drain rate is at most 250 tokens/s, so 10 ms of
        # work is at most 2.5 tokens, less than one input, however slow the machine (slower only lowers it).
        await _embed(b, ["c" * 10])
        return await b.embed(background, backend.tokenize(background), background=True)

    vectors = asyncio.run(main())
    b.close()
    np.testing.assert_allclose(vectors, np.stack([fake_vector(t) for t in background]))
    sizes = [len(batch) for batch in backend.batches[1:]]
    assert sizes == ([1] * 16 if ms else [16]), sizes


@pytest.mark.parametrize("pads", [False, True])
@pytest.mark.parametrize(
    ("size", "tokens", "want"),
    [(None, 10_000, [8, 8, 8]), (12, 10_000, [12, 12]), (12, 20, [5, 5, 5, 5, 4])],
)
def test_background_batches_take_up_to_background_batch_size_and_client_batches_max_batch_size(
    size, tokens, want, pads
):
    """No client waits on a background batch: it takes up to `background_batch_size` inputs (default: twice
    max_batch_size), still within max_batch_tokens, while client batches queued beside it keep max_batch_size."""
    gate = threading.Event()
    backend = Recorder(gate=gate)
    b = _batcher(
        backend,
        {"pads_to_longest": pads},
        max_batch_size=4,
        max_batch_tokens=tokens,
        background_batch_size=size,
        background_grace_ms=0,
    )
    client = [f"c{i:03d}" for i in range(10)]  # 4 tokens each, as the background inputs
    background = [f"b{i:03d}" for i in range(24)]

    async def main() -> list[np.ndarray]:
        # Both queued while a first batch holds the worker: what each batch takes is the queue's choice alone.
        hold = asyncio.ensure_future(_embed(b, ["hold"]))
        await until(lambda: backend.started == [["hold"]], "the first batch holds the worker")
        work = asyncio.ensure_future(b.embed(background, backend.tokenize(background), background=True))
        await until(lambda: b._idle, "the background work queued")
        clients = asyncio.ensure_future(_embed(b, client))
        await until(lambda: b.queued == len(client), "the client inputs queued")
        gate.set()
        return await asyncio.gather(hold, clients, work)

    _, got_client, got_background = asyncio.run(main())
    b.close()
    np.testing.assert_allclose(got_client, np.stack([fake_vector(t) for t in client]))
    np.testing.assert_allclose(got_background, np.stack([fake_vector(t) for t in background]))
    sizes = [len(batch) for batch in backend.batches[1:]]
    assert sizes == [4, 4, 2, *want], sizes


@pytest.mark.parametrize("grace", [0.0, 2000.0])
def test_background_grace_lets_a_client_that_just_got_its_answer_go_first(grace):
    """After client work, background batches wait `background_grace_ms`: a client's next request sent within it
    is computed before any background input; the background work still finishes once the grace is over."""
    backend = Recorder()
    b = _batcher(backend, max_batch_size=8, background_grace_ms=grace)
    background = [f"bg{i}" for i in range(4)]

    async def main() -> np.ndarray:
        await _embed(b, ["first"])
        work = asyncio.ensure_future(b.embed(background, backend.tokenize(background), background=True))
        if grace:
            # The client's next request comes at once, well within the grace (no think time needed to show it).
            await until(lambda: b._idle or backend.batches[1:], "the background work queued")
        else:
            # No grace: the worker, with no client input queued, takes the background work at once. Waited for,
            # not given a think time to happen in (a loaded machine may not run the worker within any such time).
            await until(lambda: backend.started[1:], "the background batch taken")
        await _embed(b, ["next"])
        return await work

    vectors = asyncio.run(main())
    b.close()
    np.testing.assert_allclose(vectors, np.stack([fake_vector(t) for t in background]))
    order = [t for batch in backend.batches for t in batch]
    assert (order.index("next") < order.index("bg0")) == bool(grace), order
