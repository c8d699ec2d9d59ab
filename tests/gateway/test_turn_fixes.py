"""Turn-level fixes: text deltas add up to the final text, the last chunk is the decoder's final
chunk, a dropped HTTP client frees its session at once, and a busy session never uses up its key's
turn slots. Real processes (the shared dev stack)."""

from __future__ import annotations

import concurrent.futures
import json
import time

import httpx

from glmv_gateway.client import GatewayClient, GatewayError
from glmv_gateway.conversation.events import parse_event

from .conftest import FAST
from .test_turns import mel_frames


def test_text_deltas_concatenate_to_the_final_text(client: GatewayClient) -> None:
    # A random dev model often ends a reply inside a multi-byte character: the final text then holds
    # a replacement character the deltas never carried unless the decoder's last bytes are sent.
    tails = 0
    for seed in range(12):
        session = client.create_session(max_new_tokens=40, seed=seed, temperature=1.0, top_p=1.0)
        result = client.turn(session["id"], text="Say something")
        assert result.error is None, result.error
        assert result.text_deltas == result.done["text"], seed
        assert client.history(session["id"])["turns"][0]["assistant"]["text"] == result.done["text"]
        tails += result.done["text"].endswith("\ufffd")
    assert tails > 0, "no reply ended inside a character: the test did not exercise the flush"


def test_pending_tokens_are_decoded_as_the_final_chunk(client: GatewayClient) -> None:
    # one chunk size larger than the reply: every token is still pending when the LM ends, so the
    # whole reply must come back as one final chunk of the one-shot length
    session = client.create_session(**{**FAST, "max_new_tokens": 60}, chunk_schedule=[1000])
    result = client.turn(session["id"], text="hello")
    audio_events = [e for e in result.events if e["type"] == "audio.delta"]
    tokens = result.done["usage"]["audio_tokens"]
    assert tokens > 0
    assert len(audio_events) == 1, [len(e["samples"]) for e in audio_events]
    assert len(result.audio) == 256 * mel_frames(tokens)


def test_events_round_trip_through_ndjson(stack, client: GatewayClient) -> None:
    session = client.create_session(**FAST)
    with (
        httpx.Client(
            base_url=stack.gateway_url, headers={"Authorization": f"Bearer {stack.api_key}"}
        ) as http,
        http.stream("POST", f"/v1/sessions/{session['id']}/turns", json={"text": "hi"}, timeout=120) as r,
    ):
        lines = [json.loads(line) for line in r.iter_lines() if line.strip()]
    kinds = []
    for wire in lines:
        event = parse_event(wire)
        assert event.to_wire() == wire
        kinds.append(event.type)
    assert kinds[0] == "turn.started" and kinds[-1] == "turn.done" and "audio.delta" in kinds


def test_a_dropped_http_client_frees_the_session_at_once(stack, client: GatewayClient) -> None:
    # a long reply; the client reads a little of the stream and hangs up
    session = client.create_session(
        max_new_tokens=2000, seed=7, temperature=1.0, top_p=1.0, chunk_schedule=[4]
    )
    headers = {"Authorization": f"Bearer {stack.api_key}"}
    with (
        httpx.Client(base_url=stack.gateway_url, headers=headers, timeout=60) as http,
        http.stream("POST", f"/v1/sessions/{session['id']}/turns", json={"text": "tell me a story"}) as r,
    ):
        for line in r.iter_lines():
            if '"audio.delta"' in line:
                break
    # the lock and the key's slot are released within a moment, not after the lock's TTL
    deadline = time.monotonic() + 3
    while True:
        turns = client.history(session["id"])["turns"]
        if turns:
            break
        assert time.monotonic() < deadline, "the partial turn was not stored after the client left"
        time.sleep(0.05)
    assert turns[0]["assistant"]["partial"] is True and turns[0]["assistant"]["end_reason"] == "cancelled"
    client.patch_session(session["id"], **FAST, chunk_schedule=[10])
    while True:  # the lock is released right after the history write; a leaked one would stay 300 s
        try:
            result = client.turn(session["id"], text="again")
            break
        except GatewayError as exc:
            assert exc.status == 409 and time.monotonic() < deadline + 2, exc
            time.sleep(0.05)
    assert result.done["partial"] is False


def test_a_busy_session_never_takes_the_keys_other_sessions_slots(stack, client: GatewayClient) -> None:
    busy = client.create_session(max_new_tokens=400, seed=7, temperature=1.0, top_p=1.0)
    other = client.create_session(**FAST)
    headers = {"Authorization": f"Bearer {stack.api_key}"}

    def post(session_id: str) -> int:
        with httpx.Client(base_url=stack.gateway_url, headers=headers, timeout=120) as http:
            r = http.post(f"/v1/sessions/{session_id}/turns?stream=false", json={"text": "hi"})
            return r.status_code

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        burst = [pool.submit(post, busy["id"]) for _ in range(12)]
        time.sleep(0.3)
        other_status = pool.submit(post, other["id"]).result()
        statuses = [f.result() for f in burst]
    assert statuses.count(200) == 1 and statuses.count(409) == 11, statuses
    assert other_status == 200
