"""WS /v1/sessions/{id}/ws: the native duplex protocol, a thin codec over ``Conversation``.

Client → server:
* binary frames: user audio in the declared format (query ``encoding``, ``sample_rate``,
  ``channels``, default pcm16 / 16000 / 1; or a ``{"type": "input_audio.format", ...}`` message),
  streamed at once to the tokenizer so the speech is tokenized while the user talks;
* ``{"type": "commit"}`` ends the user's utterance (not needed with server-side turn detection);
  ``{"type": "clear"}`` drops the audio received since the last utterance;
* ``{"type": "cancel"}`` stops the reply; ``{"type": "text", "text": "..."}`` runs a text turn;
* ``{"type": "played", "ms": 1234}``: how much of the current reply the listener has heard (so a
  barge-in keeps exactly that in history);
* ``{"type": "session.update", "settings": {...}}``: change settings (e.g. ``turn_detection``).
A ``commit``, ``text`` or ``cancel`` while the assistant is replying barges in, as does speech when
``turn_detection.type`` is ``server_vad`` and ``interrupt_response`` is on.

Server → client: the conversation's events as JSON text frames (see ``conversation.events``); each
``audio.delta`` (without its samples, with their size in ``bytes``) is followed by one binary frame
with the samples. Bad frames get an ``error`` event; the connection stays open.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, WebSocket
from redis.exceptions import RedisError

from glmv_common.errors import AudioError
from glmv_gateway.api.auth import websocket_api_key
from glmv_gateway.api.errors import ApiError, redis_unavailable
from glmv_gateway.api.state import ws_state
from glmv_gateway.api.websocket_io import deny, serve
from glmv_gateway.conversation.conversation import AudioFormat, Conversation
from glmv_gateway.conversation.events import AudioDelta, Event, SessionReady
from glmv_gateway.sessions import SessionNotFound

router = APIRouter()


class NativeCodec:
    def __init__(self, websocket: WebSocket, conversation: Conversation) -> None:
        self.ws, self.conversation = websocket, conversation

    async def send_event(self, event: Event) -> None:
        if isinstance(event, AudioDelta):
            await self.ws.send_text(json.dumps(event.header()))
            await self.ws.send_bytes(event.data)
        else:
            await self.ws.send_text(json.dumps(event.to_wire(), ensure_ascii=False))

    async def on_bytes(self, data: bytes) -> None:
        await self.conversation.push_audio(data)

    async def on_text(self, text: str) -> None:
        conv = self.conversation
        try:
            message: Any = json.loads(text)
        except json.JSONDecodeError:
            conv.error("invalid_request", "control frames must be JSON objects")
            return
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            conv.error("invalid_request", "control frames need a string 'type'")
            return
        kind = message["type"]
        if kind == "input_audio.format":
            try:
                conv.set_input_format(
                    AudioFormat.parse(
                        message.get("encoding", "pcm16"),
                        message.get("sample_rate", 16000),
                        message.get("channels", 1),
                    )
                )
            except AudioError as exc:
                conv.error("invalid_request", str(exc))
        elif kind == "commit":
            await conv.commit()
        elif kind == "clear":
            await conv.clear()
        elif kind == "cancel":
            conv.discard_input()
            await conv.cancel()
        elif kind == "text":
            text_value = message.get("text")
            if not isinstance(text_value, str) or not text_value.strip():
                conv.error("invalid_request", "a text message needs a non-empty 'text'")
                return
            await conv.say(text_value)
        elif kind == "played":
            ms = message.get("ms")
            if isinstance(ms, bool) or not isinstance(ms, int | float) or ms < 0:
                conv.error("invalid_request", "'played' needs 'ms', a number >= 0")
                return
            conv.played(float(ms))
        elif kind == "session.update":
            settings = message.get("settings")
            if not isinstance(settings, dict):
                conv.error("invalid_request", "'session.update' needs a 'settings' object")
                return
            await conv.update(settings)
        else:
            conv.error("invalid_request", f"unknown control type {kind!r}")


@router.websocket("/v1/sessions/{session_id}/ws")
async def session_socket(websocket: WebSocket, session_id: str) -> None:
    state = ws_state(websocket)
    params = websocket.query_params
    try:
        api_key = await websocket_api_key(websocket, state)
        fmt = AudioFormat.parse(
            params.get("encoding", "pcm16"), params.get("sample_rate", "16000"), params.get("channels", "1")
        )
        conversation = await Conversation.open(
            state.store, state.clients, state.settings, session_id, api_key, transport="ws", input_format=fmt
        )
    except ApiError as exc:
        await deny(websocket, exc.status, exc.message)
        return
    except AudioError as exc:
        await deny(websocket, 400, str(exc))
        return
    except SessionNotFound:
        await deny(websocket, 404, f"session {session_id} not found (expired or deleted)")
        return
    except RedisError as exc:
        await deny(websocket, 503, redis_unavailable(exc))
        return
    await websocket.accept()
    codec = NativeCodec(websocket, conversation)
    conversation.emit(SessionReady(session_id=session_id))
    await serve(
        websocket, conversation, on_text=codec.on_text, on_bytes=codec.on_bytes, send_event=codec.send_event
    )
