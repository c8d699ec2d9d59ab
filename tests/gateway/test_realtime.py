"""OpenAI Realtime compatibility, driven by the official ``openai`` SDK against the real stack."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import soxr
from openai import AsyncOpenAI

from glmv_gateway.client import GatewayClient

from .test_turns import mel_frames

MODEL = "glm-4-voice"
# Short seeded replies (as the other gateway tests use).
GLMV = {"seed": 1234, "temperature": 0.8, "top_p": 1.0}
MANUAL = {
    "type": "realtime",
    "max_output_tokens": 48,
    "audio": {"input": {"turn_detection": None}},
    "glmv": GLMV,
}


def sdk(stack) -> AsyncOpenAI:
    return AsyncOpenAI(
        api_key=stack.api_key,
        base_url=f"{stack.gateway_url}/v1",
        websocket_base_url=f"{stack.gateway_url.replace('http', 'ws')}/v1",
    )


async def until(conn, kind: str, timeout: float = 120) -> list[Any]:
    """Every event up to and including the first of ``kind``."""
    events: list[Any] = []
    async with asyncio.timeout(timeout):
        async for event in conn:
            events.append(event)
            if event.type == kind:
                return events
    raise AssertionError(f"the connection closed before {kind}; got {[e.type for e in events]}")


def first(events: list[Any], kind: str) -> Any:
    return next(e for e in events if e.type == kind)


def expected_samples(audio_tokens: int, rate: int) -> int:
    """Reply samples at ``rate``: the decoder's native length, resampled as one stream."""
    native = 256 * mel_frames(audio_tokens)
    return native if rate == 22050 else len(soxr.resample(np.zeros(native, np.float32), 22050, rate))


def assert_finished(response: Any, cap: int) -> None:
    """A reply that ran to its end: completed, or incomplete because it reached the token cap (the
    dev model's replies are random and often long)."""
    if response.usage.output_tokens >= cap:
        assert response.status == "incomplete" and response.status_details.reason == "max_output_tokens"
    else:
        assert response.status == "completed" and response.status_details is None


def speech_24k(sample_wav: bytes) -> bytes:
    samples, rate = sf.read(io.BytesIO(sample_wav), dtype="float32")
    out = soxr.resample(samples, rate, 24000)
    return (np.clip(out, -1, 1) * 32767).astype("<i2").tobytes()


def audio_of(events: list[Any]) -> bytes:
    return b"".join(base64.b64decode(e.delta) for e in events if e.type == "response.output_audio.delta")


async def test_text_item_gets_an_audio_reply_with_ordered_events(stack, client: GatewayClient) -> None:
    async with sdk(stack).realtime.connect(model=MODEL) as conn:
        created = await until(conn, "session.created", 10)
        session = created[0].session
        assert session.model == MODEL and session.audio.output.format.rate == 24000
        await conn.session.update(session=MANUAL)
        updated = (await until(conn, "session.updated"))[-1].session
        assert updated.audio.input.turn_detection is None and updated.max_output_tokens == 48
        await conn.conversation.item.create(
            item={
                "id": "my-item",
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "Tell me a story."}],
            }
        )
        added = await until(conn, "conversation.item.done")
        assert added[0].type == "conversation.item.added" and added[0].item.id == "my-item"
        await conn.response.create(response={"metadata": {"client_event_id": "abc"}})
        events = await until(conn, "response.done")
    kinds = [e.type for e in events]
    assert kinds[:6] == [
        "response.created",
        "rate_limits.updated",
        "response.output_item.added",
        "conversation.item.added",
        "response.content_part.added",
        *kinds[5:6],
    ]
    assert events[0].response.metadata == {"client_event_id": "abc"}
    assert kinds[-6:] == [
        "response.output_audio.done",
        "response.output_audio_transcript.done",
        "response.content_part.done",
        "response.output_item.done",
        "conversation.item.done",
        "response.done",
    ]
    response_id, item_id = events[0].response.id, events[2].item.id
    deltas = [e for e in events if e.type.endswith(".delta")]
    assert deltas and all(e.response_id == response_id and e.item_id == item_id for e in deltas)
    done = events[-1].response
    usage = done.usage
    assert_finished(done, 48)
    assert usage.output_token_details.audio_tokens > 0
    assert (
        usage.output_tokens
        == usage.output_token_details.audio_tokens + usage.output_token_details.text_tokens
    )
    assert usage.input_tokens > 0 and usage.input_token_details.audio_tokens == 0  # a text prompt
    transcript = "".join(e.delta for e in events if e.type == "response.output_audio_transcript.delta")
    assert events[-5].transcript == transcript == done.output[0].content[0].transcript
    # exactly the decoder's samples, as 24 kHz PCM16
    pcm = audio_of(events)
    assert len(pcm) // 2 == expected_samples(usage.output_token_details.audio_tokens, 24000)
    # the conversation is a gateway session: its history is readable over HTTP
    turns = client.history(session.id)["turns"]
    assert [t["user"].get("text") for t in turns] == ["Tell me a story."]
    assert turns[0]["assistant"]["text"] == transcript


