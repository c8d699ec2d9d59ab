"""The Realtime session object ↔ the gateway's session settings.

Mapping (GLM-4-Voice has one voice and no tools; everything else maps onto ``SessionSettings``):

* ``audio.input.format``: ``audio/pcm`` (24 kHz; 16 and 8 kHz accepted as an extension),
  ``audio/pcmu`` and ``audio/pcma`` (8 kHz G.711) → the format of appended audio.
* ``audio.output.format``: the same three → ``output`` (sample rate and encoding of reply audio).
* ``audio.input.turn_detection``: ``null`` → manual commits; ``server_vad`` → the tokenizer's
  Silero detector with the given threshold, prefix padding, silence duration, create/interrupt
  flags. ``semantic_vad`` is served by the same detector; its ``eagerness`` sets the silence that
  ends a turn (low 800 ms, medium/auto 500 ms, high 300 ms). ``idle_timeout_ms`` is echoed only.
* ``instructions`` → the style instruction's free text (the model's system prompt is fixed);
  ``audio.output.speed`` below 0.9 → speed "slow", above 1.1 → "fast"; ``audio.output.voice`` is
  echoed (one voice).
* ``max_output_tokens`` → ``max_new_tokens`` (``"inf"``: the gateway default, 2000).
* ``output_modalities``: ``["text"]`` gives text only (no decoder stream).
* ``glmv`` (extension object): ``temperature``, ``top_p``, ``top_k``, ``repetition_penalty``,
  ``seed``, ``decoder_seed``, ``max_audio_tokens``, ``chunk_schedule``, ``mode`` and the style
  fields ``emotion``, ``dialect``, ``language``.
* ``tools``, ``tool_choice``, ``tracing``, ``include``, ``prompt``, ``truncation``,
  ``audio.input.transcription`` and ``noise_reduction`` are accepted and echoed, not acted on.
"""

from __future__ import annotations

import copy
import time
from typing import Any

from glmv_common import audio as audio_io
from glmv_gateway.api.realtime.protocol import ProtocolError
from glmv_gateway.conversation.conversation import AudioFormat
from glmv_gateway.schemas import SessionSettings

DEFAULT_MAX_TOKENS = 2000
PCM_RATES = (24000, 16000, 8000)
SEMANTIC_SILENCE_MS = {"low": 800, "medium": 500, "auto": 500, "high": 300}
SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "seed",
    "decoder_seed",
    "max_audio_tokens",
    "chunk_schedule",
    "mode",
)
STYLE_FIELDS = ("emotion", "dialect", "language")
ECHOED = ("tools", "tool_choice", "tracing", "include", "prompt", "truncation")


def default_view(session_id: str, model: str, settings: SessionSettings, ttl_s: int) -> dict[str, Any]:
    """The session object announced in ``session.created``, from the stored settings."""
    td = settings.turn_detection
    return {
        "type": "realtime",
        "object": "realtime.session",
        "id": session_id,
        "model": model,
        "output_modalities": ["audio"],
        "instructions": settings.style.free_text or "",
        "tools": [],
        "tool_choice": "auto",
        "max_output_tokens": settings.max_new_tokens
        if settings.max_new_tokens != DEFAULT_MAX_TOKENS
        else "inf",
        "tracing": None,
        "prompt": None,
        "include": None,
        "truncation": "auto",
        "expires_at": int(time.time()) + ttl_s,
        "audio": {
            "input": {
                "format": {"type": "audio/pcm", "rate": 24000},
                "transcription": None,
                "noise_reduction": None,
                "turn_detection": None
                if td.type == "none"
                else {
                    "type": "server_vad",
                    "threshold": td.threshold,
                    "prefix_padding_ms": td.prefix_padding_ms,
                    "silence_duration_ms": td.silence_duration_ms,
                    "idle_timeout_ms": None,
                    "create_response": td.create_response,
                    "interrupt_response": td.interrupt_response,
                },
            },
            "output": {
                "format": format_view(settings.output.encoding, settings.output.sample_rate),
                "voice": "glm-4-voice",
                "speed": 1.0,
            },
        },
        "glmv": {name: getattr(settings, name) for name in SAMPLING_FIELDS}
        | {name: getattr(settings.style, name) for name in STYLE_FIELDS},
    }


