"""The web viewer's files (``src/nodulenet/serve/static/``), served by ``nodulenet serve``; nothing from a CDN.

==================  ==========  =====================================================================================
``GET /``           no token    the login page (``static/public/index.html``): a form for the server's token, kept in
                                the tab's ``sessionStorage``; the research-software notice and the TCIA credit
``GET /static/X``   no token    the login page's own script and style sheet (``static/public/``), nothing else
``GET /app/X``      token       the viewer itself (``static/app/``: ``viewer.js`` and the vendored NiiVue,
                                ``vendor/niivue/``, see ``scripts/vendor_niivue.sh``), fetched by the login script
                                with ``Authorization: Bearer`` once the token is accepted
==================  ==========  =====================================================================================

So without the token a browser gets the login page and ``/health`` and nothing else: no job, no scan, not even the
viewer's code. Files are looked up by name inside their folder only (no ``..``, no absolute path, no symlink out).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import FileResponse

STATIC_DIR = Path(__file__).resolve().parent / "static"
_MEDIA = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".png": "image/png", ".svg": "image/svg+xml"}
# Nothing may be framed (clickjacking) or loaded from elsewhere; scripts are this server's own, or blob: URLs the
# login script makes from the viewer's code after fetching it with the token.
_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self' blob:; style-src 'self' 'unsafe-inline'; "
                               "img-src 'self' data: blob:; connect-src 'self'; frame-ancestors 'none'; "
                               "base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def static_file(folder: Path, name: str) -> FileResponse:
    """``folder/name`` if it is a file inside ``folder`` (404 otherwise), with its media type."""
    path = (folder / name).resolve()
    if folder.resolve() not in path.parents or not path.is_file():
        raise HTTPException(404, f"no file {name!r} here")
    media = _MEDIA.get(path.suffix, "application/octet-stream")
    # The viewer's code changes only with the package: a browser may keep it for its session, never share it.
    cache = "no-cache" if path.suffix == ".html" else "private, max-age=3600"
    return FileResponse(path, media_type=media, headers={**_SECURITY_HEADERS, "Cache-Control": cache})


def web_router(require_token: Callable[..., None]) -> APIRouter:
    """The login page (public) and the viewer's files (behind ``require_token``)."""
    router = APIRouter(include_in_schema=False)
    public, app = STATIC_DIR / "public", STATIC_DIR / "app"

    @router.get("/")
    def login_page() -> FileResponse:
        return static_file(public, "index.html")

    @router.get("/static/{name}")
    def login_asset(name: str) -> FileResponse:
        return static_file(public, name)

    @router.get("/app/{path:path}", dependencies=[Depends(require_token)])
    def viewer_asset(path: str) -> FileResponse:
        return static_file(app, path)

    return router
