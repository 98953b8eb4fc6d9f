"""The architectures people serve (tests/zoo.py: BERT with CLS pooling, MPNet, XLM-RoBERTa, ModernBERT, Qwen3,
EmbeddingGemma), each on every backend that can run it, through HTTP, against sentence-transformers' own
`encode` on the same folder: token ids identical, cosine at or above each cell's floor, on texts that stress
positions (one token to past the limit, mixed in one batch so packing puts several in a row). What a backend
cannot run is refused at convert or load time with a message saying so.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.runtime import hf

from ..conftest import serve
from .zoo import FAMILIES, REFUSED, convert, position_texts

TEXTS = [*hf.adversarial_texts(), *position_texts()]
#: The floor of each backend's cosine with sentence-transformers (int8 rounds its weights; on Qwen3 the vector
#: is one token's state, which carries the whole rounding error of a random-weight decoder).
FLOOR = {"torch": 0.9999, "onnx": 0.9999, "onnx-int8": 0.99, "gguf": 0.999, "gguf-q8_0": 0.99}
FLOOR_OF = {("qwen3", "onnx-int8"): 0.93}
#: Where packing must be on (the rest pad: local attention cannot be expressed in a packed mask).
PACKED = {
    "torch": {"bert-cls", "mpnet", "xlm-roberta", "qwen3"},
    "onnx": {"bert-cls", "mpnet", "xlm-roberta", "qwen3"},
    "onnx-int8": {"bert-cls", "mpnet", "xlm-roberta", "qwen3"},
    # llama.cpp takes each input as its own sequence of a batch: nothing is padded.
    # Sliding windows (ModernBERT, Gemma) are masks over positions, which each sequence keeps.
    "gguf": {"bert-cls", "xlm-roberta", "modernbert", "qwen3", "gemma3"},
    "gguf-q8_0": {"bert-cls", "xlm-roberta", "modernbert", "qwen3", "gemma3"},
}
CELLS = [
    (family, backend)
    for backend in FLOOR
    for family in FAMILIES
    if (family, backend) not in REFUSED and (family, backend.split("-")[0]) not in REFUSED
]


def _model(family: str, backend: str) -> str:
    return f"{family}-{backend}"


@pytest.fixture(scope="module")
def served(zoo_converted: dict[str, dict[str, Path]]) -> dict[str, dict[str, Path]]:
    """{backend: {family: path}} of every cell that is expected to load (conftest converts them once)."""
    return zoo_converted


@pytest.fixture(scope="module")
def client(served: dict[str, dict[str, Path]]) -> Iterator[Any]:
    options = {"torch": "threads = 1", "onnx": "intra_op_threads = 1", "gguf": "n_threads = 1"}
    tables = [
        f'[models.{_model(family, cell)}]\nbackend = "{cell.split("-")[0]}"\npath = "{path}"\n'
        f"[models.{_model(family, cell)}.options]\n{options[cell.split('-')[0]]}\n"
        for cell, paths in served.items()
        for family, path in paths.items()
    ]
    with serve("\n".join(tables), plugins=()) as c:
        yield c


@pytest.fixture(scope="module")
def references(zoo_folders: dict[str, Path]) -> dict[str, Any]:
    from sentence_transformers import SentenceTransformer

    return {name: SentenceTransformer(str(folder), device="cpu") for name, folder in zoo_folders.items()}


def _cosines(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    return np.sum(got * want, axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)


@pytest.mark.parametrize(("family", "backend"), CELLS)
def test_cell_matches_sentence_transformers(client, references, family: str, backend: str) -> None:
    st = references[family]
    model = _model(family, backend)
    registry = client.app.state.gateway.registry
    entry = registry.models[model]
    assert entry.info.pads_to_longest is (family not in PACKED[backend]), "packed or padded, as decided at load"
    # Token ids as sentence-transformers' tokenizer cuts them, every text.
    want_ids = st.tokenizer(TEXTS)["input_ids"]
    got_ids = entry.backend.tokenize(TEXTS)
    same = sum(list(a) == list(b) for a, b in zip(got_ids, want_ids, strict=True))
    figures = [f"tokens {same}/{len(TEXTS)}"]
    assert same == len(TEXTS)
    for prompt_name in dict.fromkeys((None, FAMILIES[family].query_prompt)):
        body = {"model": model, "input": TEXTS, "truncate": True}
        if prompt_name:
            body["prompt_name"] = prompt_name
        r = client.post("/v1/embeddings", json=body)
        assert r.status_code == 200, r.text
        got = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float64)
        want = st.encode(TEXTS, prompt_name=prompt_name, convert_to_numpy=True, show_progress_bar=False).astype(
            np.float64
        )
        cos = _cosines(got, want)
        worst = int(np.argmin(cos))
        figures.append(f"min cosine {cos[worst]:.6f} ({prompt_name or 'no prompt'})")
        assert cos[worst] >= FLOOR_OF.get((family, backend), FLOOR[backend]), (TEXTS[worst], float(cos[worst]))
        prompt = st.prompts.get(prompt_name or "", "")
        counts = [min(len(i), st.max_seq_length) for i in st.tokenizer([prompt + t for t in TEXTS])["input_ids"]]
        assert r.json()["usage"]["total_tokens"] == sum(counts)
    print(f"{family} on {backend}: {', '.join(figures)}; {'padded' if entry.info.pads_to_longest else 'packed'}")


@pytest.mark.parametrize("family", sorted({f for f, b in CELLS if b == "onnx"}))
def test_onnx_graph_records_its_packing_decision(served, family: str) -> None:
    """`gateway convert --to onnx` decides packed or padded from the model (positions, causal attention, local
    windows), checks the graph against sentence-transformers, and writes the decision into the graph."""
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(served["onnx"][family] / "model.onnx")).metadata_props}
    packed = family in PACKED["onnx"]
    assert meta["gateway.packing"] == ("packed" if packed else "padded")
    assert bool(meta["gateway.packing_reason"]) is not packed
    assert meta["gateway.position_offset"] == {"mpnet": "2", "xlm-roberta": "2"}.get(family, "0")
    assert meta["gateway.causal_attention"] == ("true" if family == "qwen3" else "false")


@pytest.mark.parametrize(("family", "backend"), sorted(REFUSED))
def test_what_a_backend_cannot_run_is_refused_at_convert(zoo_folders, tmp_path, family: str, backend: str) -> None:
    from gateway_gguf import GgufConverter
    from gateway_onnx import OnnxConverter

    from gateway.plugin import BackendError

    converter = {"onnx": OnnxConverter, "gguf": GgufConverter}[backend.split("-")[0]]()
    with pytest.raises(BackendError, match=REFUSED[(family, backend)]) as info:
        out = tmp_path / ("out.gguf" if backend.startswith("gguf") else "out")
        convert(converter, zoo_folders[family], out, *(["--quantize", "int8"] if "int8" in backend else []))
    print(f"{family} on {backend}: refused: {info.value}")


def test_onnx_refuses_a_folder_whose_positions_cannot_hold_its_limit(tmp_path) -> None:
    """An XLM-RoBERTa whose position table has no room for the padding offset at its token limit: the export
    check used to die with a bare IndexError/RuntimeError traceback from sentence-transformers itself; it is
    a BackendError naming the folder and the limit, and the onnx backend's limit leaves room for the offset."""
    from gateway_onnx import OnnxConverter

    from gateway.plugin import BackendError

    from .zoo import LIMIT, build

    folder = build("xlm-roberta", tmp_path / "xlmr", max_position_embeddings=LIMIT)
    assert hf.max_input_tokens(hf.read_layout(folder)) == LIMIT - 2
    with pytest.raises(BackendError, match=r"sentence-transformers itself cannot encode .* \(limit 128 tokens\)"):
        convert(OnnxConverter(), folder, tmp_path / "out")


