"""The batch worker over RabbitMQ instead of Redis (runs where a RabbitMQ server answers locally)."""

from __future__ import annotations

import socket

import pytest

from glmv_gateway.client import GatewayClient

from .conftest import FAST, stack_db, start_stack
from .test_jobs import submit, wait_state
from .webhook_server import WebhookReceiver

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"


def rabbitmq_answers() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=1):
            return True
    except OSError:
        return False


@pytest.mark.skipif(not rabbitmq_answers(), reason="no RabbitMQ server on 127.0.0.1:5672")
def test_job_over_rabbitmq(dev_models, tmp_path, sample_wav: bytes) -> None:
    from kombu import Connection

    with Connection(AMQP_URL) as conn:  # a clean queue: nothing left from other runs
        conn.default_channel.queue_declare("glmv-jobs", durable=True, auto_delete=False)
        conn.default_channel.queue_purge("glmv-jobs")
    stack = start_stack(dev_models, tmp_path, db=stack_db("own"), GLMV_GATEWAY_BROKER_URL=AMQP_URL)
    try:
        with GatewayClient(stack.gateway_url, stack.api_key) as client, WebhookReceiver() as hook:
            job_id = submit(client, audio=sample_wav, options=FAST, webhook_url=hook.url).json()["id"]
            job = wait_state(client, job_id, {"done", "failed"}, timeout=120)
            assert job["state"] == "done", job
            assert client.http.get(f"/v1/jobs/{job_id}/audio").status_code == 200
    finally:
        stack.stop()
