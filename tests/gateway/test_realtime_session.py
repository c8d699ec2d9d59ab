"""The Realtime session object ↔ settings mapping and the beta dialect's names (no stack needed)."""

from __future__ import annotations

import pytest

from glmv_common import audio as audio_io
from glmv_gateway.api.realtime import protocol as p
from glmv_gateway.api.realtime.session import SessionView, default_view
from glmv_gateway.conversation.conversation import AudioFormat
from glmv_gateway.schemas import SessionSettings, apply_patch


def view() -> tuple[SessionView, SessionSettings]:
    settings = SessionSettings.model_validate(
        apply_patch(SessionSettings().model_dump(mode="json"), {"output": {"sample_rate": 24000}})
    )
    return SessionView(
        default_view("s1", "glm-4-voice", settings, 60), AudioFormat(sample_rate=24000)
    ), settings


def test_semantic_vad_is_served_by_the_detector_and_echoed() -> None:
    v, settings = view()
    td = {"type": "semantic_vad", "eagerness": "high", "interrupt_response": False}
    new, patch, _ = v.plan({"audio": {"input": {"turn_detection": td}}}, settings)
    assert patch["turn_detection"] == {
        "type": "server_vad",
        "silence_duration_ms": 300,
        "interrupt_response": False,
    }
    assert new["audio"]["input"]["turn_detection"] == {
        "type": "semantic_vad",
        "eagerness": "high",
        "create_response": True,
        "interrupt_response": False,
    }


def test_formats_instructions_speed_tokens_and_the_glmv_extension() -> None:
    v, settings = view()
    update = {
        "model": "anything",
        "instructions": "Be brief.",
        "max_output_tokens": 300,
        "output_modalities": ["text"],
        "audio": {
            "input": {"format": {"type": "audio/pcmu"}, "turn_detection": None},
            "output": {"format": {"type": "audio/pcma"}, "speed": 0.7, "voice": "marin"},
        },
        "glmv": {"temperature": 0.5, "seed": 3, "emotion": "happy"},
    }
    new, patch, fmt = v.plan(update, settings)
    assert fmt == AudioFormat(audio_io.Encoding.MULAW, 8000)
    assert patch["output"] == {"sample_rate": 8000, "encoding": "alaw"}
    assert patch["turn_detection"] == {"type": "none"} and patch["max_new_tokens"] == 300
    assert patch["style"]["free_text"] == "Be brief." and patch["style"]["speed"] == "slow"
    assert patch["style"]["emotion"] == "happy" and patch["temperature"] == 0.5 and patch["seed"] == 3
    assert new["model"] == "anything" and new["output_modalities"] == ["text"]
    assert new["audio"]["output"]["voice"] == "marin" and new["audio"]["input"]["turn_detection"] is None
    SessionSettings.model_validate(apply_patch(settings.model_dump(mode="json"), patch))


@pytest.mark.parametrize(
    ("update", "param"),
    [
        ({"type": "transcription"}, "session.type"),
        (
            {"audio": {"output": {"format": {"type": "audio/pcm", "rate": 44100}}}},
            "session.audio.output.format.rate",
        ),
        (
            {"audio": {"input": {"turn_detection": {"type": "magic_vad"}}}},
            "session.audio.input.turn_detection.type",
        ),
        ({"audio": {"output": {"speed": 3}}}, "session.audio.output.speed"),
        ({"max_output_tokens": 0}, "session.max_output_tokens"),
        ({"glmv": {"colour": 1}}, "session.glmv.colour"),
        ({"instructions": "x" * 501}, "session.instructions"),
    ],
)
def test_bad_session_fields_name_their_param(update: dict, param: str) -> None:
    v, settings = view()
    with pytest.raises(p.ProtocolError) as caught:
        v.plan(update, settings)
    assert caught.value.param == param


def test_beta_names_and_flat_session() -> None:
    ga = p.beta_session_to_ga(
        {
            "modalities": ["text"],
            "input_audio_format": "g711_ulaw",
            "turn_detection": None,
            "voice": "alloy",
            "max_response_output_tokens": 100,
            "temperature": 0.6,
        }
    )
    assert ga == {
        "output_modalities": ["text"],
        "max_output_tokens": 100,
        "glmv": {"temperature": 0.6},
        "audio": {
            "input": {"format": {"type": "audio/pcmu"}, "turn_detection": None},
            "output": {"voice": "alloy"},
        },
    }
    assert p.to_beta({"type": "conversation.item.done", "item": {}}) is None
    delta = p.to_beta({"type": "response.output_audio.delta", "delta": "AA=="})
    assert delta == {"type": "response.audio.delta", "delta": "AA=="}
    added = p.to_beta({"type": "conversation.item.added", "item": {"content": [{"type": "output_audio"}]}})
    assert added == {"type": "conversation.item.created", "item": {"content": [{"type": "audio"}]}}
    event = p.parse_client_event({"type": "response.create", "response": {"modalities": ["text"]}}, beta=True)
    assert event.response.output_modalities == ["text"]
