"""One Realtime connection: client events → ``Conversation`` calls; conversation events → Realtime
server events, in the documented order, with item, response and content ids.

A reply is one response with one assistant message item and one content part (``output_audio``
with its transcript — the LM's interleaved text is the transcript of its speech — or
``output_text`` for text-only replies):
``response.created`` → ``rate_limits.updated`` → ``response.output_item.added`` →
``conversation.item.added`` → ``response.content_part.added`` → deltas →
``response.output_audio.done`` → ``response.output_audio_transcript.done`` →
``response.content_part.done`` → ``response.output_item.done`` → ``conversation.item.done`` →
``response.done``. Out-of-band replies (``conversation: "none"``) skip the conversation events.

Conversation items: user text and user audio items wait in ``pending_inputs`` until
``response.create`` (or a detected end of speech) answers them; a system message sets the style
instruction; assistant messages and function-call items are accepted and listed but do not reach
the model (its history holds only what it generated). GLM-4-Voice stores a user turn and its reply
together, so deleting an answered item removes that exchange from the stored history.
"""

from __future__ import annotations

import base64
import binascii
import contextvars
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import WebSocket
from pydantic import ValidationError

from glmv_gateway.api.realtime import protocol as p
from glmv_gateway.api.realtime.session import (
    SessionView,
    max_tokens,
    output_settings,
    parse_format,
    split_glmv,
)
from glmv_gateway.conversation.admission import UserInput, check_text
from glmv_gateway.conversation.conversation import Conversation
from glmv_gateway.conversation.errors import TurnRejected
from glmv_gateway.conversation.events import (
    AudioDelta,
    ErrorEvent,
    Event,
    InputCleared,
    InputCommitted,
    SessionUpdated,
    SpeechStarted,
    SpeechStopped,
    TextDelta,
    TurnCancelled,
    TurnDone,
    TurnStarted,
    TurnTruncated,
)
from glmv_gateway.conversation.record import truncate_stored
from glmv_gateway.conversation.turn import TurnRun
from glmv_gateway.schemas import apply_patch

# The client event being handled: errors raised while handling it echo its event_id.
CURRENT_EVENT: contextvars.ContextVar[str | None] = contextvars.ContextVar("realtime_event", default=None)

# Core error kinds → (Realtime error type, code).
ERROR_CODES = {
    "invalid_request": ("invalid_request_error", "invalid_value"),
    "not_found": ("invalid_request_error", "session_not_found"),
    "busy": ("invalid_request_error", "conversation_already_has_active_response"),
    "too_large": ("invalid_request_error", "audio_too_large"),
    "no_speech": ("invalid_request_error", "no_speech"),
    "rate_limited": ("invalid_request_error", "rate_limit_exceeded"),
}


class ClientError(ErrorEvent):
    """A core error event stamped with the client event that caused it."""

    client_event_id: str | None = None


class Wire(Event):
    """A Realtime server event the codec itself emits, queued with the conversation's events so
    the order on the wire is the order of emission."""

    type: str = "realtime.wire"
    payload: dict[str, Any]