async def test_mulaw_output_text_only_and_out_of_band(stack, client: GatewayClient) -> None:
    async with sdk(stack).realtime.connect(model=MODEL) as conn:
        await until(conn, "session.created", 10)
        await conn.session.update(
            session={
                **MANUAL,
                "audio": {"input": {"turn_detection": None}, "output": {"format": {"type": "audio/pcmu"}}},
            }
        )
        updated = (await until(conn, "session.updated"))[-1].session
        assert updated.audio.output.format.type == "audio/pcmu"
        say = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello there."}]}
        await conn.conversation.item.create(item=say)
        await conn.response.create()
        events = await until(conn, "response.done")
        done = events[-1].response
        ulaw = audio_of(events)  # one byte per 8 kHz sample
        assert len(ulaw) == expected_samples(done.usage.output_token_details.audio_tokens, 8000)
        # text only: no audio at all, text events instead of transcript events
        await conn.conversation.item.create(item=say)
        await conn.response.create(response={"output_modalities": ["text"]})
        text_events = await until(conn, "response.done")
        kinds = {e.type for e in text_events}
        assert "response.output_audio.delta" not in kinds and "response.output_text.delta" in kinds
        assert text_events[-1].response.output[0].content[0].type == "output_text"
        # out of band: a reply to its own input, not added to the conversation
        await conn.response.create(response={"conversation": "none", "input": [say]})
        oob = await until(conn, "response.done")
        assert "conversation.item.added" not in {e.type for e in oob}
        session_id = await conn_session_id(conn)
    assert len(client.history(session_id)["turns"]) == 2


async def conn_session_id(conn) -> str:
    await conn.send({"type": "session.update", "session": {}})
    return (await until(conn, "session.updated"))[-1].session.id


async def test_bad_events_each_get_an_error_and_the_session_goes_on(stack) -> None:
    async with sdk(stack).realtime.connect(model=MODEL) as conn:
        await until(conn, "session.created", 10)
        await conn.session.update(session=MANUAL)
        await until(conn, "session.updated")
        say = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi."}]}
        await conn.conversation.item.create(item={**say, "id": "u1"})
        await until(conn, "conversation.item.done")
        await conn.response.create()
        reply = await until(conn, "response.done")
        assistant = first(reply, "response.output_item.added").item.id
        bad: list[tuple[Any, str | None]] = [
            ({"type": "no.such.event"}, "invalid_event_type"),
            ({"event_id": "x"}, "missing_required_parameter"),
            ("this is not json", "invalid_json"),
            ([1, 2, 3], "invalid_json"),
            ({"type": "input_audio_buffer.append", "audio": "@@not base64@@"}, "invalid_value"),
            ({"type": "input_audio_buffer.append", "audio": 12}, "invalid_value"),
            ({"type": "input_audio_buffer.commit"}, "input_audio_buffer_commit_empty"),
            (
                {
                    "type": "session.update",
                    "session": {"audio": {"input": {"format": {"type": "audio/opus"}}}},
                },
                "invalid_value",
            ),
            (
                {
                    "type": "session.update",
                    "session": {"audio": {"input": {"format": {"type": "audio/pcm", "rate": 44100}}}},
                },
                "invalid_value",
            ),
            ({"type": "session.update", "session": {"type": "transcription"}}, "invalid_value"),
            ({"type": "session.update", "session": {"glmv": {"temperature": 5}}}, "invalid_value"),
            ({"type": "session.update", "session": {"glmv": {"colour": "blue"}}}, "invalid_value"),
            (
                {"type": "conversation.item.create", "item": {"type": "message", "content": []}},
                "missing_required_parameter",
            ),
            ({"type": "conversation.item.create", "item": {**say, "id": "u1"}}, "duplicate_item_id"),
            ({"type": "conversation.item.create", "item": say, "previous_item_id": "nope"}, "item_not_found"),
            (
                {
                    "type": "conversation.item.create",
                    "item": {
                        "type": "message",
                        "role": "user",
                        "content": [{"type": "input_text", "text": "x" * 20_001}],
                    },
                },
                "invalid_value",
            ),
            ({"type": "conversation.item.retrieve", "item_id": "nope"}, "item_retrieve_invalid_item_id"),
            ({"type": "conversation.item.delete", "item_id": "nope"}, "item_delete_invalid_item_id"),
            (
                {
                    "type": "conversation.item.truncate",
                    "item_id": assistant,
                    "content_index": 0,
                    "audio_end_ms": 10_000_000,
                },
                "invalid_value",
            ),
            (
                {
                    "type": "conversation.item.truncate",
                    "item_id": "u1",
                    "content_index": 0,
                    "audio_end_ms": 0,
                },
                "invalid_value",
            ),
            ({"type": "response.cancel"}, "response_cancel_not_active"),
            ({"type": "response.create"}, "no_input"),
            ({"type": "response.create", "response": {"output_modalities": ["video"]}}, "invalid_value"),
            ({"type": "response.create", "response": {"max_output_tokens": 0}}, "invalid_value"),
        ]
        for index, (event, code) in enumerate(bad):
            event_id = f"bad-{index}"
            if isinstance(event, dict) and "event_id" not in event:
                event = {**event, "event_id": event_id}
            elif isinstance(event, dict):
                event_id = event["event_id"]
            raw = event if isinstance(event, str) else json.dumps(event)
            await conn._connection.send(raw)
            error = (await until(conn, "error", 30))[-1].error
            assert error.code == code, (index, error)
            if isinstance(event, dict):
                assert error.event_id == event_id, (index, error)
        # still serving
        await conn.conversation.item.create(item=say)
        await conn.response.create()
        again = await until(conn, "response.done")
        assert_finished(again[-1].response, 48)
        # a truncate within the audio is served, and the stored turn is cut
        await conn.send(
            {
                "type": "conversation.item.truncate",
                "item_id": first(again, "response.output_item.added").item.id,
                "content_index": 0,
                "audio_end_ms": 0,
            }
        )
        truncated = (await until(conn, "conversation.item.truncated"))[-1]
        assert truncated.item_id == first(again, "response.output_item.added").item.id
    assert len(bad) >= 20


