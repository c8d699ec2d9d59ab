"""One turn after admission: the prompt, the reply pump, the record, the events.

``TurnRun.events`` yields ``turn.started``, the reply's text and audio deltas, any error, and
``turn.done``. Whatever way it ends (end token, caps, a failing service, the consumer closing the
iterator, a barge-in cancelling the task) the streams are cancelled, what was generated is stored
(cut to what the listener heard when the reply was stopped) and the lock and slot are released.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from glmv_common.logs import get_logger, kv, log_context
from glmv_gateway import metrics
from glmv_gateway.clients import ServiceClients
from glmv_gateway.conversation.admission import Admitted
from glmv_gateway.conversation.errors import component_error_event, error_event
from glmv_gateway.conversation.events import (
    AudioDelta,
    Event,
    TextDelta,
    TurnDone,
    TurnInput,
    TurnStarted,
    VersionMoved,
)
from glmv_gateway.conversation.pump import ReplyPump
from glmv_gateway.conversation.record import END_REASONS, ReplyState, store_turn
from glmv_gateway.settings import GatewaySettings
from glmvoice.v1 import lm_pb2

log = get_logger("glmv.gateway.turn")


def user_turn(user: dict[str, Any]) -> lm_pb2.Turn:
    if user["kind"] == "text":
        return lm_pb2.Turn(role=lm_pb2.Turn.ROLE_USER, text=user["text"])
    return lm_pb2.Turn(role=lm_pb2.Turn.ROLE_USER, audio=lm_pb2.SpeechTokens(tokens=user["tokens"]))


def lm_request(admitted: Admitted) -> lm_pb2.GenerateRequest:
    """The structured prompt: system settings, the stored history (assistant turns as the ids that
    were kept), the new user turn."""
    turns = []
    for past in admitted.history:
        turns.append(user_turn(past["user"]))
        turns.append(
            lm_pb2.Turn(
                role=lm_pb2.Turn.ROLE_ASSISTANT, generated=lm_pb2.TokenIds(ids=past["assistant"]["ids"])
            )
        )
    turns.append(user_turn(admitted.user))
    first_kind = admitted.history[0]["user"]["kind"] if admitted.history else admitted.user["kind"]
    s = admitted.settings
    mode = s.mode or first_kind
    sampling = lm_pb2.SamplingParams(
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        repetition_penalty=s.repetition_penalty,
        max_new_tokens=s.max_new_tokens,
    )
    if s.seed is not None:
        sampling.seed = s.seed
    if s.max_audio_tokens is not None:
        sampling.max_audio_tokens = s.max_audio_tokens
    style = lm_pb2.Style(**{k: v for k, v in s.style.model_dump().items() if v})
    return lm_pb2.GenerateRequest(
        mode=lm_pb2.INPUT_MODE_TEXT if mode == "text" else lm_pb2.INPUT_MODE_AUDIO,
        turns=turns,
        style=style,
        sampling=sampling,
        request_id=admitted.turn_id,
        session_id=admitted.session_id,
    )


class TurnRun:
    """An admitted turn; iterate :meth:`events` exactly once."""

    def __init__(
        self,
        clients: ServiceClients,
        config: GatewaySettings,
        admitted: Admitted,
        *,
        speech_ended_at: float | None = None,
        audio: bool = True,
        store: bool = True,
    ) -> None:
        """``audio=False``: text only, no decoder stream. ``store=False``: out of band, the turn is
        not added to the session's history."""
        self.clients, self.config, self.admitted = clients, config, admitted
        self.audio, self.store = audio, store
        self.state = ReplyState(sample_rate=admitted.settings.output.sample_rate)
        self.speech_ended_at = speech_ended_at  # perf_counter() at the end of the user's speech
        self.record: dict[str, Any] | None = None
        self.cancelled = False

    @property
    def turn_id(self) -> str:
        return self.admitted.turn_id

    @property
    def session_id(self) -> str:
        return self.admitted.session_id

    def played(self, samples: int) -> None:
        """How much of this reply (output-rate samples) the listener has heard so far."""
        self.state.heard_samples = samples

    async def events(self) -> AsyncIterator[Event]:
        with log_context(session_id=self.session_id, turn_id=self.turn_id):
            metrics.ACTIVE_TURNS.inc()
            try:
                async for event in self._events():
                    yield event
            finally:
                metrics.ACTIVE_TURNS.dec()

    async def _events(self) -> AsyncIterator[Event]:
        admitted, state = self.admitted, self.state
        pump = ReplyPump(
            self.clients,
            admitted,
            lm_request(admitted),
            state,
            schedule=tuple(admitted.settings.chunk_schedule or self.config.chunk_schedule),
            timeout_s=self.config.turn_timeout_s,
            audio=self.audio,
        )
        try:
            for notice in admitted.notices:
                yield VersionMoved.model_validate(notice)
            yield TurnStarted(
                session_id=self.session_id,
                turn_id=self.turn_id,
                input=TurnInput(kind=admitted.user["kind"], tokens=len(admitted.user.get("tokens", []))),
            )
            async for event in pump.run():
                first = "speech_end_to_first_audio_ms" not in admitted.timings
                if isinstance(event, AudioDelta) and self.speech_ended_at is not None and first:
                    ms = round((time.perf_counter() - self.speech_ended_at) * 1000, 1)
                    admitted.timings["speech_end_to_first_audio_ms"] = ms
                    metrics.SPEECH_END_TO_FIRST_AUDIO.observe(ms / 1000)
                yield event
            tail = self._text_tail()
            if tail:
                state.text.append(tail)
                yield TextDelta(text=tail, index=len(state.ids))
        except BaseException:
            self.cancelled = True
            raise
        finally:
            interrupted = pump.error is None and not pump.completed
            self.record = await asyncio.shield(
                store_turn(
                    admitted,
                    state,
                    end_reason=self._end_reason(pump),
                    partial=not pump.completed,
                    final_text="".join(state.text),
                    interrupted=interrupted,
                    store=self.store,
                )
            )
            await asyncio.shield(admitted.release())
        if pump.error is not None:
            log.warning("turn failed", extra=kv(component=pump.error.component, code=pump.error.code.name))
            yield component_error_event(pump.error, self.turn_id)
        if self.record.get("store_error"):
            yield error_event("unavailable", self.record["store_error"], "redis", "UNAVAILABLE", self.turn_id)
        yield TurnDone(**self.record["summary"])

    def _text_tail(self) -> str:
        """The text the LM's final decode has beyond the deltas (bytes its incremental UTF-8
        decoder still held when the stream ended), so the deltas add up to the final text."""
        done = self.state.done
        sent = "".join(self.state.text)
        if done is None or not done.text.startswith(sent):
            return ""
        return done.text[len(sent) :]

    @staticmethod
    def _end_reason(pump: ReplyPump) -> str:
        if pump.error is not None:
            return "error"
        if not pump.completed or pump.state.done is None:
            return "cancelled"
        return END_REASONS.get(pump.state.done.end_reason, "unknown")