def format_view(encoding: str, rate: int) -> dict[str, Any]:
    if encoding == "mulaw":
        return {"type": "audio/pcmu"}
    if encoding == "alaw":
        return {"type": "audio/pcma"}
    return {"type": "audio/pcm", "rate": rate}


def parse_format(value: Any, param: str) -> AudioFormat:
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise ProtocolError("an audio format is an object with a 'type'", param=param)
    kind = value["type"]
    if kind == "audio/pcmu":
        return AudioFormat(audio_io.Encoding.MULAW, 8000)
    if kind == "audio/pcma":
        return AudioFormat(audio_io.Encoding.ALAW, 8000)
    if kind == "audio/pcm":
        rate = value.get("rate", 24000)
        if rate not in PCM_RATES:
            raise ProtocolError(f"audio/pcm rate must be one of {PCM_RATES}", param=f"{param}.rate")
        return AudioFormat(audio_io.Encoding.PCM16, rate)
    raise ProtocolError(
        f"unsupported audio format {kind!r}: use audio/pcm, audio/pcmu or audio/pcma", param=f"{param}.type"
    )


def output_settings(fmt: AudioFormat) -> dict[str, Any]:
    encoding = {audio_io.Encoding.MULAW: "mulaw", audio_io.Encoding.ALAW: "alaw"}.get(fmt.encoding, "pcm16")
    return {"sample_rate": fmt.sample_rate, "encoding": encoding}


def turn_detection(value: Any, param: str) -> dict[str, Any]:
    """The ``turn_detection`` settings for a Realtime turn_detection object (or null)."""
    if value is None:
        return {"type": "none"}
    if not isinstance(value, dict):
        raise ProtocolError("turn_detection is an object or null", param=param)
    kind = value.get("type", "server_vad")
    out: dict[str, Any] = {"type": "server_vad"}
    if kind == "server_vad":
        for name in ("threshold", "prefix_padding_ms", "silence_duration_ms"):
            if value.get(name) is not None:
                out[name] = value[name]
    elif kind == "semantic_vad":
        eagerness = value.get("eagerness") or "auto"
        if eagerness not in SEMANTIC_SILENCE_MS:
            raise ProtocolError("eagerness must be low, medium, high or auto", param=f"{param}.eagerness")
        out["silence_duration_ms"] = SEMANTIC_SILENCE_MS[eagerness]
    else:
        raise ProtocolError(
            f"unsupported turn_detection type {kind!r}: use server_vad, semantic_vad or null",
            param=f"{param}.type",
        )
    for name in ("create_response", "interrupt_response"):
        if value.get(name) is not None:
            if not isinstance(value[name], bool):
                raise ProtocolError(f"{name} must be a boolean", param=f"{param}.{name}")
            out[name] = value[name]
    return out


def speed_word(speed: Any, param: str) -> str | None:
    if isinstance(speed, bool) or not isinstance(speed, int | float) or not 0.25 <= speed <= 1.5:
        raise ProtocolError("speed must be a number between 0.25 and 1.5", param=param)
    return "slow" if speed < 0.9 else "fast" if speed > 1.1 else None


def max_tokens(value: Any, param: str) -> int:
    if value == "inf":
        return DEFAULT_MAX_TOKENS
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 8192:
        raise ProtocolError("max_output_tokens must be an integer from 1 to 8192 or 'inf'", param=param)
    return value


