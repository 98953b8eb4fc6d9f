"""The operator's console at /console, in a real browser (headless Chromium through playwright) against a real
gateway: the key typed into the page, the models panel, the live figures, the playground's cosines against the
API's own vectors, the check panel; and the JSON endpoint it reads for operators (GET /admin/models)."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest

from tests.conftest import cosine, make_app, serve, uvicorn_server, wait_until

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[2]
ADMIN, USER = "console-admin-key", "console-user-key"
ADMIN_KEY = f"""
[[auth.keys]]
key = "{ADMIN}"
admin = true
"""
FAKES = (
    ADMIN_KEY
    + f"""
[[auth.keys]]
key = "{USER}"
models = ["fake"]
"""
    + """
[models.fake]
backend = "fake"
path = "."

[models.fake-twin]
backend = "fake"
path = "."

[models.other]
backend = "fake-b"
path = "."
"""
)
TEXTS = ["the cat sat on the mat", "a dog lay on the rug", "stock prices fell today"]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.path.exists(CHROMIUM):
        pytest.skip("chromium not installed (make test installs Debian's chromium as root with apt)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright not installed (it is in the test extra)")
    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
    args += ["--disable-sync", "--no-first-run"]
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=args)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def fake_server() -> Iterator[str]:
    with uvicorn_server(make_app(FAKES, keys="config")) as (url, _):
        yield url


class Page:
    """A fresh browser tab on `url`/console that records what it loads and what goes wrong in it."""

    def __init__(self, browser: Any, url: str) -> None:
        self.url = url
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        self.page = self.context.new_page()
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.responses: list[Any] = []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("response", lambda r: self.responses.append(r))
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

    def open(self, key: str | None = None) -> Any:
        self.page.goto(f"{self.url}/console", wait_until="load")
        if key is not None:
            self.page.fill("#key", key)
            self.page.click("#key-form button[type=submit]")
        return self.page

    def close(self, refused: int | None = None) -> None:
        """Check what the tab did; `refused`: the status of the API call the test expects the browser to log as
        a failed resource (its own console line, not the page's)."""
        self.context.close()
        origin = urlparse(self.url)
        elsewhere = [
            u for u in self.requests if (urlparse(u).scheme, urlparse(u).netloc) != (origin.scheme, origin.netloc)
        ]
        assert not elsewhere, f"the console loaded URLs outside the gateway: {elsewhere}"
        allowed = f"the server responded with a status of {refused}"
        assert [e for e in self.errors if refused is None or allowed not in e] == [], self.errors


@pytest.fixture
def tab(browser: Any, fake_server: str) -> Iterator[Page]:
    page = Page(browser, fake_server)
    yield page


def _cells(page: Any, selector: str) -> list[list[str]]:
    return page.eval_on_selector_all(
        f"{selector} tbody tr", "rows => rows.map(r => [...r.children].map(c => c.textContent.trim()))"
    )


def test_a_wrong_key_shows_the_apis_error(tab: Page) -> None:
    page = tab.open("not-a-key")
    page.wait_for_selector("#error:not([hidden])")
    assert page.text_content("#error") == "invalid API key"
    assert page.is_hidden("#panels")
    # The key lives in this tab's session storage only, never in the URL or local storage.
    assert page.evaluate("sessionStorage.getItem('gateway-console-key')") == "not-a-key"
    assert page.evaluate("localStorage.length") == 0 and "not-a-key" not in page.url
    tab.close(refused=401)


def test_an_admin_key_shows_every_model_with_placement_and_circuit(tab: Page) -> None:
    page = tab.open(ADMIN)
    page.wait_for_selector("#models tbody tr")
    rows = {r[0]: r for r in _cells(page, "#models")}
    assert set(rows) == {"fake", "fake-twin", "other"}
    _, state, task, backend, placement, replicas, dim, max_tokens, limits, _prompts, circuit, queue = rows["fake"]
    assert (state, task, backend, placement, replicas, dim, max_tokens) == (
        "ready",
        "embed",
        "fake",
        "in-process",
        "-",
        "8",
        "16",
    )
    assert limits == "batch auto, queue 4096, wait 2000 ms" and circuit == "closed" and queue == "0"
    assert page.text_content("#models-note") == ""
    tab.close()


def test_a_user_key_sees_its_models_and_admin_panels_say_so(tab: Page) -> None:
    page = tab.open(USER)
    page.wait_for_selector("#models tbody tr")
    rows = _cells(page, "#models")
    assert [r[0] for r in rows] == ["fake"]
    assert "needs an admin key" in page.text_content("#models-note")
    assert rows[0][8] == "needs an admin key"
    assert page.text_content("#check-results") == "needs an admin key" and page.is_disabled("#run-check")
    # The 403 of /admin/models, logged by the browser as a failed fetch.
    tab.close(refused=403)


def _api_vectors(url: str, model: str, texts: list[str]) -> np.ndarray:
    r = httpx.post(
        f"{url}/v1/embeddings", json={"model": model, "input": texts}, headers={"Authorization": f"Bearer {ADMIN}"}
    )
    assert r.status_code == 200, r.text
    return np.array([d["embedding"] for d in r.json()["data"]])


def _play(page: Any, texts: list[str], models: list[str]) -> None:
    page.fill("#texts", "\n".join(texts))
    page.select_option("#play-models", models)
    page.click("#play-form button[type=submit]")
    page.wait_for_selector(f".result[data-model='{models[-1]}'] .cosine-matrix")
    if len(models) > 1:
        page.wait_for_selector(".cross-model")


def _assert_playground_matches_api(page: Any, url: str, models: list[str], texts: list[str]) -> dict[str, float]:
    vectors = {m: _api_vectors(url, m, texts) for m in models}
    for m in models:
        shown = _cells(page, f".result[data-model='{m}'] .cosine-matrix")
        assert len(shown) == len(texts)
        for i, row in enumerate(shown):
            expected = [f"{cosine(vectors[m][i], vectors[m][j]):.4f}" for j in range(len(texts))]
            assert row[1:] == expected, (m, i)
        heading = page.text_content(f".result[data-model='{m}'] h3")
        tokens = httpx.post(
            f"{url}/v1/embeddings", json={"model": m, "input": texts}, headers={"Authorization": f"Bearer {ADMIN}"}
        )
        assert heading.startswith(f"{m}: {tokens.json()['usage']['prompt_tokens']} tokens, ") and heading.endswith(
            " ms"
        )
    cross = {r[0]: r[1:] for r in _cells(page, ".cross-model")}
    agreement = {}
    for a, b in itertools.combinations(models, 2):
        expected = [f"{cosine(vectors[a][k], vectors[b][k]):.4f}" for k in range(len(texts))]
        assert cross[f"{a} vs {b}"] == expected
        agreement[f"{a} vs {b}"] = min(cosine(vectors[a][k], vectors[b][k]) for k in range(len(texts)))
    return agreement


def test_the_playground_shows_the_apis_cosines(tab: Page) -> None:
    page = tab.open(ADMIN)
    page.wait_for_selector("#play-models option")
    _play(page, TEXTS, ["fake", "fake-twin", "other"])
    agreement = _assert_playground_matches_api(page, tab.url, ["fake", "fake-twin", "other"], TEXTS)
    assert agreement["fake vs fake-twin"] > 0.9999  # the same backend twice agrees
    tab.close()


def test_the_check_panel_shows_the_check_report(tab: Page) -> None:
    page = tab.open(ADMIN)
    page.wait_for_selector("#models tbody tr")
    page.click("#run-check")
    page.wait_for_selector("#check-table")
    report = httpx.get(f"{tab.url}/admin/check", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=120).json()
    shown = _cells(page, "#check-table")
    assert [r[0] for r in shown] == [r["model"] for r in report["rows"]]
    for row, expected in zip(shown, report["rows"], strict=True):
        assert row[1] == (expected["reference"] or "-")
        assert row[4] == ("-" if expected["min_cosine"] is None else f"{expected['min_cosine']:.5f}")
    tab.close()


def test_live_figures_follow_the_traffic(tab: Page) -> None:
    page = tab.open(ADMIN)
    page.wait_for_selector("#chart-rps")
    with httpx.Client(base_url=tab.url, headers={"Authorization": f"Bearer {ADMIN}"}) as client:

        def busy() -> bool:
            client.post("/v1/embeddings", json={"model": "fake", "input": ["x"]})
            client.post("/v1/embeddings", json={"model": "nope", "input": ["x"]})
            value = page.text_content("#chart-rps .value")
            return value not in ("-", "0.0") and page.text_content("#chart-p50 .value").endswith(" ms")

        wait_until(busy, "the requests/s and p50 charts show traffic", timeout=30)
    assert float(page.text_content("#chart-rps .value")) > 0
    assert page.get_attribute("#chart-rps polyline", "points")
    tab.close()


def test_first_load_weight_and_no_outside_urls(tab: Page) -> None:
    page = tab.open()
    page.wait_for_load_state("networkidle")
    weight = {urlparse(r.url).path: len(r.body()) for r in tab.responses}
    assert set(weight) == {"/console", "/console/static/console.js", "/console/static/console.css"}
    total = sum(weight.values())
    assert total < 40_000, weight
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "console-weight.txt").write_text(f"{total} bytes on first load: {weight}\n")
    tab.close()