class RealtimeConversation(Conversation):
    """A ``Conversation`` that remembers its runs (cancelled replies are reported after a newer
    one may have started) and stamps error events with the client event being handled."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.runs: dict[str, TurnRun] = {}

    async def start_turn(self, user_input: UserInput, **kwargs: Any) -> TurnRun | None:
        run = await super().start_turn(user_input, **kwargs)
        if run is not None:
            self.runs[run.turn_id] = run
        return run

    def emit(self, event: Event) -> None:
        if type(event) is ErrorEvent and event.turn_id is None:
            event = ClientError(**event.model_dump(), client_event_id=CURRENT_EVENT.get())
        super().emit(event)


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


@dataclass
class ResponseSpec:
    """What ``response.create`` asked for (a detected end of speech uses the session's)."""

    text_only: bool
    metadata: dict[str, str] | None = None
    stored: bool = True
    event_id: str | None = None


@dataclass
class Response:
    id: str
    item_id: str
    turn_id: str
    spec: ResponseSpec
    transcript: list[str] = field(default_factory=list)
    samples: int = 0
    sample_rate: int = 24000
    error: ErrorEvent | None = None
    cancel_reason: str | None = None


class RealtimeConnection:
    def __init__(
        self, websocket: WebSocket, conversation: RealtimeConversation, view: SessionView, *, beta: bool
    ) -> None:
        self.ws, self.conv, self.view, self.beta = websocket, conversation, view, beta
        self.items: dict[str, dict[str, Any]] = {}
        self.order: list[str] = []
        self.item_turn: dict[str, str] = {}  # answered user items and assistant items → turn id
        self.pending: dict[str, UserInput] = {}  # user items not yet answered
        self.specs: dict[str, ResponseSpec] = {}  # turn id → what response.create asked for
        self.responses: dict[str, Response] = {}  # turn id → the response being streamed
        self.speech_item: str | None = None  # the user item the current speech will become
        self.appended = 0  # bytes appended since the last commit / clear / detected utterance
        self.cancel_reason = "turn_detected"
        self.streaming: Response | None = None

    # --- out ----------------------------------------------------------------------------------------

    def send(self, payload: dict[str, Any]) -> None:
        self.conv.emit(Wire(payload=payload))

    async def write(self, payload: dict[str, Any]) -> None:
        payload = {"type": payload.pop("type"), "event_id": new_id("event"), **payload}
        if self.beta:
            converted = p.to_beta(payload)
            if converted is None:
                return
            payload = converted
        await self.ws.send_text(json.dumps(payload, ensure_ascii=False))

    def error(self, exc: p.ProtocolError, event_id: str | None) -> None:
        self.send(
            {
                "type": "error",
                "error": {
                    "type": exc.type,
                    "code": exc.code,
                    "message": exc.message,
                    "param": exc.param,
                    "event_id": event_id,
                },
            }
        )

    async def send_event(self, event: Event) -> None:
        for payload in self.translate(event):
            await self.write(payload)

    def translate(self, event: Event) -> list[dict[str, Any]]:
        if isinstance(event, Wire):
            return [event.payload]
        if isinstance(event, SessionUpdated):
            return [{"type": "session.updated", "session": self.view.view}]
        if isinstance(event, SpeechStarted):
            self.speech_item = self.speech_item or new_id("item")
            return [
                {
                    "type": "input_audio_buffer.speech_started",
                    "audio_start_ms": event.audio_start_ms,
                    "item_id": self.speech_item,
                }
            ]
        if isinstance(event, SpeechStopped):
            self.speech_item = self.speech_item or new_id("item")
            return [
                {
                    "type": "input_audio_buffer.speech_stopped",
                    "audio_end_ms": event.audio_end_ms,
                    "item_id": self.speech_item,
                }
            ]
        if isinstance(event, InputCommitted):
            return self.on_committed(event)
        if isinstance(event, InputCleared):
            return [{"type": "input_audio_buffer.cleared"}]
        if isinstance(event, TurnStarted):
            return self.on_started(event)
        response = self.responses.get(getattr(event, "turn_id", None) or "")
        if isinstance(event, TextDelta | AudioDelta):
            return self.on_delta(self.streaming, event) if self.streaming else []
        if isinstance(event, TurnDone):
            return self.finish(response, event.model_dump()) if response else []
        if isinstance(event, TurnCancelled):
            if response is None:
                return []
            run = self.conv.runs.get(event.turn_id)
            summary = ((run.record or {}).get("summary") if run else None) or {}
            return self.finish(response, summary, cancelled=True)
        if isinstance(event, TurnTruncated):
            item_id = next(
                (
                    i
                    for i, t in self.item_turn.items()
                    if t == event.turn_id and self.items.get(i, {}).get("role") == "assistant"
                ),
                None,
            )
            if item_id is None:
                return []
            self.set_transcript(item_id, event.text)
            return [
                {
                    "type": "conversation.item.truncated",
                    "item_id": item_id,
                    "content_index": 0,
                    "audio_end_ms": round(event.heard_ms),
                }
            ]
        if isinstance(event, ErrorEvent):
            if event.turn_id and event.turn_id in self.responses:
                self.responses[event.turn_id].error = event
                return []
            kind, code = ERROR_CODES.get(event.kind, ("server_error", event.kind))
            return [
                {
                    "type": "error",
                    "error": {
                        "type": kind,
                        "code": code,
                        "message": event.message,
                        "param": None,
                        "event_id": event.client_event_id if isinstance(event, ClientError) else None,
                    },
                }
            ]
        return []

    def add_item(self, item: dict[str, Any], previous: str | None = None) -> str | None:
        """Insert an item (after ``previous``; "root" = first; default last). Returns the id it follows."""
        if previous == "root":
            self.order.insert(0, item["id"])
        elif previous is not None and previous in self.order:
            self.order.insert(self.order.index(previous) + 1, item["id"])
        else:
            self.order.append(item["id"])
        self.items[item["id"]] = item
        index = self.order.index(item["id"])
        return self.order[index - 1] if index else None

    def item_events(self, item: dict[str, Any], previous: str | None) -> list[dict[str, Any]]:
        return [
            {"type": "conversation.item.added", "previous_item_id": previous, "item": public(item)},
            {"type": "conversation.item.done", "previous_item_id": previous, "item": public(item)},
        ]

    def on_committed(self, event: InputCommitted) -> list[dict[str, Any]]:
        item_id, self.speech_item, self.appended = self.speech_item or new_id("item"), None, 0
        item = {
            "id": item_id,
            "object": "realtime.item",
            "type": "message",
            "status": "completed",
            "role": "user",
            "content": [{"type": "input_audio", "transcript": None}],
        }
        previous = self.add_item(item)
        td = self.conv.settings.turn_detection
        answered_later = event.by == "client" or not td.create_response
        known = {id(u) for u in self.pending.values()}
        if answered_later and self.conv.pending_inputs and id(self.conv.pending_inputs[-1]) not in known:
            self.pending[item_id] = self.conv.pending_inputs[-1]
        elif not answered_later:
            self.item_turn[item_id] = ""  # answered by the reply that starts now
        return [
            {"type": "input_audio_buffer.committed", "item_id": item_id, "previous_item_id": previous},
            *self.item_events(item, previous),
        ]

    def on_started(self, event: TurnStarted) -> list[dict[str, Any]]:
        spec = self.specs.pop(event.turn_id, None) or ResponseSpec(text_only=self.view.text_only)
        run = self.conv.runs.get(event.turn_id)
        response = Response(
            new_id("resp"),
            new_id("item"),
            event.turn_id,
            spec,
            sample_rate=run.state.sample_rate if run else 24000,
        )
        self.responses[event.turn_id] = response
        self.streaming = response  # deltas carry no turn id: they belong to the last started reply
        for item_id, turn in self.item_turn.items():
            if turn == "":
                self.item_turn[item_id] = event.turn_id
        item = {
            "id": response.item_id,
            "object": "realtime.item",
            "type": "message",
            "status": "in_progress",
            "role": "assistant",
            "content": [],
        }
        limit = self.conv.config.max_turns_per_key
        out = [
            {"type": "response.created", "response": self.response_object(response, "in_progress", [])},
            {
                "type": "rate_limits.updated",
                "rate_limits": [
                    {"name": "requests", "limit": limit, "remaining": limit - 1, "reset_seconds": 0.0}
                ],
            },
            {
                "type": "response.output_item.added",
                "response_id": response.id,
                "output_index": 0,
                "item": item,
            },
        ]
        if spec.stored:
            previous = self.add_item(dict(item))
            self.item_turn[response.item_id] = event.turn_id
            out.append({"type": "conversation.item.added", "previous_item_id": previous, "item": item})
        part = {"type": "text", "text": ""} if spec.text_only else {"type": "audio", "transcript": ""}
        out.append({"type": "response.content_part.added", **self.ids(response), "part": part})
        return out

    @staticmethod
    def ids(response: Response) -> dict[str, Any]:
        return {
            "response_id": response.id,
            "item_id": response.item_id,
            "output_index": 0,
            "content_index": 0,
        }

    def on_delta(self, response: Response, event: TextDelta | AudioDelta) -> list[dict[str, Any]]:
        if isinstance(event, TextDelta):
            response.transcript.append(event.text)
            kind = (
                "response.output_text.delta"
                if response.spec.text_only
                else "response.output_audio_transcript.delta"
            )
            return [{"type": kind, **self.ids(response), "delta": event.text}]
        frame = 1 if event.encoding in ("mulaw", "alaw") else 4 if event.encoding == "float32" else 2
        response.samples += len(event.data) // frame
        response.sample_rate = event.sample_rate
        return [
            {
                "type": "response.output_audio.delta",
                **self.ids(response),
                "delta": base64.b64encode(event.data).decode(),
            }
        ]

    def finish(
        self, response: Response, summary: dict[str, Any], *, cancelled: bool = False
    ) -> list[dict[str, Any]]:
        self.responses.pop(response.turn_id, None)
        if self.streaming is response:
            self.streaming = None
        text = "".join(response.transcript)
        end = summary.get("end_reason")
        details: dict[str, Any] | None = None
        if response.error is not None:
            status = "failed"
            kind, code = ERROR_CODES.get(response.error.kind, ("server_error", response.error.kind))
            details = {
                "type": "failed",
                "error": {"type": kind, "code": code, "message": response.error.message},
            }
        elif cancelled:
            status = "cancelled"
            details = {"type": "cancelled", "reason": self.cancel_reason}
            self.cancel_reason = "turn_detected"
        elif end in ("max_tokens", "audio_cap"):
            status, details = "incomplete", {"type": "incomplete", "reason": "max_output_tokens"}
        else:
            status = "completed"
        content = (
            {"type": "output_text", "text": text}
            if response.spec.text_only
            else {"type": "output_audio", "transcript": text}
        )
        item = {
            "id": response.item_id,
            "object": "realtime.item",
            "type": "message",
            "status": "completed" if status == "completed" else "incomplete",
            "role": "assistant",
            "content": [content],
        }
        ids = self.ids(response)
        if response.spec.text_only:
            out = [{"type": "response.output_text.done", **ids, "text": text}]
            part = {"type": "text", "text": text}
        else:
            out = [
                {"type": "response.output_audio.done", **ids},
                {"type": "response.output_audio_transcript.done", **ids, "transcript": text},
            ]
            part = {"type": "audio", "transcript": text}
        out += [
            {"type": "response.content_part.done", **ids, "part": part},
            {
                "type": "response.output_item.done",
                "response_id": response.id,
                "output_index": 0,
                "item": item,
            },
        ]
        if response.spec.stored and response.item_id in self.items:
            self.items[response.item_id] = {
                **item,
                "audio_ms": 1000.0 * response.samples / response.sample_rate,
            }
            index = self.order.index(response.item_id)
            previous = self.order[index - 1] if index else None
            out.append({"type": "conversation.item.done", "previous_item_id": previous, "item": item})
        run = self.conv.runs.get(response.turn_id)
        body = self.response_object(response, status, [item], details)
        body["usage"] = usage(run, summary.get("usage") or {})
        out.append({"type": "response.done", "response": body})
        return out

    def response_object(
        self,
        response: Response,
        status: str,
        output: list[dict[str, Any]],
        details: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        return {
            "id": response.id,
            "object": "realtime.response",
            "status": status,
            "status_details": details,
            "output": output,
            "conversation_id": self.conv.session_id if response.spec.stored else None,
            "output_modalities": ["text"] if response.spec.text_only else ["audio"],
            "metadata": response.spec.metadata,
            "audio": {"output": self.view.view["audio"]["output"]},
            "usage": None,
        }

    def set_transcript(self, item_id: str, text: str) -> None:
        item = self.items.get(item_id)
        if item and item.get("content"):
            part = item["content"][0]
            part["transcript" if part["type"] == "output_audio" else "text"] = text

    # --- in -----------------------------------------------------------------------------------------

    async def on_bytes(self, data: bytes) -> None:
        self.error(
            p.ProtocolError(
                "send events as JSON text frames (audio goes base64 in input_audio_buffer.append)",
                code="invalid_json",
            ),
            None,
        )

    async def on_text(self, text: str) -> None:
        try:
            message: Any = json.loads(text)
        except json.JSONDecodeError as exc:
            self.error(p.ProtocolError(f"the event is not valid JSON: {exc.msg}", code="invalid_json"), None)
            return
        event_id = message.get("event_id") if isinstance(message, dict) else None
        event_id = event_id if isinstance(event_id, str) else None
        token = CURRENT_EVENT.set(event_id)
        try:
            event = p.parse_client_event(message, self.beta)
            handler = getattr(self, "on_" + event.type.replace(".", "_"))
            await handler(event)
        except p.ProtocolError as exc:
            self.error(exc, event_id)
        finally:
            CURRENT_EVENT.reset(token)

    async def on_session_update(self, event: p.SessionUpdate) -> None:
        update = p.beta_session_to_ga(event.session) if self.beta else event.session
        view, patch, fmt = self.view.plan(update, self.conv.settings)
        check_patch(self.conv.settings.model_dump(mode="json"), patch, "session")
        if await self.conv.update(patch) is None:
            return
        self.view.view, self.view.input_format = view, fmt
        self.conv.set_input_format(fmt)

    async def on_input_audio_buffer_append(self, event: p.AudioAppend) -> None:
        if len(event.audio) > p.MAX_APPEND_BYTES * 4 // 3 + 4:
            raise p.ProtocolError(
                "one append carries at most 15 MiB of audio", code="audio_too_large", param="audio"
            )
        try:
            data = base64.b64decode(event.audio, validate=True)
        except (binascii.Error, ValueError):
            raise p.ProtocolError("audio is not valid base64", param="audio") from None
        if not data:
            return
        if not hasattr(self.conv.clients, "listen"):
            raise p.ProtocolError(
                "streamed audio input needs the tokenizer's Listen stream, which this build "
                "lacks; send audio as a conversation.item.create input_audio item",
                code="not_supported",
                param="audio",
            )
        self.appended += len(data)
        await self.conv.push_audio(data)

    async def on_input_audio_buffer_commit(self, event: p.AudioCommit) -> None:
        if self.appended == 0:
            raise p.ProtocolError(
                "the input audio buffer is empty: append audio before committing",
                code="input_audio_buffer_commit_empty",
            )
        self.appended = 0
        await self.conv.commit()

    async def on_input_audio_buffer_clear(self, event: p.AudioClear) -> None:
        self.appended, self.speech_item = 0, None
        await self.conv.clear()

    async def on_conversation_item_create(self, event: p.ItemCreate) -> None:
        item, previous = event.item, event.previous_item_id
        if item.id is not None and item.id in self.items:
            raise p.ProtocolError(
                f"an item with id {item.id!r} already exists", code="duplicate_item_id", param="item.id"
            )
        if previous not in (None, "root") and previous not in self.items:
            raise p.ProtocolError(
                f"previous_item_id {previous!r} does not exist",
                code="item_not_found",
                param="previous_item_id",
            )
        stored = {
            "id": item.id or new_id("item"),
            "object": "realtime.item",
            "type": item.type,
            "status": "completed",
            **({"role": item.role} if item.role else {}),
        }
        if item.type == "message":
            if item.role is None:
                raise p.ProtocolError(
                    "a message item needs a role", code="missing_required_parameter", param="item.role"
                )
            stored["content"] = [c.model_dump(exclude_none=True) for c in item.content]
        else:
            stored.update(
                {
                    k: v
                    for k, v in item.model_dump(include={"call_id", "name", "arguments", "output"}).items()
                    if v is not None
                }
            )
        if item.type == "message" and item.role == "user":
            self.pending[stored["id"]] = await self.user_input(item, "item")
            self.conv.pending_inputs.append(self.pending[stored["id"]])
        elif item.type == "message" and item.role == "system":
            text = "\n".join(c.text or "" for c in item.content).strip()
            await self.on_session_update(
                p.SessionUpdate(type="session.update", session={"instructions": text})
            )
        for part in stored.get("content", []):
            part.pop("audio", None)  # events carry no audio; retrieve does (kept below)
        previous_id = self.add_item(stored, previous)
        if item.type == "message" and item.role == "user":
            stored["_audio"] = [c.audio for c in item.content if c.audio]
        for payload in self.item_events(stored, previous_id):
            self.send(payload)

    async def user_input(self, item: p.Item, param: str) -> UserInput:
        texts = [c.text for c in item.content if c.type in ("input_text", "text")]
        audios = [c.audio for c in item.content if c.type == "input_audio"]
        if not texts and not audios:
            raise p.ProtocolError(
                "a user item needs input_text or input_audio content",
                code="missing_required_parameter",
                param=f"{param}.content",
            )
        if texts and audios:
            raise p.ProtocolError(
                "GLM-4-Voice answers either text or speech: one kind per item", param=f"{param}.content"
            )
        if texts:
            try:
                return UserInput(text=check_text("\n".join(t or "" for t in texts)))
            except TurnRejected as exc:
                raise p.ProtocolError(exc.message, param=f"{param}.content") from None
        data = b""
        for index, audio in enumerate(audios):
            try:
                data += base64.b64decode(audio or "", validate=True)
            except (binascii.Error, ValueError):
                raise p.ProtocolError(
                    "audio is not valid base64", param=f"{param}.content.{index}.audio"
                ) from None
        if not data:
            raise p.ProtocolError("input_audio content is empty", param=f"{param}.content")
        user = await self.conv.input_from_audio(data, self.view.input_format)
        if user is None:
            raise p.ProtocolError(
                "the audio could not be used (see the previous error)",
                code="invalid_audio",
                param=f"{param}.content",
            )
        return user

    def known_item(self, item_id: str, action: str) -> dict[str, Any]:
        item = self.items.get(item_id)
        if item is None:
            raise p.ProtocolError(
                f"item {item_id!r} does not exist", code=f"item_{action}_invalid_item_id", param="item_id"
            )
        return item

    async def on_conversation_item_retrieve(self, event: p.ItemRetrieve) -> None:
        item = self.known_item(event.item_id, "retrieve")
        full = public(item)
        audio = item.get("_audio") or []
        for part, data in zip(
            [c for c in full.get("content", []) if c["type"] == "input_audio"], audio, strict=False
        ):
            part["audio"] = data
        self.send({"type": "conversation.item.retrieved", "item": full})

    async def on_conversation_item_delete(self, event: p.ItemDelete) -> None:
        self.known_item(event.item_id, "delete")
        user = self.pending.pop(event.item_id, None)
        if user is not None:
            self.conv.pending_inputs = [u for u in self.conv.pending_inputs if u is not user]
        turn_id = self.item_turn.pop(event.item_id, None)
        if turn_id and not (
            self.conv.replying and self.conv.current_turn and self.conv.current_turn.turn_id == turn_id
        ):
            await self.conv.store.replace_turn(self.conv.session_id, turn_id, None)
        self.items.pop(event.item_id)
        self.order.remove(event.item_id)
        self.send({"type": "conversation.item.deleted", "item_id": event.item_id})

    async def on_conversation_item_truncate(self, event: p.ItemTruncate) -> None:
        item = self.known_item(event.item_id, "truncate")
        turn_id = self.item_turn.get(event.item_id)
        run = self.conv.runs.get(turn_id or "")
        if item.get("role") != "assistant" or run is None or not run.audio:
            raise p.ProtocolError("only assistant audio items can be truncated", param="item_id")
        if event.content_index != 0:
            raise p.ProtocolError(
                "an assistant item has one content part: content_index 0", param="content_index"
            )
        duration_ms = 1000.0 * run.state.audio_samples / run.state.sample_rate
        if event.audio_end_ms > duration_ms + 1:
            raise p.ProtocolError(
                f"audio_end_ms {event.audio_end_ms} is past the end of the item's audio "
                f"({duration_ms:.0f} ms)",
                param="audio_end_ms",
            )
        if self.conv.replying and self.conv.current_turn is run:
            self.conv.played(event.audio_end_ms)  # the stored turn is cut to it when the reply stops
            details = None
        elif self.conv.current_turn is run:
            details = await self.conv.truncate(run.turn_id, event.audio_end_ms)  # emits turn.truncated
        else:
            details = await truncate_stored(
                run.admitted, run.state, int(event.audio_end_ms * run.state.sample_rate / 1000)
            )
            if details:
                self.set_transcript(event.item_id, details["text"])
                details = None
        if details is None:
            self.send(
                {
                    "type": "conversation.item.truncated",
                    "item_id": event.item_id,
                    "content_index": 0,
                    "audio_end_ms": event.audio_end_ms,
                }
            )

    async def on_response_create(self, event: p.ResponseCreate) -> None:
        params = event.response or p.ResponseParams()
        if self.conv.replying:
            raise p.ProtocolError(
                "the conversation already has an active response",
                code="conversation_already_has_active_response",
            )
        overrides = self.overrides(params)
        text_only = params.output_modalities == ["text"] if params.output_modalities else self.view.text_only
        stored = params.conversation != "none"
        inputs = None
        if params.input is not None:
            inputs = [
                await self.user_input(i, f"response.input.{n}")
                for n, i in enumerate(params.input)
                if i.type == "message" and i.role == "user"
            ]
        elif not self.conv.pending_inputs:
            raise p.ProtocolError(
                "there is no user input to respond to: add a user item or commit audio first", code="no_input"
            )
        pending = dict(self.pending) if inputs is None else {}
        run = await self.conv.respond(inputs, overrides=overrides or None, audio=not text_only, store=stored)
        if run is None:
            return
        self.specs[run.turn_id] = ResponseSpec(text_only, params.metadata, stored, event.event_id)
        for item_id in pending:
            self.pending.pop(item_id, None)
            self.item_turn[item_id] = run.turn_id

    def overrides(self, params: p.ResponseParams) -> dict[str, Any]:
        settings = self.conv.settings
        patch: dict[str, Any] = {}
        style = settings.style.model_dump()
        if params.instructions is not None:
            if len(params.instructions) > 500:
                raise p.ProtocolError(
                    "instructions must be at most 500 characters", param="response.instructions"
                )
            style["free_text"] = params.instructions or None
        if params.max_output_tokens is not None:
            patch["max_new_tokens"] = max_tokens(params.max_output_tokens, "response.max_output_tokens")
        out_fmt = ((params.audio or {}).get("output") or {}).get("format")
        if out_fmt is not None:
            patch["output"] = output_settings(parse_format(out_fmt, "response.audio.output.format"))
        if params.glmv is not None:
            sampling, style_changes = split_glmv(params.glmv, "response.glmv")
            patch.update(sampling)
            style.update(style_changes)
        if style != settings.style.model_dump():
            patch["style"] = style
        check_patch(settings.model_dump(mode="json"), patch, "response")
        return patch

    async def on_response_cancel(self, event: p.ResponseCancel) -> None:
        current = self.conv.current_turn
        response = self.responses.get(current.turn_id) if current else None
        if not self.conv.replying:
            raise p.ProtocolError("there is no active response to cancel", code="response_cancel_not_active")
        if event.response_id is not None and (response is None or response.id != event.response_id):
            raise p.ProtocolError(f"response {event.response_id!r} is not active", param="response_id")
        self.cancel_reason = "client_cancelled"
        await self.conv.cancel()

    async def on_output_audio_buffer_clear(self, event: p.OutputAudioClear) -> None:
        self.cancel_reason = "client_cancelled"
        await self.conv.interrupt(by="client")


def check_patch(current: dict[str, Any], patch: dict[str, Any], where: str) -> None:
    try:
        apply_patch(current, patch)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(x) for x in first.get("loc", ()))
        raise p.ProtocolError(f"{loc}: {first.get('msg')}", param=f"{where}.{loc}") from None


def public(item: dict[str, Any]) -> dict[str, Any]:
    return json.loads(
        json.dumps({k: v for k, v in item.items() if not k.startswith("_") and k != "audio_ms"})
    )


def usage(run: TurnRun | None, used: dict[str, Any]) -> dict[str, Any]:
    """Realtime usage from the turn's: the prompt split into speech tokens (user speech and the
    assistant's kept speech in history, plus this input) and text tokens (the rest)."""
    prompt = int(used.get("prompt_tokens") or 0)
    audio_in = 0
    if run is not None:
        turns = run.admitted.history
        audio_in = sum(
            len(t["user"].get("tokens", [])) + int(t["assistant"].get("audio_tokens", 0)) for t in turns
        )
        audio_in += len(run.admitted.user.get("tokens", []))
    audio_in = min(audio_in, prompt)
    text_out, audio_out = int(used.get("text_tokens") or 0), int(used.get("audio_tokens") or 0)
    cached = int(used.get("lm_cached_prompt_tokens") or 0)
    return {
        "total_tokens": prompt + text_out + audio_out,
        "input_tokens": prompt,
        "output_tokens": text_out + audio_out,
        "input_token_details": {
            "text_tokens": prompt - audio_in,
            "audio_tokens": audio_in,
            "image_tokens": 0,
            "cached_tokens": cached,
            "cached_tokens_details": {"text_tokens": 0, "audio_tokens": 0, "image_tokens": 0},
        },
        "output_token_details": {"text_tokens": text_out, "audio_tokens": audio_out},
    }
