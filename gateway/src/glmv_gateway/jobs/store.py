"""Job metadata in Redis (``glmv:job:{id}`` hash, TTL = result TTL) and job files on a shared directory.

Hash fields: ``state`` (queued | running | retrying | done | failed | cancelled), ``progress`` (0-100),
``owner`` (sha256 of the submitting API key), ``input`` (JSON: kind, text or audio file), ``options``
(JSON session settings), ``webhook_url``, ``webhook`` (none | pending | delivered | failed),
``attempts``, ``error``, ``created_at``, ``started_at``, ``finished_at``, ``result`` (JSON: text,
end reason, usage, timings, audio_samples, sample_rate).

Files: ``{jobs_dir}/{id}/input.wav`` (the decoded upload, mono), ``reply.wav``, ``transcript.json``;
written atomically (temp file + rename) so a redelivered job never leaves two results.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

JOB_ID = re.compile(r"[0-9a-f]{32}")
TERMINAL = frozenset({"done", "failed", "cancelled"})


def job_key(job_id: str) -> str:
    return f"glmv:job:{job_id}"


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class JobStore:
    def __init__(self, client: aioredis.Redis, jobs_dir: str | Path, ttl_s: int) -> None:
        self.redis = client
        self.dir = Path(jobs_dir)
        self.ttl_s = ttl_s

    def job_dir(self, job_id: str) -> Path:
        return self.dir / job_id

    async def create(self, fields: dict[str, Any]) -> str:
        job_id = uuid.uuid4().hex
        now = time.time()
        mapping = {
            "state": "queued",
            "progress": 0,
            "attempts": 0,
            "created_at": now,
            "error": "",
            **{k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in fields.items()},
        }
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(job_key(job_id), mapping=mapping)
            pipe.expire(job_key(job_id), self.ttl_s)
            await pipe.execute()
        return job_id

    async def get(self, job_id: str) -> dict[str, Any] | None:
        if not JOB_ID.fullmatch(job_id):  # never another key (``<id>:run``) nor another directory
            return None
        data = await self.redis.hgetall(job_key(job_id))
        if not data:
            return None
        for field in ("input", "options", "result"):
            if data.get(field):
                data[field] = json.loads(data[field])
        return data

    async def update(self, job_id: str, **fields: Any) -> None:
        mapping = {k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in fields.items()}
        await self.redis.hset(job_key(job_id), mapping=mapping)

    async def transition(
        self, job_id: str, to: str, *, unless: frozenset[str] = TERMINAL, **fields: Any
    ) -> bool:
        """Set the state unless the job is already in one of ``unless``; returns whether it changed."""
        script = """
        local state = redis.call('hget', KEYS[1], 'state')
        if not state then return 0 end
        for i = 2, #ARGV do if state == ARGV[i] then return 0 end end
        redis.call('hset', KEYS[1], 'state', ARGV[1])
        return 1
        """
        changed = await self.redis.eval(script, 1, job_key(job_id), to, *sorted(unless))
        if changed and fields:
            await self.update(job_id, **fields)
        return bool(changed)

    async def claim_run(self, job_id: str, runner: str, ttl_s: int) -> bool:
        return bool(await self.redis.set(f"{job_key(job_id)}:run", runner, nx=True, ex=ttl_s))

    async def refresh_run(self, job_id: str, runner: str, ttl_s: int) -> None:
        script = (
            "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('expire', KEYS[1], ARGV[2]) end"
        )
        await self.redis.eval(script, 1, f"{job_key(job_id)}:run", runner, ttl_s)

    async def release_run(self, job_id: str, runner: str) -> None:
        script = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end"
        await self.redis.eval(script, 1, f"{job_key(job_id)}:run", runner)

    def sweep_expired_files(self) -> int:
        """Delete job directories older than the TTL (their metadata has expired too)."""
        if not self.dir.exists():
            return 0
        removed = 0
        cutoff = time.time() - self.ttl_s
        for entry in self.dir.iterdir():
            if entry.is_dir() and entry.stat().st_mtime < cutoff:
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
        return removed
