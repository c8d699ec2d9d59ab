"""/healthz (process up), /readyz (Redis + all three services SERVING and compatible), /metrics."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from glmv_gateway.api.auth import bearer_key, check_key
from glmv_gateway.api.state import AppState, app_state
from glmv_gateway.clients import ComponentError, compatibility_problems

router = APIRouter()


@router.get("/healthz", tags=["health"])
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


async def readiness(state: AppState) -> tuple[bool, dict[str, object]]:
    report: dict[str, object] = {}
    ok = True
    try:
        await asyncio.wait_for(state.store.ping(), 2)
        report["redis"] = "ok"
    except Exception as exc:  # any failure to reach Redis means not ready
        report["redis"] = f"unreachable: {exc}"
        ok = False
    statuses = await asyncio.gather(*(state.clients.health(c) for c in ("tokenizer", "lm", "decoder")))
    report["services"] = dict(zip(("tokenizer", "lm", "decoder"), statuses, strict=True))
    if any(s != "SERVING" for s in statuses):
        return False, report
    try:
        infos = await state.clients.infos()
    except ComponentError as exc:
        report["compatibility"] = str(exc)
        return False, report
    report["models"] = {
        name: {
            "model_id": info.model_id,
            "version": info.version,
            "checkpoint": info.checkpoint_fingerprint[:16],
            "codebook_size": info.codebook_size or info.audio_token_count,
        }
        for name, info in infos.items()
    }
    problems = compatibility_problems(infos)
    if problems:
        report["compatibility"] = "; ".join(problems)
        ok = False
    else:
        report["compatibility"] = "ok"
    return ok, report


async def may_see_details(request: Request, state: AppState) -> bool:
    """Model ids, versions and checkpoint fingerprints: for callers with an API key, or for anyone
    when GLMV_GATEWAY_READYZ_DETAILS is set."""
    if state.settings.readyz_details:
        return True
    key = bearer_key(request.headers.get("authorization"))
    if not key:
        return False
    try:
        await check_key(state, key)
    except Exception:  # a wrong key or an unreachable Redis: the plain report
        return False
    return True


@router.get("/readyz", tags=["health"])
async def readyz(request: Request, state: AppState = Depends(app_state)) -> JSONResponse:
    started = time.perf_counter()
    ok, report = await readiness(state)
    if not await may_see_details(request, state):
        report.pop("models", None)
    report["status"] = "ready" if ok else "not ready"
    report["check_ms"] = round((time.perf_counter() - started) * 1000, 1)
    return JSONResponse(report, status_code=200 if ok else 503)


@router.get("/metrics", tags=["health"])
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
