"""``GET /dashboard``: kvern's own page, from the package's static files; ``/`` leads there.

Why static files in the package and no CDN: kvern runs where the GPUs are,
often with no way out to the internet, and the page must work there; the
charts are drawn by the page's own small SVG code, so there is nothing to
build and nothing to fetch but kvern's JSON endpoints.

Why the page itself needs no admin key: it holds no data. Every figure comes
from ``/analytics``, ``/health`` and ``/trie/tree``, which the page asks for
with the key it keeps in the browser (``x-kvern-admin-key``), and a 401 there
makes it ask for the key. The HTML carries a Content-Security-Policy that
allows only kvern's own scripts and styles, so prompt text the page shows can
never run as code even if a bug let it into the markup.

Only files named in :data:`_MEDIA_TYPES`' suffixes under ``static/`` are
served, with their types given here rather than guessed from the system's
mime tables; anything else is the app's OpenAI-shaped 404.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from fastapi import APIRouter
from starlette.exceptions import HTTPException
from starlette.responses import FileResponse, RedirectResponse, Response

router = APIRouter()

STATIC_DIR: Final[Path] = Path(__file__).resolve().parent / "static"
STATIC_PREFIX: Final[str] = "/dashboard/static/"

_MEDIA_TYPES: Final[dict[str, str]] = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
_CSP: Final[str] = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
# The page is small and changes with kvern's version: the browser asks again
# (a 304 when unchanged) rather than keep an old copy.
_HEADERS: Final[dict[str, str]] = {
    "cache-control": "no-cache",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}


def _file(name: str) -> Response:
    path = (STATIC_DIR / name).resolve()
    media_type = _MEDIA_TYPES.get(path.suffix)
    # Names come from the URL: only plain files directly in static/ are served.
    if media_type is None or path.parent != STATIC_DIR or not path.is_file():
        raise HTTPException(404, f"no dashboard file {name!r}")
    headers = dict(_HEADERS)
    if path.suffix == ".html":
        headers["content-security-policy"] = _CSP
    return FileResponse(path, media_type=media_type, headers=headers)


@router.get("/", include_in_schema=False)
async def root() -> Response:
    """kvern's address in a browser shows the dashboard."""
    return RedirectResponse("/dashboard", status_code=307)


@router.get("/dashboard", include_in_schema=False)
async def dashboard() -> Response:
    return _file("dashboard.html")


@router.get(STATIC_PREFIX + "{name}", include_in_schema=False)
async def static(name: str) -> Response:
    return _file(name)