async def test_beta_dialect_through_the_beta_client(stack, client: GatewayClient) -> None:
    beta = sdk(stack).beta.realtime
    async with beta.connect(model=MODEL) as conn:
        created = await until(conn, "session.created", 10)
        assert created[0].session.input_audio_format == "pcm16"
        await conn.session.update(
            session={
                "modalities": ["text", "audio"],
                "turn_detection": None,
                "output_audio_format": "g711_alaw",
                "max_response_output_tokens": 48,
                "temperature": 0.8,
            }
        )
        updated = (await until(conn, "session.updated"))[-1].session
        assert updated.output_audio_format == "g711_alaw" and updated.turn_detection is None
        await conn.conversation.item.create(
            item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello."}]}
        )
        await until(conn, "conversation.item.created")
        await conn.response.create()
        events = await until(conn, "response.done")
    kinds = [e.type for e in events]
    assert "response.audio.delta" in kinds and "response.audio_transcript.delta" in kinds
    ga_only = {
        "response.output_audio.delta",
        "response.output_audio_transcript.delta",
        "conversation.item.added",
        "conversation.item.done",
    }
    assert not ga_only & set(kinds)
    alaw = b"".join(base64.b64decode(e.delta) for e in events if e.type == "response.audio.delta")
    done = events[-1].response
    assert_finished(done, 48)
    assert len(alaw) == expected_samples(done.usage.output_token_details.audio_tokens, 8000)


async def test_client_secret_and_subprotocol_auth(stack) -> None:
    secret = await sdk(stack).realtime.client_secrets.create(
        expires_after={"anchor": "created_at", "seconds": 60},
        session={
            "type": "realtime",
            "instructions": "Be brief.",
            "audio": {"input": {"turn_detection": None}},
        },
    )
    assert secret.value.startswith("ek_")
    from websockets.asyncio.client import connect

    url = f"{stack.gateway_url.replace('http', 'ws')}/v1/realtime?model={MODEL}"
    async with connect(url, subprotocols=["realtime", f"openai-insecure-api-key.{secret.value}"]) as ws:
        assert ws.subprotocol == "realtime"
        created = json.loads(await ws.recv())
        assert created["type"] == "session.created"
        assert created["session"]["instructions"] == "Be brief."
        assert created["session"]["audio"]["input"]["turn_detection"] is None
    # a client secret is for realtime only, and a wrong key is refused at the handshake
    with pytest.raises(Exception, match="401"):
        GatewayClient(stack.gateway_url, secret.value).create_session()
    with pytest.raises(Exception, match="401"):
        async with connect(url, additional_headers={"Authorization": "Bearer wrong"}):
            pass
