"""The OpenAI Realtime wire protocol: client events as typed models, server event names, and the
beta dialect's names (defined once, here).

Client events are validated on arrival; a bad one is answered with an ``error`` event naming the
field (``param``) and echoing the client's ``event_id``, and the connection stays open. Server
events are built as plain dicts by the connection and renamed for beta clients on the way out.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

# Largest base64 payload of one ``input_audio_buffer.append`` (decoded: 15 MiB).
MAX_APPEND_BYTES = 15 * 1024 * 1024


class ClientEvent(BaseModel):
    # Unknown fields are ignored, as the OpenAI service does (SDKs add new ones over time).
    model_config = ConfigDict(extra="ignore")
    type: str
    event_id: str | None = None


class SessionUpdate(ClientEvent):
    type: Literal["session.update"]
    session: dict[str, Any]


class AudioAppend(ClientEvent):
    type: Literal["input_audio_buffer.append"]
    audio: str


class AudioCommit(ClientEvent):
    type: Literal["input_audio_buffer.commit"]


class AudioClear(ClientEvent):
    type: Literal["input_audio_buffer.clear"]


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["input_text", "input_audio", "text", "audio", "output_text", "output_audio", "input_image"]
    text: str | None = None
    audio: str | None = None
    transcript: str | None = None


class Item(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str | None = Field(None, max_length=64)
    type: Literal["message", "function_call", "function_call_output"] = "message"
    object: str | None = None
    status: str | None = None
    role: Literal["user", "assistant", "system"] | None = None
    content: list[ContentPart] = Field(default_factory=list)
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | None = None


class ItemCreate(ClientEvent):
    type: Literal["conversation.item.create"]
    item: Item
    previous_item_id: str | None = None


class ItemRetrieve(ClientEvent):
    type: Literal["conversation.item.retrieve"]
    item_id: str


class ItemDelete(ClientEvent):
    type: Literal["conversation.item.delete"]
    item_id: str


class ItemTruncate(ClientEvent):
    type: Literal["conversation.item.truncate"]
    item_id: str
    content_index: int = Field(0, ge=0)
    audio_end_ms: int = Field(ge=0)


class ResponseParams(BaseModel):
    """``response.create``'s ``response`` object (GA names; beta names are mapped before)."""

    model_config = ConfigDict(extra="ignore")
    conversation: str | None = None  # "auto" (default) or "none": out of band, not stored
    input: list[Item] | None = None
    instructions: str | None = None
    metadata: dict[str, str] | None = None
    output_modalities: list[Literal["audio", "text"]] | None = None
    max_output_tokens: int | Literal["inf"] | None = None
    audio: dict[str, Any] | None = None
    glmv: dict[str, Any] | None = None


class ResponseCreate(ClientEvent):
    type: Literal["response.create"]
    response: ResponseParams | None = None


class ResponseCancel(ClientEvent):
    type: Literal["response.cancel"]
    response_id: str | None = None


class OutputAudioClear(ClientEvent):
    type: Literal["output_audio_buffer.clear"]


AnyClientEvent = Annotated[
    SessionUpdate
    | AudioAppend
    | AudioCommit
    | AudioClear
    | ItemCreate
    | ItemRetrieve
    | ItemDelete
    | ItemTruncate
    | ResponseCreate
    | ResponseCancel
    | OutputAudioClear,
    Field(discriminator="type"),
]
_CLIENT: TypeAdapter[Any] = TypeAdapter(AnyClientEvent)
CLIENT_TYPES = frozenset(
    t.model_fields["type"].annotation.__args__[0]  # type: ignore[union-attr]
    for t in (
        SessionUpdate,
        AudioAppend,
        AudioCommit,
        AudioClear,
        ItemCreate,
        ItemRetrieve,
        ItemDelete,
        ItemTruncate,
        ResponseCreate,
        ResponseCancel,
        OutputAudioClear,
    )
)


