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

from gateway import hf

from .conftest import serve
from .zoo import FAMILIES, position_texts

TEXTS = [*hf.adversarial_texts(), *position_texts()]
#: (backend, variant) cells; the floor of each (int8 rounds its weights).
FLOOR = {"torch": 0.9999}
#: Where packing must be on (the rest pad, for the reason the backend logs).
PACKED = {
    "torch": {"bert-cls", "mpnet", "xlm-roberta", "qwen3"},
}
CELLS = [(family, backend) for backend in FLOOR for family in FAMILIES]


def _model(family: str, backend: str) -> str:
    return f"{family}-{backend}"


@pytest.fixture(scope="module")
def served(zoo_folders: dict[str, Path]) -> dict[str, dict[str, Path]]:
    """{backend: {family: path}} of every cell that is expected to load."""
    return {"torch": dict(zoo_folders)}


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
    for prompt_name in (None, FAMILIES[family].query_prompt):
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
        assert cos[worst] >= FLOOR[backend], (TEXTS[worst], float(cos[worst]))
        prompt = st.prompts.get(prompt_name or "", "")
        counts = [min(len(i), st.max_seq_length) for i in st.tokenizer([prompt + t for t in TEXTS])["input_ids"]]
        assert r.json()["usage"]["total_tokens"] == sum(counts)
    print(f"{family} on {backend}: {', '.join(figures)}; {'padded' if entry.info.pads_to_longest else 'packed'}")
