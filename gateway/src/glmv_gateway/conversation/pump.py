"""The reply pump: LM ``Generate`` → text deltas out at once; audio tokens → chunker → decoder
``Synthesize`` → audio deltas out.

Two reader tasks turn the gRPC streams into typed signals on one queue; the pump loop is the only
place that reacts to them, so every end (end token, EOS, caps, a failing service, cancellation)
goes through the same few lines. The decoder stream opens together with the LM call, so its set-up
is off the path to the first audio. Audio tokens go out on the chunk schedule; when the LM ends,
the tokens still pending travel inside ``SynthesizeFinish`` so the decoder renders them as the
final chunk in one call (a reply without speech cancels the decoder stream instead).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import grpc

from glmv_common import audio as audio_io
from glmv_gateway import metrics
from glmv_gateway.clients import ComponentError, DecoderStream, ServiceClients
from glmv_gateway.conversation.admission import Admitted
from glmv_gateway.conversation.events import AudioDelta, Event, TextDelta
from glmv_gateway.conversation.record import ReplyState
from glmvoice.v1 import decoder_pb2, lm_pb2


@dataclass
class LmText:
    token_id: int
    text: str
    index: int


@dataclass
class LmAudio:
    token_id: int
    token: int


@dataclass
class LmDone:
    done: lm_pb2.GenerateDone


@dataclass
class DecoderChunk:
    chunk: decoder_pb2.SynthesizeResponse


@dataclass
class Closed:
    source: str  # "lm" or "decoder"


@dataclass
class Failed:
    error: ComponentError


Signal = LmText | LmAudio | LmDone | DecoderChunk | Closed | Failed


def chunk_sizes(schedule: tuple[int, ...]) -> Iterator[int]:
    """10, 25, 50, ... then the last size forever."""
    yield from schedule
    while True:
        yield schedule[-1]


class ReplyPump:
    """Streams one reply; iterate :meth:`run` once. ``error`` / ``completed`` tell how it ended."""

    def __init__(
        self,
        clients: ServiceClients,
        admitted: Admitted,
        request: lm_pb2.GenerateRequest,
        state: ReplyState,
        *,
        schedule: tuple[int, ...],
        timeout_s: float,
        audio: bool = True,
    ) -> None:
        self.clients, self.admitted, self.request, self.state = clients, admitted, request, state
        self.schedule, self.timeout_s, self.audio = schedule, timeout_s, audio
        self.error: ComponentError | None = None
        self.completed = False
        self._queue: asyncio.Queue[Signal] = asyncio.Queue()

    def _ms(self) -> float:
        return round((time.perf_counter() - self.admitted.started) * 1000, 1)

    def _decoder_start(self) -> decoder_pb2.SynthesizeStart:
        settings = self.admitted.settings
        start = decoder_pb2.SynthesizeStart(
            sample_rate=settings.output.sample_rate,
            encoding=int(audio_io.Encoding.parse(settings.output.encoding)),
            request_id=self.admitted.turn_id,
            session_id=self.admitted.session_id,
        )
        if settings.decoder_seed is not None:
            start.seed = settings.decoder_seed
        return start

    async def _read_lm(self, call: grpc.aio.UnaryStreamCall) -> None:
        try:
            async for message in call:
                if message.HasField("done"):
                    await self._queue.put(LmDone(message.done))
                    break
                delta = message.delta
                if delta.kind == lm_pb2.DELTA_KIND_AUDIO:
                    await self._queue.put(LmAudio(delta.id, delta.audio_token))
                else:
                    await self._queue.put(LmText(delta.id, delta.text, delta.index))
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                await self._queue.put(Failed(ComponentError.from_rpc("lm", exc)))
        finally:
            await self._queue.put(Closed("lm"))

    async def _read_decoder(self, stream: DecoderStream) -> None:
        try:
            async for chunk in stream.responses():
                await self._queue.put(DecoderChunk(chunk))
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                await self._queue.put(Failed(ComponentError.from_rpc("decoder", exc)))
        finally:
            await self._queue.put(Closed("decoder"))

    async def run(self) -> AsyncIterator[Event]:
        state, timings = self.state, self.admitted.timings
        encoding = audio_io.Encoding.parse(self.admitted.settings.output.encoding)
        lm_call = self.clients.generate(self.request, timeout=self.timeout_s)
        tasks = [asyncio.create_task(self._read_lm(lm_call))]
        decoder: DecoderStream | None = None
        if self.audio:  # text-only replies open no decoder stream
            decoder = self.clients.synthesize(self._decoder_start(), timeout=self.timeout_s)
            tasks.append(asyncio.create_task(self._read_decoder(decoder)))
        sizes = chunk_sizes(self.schedule)
        next_size = next(sizes)
        pending: list[int] = []
        tokens_sent = 0
        lm_open, decoder_open = True, decoder is not None
        decoder_finished = False
        try:
            while lm_open or (decoder_open and decoder_finished):
                signal = await self._queue.get()
                if isinstance(signal, LmText):
                    state.ids.append(signal.token_id)
                    state.pieces.append(signal.text)
                    if signal.text:
                        timings.setdefault("first_text_ms", self._ms())
                        state.text.append(signal.text)
                        yield TextDelta(text=signal.text, index=signal.index)
                elif isinstance(signal, LmAudio):
                    state.ids.append(signal.token_id)
                    state.pieces.append(None)
                    state.audio_tokens.append(signal.token)
                    if decoder is None:
                        continue
                    pending.append(signal.token)
                    if len(pending) >= next_size:
                        await decoder.send_tokens(pending)
                        tokens_sent += len(pending)
                        pending = []
                        next_size = next(sizes)
                elif isinstance(signal, LmDone):
                    state.done = signal.done
                elif isinstance(signal, DecoderChunk):
                    chunk = signal.chunk
                    if chunk.audio.data:
                        if "first_audio_ms" not in timings:
                            timings["first_audio_ms"] = self._ms()
                            metrics.TTFA.observe(timings["first_audio_ms"] / 1000)
                        samples = len(chunk.audio.data) // encoding.bytes_per_sample
                        state.add_chunk(chunk.sample_offset, samples, chunk.tokens_consumed)
                        yield AudioDelta(
                            seq=chunk.seq,
                            sample_rate=chunk.audio.sample_rate,
                            encoding=encoding.name.lower(),
                            sample_offset=chunk.sample_offset,
                            data=chunk.audio.data,
                        )
                elif isinstance(signal, Closed):
                    if signal.source == "decoder":
                        decoder_open = False
                        if lm_open or not decoder_finished:
                            break  # the decoder ended before it was told to: its error is queued
                    else:
                        lm_open = False
                        if state.done is None:
                            break  # the LM stream ended without its done message: an error is queued
                        if decoder is None:
                            pass
                        elif tokens_sent or pending:
                            await decoder.finish(pending)  # the last tokens are the final chunk
                            pending, decoder_finished = [], True
                        else:
                            decoder.cancel()
                            decoder_open = False
                elif isinstance(signal, Failed):
                    self.error = signal.error
                    metrics.ERRORS.labels(signal.error.component, signal.error.code.name).inc()
                    break
            if self.error is None:
                while not self._queue.empty():  # a failure queued behind the closing signal
                    signal = self._queue.get_nowait()
                    if isinstance(signal, Failed):
                        self.error = signal.error
                        metrics.ERRORS.labels(signal.error.component, signal.error.code.name).inc()
                        break
            self.completed = self.error is None and state.done is not None and not decoder_open
        finally:
            lm_call.cancel()
            if not self.completed and decoder is not None:
                decoder.cancel()
            for task in tasks:
                if not task.done():
                    task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
