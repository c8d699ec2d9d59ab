"""Run one job through the turn pipeline: fresh session → admission → reply events → results.

Raised :class:`ServiceUnavailable` means "try again later" (the Celery task retries with backoff);
every other outcome is final and recorded in the job's metadata.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from typing import Any

from glmv_common import audio as audio_io
from glmv_common.logs import get_logger, kv, log_context
from glmv_gateway.clients import ServiceClients
from glmv_gateway.conversation import TurnRejected, UserInput, prepare_turn
from glmv_gateway.conversation.audio_out import ReplyAudio
from glmv_gateway.conversation.events import AudioDelta, ErrorEvent, TurnDone
from glmv_gateway.jobs.store import TERMINAL, JobStore, job_key, write_atomic
from glmv_gateway.jobs.webhook import deliver
from glmv_gateway.sessions import SessionStore
from glmv_gateway.settings import GatewaySettings

log = get_logger("glmv.jobs")
RUN_LOCK_TTL_S = 10
HEARTBEAT_S = 3


class ServiceUnavailable(Exception):
    def __init__(self, component: str | None, message: str) -> None:
        super().__init__(f"{component or 'a model service'} unavailable: {message}")
        self.component = component


class JobBusy(Exception):
    """Another live worker runs this job (a duplicate delivery); try again later."""


class JobCancelled(Exception):
    pass


def load_input(store: JobStore, job_id: str, job: dict[str, Any]) -> UserInput:
    spec = job["input"]
    if spec["kind"] == "text":
        return UserInput(text=spec["text"])
    samples, rate = audio_io.decode_file((store.job_dir(job_id) / "input.wav").read_bytes())
    return UserInput(audio=audio_io.first_channel(samples), sample_rate=rate)


async def run_job(job_id: str, settings: GatewaySettings) -> str:
    """Returns the final state. Raises ServiceUnavailable / JobBusy for a retry."""
    with log_context(request_id=job_id):
        # the job's session gets a version of each component (by weight) when it is first loaded
        clients = ServiceClients.from_settings(settings)
        sessions = SessionStore.from_url(
            settings.redis_url,
            settings.job_result_ttl_s,
            settings.lock_ttl_s,
            settings.redis_timeout_s,
            versions=clients.registry,
        )
        jobs = JobStore(sessions.redis, settings.jobs_dir, settings.job_result_ttl_s)
        await clients.registry.probe()
        try:
            return await _run(job_id, settings, sessions, jobs, clients)
        finally:
            await clients.close()
            await sessions.redis.aclose()


async def _run(
    job_id: str,
    settings: GatewaySettings,
    sessions: SessionStore,
    jobs: JobStore,
    clients: ServiceClients,
) -> str:
    jobs.sweep_expired_files()
    job = await jobs.get(job_id)
    if job is None:
        log.warning("job expired or unknown; dropping it")
        return "missing"
    if job["state"] in TERMINAL:
        # a redelivery of a finished job: only an undelivered webhook may remain to send
        if job["state"] == "done" and job.get("webhook") == "pending":
            await send_webhook(job_id, jobs, settings)
        return job["state"]
    runner = uuid.uuid4().hex
    if not await jobs.claim_run(job_id, runner, RUN_LOCK_TTL_S):
        raise JobBusy(job_id)
    heartbeat = asyncio.create_task(_heartbeat(jobs, job_id, runner))
    try:
        await jobs.redis.hincrby(job_key(job_id), "attempts", 1)
        await jobs.update(job_id, state="running", started_at=time.time())
        state = await _generate(job_id, job, settings, sessions, jobs, clients)
    finally:
        heartbeat.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await heartbeat
        await jobs.release_run(job_id, runner)
    if state == "done" and job.get("webhook_url"):
        await send_webhook(job_id, jobs, settings)
    return state


async def _heartbeat(jobs: JobStore, job_id: str, runner: str) -> None:
    while True:
        await asyncio.sleep(HEARTBEAT_S)
        await jobs.refresh_run(job_id, runner, RUN_LOCK_TTL_S)


async def _generate(
    job_id: str,
    job: dict[str, Any],
    settings: GatewaySettings,
    sessions: SessionStore,
    jobs: JobStore,
    clients: ServiceClients,
) -> str:
    user_input = load_input(jobs, job_id, job)
    session = await sessions.create(job.get("options") or {}, owner=f"job:{job_id}")
    max_tokens = int((job.get("options") or {}).get("max_new_tokens") or 2000)
    try:
        try:
            run = await prepare_turn(
                sessions,
                clients,
                settings,
                session_id=session.id,
                api_key=f"job:{job_id}",
                user_input=user_input,
            )
        except TurnRejected as exc:
            if exc.status in (503, 504):
                raise ServiceUnavailable(exc.component, exc.message) from None
            await jobs.transition(job_id, "failed", error=exc.message, finished_at=time.time())
            return "failed"
        audio = ReplyAudio()
        done: dict[str, Any] = {}
        error: ErrorEvent | None = None
        last_check = time.monotonic()
        events = run.events()
        try:
            async for event in events:
                if isinstance(event, AudioDelta):
                    audio.add(event)
                elif isinstance(event, ErrorEvent) and event.component != "redis":
                    error = event  # (a job's throwaway session history not being saved is no error)
                elif isinstance(event, TurnDone):
                    done = event.to_wire()
                if time.monotonic() - last_check > 0.5:
                    last_check = time.monotonic()
                    current = await jobs.get(job_id)
                    if current is None or current["state"] == "cancelled":
                        raise JobCancelled(job_id)
                    generated = len(run.state.ids)
                    await jobs.update(job_id, progress=min(99, int(100 * generated / max_tokens)))
        except JobCancelled:
            log.info("job cancelled while running")
            return "cancelled"
        finally:
            await events.aclose()
        if error is not None:
            if error.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
                raise ServiceUnavailable(error.component, error.message)
            message = f"{error.component}: {error.code}: {error.message}"
            await jobs.transition(job_id, "failed", error=message, finished_at=time.time())
            return "failed"
        rate = run.admitted.settings.output.sample_rate
        pcm = audio.pcm()
        directory = jobs.job_dir(job_id)
        directory.mkdir(parents=True, exist_ok=True)
        transcript = {
            "job_id": job_id,
            "text": done.get("text", ""),
            "end_reason": done.get("end_reason"),
            "usage": done.get("usage", {}),
            "timings": done.get("timings", {}),
            "audio_samples": int(pcm.size),
            "sample_rate": rate,
        }
        write_atomic(directory / "reply.wav", audio_io.encode_wav(pcm, rate))
        write_atomic(directory / "transcript.json", json.dumps(transcript, ensure_ascii=False).encode())
        changed = await jobs.transition(
            job_id,
            "done",
            progress=100,
            result=transcript,
            finished_at=time.time(),
            webhook="pending" if job.get("webhook_url") else "none",
        )
        log.info("job done", extra=kv(audio_samples=int(pcm.size), end_reason=transcript["end_reason"]))
        return "done" if changed else (await jobs.get(job_id) or {}).get("state", "done")
    finally:
        with contextlib.suppress(Exception):
            await sessions.delete(session.id)


async def send_webhook(job_id: str, jobs: JobStore, settings: GatewaySettings) -> None:
    job = await jobs.get(job_id)
    if job is None or not job.get("webhook_url"):
        return
    payload = {
        "job_id": job_id,
        "state": job["state"],
        "result": job.get("result"),
        "error": job.get("error") or None,
        "audio_url": f"/v1/jobs/{job_id}/audio",
        "transcript_url": f"/v1/jobs/{job_id}/transcript",
    }
    ok, status = await deliver(
        job["webhook_url"],
        payload,
        secret=settings.webhook_secret,
        policy=settings.webhook_policy(),
        retries=settings.webhook_retries,
        backoff_s=settings.webhook_backoff_s,
    )
    await jobs.update(job_id, webhook="delivered" if ok else "failed", webhook_status=status)
