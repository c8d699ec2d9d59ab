"""WS /v1/sessions/{id}/ws: streamed user audio in, the same events out, audio as binary frames.

Client → server:
* binary frames: user audio in the declared format (query ``encoding``, ``sample_rate``, ``channels``,
  default pcm16 / 16000 / 1; or a ``{"type": "input_audio.format", ...}`` message). Frames are
  forwarded at once to the tokenizer's streaming call, so the speech is tokenized while the user
  talks and a ``commit`` only waits for the last encoder block;
* ``{"type": "commit"}`` ends the user turn and starts the reply;
* ``{"type": "cancel"}`` stops the reply; ``{"type": "text", "text": "..."}`` runs a text turn.
A ``commit`` or ``cancel`` while the assistant is replying barges in: the running LM and decoder
streams are cancelled at once and history keeps what was generated so far, marked partial.

Server → client: the NDJSON events as JSON text frames; each ``audio.delta`` frame (without the
samples) is followed by one binary frame with the samples; ``turn.cancelled`` after a barge-in;
``error`` for a bad frame or a failed turn (the connection stays open).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from redis.exceptions import RedisError
from starlette.responses import JSONResponse

from glmv_common import audio as audio_io
from glmv_common.errors import AudioError
from glmv_gateway.api.auth import websocket_api_key
from glmv_gateway.api.errors import ApiError, error_body, redis_unavailable
from glmv_gateway.api.state import ws_state
from glmv_gateway.clients import ComponentError, TokenizerStream
from glmv_gateway.sessions import SessionNotFound
from glmv_gateway.turn import TurnRejected, UserInput, http_status, prepare_turn
from glmvoice.v1 import common_pb2

router = APIRouter()


class _Connection:
    def __init__(self, websocket: WebSocket, session_id: str, api_key: str) -> None:
        self.ws = websocket
        self.state = ws_state(websocket)
        self.session_id = session_id
        self.api_key = api_key
        self.encoding = audio_io.Encoding.PCM16
        self.sample_rate = 16000
        self.channels = 1
        self.audio_bytes = 0
        self.tokens: TokenizerStream | None = None
        self.turn: asyncio.Task[None] | None = None
        self.send_lock = asyncio.Lock()

    async def send_json(self, event: dict[str, Any]) -> None:
        async with self.send_lock:
            await self.ws.send_text(json.dumps(event, ensure_ascii=False))

    async def send_audio(self, event: dict[str, Any]) -> None:
        data = event.pop("data")
        async with self.send_lock:
            await self.ws.send_text(json.dumps({**event, "bytes": len(data)}))
            await self.ws.send_bytes(data)

    async def error(self, code: int, message: str, component: str | None = None) -> None:
        await self.send_json({"type": "error", **error_body(code, message, component)["error"]})

    def set_format(self, encoding: str | int, sample_rate: str | int, channels: str | int) -> None:
        try:
            self.encoding = audio_io.Encoding.parse(encoding)
            self.sample_rate = audio_io.check_sample_rate(int(sample_rate))
            self.channels = audio_io.check_channels(int(channels))
        except (ValueError, TypeError) as exc:
            raise AudioError(f"bad audio format: {exc}") from None

    async def barge_in(self) -> bool:
        """Cancel a running reply; returns whether one was running."""
        task, self.turn = self.turn, None
        if task is None or task.done():
            return False
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return True

    async def run_turn(self, user_input: UserInput) -> None:
        try:
            run = await prepare_turn(
                self.state.store,
                self.state.clients,
                self.state.settings,
                session_id=self.session_id,
                api_key=self.api_key,
                user_input=user_input,
            )
        except TurnRejected as exc:
            await self.error(exc.status, exc.message, exc.component)
            return
        except RedisError as exc:
            await self.error(503, redis_unavailable(exc), "redis")
            return
        turn_id = run.turn_id
        try:
            async for event in run.events():
                if event["type"] == "audio.delta":
                    await self.send_audio(event)
                else:
                    await self.send_json(event)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await self.send_json({"type": "turn.cancelled", "turn_id": turn_id})
            raise

    def start_turn(self, user_input: UserInput) -> None:
        self.turn = asyncio.create_task(self.run_turn(user_input))

    def drop_audio(self) -> None:
        """Forget the user audio received so far (and its tokenizer stream)."""
        if self.tokens is not None:
            self.tokens.cancel()
        self.tokens, self.audio_bytes = None, 0

    async def take_tokens(self) -> UserInput | None:
        """End of the user's speech: the tokens of everything streamed since the last commit."""
        stream, self.tokens, self.audio_bytes = self.tokens, None, 0
        if stream is None:
            return None
        started = time.perf_counter()
        try:
            tokens = await stream.finish()
        except ComponentError as exc:
            await self.error(http_status(exc), f"tokenizer: {exc.message}", "tokenizer")
            return None
        return UserInput(tokens=tokens, tokenize_ms=round((time.perf_counter() - started) * 1000, 1))

    async def handle_control(self, text: str) -> None:
        try:
            message = json.loads(text)
        except json.JSONDecodeError:
            await self.error(400, "control frames must be JSON objects")
            return
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            await self.error(400, "control frames need a string 'type'")
            return
        kind = message["type"]
        if kind == "input_audio.format":
            try:
                self.set_format(
                    message.get("encoding", "pcm16"),
                    message.get("sample_rate", 16000),
                    message.get("channels", 1),
                )
            except AudioError as exc:
                await self.error(400, str(exc))
        elif kind == "commit":
            await self.barge_in()
            user_input = await self.take_tokens()
            if user_input is not None:
                self.start_turn(user_input)
        elif kind == "cancel":
            self.drop_audio()
            await self.barge_in()
        elif kind == "text":
            text_value = message.get("text")
            if not isinstance(text_value, str) or not text_value.strip():
                await self.error(400, "a text message needs a non-empty 'text'")
                return
            await self.barge_in()
            self.start_turn(UserInput(text=text_value))
        else:
            await self.error(400, f"unknown control type {kind!r}")

    async def handle_audio(self, data: bytes) -> None:
        settings = self.state.settings
        self.audio_bytes += len(data)
        seconds = self.audio_bytes / (self.encoding.bytes_per_sample * self.channels * self.sample_rate)
        if self.audio_bytes > settings.max_upload_bytes or seconds > settings.max_audio_seconds:
            self.drop_audio()
            await self.error(
                413,
                f"user audio exceeds the limit ({settings.max_upload_bytes} bytes, "
                f"{settings.max_audio_seconds:.0f} s); it was discarded",
            )
            return
        if self.tokens is None:
            self.tokens = self.state.clients.stream_tokenize(
                request_id=uuid.uuid4().hex, session_id=self.session_id, timeout=settings.turn_timeout_s
            )
        chunk = common_pb2.AudioChunk(
            data=data, encoding=int(self.encoding), sample_rate=self.sample_rate, channels=self.channels
        )
        await self.tokens.send(chunk)


