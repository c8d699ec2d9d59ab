"""Sessions in Redis: settings, history of turns, one-turn-at-a-time locks, per-key turn slots.

Schema (all keys expire ``session_ttl_s`` after the last use; no audio is ever stored):

* ``glmv:session:{id}``        hash: ``settings`` (JSON), ``created_at``, ``updated_at`` (unix seconds),
                               ``turns`` (count of stored turns), ``owner`` (sha256 of the API key
                               that created it: other keys see the session as not found),
                               ``versions`` (JSON ``{"tokenizer": id, "decoder": id}``: the component
                               versions the session is pinned to for its whole life),
                               ``call`` (JSON, phone sessions: transport, call ids, end; see ``annotate``)
* ``glmv:session:{id}:turns``  list of JSON turns, oldest first:
                               ``{"turn_id", "user": {"kind": "audio"|"text", "tokens"|"text"},
                                  "assistant": {"ids", "text", "audio_tokens", "end_reason", "partial"},
                                  "timings": {...}, "created_at"}``
* ``glmv:session:{id}:lock``   the running turn's id; ``SET NX PX lock_ttl`` so a crashed gateway
                               frees the session after the TTL
* ``glmv:session:{id}:running`` the running turn's id too, but kept for the session's TTL: a turn
                               that finds it while the lock is free knows the previous turn never
                               released its lock (its gateway died) and reports it
* ``glmv:apikey-turns:{hash}`` sorted set of running turn ids per API key (score = start time)
* ``glmv:apikeys``             set of sha256 hex digests of API keys accepted besides the env ones
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from redis.exceptions import WatchError

if TYPE_CHECKING:
    from glmv_gateway.versions import VersionRegistry

from glmv_common.logs import get_logger, kv
from glmv_gateway import metrics

PREFIX = "glmv"
log = get_logger("glmv.sessions")

# Session ids are what :meth:`SessionStore.create` makes: 32 lowercase hex digits. Anything else (a
# ``:`` in particular) could name another key, so it is refused before Redis is asked.
SESSION_ID = re.compile(r"[0-9a-f]{32}")

_RELEASE_LOCK = """
if redis.call('get', KEYS[2]) == ARGV[1] then redis.call('del', KEYS[2]) end
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end
"""

# KEYS: lock, running marker; ARGV: turn id, lock TTL (s), marker TTL (s).
# Returns {1, id of a turn that never released its lock, or false} or {0, lock's remaining ms}.
_ACQUIRE_LOCK = """
if redis.call('set', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
  local previous = redis.call('get', KEYS[2])
  redis.call('set', KEYS[2], ARGV[1], 'EX', ARGV[3])
  return {1, previous}
end
return {0, redis.call('pttl', KEYS[1])}
"""


# rewrite a session's versions only while it exists (a concurrent delete must not leave a stub behind)
_SET_VERSIONS = """
if redis.call('exists', KEYS[1]) == 1 then return redis.call('hset', KEYS[1], 'versions', ARGV[1]) end
return 0
"""


class SessionNotFound(LookupError):
    pass


def valid_session_id(session_id: str) -> bool:
    return isinstance(session_id, str) and SESSION_ID.fullmatch(session_id) is not None


class SessionBusy(RuntimeError):
    def __init__(self, session_id: str, expires_in_s: float | None = None) -> None:
        when = f"; its lock expires in {expires_in_s:.1f} s at the latest" if expires_in_s else ""
        super().__init__(f"session {session_id} already has a turn running{when}")
        self.expires_in_s = expires_in_s


class TooManyTurns(RuntimeError):
    pass


def key_digest(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


@dataclass
class Session:
    id: str
    settings: dict[str, Any]
    created_at: float
    updated_at: float
    turns: int
    versions: dict[str, str] = field(default_factory=dict)
    # ``session.version_moved`` events of this load (a pinned version disappeared or failed)
    events: list[dict[str, Any]] = field(default_factory=list)

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "settings": self.settings,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "turns": self.turns,
            "versions": self.versions,
        }


class SessionStore:
    def __init__(
        self, client: aioredis.Redis, ttl_s: int, lock_ttl_s: int, versions: VersionRegistry | None = None
    ) -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self.lock_ttl_s = lock_ttl_s
        self.versions = versions  # with it, ``get`` keeps every session on a live version
        self._release = client.register_script(_RELEASE_LOCK)
        self._set_versions = client.register_script(_SET_VERSIONS)
        self._acquire = client.register_script(_ACQUIRE_LOCK)

    @classmethod
    def from_url(
        cls,
        url: str,
        ttl_s: int,
        lock_ttl_s: int,
        timeout_s: float = 5.0,
        versions: VersionRegistry | None = None,
    ) -> SessionStore:
        # Bounded waits: an unreachable or hung Redis fails a request in seconds (a 503), never hangs it.
        client = aioredis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            health_check_interval=30,
        )
        return cls(client, ttl_s, lock_ttl_s, versions)

    @staticmethod
    def _key(session_id: str, suffix: str = "") -> str:
        if not valid_session_id(session_id):
            raise SessionNotFound(session_id)
        return f"{PREFIX}:session:{session_id}{':' + suffix if suffix else ''}"

    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    async def create(
        self, settings: dict[str, Any], owner: str = "", versions: dict[str, str] | None = None
    ) -> Session:
        """``versions``: the component versions assigned to the session (see ``VersionRegistry``)."""
        session_id = uuid.uuid4().hex
        now = time.time()
        key = self._key(session_id)
        versions = dict(versions or {})
        mapping = {
            "settings": json.dumps(settings),
            "created_at": now,
            "updated_at": now,
            "turns": 0,
            "versions": json.dumps(versions),
        }
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={**mapping, "owner": key_digest(owner) if owner else ""})
            pipe.expire(key, self.ttl_s)
            await pipe.execute()
        if self.versions is not None:
            self.versions.remember(session_id, versions)
        return Session(session_id, settings, now, now, 0, versions)

    async def get(self, session_id: str, *, owner: str | None = None, touch: bool = True) -> Session:
        """``owner``: the caller's API key; a session created with another key is not found."""
        key = self._key(session_id)
        data = await self.redis.hgetall(key)
        if not data:
            raise SessionNotFound(session_id)
        if owner is not None and data.get("owner") and data["owner"] != key_digest(owner):
            raise SessionNotFound(session_id)
        if touch:
            await self._touch(session_id)
        session = Session(
            session_id,
            json.loads(data["settings"]),
            float(data["created_at"]),
            float(data["updated_at"]),
            int(data.get("turns", 0)),
            json.loads(data.get("versions") or "{}"),
        )
        if self.versions is not None:
            versions, session.events = self.versions.resolve(session_id, session.versions)
            if versions != session.versions:
                await self._set_versions(keys=[key], args=[json.dumps(versions)])
                session.versions = versions
        return session

    async def _touch(self, session_id: str) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.expire(self._key(session_id), self.ttl_s)
            pipe.expire(self._key(session_id, "turns"), self.ttl_s)
            await pipe.execute()

    async def update_settings(self, session_id: str, settings: dict[str, Any]) -> Session:
        session = await self.get(session_id, touch=False)
        now = time.time()
        await self.redis.hset(
            self._key(session_id), mapping={"settings": json.dumps(settings), "updated_at": now}
        )
        session.settings, session.updated_at = settings, now
        return session

    async def annotate(self, session_id: str, name: str, value: dict[str, Any]) -> None:
        """Keep ``value`` (JSON) in the session record's field ``name`` (e.g. a phone call's ids)."""
        await self.redis.hset(self._key(session_id), name, json.dumps(value))

    async def annotation(self, session_id: str, name: str) -> dict[str, Any] | None:
        raw = await self.redis.hget(self._key(session_id), name)
        return json.loads(raw) if raw else None

    async def delete(self, session_id: str) -> None:
        removed = await self.redis.delete(
            self._key(session_id),
            self._key(session_id, "turns"),
            self._key(session_id, "lock"),
            self._key(session_id, "running"),
        )
        if self.versions is not None:
            self.versions.forget(session_id)
        if not removed:
            raise SessionNotFound(session_id)

    async def history(self, session_id: str) -> list[dict[str, Any]]:
        return [json.loads(t) for t in await self.redis.lrange(self._key(session_id, "turns"), 0, -1)]

    async def append_turn(self, session_id: str, turn: dict[str, Any]) -> None:
        turns_key = self._key(session_id, "turns")
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.rpush(turns_key, json.dumps(turn))
            pipe.hincrby(self._key(session_id), "turns", 1)
            pipe.hset(self._key(session_id), "updated_at", time.time())
            pipe.expire(turns_key, self.ttl_s)
            pipe.expire(self._key(session_id), self.ttl_s)
            await pipe.execute()

    async def replace_turn(self, session_id: str, turn_id: str, turn: dict[str, Any] | None) -> bool:
        """Replace (``turn``) or remove (``None``) the stored turn ``turn_id``; False if absent.
        Optimistic: retried if the history changes meanwhile."""
        turns_key = self._key(session_id, "turns")
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(turns_key)
                    stored = await pipe.lrange(turns_key, 0, -1)
                    index = next(
                        (i for i, raw in enumerate(stored) if json.loads(raw).get("turn_id") == turn_id), None
                    )
                    if index is None:
                        await pipe.unwatch()
                        return False
                    pipe.multi()
                    if turn is None:
                        pipe.lset(turns_key, index, "__removed__")
                        pipe.lrem(turns_key, 1, "__removed__")
                        pipe.hincrby(self._key(session_id), "turns", -1)
                    else:
                        pipe.lset(turns_key, index, json.dumps(turn))
                    pipe.hset(self._key(session_id), "updated_at", time.time())
                    await pipe.execute()
                    return True
                except WatchError:
                    continue

    # --- one turn at a time per session ----------------------------------------------------------

    async def acquire_turn(self, session_id: str, turn_id: str) -> str | None:
        """Take the session's lock; returns the id of an earlier turn that never released it (its
        gateway died mid-turn and the lock expired), which is logged and counted here."""
        keys = [self._key(session_id, "lock"), self._key(session_id, "running")]
        taken, detail = await self._acquire(keys=keys, args=[turn_id, self.lock_ttl_s, self.ttl_s])
        if not taken:
            raise SessionBusy(session_id, detail / 1000 if isinstance(detail, int) and detail > 0 else None)
        if detail:
            metrics.INTERRUPTED_TURNS.inc()
            log.warning(
                "turn %s of session %s never finished (its gateway stopped mid-turn); its lock expired",
                detail,
                session_id,
                extra=kv(session_id=session_id, interrupted_turn_id=detail),
            )
        return detail or None

    async def release_turn(self, session_id: str, turn_id: str) -> None:
        keys = [self._key(session_id, "lock"), self._key(session_id, "running")]
        await self._release(keys=keys, args=[turn_id])

    # --- concurrent turns per API key --------------------------------------------------------------

    async def acquire_key_slot(self, api_key: str, turn_id: str, limit: int) -> None:
        key = f"{PREFIX}:apikey-turns:{key_digest(api_key)}"
        now = time.time()
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zremrangebyscore(key, 0, now - self.lock_ttl_s)  # slots of crashed gateways
            pipe.zadd(key, {turn_id: now})
            pipe.zcard(key)
            pipe.expire(key, self.lock_ttl_s)
            _, _, count, _ = await pipe.execute()
        if count > limit:
            await self.redis.zrem(key, turn_id)
            raise TooManyTurns(f"this API key already runs {limit} turns")

    async def release_key_slot(self, api_key: str, turn_id: str) -> None:
        await self.redis.zrem(f"{PREFIX}:apikey-turns:{key_digest(api_key)}", turn_id)

    # --- API keys stored in Redis --------------------------------------------------------------------

    async def add_api_key(self, api_key: str) -> None:
        await self.redis.sadd(f"{PREFIX}:apikeys", key_digest(api_key))

    async def has_api_key(self, api_key: str) -> bool:
        return bool(await self.redis.sismember(f"{PREFIX}:apikeys", key_digest(api_key)))
