"""Every event a client receives, as typed models defined once.

The NDJSON stream, the native WebSocket, batch jobs and the Python client all speak these; protocol
adapters (OpenAI Realtime, Twilio, AudioSocket) map them to their own wire formats. ``to_wire``
gives the JSON form (audio as base64 under ``audio``); ``parse_event`` reads it back.
"""

from __future__ import annotations

import base64
import builtins
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter


class Event(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: str

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class SessionReady(Event):
    type: Literal["session.ready"] = "session.ready"
    session_id: str


class SessionUpdated(Event):
    """The session's settings after an ``update``."""

    type: Literal["session.updated"] = "session.updated"
    session_id: str
    settings: dict[str, Any]


class VersionMoved(Event):
    """The session's pinned component version went away; it now uses another, compatible one."""

    type: Literal["session.version_moved"] = "session.version_moved"
    session_id: str
    component: str
    from_version: str
    to_version: str
    reason: str


class SpeechStarted(Event):
    """Server-side turn detection heard the user start speaking (offsets in the input audio)."""

    type: Literal["input.speech_started"] = "input.speech_started"
    utterance: int
    audio_start_ms: int


class SpeechStopped(Event):
    type: Literal["input.speech_stopped"] = "input.speech_stopped"
    utterance: int
    audio_end_ms: int


class InputCommitted(Event):
    """A user utterance is complete and tokenized (by the detector or by ``commit``)."""

    type: Literal["input.committed"] = "input.committed"
    utterance: int
    tokens: int
    audio_start_ms: int = 0
    audio_end_ms: int = 0
    by: Literal["vad", "client"] = "client"


class InputCleared(Event):
    type: Literal["input.cleared"] = "input.cleared"


class TurnInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["text", "audio"]
    tokens: int = 0


class TurnStarted(Event):
    type: Literal["turn.started"] = "turn.started"
    session_id: str
    turn_id: str
    input: TurnInput


class TextDelta(Event):
    """A piece of the reply's text; the deltas of a turn concatenate to its final text."""

    type: Literal["text.delta"] = "text.delta"
    text: str
    index: int


class AudioDelta(Event):
    """A chunk of reply audio in the session's output format (``data``: the raw samples)."""

    type: Literal["audio.delta"] = "audio.delta"
    seq: int
    sample_rate: int
    encoding: str
    sample_offset: int
    data: builtins.bytes = Field(repr=False)

    def to_wire(self) -> dict[str, Any]:
        wire = self.model_dump(exclude={"data"})
        wire["audio"] = base64.b64encode(self.data).decode()
        return wire

    def header(self) -> dict[str, Any]:
        """The event without its samples and with their size (the WebSocket sends them as a binary frame)."""
        wire = self.model_dump(exclude={"data"})
        wire["bytes"] = len(self.data)
        return wire


class TurnDone(Event):
    type: Literal["turn.done"] = "turn.done"
    session_id: str
    turn_id: str
    text: str
    end_reason: str
    partial: bool
    usage: dict[str, Any]
    timings: dict[str, Any]
    truncated: bool = False
    heard_ms: float | None = None


class TurnCancelled(Event):
    """The reply was stopped (barge-in or ``cancel``); ``heard_ms`` is what the listener heard."""

    type: Literal["turn.cancelled"] = "turn.cancelled"
    turn_id: str
    heard_ms: float | None = None


class TurnTruncated(Event):
    """The stored assistant turn was cut to what the listener heard."""

    type: Literal["turn.truncated"] = "turn.truncated"
    turn_id: str
    heard_ms: float
    audio_tokens: int
    text: str


class ErrorEvent(Event):
    """Something failed; the connection stays open. ``status`` is the HTTP status it maps to."""

    type: Literal["error"] = "error"
    status: int
    message: str
    kind: str = "invalid_request"
    component: str | None = None
    code: str | None = None
    retryable: bool = False
    turn_id: str | None = None


AnyEvent = Annotated[
    SessionReady
    | SessionUpdated
    | VersionMoved
    | SpeechStarted
    | SpeechStopped
    | InputCommitted
    | InputCleared
    | TurnStarted
    | TextDelta
    | AudioDelta
    | TurnDone
    | TurnCancelled
    | TurnTruncated
    | ErrorEvent,
    Field(discriminator="type"),
]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(AnyEvent)


def parse_event(wire: dict[str, Any], data: builtins.bytes | None = None) -> Event:
    """The inverse of ``to_wire`` (or of ``header`` plus the binary frame ``data``)."""
    fields = dict(wire)
    if fields.get("type") == "audio.delta":
        if data is None:
            data = base64.b64decode(fields.pop("audio", ""))
        fields.pop("audio", None)
        fields.pop("bytes", None)
        fields["data"] = data
    return _ADAPTER.validate_python(fields)
