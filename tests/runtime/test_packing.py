"""Padding-free batches: the packing layout, pooling, and the torch backend's packed path against
sentence-transformers itself (the ONNX graph's packed path is tested in test_onnx.py)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from gateway.runtime.packing import pack, pool

from ..conftest import SENTENCES, check_runs_on_token_ids, cosine, embed


def test_pack_layout():
    ids = [[1, 2, 3], [4] * 10, [5, 6], [7] * 4]
    batch = pack(ids, row_tokens=12, pad_id=-1)
    rows, width = batch.input_ids.shape
    assert width <= 12 and rows == 2  # 19 tokens in rows of 12: 10 + 2, then 4 + 3
    for k, (r, s, n) in enumerate(batch.spans.tolist()):
        assert n == len(ids[k])
        assert batch.input_ids[r, s : s + n].tolist() == ids[k]
        assert batch.position_ids[r, s : s + n].tolist() == list(range(n))
        assert len(set(batch.segments[r, s : s + n].tolist())) == 1 and batch.segments[r, s] >= 1
    # Each input has its own segment within its row; padding is segment 0 with the pad id.
    for r in range(rows):
        used = batch.spans[batch.spans[:, 0] == r]
        assert len(set(batch.segments[r][batch.segments[r] > 0].tolist())) == len(used)
        assert (batch.input_ids[r][batch.segments[r] == 0] == -1).all()
    assert batch.input_ids.dtype == np.int64


def test_pack_row_grows_to_the_longest_input():
    assert pack([[1] * 50, [2] * 3], row_tokens=8).input_ids.shape == (2, 50)
    assert pack([[1] * 50, [2] * 3, [3] * 40], row_tokens=8).input_ids.shape == (2, 50)  # 40 + 3 share


def test_pack_rejects_empty():
    with pytest.raises(ValueError, match="nothing"):
        pack([], 8)
    with pytest.raises(ValueError, match="empty input"):
        pack([[1], []], 8)


def test_pool_modes():
    hidden = np.arange(2 * 5 * 2, dtype=np.float32).reshape(2, 5, 2)
    spans = np.array([[0, 1, 3], [1, 0, 2]])
    np.testing.assert_allclose(pool(hidden, spans, "mean"), [hidden[0, 1:4].mean(0), hidden[1, 0:2].mean(0)])
    np.testing.assert_allclose(pool(hidden, spans, "cls"), [hidden[0, 1], hidden[1, 0]])
    np.testing.assert_allclose(pool(hidden, spans, "max"), [hidden[0, 3], hidden[1, 1]])
    np.testing.assert_allclose(pool(hidden, spans, "last"), [hidden[0, 3], hidden[1, 1]])
    with pytest.raises(ValueError, match="weightedmean"):
        pool(hidden, spans, "weightedmean")


@pytest.fixture(scope="module")
def torch_backend(minilm_path):
    pytest.importorskip("torch")
    from gateway_torch import TorchBackend, TorchOptions

    backend = TorchBackend(model="m", path=minilm_path, options=TorchOptions(pack_tokens=16))
    backend.info = backend.load()  # type: ignore[attr-defined]
    yield backend
    backend.close()


def test_torch_packs_and_matches_sentence_transformers(torch_backend, st_model):
    assert torch_backend.info.pads_to_longest is False  # the core need not split its batches
    assert torch_backend._packer.traced is not None  # TorchScript by default
    texts = [*SENTENCES, "", "ok", *SENTENCES[::-1]]
    got = embed(torch_backend, texts)
    assert got.dtype == np.float32 and got.shape == (len(texts), 384)
    # The reference computes each text alone, so no padding and no neighbours.
    for text, vec in zip(texts, got, strict=True):
        want = st_model.encode([text], convert_to_numpy=True)[0]
        assert cosine(vec, want) > 0.99999, text
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_torch_runs_on_the_ids_it_counted(torch_backend):
    """The core tokenizes each input once, on arrival; the packed forward runs on those ids."""
    long = " ".join(["tokens"] * 300)  # over the model's 256
    check_runs_on_token_ids(torch_backend, [*SENTENCES, "", long], torch_backend._packer.max_tokens, atol=1e-5)


def test_torch_without_a_trace_runs_eagerly(minilm_path, monkeypatch, caplog):
    import torch
    from gateway_torch import TorchBackend, TorchOptions

    def refuse(*args, **kwargs):
        raise RuntimeError("cannot trace this model\nsecond line")

    monkeypatch.setattr(torch.jit, "trace", refuse)
    backend = TorchBackend(model="eager", path=minilm_path, options=TorchOptions())
    with caplog.at_level(logging.WARNING, logger="gateway.torch"):
        backend.load()
    assert "model 'eager': TorchScript off (RuntimeError: cannot trace this model)" in caplog.text
    assert backend._packer is not None and backend._packer.traced is None
    untraced = TorchBackend(model="m", path=minilm_path, options=TorchOptions(jit=False))
    untraced.load()
    assert untraced._packer.traced is None
    np.testing.assert_allclose(embed(backend, SENTENCES), embed(untraced, SENTENCES), atol=1e-6)


def test_torch_packing_off_pads(minilm_path):
    from gateway_torch import TorchBackend, TorchOptions

    backend = TorchBackend(model="m", path=minilm_path, options=TorchOptions(pack_tokens=0))
    info = backend.load()
    assert info.pads_to_longest is True
    assert backend._packer is None
    # Padded batches run from the ids counted on arrival (so the core may cut them), as encode runs its own.
    assert info.embeds_token_ids is True
    np.testing.assert_allclose(embed(backend, SENTENCES[:2]), backend._encode(SENTENCES[:2]), atol=1e-5)
    np.testing.assert_allclose(
        backend.embed(SENTENCES[:2], [[101, 102], [101, 102]]), backend._encode(["", ""]), atol=1e-5
    )


def test_torch_packing_turns_itself_off_when_it_disagrees(minilm_path, monkeypatch, caplog):
    """A model whose packed vectors differ from its own encode (say, positions that do not start at 0)
    is served padded, with a warning, rather than wrong."""
    import gateway_torch
    from gateway_torch import TorchBackend, TorchOptions

    real = gateway_torch._Packer.embed

    def shifted(self, texts, torch, row_tokens=None, ids=None, skip=None):
        out = real(self, texts, torch, row_tokens, ids, skip)
        return np.roll(out, 1, axis=1)

    monkeypatch.setattr(gateway_torch._Packer, "embed", shifted)
    backend = TorchBackend(model="odd", path=minilm_path, options=TorchOptions())
    with caplog.at_level(logging.WARNING, logger="gateway.torch"):
        info = backend.load()
    assert info.pads_to_longest is True
    assert "model 'odd': packing off (packed vectors differ" in caplog.text
    assert cosine(embed(backend, ["hello world"])[0], backend._encode(["hello world"])[0]) > 0.99999


def _concurrently(embed, batches):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(batches)) as pool:
        return list(pool.map(embed, batches))


def test_torch_parallel_batches_give_the_same_vectors(minilm_path, torch_backend):
    from gateway_torch import TorchBackend, TorchOptions

    backend = TorchBackend(model="par", path=minilm_path, options=TorchOptions(parallel_batches=2))
    assert backend.load().concurrent_batches == 2  # the core starts two batch workers
    batches = [SENTENCES[:5], SENTENCES[4:], ["ok", *SENTENCES[::2]], SENTENCES[::-1]]
    for got, texts in zip(_concurrently(lambda t: embed(backend, t), batches), batches, strict=True):
        np.testing.assert_allclose(got, embed(torch_backend, texts), atol=1e-5)
    assert backend._running == 0


def test_torch_does_not_pack_local_attention(zoo_folders, caplog):
    """ModernBERT's local layers take their window from a 2D mask, which a packed 4D mask bypasses: such a
    model is served padded, and its vectors equal sentence-transformers' on inputs longer than the window."""
    pytest.importorskip("torch")
    from gateway_torch import TorchBackend, TorchOptions
    from sentence_transformers import SentenceTransformer

    folder = zoo_folders["modernbert"]  # the zoo's tiny ModernBERT: a 32-token window, a 128-token limit
    b = TorchBackend(model="mb", path=str(folder), options=TorchOptions(threads=1))
    with caplog.at_level("WARNING"):
        info = b.load()
    assert info.pads_to_longest is True
    assert "local attention (window 32)" in caplog.text
    texts = [" ".join(f"word{i}" for i in range(n)) for n in (5, 40, 90)]  # up to ~300 tokens, cut at 128
    want = SentenceTransformer(str(folder), device="cpu").encode(texts)
    got = b.embed(texts, b.tokenize(texts))
    cos = np.sum(got * want, axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() > 0.9999
