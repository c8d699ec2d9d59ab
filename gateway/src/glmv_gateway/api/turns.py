"""POST /v1/sessions/{id}/turns: audio (raw body or multipart) or JSON text in; NDJSON events out."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.types import Receive, Scope, Send

from glmv_gateway.api.audio_input import check_declared_length, decode_body, parse_content_type, read_upload
from glmv_gateway.api.auth import require_api_key
from glmv_gateway.api.errors import ApiError, rejected
from glmv_gateway.api.state import AppState, app_state
from glmv_gateway.conversation import TurnRejected, UserInput, prepare_turn
from glmv_gateway.conversation.audio_out import ReplyAudio
from glmv_gateway.conversation.events import AudioDelta, ErrorEvent, TurnDone
from glmv_gateway.schemas import TextTurn

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


class TurnResponse(StreamingResponse):
    """The NDJSON stream of one turn. However the response ends (finished, the client gone, the
    server stopping) the turn's event stream is closed here, so its streams are cancelled, the
    partial turn stored and the session lock and key slot released at once."""

    def __init__(self, events: AsyncIterator[Any], **kwargs: Any) -> None:
        super().__init__(self._lines(events), **kwargs)
        self._events = events

    @staticmethod
    async def _lines(events: AsyncIterator[Any]) -> AsyncIterator[bytes]:
        async for event in events:
            yield (json.dumps(event.to_wire(), ensure_ascii=False) + "\n").encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._events.aclose()


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
        raise rejected(exc) from None
    if stream:
        return TurnResponse(
            run.events(),
            media_type="application/x-ndjson",
            headers={"X-Session-Id": session_id, "X-Turn-Id": run.turn_id, "Cache-Control": "no-store"},
        )
    audio = ReplyAudio()
    done: TurnDone | None = None
    errors: list[ErrorEvent] = []
    events = run.events()
    try:
        async for event in events:
            if isinstance(event, AudioDelta):
                audio.add(event)
            elif isinstance(event, ErrorEvent):
                errors.append(event)
            elif isinstance(event, TurnDone):
                done = event
    finally:
        await events.aclose()
    assert done is not None
    wav = audio.wav()
    body: dict[str, Any] = {
        **{k: v for k, v in done.to_wire().items() if k != "type"},
        "audio_wav_base64": base64.b64encode(wav).decode(),
        "audio_samples": int(audio.pcm().size),
        "sample_rate": audio.sample_rate,
    }
    if errors:
        body["error"] = errors[0].to_wire()
    return JSONResponse(body, status_code=502 if errors else 200)
