"""`gateway embed-file` on the real MiniLM: each input format into each output format equals `/v1/embeddings`
for the same texts and options; a run killed midway and resumed gives the rows an uninterrupted run gives;
`--url` against a live server equals in-process; bad input, options and keys are one clear line and exit 2."""

from __future__ import annotations

import asyncio
import base64
import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gateway.cli import main
from gateway.embedding import bulk, bulk_http
from gateway.embedding.bulk_io import BulkError
from tests.conftest import API_KEY, SENTENCES, make_app, uvicorn_server, wait_until

ROOT = Path(__file__).resolve().parents[2]

# An input of 600 word tokens or so: over minilm's 256 and minilm-mrl's 128 token limits.
LONG = " ".join(["a text far too long for the model"] * 80)


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory, minilm_path: str) -> Path:
    """A config with the torch_client fixture's models (the same files, the same options)."""
    path = tmp_path_factory.mktemp("bulk") / "gateway.toml"
    path.write_text(
        f"""
[cache]
store = "off"

[models.minilm]
backend = "torch"
path = "{minilm_path}"

[models.minilm-mrl]
backend = "torch"
path = "{minilm_path}"
matryoshka_dimensions = [64, 128, 256, 384]
max_input_tokens = 128
"""
    )
    return path


def write_input(path: Path, texts: list[str], ids: list[str | None]) -> Path:
    """`texts` (with `ids`, None for none) as JSONL, CSV or Parquet, by `path`'s extension."""
    rows = [{"text": t, **({"id": i} if i is not None else {})} for t, i in zip(texts, ids, strict=True)]
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    elif path.suffix == ".csv":
        with path.open("w", encoding="utf-8", newline="") as fh:
            writer = csv.DictWriter(fh, ["id", "text"])
            writer.writeheader()
            writer.writerows(rows)
    else:
        pq.write_table(pa.table({"id": [r.get("id") for r in rows], "text": texts}), path)
    return path


def read_output(path: Path) -> tuple[list[str], np.ndarray, list[int | None]]:
    """(ids, vectors, tokens) of an embed-file output, Parquet or NumPy with its sidecar."""
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        vectors = np.array(table.column("vector").to_pylist(), dtype=np.float32)
        return table.column("id").to_pylist(), vectors, table.column("tokens").to_pylist()
    lines = [json.loads(line) for line in path.with_name(path.name + ".ids.jsonl").read_text().splitlines()]
    return [r["id"] for r in lines], np.load(path), [r["tokens"] for r in lines]


def api(client: Any, texts: list[str], **options: Any) -> tuple[np.ndarray, int]:
    """POST /v1/embeddings (base64: float32 bit for bit): the vectors and the request's tokens."""
    r = client.post("/v1/embeddings", json={"input": texts, "encoding_format": "base64", **options})
    assert r.status_code == 200, r.text
    rows = [np.frombuffer(base64.b64decode(d["embedding"]), np.float32) for d in r.json()["data"]]
    return np.stack(rows), r.json()["usage"]["total_tokens"]


def run_on(client: Any, plan: bulk.Plan, options: bulk.Options) -> bulk.Summary:
    """The embed-file run in-process, on the torch_client app's own gateway and event loop (models loaded once)."""
    gw = client.app.state.gateway

    async def go() -> bulk.Summary:
        return await bulk.run(bulk.start(plan, options), bulk.in_process(gw, options), bulk.Progress)

    return client.blocking_portal.call(go)  # type: ignore[no-any-return]


def plan_for(source: Path, out: Path, **kw: Any) -> bulk.Plan:
    fmt = {".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet"}[source.suffix]
    return bulk.Plan(source, fmt, "text", "id", out, out.suffix.lstrip("."), **{"window": 4, "request_size": 3, **kw})


@pytest.mark.parametrize("out_ext", [".parquet", ".npy"])
@pytest.mark.parametrize("in_ext", [".jsonl", ".csv", ".parquet"])
def test_each_input_format_into_each_output_equals_the_api(
    torch_client: Any, tmp_path: Path, in_ext: str, out_ext: str
) -> None:
    ids = [f"doc-{i}" if i % 3 else None for i in range(len(SENTENCES))]
    source = write_input(tmp_path / f"in{in_ext}", SENTENCES, ids)
    out = tmp_path / f"out{out_ext}"
    summary = run_on(torch_client, plan_for(source, out), bulk.Options("minilm"))
    got_ids, vectors, tokens = read_output(out)
    # A line without an id gets its line number: JSONL's lines from 1, CSV's after the header, Parquet's rows.
    first = 2 if in_ext == ".csv" else 1
    assert got_ids == [i if i is not None else str(n + first) for n, i in enumerate(ids)]
    want, total = api(torch_client, SENTENCES, model="minilm")
    assert vectors.dtype == np.float32 and vectors.shape == (len(SENTENCES), 384)
    # Batches of other sizes pad differently: float32 noise, not a different answer.
    np.testing.assert_allclose(vectors, want, atol=2e-6)
    assert sum(tokens) == total == summary.tokens
    assert summary.written == len(SENTENCES) and summary.skipped == 0
    assert not out.with_name(out.name + ".partial").exists() and not out.with_name(out.name + ".run.json").exists()