class ProtocolError(Exception):
    """A client event that cannot be served: becomes an ``error`` event, the session goes on."""

    def __init__(
        self,
        message: str,
        *,
        code: str = "invalid_value",
        param: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message, self.code, self.param, self.type = message, code, param, type


def parse_client_event(message: Any, beta: bool) -> ClientEvent:
    """Validate one client event (a decoded JSON value). Raises ProtocolError."""
    if not isinstance(message, dict):
        raise ProtocolError("an event must be a JSON object", code="invalid_json")
    kind = message.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("an event needs a string 'type'", code="missing_required_parameter", param="type")
    if kind not in CLIENT_TYPES:
        raise ProtocolError(f"unknown event type {kind!r}", code="invalid_event_type", param="type")
    if beta and kind == "response.create" and isinstance(message.get("response"), dict):
        message = {**message, "response": beta_response_params(message["response"])}
    try:
        return _CLIENT.validate_python(message)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = [str(p) for p in first.get("loc", ())][1:]  # drop the discriminator tag
        param = ".".join(loc) or None
        code = "missing_required_parameter" if first.get("type") == "missing" else "invalid_value"
        raise ProtocolError(
            f"{kind}: {param or 'event'}: {first.get('msg')}", code=code, param=param
        ) from None


# --- the beta dialect ------------------------------------------------------------------------------

# Server event names the beta clients know under another name; GA-only events are not sent to them.
BETA_EVENT_NAMES = {
    "conversation.item.added": "conversation.item.created",
    "response.output_audio.delta": "response.audio.delta",
    "response.output_audio.done": "response.audio.done",
    "response.output_audio_transcript.delta": "response.audio_transcript.delta",
    "response.output_audio_transcript.done": "response.audio_transcript.done",
    "response.output_text.delta": "response.text.delta",
    "response.output_text.done": "response.text.done",
}
GA_ONLY_EVENTS = frozenset({"conversation.item.done"})
BETA_CONTENT_TYPES = {"output_audio": "audio", "output_text": "text"}
BETA_FORMATS = {
    "pcm16": {"type": "audio/pcm", "rate": 24000},
    "g711_ulaw": {"type": "audio/pcmu"},
    "g711_alaw": {"type": "audio/pcma"},
}
GA_TO_BETA_FORMAT = {"audio/pcm": "pcm16", "audio/pcmu": "g711_ulaw", "audio/pcma": "g711_alaw"}


def beta_response_params(response: dict[str, Any]) -> dict[str, Any]:
    """A beta ``response.create.response`` in GA names."""
    out = dict(response)
    if "modalities" in out:
        out["output_modalities"] = ["text"] if out.pop("modalities") == ["text"] else ["audio"]
    if "max_response_output_tokens" in out:
        out["max_output_tokens"] = out.pop("max_response_output_tokens")
    voice = out.pop("voice", None)
    fmt = out.pop("output_audio_format", None)
    if voice is not None or fmt is not None:
        output: dict[str, Any] = {}
        if voice is not None:
            output["voice"] = voice
        if fmt is not None:
            output["format"] = BETA_FORMATS.get(fmt, {"type": fmt})
        out["audio"] = {"output": output}
    if "temperature" in out:
        out["glmv"] = {**(out.get("glmv") or {}), "temperature": out.pop("temperature")}
    return out


def beta_session_to_ga(session: dict[str, Any]) -> dict[str, Any]:
    """A flat beta session object in the GA shape (the one the connection understands)."""
    out: dict[str, Any] = {}
    for name in ("model", "instructions", "tools", "tool_choice", "tracing", "glmv"):
        if name in session:
            out[name] = session[name]
    if "modalities" in session:
        out["output_modalities"] = ["text"] if session["modalities"] == ["text"] else ["audio"]
    if "max_response_output_tokens" in session:
        out["max_output_tokens"] = session["max_response_output_tokens"]
    if "temperature" in session:
        out["glmv"] = {**(out.get("glmv") or {}), "temperature": session["temperature"]}
    audio_in: dict[str, Any] = {}
    audio_out: dict[str, Any] = {}
    if "input_audio_format" in session:
        audio_in["format"] = BETA_FORMATS.get(
            session["input_audio_format"], {"type": session["input_audio_format"]}
        )
    if "turn_detection" in session:
        audio_in["turn_detection"] = session["turn_detection"]
    if "input_audio_transcription" in session:
        audio_in["transcription"] = session["input_audio_transcription"]
    if "input_audio_noise_reduction" in session:
        audio_in["noise_reduction"] = session["input_audio_noise_reduction"]
    if "output_audio_format" in session:
        audio_out["format"] = BETA_FORMATS.get(
            session["output_audio_format"], {"type": session["output_audio_format"]}
        )
    for name in ("voice", "speed"):
        if name in session:
            audio_out[name] = session[name]
    if audio_in or audio_out:
        out["audio"] = {
            **({"input": audio_in} if audio_in else {}),
            **({"output": audio_out} if audio_out else {}),
        }
    return out


def ga_session_to_beta(session: dict[str, Any]) -> dict[str, Any]:
    audio = session.get("audio", {})
    audio_in, audio_out = audio.get("input", {}), audio.get("output", {})
    modalities = session.get("output_modalities", ["audio"])
    return {
        "id": session.get("id"),
        "object": "realtime.session",
        "model": session.get("model"),
        "modalities": ["text"] if modalities == ["text"] else ["text", "audio"],
        "instructions": session.get("instructions", ""),
        "voice": audio_out.get("voice"),
        "speed": audio_out.get("speed"),
        "input_audio_format": GA_TO_BETA_FORMAT.get(audio_in.get("format", {}).get("type", ""), "pcm16"),
        "output_audio_format": GA_TO_BETA_FORMAT.get(audio_out.get("format", {}).get("type", ""), "pcm16"),
        "input_audio_transcription": audio_in.get("transcription"),
        "input_audio_noise_reduction": audio_in.get("noise_reduction"),
        "turn_detection": audio_in.get("turn_detection"),
        "tools": session.get("tools", []),
        "tool_choice": session.get("tool_choice", "auto"),
        "temperature": session.get("glmv", {}).get("temperature"),
        "max_response_output_tokens": session.get("max_output_tokens", "inf"),
        "expires_at": session.get("expires_at"),
        "glmv": session.get("glmv"),
    }


def to_beta(event: dict[str, Any]) -> dict[str, Any] | None:
    """A GA server event in the beta dialect (None: beta clients do not get it)."""
    kind = event["type"]
    if kind in GA_ONLY_EVENTS:
        return None
    out = dict(event)
    out["type"] = BETA_EVENT_NAMES.get(kind, kind)
    if "session" in out:
        out["session"] = ga_session_to_beta(out["session"])
    if "item" in out:
        out["item"] = beta_item(out["item"])
    if "part" in out:
        part = dict(out["part"])
        part["type"] = BETA_CONTENT_TYPES.get(part["type"], part["type"])
        out["part"] = part
    if "response" in out:
        response = dict(out["response"])
        response["output"] = [beta_item(i) for i in response.get("output", [])]
        if "output_modalities" in response:
            mods = response.pop("output_modalities")
            response["modalities"] = ["text"] if mods == ["text"] else ["text", "audio"]
        out["response"] = response
    return out


def beta_item(item: dict[str, Any]) -> dict[str, Any]:
    content = [
        {**c, "type": BETA_CONTENT_TYPES.get(c.get("type", ""), c.get("type"))}
        for c in item.get("content", [])
    ]
    return {**item, "content": content}
