"""The playground: a static page at /ui/ (and / redirecting there), served from the package.

Plain HTML, CSS and JavaScript modules in `server/ui/`, read once at import; no build step, no
CDN. The page and its assets are open paths (RELIABILITY.md item 20): they hold no secret, and
every API call the page makes carries the key the user typed. Each asset is its own exact route,
so the key check's exact-path match (server/middleware.py) covers them and nothing else. Every
response carries a Content-Security-Policy that allows this origin only, and none is in the
OpenAPI schema. Off with `--no-ui` (the `ui` setting).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import RedirectResponse, Response

UI_DIR = Path(__file__).resolve().parent.parent / "ui"
PAGE = "/ui/"
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
# Same origin only: no inline script or style, no frame, no plugin, no form posting elsewhere.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _assets() -> dict[str, tuple[bytes, str]]:
    """URL path -> (body, content type), for every file of the page."""
    found = {}
    for path in sorted(UI_DIR.iterdir()):
        if path.suffix in TYPES:
            found[f"/ui/{path.name}"] = (path.read_bytes(), TYPES[path.suffix])
    found[PAGE] = found.pop("/ui/index.html")
    return found


ASSETS = _assets()
# What the key check lets through when the UI is on: the redirects, the page and its assets.
UI_PATHS = frozenset({"/", "/ui", *ASSETS})
router = APIRouter(include_in_schema=False)


def _serve(body: bytes, media_type: str) -> Callable[[], Awaitable[Response]]:
    async def asset() -> Response:
        return Response(body, media_type=media_type, headers=HEADERS)

    return asset


for _path, (_body, _type) in ASSETS.items():
    router.add_api_route(_path, _serve(_body, _type), methods=["GET"])


@router.get("/")
@router.get("/ui")
async def to_page() -> RedirectResponse:
    return RedirectResponse(PAGE, status_code=307, headers=HEADERS)
