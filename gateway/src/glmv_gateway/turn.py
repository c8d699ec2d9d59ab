"""One spoken (or typed) turn, as the steps DESIGN.md lists.

``prepare_turn`` does everything that can still fail with a plain HTTP error (API-key slot, session
lock, tokenizing the user's audio, loading history). ``TurnRun.events`` then streams the reply:
LM ``Generate`` → text deltas out at once, audio tokens to a decoder stream on the chunk schedule →
PCM chunks out → the turn appended to history. Whatever way the turn ends (end token, EOS, token
caps, a failing service, the client leaving or barging in) the pending audio is flushed or the
streams are cancelled, what was generated is stored (marked partial if cut short) and the lock is
released.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from glmv_common import audio as audio_io
from glmv_common.logs import get_logger, kv, log_context
from glmv_gateway import metrics
from glmv_gateway.clients import ComponentError, DecoderStream, ServiceClients
from glmv_gateway.schemas import SessionSettings
from glmv_gateway.sessions import SessionStore
from glmv_gateway.settings import GatewaySettings
from glmvoice.v1 import decoder_pb2, lm_pb2

log = get_logger("glmv.gateway.turn")

END_REASONS = {
    lm_pb2.END_REASON_END_TOKEN: "end_token",
    lm_pb2.END_REASON_EOS: "eos",
    lm_pb2.END_REASON_MAX_TOKENS: "max_tokens",
    lm_pb2.END_REASON_AUDIO_CAP: "audio_cap",
    lm_pb2.END_REASON_CANCELLED: "cancelled",
    lm_pb2.END_REASON_ERROR: "error",
}


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


class TurnRejected(Exception):
    """The turn cannot start; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str, component: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.component = status, message, component


_GRPC_TO_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.UNAVAILABLE: 503,
}


def http_status(error: ComponentError) -> int:
    return _GRPC_TO_HTTP.get(error.code, 502)


def chunk_sizes(schedule: tuple[int, ...]) -> Iterator[int]:
    """10, 25, 50, ... then the last size forever."""
    yield from schedule
    while True:
        yield schedule[-1]


