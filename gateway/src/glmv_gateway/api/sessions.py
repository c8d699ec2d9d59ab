"""Session CRUD and history."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Depends

from glmv_gateway.api.auth import require_api_key
from glmv_gateway.api.errors import ApiError
from glmv_gateway.api.state import AppState, app_state
from glmv_gateway.schemas import SessionCreate, SessionPatch, apply_patch
from glmv_gateway.sessions import SessionNotFound
from glmv_gateway.versions import VersionUnavailable

router = APIRouter(prefix="/v1/sessions", tags=["sessions"])


def not_found(session_id: str) -> ApiError:
    return ApiError(404, f"session {session_id} not found (expired or deleted)")


@router.post("", status_code=201)
async def create_session(
    body: SessionCreate | None = Body(None),
    api_key: str = Depends(require_api_key),
    state: AppState = Depends(app_state),
) -> dict[str, Any]:
    body = body or SessionCreate()
    settings = body.model_dump(mode="json", exclude={"versions"})
    try:
        versions = state.clients.registry.assign_all(body.versions)
    except VersionUnavailable as exc:
        raise ApiError(exc.status, exc.message) from None
    session = await state.store.create(settings, owner=api_key, versions=versions)
    return session.public()


@router.get("/{session_id}")
async def get_session(
    session_id: str, api_key: str = Depends(require_api_key), state: AppState = Depends(app_state)
) -> dict[str, Any]:
    try:
        return (await state.store.get(session_id, owner=api_key)).public()
    except SessionNotFound:
        raise not_found(session_id) from None


@router.patch("/{session_id}")
async def patch_session(
    session_id: str,
    patch: SessionPatch,
    api_key: str = Depends(require_api_key),
    state: AppState = Depends(app_state),
) -> dict[str, Any]:
    try:
        session = await state.store.get(session_id, owner=api_key)
    except SessionNotFound:
        raise not_found(session_id) from None
    settings = apply_patch(session.settings, patch.model_dump(mode="json", exclude_unset=True))
    return (await state.store.update_settings(session_id, settings)).public()


@router.delete("/{session_id}", status_code=204)
async def delete_session(
    session_id: str, api_key: str = Depends(require_api_key), state: AppState = Depends(app_state)
) -> None:
    try:
        await state.store.get(session_id, owner=api_key, touch=False)
        await state.store.delete(session_id)
    except SessionNotFound:
        raise not_found(session_id) from None


@router.get("/{session_id}/history")
async def history(
    session_id: str, api_key: str = Depends(require_api_key), state: AppState = Depends(app_state)
) -> dict[str, Any]:
    try:
        await state.store.get(session_id, owner=api_key)
        turns = await state.store.history(session_id)
    except SessionNotFound:
        raise not_found(session_id) from None
    return {
        "session_id": session_id,
        "turns": [
            {
                "turn_id": t["turn_id"],
                "created_at": t["created_at"],
                "user": {
                    "kind": t["user"]["kind"],
                    "text": t["user"].get("text"),
                    "audio_tokens": len(t["user"].get("tokens", [])),
                },
                "assistant": {k: v for k, v in t["assistant"].items() if k != "ids"}
                | {"token_count": len(t["assistant"]["ids"])},
                "usage": t.get("usage", {}),
                "timings": t.get("timings", {}),
            }
            for t in turns
        ],
    }