def test_dense_the_runtime_does_not_apply_is_applied_after_pooling(tmp_path) -> None:
    """Dense modules with a bias, an activation and a change of width (32 -> 16 Tanh -> 24 GELU) after a BERT:
    the onnx backend reads them beside the graph, and the GGUF carries them under the gateway's own keys
    (llama.cpp applies only EmbeddingGemma's bias-free pair); both apply them after pooling and before
    Normalize, as sentence-transformers does, through HTTP."""
    from gateway_gguf import GgufConverter
    from gateway_onnx import OnnxConverter
    from sentence_transformers import SentenceTransformer

    from .zoo import build

    folder = build("bert-cls", tmp_path / "dense", dense=((32, 16, True, "Tanh"), (16, 24, True, "GELU")))
    convert(OnnxConverter(), folder, tmp_path / "onnx")
    convert(GgufConverter(), folder, tmp_path / "f16.gguf")
    assert hf.read_gguf_metadata(tmp_path / "f16.gguf")[f"{hf.GGUF_DENSE_PREFIX}1.config"]
    config = (
        f'[models.onnx]\nbackend = "onnx"\npath = "{tmp_path / "onnx"}"\n'
        f'[models.gguf]\nbackend = "gguf"\npath = "{tmp_path / "f16.gguf"}"\n'
    )
    want = SentenceTransformer(str(folder), device="cpu").encode(TEXTS, convert_to_numpy=True)
    with serve(config, plugins=()) as c:
        for model in ("onnx", "gguf"):
            r = c.post("/v1/embeddings", json={"model": model, "input": TEXTS, "truncate": True})
            assert r.status_code == 200, r.text
            got = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float64)
            assert got.shape == (len(TEXTS), 24)
            cos = _cosines(got, want.astype(np.float64))
            print(f"Dense (bias, Tanh, GELU) on {model}: min cosine {cos.min():.6f}")
            assert cos.min() >= FLOOR["gguf" if model == "gguf" else "onnx"], (model, float(cos.min()))


def test_a_dense_activation_outside_torch_is_refused_at_convert(tmp_path) -> None:
    """A Dense whose activation the gateway has no numpy form of (Softmax) is refused by both converters with a
    message naming it, before any export: serving without it would return other vectors."""
    from gateway_gguf import GgufConverter
    from gateway_onnx import OnnxConverter

    from gateway.plugin import BackendError

    from .zoo import build

    folder = build("bert-cls", tmp_path / "softmax", dense=((32, 16, True, "Softmax"),))
    for converter, out in ((OnnxConverter(), tmp_path / "onnx"), (GgufConverter(), tmp_path / "out.gguf")):
        with pytest.raises(BackendError, match=r"Dense activation 'torch\.nn\.modules\.activation\.Softmax' is not"):
            convert(converter, folder, out)
    assert not (tmp_path / "onnx" / "model.onnx").exists()
