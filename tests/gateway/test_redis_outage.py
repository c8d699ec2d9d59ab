"""Redis going away: clear 503s naming it (never a hang or a bare 500), a reply in flight says it was
not saved, /readyz reports it, and the gateway recovers by itself when Redis is back."""

from __future__ import annotations

import shutil
import signal
import time

import httpx
import pytest
import redis

from glmv_gateway.client import GatewayClient, GatewayError
from glmv_gateway.stack import free_port

from ..conftest import REDIS_PORT
from .conftest import FAST, stack_db, start_stack
from .test_failures import wait_ready
from .test_jobs import submit, wait_state

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")


@pytest.fixture(scope="module")
def private_redis_stack(dev_models, tmp_path_factory):
    """Sessions and jobs on a private redis-server (to kill or freeze); the Celery broker on the
    shared one, so job retries can still be queued while the job store is away."""
    broker_db = stack_db("own") + 1
    redis.Redis(db=broker_db).flushdb()
    stack = start_stack(
        dev_models,
        tmp_path_factory.mktemp("redis-outage"),
        db=0,
        redis_port=free_port(),
        GLMV_GATEWAY_REDIS_TIMEOUT_S="2",
        GLMV_GATEWAY_BROKER_URL=f"redis://127.0.0.1:{REDIS_PORT}/{broker_db}",
    )
    yield stack
    stack.stop()


def kill_redis(stack) -> None:
    stack._redis_proc.send_signal(signal.SIGKILL)
    stack._redis_proc.wait(10)
    stack._redis_proc = None


def assert_redis_503(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert error["component"] == "redis" and "Redis" in error["message"]
    assert response.headers["retry-after"] == "1"


def test_redis_outage_and_recovery(private_redis_stack, sample_wav: bytes) -> None:
    stack = private_redis_stack
    with GatewayClient(stack.gateway_url, stack.api_key) as client:
        session = client.create_session(**FAST, mode="text")
        first = client.turn(session["id"], text="Tell me a story.")
        second = client.turn(session["id"], text="And then?")
        # the LM took all it had fed to the model for the first turn from its prefix cache (a reply
        # cut by max_tokens never fed its last token back)
        u1 = first.done["usage"]
        fed = u1["prompt_tokens"] + u1["completion_tokens"] - (first.done["end_reason"] == "max_tokens")
        assert fed >= 64  # the prefix cache's minimum
        assert second.done["usage"]["lm_cached_prompt_tokens"] >= fed

        # Redis dies while a reply is being generated: the client still gets the whole reply, then an
        # error event saying the history was not saved (never a silent loss), then turn.done.
        long = client.create_session(max_new_tokens=600, seed=7, temperature=1.0, top_p=1.0)
        events = []
        for event in client.stream_turn(long["id"], audio=sample_wav, content_type="audio/wav"):
            events.append(event)
            if len(events) == 3:
                kill_redis(stack)
        kinds = [e["type"] for e in events]
        assert kinds[-1] == "turn.done" and kinds[-2] == "error", kinds
        assert events[-2]["component"] == "redis" and "not saved" in events[-2]["message"]
        assert events[-1]["end_reason"] != "error" and events[-1]["text"]

        # Every request that needs Redis answers 503 at once, naming it; the process stays up.
        t0 = time.monotonic()
        assert_redis_503(client.http.post("/v1/sessions", json={}))
        assert_redis_503(client.http.get(f"/v1/sessions/{session['id']}"))
        assert_redis_503(client.http.post(f"/v1/sessions/{session['id']}/turns", json={"text": "hi"}))
        assert_redis_503(client.http.post("/v1/jobs", json={"text": "hi"}))
        assert time.monotonic() - t0 < 20
        assert httpx.get(f"{stack.gateway_url}/healthz").status_code == 200
        report = wait_ready(stack, 503)
        assert str(report["redis"]).startswith("unreachable")
        with pytest.raises(GatewayError) as err:
            client.create_session()
        assert err.value.status == 503

        # Redis is back (empty: it keeps nothing on disk): the same gateway serves again.
        stack._ensure_redis()
        wait_ready(stack, 200)
        fresh = client.create_session(**FAST)
        assert client.turn(fresh["id"], text="hello again").done["partial"] is False


def test_job_survives_a_redis_stall(private_redis_stack, sample_wav: bytes) -> None:
    """The job store is frozen (longer than the Redis timeout) when a worker takes a job: the
    attempt fails on its first Redis call, the worker retries it (the broker is elsewhere), and the
    job ends done, once. Without the retry the job would stay queued forever."""
    stack = private_redis_stack
    stack._ensure_redis()  # (restarted by the test above if it ran first)
    wait_ready(stack, 200)
    worker = stack.procs["worker"]
    with GatewayClient(stack.gateway_url, stack.api_key) as client:
        worker.send_signal(signal.SIGSTOP)
        try:
            job_id = submit(client, text="hello", options=FAST).json()["id"]
            stack._redis_proc.send_signal(signal.SIGSTOP)
            try:
                worker.send_signal(signal.SIGCONT)
                time.sleep(3.0)  # > GLMV_GATEWAY_REDIS_TIMEOUT_S: the first attempt times out
            finally:
                stack._redis_proc.send_signal(signal.SIGCONT)
        finally:
            worker.send_signal(signal.SIGCONT)
        job = wait_state(client, job_id, {"done", "failed"}, timeout=120)
    assert job["state"] == "done", job
    assert job["attempts"] == 1  # the failed attempt never got to claim the run
    files = sorted(p.name for p in (stack.jobs_dir / job_id).iterdir())
    assert files == ["reply.wav", "transcript.json"]
    assert "Redis unavailable; retrying job" in (stack.log_dir / "worker.log").read_text()
