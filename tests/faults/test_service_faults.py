"""Faults injected into a running, supervised stack (real processes): a model service SIGKILLed
mid-turn, a decoder that stalls, the gateway SIGKILLed mid-turn. Each time the client hears about
it promptly and by name, no lock or slot stays taken, history keeps what was acknowledged, the
supervisor brings the dead process back, and the next turn works."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import pytest
import redis

from glmv_gateway.client import GatewayClient, GatewayError
from glmv_gateway.sessions import key_digest
from glmv_gateway.stack import free_port

from ..conftest import REDIS_PORT
from ..gateway.conftest import FAST
from .conftest import readyz, stack_db, start_stack, wait_for
from .proxy import StallingProxy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
LONG = {"max_new_tokens": 2000, "seed": 7, "temperature": 1.0, "top_p": 1.0}


@pytest.fixture
def supervised(dev_models, tmp_path: Path):
    stack = start_stack(dev_models, tmp_path, db=stack_db("own"), GLMV_GATEWAY_TURN_TIMEOUT_S="30")
    stack.supervise = True
    stack.start_supervisor()
    yield stack
    stack.stop()


def metric(stack, name: str) -> float:
    text = httpx.get(f"{stack.gateway_url}/metrics", timeout=10).text
    match = re.search(rf"^{name}(?:\{{\}})? (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def nothing_held(stack, session_id: str) -> None:
    r = redis.Redis.from_url(stack.redis_url)
    assert not r.exists(f"glmv:session:{session_id}:lock")
    assert r.zcard(f"glmv:apikey-turns:{key_digest(stack.api_key)}") == 0
    assert metric(stack, "glmv_gateway_active_turns") == 0


@pytest.mark.parametrize("victim", ["tokenizer", "lm", "decoder"])
def test_model_service_sigkilled_mid_turn(supervised, sample_wav: bytes, victim: str) -> None:
    stack = supervised
    old_pid = stack.procs[victim].pid
    with GatewayClient(stack.gateway_url, stack.api_key) as client:
        session = client.create_session(**FAST)
        first = client.turn(session["id"], text="warm up")
        client.patch_session(session["id"], **LONG)
        if victim == "tokenizer":  # its part of a turn is the first few ms: kill it just before
            stack.kill(victim)
            killed = time.monotonic()
            with pytest.raises(GatewayError) as err:
                client.turn(session["id"], audio=sample_wav, content_type="audio/wav")
            took = time.monotonic() - killed
            assert err.value.status == 503 and "tokenizer" in str(err.value)
        else:
            killed = 0.0
            took = None
            for event in client.stream_turn(session["id"], audio=sample_wav, content_type="audio/wav"):
                if event["type"] in ("text.delta", "audio.delta") and not killed:
                    stack.kill(victim)
                    killed = time.monotonic()
                if event["type"] == "error":
                    took = time.monotonic() - killed
                    assert event["component"] == victim, event
                if event["type"] == "turn.done":
                    assert event["partial"] is True and event["end_reason"] == "error"
            assert took is not None, "no error event"
        assert took <= 2.0, f"the client heard of the {victim}'s death after {took:.2f} s"

        turns = client.history(session["id"])["turns"]
        assert turns[0]["turn_id"] == first.done["turn_id"]
        nothing_held(stack, session["id"])
        wait_for(lambda: stack.procs[victim].pid != old_pid, 30, f"the supervisor to restart {victim}")
        wait_for(lambda: readyz(stack.gateway_url) == 200, 180, "/readyz 200 again", interval=0.5)
        assert any(r["name"] == victim and r["returncode"] == -9 for r in stack.restarts)
        client.patch_session(session["id"], **FAST)
        again = client.turn(session["id"], audio=sample_wav, content_type="audio/wav")
        assert again.error is None and again.done["partial"] is False


@pytest.fixture
def stalling_decoder(dev_models, tmp_path: Path):
    from glmv_gateway.stack import LocalStack

    decoder_port = free_port()
    proxy = StallingProxy(decoder_port)
    stack = LocalStack(
        models=dev_models,
        redis_url=f"redis://127.0.0.1:{REDIS_PORT}/{stack_db('own')}",
        ports={"decoder": decoder_port},
        gateway_addrs={"decoder": f"127.0.0.1:{proxy.port}"},
        log_dir=tmp_path,
        gateway_env={"GLMV_GATEWAY_TURN_TIMEOUT_S": "6", "GLMV_GATEWAY_LOCK_TTL_S": "60"},
        extra_env={"OMP_NUM_THREADS": "1"},
        jobs_dir=tmp_path / "jobs",
        with_worker=False,
    )
    redis.Redis.from_url(stack.redis_url).flushdb()
    stack.start(timeout=240)
    yield stack, proxy
    proxy.close()
    stack.stop()


def test_stalled_decoder_times_out_cleanly(stalling_decoder, sample_wav: bytes) -> None:
    stack, proxy = stalling_decoder
    with GatewayClient(stack.gateway_url, stack.api_key) as client:
        session = client.create_session(**FAST)
        proxy.stalled.set()
        started = time.monotonic()
        result = client.turn(session["id"], audio=sample_wav, content_type="audio/wav")
        took = time.monotonic() - started
        assert result.error is not None, "the turn did not fail"
        assert result.error["component"] == "decoder", result.error
        assert "DEADLINE" in result.error.get("code", "") + result.error["message"].upper(), result.error
        assert took < 6 + 10, f"the turn took {took:.1f} s with a 6 s deadline"
        assert result.done["partial"] is True
        # nothing leaks: the lock (60 s TTL here) and the key's slot are free at once
        nothing_held(stack, session["id"])
        proxy.stalled.clear()
        wait_for(lambda: readyz(stack.gateway_url) == 200, 60, "/readyz 200 once the decoder answers")
        again = client.turn(session["id"], audio=sample_wav, content_type="audio/wav")
        assert again.error is None and again.done["partial"] is False


def test_gateway_sigkilled_mid_turn(supervised, sample_wav: bytes) -> None:
    stack = supervised
    old_pid = stack.procs["gateway"].pid
    with GatewayClient(stack.gateway_url, stack.api_key) as client:
        session = client.create_session(**FAST)
        acknowledged = client.turn(session["id"], text="remember this")
        assert acknowledged.done["partial"] is False
        client.patch_session(session["id"], **LONG)
        with pytest.raises(httpx.TransportError):
            for event in client.stream_turn(session["id"], audio=sample_wav, content_type="audio/wav"):
                if event["type"] == "text.delta":
                    stack.kill("gateway")
        killed = time.monotonic()
    wait_for(lambda: stack.procs["gateway"].pid != old_pid, 30, "the supervisor to restart the gateway")
    wait_for(lambda: readyz(stack.gateway_url) == 200, 120, "the new gateway", interval=0.5)
    with GatewayClient(stack.gateway_url, stack.api_key) as client:
        turns = client.history(session["id"])["turns"]
        assert [t["turn_id"] for t in turns] == [acknowledged.done["turn_id"]]
        client.patch_session(session["id"], **FAST)
        # the dead gateway's lock (5 s TTL on test stacks) expires by itself ...
        wait_for(
            lambda: not redis.Redis.from_url(stack.redis_url).exists(f"glmv:session:{session['id']}:lock"),
            30,
            "the lock to expire",
        )
        assert time.monotonic() - killed < 5 + 10
        # ... and the next turn reports the interrupted one, then runs
        after = client.turn(session["id"], text="still there?")
        assert after.error is None and after.done["partial"] is False
        assert metric(stack, "glmv_gateway_interrupted_turns_total") == 1
    log = (Path(stack.log_dir) / "gateway.log").read_text()
    assert "never finished (its gateway stopped mid-turn)" in log
