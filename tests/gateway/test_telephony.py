"""Telephony adapters on a real stack: a Twilio Media Streams simulator and an Asterisk AudioSocket
peer, both written from the protocols (``glmv_gateway.phone_sim``)."""

from __future__ import annotations

import asyncio
import json
import re
import struct
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from websockets.exceptions import InvalidStatus

from glmv_gateway.api.telephony.audiosocket import Malformed, PeerHungUp, frame, read_frame
from glmv_gateway.api.telephony.twilio import signature
from glmv_gateway.phone_sim import AudioSocketCall, TwilioCall, silence, speech
from glmv_gateway.sessions import key_digest
from glmv_gateway.stack import LocalStack

from .conftest import SAMPLE, start_stack

TOKEN = "test-twilio-auth-token"
PROFILE = {
    "max_new_tokens": 48,
    "seed": 1234,
    "temperature": 0.8,
    "top_p": 1.0,
    # the sample's 0.4 s pause after "Hello." must not end the utterance
    "turn_detection": {"type": "server_vad", "silence_duration_ms": 800},
}
GREETING = "Greet the caller."


@pytest.fixture(scope="module")
def phone_stack(
    dev_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalStack]:
    running = start_stack(
        dev_models,
        tmp_path_factory.mktemp("phone-stack"),
        db=10,
        prefix_cache=False,  # the seeded long greeting must not depend on earlier calls
        GLMV_GATEWAY_TWILIO_AUTH_TOKEN=TOKEN,
        GLMV_GATEWAY_TELEPHONY_PROFILE=json.dumps(PROFILE),
        GLMV_GATEWAY_TELEPHONY_GREETING=GREETING,
        GLMV_GATEWAY_MAX_TURNS_PER_KEY="64",
        GLMV_GATEWAY_TELEPHONY_MAX_CALLS_PER_KEY="32",
    )
    yield running
    running.stop()


# --- helpers -------------------------------------------------------------------------------------------


def twilio_url(stack: LocalStack) -> str:
    return f"{stack.gateway_url.replace('http', 'ws')}/v1/telephony/twilio"


def signed(stack: LocalStack) -> dict[str, str]:
    return {"X-Twilio-Signature": signature(TOKEN, twilio_url(stack))}


def rdb(stack: LocalStack) -> redis.Redis:
    return redis.Redis.from_url(stack.redis_url, decode_responses=True)


def call_record(stack: LocalStack, call_id: str, timeout: float = 20) -> tuple[str, dict[str, Any]]:
    """(session id, call record) of the call ``call_id`` once it has ended."""
    db = rdb(stack)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for key in db.scan_iter("glmv:session:*"):
            if key.count(":") != 2:
                continue
            raw = db.hget(key, "call")
            if raw:
                record = json.loads(raw)
                if record.get("call_id") == call_id and record.get("end"):
                    return key.split(":")[2], record
        time.sleep(0.2)
    raise AssertionError(f"no ended call {call_id} in the session records")


def history(stack: LocalStack, session_id: str) -> list[dict[str, Any]]:
    with httpx.Client(base_url=stack.gateway_url, headers={"Authorization": f"Bearer {stack.api_key}"}) as c:
        return c.get(f"/v1/sessions/{session_id}/history").json()["turns"]


