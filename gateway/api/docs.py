"""The API docs page's own files: Swagger UI served by the gateway itself, so /schema works offline.

Litestar's render plugins load their scripts and styles from public CDNs, which leaves the page blank on a
network without one (most production networks). Swagger UI comes from the PyPI package `swagger-ui-bundle-v2`
(Apache-2.0, maintained by the Connexion project, Swagger UI's own `dist` files: the version is in the folder
name); no maintained PyPI package ships Redoc, RapiDoc or Stoplight Elements without a framework of its own, so
those pages are not served (their paths answer 404).
"""

from __future__ import annotations

from pathlib import Path

from litestar import get
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.params import FromPath
from litestar.response import File
from swagger_ui_bundle import swagger_ui_path

from gateway.base.errors import GatewayError

STATIC_PATH = "/schema/static"
# Only the files the page loads (the package also has a pet-store demo page that must not be served).
_FILES = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui-standalone-preset.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "favicon-32x32.png": "image/png",
    "LICENSE": "text/plain; charset=utf-8",
}
# The files change only with the package: a day in a browser's cache is safe, and the page's first load is
# the only heavy one.
_CACHE = "public, max-age=86400"


def swagger_folder() -> Path:
    """Where the installed package keeps Swagger UI's files."""
    return Path(str(swagger_ui_path))


def swagger_version() -> str:
    """The Swagger UI version the package ships (its folder is named `swagger-ui-<version>`)."""
    return swagger_folder().name.removeprefix("swagger-ui-")


def swagger_plugin() -> SwaggerRenderPlugin:
    """Swagger UI at /schema and /schema/swagger, every asset from `STATIC_PATH`."""
    return SwaggerRenderPlugin(
        path=["/swagger", "/"],
        js_url=f"{STATIC_PATH}/swagger-ui-bundle.js",
        css_url=f"{STATIC_PATH}/swagger-ui.css",
        standalone_preset_js_url=f"{STATIC_PATH}/swagger-ui-standalone-preset.js",
        favicon=f"<link rel='icon' type='image/png' href='{STATIC_PATH}/favicon-32x32.png'>",
    )


@get(f"{STATIC_PATH}/{{name:str}}", include_in_schema=False, sync_to_thread=False)
def docs_asset(name: FromPath[str]) -> File:
    """One of the docs page's files, from the installed package."""
    media_type = _FILES.get(name)
    if media_type is None:
        raise GatewayError(404, f"no docs asset named {name!r}", code="not_found")
    folder = swagger_folder()
    # The license sits beside the package's metadata, not in its vendor folder.
    path = folder / name if name != "LICENSE" else _license(folder)
    return File(path=path, media_type=media_type, content_disposition_type="inline", headers={"cache-control": _CACHE})


def _license(folder: Path) -> Path:
    """Swagger UI's Apache-2.0 license as the package ships it (in its dist-info folder)."""
    from importlib import metadata

    dist = metadata.distribution("swagger-ui-bundle-v2")
    for file in dist.files or ():
        if file.name == "LICENSE":
            return Path(str(dist.locate_file(file)))
    return folder / "LICENSE"  # pragma: no cover - every release has shipped one


ROUTES = [docs_asset]
