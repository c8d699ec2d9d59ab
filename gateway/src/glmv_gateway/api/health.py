"""/healthz (process up), /readyz (Redis + the model services SERVING and compatible), /metrics."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from glmv_gateway.api.state import AppState, app_state
from glmv_gateway.versions import VERSIONED, VersionRegistry, version_problems
from glmvoice.v1 import common_pb2

router = APIRouter()


@router.get("/healthz", tags=["health"])
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


def _summary(registry: VersionRegistry, component: str) -> str:
    """SERVING when an LM replica, or a version taking sessions, serves; else the first one's state."""
    if component == "lm":
        statuses = [e.health for e in registry.lm]
    else:
        vs = registry.versions[component]
        statuses = [v.health for v in vs if v.eligible] or [v.health for v in vs]
    return "SERVING" if "SERVING" in statuses else statuses[0]


def _model(info: common_pb2.ModelInfo) -> dict[str, object]:
    return {
        "model_id": info.model_id,
        "version": info.version,
        "model_version": info.model_version,
        "checkpoint": info.checkpoint_fingerprint[:16],
        "codebook_size": info.codebook_size or info.audio_token_count,
    }


async def readiness(state: AppState) -> tuple[bool, dict[str, object]]:
    """Ready: Redis answers, an LM replica serves, and every versioned component has a version that
    takes sessions. A version incompatible with the LM is refused (named in ``compatibility``); it
    makes the gateway unready only when no other version of its component can serve."""
    report: dict[str, object] = {}
    ok = True
    try:
        await asyncio.wait_for(state.store.ping(), 2)
        report["redis"] = "ok"
    except Exception as exc:  # any failure to reach Redis means not ready
        report["redis"] = f"unreachable: {exc}"
        ok = False
    registry = state.clients.registry
    await registry.probe()
    report["services"] = {c: _summary(registry, c) for c in ("tokenizer", "lm", "decoder")}
    report["versions"] = {c: {v.id: registry.state_of(v) for v in vs} for c, vs in registry.versions.items()}
    if any(s != "SERVING" for s in report["services"].values()):  # type: ignore[union-attr]
        return False, report
    models: dict[str, object] = {}
    lm = registry.lm_info
    if lm is not None:
        models["lm"] = _model(lm)
    for component in VERSIONED:
        vs = registry.versions[component]
        chosen = next((v for v in vs if v.eligible), None) or next((v for v in vs if v.info), None)
        if chosen is not None and chosen.info is not None:
            models[component] = _model(chosen.info)
    report["models"] = models
    problems = version_problems(registry)
    report["compatibility"] = "; ".join(problems) if problems else "ok"
    if not all(any(v.eligible for v in registry.versions[c]) for c in VERSIONED):
        ok = False
    return ok, report


@router.get("/readyz", tags=["health"])
async def readyz(state: AppState = Depends(app_state)) -> JSONResponse:
    started = time.perf_counter()
    ok, report = await readiness(state)
    report["status"] = "ready" if ok else "not ready"
    report["check_ms"] = round((time.perf_counter() - started) * 1000, 1)
    return JSONResponse(report, status_code=200 if ok else 503)


@router.get("/metrics", tags=["health"])
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
