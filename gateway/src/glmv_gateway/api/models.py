"""GET /v1/models: the component versions the gateway routes to, their health and traffic share."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from glmv_gateway.api.auth import require_api_key
from glmv_gateway.api.state import AppState, app_state

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("")
async def list_models(
    _: str = Depends(require_api_key), state: AppState = Depends(app_state)
) -> dict[str, Any]:
    """Versions as of the last probe (every ``versions_poll_s``): per tokenizer/decoder version its
    addresses and their health, weight, draining flag, state (serving, draining, incompatible or the
    health answer), compatibility problems with the LM, share of new sessions, model id, fingerprint
    and model version; the LM replicas with their health."""
    registry = state.clients.registry
    return {
        "versions_file": str(registry.file) if registry.file else None,
        "versions_file_error": registry.file_error,
        "components": registry.describe_versions(),
    }
