"""The browser talk page (``GET /``, ``/demo/``) and the route that mints its client secrets.

Served only when ``demo_page`` is on. The page never sees an API key: it asks
``POST /demo/client-secret`` for a short-lived realtime client secret, which this module obtains
from the public ``POST /v1/realtime/client_secrets`` route on behalf of the configured
``demo_api_key``, and opens the realtime WebSocket with it.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import httpx
from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse

from glmv_common.logs import get_logger, kv
from glmv_gateway.api.errors import ApiError
from glmv_gateway.api.state import AppState, app_state

log = get_logger("glmv.gateway.demo")
WEB_DIR = Path(__file__).resolve().parents[1] / "web"
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "Permissions-Policy": "microphone=(self)",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
SECRET_SECONDS = 60  # only needed to open the WebSocket; the session outlives it

router = APIRouter(include_in_schema=False)


def web_files() -> dict[str, Path]:
    return {p.name: p for p in WEB_DIR.iterdir() if p.suffix in MEDIA_TYPES}


def _file(path: Path) -> FileResponse:
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=SECURITY_HEADERS)


@router.get("/")
async def root() -> RedirectResponse:
    return RedirectResponse("demo/", status_code=307)


@router.get("/demo")
async def demo_bare() -> RedirectResponse:
    return RedirectResponse("demo/", status_code=307)


@router.get("/demo/")
async def page() -> FileResponse:
    return _file(WEB_DIR / "index.html")


@router.get("/demo/{name}")
async def asset(name: str) -> FileResponse:
    path = web_files().get(name)
    if path is None:
        raise ApiError(404, f"no such file: {name}")
    return _file(path)


def _check_same_origin(request: Request) -> None:
    """Other sites' pages must not mint secrets through a visitor's browser."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        raise ApiError(403, "client secrets are issued to this gateway's own page only")
    origin = request.headers.get("origin")
    if origin is not None and urlsplit(origin).netloc != request.headers.get("host", ""):
        raise ApiError(403, "client secrets are issued to this gateway's own page only")


@router.post("/demo/client-secret")
async def client_secret(request: Request, state: AppState = Depends(app_state)) -> JSONResponse:
    _check_same_origin(request)
    key = state.settings.demo_api_key
    if not key:
        raise ApiError(503, "the talk page has no API key configured (set GLMV_GATEWAY_DEMO_API_KEY)")
    body = {
        "expires_after": {"anchor": "created_at", "seconds": SECRET_SECONDS},
        "session": {"type": "realtime", "model": state.settings.demo_model},
    }
    transport = httpx.ASGITransport(app=request.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway.internal") as client:
        response = await client.post(
            "/v1/realtime/client_secrets", json=body, headers={"Authorization": f"Bearer {key}"}
        )
    if response.status_code != 200:
        log.warning("minting a talk-page secret failed", extra=kv(status=response.status_code))
        if response.status_code == 404:
            raise ApiError(503, "this gateway has no realtime endpoint")
        raise ApiError(503, f"could not mint a client secret (HTTP {response.status_code})")
    minted = response.json()
    return JSONResponse(
        {
            "value": minted["value"],
            "expires_at": minted.get("expires_at"),
            "model": state.settings.demo_model,
        },
        headers={"Cache-Control": "no-store"},
    )
