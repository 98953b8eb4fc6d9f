"""The operator's console at /console: one HTML page, one script and one stylesheet, served by the gateway itself.

The page holds no data and needs no key: the operator types a key into it, and every figure it shows comes from
the key-protected HTTP API (/v1/models, /ready, /admin/models, /metrics, /v1/embeddings, /admin/check), so the
page adds no capability of its own. Its files ship in the package (gateway/data/console/), and a Content Security
Policy keeps the browser from loading anything from elsewhere.
"""

from __future__ import annotations

from importlib import resources

from litestar import get
from litestar.params import FromPath
from litestar.response import Response

from gateway.base.errors import GatewayError

STATIC_PATH = "/console/static"
_FILES = {
    "console.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
}
# Only this origin's scripts, styles and API calls; no inline script, no frames, no plugins.
_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    # The files change with the package; a browser re-checks them on each load (they are small).
    "cache-control": "no-cache",
}


def _read(name: str) -> bytes:
    return resources.files("gateway").joinpath("data/console", name).read_bytes()


@get("/console", include_in_schema=False, sync_to_thread=False)
def console_page() -> Response[bytes]:
    """The console's HTML shell (no data, no key needed)."""
    return Response(_read("index.html"), media_type="text/html; charset=utf-8", headers=_HEADERS)


@get(f"{STATIC_PATH}/{{name:str}}", include_in_schema=False, sync_to_thread=False)
def console_asset(name: FromPath[str]) -> Response[bytes]:
    """The console's script or stylesheet."""
    media_type = _FILES.get(name)
    if media_type is None:
        raise GatewayError(404, f"no console asset named {name!r}", code="not_found")
    return Response(_read(name), media_type=media_type, headers=_HEADERS)


ROUTES = [console_page, console_asset]
