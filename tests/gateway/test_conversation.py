"""The duplex conversation over the native WebSocket, with server-side turn detection (Silero VAD in
the tokenizer): turns start with no commit, offsets match the speech, a voice barge-in stops the
reply at once and the stored turn is cut to what the listener heard. Real processes."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import soundfile as sf
from websockets.sync.client import connect

from glmv_common import audio as audio_io
from glmv_gateway.client import GatewayClient
from glmv_lm.template import render_prompt
from glmv_lm.text_tokenizer import GlmTextTokenizer
from glmvoice.v1 import lm_pb2

from .conftest import FAST
from .test_websocket import ws_url

VAD = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500}


def speech(sample_wav: bytes) -> np.ndarray:
    samples, rate = sf.read(io.BytesIO(sample_wav), dtype="float32")
    assert rate == 16000
    return samples


def bounds(x: np.ndarray, rate: int, offset_s: float) -> tuple[float, float]:
    """The truth: first and last sample above a small amplitude, in ms of the whole stream."""
    loud = np.flatnonzero(np.abs(x) > 0.01)
    return 1000 * (offset_s + loud[0] / rate), 1000 * (offset_s + (loud[-1] + 1) / rate)


def frames(data: bytes, frame_bytes: int) -> list[bytes]:
    return [data[i : i + frame_bytes] for i in range(0, len(data), frame_bytes)]


def recv_until(ws, kinds: set[str], timeout: float = 90) -> list[dict]:
    events = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = ws.recv(timeout=max(0.1, deadline - time.monotonic()))
        if isinstance(message, bytes):
            continue
        event = json.loads(message)
        events.append(event)
        assert event["type"] != "error", event
        if event["type"] in kinds:
            return events
    raise AssertionError(f"no {kinds} within {timeout} s; got {[e['type'] for e in events]}")


def test_server_vad_turns_start_without_commit(stack, client: GatewayClient, sample_wav: bytes) -> None:
    voice = speech(sample_wav)
    gap = np.zeros(int(1.5 * 16000), np.float32)
    stream = np.concatenate([gap[:8000], voice, gap])
    truth = bounds(voice, 16000, 0.5)
    session = client.create_session(**FAST, turn_detection=VAD)
    with connect(ws_url(stack, session["id"])) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "session.ready"
        for frame in frames(audio_io.encode_pcm(stream, "pcm16"), 640):  # 20 ms frames, no commit
            ws.send(frame)
        events = recv_until(ws, {"turn.done"})
    kinds = [e["type"] for e in events]
    assert kinds[:4] == ["input.speech_started", "input.speech_stopped", "input.committed", "turn.started"]
    started, stopped, committed = events[0], events[1], events[2]
    assert abs(started["audio_start_ms"] - (truth[0] - VAD["prefix_padding_ms"])) <= 100, (started, truth)
    assert abs(stopped["audio_end_ms"] - truth[1]) <= 100, (stopped, truth)
    assert committed["by"] == "vad" and committed["tokens"] > 0
    done = events[-1]
    assert done["partial"] is False and done["timings"]["speech_end_to_first_audio_ms"] is not None
    assert client.history(session["id"])["turns"][0]["user"]["audio_tokens"] == committed["tokens"]


def test_telephone_band_mulaw_input_is_detected(stack, client: GatewayClient, sample_wav: bytes) -> None:
    voice = audio_io.resample(speech(sample_wav), 16000, 8000)
    stream = np.concatenate([np.zeros(4000, np.float32), voice, np.zeros(12000, np.float32)])
    truth = bounds(voice, 8000, 0.5)
    session = client.create_session(**FAST, turn_detection=VAD)
    with connect(ws_url(stack, session["id"], encoding="mulaw", sample_rate="8000")) as ws:
        json.loads(ws.recv(timeout=10))
        for frame in frames(audio_io.encode_pcm(stream, "mulaw"), 160):  # Twilio-sized 20 ms frames
            ws.send(frame)
        events = recv_until(ws, {"turn.done"})
    started, stopped = events[0], events[1]
    assert started["type"] == "input.speech_started" and stopped["type"] == "input.speech_stopped"
    assert abs(started["audio_start_ms"] - (truth[0] - VAD["prefix_padding_ms"])) <= 100, (started, truth)
    assert abs(stopped["audio_end_ms"] - truth[1]) <= 100, (stopped, truth)
    assert events[-1]["type"] == "turn.done" and events[-1]["partial"] is False


def test_voice_barge_in_cuts_the_stored_turn_to_what_was_heard(
    stack, client: GatewayClient, sample_wav: bytes, dev_models
) -> None:
    voice = speech(sample_wav)
    pause = np.zeros(int(1.0 * 16000), np.float32)
    long_reply = {"max_new_tokens": 2000, "seed": 7, "temperature": 1.0, "top_p": 1.0, "chunk_schedule": [4]}
    session = client.create_session(**long_reply, turn_detection=VAD)
    heard_ms = 150.0
    with connect(ws_url(stack, session["id"])) as ws:
        json.loads(ws.recv(timeout=10))
        for frame in frames(audio_io.encode_pcm(np.concatenate([voice, pause]), "pcm16"), 640):
            ws.send(frame)
        first = recv_until(ws, {"audio.delta"})
        assert "turn.started" in [e["type"] for e in first]
        ws.send(json.dumps({"type": "played", "ms": heard_ms}))  # the listener's playback clock
        for frame in frames(audio_io.encode_pcm(voice, "pcm16"), 640):  # the user talks over the reply
            ws.send(frame)
        events = recv_until(ws, {"turn.cancelled"})
        kinds = [e["type"] for e in events]
        after = kinds[kinds.index("input.speech_started") :]
        assert after.count("audio.delta") <= 1, "barge-in must stop the audio within one decoder chunk"
        assert "turn.done" not in kinds
        cancelled = events[-1]
        assert cancelled["heard_ms"] == heard_ms
        truncated = recv_until(ws, {"turn.truncated"})[-1]
        assert truncated["heard_ms"] == heard_ms
        # the interrupting utterance is answered next; its prompt holds exactly the cut ids
        client.patch_session(session["id"], **FAST, chunk_schedule=[10])
        for frame in frames(audio_io.encode_pcm(pause, "pcm16"), 640):  # the user stops talking
            ws.send(frame)
        second = recv_until(ws, {"turn.done"})
    turns = client.history(session["id"])["turns"]
    assert len(turns) == 2
    first_turn = turns[0]["assistant"]
    assert first_turn["truncated"] is True and first_turn["heard_ms"] == heard_ms
    assert first_turn["token_count"] == len(stack_history(stack, session["id"])[0]["assistant"]["ids"])
    raw = stack_history(stack, session["id"])
    kept_ids = raw[0]["assistant"]["ids"]
    tok = GlmTextTokenizer.from_dir(dev_models["lm"])
    is_audio = lambda i: tok.audio_offset <= i < tok.audio_offset + tok.audio_count  # noqa: E731
    audio_ids = [i for i in kept_ids if is_audio(i)]
    assert len(audio_ids) == truncated["audio_tokens"]
    if kept_ids:
        assert is_audio(kept_ids[-1]), "the cut ends on the last heard audio token"
    request = lm_pb2.GenerateRequest(
        mode=lm_pb2.INPUT_MODE_AUDIO,
        turns=[
            lm_pb2.Turn(
                role=lm_pb2.Turn.ROLE_USER, audio=lm_pb2.SpeechTokens(tokens=raw[0]["user"]["tokens"])
            ),
            lm_pb2.Turn(role=lm_pb2.Turn.ROLE_ASSISTANT, generated=lm_pb2.TokenIds(ids=kept_ids)),
            lm_pb2.Turn(
                role=lm_pb2.Turn.ROLE_USER, audio=lm_pb2.SpeechTokens(tokens=raw[1]["user"]["tokens"])
            ),
        ],
    )
    done = second[-1]
    assert done["usage"]["prompt_tokens"] == render_prompt(request, tok).prompt_tokens


def stack_history(stack, session_id: str) -> list[dict]:
    """The stored turns as the gateway keeps them (ids included)."""
    import redis

    from glmv_gateway.sessions import SessionStore

    raw = redis.Redis.from_url(stack.redis_url).lrange(SessionStore._key(session_id, "turns"), 0, -1)
    return [json.loads(t) for t in raw]
