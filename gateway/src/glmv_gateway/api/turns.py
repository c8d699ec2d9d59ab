"""POST /v1/sessions/{id}/turns: audio (raw body or multipart) or JSON text in; NDJSON events out."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from glmv_common import audio as audio_io
from glmv_gateway.api.audio_input import check_declared_length, decode_body, parse_content_type, read_upload
from glmv_gateway.api.auth import require_api_key
from glmv_gateway.api.errors import ApiError
from glmv_gateway.api.state import AppState, app_state
from glmv_gateway.schemas import TextTurn
from glmv_gateway.turn import TurnRejected, TurnRun, UserInput, prepare_turn

router = APIRouter(prefix="/v1/sessions", tags=["turns"])


async def read_body(request: Request, limit: int) -> bytes:
    check_declared_length(request, limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_text(data: bytes) -> UserInput:
    try:
        body = TextTurn.model_validate_json(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "body"
        raise ApiError(400, f"bad JSON body: {where}: {first.get('msg')}") from None
    return UserInput(text=body.text)


async def parse_turn_input(request: Request, limit: int) -> UserInput:
    media, _ = parse_content_type(request.headers.get("content-type", ""))
    if media == "multipart/form-data":
        check_declared_length(request, limit)
        form = await request.form(max_files=1, max_fields=4, max_part_size=limit)
        upload = form.get("audio")
        if upload is not None and not isinstance(upload, str):
            samples, rate = await read_upload(upload, limit)
            return UserInput(audio=samples, sample_rate=rate)
        text = form.get("text")
        if isinstance(text, str):
            return parse_text(json.dumps({"text": text}).encode())
        raise ApiError(400, "multipart body needs an 'audio' file part or a 'text' field")
    data = await read_body(request, limit)
    if media == "application/json":
        return parse_text(data)
    if not media:
        raise ApiError(415, "missing Content-Type: send audio/wav, audio/pcm;rate=..., or application/json")
    samples, rate = decode_body(data, request.headers["content-type"])
    return UserInput(audio=samples, sample_rate=rate)


def wire_event(event: dict[str, Any]) -> dict[str, Any]:
    """NDJSON form of an event: audio samples as base64."""
    if event["type"] != "audio.delta":
        return event
    wire = {k: v for k, v in event.items() if k != "data"}
    wire["audio"] = base64.b64encode(event["data"]).decode()
    return wire


async def ndjson(run: TurnRun) -> AsyncIterator[bytes]:
    async for event in run.events():
        yield (json.dumps(wire_event(event), ensure_ascii=False) + "\n").encode()


def collect_wav(chunks: list[dict[str, Any]]) -> tuple[bytes, int]:
    if not chunks:
        return b"", 0
    ordered = sorted(chunks, key=lambda c: c["seq"])
    pcm = audio_io.decode_pcm(b"".join(c["data"] for c in ordered), chunks[0]["encoding"])[:, 0]
    return audio_io.encode_wav(pcm, chunks[0]["sample_rate"]), len(pcm)


@router.post("/{session_id}/turns")
async def create_turn(
    session_id: str,
    request: Request,
    stream: bool = Query(True, description="NDJSON event stream (default) or one JSON answer"),
    api_key: str = Depends(require_api_key),
    state: AppState = Depends(app_state),
):
    user_input = await parse_turn_input(request, state.settings.max_upload_bytes)
    try:
        run = await prepare_turn(
            state.store,
            state.clients,
            state.settings,
            session_id=session_id,
            api_key=api_key,
            user_input=user_input,
        )
    except TurnRejected as exc:
        raise ApiError(exc.status, exc.message, exc.component) from None
    if stream:
        return StreamingResponse(
            ndjson(run),
            media_type="application/x-ndjson",
            headers={"X-Session-Id": session_id, "X-Turn-Id": run.turn_id, "Cache-Control": "no-store"},
        )
    audio_chunks: list[dict[str, Any]] = []
    text_parts: list[str] = []
    done: dict[str, Any] = {}
    errors: list[dict[str, Any]] = []
    async for event in run.events():
        if event["type"] == "audio.delta":
            audio_chunks.append(event)
        elif event["type"] == "text.delta":
            text_parts.append(event["text"])
        elif event["type"] == "error":
            errors.append(event)
        elif event["type"] == "turn.done":
            done = event
    wav, samples = collect_wav(audio_chunks)
    body = {
        **{k: v for k, v in done.items() if k != "type"},
        "audio_wav_base64": base64.b64encode(wav).decode(),
        "audio_samples": samples,
        "sample_rate": audio_chunks[0]["sample_rate"] if audio_chunks else None,
    }
    if errors:
        body["error"] = errors[0]
    return JSONResponse(body, status_code=502 if errors else 200)