def gauge(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def assert_nothing_leaked(stack: LocalStack, timeout: float = 30) -> None:
    """After every call hung up: no call, conversation, turn, Listen/LM/decoder stream, lock or slot."""
    db = rdb(stack)
    deadline = time.monotonic() + timeout
    last: dict[str, float] = {}
    while time.monotonic() < deadline:
        text = httpx.get(stack.metrics_url("gateway")).text
        last = {
            name: gauge(text, name)
            for name in (
                "glmv_gateway_active_calls",
                "glmv_gateway_active_conversations",
                "glmv_gateway_active_turns",
            )
        }
        for component in ("tokenizer", "lm", "decoder"):
            last[component] = gauge(httpx.get(stack.metrics_url(component)).text, "glmv_grpc_active_rpcs")
        last["locks"] = len(list(db.scan_iter("glmv:session:*:lock")))
        last["call_slots"] = db.zcard(f"glmv:apikey-calls:{key_digest(stack.api_key)}")
        last["turn_slots"] = db.zcard(f"glmv:apikey-turns:{key_digest(stack.api_key)}")
        if not any(last.values()):
            return
        time.sleep(0.3)
    raise AssertionError(f"left behind after hang-up: {last}")


def run(coro: Any, timeout: float = 240) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


# --- frames (no stack) ------------------------------------------------------------------------------------


def _reader(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


def test_audiosocket_frame_reading_and_writing() -> None:
    async def body() -> None:
        call = uuid.UUID("40325ec2-5efd-4bd3-805f-53576e581d13")
        raw = bytes.fromhex("010010") + call.bytes
        assert raw == bytes.fromhex("01 00 10 40 32 5e c2 5e fd 4b d3 80 5f 53 57 6e 58 1d 13")
        assert await read_frame(_reader(raw), 8192) == (0x01, call.bytes)
        assert await read_frame(_reader(b"\x03\x00\x015"), 8192) == (0x03, b"5")
        assert await read_frame(_reader(b"\x10\x01\x40" + bytes(320)), 8192) == (0x10, bytes(320))
        with pytest.raises(PeerHungUp):
            await read_frame(_reader(b""), 8192)
        for data, why in [
            (b"\x42\x00\x00", "bad_kind"),
            (b"\x10\xff\xff", "oversized"),
            (b"\x10\x01\x40" + bytes(100), "truncated"),
            (b"\x10\x01", "truncated"),
        ]:
            with pytest.raises(Malformed) as err:
                await read_frame(_reader(data), 8192)
            assert err.value.why == why

    asyncio.run(body())
    assert frame(0x10, b"\x01\x00") == b"\x10\x00\x02\x01\x00"
    assert frame(0x00) == b"\x00\x00\x00"
    for kind in (0x01, 0x03, 0xFF, 0x02):
        with pytest.raises(ValueError):
            frame(kind, b"x")


def test_twilio_signature_matches_the_documented_example() -> None:
    # the vector of Twilio's own request-validation snippet
    params = {
        "CallSid": "CA1234567890ABCDE",
        "Caller": "+14158675310",
        "Digits": "1234",
        "From": "+14158675310",
        "To": "+18005551212",
    }
    url = "https://mycompany.com/myapp.php?foo=1&bar=2"
    assert signature("12345", url, params.items()) == "GvWf1cFY/Q7PnoempGyD5oXAezc="
    assert signature("12345", url, {**params, "Digits": "1235"}.items()) != "GvWf1cFY/Q7PnoempGyD5oXAezc="


# --- Twilio ----------------------------------------------------------------------------------------------


def test_twiml_and_forged_signatures_are_refused(phone_stack: LocalStack) -> None:
    url = f"{phone_stack.gateway_url}/v1/telephony/twilio/twiml?greeting=Hi%20there"
    form = {"CallSid": "CA" + "0" * 32, "From": "+15550001111", "To": "+15552223333"}
    good = signature(TOKEN, url, form.items())
    response = httpx.post(url, data=form, headers={"X-Twilio-Signature": good})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/xml")
    xml = response.text
    stream = re.search(r'<Connect><Stream url="([^"]+)">', xml)
    assert stream and stream.group(1) == twilio_url(phone_stack)
    assert '<Parameter name="from" value="+15550001111"/>' in xml
    assert '<Parameter name="greeting" value="Hi there"/>' in xml
    forged = signature("not-the-token", url, form.items())
    assert httpx.post(url, data=form, headers={"X-Twilio-Signature": forged}).status_code == 403
    tampered = {**form, "To": "+15559999999"}
    assert httpx.post(url, data=tampered, headers={"X-Twilio-Signature": good}).status_code == 403
    assert httpx.post(url, data=form).status_code == 403

    async def handshake(headers: dict[str, str]) -> int:
        try:
            async with TwilioCall(twilio_url(phone_stack), headers=headers, playback=False):
                return 101
        except InvalidStatus as exc:
            return exc.response.status_code

    assert run(handshake({"X-Twilio-Signature": signature("forged", twilio_url(phone_stack))})) == 403
    assert run(handshake({})) == 403


def test_twilio_greeting_marks_dtmf_and_stop(phone_stack: LocalStack) -> None:
    async def body() -> TwilioCall:
        async with TwilioCall(
            twilio_url(phone_stack), headers=signed(phone_stack), parameters={"who": "jane"}
        ) as sim:
            await wait_for(lambda: sim.marks_sent, 120, "the greeting's first mark")
            await sim.dtmf("5")
            await sim.dtmf("#")
            # every mark comes back once the audio before it has played
            await wait_for(
                lambda: sim.played_marks and sim.played_marks == sim.marks_sent and not sim.buffered_bytes,
                120,
                "the greeting to play out",
            )
            await asyncio.sleep(0.5)
            assert sim.played_marks == sim.marks_sent
            await sim.stop()
            await asyncio.wait_for(sim.closed.wait(), 20)
            return sim

    sim = run(body())
    payloads = [data for _, data in sim.received]
    assert payloads and all(len(p) <= 160 for p in payloads)
    assert sum(len(p) == 160 for p in payloads) >= len(payloads) - len(sim.marks_sent)
    assert not sim.clears
    session_id, record = call_record(phone_stack, sim.call_sid)
    assert record["stream_sid"] == sim.stream_sid and record["account_sid"] == sim.account_sid
    assert record["parameters"] == {"who": "jane"}
    assert record["dtmf"] == "5#" and record["end"] == "stop" and record["transport"] == "twilio"
    turns = history(phone_stack, session_id)
    assert len(turns) == 1 and (turns[0]["user"]["kind"], turns[0]["user"]["text"]) == ("text", GREETING)
    assert not turns[0]["assistant"].get("truncated")
    # the last mark names the reply's whole length (8 samples per ms of µ-law)
    last_ms = float(sim.marks_sent[-1].rsplit(":", 1)[1])
    assert last_ms == sum(len(p) for p in payloads) / 8
    assert_nothing_leaked(phone_stack)


def test_call_limit_refuses_a_call(phone_stack: LocalStack) -> None:
    db = rdb(phone_stack)
    key = f"glmv:apikey-calls:{key_digest(phone_stack.api_key)}"
    db.zadd(key, {f"other:{i}": time.time() for i in range(32)})
    try:

        async def body() -> tuple[TwilioCall, AudioSocketCall]:
            async with TwilioCall(
                twilio_url(phone_stack), headers=signed(phone_stack), playback=False
            ) as sim:
                await asyncio.wait_for(sim.closed.wait(), 20)
            async with AudioSocketCall("127.0.0.1", phone_stack.ports["audiosocket"]) as peer:
                await asyncio.wait_for(peer.closed.wait(), 20)
            return sim, peer

        sim, peer = run(body())
        assert sim.close_code == 1008 and not sim.received
        assert peer.hung_up.is_set() and not peer.audio_frames
    finally:
        db.delete(key)
    assert_nothing_leaked(phone_stack)


# --- AudioSocket -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad,why",
    [
        (b"\x42\x00\x00", "bad kind"),
        (struct.pack(">BH", 0x10, 9000) + bytes(9000), "oversized"),
        (struct.pack(">BH", 0x10, 320) + bytes(100), "length past the end"),
        (struct.pack(">BH", 0x01, 16) + uuid.UUID(int=7).bytes, "second UUID"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_audiosocket_malformed_frames_end_only_that_call(
    phone_stack: LocalStack, bad: bytes, why: str
) -> None:
    port = phone_stack.ports["audiosocket"]

    async def body() -> None:
        async with AudioSocketCall("127.0.0.1", port) as good, AudioSocketCall("127.0.0.1", port) as broken:
            good.dtmf("1")
            await asyncio.sleep(0.3)
            broken.send_raw(bad)
            if why == "length past the end":
                assert broken.writer is not None
                broken.writer.write_eof()  # the stream ends inside the frame
            await asyncio.wait_for(broken.closed.wait(), 20)
            assert broken.hung_up.is_set(), f"{why}: no hang-up frame"
            assert all(kind == 0x00 or kind in range(0x10, 0x19) for _, kind, _ in broken.frames)
            # the other call is still connected and usable
            assert not good.closed.is_set()
            good.dtmf("2")
            await good.hang_up()
        # and the server takes new calls
        async with AudioSocketCall("127.0.0.1", port) as again:
            again.dtmf("3")
            await asyncio.sleep(0.2)
            assert not again.closed.is_set()
            await again.hang_up()

    run(body())
    assert_nothing_leaked(phone_stack)


def test_audiosocket_first_frame_must_be_the_uuid(phone_stack: LocalStack) -> None:
    async def body() -> AudioSocketCall:
        peer = AudioSocketCall("127.0.0.1", phone_stack.ports["audiosocket"])
        await peer.connect(send_uuid=False)
        peer.send_raw(struct.pack(">BH", 0x10, 320) + bytes(320))
        await asyncio.wait_for(peer.closed.wait(), 20)
        await peer.close()
        return peer

    peer = run(body())
    assert peer.hung_up.is_set() and not peer.audio_frames
    assert_nothing_leaked(phone_stack)


# --- whole calls (speech, server-side turn detection) -----------------------------------------------------

# a greeting long enough to interrupt: with this seed the dev LM talks for about 7 s
# (decoded in 4 s chunks, so once it starts playing the adapter always has audio queued)
LONG = {"max_new_tokens": 2000, "seed": 6, "temperature": 1.0, "top_p": 1.0, "chunk_schedule": [50]}


def question(encoding: str) -> bytes:
    return speech(SAMPLE, 8000, encoding)


def test_twilio_call_with_two_spoken_turns_dtmf_and_stop(phone_stack: LocalStack) -> None:
    words = question("mulaw")

    async def body() -> TwilioCall:
        async with TwilioCall(
            twilio_url(phone_stack), headers=signed(phone_stack), parameters={"greeting": ""}
        ) as sim:
            await sim.send_audio(silence(0.3, 8000, "mulaw"))
            for turn in (1, 2):
                await sim.send_audio(words, speech=True)
                ended = sim.speech_ended_at[-1]
                assert await sim.send_silence_until(
                    lambda e=ended: sim.first_reply_after(e) is not None, 120
                ), f"no reply to turn {turn}"
                # the reply plays out: every mark comes back as played
                assert await sim.send_silence_until(
                    lambda: sim.marks_sent and sim.played_marks == sim.marks_sent and not sim.buffered_bytes,
                    120,
                )
                if turn == 1:
                    await sim.dtmf("7")
            await sim.stop()
            await asyncio.wait_for(sim.closed.wait(), 20)
            return sim

    sim = run(body())
    assert not sim.clears and not sim.cleared_marks
    session_id, record = call_record(phone_stack, sim.call_sid)
    assert record["end"] == "stop" and record["dtmf"] == "7" and record["turns"] == 2
    assert len(record["speech_end_to_first_audio_ms"]) == 2
    turns = history(phone_stack, session_id)
    assert [t["user"]["kind"] for t in turns] == ["audio", "audio"]
    assert all(not t["assistant"].get("truncated") for t in turns)
    assert_nothing_leaked(phone_stack)


def test_twilio_barge_in_clears_and_cuts_history_at_the_last_echoed_mark(phone_stack: LocalStack) -> None:
    words = question("mulaw")

    def played_ms(sim: TwilioCall) -> int:
        return float(sim.played_marks[-1].rsplit(":", 1)[1]) if sim.played_marks else 0

    async def body() -> tuple[TwilioCall, int]:
        parameters = {"settings": json.dumps(LONG), "greeting": GREETING}
        async with TwilioCall(
            twilio_url(phone_stack), headers=signed(phone_stack), parameters=parameters
        ) as sim:
            # the greeting plays for a second, then the caller talks over it
            assert await sim.send_silence_until(lambda: played_ms(sim) >= 1000, 120), "greeting too short"
            heard_before = played_ms(sim)
            await sim.send_audio(words, speech=True)
            assert await sim.send_silence_until(lambda: sim.clears, 60), "no clear after barge-in"
            await sim.stop()
            await asyncio.wait_for(sim.closed.wait(), 20)
            return sim, heard_before

    sim, heard_before = run(body())
    session_id, record = call_record(phone_stack, sim.call_sid)
    assert record["barge_ins"] >= 1 and sim.cleared_marks
    greeting = history(phone_stack, session_id)[0]
    assistant = greeting["assistant"]
    assert assistant["truncated"] is True
    echoed = {float(name.rsplit(":", 1)[1]) for name in sim.played_marks}
    # the stored reply ends exactly at a mark Twilio echoed as played, no earlier than what had
    # played when the caller started talking, and before the end of what was sent
    assert any(abs(assistant["heard_ms"] - ms) <= 0.1 for ms in echoed), (assistant["heard_ms"], echoed)
    assert heard_before <= assistant["heard_ms"] < float(sim.marks_sent[-1].rsplit(":", 1)[1])
    assert_nothing_leaked(phone_stack)


def test_twilio_hang_up_mid_reply_stores_the_partial_turn(phone_stack: LocalStack) -> None:
    async def body() -> TwilioCall:
        parameters = {"settings": json.dumps(LONG), "greeting": GREETING}
        sim = TwilioCall(twilio_url(phone_stack), headers=signed(phone_stack), parameters=parameters)
        await sim.connect()
        assert await sim.send_silence_until(lambda: sim.played_marks, 120), "no greeting"
        await sim.close()  # the caller hangs up: the socket closes without a stop message
        return sim

    sim = run(body())
    session_id, record = call_record(phone_stack, sim.call_sid)
    assert record["end"] == "hangup"
    first = history(phone_stack, session_id)[0]
    assistant = first["assistant"]
    # cut to what had played: the first chunk or so, not the seconds generated
    assert assistant["truncated"] is True
    played = max(float(name.rsplit(":", 1)[1]) for name in sim.played_marks)
    assert played - 0.1 <= assistant["heard_ms"] < first["timings"]["audio_ms"]
    assert_nothing_leaked(phone_stack)


def frames_ms(peer: AudioSocketCall) -> float:
    return sum(len(p) for _, _, p in peer.audio_frames) / 16  # 8 kHz s16le: 16 bytes per ms


def test_audiosocket_call_two_turns_pacing_and_peer_hang_up(phone_stack: LocalStack) -> None:
    words = question("pcm16")

    async def body() -> AudioSocketCall:
        async with AudioSocketCall("127.0.0.1", phone_stack.ports["audiosocket"]) as peer:
            await peer.send_audio(silence(0.3, 8000))
            # the greeting (the assistant speaks first), then two spoken turns
            assert await peer.send_silence_until(lambda: peer.audio_frames, 120), "no greeting"
            for turn in (1, 2):
                count = len(peer.audio_frames)
                await peer.send_silence_until(lambda c=count: False, 1.0)  # let the greeting/reply finish
                while len(peer.audio_frames) != count:
                    count = len(peer.audio_frames)
                    await peer.send_silence_until(lambda: False, 0.5)
                await peer.send_audio(words, speech=True)
                ended = peer.speech_ended_at[-1]
                assert await peer.send_silence_until(lambda e=ended: peer.first_reply_after(e), 120), turn
                if turn == 1:
                    peer.dtmf("9")
            await peer.send_silence_until(lambda: False, 0.5)
            await peer.hang_up()
            return peer

    peer = run(body())
    assert not peer.hung_up.is_set(), "the server must not hang up a call the peer ended"
    kinds = {kind for _, kind, _ in peer.frames}
    assert kinds == {0x10}, f"only 8 kHz audio frames may be sent, got {kinds}"
    assert all(len(p) == 320 for _, _, p in peer.audio_frames)
    session_id, record = call_record(phone_stack, str(peer.uuid))
    assert record["end"] == "hangup" and record["dtmf"] == "9" and record["turns"] == 3
    turns = history(phone_stack, session_id)
    assert [t["user"]["kind"] for t in turns] == ["text", "audio", "audio"]
    assert_nothing_leaked(phone_stack)


def test_audiosocket_barge_in_stops_sending_and_pacing_is_real_time(phone_stack: LocalStack) -> None:
    words = question("pcm16")
    call = uuid.uuid4()
    db = rdb(phone_stack)

    # a long greeting reply: the session is made here, the UUID is mapped to it, and AudioSocket
    # resumes it (the same path as Asterisk reconnecting the same call)
    auth = {"Authorization": f"Bearer {phone_stack.api_key}"}
    settings = {**PROFILE, **LONG, "mode": "audio"}
    sid = httpx.post(f"{phone_stack.gateway_url}/v1/sessions", json=settings, headers=auth).json()["id"]
    db.set(f"glmv:call:audiosocket:{call}", sid)

    async def body() -> tuple[AudioSocketCall, float, float, float]:
        async with AudioSocketCall("127.0.0.1", phone_stack.ports["audiosocket"], call_uuid=call) as peer:
            assert await peer.send_silence_until(lambda: frames_ms(peer) >= 1500, 120), "no greeting"
            heard_before = frames_ms(peer)
            started = time.perf_counter()
            await peer.send_audio(words[: 16 * 2000], speech=True)  # 2 s of the question
            ended = peer.speech_ended_at[-1]
            await peer.send_silence_until(lambda: False, 2.0)
            await peer.hang_up()
            return peer, heard_before, started, ended

    peer, heard_before, started, ended = run(body())
    frames = peer.audio_frames
    # pacing: the first 1.5 s of the greeting arrived at real time (20 ms per frame), within 5 %
    window = [at for at, _, _ in frames[:75]]
    expected = (len(window) - 1) * 0.02
    assert abs((window[-1] - window[0]) - expected) <= 0.05 * expected, (window[-1] - window[0], expected)
    # and never ahead of real time (frame k no earlier than k * 20 ms, give or take one frame)
    before = [at for at, _, _ in frames if at < started + 1.0]
    assert all(at - before[0] >= k * 0.02 - 0.02 for k, at in enumerate(before))
    session_id, record = call_record(phone_stack, str(call))
    first = history(phone_stack, session_id)[0]
    greeting = first["assistant"]
    # the greeting was still being generated when cut, or was long: either way it would have kept playing
    assert greeting["partial"] or first["timings"]["audio_ms"] > 4000, "the greeting is too short"
    # barge-in: once the detector heard the caller (well within 1 s) nothing more was sent until the
    # reply to what the caller said could start (after the end of speech and the detector's silence)
    late = [at - started for at, _, _ in frames if started + 1.0 < at < ended + 0.5]
    assert not late, f"greeting audio still sent {late[0]:.2f} s into the caller's speech"
    assert record["barge_ins"] >= 1
    assert greeting["truncated"] is True
    # history keeps what was sent before the cut: at least what had arrived when the caller spoke
    sent_before_cut = sum(len(p) for at, _, p in frames if at < started + 1.0) / 16
    assert heard_before <= greeting["heard_ms"] <= sent_before_cut
    assert_nothing_leaked(phone_stack)


def test_twenty_concurrent_calls(phone_stack: LocalStack) -> None:
    mulaw, pcm = question("mulaw"), question("pcm16")

    async def twilio_call() -> tuple[str, bool]:
        async with TwilioCall(
            twilio_url(phone_stack), headers=signed(phone_stack), parameters={"greeting": ""}
        ) as sim:
            await sim.send_audio(silence(0.2, 8000, "mulaw"))
            await sim.send_audio(mulaw, speech=True)
            ended = sim.speech_ended_at[-1]
            ok = await sim.send_silence_until(lambda: sim.first_reply_after(ended) is not None, 180)
            await sim.stop()
            await asyncio.wait_for(sim.closed.wait(), 30)
            return sim.call_sid, ok

    async def audiosocket_call() -> tuple[str, bool]:
        async with AudioSocketCall("127.0.0.1", phone_stack.ports["audiosocket"]) as peer:
            await peer.send_audio(silence(0.2, 8000))
            await peer.send_audio(pcm, speech=True)
            ended = peer.speech_ended_at[-1]
            ok = await peer.send_silence_until(lambda: peer.first_reply_after(ended) is not None, 180)
            await peer.hang_up()
            return str(peer.uuid), ok

    async def body() -> list[tuple[str, bool]]:
        return list(
            await asyncio.gather(
                *(twilio_call() for _ in range(10)), *(audiosocket_call() for _ in range(10))
            )
        )

    results = run(body(), timeout=400)
    assert all(ok for _, ok in results), results
    for call_id, _ in results:
        _, record = call_record(phone_stack, call_id)
        assert record["end"] in ("stop", "hangup") and record["turns"] >= 1
    text = httpx.get(phone_stack.metrics_url("gateway")).text
    assert "glmv_gateway_errors_total{" not in text or all(
        float(line.rsplit(" ", 1)[1]) == 0
        for line in text.splitlines()
        if line.startswith("glmv_gateway_errors_total{")
    )
    assert_nothing_leaked(phone_stack)


def test_audiosocket_error_frame_from_the_peer_ends_the_call(phone_stack: LocalStack) -> None:
    async def body() -> AudioSocketCall:
        async with AudioSocketCall("127.0.0.1", phone_stack.ports["audiosocket"]) as peer:
            peer.dtmf("4")
            peer.send_raw(b"\xff\x00\x01\x02")  # error 0x02: frame forwarding error
            await asyncio.wait_for(peer.closed.wait(), 20)
            return peer

    peer = run(body())
    assert peer.hung_up.is_set() and not peer.audio_frames
    _, record = call_record(phone_stack, str(peer.uuid))
    assert record["end"] == "peer_error_0x02" and record["dtmf"] == "4"
    assert_nothing_leaked(phone_stack)


@pytest.mark.parametrize("rate", [16000, 12000])
def test_audiosocket_replies_in_the_channel_rate(phone_stack: LocalStack, rate: int) -> None:
    """slin16 (0x12) is produced directly; slin12 (0x11) is resampled from the next rate offered."""

    async def body() -> AudioSocketCall:
        async with AudioSocketCall("127.0.0.1", phone_stack.ports["audiosocket"], rate=rate) as peer:
            assert await peer.send_silence_until(lambda: len(peer.audio_frames) >= 10, 120), "no greeting"
            await peer.hang_up()
            return peer

    peer = run(body())
    kind = {16000: 0x12, 12000: 0x11}[rate]
    assert {k for _, k, _ in peer.audio_frames} == {kind}
    assert all(len(p) == rate // 50 * 2 for _, _, p in peer.audio_frames)
    assert_nothing_leaked(phone_stack)


def test_twilio_call_is_hung_up_at_its_maximum_duration(phone_stack: LocalStack) -> None:
    async def body() -> tuple[TwilioCall, float]:
        parameters = {"greeting": "", "max_call_s": "2"}
        async with TwilioCall(
            twilio_url(phone_stack), headers=signed(phone_stack), parameters=parameters
        ) as sim:
            t0 = time.monotonic()
            assert await sim.send_silence_until(lambda: sim.closed.is_set(), 30), "the call was not ended"
            return sim, time.monotonic() - t0

    sim, seconds = run(body())
    assert 1.5 <= seconds < 15
    _, record = call_record(phone_stack, sim.call_sid)
    assert record["end"] == "max_duration"
    assert_nothing_leaked(phone_stack)