def test_each_rows_tokens_are_its_own(torch_client: Any, tmp_path: Path) -> None:
    source = write_input(tmp_path / "in.jsonl", SENTENCES, [None] * len(SENTENCES))
    run_on(torch_client, plan_for(source, tmp_path / "out.parquet"), bulk.Options("minilm"))
    _, _, tokens = read_output(tmp_path / "out.parquet")
    assert tokens == [api(torch_client, [t], model="minilm")[1] for t in SENTENCES]


@pytest.mark.parametrize("out_ext", [".parquet", ".npy"])
def test_dimensions_and_truncate_equal_the_api(torch_client: Any, tmp_path: Path, out_ext: str) -> None:
    texts = [*SENTENCES, LONG]
    source = write_input(tmp_path / "in.jsonl", texts, [None] * len(texts))
    out = tmp_path / f"out{out_ext}"
    options = bulk.Options("minilm-mrl", dimensions=64, truncate="start")
    run_on(torch_client, plan_for(source, out), options)
    _, vectors, tokens = read_output(out)
    want, total = api(torch_client, texts, model="minilm-mrl", dimensions=64, truncate="start")
    assert vectors.shape == (len(texts), 64)
    np.testing.assert_allclose(vectors, want, atol=2e-6)
    assert tokens[-1] == 128 and sum(tokens) == total


def test_an_input_over_the_limit_names_its_line(torch_client: Any, tmp_path: Path) -> None:
    source = write_input(tmp_path / "in.jsonl", [*SENTENCES[:5], LONG, SENTENCES[5]], [None] * 5 + ["long", None])
    with pytest.raises(BulkError) as err:
        run_on(torch_client, plan_for(source, tmp_path / "out.parquet"), bulk.Options("minilm-mrl"))
    message = str(err.value)
    assert message.startswith(f"{source} line 6 (id 'long'): the text has "), message
    assert "accepts at most 128 tokens per input (set `truncate`" in message


def spy_requests(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, bool]]:
    """(inputs, background) of each request in-process embed-file makes, passed on to the real function."""
    calls: list[tuple[int, bool]] = []
    real = bulk.service.request_vectors

    async def spy(gw: Any, body: Any, key: Any, notes: Any, deadline_s: Any, background: bool = False) -> Any:
        calls.append((len(body.input), background))
        return await real(gw, body, key, notes, deadline_s, background=background)

    monkeypatch.setattr(bulk.service, "request_vectors", spy)
    return calls


