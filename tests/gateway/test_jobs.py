"""Batch jobs through a real Celery worker, real Redis, real services; webhooks to a local server."""

from __future__ import annotations

import io
import json
import time

import httpx
import pytest
import soundfile as sf

from glmv_gateway.client import GatewayClient
from glmv_gateway.jobs.webhook import verify

from .conftest import FAST, WEBHOOK_SECRET
from .test_turns import mel_frames
from .webhook_server import WebhookReceiver


def submit(
    client: GatewayClient,
    *,
    audio: bytes | None = None,
    text: str | None = None,
    options: dict | None = None,
    webhook_url: str | None = None,
) -> httpx.Response:
    if audio is not None:
        data = {"options": json.dumps(options or {})}
        if webhook_url:
            data["webhook_url"] = webhook_url
        return client.http.post("/v1/jobs", files={"audio": ("call.wav", audio, "audio/wav")}, data=data)
    body = {"text": text, "options": options or {}}
    if webhook_url:
        body["webhook_url"] = webhook_url
    return client.http.post("/v1/jobs", json=body)


def wait_state(client: GatewayClient, job_id: str, states: set[str], timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        job = client.http.get(f"/v1/jobs/{job_id}").json()
        if not seen or seen[-1] != job["state"]:
            seen.append(job["state"])
        if job["state"] in states:
            job["seen_states"] = seen
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} never reached {states}; states seen: {seen}")


def test_audio_job_end_to_end_with_signed_webhook(client: GatewayClient, sample_wav: bytes) -> None:
    with WebhookReceiver() as hook:
        response = submit(client, audio=sample_wav, options=FAST, webhook_url=hook.url)
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        job = wait_state(client, job_id, {"done", "failed"})
        assert job["state"] == "done" and job["progress"] == 100, job
        deadline = time.monotonic() + 20
        while not hook.received and time.monotonic() < deadline:
            time.sleep(0.05)
    assert len(hook.received) == 1
    headers, body = hook.received[0]
    assert verify(body, WEBHOOK_SECRET, headers["x-glmv-signature"])
    assert not verify(body + b" ", WEBHOOK_SECRET, headers["x-glmv-signature"])
    payload = json.loads(body)
    assert payload["job_id"] == job_id == headers["x-glmv-job-id"] and payload["state"] == "done"

    transcript = client.http.get(f"/v1/jobs/{job_id}/transcript").json()
    assert transcript["text"] == payload["result"]["text"]
    wav = client.http.get(f"/v1/jobs/{job_id}/audio")
    assert wav.status_code == 200 and wav.headers["content-type"] == "audio/wav"
    samples, rate = sf.read(io.BytesIO(wav.content))
    assert rate == 22050 and len(samples) == transcript["audio_samples"]
    assert len(samples) == 256 * mel_frames(transcript["usage"]["audio_tokens"])
    assert client.http.get(f"/v1/jobs/{job_id}").json()["webhook"] == "delivered"


def test_failing_webhook_is_retried_and_job_reads_done(client: GatewayClient) -> None:
    with WebhookReceiver(fail_first=2) as hook:
        response = submit(client, text="Summarise the call.", options=FAST, webhook_url=hook.url)
        job_id = response.json()["id"]
        wait_state(client, job_id, {"done"})
        deadline = time.monotonic() + 20
        while not hook.received and time.monotonic() < deadline:
            time.sleep(0.05)
    assert hook.attempts == 3 and len(hook.received) == 1
    assert client.http.get(f"/v1/jobs/{job_id}").json()["webhook"] == "delivered"


def test_job_states_progress_and_cancel(client: GatewayClient, sample_wav: bytes) -> None:
    response = submit(
        client,
        audio=sample_wav,
        options={"max_new_tokens": 2000, "seed": 7, "temperature": 1.0, "top_p": 1.0},
    )
    job_id = response.json()["id"]
    job = wait_state(client, job_id, {"running"})
    assert client.http.get(f"/v1/jobs/{job_id}/audio").status_code == 409
    cancel = client.http.delete(f"/v1/jobs/{job_id}")
    assert cancel.status_code == 202 and cancel.json()["state"] == "cancelled"
    time.sleep(1.5)
    response = client.http.get(f"/v1/jobs/{job_id}")
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["state"] == "cancelled"
    assert client.http.delete(f"/v1/jobs/{job_id}").status_code == 409


@pytest.mark.parametrize(
    ("kwargs", "status", "message"),
    [
        ({"audio": b"RIFFxxxxWAVEjunk"}, 400, "bad audio"),
        ({"audio": b""}, 400, "empty"),
        ({"text": "hi", "options": {"temperature": 9}}, 422, "temperature"),
        ({"text": "hi", "options": {"no_such_option": 1}}, 422, "no_such_option"),
        ({"text": ""}, 400, "non-empty"),
        ({"text": "hi", "webhook_url": "ftp://example.invalid/x"}, 400, "http(s)"),
        # SSRF guard: only the allow-listed 127.0.0.1 may be private
        ({"text": "hi", "webhook_url": "http://169.254.169.254/latest/meta-data/"}, 400, "ALLOWED_HOSTS"),
        ({"text": "hi", "webhook_url": "http://localhost:6379/"}, 400, "'localhost' is not in"),
        ({"audio": b"\x00" * (3 * 1024 * 1024)}, 413, "limit"),
    ],
)
def test_bad_job_input_creates_no_job(
    client: GatewayClient, stack, kwargs: dict, status: int, message: str
) -> None:
    import redis

    r = redis.Redis.from_url(stack.redis_url)
    before = len(r.keys("glmv:job:*"))
    response = submit(client, **kwargs)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]["message"]
    assert len(r.keys("glmv:job:*")) == before


def test_jobs_are_private_to_their_api_key(client: GatewayClient, stack) -> None:
    job_id = submit(client, text="hi", options=FAST).json()["id"]
    import hashlib

    import redis

    redis.Redis.from_url(stack.redis_url).sadd("glmv:apikeys", hashlib.sha256(b"other-key").hexdigest())
    with GatewayClient(stack.gateway_url, "other-key") as other:
        assert other.http.get(f"/v1/jobs/{job_id}").status_code == 404
    assert client.http.get("/v1/jobs/unknown").status_code == 404
    wait_state(client, job_id, {"done"})