@dataclass
class TurnRun:
    """A prepared turn; iterate :meth:`events` exactly once."""

    store: SessionStore
    clients: ServiceClients
    config: GatewaySettings
    session_id: str
    turn_id: str
    api_key: str
    session: SessionSettings
    user: dict[str, Any]
    history: list[dict[str, Any]]
    started: float
    timings: dict[str, float] = field(default_factory=dict)
    reply: _ReplyState | None = None  # what the LM has generated so far (progress of batch jobs)
    _released: bool = False

    def _ms(self) -> float:
        return round((time.perf_counter() - self.started) * 1000, 1)

    def lm_request(self) -> lm_pb2.GenerateRequest:
        turns = []
        for past in self.history:
            turns.append(_user_turn(past["user"]))
            turns.append(
                lm_pb2.Turn(
                    role=lm_pb2.Turn.ROLE_ASSISTANT,
                    generated=lm_pb2.TokenIds(ids=past["assistant"]["ids"]),
                )
            )
        turns.append(_user_turn(self.user))
        first_kind = self.history[0]["user"]["kind"] if self.history else self.user["kind"]
        mode = self.session.mode or first_kind
        s = self.session
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
            request_id=self.turn_id,
            session_id=self.session_id,
        )

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Stream the reply. Closing the iterator early cancels the LM and decoder streams."""
        with log_context(session_id=self.session_id, turn_id=self.turn_id):
            metrics.ACTIVE_TURNS.inc()
            try:
                async for event in self._events():
                    yield event
            finally:
                metrics.ACTIVE_TURNS.dec()

    async def _events(self) -> AsyncIterator[dict[str, Any]]:
        out: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        state = self.reply = _ReplyState()
        lm_call = self.clients.generate(self.lm_request(), timeout=self.config.turn_timeout_s)
        error: ComponentError | None = None
        sample_rate = self.session.output.sample_rate
        encoding = audio_io.Encoding.parse(self.session.output.encoding)
        sizes = chunk_sizes(tuple(self.session.chunk_schedule or self.config.chunk_schedule))
        next_size = next(sizes)
        pending: list[int] = []
        completed = False

        yield {
            "type": "turn.started",
            "session_id": self.session_id,
            "turn_id": self.turn_id,
            "input": {"kind": self.user["kind"], "tokens": len(self.user.get("tokens", []))},
        }

        async def read_decoder(stream: DecoderStream) -> None:
            try:
                async for chunk in stream.responses():
                    if chunk.audio.data:
                        if "first_audio_ms" not in self.timings:
                            self.timings["first_audio_ms"] = self._ms()
                            metrics.TTFA.observe(self.timings["first_audio_ms"] / 1000)
                        state.audio_samples += _num_samples(chunk.audio)
                        await out.put(
                            {
                                "type": "audio.delta",
                                "seq": chunk.seq,
                                "sample_rate": chunk.audio.sample_rate,
                                "encoding": encoding.name.lower(),
                                "sample_offset": chunk.sample_offset,
                                "data": chunk.audio.data,
                            }
                        )
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.CANCELLED:
                    await out.put({"type": "_error", "error": ComponentError.from_rpc("decoder", exc)})
            finally:
                await out.put({"type": "_decoder_closed"})

        # The decoder stream opens together with the LM call, so its set-up is off the path to
        # the first audio; a reply without speech cancels it instead of finishing it.
        start = decoder_pb2.SynthesizeStart(
            sample_rate=sample_rate,
            encoding=int(encoding),
            request_id=self.turn_id,
            session_id=self.session_id,
        )
        if self.session.decoder_seed is not None:
            start.seed = self.session.decoder_seed
        decoder = self.clients.synthesize(start, timeout=self.config.turn_timeout_s)
        decoder_task = asyncio.create_task(read_decoder(decoder))

        async def flush(tokens: list[int]) -> None:
            await decoder.send_tokens(tokens)
            state.tokens_sent += len(tokens)

        async def read_lm() -> None:
            nonlocal next_size
            try:
                async for message in lm_call:
                    if message.HasField("done"):
                        state.done = message.done
                        break
                    delta = message.delta
                    state.ids.append(delta.id)
                    if delta.kind == lm_pb2.DELTA_KIND_AUDIO:
                        state.audio_tokens.append(delta.audio_token)
                        pending.append(delta.audio_token)
                        if len(pending) >= next_size:
                            await flush(pending[:])
                            pending.clear()
                            next_size = next(sizes)
                    else:
                        state.text_ids.append(delta.id)
                        if delta.text:
                            if "first_text_ms" not in self.timings:
                                self.timings["first_text_ms"] = self._ms()
                            state.text.append(delta.text)
                            await out.put({"type": "text.delta", "text": delta.text, "index": delta.index})
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.CANCELLED:
                    await out.put({"type": "_error", "error": ComponentError.from_rpc("lm", exc)})
            finally:
                await out.put({"type": "_lm_closed"})

        lm_task = asyncio.create_task(read_lm())
        lm_open, decoder_open, decoder_closed = True, False, False
        try:
            while lm_open or decoder_open:
                event = await out.get()
                kind = event["type"]
                if kind == "_lm_closed":
                    lm_open = False
                    if error is None:
                        # flush the pending audio on every stop reason (the reference drops it)
                        if pending:
                            await flush(pending[:])
                            pending.clear()
                        if state.tokens_sent:
                            await decoder.finish()
                            decoder_open = not decoder_closed
                        else:
                            decoder.cancel()
                elif kind == "_decoder_closed":
                    decoder_open, decoder_closed = False, True
                elif kind == "_error":
                    error = event["error"]
                    metrics.ERRORS.labels(error.component, error.code.name).inc()
                    break
                else:
                    yield event
            completed = error is None and state.done is not None
        finally:
            lm_call.cancel()
            if not completed:
                decoder.cancel()
            for task in (lm_task, decoder_task):
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
            end_reason = self._end_reason(state, error, completed)
            turn_record = await self._store(state, end_reason, partial=not completed)
            await self.release()
        if error is not None:
            log.warning("turn failed", extra=kv(component=error.component, code=error.code.name))
            yield {
                "type": "error",
                "component": error.component,
                "code": error.code.name,
                "message": error.message,
            }
        if turn_record.get("store_error"):
            yield {
                "type": "error",
                "component": "redis",
                "code": "UNAVAILABLE",
                "message": turn_record["store_error"],
            }
        yield {"type": "turn.done", **turn_record["summary"]}

    def _end_reason(self, state: _ReplyState, error: ComponentError | None, completed: bool) -> str:
        if error is not None:
            return "error"
        if not completed:
            return "cancelled"
        assert state.done is not None
        return END_REASONS.get(state.done.end_reason, "unknown")

    async def _store(self, state: _ReplyState, end_reason: str, partial: bool) -> dict[str, Any]:
        total_ms = self._ms()
        audio_ms = 1000.0 * state.audio_samples / max(self.session.output.sample_rate, 1)
        timings = {
            "tokenize_ms": self.timings.get("tokenize_ms"),
            "time_to_first_text_ms": self.timings.get("first_text_ms"),
            "time_to_first_audio_ms": self.timings.get("first_audio_ms"),
            "total_ms": total_ms,
            "audio_ms": round(audio_ms, 1),
            "rtf": round(total_ms / audio_ms, 4) if audio_ms else None,
        }
        done = state.done
        usage = {
            "prompt_tokens": done.prompt_tokens if done else None,
            "completion_tokens": len(state.ids),
            "text_tokens": len(state.text_ids),
            "audio_tokens": len(state.audio_tokens),
            "dropped_turns": done.dropped_turns if done else 0,
            "lm_time_to_first_token_ms": round(done.time_to_first_token_ms, 1) if done else None,
            "lm_tokens_per_s": round(done.decode_tokens_per_s, 1) if done else None,
            "lm_cached_prompt_tokens": done.cached_prompt_tokens if done else None,
        }
        text = done.text if done and done.text else "".join(state.text)
        summary = {
            "session_id": self.session_id,
            "turn_id": self.turn_id,
            "text": text,
            "end_reason": end_reason,
            "partial": partial,
            "usage": usage,
            "timings": timings,
        }
        metrics.TURN_SECONDS.observe(total_ms / 1000)
        metrics.TURNS.labels(end_reason).inc()
        if timings["rtf"] is not None:
            metrics.RTF.observe(timings["rtf"])
        if done is not None:
            metrics.STAGE_SECONDS.labels("lm_time_to_first_token").observe(done.time_to_first_token_ms / 1000)
            if done.decode_tokens_per_s:
                metrics.LM_TOKENS_PER_S.observe(done.decode_tokens_per_s)
        if timings["time_to_first_text_ms"] is not None:
            metrics.STAGE_SECONDS.labels("first_text").observe(timings["time_to_first_text_ms"] / 1000)
        record: dict[str, Any] = {"summary": summary}
        if state.ids:  # a turn that failed before the LM produced anything leaves history unchanged
            turn = {
                "turn_id": self.turn_id,
                "created_at": time.time(),
                "user": self.user,
                "assistant": {
                    "ids": state.ids,
                    "text": text,
                    "audio_tokens": len(state.audio_tokens),
                    "end_reason": end_reason,
                    "partial": partial,
                },
                "usage": usage,
                "timings": timings,
            }
            try:
                await asyncio.shield(self.store.append_turn(self.session_id, turn))
            except Exception as exc:  # the client has the reply; say it is not in the history
                log.error("turn not saved", extra=kv(error=f"{type(exc).__name__}: {exc}"))
                metrics.ERRORS.labels("redis", type(exc).__name__).inc()
                record["store_error"] = (
                    f"the reply was not saved to the session history: {type(exc).__name__}: {exc}"
                )
        log.info("turn finished", extra=kv(end_reason=end_reason, partial=partial, **timings))
        return record

    async def release(self) -> None:
        if self._released:
            return
        self._released = True
        with contextlib.suppress(Exception):
            await asyncio.shield(self.store.release_turn(self.session_id, self.turn_id))
            await asyncio.shield(self.store.release_key_slot(self.api_key, self.turn_id))


@dataclass
class _ReplyState:
    ids: list[int] = field(default_factory=list)
    text_ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    audio_tokens: list[int] = field(default_factory=list)
    audio_samples: int = 0
    tokens_sent: int = 0
    done: lm_pb2.GenerateDone | None = None


def _user_turn(user: dict[str, Any]) -> lm_pb2.Turn:
    if user["kind"] == "text":
        return lm_pb2.Turn(role=lm_pb2.Turn.ROLE_USER, text=user["text"])
    return lm_pb2.Turn(role=lm_pb2.Turn.ROLE_USER, audio=lm_pb2.SpeechTokens(tokens=user["tokens"]))


def _num_samples(chunk: Any) -> int:
    return len(chunk.data) // audio_io.Encoding(chunk.encoding).bytes_per_sample


async def prepare_turn(
    store: SessionStore,
    clients: ServiceClients,
    config: GatewaySettings,
    *,
    session_id: str,
    api_key: str,
    user_input: UserInput,
) -> TurnRun:
    """Take the slots and the lock, tokenize, load history. Raises :class:`TurnRejected`."""
    from glmv_gateway.sessions import SessionBusy, SessionNotFound, TooManyTurns

    started = time.perf_counter()
    turn_id = uuid.uuid4().hex
    try:
        session = await store.get(session_id, owner=api_key)
    except SessionNotFound:
        raise TurnRejected(404, f"session {session_id} not found (expired or deleted)") from None
    settings = SessionSettings.model_validate(session.settings)
    if user_input.audio is not None:
        seconds = len(user_input.audio) / user_input.sample_rate
        if seconds > config.max_audio_seconds:
            raise TurnRejected(
                413, f"audio is {seconds:.1f} s long; the limit is {config.max_audio_seconds:.0f} s"
            )
    try:
        await store.acquire_key_slot(api_key, turn_id, config.max_turns_per_key)
    except TooManyTurns as exc:
        raise TurnRejected(429, str(exc)) from None
    run: TurnRun | None = None
    try:
        try:
            await store.acquire_turn(session_id, turn_id)
        except SessionBusy:
            raise TurnRejected(409, f"session {session_id} already has a turn running") from None
        run = TurnRun(
            store=store,
            clients=clients,
            config=config,
            session_id=session_id,
            turn_id=turn_id,
            api_key=api_key,
            session=settings,
            user={},
            history=[],
            started=started,
        )
        if user_input.kind == "text":
            if not user_input.text or not user_input.text.strip():
                raise TurnRejected(400, "text input is empty")
            run.user = {"kind": "text", "text": user_input.text}
        elif user_input.tokens is not None:
            run.timings["tokenize_ms"] = user_input.tokenize_ms or 0.0
            if not user_input.tokens:
                raise TurnRejected(422, "the audio produced no speech tokens")
            run.user = {"kind": "audio", "tokens": list(user_input.tokens)}
        else:
            assert user_input.audio is not None
            chunk = audio_io.to_audio_chunk(user_input.audio, user_input.sample_rate, audio_io.Encoding.PCM16)
            t0 = time.perf_counter()
            try:
                reply = await clients.tokenize(
                    chunk, request_id=turn_id, session_id=session_id, timeout=config.tokenize_timeout_s
                )
            except ComponentError as exc:
                metrics.ERRORS.labels("tokenizer", exc.code.name).inc()
                raise TurnRejected(http_status(exc), f"tokenizer: {exc.message}", "tokenizer") from None
            run.timings["tokenize_ms"] = round((time.perf_counter() - t0) * 1000, 1)
            metrics.STAGE_SECONDS.labels("tokenize").observe(run.timings["tokenize_ms"] / 1000)
            if not reply.tokens:
                raise TurnRejected(422, "the audio produced no speech tokens")
            run.user = {"kind": "audio", "tokens": list(reply.tokens)}
        run.history = await store.history(session_id)
        return run
    except BaseException:
        if run is not None:
            await run.release()
        else:
            await store.release_key_slot(api_key, turn_id)
        raise
