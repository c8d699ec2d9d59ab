"""``Conversation``: one duplex session, independent of any transport.

A transport (the native WebSocket, OpenAI Realtime, Twilio, AudioSocket) is a codec over this
object: it feeds user audio (``push_audio``), text (``say``) and control (``commit``, ``clear``,
``cancel``, ``update``), reports the listener's playback clock (``played``), and forwards the one
stream of typed events (``events``) in its own wire format.

User audio goes, as it arrives, to the tokenizer's ``Listen`` stream. With ``turn_detection``
``server_vad`` the tokenizer's voice activity detector decides where utterances start and stop;
each completed utterance (already tokenized while it was spoken) starts a reply, and speech heard
while the assistant is replying interrupts it. With ``none`` the client commits each utterance.

Barge-in keeps history honest: the running reply is cancelled at once and the stored assistant
turn keeps only what the listener heard (``played``; without a playback clock, what was sent). A
reply that finished generating but is still playing when the user interrupts is cut the same way
in the stored history. See docs/architecture.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from redis.exceptions import RedisError

from glmv_common import audio as audio_io
from glmv_common.errors import AudioError
from glmv_common.logs import get_logger, log_context
from glmv_gateway import metrics
from glmv_gateway.clients import ComponentError, ServiceClients
from glmv_gateway.conversation.admission import UserInput, admit, check_text, merge_inputs
from glmv_gateway.conversation.errors import TurnRejected, component_error_event, error_event
from glmv_gateway.conversation.events import (
    Event,
    InputCleared,
    InputCommitted,
    SessionUpdated,
    SpeechStarted,
    SpeechStopped,
    TurnCancelled,
    TurnTruncated,
    VersionMoved,
)
from glmv_gateway.conversation.record import heard_ms, truncate_stored
from glmv_gateway.conversation.turn import TurnRun
from glmv_gateway.schemas import SessionSettings, apply_patch
from glmv_gateway.sessions import SessionNotFound, SessionStore
from glmv_gateway.settings import GatewaySettings
from glmvoice.v1 import tokenizer_pb2

if TYPE_CHECKING:
    from glmv_gateway.clients import ListenStream

log = get_logger("glmv.gateway.conversation")


@dataclass(frozen=True)
class AudioFormat:
    encoding: audio_io.Encoding = audio_io.Encoding.PCM16
    sample_rate: int = 16000
    channels: int = 1

    @classmethod
    def parse(cls, encoding: str | int, sample_rate: str | int, channels: str | int = 1) -> AudioFormat:
        """Raises AudioError naming what is wrong."""
        try:
            return cls(
                audio_io.Encoding.parse(encoding),
                audio_io.check_sample_rate(int(sample_rate)),
                audio_io.check_channels(int(channels)),
            )
        except (ValueError, TypeError) as exc:
            raise AudioError(f"bad audio format: {exc}") from None

    @property
    def bytes_per_second(self) -> int:
        return self.encoding.bytes_per_sample * self.channels * self.sample_rate


class Conversation:
    """One duplex session. Create with :meth:`open`; always :meth:`close` (idempotent)."""

    def __init__(
        self,
        store: SessionStore,
        clients: ServiceClients,
        config: GatewaySettings,
        session_id: str,
        api_key: str,
        *,
        transport: str = "ws",
        input_format: AudioFormat | None = None,
        respond_on_commit: bool = True,
    ) -> None:
        """``respond_on_commit``: a client ``commit`` starts the reply at once (the native
        protocol); False keeps the committed utterance in ``pending_inputs`` until ``respond``."""
        self.store, self.clients, self.config = store, clients, config
        self.session_id, self.api_key, self.transport = session_id, api_key, transport
        self.input_format = input_format or AudioFormat()
        self.settings = SessionSettings()
        self._events: asyncio.Queue[Event | None] = asyncio.Queue()
        self._listen: ListenStream | None = None
        self._listen_task: asyncio.Task[None] | None = None
        self._pending_bytes = 0  # user audio since the last utterance ended
        self._in_speech = False  # server_vad: the detector heard speech start and not yet its end
        self._turn_task: asyncio.Task[None] | None = None
        self._run: TurnRun | None = None  # the current (or last) reply
        self._played_ms: float | None = None
        self._speech_ended_at: float | None = None
        self._pending_speech_end: float | None = None
        self._respond_when_done = False
        self._in_speech = False  # between speech_started and the utterance's end (server VAD)
        self._closed = False
        self.turns_started = 0
        self.respond_on_commit = respond_on_commit
        self.pending_inputs: list[UserInput] = []  # committed user input not yet answered
        self._audio_ms = 0.0  # user audio received over the whole session
        self._listen_base_ms = 0.0  # where the current Listen stream's offsets start

    # --- life cycle --------------------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        store: SessionStore,
        clients: ServiceClients,
        config: GatewaySettings,
        session_id: str,
        api_key: str,
        **kwargs: Any,
    ) -> Conversation:
        """Raises SessionNotFound (or RedisError) if the session cannot be used by this key."""
        conversation = cls(store, clients, config, session_id, api_key, **kwargs)
        session = await store.get(session_id, owner=api_key)
        conversation.settings = SessionSettings.model_validate(session.settings)
        for notice in session.events:
            conversation.emit(VersionMoved.model_validate(notice))
        metrics.ACTIVE_CONVERSATIONS.labels(transport=conversation.transport).inc()
        return conversation

    async def close(self) -> None:
        """Stop listening and any reply (stored as far as it was heard); end the event stream."""
        if self._closed:
            return
        self._closed = True
        metrics.ACTIVE_CONVERSATIONS.labels(transport=self.transport).dec()
        await self._stop_reply(by="close")
        self._drop_listen()
        self._events.put_nowait(None)

    async def events(self) -> AsyncIterator[Event]:
        """Every event of the session, in order, until :meth:`close`."""
        while True:
            event = await self._events.get()
            if event is None:
                return
            yield event

    def emit(self, event: Event) -> None:
        if not self._closed:  # after close the stream has ended: nobody reads further events
            self._events.put_nowait(event)

    def error(self, kind: str, message: str, component: str | None = None) -> None:
        self.emit(error_event(kind, message, component))

    @property
    def turn_detection(self) -> str:
        return self.settings.turn_detection.type

    @property
    def replying(self) -> bool:
        return self._turn_task is not None and not self._turn_task.done()

    @property
    def current_turn(self) -> TurnRun | None:
        return self._run

    # --- input ------------------------------------------------------------------------------------

    def set_input_format(self, fmt: AudioFormat) -> None:
        """Takes effect for the next utterance's stream (the current one keeps its format)."""
        if fmt != self.input_format:
            self.input_format = fmt
            self._drop_listen()

    async def push_audio(self, data: bytes, fmt: AudioFormat | None = None) -> None:
        """User audio in ``fmt`` (default: the input format). Bad sizes give an error event."""
        if fmt is not None:
            self.set_input_format(fmt)
        fmt = self.input_format
        frame = fmt.encoding.bytes_per_sample * fmt.channels
        if len(data) % frame:
            self.error(
                "invalid_request",
                f"audio frame of {len(data)} bytes is truncated: not a whole number of {frame}-byte samples",
            )
            return
        if not data:
            return
        limit_bytes = self.config.max_upload_bytes
        limit_s = self.config.max_audio_seconds
        if self.turn_detection == "none" or self._in_speech:
            # with server-side detection only an utterance counts, not the line's silence between them
            self._pending_bytes += len(data)
        if self._pending_bytes > limit_bytes or self._pending_bytes / fmt.bytes_per_second > limit_s:
            self._drop_listen()
            self.error(
                "too_large",
                f"user audio exceeds the limit ({limit_bytes} bytes, {limit_s:.0f} s); it was discarded",
            )
            return
        stream = self._ensure_listen()
        self._audio_ms += 1000.0 * len(data) / fmt.bytes_per_second
        try:
            await stream.send_audio(data, int(fmt.encoding), fmt.sample_rate, fmt.channels)
        except ComponentError as exc:
            self._drop_listen()
            self.emit(component_error_event(exc))

    def discard_input(self) -> None:
        """Drop the user audio received since the last utterance ended, without an event."""
        self._drop_listen()

    async def commit(self) -> None:
        """End the user's utterance now; its reply starts when the last tokens are ready."""
        if self._listen is None or (self._pending_bytes == 0 and self.turn_detection == "none"):
            self.error("invalid_request", "there is no user audio to commit")
            return
        if self.turn_detection == "none":
            await self._stop_reply(by="commit")
        self._speech_ended_at = time.perf_counter()
        try:
            await self._listen.commit()
        except ComponentError as exc:
            self._drop_listen()
            self.emit(component_error_event(exc))

    async def clear(self) -> None:
        """Forget the user audio received since the last utterance ended."""
        if self._listen is not None:
            with contextlib.suppress(ComponentError):
                await self._listen.clear()
        self._pending_bytes = 0
        self.emit(InputCleared())

    async def say(self, text: object) -> TurnRun | None:
        """A typed user turn (barges in on a running reply)."""
        try:
            value = check_text(text)
        except TurnRejected as exc:
            self.emit(exc.event())
            return None
        await self._stop_reply(by="text")
        return await self.start_turn(UserInput(text=value))

    async def cancel(self) -> bool:
        """Stop the reply (if one runs); the stored turn keeps what was heard. With nothing
        running the client gets an error event saying so. Returns whether a reply was stopped."""
        stopped = await self._stop_reply(by="cancel")
        if not stopped:
            self.error("invalid_request", "there is no reply to cancel")
        return stopped

    async def update(self, changes: dict[str, Any]) -> SessionSettings | None:
        """Change the session's settings (stored; next turns use them). Bad changes: error event."""
        try:
            settings = apply_patch(self.settings.model_dump(mode="json"), changes)
            await self.store.update_settings(self.session_id, settings)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "settings"
            self.error("invalid_request", f"bad settings: {where}: {first.get('msg')}")
            return None
        except SessionNotFound:
            self.error("not_found", f"session {self.session_id} not found (expired or deleted)")
            return None
        except RedisError as exc:
            self.error("unavailable", f"the session store (Redis) is unavailable: {exc}", "redis")
            return None
        before = self.settings.turn_detection
        self.settings = SessionSettings.model_validate(settings)
        if self.settings.turn_detection != before and self._listen is not None:
            try:
                await self._listen.configure(self._vad())
            except ComponentError as exc:
                self._drop_listen()
                self.emit(component_error_event(exc))
        self.emit(SessionUpdated(session_id=self.session_id, settings=settings))
        return self.settings

    def played(self, ms: float) -> None:
        """How much of the current reply the listener has heard (its playback clock)."""
        self._played_ms = max(0.0, float(ms))
        if self._run is not None:
            self._run.played(int(self._played_ms * self._run.state.sample_rate / 1000))

    async def interrupt(self, by: str = "client") -> bool:
        """Barge-in: stop the reply now; also cut a finished reply that is still being played."""
        if await self._stop_reply(by=by):
            return True
        run = self._run
        if run is None or run.record is None or self._played_ms is None:
            return False
        heard = int(self._played_ms * run.state.sample_rate / 1000)
        if heard >= run.state.audio_samples:
            return False
        self._run = None
        details = await truncate_stored(run.admitted, run.state, heard)
        if details:
            metrics.BARGE_INS.labels(by=by).inc()
            self.emit(TurnTruncated(turn_id=run.turn_id, **details))
        return bool(details)

    async def truncate(self, turn_id: str, audio_end_ms: float) -> dict[str, Any] | None:
        """Cut the stored reply ``turn_id`` (this connection's last reply) to ``audio_end_ms``."""
        run = self._run
        if run is None or run.turn_id != turn_id or run.record is None:
            return None
        details = await truncate_stored(
            run.admitted, run.state, int(audio_end_ms * run.state.sample_rate / 1000)
        )
        if details:
            self.emit(TurnTruncated(turn_id=turn_id, **details))
        return details

    async def input_from_audio(self, data: bytes, fmt: AudioFormat) -> UserInput | None:
        """A whole user audio item (not streamed) tokenized at once; None (and an error event) if
        the audio is unusable."""
        try:
            samples = audio_io.decode_pcm(data, fmt.encoding, channels=fmt.channels)
        except AudioError as exc:
            self.error("invalid_request", str(exc))
            return None
        chunk = audio_io.to_audio_chunk(
            audio_io.first_channel(samples), fmt.sample_rate, audio_io.Encoding.PCM16
        )
        try:
            reply = await self.clients.tokenize(
                chunk,
                request_id=uuid.uuid4().hex,
                session_id=self.session_id,
                timeout=self.config.tokenize_timeout_s,
            )
        except ComponentError as exc:
            self.emit(component_error_event(exc))
            return None
        if not reply.tokens:
            self.error("no_speech", "the audio produced no speech tokens")
            return None
        return UserInput(tokens=list(reply.tokens))

    async def respond(
        self,
        inputs: list[UserInput] | None = None,
        *,
        overrides: dict[str, Any] | None = None,
        audio: bool = True,
        store: bool = True,
    ) -> TurnRun | None:
        """Reply to ``inputs`` (default: everything committed and not yet answered). Refused with an
        error event while a reply is running. ``overrides``: settings for this reply only;
        ``audio=False``: text only; ``store=False``: out of band, not added to history."""
        if self.replying:
            self.error("busy", "a reply is already in progress; cancel it first")
            return None
        use_pending = inputs is None
        try:
            user = merge_inputs(self.pending_inputs if use_pending else list(inputs or []))
        except TurnRejected as exc:
            self.emit(exc.event())
            return None
        if use_pending:
            self.pending_inputs = []
        ended, self._pending_speech_end = self._pending_speech_end, None
        return await self.start_turn(
            user, speech_ended_at=ended, overrides=overrides, audio=audio, store=store
        )

    # --- turns ------------------------------------------------------------------------------------

    async def start_turn(
        self,
        user_input: UserInput,
        *,
        speech_ended_at: float | None = None,
        overrides: dict[str, Any] | None = None,
        audio: bool = True,
        store: bool = True,
    ) -> TurnRun | None:
        """Admit a turn and stream its events in the background; a refusal is an error event."""
        try:
            admitted = await admit(
                self.store,
                self.clients,
                self.config,
                session_id=self.session_id,
                api_key=self.api_key,
                user_input=user_input,
                overrides=overrides,
            )
        except TurnRejected as exc:
            self.emit(exc.event())
            return None
        except RedisError as exc:
            self.error("unavailable", f"the session store (Redis) is unavailable: {exc}", "redis")
            return None
        run = TurnRun(
            self.clients, self.config, admitted, speech_ended_at=speech_ended_at, audio=audio, store=store
        )
        self._run, self._played_ms = run, None
        self.turns_started += 1
        self._turn_task = asyncio.create_task(self._stream(run))
        return run

    async def _stream(self, run: TurnRun) -> None:
        events = run.events()
        try:
            async for event in events:
                self.emit(event)
        finally:
            await events.aclose()
        if self._respond_when_done and not self._closed:
            self._respond_when_done = False
            self._turn_task = None
            await self.respond()

    async def _stop_reply(self, *, by: str) -> bool:
        task, run = self._turn_task, self._run
        self._turn_task = None
        if task is None or task.done() or run is None:
            return False
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if by != "close":
            metrics.BARGE_INS.labels(by=by).inc()
        heard = run.state.heard()
        self.emit(TurnCancelled(turn_id=run.turn_id, heard_ms=heard_ms(heard, run.state.sample_rate)))
        truncated = (run.record or {}).get("truncated")
        if truncated:
            self.emit(TurnTruncated(turn_id=run.turn_id, **truncated))
        return True

    # --- listening --------------------------------------------------------------------------------

    def _vad(self) -> tokenizer_pb2.VadConfig:
        td = self.settings.turn_detection
        return tokenizer_pb2.VadConfig(
            enabled=td.type == "server_vad",
            threshold=td.threshold,
            prefix_padding_ms=td.prefix_padding_ms,
            silence_duration_ms=td.silence_duration_ms,
        )

    def _ensure_listen(self) -> ListenStream:
        if self._listen is None:
            self._listen = self.clients.listen(
                request_id=uuid.uuid4().hex,
                session_id=self.session_id,
                vad=self._vad(),
                timeout=self.config.listen_timeout_s,
            )
            self._listen_task = asyncio.create_task(self._read_listen(self._listen))
            self._listen_base_ms = self._audio_ms  # offsets stay monotonic across streams
        return self._listen

    def _drop_listen(self) -> None:
        stream, task = self._listen, self._listen_task
        self._listen, self._listen_task, self._pending_bytes = None, None, 0
        self._in_speech = False
        if stream is not None:
            stream.cancel()
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()

    async def _read_listen(self, stream: ListenStream) -> None:
        with log_context(session_id=self.session_id):
            try:
                async for event in stream.events():
                    await self._on_listen(event)
            except ComponentError as exc:
                if self._listen is stream:
                    self._listen = None
                    self._pending_bytes = 0
                    self.emit(component_error_event(exc))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never leave the session deaf without saying so
                log.exception("listen stream failed")
                if self._listen is stream:
                    self._listen = None
                    self.error("upstream", f"listening failed: {type(exc).__name__}: {exc}", "tokenizer")

    def _offset(self, ms: int) -> int:
        return round(self._listen_base_ms + ms)

    async def _on_listen(self, event: tokenizer_pb2.ListenEvent) -> None:
        kind = event.WhichOneof("msg")
        td = self.settings.turn_detection
        if kind == "speech_started":
            self._in_speech, self._pending_bytes = True, 0
            self.emit(
                SpeechStarted(
                    utterance=event.speech_started.utterance,
                    audio_start_ms=self._offset(event.speech_started.audio_start_ms),
                )
            )
            if td.interrupt_response:
                await self.interrupt(by="vad")
        elif kind == "speech_stopped":
            self._speech_ended_at = time.perf_counter()
            self.emit(
                SpeechStopped(
                    utterance=event.speech_stopped.utterance,
                    audio_end_ms=self._offset(event.speech_stopped.audio_end_ms),
                )
            )
        elif kind == "done":
            done = event.done
            self._pending_bytes, self._in_speech = 0, False
            by = "client" if done.committed else "vad"
            if not done.tokens:
                if done.committed:
                    self.error("no_speech", "the committed audio produced no speech tokens")
                return
            metrics.UTTERANCES.labels(by=by).inc()
            self.emit(
                InputCommitted(
                    utterance=done.utterance,
                    tokens=len(done.tokens),
                    audio_start_ms=self._offset(done.audio_start_ms),
                    audio_end_ms=self._offset(done.audio_end_ms),
                    by=by,
                )
            )
            user = UserInput(tokens=list(done.tokens), tokenize_ms=round(done.finish_ms, 1))
            ended, self._speech_ended_at = self._speech_ended_at, None
            respond = self.respond_on_commit if done.committed else td.create_response
            self.pending_inputs.append(user)
            self._pending_speech_end = ended
            if not respond:
                return
            if self.replying and not done.committed and not td.interrupt_response:
                # speech during a reply that may not be interrupted: answered when the reply ends
                self._respond_when_done = True
            else:
                await self._stop_reply(by="commit")
                await self.respond()
        elif kind == "cleared":
            self._pending_bytes, self._in_speech = 0, False
