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
from glmv_gateway.phone_sim import AudioSocketCall, TwilioCall
from glmv_gateway.sessions import key_digest
from glmv_gateway.stack import LocalStack

from .conftest import start_stack

TOKEN = "test-twilio-auth-token"
PROFILE = {
    "max_new_tokens": 48,
    "seed": 1234,
    "temperature": 0.8,
    "top_p": 1.0,
    "turn_detection": {"type": "server_vad", "silence_duration_ms": 400},
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
    last_ms = int(sim.marks_sent[-1].rsplit(":", 1)[1])
    assert last_ms == round(sum(len(p) for p in payloads) / 8)
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
        (struct.pack(">BH", 0x01, 16) + uuid.uuid4().bytes, "second UUID"),
    ],
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
