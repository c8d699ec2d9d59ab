"""API keys: ``Authorization: Bearer <key>``; keys come from settings or the Redis set glmv:apikeys."""

from __future__ import annotations

import hmac

from fastapi import Depends, Request, WebSocket

from glmv_gateway.api.errors import ApiError
from glmv_gateway.api.state import AppState, app_state


async def check_key(state: AppState, key: str | None) -> str:
    if not key:
        raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'")
    if any(hmac.compare_digest(key, known) for known in state.settings.static_api_keys()):
        return key
    if await state.store.has_api_key(key):
        return key
    raise ApiError(401, "invalid API key")


def bearer_key(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


async def require_api_key(request: Request, state: AppState = Depends(app_state)) -> str:
    return await check_key(state, bearer_key(request.headers.get("authorization")))


async def websocket_api_key(websocket: WebSocket, state: AppState) -> str:
    """Browsers cannot set headers on WebSockets: also accept ``?api_key=``."""
    key = bearer_key(websocket.headers.get("authorization")) or websocket.query_params.get("api_key")
    return await check_key(state, key)