@pytest.fixture(scope="module")
def minilm_server(minilm_path: str) -> Iterator[tuple[str, list[str]]]:
    gguf = ROOT / "models" / "minilm-q8_0.gguf"
    space = 'embedding_space = "minilm"\n'
    toml = ADMIN_KEY + f'\n[models.minilm]\nbackend = "torch"\npath = "{minilm_path}"\n{space}'
    models = ["minilm"]
    if gguf.exists():  # `make models` builds it; without it the playground compares torch with itself
        toml += f'\n[models.minilm-gguf-q8]\nbackend = "gguf"\npath = "{gguf}"\n{space}'
        models.append("minilm-gguf-q8")
    with uvicorn_server(make_app(toml, keys="config", plugins=())) as (url, _):
        yield url, models


def test_the_playground_with_minilm_shows_backends_agree(browser: Any, minilm_server: tuple[str, list[str]]) -> None:
    url, models = minilm_server
    tab = Page(browser, url)
    page = tab.open(ADMIN)
    page.wait_for_selector("#play-models option")
    texts = ["A man is playing a guitar.", "Someone plays an instrument.", "The stock market fell sharply today."]
    _play(page, texts, models)
    agreement = _assert_playground_matches_api(page, url, models, texts)
    if len(models) > 1:
        assert agreement["minilm vs minilm-gguf-q8"] > 0.98
    page.click("#run-check")
    page.wait_for_selector("#check-table", timeout=120_000)
    rows = {r[0]: r for r in _cells(page, "#check-table")}
    if len(models) > 1:
        assert rows["minilm-gguf-q8"][1] == "minilm" and rows["minilm-gguf-q8"][-1] == "ok", rows
    # The figures' second sample (the first gives only a baseline): the screenshot shows them.
    wait_until(lambda: page.text_content("#chart-rps .value") != "-", "the live figures", timeout=30)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(out / "console.png"), full_page=True)
    tab.close()