class SessionView:
    """The session object a client sees, and what it changes in the stored settings."""

    def __init__(self, view: dict[str, Any], input_format: AudioFormat) -> None:
        self.view = view
        self.input_format = input_format

    @property
    def text_only(self) -> bool:
        return self.view.get("output_modalities") == ["text"]

    def plan(
        self, update: dict[str, Any], settings: SessionSettings
    ) -> tuple[dict[str, Any], dict[str, Any], AudioFormat]:
        """(new view, settings patch, input format) for a ``session.update``; raises ProtocolError.
        Nothing changes until the caller commits the result."""
        view = copy.deepcopy(self.view)
        patch: dict[str, Any] = {}
        style = settings.style.model_dump()
        fmt = self.input_format
        if "type" in update and update["type"] != "realtime":
            raise ProtocolError("only session type 'realtime' is served here", param="session.type")
        if "model" in update:
            if not isinstance(update["model"], str):
                raise ProtocolError("model must be a string", param="session.model")
            view["model"] = update["model"]
        if "instructions" in update:
            text = update["instructions"] or ""
            if not isinstance(text, str) or len(text) > 500:
                raise ProtocolError(
                    "instructions must be a string of at most 500 characters", param="session.instructions"
                )
            view["instructions"] = text
            style["free_text"] = text or None
        if "output_modalities" in update:
            mods = update["output_modalities"]
            if not isinstance(mods, list) or not mods or not set(mods) <= {"audio", "text"}:
                raise ProtocolError(
                    "output_modalities must be ['audio'] or ['text']", param="session.output_modalities"
                )
            view["output_modalities"] = ["text"] if mods == ["text"] else ["audio"]
        if "max_output_tokens" in update:
            patch["max_new_tokens"] = max_tokens(update["max_output_tokens"], "session.max_output_tokens")
            view["max_output_tokens"] = update["max_output_tokens"]
        for name in ECHOED:
            if name in update:
                view[name] = update[name]
        audio = update.get("audio")
        if audio is not None and not isinstance(audio, dict):
            raise ProtocolError("audio must be an object", param="session.audio")
        audio_in = (audio or {}).get("input") or {}
        audio_out = (audio or {}).get("output") or {}
        if "format" in audio_in:
            fmt = parse_format(audio_in["format"], "session.audio.input.format")
            view["audio"]["input"]["format"] = format_view(output_settings(fmt)["encoding"], fmt.sample_rate)
        if "turn_detection" in audio_in:
            patch["turn_detection"] = turn_detection(
                audio_in["turn_detection"], "session.audio.input.turn_detection"
            )
            view["audio"]["input"]["turn_detection"] = echo_turn_detection(
                audio_in["turn_detection"], patch["turn_detection"]
            )
        for name in ("transcription", "noise_reduction"):
            if name in audio_in:
                view["audio"]["input"][name] = audio_in[name]
        if "format" in audio_out:
            out_fmt = parse_format(audio_out["format"], "session.audio.output.format")
            patch["output"] = output_settings(out_fmt)
            view["audio"]["output"]["format"] = format_view(patch["output"]["encoding"], out_fmt.sample_rate)
        if "voice" in audio_out:
            view["audio"]["output"]["voice"] = audio_out["voice"]
        if "speed" in audio_out:
            style["speed"] = speed_word(audio_out["speed"], "session.audio.output.speed")
            view["audio"]["output"]["speed"] = audio_out["speed"]
        glmv = update.get("glmv")
        if glmv is not None:
            sampling, style_changes = split_glmv(glmv, "session.glmv")
            patch.update(sampling)
            style.update(style_changes)
            view["glmv"] = {**view.get("glmv", {}), **glmv}
        if style != settings.style.model_dump():
            patch["style"] = style
        return view, patch, fmt


def echo_turn_detection(requested: Any, applied: dict[str, Any]) -> dict[str, Any] | None:
    """What ``session.updated`` shows: the requested type (semantic_vad stays semantic_vad) with
    every effective parameter."""
    if requested is None:
        return None
    td = SessionSettings.model_validate({"turn_detection": applied}).turn_detection
    if requested.get("type") == "semantic_vad":
        return {
            "type": "semantic_vad",
            "eagerness": requested.get("eagerness") or "auto",
            "create_response": td.create_response,
            "interrupt_response": td.interrupt_response,
        }
    return {
        "type": "server_vad",
        "threshold": td.threshold,
        "prefix_padding_ms": td.prefix_padding_ms,
        "silence_duration_ms": td.silence_duration_ms,
        "idle_timeout_ms": requested.get("idle_timeout_ms"),
        "create_response": td.create_response,
        "interrupt_response": td.interrupt_response,
    }


def split_glmv(glmv: Any, param: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``glmv`` extension object → (sampling settings, style fields)."""
    if not isinstance(glmv, dict):
        raise ProtocolError("glmv must be an object", param=param)
    unknown = set(glmv) - set(SAMPLING_FIELDS) - set(STYLE_FIELDS)
    if unknown:
        raise ProtocolError(
            f"unknown glmv field {sorted(unknown)[0]!r}", param=f"{param}.{sorted(unknown)[0]}"
        )
    sampling = {k: v for k, v in glmv.items() if k in SAMPLING_FIELDS}
    style = {k: v for k, v in glmv.items() if k in STYLE_FIELDS}
    return sampling, style
