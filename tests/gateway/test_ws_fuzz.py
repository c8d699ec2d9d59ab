"""Hypothesis fuzzing of the native WebSocket's control frames: every bad frame gets an ``error``
event (status 400, a message), the socket stays usable, and the gateway never crashes."""

from __future__ import annotations

import json
import string

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.sync.client import connect

from glmv_gateway.client import GatewayClient

from .conftest import FAST
from .test_websocket import receive_until, ws_url

KNOWN = {"input_audio.format", "commit", "cancel", "text"}
ENCODING_WORDS = {"pcm", "pcmu", "pcma", "ulaw", "alaw", "mulaw", "float"}


def not_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return True
    return False


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=12,
)
letters = st.text(alphabet=string.ascii_letters, min_size=1, max_size=12)
bad_frames = st.one_of(
    st.text(max_size=200).filter(not_json),
    json_values.filter(lambda v: not isinstance(v, dict)).map(json.dumps),
    st.dictionaries(st.text(max_size=8).filter(lambda k: k != "type"), json_values, max_size=4).map(
        json.dumps
    ),
    json_values.filter(lambda v: not isinstance(v, str)).map(lambda v: json.dumps({"type": v})),
    st.text(max_size=30).filter(lambda t: t not in KNOWN).map(lambda t: json.dumps({"type": t})),
    st.one_of(st.none(), st.integers(), st.just(""), st.just("   "), st.lists(st.text(), max_size=2)).map(
        lambda v: json.dumps({"type": "text", "text": v})
    ),
    st.one_of(
        st.integers().filter(lambda r: not 8000 <= r <= 192_000).map(lambda r: {"sample_rate": r}),
        letters.map(lambda r: {"sample_rate": r}),
        st.integers().filter(lambda c: not 1 <= c <= 32).map(lambda c: {"channels": c}),
        letters.filter(lambda e: e.lower() not in ENCODING_WORDS).map(lambda e: {"encoding": e}),
    ).map(lambda fields: json.dumps({"type": "input_audio.format", **fields})),
)


def test_bad_control_frames_get_errors_and_the_socket_survives(stack, client: GatewayClient) -> None:
    session = client.create_session(**FAST)
    url = ws_url(stack, session["id"])

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(st.lists(bad_frames, min_size=1, max_size=5))
    def fuzz(frames: list[str]) -> None:
        with connect(url, open_timeout=30) as ws:
            assert json.loads(ws.recv(timeout=10))["type"] == "session.ready"
            for frame in frames:
                ws.send(frame)
                event = json.loads(ws.recv(timeout=10))
                assert event["type"] == "error" and event["status"] == 400, (frame, event)
                assert isinstance(event["message"], str) and event["message"], (frame, event)
            ws.send(json.dumps({"type": "no-such-type"}))  # still answering
            assert json.loads(ws.recv(timeout=10))["type"] == "error"

    fuzz()
    assert httpx.get(f"{stack.gateway_url}/healthz").status_code == 200
    # after all that, a real turn on the same session still works
    with connect(url, open_timeout=30) as ws:
        json.loads(ws.recv(timeout=10))
        ws.send(json.dumps({"type": "text", "text": "hello"}))
        events, _ = receive_until(ws, {"turn.done"})
    assert events[-1]["partial"] is False
