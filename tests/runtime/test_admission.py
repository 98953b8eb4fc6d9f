"""Backpressure by expected wait: admitted only if predicted to finish in time, else 429 at once."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from gateway.runtime.batching import Batcher, QueueFull

from ..conftest import FAKE_TOML, FakeBackend, fake_gate, serve, until, wait_until
from .test_batching import Recorder

URL = "/v1/embeddings"


class PerToken(Recorder):
    """1 ms of compute per token (one token per character)."""

    def embed(self, texts, token_ids):
        out = super().embed(texts, token_ids)
        time.sleep(0.001 * sum(len(i) for i in token_ids))
        return out


def _warm(b: Batcher, backend: Recorder) -> None:
    async def main():
        for _ in range(3):
            await b.embed(["x" * 20] * 4, backend.tokenize(["x" * 20] * 4))

    asyncio.run(main())


def test_the_batcher_measures_its_drain_rate_and_refuses_what_would_wait_too_long():
    gate = threading.Event()
    backend = PerToken(gate=gate)
    gate.set()
    b = Batcher(backend, backend.load(), model="m", max_batch_size=4)
    started = time.perf_counter()
    _warm(b, backend)
    warm_s = time.perf_counter() - started
    gate.clear()
    ids = backend.tokenize

    async def main():
        running = asyncio.ensure_future(b.embed(["hold"], ids(["hold"]), owner="a"))
        await until(lambda: backend.started[-1:] == [["hold"]], "the first batch holds the worker")
        # Read once the worker holds the next batch: it updates the rate after handing a batch's vectors back,
        # so right after the warm-up's last answer the last batch may not be counted yet (on a busy machine).
        # Measured, not assumed: each batch's 80 tokens took at least 80 ms, and at most the whole warm-up
        # (about 1000 tokens/s less the hand-offs here; less on a slower or busier machine).
        rate = b.drain_rate
        assert rate is not None and 80 / warm_s <= rate <= 1000, (rate, warm_s)
        # The time 400 tokens take at that rate: more than another key's turn needs, less than this key's backlog.
        limit = 400 / rate
        queued = [asyncio.ensure_future(b.embed(["y" * 100] * 4, ids(["y" * 100] * 4), owner="a")) for _ in range(4)]
        await asyncio.sleep(0.01)
        assert b.predicted_wait() == pytest.approx(1600 / rate)  # 1600 tokens queued, at the measured rate
        with pytest.raises(QueueFull) as refused:
            await b.embed(["z" * 100], ids(["z" * 100]), owner="a", max_wait_s=limit)
        assert refused.value.reason == "wait" and refused.value.retry_after >= 1
        assert f"would finish in about {1700 / rate:.1f}s, over the limit of {limit:.1f}s" in str(refused.value)
        # Another key takes turns with "a": its one input waits for one batch of a's, not for all of them.
        other = asyncio.ensure_future(b.embed(["w" * 100], ids(["w" * 100]), owner="b", max_wait_s=limit))
        await asyncio.sleep(0.01)
        gate.set()
        await asyncio.gather(running, other, *queued)

    asyncio.run(main())
    b.close()


def test_a_request_too_large_to_finish_in_time_is_admitted_when_its_key_has_nothing_queued():
    """It then shares every batch with the requests behind it, so it holds nobody up."""
    backend = PerToken()
    b = Batcher(backend, backend.load(), model="m", max_batch_size=4)
    _warm(b, backend)
    big = ["b" * 50] * 40  # 2000 tokens: 10 batches, about 2 s of work alone, over the 0.5 s limit

    async def main():
        ids = backend.tokenize
        large = asyncio.ensure_future(b.embed(big, ids(big), owner="bulk", max_wait_s=0.5))
        await asyncio.sleep(0.02)
        started = len(backend.batches)  # those of the large one begun before the small one came
        await b.embed(["s"], ids(["s"]), owner="search", max_wait_s=0.5)
        # Answered while the large one still has batches to go, in the next batch begun after it came (or the
        # one after, if the worker was beginning one just then): it waited for one batch of the large one, not
        # for all ten. Its time would show that too, but a loaded machine's pauses blur times, not batches.
        assert not large.done()
        assert any("s" in x for x in backend.batches[started : started + 2]), backend.batches
        with pytest.raises(QueueFull):  # the same key again, while its first one is queued: refused
            await b.embed(big, ids(big), owner="bulk", max_wait_s=0.5)
        await large

    asyncio.run(main())
    b.close()


SLOW = (
    FAKE_TOML
    + """
