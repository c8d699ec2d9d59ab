"""A model service killed mid-turn: error event naming it, /readyz 503, session intact, recovery."""

from __future__ import annotations

import time

import httpx
import pytest

from glmv_gateway.client import GatewayClient

from .conftest import FAST, stack_db, start_stack


@pytest.fixture
def own_stack(dev_models, tmp_path):
    stack = start_stack(dev_models, tmp_path, db=stack_db("own"))
    yield stack
    stack.stop()


def wait_ready(stack, expect: int, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = httpx.get(f"{stack.gateway_url}/readyz", timeout=10)
        if response.status_code == expect:
            return response.json()
        time.sleep(0.2)
    raise AssertionError(f"/readyz never answered {expect}: {response.json()}")


@pytest.mark.parametrize("victim", ["decoder", "lm"])
def test_service_killed_mid_turn(own_stack, sample_wav: bytes, victim: str) -> None:
    stack = own_stack
    with GatewayClient(stack.gateway_url, stack.api_key) as client:
        session = client.create_session(max_new_tokens=2000, seed=7, temperature=1.0, top_p=1.0)
        first = client.turn(session["id"], text="warm up")  # one good turn in history
        events = []
        for event in client.stream_turn(session["id"], audio=sample_wav, content_type="audio/wav"):
            events.append(event)
            if len(events) == 3:
                stack.kill(victim)
        kinds = [e["type"] for e in events]
        assert "error" in kinds, kinds
        error = next(e for e in events if e["type"] == "error")
        assert error["component"] == victim and error["code"] == "UNAVAILABLE"
        assert error["status"] == 503 and error["retryable"] is True  # same shape as control errors
        assert kinds[-1] == "turn.done" and events[-1]["partial"] is True
        assert events[-1]["end_reason"] == "error"

        body = wait_ready(stack, 503)
        assert body["services"][victim].startswith("unreachable")

        turns = client.history(session["id"])["turns"]
        assert turns[0]["turn_id"] == first.done["turn_id"]
        assert len(turns) in (1, 2) and all(t["assistant"]["partial"] for t in turns[1:])

        stack.start_service(victim)
        wait_ready(stack, 200)
        client.patch_session(session["id"], **FAST)
        again = client.turn(session["id"], audio=sample_wav, content_type="audio/wav")
        assert again.error is None and again.done["partial"] is False


def test_sigterm_drains_the_gateway(own_stack, sample_wav: bytes) -> None:
    """A rolling update: SIGTERM while a turn streams. The turn streams to its end and is stored,
    the gateway exits, and it takes no new connections meanwhile."""
    import signal

    import redis

    stack = own_stack
    gateway = stack.procs["gateway"]
    with GatewayClient(stack.gateway_url, stack.api_key) as client:
        session = client.create_session(max_new_tokens=2000, seed=7, temperature=1.0, top_p=1.0)
        events = []
        for event in client.stream_turn(session["id"], audio=sample_wav, content_type="audio/wav"):
            events.append(event)
            if len(events) == 1:
                gateway.send_signal(signal.SIGTERM)
                time.sleep(0.2)
                with pytest.raises(httpx.TransportError):
                    httpx.get(f"{stack.gateway_url}/healthz", timeout=2)
    assert events[0]["type"] == "turn.started" and events[-1]["type"] == "turn.done"
    assert events[-1]["partial"] is False and events[-1]["end_reason"] != "error"
    assert any(e["type"] == "audio.delta" for e in events)
    # exits by itself once drained (uvicorn re-raises the SIGTERM it caught: status -15)
    assert gateway.wait(30) in (0, -signal.SIGTERM)
    turns = redis.Redis.from_url(stack.redis_url).llen(f"glmv:session:{session['id']}:turns")
    assert turns == 1
