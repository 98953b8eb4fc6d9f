"""Review round three, the request path (issue 36, items 1-9): each defect as a test that failed before its fix."""

from __future__ import annotations

import asyncio
import os
import stat
import textwrap
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest

from gateway.base.config import parse_config
from gateway.cli import _write_secret
from gateway.runtime.plugins import load_plugins
from gateway.runtime.quantize import Ranges, calibration_texts, quantize
from gateway.runtime.registry import ModelState, ServedModel, build_specs

from ..conftest import API_KEY, FakePlugin, fake_vector, serve, until
from ..runtime.test_batching import Recorder, _batcher, _embed
from .test_failover import TypedPlugin

URL = "/v1/embeddings"


def test_the_key_file_is_a_new_private_file_never_a_followed_link_or_an_open_old_one(tmp_path: Path) -> None:
    # A reader who opened an earlier, world-readable file at the path must not see the new key through it.
    path = tmp_path / "key"
    path.write_text("old\n")
    path.chmod(0o644)
    with path.open() as earlier:
        _write_secret(path, "gw-secret\n")
        assert earlier.read() == "old\n"
    assert path.read_text() == "gw-secret\n"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    # A symlink planted at the path is replaced, and what it pointed at is left alone.
    target = tmp_path / "target"
    target.write_text("theirs\n")
    link = tmp_path / "linked-key"
    link.symlink_to(target)
    _write_secret(link, "gw-other\n")
    assert not link.is_symlink() and link.read_text() == "gw-other\n"
    assert target.read_text() == "theirs\n"
    assert stat.S_IMODE(os.stat(link).st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key", "linked-key", "target"]  # no temp file left


# -- 1. a remote model is named by its upstream, never by a walk of the working directory ------------------


def _remote_identity(cwd: Path, base_url: str = "http://127.0.0.1:9/v1", model: str = "up") -> bytes | None:
    """The cache identity of a remote model loaded with `cwd` as the working directory (no upstream needed:
    its dimension and limit are given)."""
    toml = f"""
    [models.remote]
    backend = "openai"
    [models.remote.options]
    base_url = "{base_url}"
    model = "{model}"
    dimension = 4
    max_input_tokens = 16
    """
    specs = build_specs(parse_config(textwrap.dedent(toml), "test.toml"), load_plugins().backends())
    served = ServedModel(specs["remote"])
    old = os.getcwd()
    os.chdir(cwd)
    try:
        # In a thread: before the fix the walk opened the FIFO below and blocked for good.
        loader = threading.Thread(target=served.load, daemon=True)
        loader.start()
        loader.join(30)
        assert not loader.is_alive(), "loading a remote model blocked (it read the working directory)"
    finally:
        os.chdir(old)
    assert served.state == ModelState.READY, served.error
    served.close()
    return served.identity


def test_a_remote_model_is_named_by_its_upstream_not_by_the_working_directory(tmp_path: Path) -> None:
    pytest.importorskip("httpx")
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    (first / "weights.bin").write_bytes(b"x" * 1000)
    os.mkfifo(first / "pipe")  # a FIFO blocks whoever opens it for reading until a writer comes
    here = _remote_identity(first)
    assert here is not None
    # Started from another folder, the same upstream model keeps its name (shared Redis entries stay shared).
    assert _remote_identity(second) == here
    # Another upstream, or another model of it, is another model.
    assert _remote_identity(second, base_url="http://127.0.0.2:9/v1") != here
    assert _remote_identity(second, model="other") != here


# -- 3. a reload is all or nothing ------------------------------------------------------------------------

_RELOAD_BASE = f"""
[auth]
api_keys = ["{API_KEY}"]
[models.fake]
backend = "fake"
path = "."
"""


def _model_threads(*models: str) -> list[str]:
    """The threads of `models` once loaded (each has a batch worker; the executor's idle workers are not counted).
    By name: other tests' servers may still hold models of their own in this process."""
    prefixes = tuple(f"batcher-{m}-" for m in models)
    return sorted(t.name for t in threading.enumerate() if t.name.startswith(prefixes))


def test_a_refused_reload_changes_nothing_and_leaks_no_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_API_KEYS", "env-key-12345")
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(_RELOAD_BASE)
    # Refused for its keys (the environment's key listed again), after a new model and a new limit.
    refused = (
        _RELOAD_BASE.replace('"]\n', '", "env-key-12345"]\n', 1)
        + '[server]\nmax_items_per_request = 1\n[models.added]\nbackend = "fake"\npath = "."\n'
    )
    with serve(config_path=cfg, keys="config") as client:
        assert client.post(URL, json={"model": "fake", "input": ["a", "b"]}).status_code == 200
        threads = _model_threads("fake", "added")
        for _ in range(3):
            cfg.write_text(refused)
            r = client.post("/admin/reload")
            assert r.status_code == 400, r.text
            message = r.json()["error"]["message"]
            assert "reload refused, the running config is kept" in message and "GATEWAY_API_KEYS" in message
        # The refused file's limit is not live, nor its model; no model was left loaded for it.
        r = client.post(URL, json={"model": "fake", "input": ["a", "b"]})
        assert r.status_code == 200, r.text
        r = client.post(URL, json={"model": "added", "input": "a"})
        assert r.status_code == 404 and "available models: fake" in r.json()["error"]["message"]
        # Nothing started for the refused configs (threads of other tests' servers may only have ended since).
        assert "batcher-fake-0" in threads and not Counter(_model_threads("fake", "added")) - Counter(threads)
        assert _model_threads("added") == []


# -- 4. calibration in pieces, in the background ----------------------------------------------------------


def test_int8_on_a_model_whose_queue_is_smaller_than_the_calibration_corpus() -> None:
    toml = '[models.fake]\nbackend = "fake"\npath = "."\n[models.fake.batching]\nmax_queue = 500\n'
    texts = ["hello world", "quantized vectors are small"]
    with serve(toml) as client:
        r = client.post(URL, json={"model": "fake", "input": texts, "encoding_format": "int8"})
        assert r.status_code == 200, r.text
    fitting = [t for t in calibration_texts() if len(t.split()) + 2 <= 16]  # the fake model's 16-token limit
    assert len(fitting) > 500
    ranges = Ranges.fit(np.stack([fake_vector(t) for t in fitting]))
    expected = quantize(np.stack([fake_vector(t) for t in texts]), "int8", ranges)
    np.testing.assert_array_equal(np.array([d["embedding"] for d in r.json()["data"]]), expected)


def test_background_work_takes_no_queue_room_and_yields_to_clients() -> None:
    gate = threading.Event()
    backend = Recorder(gate=gate)
    b = _batcher(backend, max_queue=3, max_batch_size=2)
    background = [f"bg{i}" for i in range(6)]

    async def main() -> np.ndarray:
        first = asyncio.ensure_future(_embed(b, ["running"]))
        await until(lambda: backend.started == [["running"]], "the first batch holds the worker")
        work = asyncio.ensure_future(b.embed(background, backend.tokenize(background), background=True))
        await until(lambda: b._idle, "the background work queued")
        # The whole queue bound is still the clients': six background inputs take none of it.
        client = asyncio.ensure_future(_embed(b, ["c1", "c2", "c3"]))
        await until(lambda: b.queued == 3, "the client's inputs queued")
        gate.set()
        await asyncio.gather(first, client)
        return await work

    vectors = asyncio.run(main())
    b.close()
    np.testing.assert_allclose(vectors, np.stack([fake_vector(t) for t in background]))
    order = [t for batch in backend.batches for t in batch]
    assert max(order.index(c) for c in ("c1", "c2", "c3")) < min(order.index(t) for t in background), order
    # Client batches keep max_batch_size; background ones may take background_batch_size (twice it by default).
    assert all(len(batch) <= (4 if batch[0].startswith("bg") else 2) for batch in backend.batches), backend.batches
    assert any(len(batch) > 2 for batch in backend.batches if batch[0].startswith("bg")), backend.batches


# -- 2. the cache key holds everything that decides the vector ------------------------------------------


def _ids_vector(ids: list[int], dim: int = 8) -> list[float]:
    """What FakeBackend with `embeds_ids` returns for `ids`."""
    return fake_vector(" ".join(map(str, ids)), dim).tolist()


def test_a_prompt_and_the_same_words_sent_as_text_do_not_share_a_cut_vector() -> None:
    # 8 tokens, cut at the start: a prompt's tokens are kept, the same words sent as text are not.
    toml = (
        '[models.ids]\nbackend = "fake"\npath = "."\nprompts = {query = "query: "}\n'
        'truncate = "start"\noptions = {embeds_ids = true, max_tokens = 8}\n'
    )
    text = "one two three four five six seven eight nine"  # lengths 3 3 5 4 4 3 5 5 4
    with serve(toml) as client:
        prompted = client.post(URL, json={"model": "ids", "input": text, "prompt_name": "query"})
        plain = client.post(URL, json={"model": "ids", "input": "query: " + text})
    assert prompted.status_code == plain.status_code == 200
    assert plain.headers["x-cache-hits"] == "0"
    # [CLS] "query:" kept, the text's last 5 words, [SEP]; without a prompt, the last 6 words.
    assert prompted.json()["data"][0]["embedding"] == pytest.approx(_ids_vector([101, 6, 4, 3, 5, 5, 4, 102]), abs=1e-6)
    assert plain.json()["data"][0]["embedding"] == pytest.approx(_ids_vector([101, 4, 4, 3, 5, 5, 4, 102]), abs=1e-6)


def test_the_cache_key_holds_the_prompt_and_the_text_apart() -> None:
    from gateway.embedding.cache import input_key

    model = b"m" * 16
    assert input_key(model, "start", "query: ", "x") != input_key(model, "start", "", "query: x")
    assert input_key(model, "start", "a", "bc") != input_key(model, "start", "ab", "c")
    assert input_key(model, "start", "q", "x") != input_key(model, "end", "q", "x")
    assert input_key(model, None, "q", "x") == input_key(model, None, "q", "x")


def _metaspace_tokenize(words: list[str]) -> Callable[[Sequence[str]], list[list[int]]]:
    """A real `tokenizers` tokenizer that splits as SentencePiece does (a word-start mark, "▁", on each word,
    a trailing space a token of its own), with <s> ... </s> around the ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁": 3}
    for word in words:
        vocab.setdefault("▁" + word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    return lambda texts: [e.ids for e in tok.encode_batch(list(texts))]


def test_a_prompt_is_counted_as_the_tokenizer_sees_it_inside_an_input() -> None:
    from gateway.runtime.inputs import Frame, prompt_length

    words = ["query:", "I", "saw", "it", "Elephants", "crossing", "roads", "42", "is", "a", "number", "(x)"]
    words += ["marks", "hello", "world"]
    tokenize = _metaspace_tokenize(words)
    frame = Frame.of(tokenize)
    assert (frame.head, frame.tail) == (1, 1)
    # Alone, the trailing space is a token ("▁query:", "▁"); in front of a text it is part of the next word.
    assert len(tokenize(["query: "])[0]) - 2 == 2
    inside = tokenize(["query: hello world"])[0][1:-1]
    assert inside == tokenize(["query:"])[0][1:-1] + tokenize(["hello world"])[0][1:-1]
    assert prompt_length(tokenize, "query: ", frame) == 1
    assert prompt_length(tokenize, "", frame) == 0


# -- 7. hits and computed inputs are one charge ---------------------------------------------------------


def test_a_partly_cached_request_is_charged_once_against_the_token_limit() -> None:
    # "a b c" is 5 tokens, the long text 10: 15 in all, over a limit of 10 that one charge into an empty
    # window still passes (a request bigger than the limit waits for nothing but an empty window).
    toml = (
        f'[auth]\napi_keys = ["{API_KEY}"]\n[[auth.keys]]\nkey = "limited-key-1"\ntokens_per_minute = 10\n'
        '[[auth.keys]]\nkey = "limited-key-2"\ntokens_per_minute = 10\n'
        '[models.fake]\nbackend = "fake"\npath = "."\noptions = {max_tokens = 64}\n'
    )
    texts = ["a b c", "one two three four five six seven eight"]
    with serve(toml, keys="config") as client:
        # The same request, uncached, from a fresh key: admitted.
        uncached = client.post(URL, json={"model": "fake", "input": texts}, headers=_bearer("limited-key-1"))
        assert uncached.status_code == 200 and uncached.json()["usage"]["total_tokens"] == 15
        client.post(URL, json={"model": "fake", "input": ["a new one"]})  # an unlimited key
        partly = client.post(
            URL,
            json={"model": "fake", "input": ["a new one", "eight words that were never sent before x"]},
            headers=_bearer("limited-key-2"),
        )
        assert partly.status_code == 200, partly.text
        assert partly.headers["x-cache-hits"] == "1" and partly.json()["usage"]["total_tokens"] == 15
        # Charged in full all the same: the next request of that key waits.
        again = client.post(URL, json={"model": "fake", "input": "x"}, headers=_bearer("limited-key-2"))
        assert again.status_code == 429 and "10 tokens per minute" in again.json()["error"]["message"]


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# -- 8. headers describe the model that answered ---------------------------------------------------------


def test_headers_after_failover_describe_the_model_that_answered() -> None:
    toml = """
    [models.primary]
    backend = "typed"
    path = "."
    prompts = {query = "query: "}
    default_prompt_name = "query"
    embedding_space = "s"
    fallbacks = ["backup"]

    [models.backup]
    backend = "fake"
    path = "."
    cache = false
    embedding_space = "s"
    """
    with serve(toml, plugins=(FakePlugin, TypedPlugin)) as client:
        r = client.post(URL, json={"model": "primary", "input": "down here"})  # "down": primary's BackendUnavailable
    assert r.status_code == 200, r.text
    assert r.headers["x-served-model"] == "backup"
    # The backup applies no prompt and has no cache: neither header may come from the primary's attempt.
    assert "x-prompt-name" not in r.headers and "x-cache-hits" not in r.headers
    assert r.json()["data"][0]["embedding"] == pytest.approx(fake_vector("down here").tolist(), abs=1e-6)


# -- 6. /schema names no model to a caller without a key --------------------------------------------------


def test_the_schema_names_models_prompts_and_dimensions_only_to_a_key_that_may_use_them() -> None:
    toml = f"""
    [auth]
    api_keys = ["{API_KEY}"]
    [[auth.keys]]
    key = "limited-key-1"
    models = ["public"]

    [models.internal-secret]
    backend = "fake"
    path = "."
    aliases = ["hidden-alias"]
    matryoshka_dimensions = [3]
    prompts = {{covert = "x: "}}

    [models.public]
    backend = "fake"
    path = "."
    prompts = {{lookup = "query: "}}
    """
    secrets = ("internal-secret", "hidden-alias", "covert", "public", "lookup")
    with serve(toml, keys="config") as client:
        anonymous = {"Authorization": ""}
        for path in ("/schema/openapi.json", "/schema/openapi.yaml", "/schema", "/schema/swagger"):
            r = client.get(path, headers=anonymous)
            assert r.status_code == 200, path
            assert not [s for s in secrets if s in r.text], path
        wrong = client.get("/schema/openapi.json", headers={"Authorization": "Bearer not-a-key-at-all"})
        assert not [s for s in secrets if s in wrong.text]

        def request_schema(key: str) -> dict:
            r = client.get("/schema/openapi.json", headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200
            return r.json()["components"]["schemas"]["EmbeddingRequest"]["properties"]

        full = request_schema(API_KEY)
        assert full["model"]["enum"] == ["hidden-alias", "internal-secret", "public"]
        assert full["prompt_name"]["anyOf"][0]["enum"] == ["covert", "lookup"]
        assert full["dimensions"]["anyOf"][0]["enum"] == [3]
        limited = request_schema("limited-key-1")
        assert limited["model"]["enum"] == ["public"]
        assert limited["prompt_name"]["anyOf"][0]["enum"] == ["lookup"]
        assert limited["dimensions"]["anyOf"][0] == {"not": {}}


# -- 5. ONNX packing only for graphs our converter marked ---------------------------------------------------


def _graph_reading_the_mask_as_attend(folder: Path, minilm_path: str, mark: bool) -> Path:
    """A model folder with MiniLM's tokenizer and a small ONNX graph as a standard export reads its inputs:
    every token attends to every token whose attention_mask is non-zero (here: adds their mean), and
    positions come from position_ids. With `mark`, the file says what `gateway convert` says of its graphs."""
    import shutil

    import onnx
    from gateway_onnx.backend import SEGMENT_MASK, SEGMENT_MASK_KEY
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(Path(minilm_path) / name, folder / name)
    rng = np.random.default_rng(0)
    hidden = 8
    nodes = [
        helper.make_node("Gather", ["words", "input_ids"], ["w"]),
        helper.make_node("Gather", ["positions", "position_ids"], ["p"]),
        helper.make_node("Add", ["w", "p"], ["h"]),
        helper.make_node("Greater", ["attention_mask", "zero"], ["attends"]),
        helper.make_node("Cast", ["attends"], ["m"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["m", "last"], ["m3"]),
        helper.make_node("Mul", ["h", "m3"], ["hm"]),
        helper.make_node("ReduceSum", ["hm", "seq"], ["total"], keepdims=1),
        helper.make_node("ReduceSum", ["m3", "seq"], ["count"], keepdims=1),
        helper.make_node("Div", ["total", "count"], ["context"]),
        helper.make_node("Add", ["h", "context"], ["last_hidden_state"]),
    ]
    ints = [
        helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"])
        for n in ("input_ids", "attention_mask", "position_ids")
    ]
    out = helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", hidden])
    init = [
        numpy_helper.from_array(rng.standard_normal((30522, hidden)).astype(np.float32), "words"),
        numpy_helper.from_array(rng.standard_normal((512, hidden)).astype(np.float32), "positions"),
        numpy_helper.from_array(np.array(0, dtype=np.int64), "zero"),
        numpy_helper.from_array(np.array([2], dtype=np.int64), "last"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "seq"),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "attends-to-non-zero", ints, [out], init), opset_imports=[helper.make_opsetid("", 17)]
    )
    if mark:
        helper.set_model_props(model, {SEGMENT_MASK_KEY: SEGMENT_MASK})
    onnx.save(model, str(folder / "model.onnx"))
    return folder


def test_a_foreign_graph_with_position_ids_is_served_padded(tmp_path: Path, minilm_path: str) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from gateway_onnx.backend import OnnxBackend, OnnxOptions

    texts = ["a short one", "another text, somewhat longer than the first"]
    foreign = OnnxBackend(
        model="foreign",
        path=str(_graph_reading_the_mask_as_attend(tmp_path / "foreign", minilm_path, False)),
        options=OnnxOptions(),
    )
    assert foreign.load().pads_to_longest is True
    alone = np.concatenate([foreign.embed([t], foreign.tokenize([t])) for t in texts])
    together = foreign.embed(texts, foreign.tokenize(texts))
    np.testing.assert_allclose(together, alone, atol=1e-5)
    # The same graph marked as ours is packed, and then its inputs see their row-mates: why only a graph that
    # reads the mask as segment ids may be.
    marked = OnnxBackend(
        model="marked",
        path=str(_graph_reading_the_mask_as_attend(tmp_path / "marked", minilm_path, True)),
        options=OnnxOptions(),
    )
    assert marked.load().pads_to_longest is False
    assert not np.allclose(marked.embed(texts, marked.tokenize(texts)), alone, atol=1e-3)
    foreign.close()
    marked.close()
