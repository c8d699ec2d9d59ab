"""The life of a phone call, shared by every telephony adapter.

A call is one :class:`Conversation` on a session made for it (or resumed): the call profile
(``TELEPHONY_PROFILE``) and the call's own settings over the defaults, server-side turn detection
always on, and the output format the phone side needs. A call holds one of its API key's call
slots (``TELEPHONY_MAX_CALLS_PER_KEY``), is hung up after ``TELEPHONY_MAX_CALL_S``, may start with
a greeting, and leaves its ids and how it ended in the session record (field ``call``).

Adapters report what only they know: when the first frame of a reply went out (for the end of
speech → first audio latency), barge-ins (audio flushed because the caller spoke) and DTMF digits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError
from redis.exceptions import RedisError

from glmv_common.logs import get_logger, kv, log_context
from glmv_gateway import metrics
from glmv_gateway.clients import ServiceClients
from glmv_gateway.conversation.conversation import AudioFormat, Conversation
from glmv_gateway.conversation.events import Event, TurnStarted
from glmv_gateway.schemas import SessionSettings, apply_patch
from glmv_gateway.sessions import PREFIX, SessionNotFound, SessionStore, key_digest
from glmv_gateway.settings import GatewaySettings
from glmv_gateway.versions import VersionUnavailable

log = get_logger("glmv.gateway.telephony")

DTMF_DIGITS = frozenset("0123456789*#ABCD")


class CallRefused(Exception):
    """A call that cannot start; ``reason`` is a short label (metrics), the message says why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def call_settings(
    config: GatewaySettings,
    custom: dict[str, Any] | None,
    output: dict[str, Any],
    base: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A call's session settings: ``base`` (a resumed session's, else the defaults in audio mode),
    the call profile, the call's own settings, then what the phone side needs (server-side turn
    detection, ``output``). Raises CallRefused naming a bad setting."""
    try:
        profile = json.loads(config.telephony_profile) if config.telephony_profile else {}
    except json.JSONDecodeError as exc:
        raise CallRefused("bad_settings", f"TELEPHONY_PROFILE is not JSON: {exc}") from None
    try:
        if base is None:
            settings = apply_patch(SessionSettings().model_dump(mode="json"), {"mode": "audio"})
            settings = apply_patch(settings, profile)
        else:
            settings = dict(base)
        settings = apply_patch(settings, custom or {})
        detection = {**settings["turn_detection"], "type": "server_vad"}  # type: ignore[dict-item]
        return apply_patch(settings, {"turn_detection": detection, "output": output})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "settings"
        raise CallRefused("bad_settings", f"bad call settings: {where}: {first.get('msg')}") from None


@dataclass
class Call:
    """One connected call. Always :meth:`end` it (idempotent)."""

    manager: CallManager
    transport: str
    call_id: str
    api_key: str
    slot: str
    conversation: Conversation
    meta: dict[str, Any]
    started: float = field(default_factory=time.monotonic)
    end_reason: str | None = None
    barge_ins: int = 0
    dtmf_digits: str = ""
    latencies_ms: list[float] = field(default_factory=list)
    _speech_end: dict[str, float] = field(default_factory=dict)  # turn id -> perf_counter
    _sent_audio: set[str] = field(default_factory=set)
    _timer: asyncio.Task[None] | None = None
    _ended: bool = False

    @property
    def session_id(self) -> str:
        return self.conversation.session_id

    def on_event(self, event: Event) -> None:
        """Adapters pass every conversation event here before translating it."""
        if isinstance(event, TurnStarted):
            run = self.conversation.current_turn
            if run is not None and run.turn_id == event.turn_id and run.speech_ended_at is not None:
                self._speech_end[event.turn_id] = run.speech_ended_at

    def audio_sent(self, turn_id: str) -> None:
        """The adapter wrote a frame of ``turn_id``'s reply to the phone side."""
        if turn_id in self._sent_audio:
            return
        self._sent_audio.add(turn_id)
        ended = self._speech_end.pop(turn_id, None)
        if ended is not None:
            seconds = time.perf_counter() - ended
            self.latencies_ms.append(round(seconds * 1000, 1))
            metrics.CALL_SPEECH_END_TO_FIRST_AUDIO.labels(transport=self.transport).observe(seconds)

    def barge_in(self) -> None:
        self.barge_ins += 1
        metrics.CALL_BARGE_INS.labels(transport=self.transport).inc()

    def dtmf(self, digit: str) -> None:
        self.dtmf_digits += digit
        metrics.CALL_DTMF.labels(transport=self.transport).inc()
        with log_context(session_id=self.session_id):
            log.info("dtmf", extra=kv(call_id=self.call_id, digit=digit))

    def start_timer(self, on_expiry: Callable[[], Awaitable[None]], max_s: float | None = None) -> None:
        """Hang up (``on_expiry``) when the call reaches the maximum duration (``max_s`` may only
        lower the configured one)."""
        limit = self.manager.config.telephony_max_call_s
        if max_s is not None and max_s > 0:
            limit = min(limit, max_s)

        async def expire() -> None:
            await asyncio.sleep(limit)
            if self.end_reason is None:
                self.end_reason = "max_duration"
            await on_expiry()

        self._timer = asyncio.create_task(expire())

    async def greet(self, text: str | None = None) -> None:
        """The assistant speaks first: the greeting is a text instruction it answers."""
        greeting = text if text is not None else self.manager.config.telephony_greeting
        if greeting.strip():
            await self.conversation.say(greeting)

    async def end(self, reason: str | None = None) -> None:
        """Hang-up bookkeeping: the reply stops (stored as far as heard), the slot is freed."""
        if self._ended:
            return
        self._ended = True
        self.end_reason = self.end_reason or reason or "hangup"
        if self._timer is not None and self._timer is not asyncio.current_task():
            self._timer.cancel()
        # the caller is gone: a reply still generating or still playing is stored as far as heard
        with contextlib.suppress(Exception):
            await self.conversation.interrupt(by="hangup")
        await self.conversation.close()
        duration = time.monotonic() - self.started
        await self.manager.finish(self, duration)


