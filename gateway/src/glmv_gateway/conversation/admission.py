"""Admission: everything that can still refuse a turn before anything is generated.

Order: the session must exist and belong to the key; the session's lock (one turn at a time per
session); then the API key's turn slot (taken after the lock, so a burst of commits on one busy
session is answered 409 and never takes the key's other sessions' slots); then the user's input is
tokenized (if it was not while it streamed in) and the history loaded. Whatever fails releases what
was taken.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import ValidationError

from glmv_common import audio as audio_io
from glmv_gateway import metrics
from glmv_gateway.clients import ComponentError, ServiceClients
from glmv_gateway.conversation.errors import TurnRejected
from glmv_gateway.schemas import MAX_TEXT_CHARS, SessionSettings, apply_patch
from glmv_gateway.sessions import SessionBusy, SessionNotFound, SessionStore, TooManyTurns
from glmv_gateway.settings import GatewaySettings


@dataclass
class UserInput:
    """What the user said: text, mono float32 audio at ``sample_rate``, or audio already tokenized
    while it streamed in (``tokens``, with ``tokenize_ms`` spent after the end of speech)."""

    text: str | None = None
    audio: np.ndarray | None = None
    sample_rate: int = 0
    tokens: list[int] | None = None
    tokenize_ms: float | None = None

    @property
    def kind(self) -> str:
        return "text" if self.text is not None else "audio"


def merge_inputs(inputs: list[UserInput]) -> UserInput:
    """Several user items answered by one reply: texts joined by newlines, or speech tokens
    concatenated. GLM-4-Voice's user turn is either text or speech, so mixing them is refused."""
    if not inputs:
        raise TurnRejected("invalid_request", "there is no user input to respond to")
    if len(inputs) == 1:
        return inputs[0]
    kinds = {i.kind for i in inputs}
    if kinds == {"text"}:
        return UserInput(text="\n".join(i.text or "" for i in inputs))
    if any(i.tokens is None for i in inputs) or kinds != {"audio"}:
        raise TurnRejected(
            "invalid_request", "one reply answers either text or speech items; respond between them"
        )
    tokens = [t for i in inputs for t in (i.tokens or [])]
    return UserInput(tokens=tokens, tokenize_ms=inputs[-1].tokenize_ms)


def check_text(text: object) -> str:
    """The rules every transport applies to a text turn."""
    if not isinstance(text, str) or not text.strip():
        raise TurnRejected("invalid_request", "text input is empty")
    if len(text) > MAX_TEXT_CHARS:
        raise TurnRejected(
            "too_large", f"text input is {len(text)} characters; the limit is {MAX_TEXT_CHARS}"
        )
    return text


@dataclass
class Admitted:
    """A turn that passed admission: it holds the session lock and a key slot until released."""

    store: SessionStore
    session_id: str
    api_key: str
    turn_id: str
    settings: SessionSettings
    record: dict[str, Any]  # the session record's public fields (settings, versions, ...)
    user: dict[str, Any]
    history: list[dict[str, Any]]
    started: float
    timings: dict[str, float]
    notices: list[dict[str, Any]] = field(default_factory=list)  # e.g. session.version_moved
    _released: bool = False

    async def release(self) -> None:
        if self._released:
            return
        self._released = True
        with contextlib.suppress(Exception):
            await self.store.release_key_slot(self.api_key, self.turn_id)
        with contextlib.suppress(Exception):
            await self.store.release_turn(self.session_id, self.turn_id)


async def admit(
    store: SessionStore,
    clients: ServiceClients,
    config: GatewaySettings,
    *,
    session_id: str,
    api_key: str,
    user_input: UserInput,
    overrides: dict[str, Any] | None = None,
) -> Admitted:
    """Take the lock and the slot, tokenize, load history. Raises :class:`TurnRejected`.
    ``overrides``: settings changed for this turn only (a session-settings patch)."""
    started = time.perf_counter()
    turn_id = uuid.uuid4().hex
    try:
        session = await store.get(session_id, owner=api_key)
    except SessionNotFound:
        raise TurnRejected("not_found", f"session {session_id} not found (expired or deleted)") from None
    try:
        settings = SessionSettings.model_validate(apply_patch(session.settings, overrides or {}))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "settings"
        raise TurnRejected(
            "invalid_request", f"bad settings for this turn: {where}: {first.get('msg')}"
        ) from None
    if user_input.audio is not None:
        seconds = len(user_input.audio) / user_input.sample_rate
        if seconds > config.max_audio_seconds:
            raise TurnRejected(
                "too_large", f"audio is {seconds:.1f} s long; the limit is {config.max_audio_seconds:.0f} s"
            )
    if user_input.text is not None:
        check_text(user_input.text)
    try:
        await store.acquire_turn(session_id, turn_id)
    except SessionBusy:
        raise TurnRejected("busy", f"session {session_id} already has a turn running") from None
    admitted = Admitted(
        store=store,
        session_id=session_id,
        api_key=api_key,
        turn_id=turn_id,
        settings=settings,
        record=session.public(),
        user={},
        history=[],
        started=started,
        timings={},
        notices=list(session.events),
    )
    try:
        try:
            await store.acquire_key_slot(api_key, turn_id, config.max_turns_per_key)
        except TooManyTurns as exc:
            raise TurnRejected("rate_limited", str(exc)) from None
        if user_input.text is not None:
            admitted.user = {"kind": "text", "text": user_input.text}
        elif user_input.tokens is not None:
            admitted.timings["tokenize_ms"] = user_input.tokenize_ms or 0.0
            if not user_input.tokens:
                raise TurnRejected("no_speech", "the audio produced no speech tokens")
            admitted.user = {"kind": "audio", "tokens": list(user_input.tokens)}
        else:
            admitted.user = {
                "kind": "audio",
                "tokens": await _tokenize(clients, config, admitted, user_input),
            }
        admitted.history = await store.history(session_id)
        return admitted
    except BaseException:
        await admitted.release()
        raise


async def _tokenize(
    clients: ServiceClients, config: GatewaySettings, admitted: Admitted, user_input: UserInput
) -> list[int]:
    assert user_input.audio is not None
    chunk = audio_io.to_audio_chunk(user_input.audio, user_input.sample_rate, audio_io.Encoding.PCM16)
    t0 = time.perf_counter()
    try:
        reply = await clients.tokenize(
            chunk,
            request_id=admitted.turn_id,
            session_id=admitted.session_id,
            timeout=config.tokenize_timeout_s,
        )
    except ComponentError as exc:
        metrics.ERRORS.labels("tokenizer", exc.code.name).inc()
        raise TurnRejected.from_component(exc, "tokenizer") from None
    admitted.timings["tokenize_ms"] = round((time.perf_counter() - t0) * 1000, 1)
    metrics.STAGE_SECONDS.labels("tokenize").observe(admitted.timings["tokenize_ms"] / 1000)
    if not reply.tokens:
        raise TurnRejected("no_speech", "the audio produced no speech tokens")
    return list(reply.tokens)
