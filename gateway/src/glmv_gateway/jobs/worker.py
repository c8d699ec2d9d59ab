"""The Celery application and the job task.

Late acknowledgement (``acks_late``, ``reject_on_worker_lost``, prefetch 1): a worker that dies
mid-job leaves its message unacknowledged and the broker redelivers it (Redis: after
``GLMV_GATEWAY_JOB_VISIBILITY_TIMEOUT_S``). The task is idempotent by job id: a finished job is not
run again, a job another live worker holds is retried later, results are written atomically.
Services answering UNAVAILABLE make the task retry with exponential backoff, up to
``GLMV_GATEWAY_JOB_MAX_RETRIES``; then the job fails with a message naming the service.

Brokers: Redis by default (``GLMV_GATEWAY_BROKER_URL=redis://host:6379/1``); RabbitMQ works the same
(``amqp://guest:guest@host:5672//``). Results live in Redis job metadata and the jobs directory, so
no Celery result backend is used.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from celery import Celery, Task
from redis.exceptions import RedisError

from glmv_common.logs import get_logger, setup_logging
from glmv_common.parent import watch_parent
from glmv_gateway.jobs.runner import JobBusy, ServiceUnavailable, run_job
from glmv_gateway.jobs.store import JobStore
from glmv_gateway.settings import GatewaySettings

log = get_logger("glmv.jobs.worker")
TASK_NAME = "glmv.run_job"


def make_celery(settings: GatewaySettings) -> Celery:
    app = Celery("glmv", broker=settings.broker_url)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_default_queue="glmv-jobs",
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": settings.job_visibility_timeout_s},
        worker_hijack_root_logger=False,
        task_serializer="json",
        accept_content=["json"],
    )
    settings_ref = settings

    @app.task(bind=True, name=TASK_NAME, max_retries=None)
    def run_job_task(self: Task, job_id: str) -> str:
        retries = self.request.retries
        try:
            return asyncio.run(run_job(job_id, settings_ref))
        except JobBusy:
            raise self.retry(countdown=5) from None
        except ServiceUnavailable as exc:
            if retries >= settings_ref.job_max_retries:
                message = f"{exc} (gave up after {retries + 1} attempts)"
                asyncio.run(_fail(job_id, settings_ref, message))
                return "failed"
            asyncio.run(_mark_retrying(job_id, settings_ref, str(exc)))
            countdown = settings_ref.job_retry_backoff_s * (2**retries)
            log.warning("services unavailable; retrying job in %.1f s: %s", countdown, exc)
            raise self.retry(countdown=countdown) from None
        except RedisError as exc:
            # The job store itself is unreachable (the broker may be elsewhere): the job cannot even
            # be marked, so retry with backoff; its run lock expires, and the run is idempotent.
            if retries >= settings_ref.job_max_retries:
                log.error("Redis unavailable; giving up on job %s: %s", job_id, exc)
                with contextlib.suppress(RedisError):
                    asyncio.run(_fail(job_id, settings_ref, f"the job store (Redis) is unavailable: {exc}"))
                return "failed"
            countdown = settings_ref.job_retry_backoff_s * (2**retries)
            log.warning("Redis unavailable; retrying job in %.1f s: %s", countdown, exc)
            raise self.retry(countdown=countdown) from None

    return app


async def _with_store(settings: GatewaySettings, action) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(settings.redis_url, decode_responses=True)
    try:
        await action(JobStore(client, settings.jobs_dir, settings.job_result_ttl_s))
    finally:
        await client.aclose()


async def _fail(job_id: str, settings: GatewaySettings, message: str) -> None:
    await _with_store(
        settings, lambda s: s.transition(job_id, "failed", error=message, finished_at=time.time())
    )


async def _mark_retrying(job_id: str, settings: GatewaySettings, message: str) -> None:
    await _with_store(settings, lambda s: s.transition(job_id, "retrying", error=message))


def main(argv: list[str] | None = None) -> None:
    """``glmv worker``: one job at a time per process (scale with more processes or replicas)."""
    settings = GatewaySettings()
    setup_logging("worker", settings.log_level, settings.log_format)
    watch_parent()
    app = make_celery(settings)
    app.worker_main(
        [
            "worker",
            "--pool=solo",
            "--concurrency=1",
            "--without-gossip",
            "--without-mingle",
            f"--loglevel={settings.log_level}",
            "-Q",
            "glmv-jobs",
            *(argv or []),
        ]
    )
