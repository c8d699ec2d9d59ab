"""Short-lived client secrets for browsers: ``POST /v1/realtime/client_secrets``.

A server holding an API key asks for a secret (``ek_…``) and hands it to a browser, which connects
to ``/v1/realtime`` with it (``Authorization: Bearer ek_…`` or the subprotocol
``openai-insecure-api-key.ek_…``). A secret lives in Redis with a TTL (``expires_after.seconds``,
10 s to 2 h, default 10 min), is accepted only by the realtime endpoint, acts for the key that
created it (session ownership, turn slots) and may carry the session configuration to start with.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from fastapi import APIRouter, Body, Depends
from pydantic import BaseModel, ConfigDict, Field

from glmv_gateway.api.auth import require_api_key
from glmv_gateway.api.errors import ApiError
from glmv_gateway.api.realtime.protocol import ProtocolError
from glmv_gateway.api.realtime.session import SessionView, default_view
from glmv_gateway.api.state import AppState, app_state
from glmv_gateway.conversation.conversation import AudioFormat
from glmv_gateway.schemas import SessionSettings
from glmv_gateway.sessions import PREFIX, SessionStore

router = APIRouter(prefix="/v1/realtime", tags=["realtime"])
SECRET_PREFIX = "ek_"


class ExpiresAfter(BaseModel):
    model_config = ConfigDict(extra="forbid")
    anchor: str = "created_at"
    seconds: int = Field(600, ge=10, le=7200)


class SecretRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    expires_after: ExpiresAfter = Field(default_factory=ExpiresAfter)
    session: dict[str, Any] | None = None


def _key(value: str) -> str:
    return f"{PREFIX}:realtime-secret:{value}"


async def resolve(store: SessionStore, value: str) -> dict[str, Any] | None:
    """The secret's record ({"owner": api key, "session": config}) or None if unknown or expired."""
    raw = await store.redis.get(_key(value))
    return json.loads(raw) if raw else None


@router.post("/client_secrets")
async def create_client_secret(
    body: SecretRequest = Body(default_factory=SecretRequest),
    api_key: str = Depends(require_api_key),
    state: AppState = Depends(app_state),
) -> dict[str, Any]:
    session = body.session or {}
    settings = SessionSettings()
    view = SessionView(
        default_view("", str(session.get("model") or "glm-4-voice"), settings, 0), AudioFormat()
    )
    try:
        planned, _, _ = view.plan(session, settings)
    except ProtocolError as exc:
        raise ApiError(400, f"{exc.param or 'session'}: {exc.message}") from None
    value = SECRET_PREFIX + secrets.token_urlsafe(24)
    ttl = body.expires_after.seconds
    await state.store.redis.set(_key(value), json.dumps({"owner": api_key, "session": session}), ex=ttl)
    expires_at = int(time.time()) + ttl
    planned.update(id=None, expires_at=expires_at)
    return {"value": value, "expires_at": expires_at, "session": planned}