# ---- GET /admin/models -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed_client() -> Iterator[Any]:
    with serve(FAKES, keys="config") as client:
        client.headers.pop("authorization", None)
        yield client


@pytest.mark.parametrize(
    ("auth", "status", "message"),
    [
        (None, 401, "missing API key"),
        ("Bearer wrong", 401, "invalid API key"),
        (f"Bearer {USER}", 403, "this API key may not use admin endpoints"),
    ],
)
def test_admin_models_refuses_without_an_admin_key(
    keyed_client: Any, auth: str | None, status: int, message: str
) -> None:
    r = keyed_client.get("/admin/models", headers={"Authorization": auth} if auth else {})
    assert r.status_code == status
    assert r.json()["error"]["message"].startswith(message), r.json()


def test_admin_models_gives_each_models_runtime(keyed_client: Any) -> None:
    r = keyed_client.get("/admin/models", headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200
    data = {m["id"]: m for m in r.json()["data"]}
    assert set(data) == {"fake", "fake-twin", "other"}
    fake = data["fake"]
    assert fake["placement"] == "in-process" and fake["replicas"] is None and fake["circuit"] == "closed"
    assert fake["queue_depth"] == 0 and fake["limits"]["max_queue"] == 4096 and fake["limits"]["circuit_failures"] == 3
    assert fake["card"]["dimension"] == 8 and fake["card"]["state"] == "ready"


def test_console_files_are_served_with_a_policy_that_keeps_them_local(keyed_client: Any) -> None:
    r = keyed_client.get("/console")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in r.headers["content-security-policy"]
    assert keyed_client.get("/console/static/console.js").headers["content-type"].startswith("text/javascript")
    missing = keyed_client.get("/console/static/secrets.txt")
    assert missing.status_code == 404 and missing.json()["error"]["message"] == "no console asset named 'secrets.txt'"


def test_the_screenshot_is_copied_for_the_docs() -> None:
    # docs/console.png is committed from a run of the MiniLM test above; it must stay a real PNG.
    png = ROOT / "docs" / "console.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gateway_models_url_prints_what_admin_models_says(fake_server: str, capsys: Any, monkeypatch: Any) -> None:
    from gateway.cli import main

    monkeypatch.delenv("GATEWAY_API_KEY", raising=False)
    assert main(["models", "--url", fake_server, "--key", ADMIN]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "model", "state", "task", "backend", "placement", "replicas", "dim", "max", "tokens", "circuit", "queue"
    ]  # fmt: skip
    assert lines[1].split() == ["fake", "ready", "embed", "fake", "in-process", "-", "8", "16", "closed", "0"]
    assert main(["models", "--url", fake_server, "--key", USER]) == 2
    assert f"{fake_server} answered 403: this API key may not use admin endpoints" in capsys.readouterr().err
    assert main(["models", "--url", fake_server]) == 2
    assert "--url needs --key" in capsys.readouterr().err
