"""WebSocket turns: streamed audio in, events and binary audio out, barge-in, bad frames."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
import soundfile as sf
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from glmv_gateway.client import GatewayClient
from glmv_gateway.conversation.events import parse_event

from .conftest import FAST
from .test_turns import mel_frames


def ws_url(stack, session_id: str, **params: str) -> str:
    query = "&".join(f"{k}={v}" for k, v in {"api_key": stack.api_key, **params}.items())
    return f"{stack.gateway_url.replace('http', 'ws')}/v1/sessions/{session_id}/ws?{query}"


def receive_until(ws, kinds: set[str], timeout: float = 60) -> tuple[list[dict], list[bytes]]:
    events, frames = [], []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = ws.recv(timeout=max(0.1, deadline - time.monotonic()))
        if isinstance(message, bytes):
            frames.append(message)
            continue
        event = json.loads(message)
        events.append(event)
        if event["type"] in kinds:
            return events, frames
    raise AssertionError(f"no {kinds} within {timeout} s; got {[e['type'] for e in events]}")


def pcm16(sample_wav: bytes) -> bytes:
    samples, rate = sf.read(io.BytesIO(sample_wav), dtype="int16")
    assert rate == 16000
    return samples.tobytes()


def test_streamed_audio_turn_over_websocket(stack, client: GatewayClient, sample_wav: bytes) -> None:
    session = client.create_session(**FAST)
    with connect(ws_url(stack, session["id"], encoding="pcm16", sample_rate="16000")) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "session.ready"
        data = pcm16(sample_wav)
        for i in range(0, len(data), 3200):  # 100 ms frames, as a phone would send them
            ws.send(data[i : i + 3200])
        ws.send(json.dumps({"type": "commit"}))
        events, frames = receive_until(ws, {"turn.done"})
    committed, events = events[0], events[1:]
    assert committed["type"] == "input.committed" and committed["by"] == "client"
    assert committed["tokens"] == -(-len(data) // 2 // 1280)
    kinds = [e["type"] for e in events]
    assert kinds[0] == "turn.started" and kinds[-1] == "turn.done"
    audio_headers = [e for e in events if e["type"] == "audio.delta"]
    assert len(frames) == len(audio_headers) > 0
    assert [len(f) for f in frames] == [e["bytes"] for e in audio_headers]
    # every event is a typed model: it parses back (audio headers with their binary frames)
    for header, frame in zip(audio_headers, frames, strict=True):
        assert parse_event(header, frame).header() == header
    for event in events:
        if event["type"] != "audio.delta":
            assert parse_event(event).to_wire() == event
    total = sum(len(f) for f in frames) // 2  # PCM16 at 22.05 kHz by default
    assert total == 256 * mel_frames(events[-1]["usage"]["audio_tokens"])
    history = client.history(session["id"])["turns"]
    assert len(history) == 1 and history[0]["assistant"]["partial"] is False
    # the speech was tokenized while it streamed in: every 1280 samples (80 ms) is one token
    expected = -(-len(data) // 2 // 1280)
    assert events[0]["input"] == {"kind": "audio", "tokens": expected}
    assert history[0]["user"]["audio_tokens"] == expected
    assert events[-1]["timings"]["tokenize_ms"] is not None


def test_barge_in_cancels_the_reply_and_keeps_a_partial_turn(
    stack, client: GatewayClient, sample_wav: bytes
) -> None:
    # a long reply, decoded in small chunks so audio starts early
    session = client.create_session(
        max_new_tokens=2000, seed=7, temperature=1.0, top_p=1.0, chunk_schedule=[4]
    )
    with connect(ws_url(stack, session["id"])) as ws:
        json.loads(ws.recv(timeout=10))
        ws.send(pcm16(sample_wav))
        ws.send(json.dumps({"type": "commit"}))
        _events, _frames = receive_until(ws, {"audio.delta"})
        ws.send(json.dumps({"type": "cancel"}))
        after, _late_frames = receive_until(ws, {"turn.cancelled"})
        late_audio = [e for e in after if e["type"] == "audio.delta"]
        assert len(late_audio) <= 1, "barge-in must stop the audio within one decoder chunk"
        assert not any(e["type"] == "turn.done" for e in after)
        # the connection stays usable: a text turn right after
        client.patch_session(session["id"], max_new_tokens=FAST["max_new_tokens"], chunk_schedule=[10])
        ws.send(json.dumps({"type": "text", "text": "hello again"}))
        _done, _ = receive_until(ws, {"turn.done"})
    turns = client.history(session["id"])["turns"]
    assert len(turns) == 2
    assert turns[0]["assistant"]["partial"] is True and turns[0]["assistant"]["end_reason"] == "cancelled"
    assert 0 < turns[0]["assistant"]["token_count"] < 2000
    assert turns[1]["assistant"]["partial"] is False


def test_bad_frames_get_error_events_and_the_socket_survives(
    stack, client: GatewayClient, sample_wav: bytes
) -> None:
    session = client.create_session(**FAST)
    with connect(ws_url(stack, session["id"])) as ws:
        json.loads(ws.recv(timeout=10))
        for bad, expected in [
            ("not json", "must be JSON"),
            ("[1, 2]", "string 'type'"),
            (json.dumps({"type": "dance"}), "unknown control type"),
            (json.dumps({"type": "text", "text": ""}), "non-empty"),
            (json.dumps({"type": "input_audio.format", "encoding": "opus"}), "unknown audio encoding"),
            (json.dumps({"type": "input_audio.format", "sample_rate": 1}), "out of range"),
        ]:
            ws.send(bad)
            event = json.loads(ws.recv(timeout=10))
            assert event["type"] == "error" and expected in event["message"], (bad, event)
        ws.send(b"\x01\x02\x03")  # odd byte count: not PCM16
        event = json.loads(ws.recv(timeout=10))
        assert event["type"] == "error" and event["status"] == 400 and "truncated" in event["message"]
        ws.send(json.dumps({"type": "commit"}))  # nothing to commit: an explicit error, no turn
        event = json.loads(ws.recv(timeout=10))
        assert event["type"] == "error" and "no user audio to commit" in event["message"], event
        ws.send(json.dumps({"type": "cancel"}))  # nothing to cancel: an explicit error
        event = json.loads(ws.recv(timeout=10))
        assert event["type"] == "error" and "no reply to cancel" in event["message"], event
        ws.send(json.dumps({"type": "text", "text": "x" * 20_001}))  # the HTTP text cap holds here too
        event = json.loads(ws.recv(timeout=10))
        assert event["type"] == "error" and event["status"] == 413 and "20000" in event["message"], event
        for _ in range(21):  # 21 s of audio: over the 20 s limit of the test stack
            ws.send(np.zeros(16000, np.int16).tobytes())
        event = json.loads(ws.recv(timeout=10))
        assert event["type"] == "error" and event["status"] == 413 and "discarded" in event["message"]
        ws.send(np.zeros(16000, np.int16).tobytes())  # one second of silence is fine
        ws.send(json.dumps({"type": "commit"}))
        events, _ = receive_until(ws, {"turn.done"})
    assert events[-1]["partial"] is False


def test_websocket_refuses_bad_key_and_unknown_session(stack, client: GatewayClient) -> None:
    session = client.create_session()
    with pytest.raises(InvalidStatus) as err:
        connect(ws_url(stack, session["id"], api_key="wrong"))
    assert err.value.response.status_code == 401
    with pytest.raises(InvalidStatus) as err:
        connect(ws_url(stack, "no-such-session"))
    assert err.value.response.status_code == 404