def test_in_process_sends_whole_windows_in_the_background(
    torch_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Batch API work (never refused by admission, no timeout), so a request may be a whole window: the batcher
    # always has the next batch queued, with no 429 to wait out.
    texts = [f"{t} ({k})" for k in range(5) for t in SENTENCES][:37]
    source = write_input(tmp_path / "in.jsonl", texts, [None] * len(texts))
    calls = spy_requests(monkeypatch)
    plan = plan_for(source, tmp_path / "out.parquet", window=16, request_size=None)
    run_on(torch_client, plan, bulk.Options("minilm"))
    assert calls == [(16, True), (16, True), (5, True)]
    _, vectors, tokens = read_output(tmp_path / "out.parquet")
    want, total = api(torch_client, texts, model="minilm")
    np.testing.assert_allclose(vectors, want, atol=2e-6)
    assert sum(tokens) == total


def test_a_request_over_the_token_bound_goes_in_halves(
    torch_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = [f"{SENTENCES[2]} [{k}]" for k in range(8)]
    source = write_input(tmp_path / "in.jsonl", texts, [None] * len(texts))
    server = torch_client.app.state.gateway.config.server
    # The tokens of a text like these (a digit apart), which the cache does not hold for the run.
    n = api(torch_client, [f"{SENTENCES[2]} [9]"], model="minilm")[1]
    # Room for two of these texts, not for four.
    monkeypatch.setattr(server, "max_tokens_per_request", 3 * n)
    calls = spy_requests(monkeypatch)
    run_on(
        torch_client,
        plan_for(source, tmp_path / "out.parquet", window=8, request_size=8, request_chars=10_000),
        bulk.Options("minilm"),
    )
    assert calls == [(8, True), (4, True), (2, True), (2, True), (4, True), (2, True), (2, True)]
    _, vectors, tokens = read_output(tmp_path / "out.parquet")
    monkeypatch.undo()
    np.testing.assert_allclose(vectors, api(torch_client, texts, model="minilm")[0], atol=2e-6)
    assert tokens == [n] * len(texts)


def cli(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "gateway", "embed-file", "--config", str(config), *args]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'plugins'}", "HF_HUB_OFFLINE": "1"}


@pytest.mark.parametrize("out_name", ["out.parquet", "out.npy"])
def test_resume_after_a_killed_run_gives_the_uninterrupted_rows(
    torch_client: Any, config: Path, tmp_path: Path, out_name: str
) -> None:
    texts = [f"{SENTENCES[i % len(SENTENCES)][:60]} (variant {i})" for i in range(400)]
    source = write_input(tmp_path / "in.jsonl", texts, [f"t{i}" for i in range(400)])
    out = tmp_path / out_name
    args = cli(config, str(source), "--model", "minilm", "--out", str(out), "--window", "16", "--request-size", "8")
    first_chunk = (
        out.with_name(out.name + ".partial") / "part-000000.parquet"
        if out.suffix == ".parquet"
        else out.with_name(out.name + ".ids.jsonl")
    )
    proc = subprocess.Popen(args, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: first_chunk.exists() and first_chunk.stat().st_size > 0, "the first chunk", timeout=300)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    killed_ids, _, _ = _prefix(out)
    assert 0 < len(killed_ids) < 400, "killed after its first chunk, before its last"

    again = subprocess.run(args, env=env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and f"{out} exists: continue it with --resume" in again.stderr

    resumed = subprocess.run([*args, "--resume"], env=env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    skipped = int(resumed.stderr.rsplit("; ", 2)[1].split()[0])
    assert skipped >= len(killed_ids), resumed.stderr

    reference = tmp_path / f"reference{out.suffix}"
    run_on(torch_client, plan_for(source, reference, window=16, request_size=8), bulk.Options("minilm"))
    got, want = read_output(out), read_output(reference)
    assert got[0] == want[0] == [f"t{i}" for i in range(400)]  # every row once, in input order
    np.testing.assert_allclose(got[1], want[1], atol=2e-6)
    assert got[2] == want[2]


def _prefix(out: Path) -> tuple[list[str], Any, Any]:
    """The ids a killed run left readable."""
    if out.suffix == ".parquet":
        parts = sorted(out.with_name(out.name + ".partial").glob("part-*.parquet"))
        return [i for p in parts for i in pq.read_table(p).column("id").to_pylist()], None, None
    lines = out.with_name(out.name + ".ids.jsonl").read_text().splitlines()
    return [json.loads(line)["id"] for line in lines if line.endswith("}")], None, None


def test_url_equals_in_process_and_a_bad_key_is_named(torch_client: Any, config: Path, tmp_path: Path) -> None:
    texts = [*SENTENCES, LONG]
    source = write_input(tmp_path / "in.csv", texts, [f"r{i}" for i in range(len(texts))])
    options = bulk.Options("minilm-mrl", dimensions=128, truncate=True)
    run_on(torch_client, plan_for(source, tmp_path / "local.parquet"), options)
    app = make_app("", config_path=config, plugins=())

    async def over(url: str, key: str, out: Path) -> bulk.Summary:
        started = bulk.start(plan_for(source, out, concurrency=3), options)
        async with bulk_http.client(url, key, 3) as http:
            return await bulk.run(started, bulk_http.over_http(http, options), bulk.Progress)

    with uvicorn_server(app) as (url, _):
        asyncio.run(over(url, API_KEY, tmp_path / "remote.parquet"))
        argv = ["embed-file", str(source), "--model", "minilm-mrl", "--out", str(tmp_path / "cli.npy")]
        argv += ["--dimensions", "128", "--truncate", "true", "--url", url, "--key", API_KEY]
        assert main(argv) == 0
        with pytest.raises(BulkError, match=r"refused the key \(401\)"):
            asyncio.run(over(url, "wrong-key", tmp_path / "refused.parquet"))
    local, remote = read_output(tmp_path / "local.parquet"), read_output(tmp_path / "remote.parquet")
    assert remote[0] == local[0]
    np.testing.assert_allclose(remote[1], local[1], atol=2e-6)
    # The API reports one token total per request, not each input's: --url writes none.
    assert remote[2] == [None] * len(texts)
    by_cli = read_output(tmp_path / "cli.npy")
    assert by_cli[0] == local[0] and by_cli[2] == remote[2]
    np.testing.assert_allclose(by_cli[1], local[1], atol=2e-6)


@pytest.mark.parametrize(
    ("lines", "extra", "message"),
    [
        ([{"text": "ok"}], ["--model", "nope"], "model 'nope' not found; available models: minilm, minilm-mrl"),
        ([{"text": "ok"}, {"body": "x"}], [], "in.jsonl line 2: no field 'text' (choose another with --text-field)"),
        ([{"text": "ok"}, {"text": "  "}], [], "in.jsonl line 2: empty text in field 'text'"),
        ([{"text": "ok"}, {"text": 3}], [], "in.jsonl line 2: field 'text' is int, not text"),
        (["{not json"], [], "in.jsonl line 1: not JSON"),
        ([], [], "in.jsonl: no records to embed"),
        ([{"text": "ok"}], ["--truncate", "end", "--out", "x.txt"], "cannot tell the output format from '.txt'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], lines: list[Any], extra: list[str], message: str
) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text("".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines))
    argv = ["embed-file", "--config", str(config), str(source), "--model", "minilm", "--out", str(tmp_path / "o.npy")]
    assert main([*argv, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_unreadable_input_and_existing_output(config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["embed-file", "--config", str(config), "--model", "minilm", "--out"]
    assert main([*base, str(tmp_path / "o.npy"), str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl: cannot read: No such file or directory" in capsys.readouterr().err
    (tmp_path / "bad.csv").write_bytes(b"id,text\n1,\xff\xfe\n")
    assert main([*base, str(tmp_path / "o.npy"), str(tmp_path / "bad.csv")]) == 2
    assert "bad.csv: not UTF-8 text" in capsys.readouterr().err
    (tmp_path / "bad.parquet").write_text("not parquet")
    assert main([*base, str(tmp_path / "o.npy"), str(tmp_path / "bad.parquet")]) == 2
    assert "bad.parquet: not a readable Parquet file" in capsys.readouterr().err
    (tmp_path / "in.jsonl").write_text('{"text": "ok"}\n')
    (tmp_path / "done.parquet").write_text("")
    assert main([*base, str(tmp_path / "done.parquet"), str(tmp_path / "in.jsonl")]) == 2
    assert "done.parquet exists: continue it with --resume, or replace it with --overwrite" in capsys.readouterr().err


def test_progress_lines_when_not_a_terminal(tmp_path: Path) -> None:
    with (tmp_path / "log").open("w+") as stream:
        progress = bulk.Progress(total=100, done=20, stream=stream, every_s=0.0)
        time.sleep(0.01)
        progress.add(30)
        stream.seek(0)
        line = stream.read()
    assert line.startswith("embed-file: 50/100 (50.0%) ") and " texts/s ETA " in line


def test_a_bar_on_a_terminal(tmp_path: Path) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    progress = bulk.Progress(total=100, done=20, stream=stream)
    progress.add(30)
    progress.close()
    shown = stream.getvalue()
    assert "50/100" in shown and "text/s" in shown and not shown.startswith("embed-file:")


def test_resume_refuses_another_input_or_other_options(tmp_path: Path) -> None:
    source = write_input(tmp_path / "in.jsonl", ["one", "two", "three"], ["a", "b", "c"])
    out = tmp_path / "out.parquet"
    plan = plan_for(source, out, resume=True)
    started = bulk.start(plan, bulk.Options("minilm"))  # a run that wrote one chunk, then died
    started.sink.write(["a", "b"], np.ones((2, 4), np.float32), [1, 1])
    with pytest.raises(BulkError, match="was started with other input or options"):
        bulk.start(plan, bulk.Options("minilm", dimensions=64))
    write_input(source, ["one", "two", "three"], ["a", "x", "c"])
    with pytest.raises(BulkError, match="row 2 holds id 'b' but the input has 'x' there"):
        asyncio.run(bulk.run(bulk.start(plan, bulk.Options("minilm")), _never, bulk.Progress))


async def _never(texts: list[str]) -> Any:
    raise AssertionError("nothing is embedded before the written prefix is checked")


def test_parquet_without_pyarrow_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = write_input(tmp_path / "in.jsonl", ["one"], ["a"])
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # what `import pyarrow` finds when it is not installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(BulkError, match=r"Parquet needs pyarrow: pip install 'embedding-gateway\[bulk\]'"):
        asyncio.run(
            bulk.run(bulk.start(plan_for(source, tmp_path / "o.parquet"), bulk.Options("m")), _never, bulk.Progress)
        )