async def _deny(websocket: WebSocket, status: int, message: str) -> None:
    try:
        await websocket.send_denial_response(JSONResponse(error_body(status, message), status_code=status))
    except RuntimeError:  # server without the denial-response extension
        await websocket.close(code=1008, reason=message[:120])


@router.websocket("/v1/sessions/{session_id}/ws")
async def session_socket(websocket: WebSocket, session_id: str) -> None:
    state = ws_state(websocket)
    try:
        api_key = await websocket_api_key(websocket, state)
        await state.store.get(session_id, owner=api_key)
    except ApiError as exc:
        await _deny(websocket, exc.status, exc.message)
        return
    except SessionNotFound:
        await _deny(websocket, 404, f"session {session_id} not found (expired or deleted)")
        return
    except RedisError as exc:
        await _deny(websocket, 503, redis_unavailable(exc))
        return
    conn = _Connection(websocket, session_id, api_key)
    params = websocket.query_params
    try:
        conn.set_format(
            params.get("encoding", "pcm16"), params.get("sample_rate", "16000"), params.get("channels", "1")
        )
    except AudioError as exc:
        await _deny(websocket, 400, str(exc))
        return
    await websocket.accept()
    await conn.send_json({"type": "session.ready", "session_id": session_id})
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                break
            if message.get("bytes") is not None:
                await conn.handle_audio(message["bytes"])
            elif message.get("text") is not None:
                await conn.handle_control(message["text"])
    except WebSocketDisconnect:
        pass
    finally:
        conn.drop_audio()
        await conn.barge_in()
