"""Every backend against sentence-transformers' own `encode`, through HTTP, on the folders users have
(tests/folders.py) and the bundled adversarial texts (gateway/data/adversarial.txt).

Each folder is converted once per session to ONNX (fp32) and GGUF (f16); one app serves all of them on
torch, ONNX and GGUF. The reference always starts from text: `SentenceTransformer(folder).encode(...)`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("llama_cpp")

from gateway.runtime import hf

from ..conftest import serve
from .folders import FOLDERS

BACKENDS = ("torch", "onnx", "gguf")
# f16 GGUF rounds its weights: a little below fp32's agreement.
FLOOR = {"torch": 0.9999, "onnx": 0.9999, "gguf": 0.999}
TEXTS = list(hf.adversarial_texts())


@pytest.fixture(scope="module")
def converted(st_folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """{folder: {backend: path}}: the folder itself for torch, its ONNX folder and GGUF file."""
    from gateway_gguf import GgufConverter
    from gateway_onnx import OnnxConverter

    root = tmp_path_factory.mktemp("converted")
    out: dict[str, dict[str, Path]] = {}
    for name, folder in st_folders.items():
        paths = {"torch": folder, "onnx": root / f"{name}-onnx", "gguf": root / f"{name}.gguf"}
        for backend, converter in (("onnx", OnnxConverter()), ("gguf", GgufConverter())):
            parser = argparse.ArgumentParser()
            converter.add_arguments(parser)
            converter.convert(str(folder), str(paths[backend]), parser.parse_args([]))
        out[name] = paths
    return out


def _model(folder: str, backend: str) -> str:
    return f"{folder}-{backend}"


@pytest.fixture(scope="module")
def client(converted: dict[str, dict[str, Path]]) -> Iterator[Any]:
    tables = []
    for folder, paths in converted.items():
        for backend in BACKENDS:
            options = {"torch": "threads = 1", "onnx": "intra_op_threads = 1", "gguf": "n_threads = 1"}[backend]
            tables.append(
                f'[models.{_model(folder, backend)}]\nbackend = "{backend}"\npath = "{paths[backend]}"\n'
                f"[models.{_model(folder, backend)}.options]\n{options}\n"
            )
    with serve("\n".join(tables), plugins=()) as c:
        yield c


@pytest.fixture(scope="module")
def references(st_folders: dict[str, Path]) -> dict[str, Any]:
    from sentence_transformers import SentenceTransformer

    return {name: SentenceTransformer(str(folder), device="cpu") for name, folder in st_folders.items()}


def _post(client: Any, model: str, **body: Any) -> dict[str, Any]:
    r = client.post("/v1/embeddings", json={"model": model, "input": TEXTS, "truncate": True, **body})
    assert r.status_code == 200, r.text
    return r.json()


def _counts(st: Any, prompt: str) -> list[int]:
    """Tokens per input as sentence-transformers counts them (its tokenizer, lower-casing included), capped at
    its limit as both sides truncate."""
    ids = st.tokenizer([prompt + t for t in TEXTS])["input_ids"]
    return [min(len(i), st.max_seq_length) for i in ids]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("folder", list(FOLDERS))
def test_same_vectors_and_tokens_as_sentence_transformers(client, references, folder: str, backend: str) -> None:
    st = references[folder]
    body = _post(client, _model(folder, backend))
    got = np.array([d["embedding"] for d in body["data"]], dtype=np.float64)
    # No prompt named: the folder's default, once (sentence-transformers applies it the same way).
    want = st.encode(TEXTS, convert_to_numpy=True).astype(np.float64)
    cos = np.sum(got * want, axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    worst = int(np.argmin(cos))
    print(f"{folder} on {backend}: min cosine {cos[worst]:.6f} over {len(TEXTS)} adversarial texts")
    assert cos[worst] >= FLOOR[backend], (TEXTS[worst], float(cos[worst]))
    # Unit length exactly where sentence-transformers' are (a folder without Normalize keeps its norms).
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), np.linalg.norm(want, axis=1), rtol=2e-3)
    default = st.prompts.get(st.default_prompt_name or "", "")
    assert body["usage"]["total_tokens"] == sum(_counts(st, default))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("folder", ["prompted", "prompt-excluded"])
def test_a_named_prompt_replaces_the_default(client, references, folder: str, backend: str) -> None:
    st = references[folder]
    body = _post(client, _model(folder, backend), prompt_name="passage")
    got = np.array([d["embedding"] for d in body["data"]])
    want = st.encode(TEXTS, prompt_name="passage", convert_to_numpy=True)
    cos = np.sum(got * want, axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() >= FLOOR[backend], TEXTS[int(np.argmin(cos))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_limit_and_normalized_as_the_folder_says(client, references, backend: str) -> None:
    models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    for folder, st in references.items():
        info = client.app.state.gateway.registry.models[_model(folder, backend)].info
        assert info.max_input_tokens == st.max_seq_length, (folder, backend)
        assert info.normalized is (folder != "raw-lower-100"), (folder, backend)
        assert _model(folder, backend) in models


def test_gguf_refuses_a_micro_batch_its_pooling_cannot_take(converted) -> None:
    """llama.cpp aborts (GGML_ASSERT in the mean-pooling product) on some n_ubatch / n_seq_max pairs: in a
    child process, so a regression fails this test instead of killing pytest. Limits that are no multiple
    of seqs_per_call now load and embed; an explicit n_ubatch that cannot work is refused with a reason."""
    code = textwrap.dedent(
        """
        import json, sys
        import msgspec
        from gateway_gguf import GgufBackend
        from gateway_gguf.backend import GgufOptions
        from gateway.plugin import BackendError
        path, cases = sys.argv[1], json.loads(sys.argv[2])
        for options in cases:
            b = GgufBackend(model="m", path=path, options=msgspec.convert({"n_threads": 1, **options}, GgufOptions))
            try:
                info = b.load()
            except BackendError as exc:
                print(json.dumps({"refused": str(exc)}), flush=True)
                continue
            texts = ["word " * n for n in range(1, 40)]
            b.embed(texts, b.tokenize(texts))
            b.close()
            print(json.dumps({"limit": info.max_input_tokens}), flush=True)
        """
    )
    cases = [{"seqs_per_call": 12}, {"seqs_per_call": 3}, {"seqs_per_call": 5}, {"n_ubatch": 130, "seqs_per_call": 16}]
    path = converted["resaved"]["gguf"]
    run = subprocess.run([sys.executable, "-c", code, str(path), json.dumps(cases)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    results = [json.loads(line) for line in run.stdout.splitlines()]
    assert results[:3] == [{"limit": 256}] * 3
    assert "n_ubatch = 130 is not a multiple of seqs_per_call = 16" in results[3]["refused"]
    # The 100-token folder with the default 16 sequences per call (100 is no multiple of 16).
    path = converted["raw-lower-100"]["gguf"]
    run = subprocess.run([sys.executable, "-c", code, str(path), json.dumps([{}])], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout) == {"limit": 100}


def test_token_agreement_on_the_adversarial_texts(client, references, capsys) -> None:
    """Per backend, ids equal to sentence-transformers' for every adversarial text (the figures are printed
    for the record: `pytest -s`)."""
    st = references["resaved"]
    want = st.tokenizer(TEXTS)["input_ids"]
    registry = client.app.state.gateway.registry
    for backend in BACKENDS:
        got = registry.models[_model("resaved", backend)].backend.tokenize(TEXTS)
        same = sum(a == list(b) for a, b in zip(got, want, strict=True))
        print(f"{backend}: token ids equal on {same}/{len(TEXTS)} adversarial texts")
        assert same == len(TEXTS), backend
