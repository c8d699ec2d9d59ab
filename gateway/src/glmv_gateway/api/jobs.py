"""Batch jobs: POST /v1/jobs (202 + id), GET state / audio / transcript, DELETE cancels."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse
from pydantic import ValidationError

from glmv_common import audio as audio_io
from glmv_gateway.api.audio_input import check_declared_length, parse_content_type, read_upload
from glmv_gateway.api.auth import require_api_key
from glmv_gateway.api.errors import ApiError
from glmv_gateway.api.limits import load_json
from glmv_gateway.api.state import AppState, app_state
from glmv_gateway.api.turns import read_body
from glmv_gateway.jobs.store import TERMINAL, JobStore, write_atomic
from glmv_gateway.jobs.webhook_policy import WebhookRefused
from glmv_gateway.jobs.worker import TASK_NAME
from glmv_gateway.schemas import SessionSettings
from glmv_gateway.sessions import key_digest

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


def job_store(state: AppState) -> JobStore:
    return JobStore(state.store.redis, state.settings.jobs_dir, state.settings.job_result_ttl_s)


def parse_options(raw: Any) -> dict[str, Any]:
    if raw in (None, ""):
        return SessionSettings().model_dump(mode="json")
    data = load_json(raw, "options") if isinstance(raw, str) else raw
    if not isinstance(data, dict):
        raise ApiError(400, "options must be a JSON object")
    try:
        return SessionSettings.model_validate(data).model_dump(mode="json")
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "options"
        raise ApiError(422, f"invalid options: {where}: {first.get('msg')}") from None


async def check_webhook(url: Any, state: AppState) -> str:
    if url in (None, ""):
        return ""
    if not isinstance(url, str) or len(url) > 2048:
        raise ApiError(400, "webhook_url must be an http(s) URL of at most 2048 characters")
    if not state.settings.webhook_secret:
        raise ApiError(
            400, "webhooks are disabled: the gateway has no GLMV_GATEWAY_WEBHOOK_SECRET to sign them"
        )
    try:
        await state.settings.webhook_policy().check(url)
    except WebhookRefused as exc:
        raise ApiError(400, str(exc)) from None
    return url


@router.post("", status_code=202)
async def submit_job(
    request: Request, api_key: str = Depends(require_api_key), state: AppState = Depends(app_state)
) -> JSONResponse:
    limit = state.settings.max_upload_bytes
    media, _ = parse_content_type(request.headers.get("content-type", ""))
    audio: tuple[Any, int] | None = None
    if media == "multipart/form-data":
        check_declared_length(request, limit)
        form = await request.form(max_files=1, max_fields=8, max_part_size=limit)
        unknown = set(form.keys()) - {"audio", "text", "options", "webhook_url"}
        if unknown:
            raise ApiError(400, f"unknown form fields: {sorted(unknown)}")
        upload = form.get("audio")
        text = form.get("text")
        options = parse_options(form.get("options"))
        webhook_url = await check_webhook(form.get("webhook_url"), state)
        if upload is not None and not isinstance(upload, str):
            audio = await read_upload(upload, limit)
    elif media == "application/json":
        body = load_json(await read_body(request, limit), "the JSON body")
        if not isinstance(body, dict):
            raise ApiError(400, "the JSON body must be an object")
        unknown = set(body) - {"text", "options", "webhook_url"}
        if unknown:
            raise ApiError(400, f"unknown fields: {sorted(unknown)}")
        text = body.get("text")
        options = parse_options(body.get("options"))
        webhook_url = await check_webhook(body.get("webhook_url"), state)
    else:
        raise ApiError(415, "submit a job as multipart/form-data (audio file) or application/json (text)")
    if audio is None and not (isinstance(text, str) and text.strip()):
        raise ApiError(400, "a job needs an 'audio' file or a non-empty 'text'")
    if audio is not None:
        samples, rate = audio
        seconds = len(samples) / rate
        if seconds > state.settings.max_audio_seconds:
            raise ApiError(
                413, f"audio is {seconds:.1f} s long; the limit is {state.settings.max_audio_seconds:.0f} s"
            )
    jobs = job_store(state)
    fields = {
        "owner": key_digest(api_key),
        "input": {"kind": "audio"} if audio is not None else {"kind": "text", "text": text},
        "options": options,
        "webhook_url": webhook_url,
        "webhook": "none",
    }
    job_id = await jobs.create(fields)
    if audio is not None:
        directory = jobs.job_dir(job_id)
        directory.mkdir(parents=True, exist_ok=True)
        write_atomic(directory / "input.wav", audio_io.encode_wav(audio[0], audio[1], subtype="FLOAT"))
    celery = request.app.state.celery
    result = await asyncio.to_thread(celery.send_task, TASK_NAME, args=[job_id], queue="glmv-jobs")
    await jobs.update(job_id, task_id=result.id)
    return JSONResponse(
        {"id": job_id, "state": "queued"}, status_code=202, headers={"Location": f"/v1/jobs/{job_id}"}
    )


async def owned_job(job_id: str, api_key: str, state: AppState) -> dict[str, Any]:
    job = await job_store(state).get(job_id)
    if job is None or job.get("owner") != key_digest(api_key):
        raise ApiError(404, f"job {job_id} not found (expired, or submitted with another API key)")
    return job


def public(job_id: str, job: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": job_id,
        "state": job["state"],
        "progress": int(job.get("progress", 0)),
        "error": job.get("error") or None,
        "attempts": int(job.get("attempts", 0)),
        "input": {"kind": job["input"]["kind"]},
        "webhook": job.get("webhook", "none"),
        "created_at": float(job["created_at"]),
        "started_at": float(job["started_at"]) if job.get("started_at") else None,
        "finished_at": float(job["finished_at"]) if job.get("finished_at") else None,
        "timings": (job.get("result") or {}).get("timings"),
    }


@router.get("/{job_id}")
async def get_job(job_id: str, api_key: str = Depends(require_api_key), state: AppState = Depends(app_state)):
    return public(job_id, await owned_job(job_id, api_key, state))


async def finished_file(job_id: str, name: str, api_key: str, state: AppState):
    job = await owned_job(job_id, api_key, state)
    if job["state"] != "done":
        raise ApiError(409, f"job {job_id} is {job['state']}; results exist once it is done")
    path = job_store(state).job_dir(job_id) / name
    if not path.exists():
        raise ApiError(410, f"the results of job {job_id} have expired")
    return path


@router.get("/{job_id}/audio")
async def job_audio(
    job_id: str, api_key: str = Depends(require_api_key), state: AppState = Depends(app_state)
):
    return FileResponse(await finished_file(job_id, "reply.wav", api_key, state), media_type="audio/wav")


@router.get("/{job_id}/transcript")
async def job_transcript(
    job_id: str, api_key: str = Depends(require_api_key), state: AppState = Depends(app_state)
):
    path = await finished_file(job_id, "transcript.json", api_key, state)
    return JSONResponse(json.loads(path.read_text()))


@router.delete("/{job_id}", status_code=202)
async def cancel_job(
    job_id: str,
    request: Request,
    api_key: str = Depends(require_api_key),
    state: AppState = Depends(app_state),
):
    job = await owned_job(job_id, api_key, state)
    jobs = job_store(state)
    if job["state"] in TERMINAL:
        raise ApiError(409, f"job {job_id} is already {job['state']}")
    await jobs.transition(job_id, "cancelled", error="cancelled by the client", finished_at=time.time())
    if job.get("task_id"):
        celery = request.app.state.celery
        await asyncio.to_thread(celery.control.revoke, job["task_id"])
    return public(job_id, await jobs.get(job_id) or job)