[models.fake.options]
delay_s = 0.2
[models.fake.batching]
max_queue_wait_ms = 500
"""
)


def test_overload_over_http_is_a_fast_429_with_retry_after_from_the_prediction():
    with serve(SLOW) as client:
        for _ in range(3):  # the drain rate is measured on real batches first
            assert client.post(URL, json={"model": "fake", "input": ["a b", "c d", "e f", "g h"]}).status_code == 200
        batcher = client.app.state.gateway.registry.find("fake").batcher
        rate = batcher.drain_rate
        assert rate is not None
        results: list[tuple[int, dict]] = []

        def call(i: int) -> None:
            r = client.post(URL, json={"model": "fake", "input": [f"t{i} x", f"t{i} y", f"t{i} z", f"t{i} w"]})
            results.append((r.status_code, dict(r.headers) | {"body": r.json()}))

        with fake_gate() as gate:
            hold = threading.Thread(
                target=client.post, args=(URL,), kwargs={"json": {"model": "fake", "input": "hold"}}
            )
            hold.start()
            wait_until(lambda: FakeBackend.holding == [["hold"]], "the hold batch held at the gate")
            threads = [threading.Thread(target=call, args=(i,)) for i in range(12)]
            for t in threads:
                t.start()
            # Every request is refused or queued while the batch ahead of them is held: a 429 comes at once, not
            # after waiting for a batch (which cannot end before the gate opens).
            wait_until(lambda: len(results) + batcher.queued // 4 == 12, "each request refused or queued")
            refused = len(results)
            assert FakeBackend.holding == [["hold"]] and batcher.drain_rate == rate
            assert all(status == 429 for status, _ in results), results
            # From the prediction: 16 tokens a request, queued while the key's tokens would finish within 0.5 s
            # at the measured rate (the first always: its key had nothing queued).
            assert 12 - refused == max(1, sum(16 * k / rate <= 0.5 for k in range(1, 13))), (refused, rate)
            gate.set()
            hold.join()
            for t in threads:
                t.join()
        assert sorted(s for s, _ in results) == [200] * (12 - refused) + [429] * refused
        for status, info in results:
            if status == 429:
                assert int(info["retry-after"]) >= 1
                assert "would finish in about" in info["body"]["error"]["message"]
        metrics = client.get("/metrics").text
        assert 'gateway_admissions_refused_total{model="fake",reason="wait"}' in metrics
        assert 'gateway_predicted_wait_seconds{model="fake"}' in metrics
        assert 'gateway_drain_rate_tokens_per_second{model="fake"}' in metrics


@pytest.mark.parametrize("value", ["soon", "0", "-5", "1.5", "99999999999"])
def test_a_bad_client_deadline_is_a_400(fake_client, value):
    r = fake_client.post(URL, json={"model": "fake", "input": "x"}, headers={"X-Request-Timeout-Ms": value})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "X-Request-Timeout-Ms" and "whole number of milliseconds" in err["message"]


def _hold_the_worker(client) -> threading.Thread:
    """A request whose batch ("hold") is held at FakeBackend's gate when this returns."""
    FakeBackend.batches, FakeBackend.finished = [], []
    hold = threading.Thread(target=client.post, args=(URL,), kwargs={"json": {"model": "fake", "input": "hold"}})
    hold.start()
    wait_until(lambda: FakeBackend.holding == [["hold"]], "the hold batch held at the gate")
    return hold


def _never_computed(client, text: str) -> None:
    """`text` was not computed and never will be: a request sent once the hold batch is over by the same key is
    answered, and within a key the older request goes first."""
    wait_until(lambda: ["hold"] in FakeBackend.finished, "the hold batch over")
    assert client.post(URL, json={"model": "fake", "input": "after"}).status_code == 200
    assert ["after"] in FakeBackend.batches
    assert all(text not in batch for batch in FakeBackend.batches), FakeBackend.batches


def test_the_client_deadline_shortens_the_timeout_and_nothing_of_a_timed_out_request_is_computed():
    with serve(FAKE_TOML) as client, fake_gate() as gate:
        hold = _hold_the_worker(client)
        r = client.post(URL, json={"model": "fake", "input": "late"}, headers={"X-Request-Timeout-Ms": "200"})
        assert r.status_code == 504 and "within 0.2s" in r.json()["error"]["message"]
        # Answered at its deadline while the batch ahead of it was still held: it did not wait for that batch.
        assert FakeBackend.holding == [["hold"]] and hold.is_alive()
        gate.set()
        hold.join()
        _never_computed(client, "late")


def test_inputs_of_a_request_past_request_timeout_s_are_never_computed():
    with serve("[server]\nrequest_timeout_s = 0.2\n" + FAKE_TOML) as client, fake_gate() as gate:
        hold = _hold_the_worker(client)
        assert client.post(URL, json={"model": "fake", "input": "late"}).status_code == 504
        # Timed out while the batch ahead of it was still held, so its input was queued when its time ran out.
        assert FakeBackend.holding == [["hold"]]
        gate.set()
        hold.join()
        _never_computed(client, "late")
