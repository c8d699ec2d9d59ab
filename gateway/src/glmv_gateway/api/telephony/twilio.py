"""Twilio Media Streams (bidirectional), a codec over ``Conversation``.

``POST /v1/telephony/twilio/twiml``: the number's voice webhook; answers ``<Connect><Stream>`` TwiML
pointing at the stream endpoint, with ``<Parameter>``s (the caller's number, and ``settings``,
``greeting``, ``session_id`` taken from the webhook URL's query).

``WS /v1/telephony/twilio``: Twilio sends ``connected``, ``start`` (a call starts: its session is
made from the call profile and the ``settings`` custom parameter, or ``session_id`` resumes one),
``media`` (8 kHz µ-law), ``dtmf``, ``mark`` (echo of ours) and ``stop``. We send the reply as
``media`` messages of 20 ms µ-law, a ``mark`` after each reply chunk (named ``<turn id>:<ms of the
reply sent so far>``), and ``clear`` on barge-in. Twilio echoes a mark when the audio before it has
played, so the echoed marks are the playback clock (``played``): an interrupted reply is stored as
far as the caller heard it.

Both endpoints check ``X-Twilio-Signature`` (HMAC-SHA1 of the URL and the sorted form parameters,
keyed by the account's auth token) when ``TWILIO_AUTH_TOKEN`` is set.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import json
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit
from xml.sax.saxutils import quoteattr

from fastapi import APIRouter, Request, WebSocket
from fastapi.responses import Response
from starlette.datastructures import Headers

from glmv_common import audio as audio_io
from glmv_common.logs import get_logger, kv, log_context
from glmv_gateway import metrics
from glmv_gateway.api.auth import check_key
from glmv_gateway.api.errors import ApiError
from glmv_gateway.api.state import app_state, ws_state
from glmv_gateway.api.telephony.calls import DTMF_DIGITS, Call, CallRefused
from glmv_gateway.api.websocket_io import deny, serve
from glmv_gateway.conversation.conversation import AudioFormat
from glmv_gateway.conversation.events import (
    AudioDelta,
    ErrorEvent,
    Event,
    SpeechStarted,
    TurnCancelled,
    TurnStarted,
    TurnTruncated,
)
from glmv_gateway.settings import GatewaySettings

router = APIRouter(tags=["telephony"])
log = get_logger("glmv.gateway.twilio")

STREAM_PATH = "/v1/telephony/twilio"
MULAW_8K = AudioFormat(audio_io.Encoding.MULAW, 8000, 1)
OUTPUT = {"sample_rate": 8000, "encoding": "mulaw"}
FRAME_BYTES = 160  # 20 ms of 8 kHz µ-law
START_TIMEOUT_S = 10.0
PASSED_PARAMETERS = ("settings", "greeting", "session_id")


# --- signatures -----------------------------------------------------------------------------------


def signature(auth_token: str, url: str, params: Iterable[tuple[str, str]] = ()) -> str:
    """Twilio's request signature: base64 HMAC-SHA1 over the full URL followed by every POST
    parameter's name and value, sorted by name (then value)."""
    data = url + "".join(name + value for name, value in sorted(params))
    digest = hmac.new(auth_token.encode(), data.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def _url_variants(url: str) -> set[str]:
    """The URL with and without its scheme's default port (Twilio may sign either form)."""
    parts = urlsplit(url)
    default = {"https": 443, "wss": 443, "http": 80, "ws": 80}.get(parts.scheme)
    variants = {url}
    host = parts.hostname or ""
    if parts.port is None and default:
        variants.add(urlunsplit(parts._replace(netloc=f"{host}:{default}")))
    elif parts.port == default:
        variants.add(urlunsplit(parts._replace(netloc=host)))
    return variants


def public_url(config: GatewaySettings, headers: Headers, scheme: str, path: str, query: str) -> str:
    """The URL Twilio requested: from ``TWILIO_PUBLIC_URL`` if set, else from the proxy headers."""
    websocket = scheme in ("ws", "wss")
    if config.twilio_public_url:
        base = urlsplit(config.twilio_public_url)
        secure = base.scheme in ("https", "wss")
        netloc = base.netloc
    else:
        proto = headers.get("x-forwarded-proto", "").split(",")[0].strip() or scheme
        secure = proto in ("https", "wss")
        netloc = headers.get("x-forwarded-host", "").split(",")[0].strip() or headers.get("host", "")
    scheme = ("wss" if secure else "ws") if websocket else ("https" if secure else "http")
    return urlunsplit((scheme, netloc, path, query, ""))


def signature_ok(
    config: GatewaySettings, given: str | None, url: str, params: Iterable[tuple[str, str]] = ()
) -> bool:
    if not given:
        return False
    pairs = list(params)
    return any(
        hmac.compare_digest(signature(config.twilio_auth_token, candidate, pairs), given)
        for candidate in _url_variants(url)
    )


# --- TwiML ------------------------------------------------------------------------------------------


def twiml(stream_url: str, parameters: Mapping[str, str]) -> str:
    params = "".join(
        f"<Parameter name={quoteattr(name)} value={quoteattr(value)}/>" for name, value in parameters.items()
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f"<Response><Connect><Stream url={quoteattr(stream_url)}>{params}</Stream></Connect></Response>"
    )


@router.post("/v1/telephony/twilio/twiml")
async def twilio_twiml(request: Request) -> Response:
    state = app_state(request)
    config = state.settings
    form = await request.form()
    fields = [(k, v) for k, v in form.multi_items() if isinstance(v, str)]
    if config.twilio_signature_required():
        url = public_url(config, request.headers, request.url.scheme, request.url.path, request.url.query)
        if not signature_ok(config, request.headers.get("x-twilio-signature"), url, fields):
            raise ApiError(403, "X-Twilio-Signature does not match this request")
    parameters: dict[str, str] = {}
    values = dict(fields)
    for name in ("From", "To", "CallSid"):
        if values.get(name):
            parameters[name.lower() if name != "CallSid" else "call_sid"] = values[name]
    for name in PASSED_PARAMETERS:
        if request.query_params.get(name):
            parameters[name] = request.query_params[name]
    stream = public_url(config, request.headers, "ws", STREAM_PATH, "")
    return Response(twiml(stream, parameters), media_type="application/xml")


# --- the media stream -----------------------------------------------------------------------------


class TwilioCodec:
    """Translates one call's conversation events to Twilio messages and Twilio's messages to calls."""

    def __init__(self, websocket: WebSocket, call: Call, stream_sid: str) -> None:
        self.ws, self.call, self.stream_sid = websocket, call, stream_sid
        self.conversation = call.conversation
        self.turn_id: str | None = None  # the reply whose audio is being sent
        self.pending: list[str] = []  # marks sent, not echoed yet
        self.cleared: set[str] = set()  # marks Twilio will echo because we cleared its buffer

    async def _send(self, message: dict[str, Any]) -> None:
        await self.ws.send_text(json.dumps(message))

    # outbound

    async def send_event(self, event: Event) -> None:
        self.call.on_event(event)
        if isinstance(event, AudioDelta):
            await self._send_audio(event)
        elif isinstance(event, TurnStarted):
            self.turn_id = event.turn_id
        elif isinstance(event, SpeechStarted):
            if self.conversation.settings.turn_detection.interrupt_response:
                await self.clear()
        elif isinstance(event, TurnCancelled | TurnTruncated):
            await self.clear()
        elif isinstance(event, ErrorEvent):
            log.warning(
                "conversation error",
                extra=kv(call_id=self.call.call_id, kind=event.kind, message=event.message),
            )

    async def _send_audio(self, event: AudioDelta) -> None:
        if self.turn_id is None or not event.data:
            return
        data = event.data
        for i in range(0, len(data), FRAME_BYTES):
            payload = base64.b64encode(data[i : i + FRAME_BYTES]).decode()
            await self._send({"event": "media", "streamSid": self.stream_sid, "media": {"payload": payload}})
            self.call.audio_sent(self.turn_id)
        end_ms = 1000 * (event.sample_offset + len(data)) / event.sample_rate
        name = f"{self.turn_id}:{end_ms:.3f}"  # exact at 8 kHz: a whole reply echoed is a whole reply heard
        self.pending.append(name)
        await self._send({"event": "mark", "streamSid": self.stream_sid, "mark": {"name": name}})

    async def clear(self) -> None:
        """Barge-in: Twilio drops the audio it has buffered (and echoes the pending marks)."""
        if not self.pending:
            return
        self.cleared.update(self.pending)
        self.pending.clear()
        self.call.barge_in()
        await self._send({"event": "clear", "streamSid": self.stream_sid})

    # inbound

    async def on_bytes(self, data: bytes) -> None:
        log.warning("binary frame ignored (Twilio sends JSON text)", extra=kv(call_id=self.call.call_id))

    async def on_text(self, text: str) -> None:
        try:
            message = json.loads(text)
        except json.JSONDecodeError:
            log.warning("non-JSON message ignored", extra=kv(call_id=self.call.call_id))
            return
        if not isinstance(message, dict):
            return
        kind = message.get("event")
        if kind == "media":
            await self._on_media(message.get("media") or {})
        elif kind == "mark":
            self._on_mark(str((message.get("mark") or {}).get("name", "")))
        elif kind == "dtmf":
            digit = str((message.get("dtmf") or {}).get("digit", ""))
            if len(digit) == 1 and digit in DTMF_DIGITS:
                self.call.dtmf(digit)
        elif kind == "stop":
            self.call.end_reason = self.call.end_reason or "stop"
            await self.conversation.close()

    async def _on_media(self, media: dict[str, Any]) -> None:
        if media.get("track", "inbound") not in ("inbound", "inbound_track"):
            return
        try:
            data = base64.b64decode(str(media.get("payload", "")), validate=True)
        except (binascii.Error, ValueError):
            log.warning("media payload is not base64; ignored", extra=kv(call_id=self.call.call_id))
            return
        await self.conversation.push_audio(data, MULAW_8K)

    def _on_mark(self, name: str) -> None:
        if name in self.cleared:
            self.cleared.discard(name)  # echoed because of a clear: not played
            return
        if name not in self.pending:
            return
        del self.pending[: self.pending.index(name) + 1]  # marks come back in order
        turn_id, _, ms = name.rpartition(":")
        run = self.conversation.current_turn
        if run is not None and run.turn_id == turn_id:
            with contextlib.suppress(ValueError):
                self.conversation.played(float(ms))


async def _read_start(websocket: WebSocket) -> dict[str, Any] | None:
    """The ``start`` message (after ``connected``); None if the socket closes or it never comes."""

    async def read() -> dict[str, Any] | None:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return None
            text = message.get("text")
            if text is None:
                continue
            with contextlib.suppress(json.JSONDecodeError):
                parsed = json.loads(text)
                if isinstance(parsed, dict) and parsed.get("event") == "start":
                    return parsed
                if isinstance(parsed, dict) and parsed.get("event") == "stop":
                    return None

    try:
        return await asyncio.wait_for(read(), START_TIMEOUT_S)
    except TimeoutError:
        return None


@router.websocket(STREAM_PATH)
async def twilio_stream(websocket: WebSocket) -> None:
    state = ws_state(websocket)
    config = state.settings
    if config.twilio_signature_required():
        url = public_url(
            config, websocket.headers, websocket.url.scheme, websocket.url.path, websocket.url.query
        )
        if not signature_ok(config, websocket.headers.get("x-twilio-signature"), url):
            metrics.CALL_REFUSED.labels(transport="twilio", reason="signature").inc()
            await deny(websocket, 403, "X-Twilio-Signature does not match this request")
            return
    await websocket.accept()
    start = await _read_start(websocket)
    if start is None:
        with contextlib.suppress(RuntimeError):
            await websocket.close(code=1008, reason="no start message")
        return
    call = await _start_call(websocket, start)
    if call is None:
        return
    body = start.get("start") or {}
    codec = TwilioCodec(websocket, call, str(start.get("streamSid") or body.get("streamSid", "")))

    async def hang_up() -> None:
        await call.conversation.close()

    try:
        max_s: float | None = float((body.get("customParameters") or {}).get("max_call_s", ""))
    except ValueError:
        max_s = None
    call.start_timer(hang_up, max_s)
    with log_context(session_id=call.session_id):
        try:
            await call.greet((body.get("customParameters") or {}).get("greeting"))
            await serve(
                websocket,
                call.conversation,
                on_text=codec.on_text,
                on_bytes=codec.on_bytes,
                send_event=codec.send_event,
            )
        finally:
            await call.end("hangup")
            with contextlib.suppress(RuntimeError, Exception):
                await websocket.close()


async def _start_call(websocket: WebSocket, start: dict[str, Any]) -> Call | None:
    state = ws_state(websocket)
    body = start.get("start") or {}
    params = body.get("customParameters") or {}
    fmt = body.get("mediaFormat") or {}
    try:
        if fmt and (fmt.get("encoding"), int(fmt.get("sampleRate", 0)), int(fmt.get("channels", 1))) != (
            "audio/x-mulaw",
            8000,
            1,
        ):
            raise CallRefused("bad_format", f"unsupported media format {fmt}")
        custom: dict[str, Any] | None = None
        if params.get("settings"):
            try:
                custom = json.loads(params["settings"])
            except json.JSONDecodeError:
                raise CallRefused("bad_settings", "the 'settings' parameter is not JSON") from None
            if not isinstance(custom, dict):
                raise CallRefused("bad_settings", "the 'settings' parameter must be a JSON object")
        api_key = None
        if params.get("api_key"):
            try:
                api_key = await check_key(state, params["api_key"])
            except ApiError as exc:
                raise CallRefused("api_key", exc.message) from None
        call_sid = str(body.get("callSid", ""))
        meta = {
            "call_sid": call_sid,
            "stream_sid": str(start.get("streamSid") or body.get("streamSid", "")),
            "account_sid": str(body.get("accountSid", "")),
            "parameters": {k: v for k, v in params.items() if k not in ("api_key", "settings")},
        }
        return await state.calls.start(
            "twilio",
            call_sid or meta["stream_sid"],
            input_format=MULAW_8K,
            output=OUTPUT,
            api_key=api_key,
            session_id=params.get("session_id") or None,
            custom_settings=custom,
            meta=meta,
        )
    except (CallRefused, ValueError, TypeError) as exc:
        reason = exc.reason if isinstance(exc, CallRefused) else "bad_format"
        metrics.CALL_REFUSED.labels(transport="twilio", reason=reason).inc()
        log.warning("call refused", extra=kv(reason=reason, message=str(exc)))
        with contextlib.suppress(RuntimeError, Exception):
            await websocket.close(code=1008, reason=str(exc)[:120])
        return None