class CallManager:
    """Starts calls and keeps the process-wide view of the ones connected."""

    def __init__(self, store: SessionStore, clients: ServiceClients, config: GatewaySettings) -> None:
        self.store, self.clients, self.config = store, clients, config
        self.active: dict[str, Call] = {}

    def _slots_key(self, api_key: str) -> str:
        return f"{PREFIX}:apikey-calls:{key_digest(api_key)}"

    async def _take_slot(self, api_key: str, slot: str) -> None:
        key, now = self._slots_key(api_key), time.time()
        horizon = self.config.telephony_max_call_s + 60
        async with self.store.redis.pipeline(transaction=True) as pipe:
            pipe.zremrangebyscore(key, 0, now - horizon)  # calls of a crashed gateway
            pipe.zadd(key, {slot: now})
            pipe.zcard(key)
            pipe.expire(key, int(horizon))
            _, _, count, _ = await pipe.execute()
        limit = self.config.telephony_max_calls_per_key
        if count > limit:
            await self.store.redis.zrem(key, slot)
            raise CallRefused("call_limit", f"this API key already has {limit} calls connected")

    async def _release_slot(self, api_key: str, slot: str) -> None:
        with contextlib.suppress(RedisError):
            await self.store.redis.zrem(self._slots_key(api_key), slot)

    async def _session(
        self, api_key: str, session_id: str | None, custom: dict[str, Any] | None, output: dict[str, Any]
    ) -> str:
        if session_id:
            try:
                session = await self.store.get(session_id, owner=api_key)
            except SessionNotFound:
                raise CallRefused(
                    "not_found", f"session {session_id} not found (expired or deleted)"
                ) from None
            settings = call_settings(self.config, custom, output, base=session.settings)
            await self.store.update_settings(session_id, settings)
            return session_id
        settings = call_settings(self.config, custom, output)
        try:
            versions = self.clients.registry.assign_all()
        except VersionUnavailable as exc:
            raise CallRefused("unavailable", exc.message) from None
        return (await self.store.create(settings, owner=api_key, versions=versions)).id

    async def resume_id(self, transport: str, call_id: str) -> str | None:
        """The session an earlier connection of the same call used (AudioSocket reconnects)."""
        return await self.store.redis.get(f"{PREFIX}:call:{transport}:{call_id}")

    async def start(
        self,
        transport: str,
        call_id: str,
        *,
        input_format: AudioFormat,
        output: dict[str, Any],
        api_key: str | None = None,
        session_id: str | None = None,
        custom_settings: dict[str, Any] | None = None,
        meta: dict[str, Any] | None = None,
        remember: bool = False,
    ) -> Call:
        """Take a call slot, make (or resume) the session and open its conversation. Raises
        CallRefused (nothing is left taken). ``remember``: map ``call_id`` to the session so a
        reconnect of the same call resumes it."""
        key = api_key or self.config.call_api_key()
        if not key:
            raise CallRefused("no_api_key", "no API key for phone calls: set TELEPHONY_API_KEY or API_KEYS")
        slot = f"{transport}:{call_id}:{uuid.uuid4().hex[:8]}"
        try:
            await self._take_slot(key, slot)
        except RedisError as exc:
            raise CallRefused("unavailable", f"the session store (Redis) is unavailable: {exc}") from None
        try:
            sid = await self._session(key, session_id, custom_settings, output)
            conversation = await Conversation.open(
                self.store,
                self.clients,
                self.config,
                sid,
                key,
                transport=transport,
                input_format=input_format,
            )
        except CallRefused:
            await self._release_slot(key, slot)
            raise
        except (RedisError, SessionNotFound) as exc:
            await self._release_slot(key, slot)
            raise CallRefused("unavailable", f"the call's session could not be opened: {exc}") from None
        except BaseException:
            await self._release_slot(key, slot)
            raise
        record = {
            "transport": transport,
            "call_id": call_id,
            **(meta or {}),
            "started_at": time.time(),
        }
        call = Call(self, transport, call_id, key, slot, conversation, record)
        self.active[slot] = call
        metrics.ACTIVE_CALLS.labels(transport=transport).inc()
        with contextlib.suppress(RedisError):
            await self.store.annotate(sid, "call", record)
            if remember:
                await self.store.redis.set(
                    f"{PREFIX}:call:{transport}:{call_id}", sid, ex=self.config.session_ttl_s
                )
        with log_context(session_id=sid):
            log.info("call connected", extra=kv(transport=transport, call_id=call_id))
        return call

    async def finish(self, call: Call, duration: float) -> None:
        self.active.pop(call.slot, None)
        metrics.ACTIVE_CALLS.labels(transport=call.transport).dec()
        metrics.CALLS.labels(transport=call.transport, end=call.end_reason or "hangup").inc()
        metrics.CALL_SECONDS.labels(transport=call.transport).observe(duration)
        await self._release_slot(call.api_key, call.slot)
        record = {
            **call.meta,
            "ended_at": time.time(),
            "end": call.end_reason,
            "duration_s": round(duration, 3),
            "turns": call.conversation.turns_started,
            "barge_ins": call.barge_ins,
            "dtmf": call.dtmf_digits,
            "speech_end_to_first_audio_ms": call.latencies_ms,
        }
        with contextlib.suppress(RedisError):
            await self.store.annotate(call.session_id, "call", record)
        with log_context(session_id=call.session_id):
            log.info(
                "call ended",
                extra=kv(
                    transport=call.transport,
                    call_id=call.call_id,
                    end=call.end_reason,
                    duration_s=round(duration, 1),
                    turns=call.conversation.turns_started,
                    barge_ins=call.barge_ins,
                ),
            )

    async def close(self) -> None:
        """Process shutdown: end every call still connected."""
        for call in list(self.active.values()):
            await call.end("shutdown")
