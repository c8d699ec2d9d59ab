"""Jobs survive a worker killed mid-job (exactly one result and webhook) and wait out a dead service."""

from __future__ import annotations

import time

import pytest
import redis

from glmv_gateway.client import GatewayClient

from .conftest import FAST, stack_db, start_stack
from .test_jobs import submit, wait_state
from .webhook_server import WebhookReceiver


@pytest.fixture
def job_stack(dev_models, tmp_path):
    stack = start_stack(dev_models, tmp_path, db=stack_db("own"))
    yield stack
    stack.stop()


def test_worker_killed_mid_job_completes_exactly_once(job_stack, sample_wav: bytes) -> None:
    stack = job_stack
    with GatewayClient(stack.gateway_url, stack.api_key) as client, WebhookReceiver() as hook:
        options = {**FAST, "max_new_tokens": 400, "temperature": 1.0}
        job_id = submit(client, audio=sample_wav, options=options, webhook_url=hook.url).json()["id"]
        wait_state(client, job_id, {"running"})
        time.sleep(0.3)
        stack.kill("worker")
        assert client.http.get(f"/v1/jobs/{job_id}").json()["state"] == "running"
        stack.start_worker("worker2")
        job = wait_state(client, job_id, {"done", "failed"}, timeout=180)
        assert job["state"] == "done", job
        assert job["attempts"] == 2
        time.sleep(2)  # any duplicate delivery would arrive now
        assert len(hook.received) == 1
        files = sorted(p.name for p in (stack.jobs_dir / job_id).iterdir())
        assert files == ["input.wav", "reply.wav", "transcript.json"]


def test_service_down_job_retries_then_fails_clearly(job_stack, sample_wav: bytes) -> None:
    stack = job_stack
    stack.kill("lm")
    with GatewayClient(stack.gateway_url, stack.api_key) as client:
        job_id = submit(client, text="hello", options=FAST).json()["id"]
        job = wait_state(client, job_id, {"done", "failed"}, timeout=120)
        assert job["state"] == "failed"
        assert "retrying" in job["seen_states"]
        assert "lm" in job["error"] and "unavailable" in job["error"] and "3 attempts" in job["error"]
        assert redis.Redis.from_url(stack.redis_url).exists(f"glmv:job:{job_id}")
        # the service comes back: a new job goes through
        stack.start_service("lm")
        stack.wait_ready(timeout=120)
        second = submit(client, text="hello", options=FAST).json()["id"]
        job = wait_state(client, second, {"done", "failed"}, timeout=120)
        assert job["state"] == "done", job
