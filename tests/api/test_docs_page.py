"""The API docs page works offline: every script, style and icon it loads is served by the gateway itself."""

from __future__ import annotations

import re
from urllib.parse import urlparse

import pytest

from gateway.api import docs

# Every <script src> and <link href> in a page (Litestar writes both quote styles).
_ASSET = re.compile(r"""<(?:script|link)\b[^>]*?\b(?:src|href)\s*=\s*["']([^"']+)["']""", re.IGNORECASE)


@pytest.mark.parametrize("page", ["/schema", "/schema/swagger"])
def test_the_docs_page_loads_only_the_gateways_own_assets(fake_client, page):
    r = fake_client.get(page, headers={"Authorization": ""})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    urls = _ASSET.findall(r.text)
    # The bundle, the standalone preset, the stylesheet and the icon.
    assert len(urls) == 4, urls
    for url in urls:
        assert not urlparse(url).scheme and not url.startswith("//"), f"{page} loads {url} from elsewhere"
        assert url.startswith(docs.STATIC_PATH + "/"), url
        asset = fake_client.get(url, headers={"Authorization": ""})
        assert asset.status_code == 200, url
        assert asset.content, url
    assert "SwaggerUIBundle(" in r.text


def test_the_assets_are_swagger_ui_with_its_license(fake_client):
    js = fake_client.get(f"{docs.STATIC_PATH}/swagger-ui-bundle.js")
    assert js.headers["content-type"].startswith("text/javascript")
    assert "SwaggerUIBundle" in js.text[:2000]
    license_text = fake_client.get(f"{docs.STATIC_PATH}/LICENSE").text
    assert "Apache License" in license_text
    assert re.fullmatch(r"\d+\.\d+\.\d+", docs.swagger_version())


@pytest.mark.parametrize(
    "path",
    [
        f"{docs.STATIC_PATH}/index.html",  # the package's pet-store demo page
        f"{docs.STATIC_PATH}/swagger-initializer.js",
    ],
)
def test_files_not_served_are_a_clean_404(fake_client, path):
    r = fake_client.get(path)
    assert r.status_code == 404
    assert r.json()["error"]["message"].startswith("no docs asset named")


@pytest.mark.parametrize(
    "page", ["/schema/redoc", "/schema/rapidoc", "/schema/elements", f"{docs.STATIC_PATH}/..%2F..%2F__init__.py"]
)
def test_pages_whose_assets_only_a_cdn_has_are_dropped(fake_client, page):
    # Litestar's own 404 page for an unknown /schema path: plain HTML that loads nothing.
    r = fake_client.get(page)
    assert r.status_code == 404
    assert not _ASSET.findall(r.text)
