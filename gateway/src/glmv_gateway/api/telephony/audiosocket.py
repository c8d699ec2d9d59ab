"""Asterisk AudioSocket: a TCP server (Asterisk connects), a codec over ``Conversation``.

Framing: one kind byte, a big-endian 16-bit payload length, the payload. Asterisk sends the call's
UUID first (kind 0x01, 16 bytes: it opens the call's session, or resumes the one an earlier
connection of the same UUID used), then signed 16-bit little-endian mono audio (0x10 at 8 kHz, or
0x11-0x18 at 12/16/24/32/44.1/48/96/192 kHz), DTMF digits (0x03, one ASCII byte), and maybe an
error (0xff); it hangs up with 0x00 or by closing the socket.

We send only audio (the kind the caller's audio came in, so the channel's rate) and the hang-up
0x00: Asterisk fails the channel on any other kind. Asterisk plays what it receives at once, so
the reply goes out paced in real time in 20 ms frames; barge-in is to stop sending (the queue is
flushed), and what the caller heard is what was sent. A malformed frame (unknown kind, a length
past the end of the stream, a payload over ``AUDIOSOCKET_MAX_FRAME_BYTES``) ends that call with a
hang-up; the server keeps serving the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
import uuid
from collections import deque
from dataclasses import dataclass

import numpy as np

from glmv_common import audio as audio_io
from glmv_common.logs import get_logger, kv, log_context
from glmv_gateway import metrics
from glmv_gateway.api.telephony.calls import DTMF_DIGITS, Call, CallManager, CallRefused
from glmv_gateway.conversation.conversation import AudioFormat
from glmv_gateway.conversation.events import (
    AudioDelta,
    ErrorEvent,
    Event,
    SpeechStarted,
    TurnCancelled,
    TurnDone,
    TurnStarted,
    TurnTruncated,
)
from glmv_gateway.settings import GatewaySettings

log = get_logger("glmv.gateway.audiosocket")

KIND_HANGUP = 0x00
KIND_UUID = 0x01
KIND_DTMF = 0x03
KIND_ERROR = 0xFF
AUDIO_RATES = {
    0x10: 8000,
    0x11: 12000,
    0x12: 16000,
    0x13: 24000,
    0x14: 32000,
    0x15: 44100,
    0x16: 48000,
    0x17: 96000,
    0x18: 192000,
}
SESSION_RATES = (8000, 16000, 24000, 48000)  # the session output rates a channel rate can come from
HEADER = struct.Struct(">BH")
FRAME_S = 0.02
HANGUP_FRAME = HEADER.pack(KIND_HANGUP, 0)
UUID_TIMEOUT_S = 5.0


class Malformed(Exception):
    def __init__(self, why: str, message: str) -> None:
        super().__init__(message)
        self.why = why


class PeerHungUp(Exception):
    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


def frame(kind: int, payload: bytes = b"") -> bytes:
    """An outbound frame; only audio kinds and hang-up ever go to Asterisk."""
    if kind != KIND_HANGUP and kind not in AUDIO_RATES:
        raise ValueError(f"kind {kind:#04x} must never be sent to Asterisk")
    return HEADER.pack(kind, len(payload)) + payload


async def read_frame(reader: asyncio.StreamReader, max_bytes: int) -> tuple[int, bytes]:
    """Raises PeerHungUp at a clean end of stream, Malformed for a frame that cannot be read."""
    try:
        header = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise Malformed("truncated", "the stream ended inside a frame header") from None
        raise PeerHungUp("closed") from None
    kind, length = HEADER.unpack(header)
    if kind not in AUDIO_RATES and kind not in (KIND_HANGUP, KIND_UUID, KIND_DTMF, KIND_ERROR):
        raise Malformed("bad_kind", f"unknown frame kind {kind:#04x}")
    if length > max_bytes:
        raise Malformed("oversized", f"a {length}-byte payload is over the {max_bytes}-byte limit")
    try:
        payload = await reader.readexactly(length) if length else b""
    except asyncio.IncompleteReadError as exc:
        raise Malformed(
            "truncated", f"frame says {length} bytes but the stream ended after {len(exc.partial)}"
        ) from None
    return kind, payload


def session_rate(channel_rate: int) -> int:
    """The session output rate to ask for: the channel's own, else the closest higher one offered."""
    if channel_rate in SESSION_RATES:
        return channel_rate
    return next((r for r in SESSION_RATES if r >= channel_rate), SESSION_RATES[-1])


@dataclass
class _Frame:
    turn_id: str
    data: bytes
    end_ms: float  # position in the reply after this frame
    generation: int


class AudioSocketCall:
    """One Asterisk connection: reader, event pump and real-time pacer."""

    def __init__(
        self,
        manager: CallManager,
        config: GatewaySettings,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.manager, self.config = manager, config
        self.reader, self.writer = reader, writer
        self.call: Call | None = None
        self.kind = 0x10  # the channel's audio kind (from the first audio frame)
        self.rate = 8000
        self.out_rate = 8000  # the session's output rate
        self._resampler: audio_io.StreamResampler | None = None
        self._queue: deque[_Frame] = deque()
        self._wake = asyncio.Event()
        self._generation = 0
        self._turn_id: str | None = None
        self._carry = b""  # reply bytes short of a whole frame
        self._turn_bytes = 0  # bytes of the current reply queued so far (channel rate)
        self._greeted = False
        self._closing = False
        self._hung_up_by_us = False

    # --- outbound ------------------------------------------------------------------------------------

    @property
    def frame_bytes(self) -> int:
        return int(self.rate * FRAME_S) * 2

    def _write(self, data: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(data)

    async def hang_up(self) -> None:
        """Our side ends the call: a hang-up frame, then the socket closes."""
        if self._hung_up_by_us:
            return
        self._hung_up_by_us = True
        self.flush(count=False)
        with contextlib.suppress(ConnectionError, OSError):
            self._write(HANGUP_FRAME)
            await asyncio.wait_for(self.writer.drain(), 2)
        self._closing = True
        self._wake.set()

    def flush(self, count: bool = True) -> None:
        """Barge-in: drop every reply frame not sent yet."""
        had = bool(self._queue)
        self._queue.clear()
        self._generation += 1
        self._carry = b""
        if had and count and self.call is not None:
            self.call.barge_in()

    def _enqueue(self, data: bytes) -> None:
        assert self._turn_id is not None
        data = self._carry + data
        size = self.frame_bytes
        whole = len(data) - len(data) % size
        self._carry = data[whole:]
        for i in range(0, whole, size):
            self._turn_bytes += size
            end_ms = 1000.0 * self._turn_bytes / 2 / self.rate
            self._queue.append(_Frame(self._turn_id, data[i : i + size], end_ms, self._generation))
        self._wake.set()

    def _pcm(self, event: AudioDelta) -> bytes:
        if self._resampler is None:
            return event.data
        samples = audio_io.decode_pcm(event.data, event.encoding)[:, 0]
        return audio_io.encode_pcm(self._resampler.push(samples), audio_io.Encoding.PCM16)

    async def send_event(self, event: Event) -> None:
        call = self.call
        assert call is not None
        call.on_event(event)
        if isinstance(event, TurnStarted):
            self._turn_id, self._carry, self._turn_bytes = event.turn_id, b"", 0
            if self.out_rate != self.rate:
                self._resampler = audio_io.StreamResampler(self.out_rate, self.rate)
        elif isinstance(event, AudioDelta):
            if self._turn_id is not None and event.data:
                self._enqueue(self._pcm(event))
        elif isinstance(event, TurnDone):
            if self._turn_id == event.turn_id and self._resampler is not None:
                tail = audio_io.encode_pcm(self._resampler.push(np.zeros(0, np.float32), last=True), "pcm16")
                if tail:
                    self._enqueue(tail)
            if self._turn_id == event.turn_id and self._carry:  # the last partial frame, padded
                self._enqueue(b"\x00" * (self.frame_bytes - len(self._carry)))
        elif isinstance(event, SpeechStarted):
            if call.conversation.settings.turn_detection.interrupt_response:
                self.flush()
        elif isinstance(event, TurnCancelled | TurnTruncated):
            self.flush()
        elif isinstance(event, ErrorEvent):
            log.warning(
                "conversation error", extra=kv(call_id=call.call_id, kind=event.kind, message=event.message)
            )

    async def _pace(self) -> None:
        """Write queued frames at real time: frame n at t0 + n * 20 ms."""
        loop = asyncio.get_running_loop()
        due: float | None = None
        while not self._closing:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            now = loop.time()
            if due is None or due < now - 3 * FRAME_S:  # idle (or far behind): restart the clock
                due = now
            if due > now:
                await asyncio.sleep(due - now)
            if not self._queue or self._closing:
                continue
            item = self._queue.popleft()
            if item.generation != self._generation:
                continue
            self._write(frame(self.kind, item.data))
            due += FRAME_S
            assert self.call is not None
            self.call.audio_sent(item.turn_id)
            run = self.call.conversation.current_turn
            if run is not None and run.turn_id == item.turn_id:
                self.call.conversation.played(item.end_ms)
            with contextlib.suppress(ConnectionError, OSError):
                if self.writer.transport.get_write_buffer_size() > 64 * 1024:
                    await self.writer.drain()

    async def _pump(self) -> None:
        assert self.call is not None
        async for event in self.call.conversation.events():
            await self.send_event(event)

    # --- inbound -------------------------------------------------------------------------------------

    async def _on_audio(self, kind: int, payload: bytes) -> None:
        assert self.call is not None
        if not payload:
            return
        if len(payload) % 2:
            raise Malformed(
                "odd_length", f"an audio frame of {len(payload)} bytes is not whole 16-bit samples"
            )
        if kind != self.kind or not self._greeted:
            await self._set_kind(kind)
        await self.call.conversation.push_audio(payload, AudioFormat(audio_io.Encoding.PCM16, self.rate, 1))
        if not self._greeted:
            self._greeted = True
            await self.call.greet()

    async def _set_kind(self, kind: int) -> None:
        """The channel's rate decides the reply's: ask the session for it (or the closest offered)."""
        assert self.call is not None
        self.flush(count=False)
        self.kind, self.rate = kind, AUDIO_RATES[kind]
        wanted = session_rate(self.rate)
        if wanted != self.out_rate:
            self.out_rate = wanted
            await self.call.conversation.update({"output": {"sample_rate": wanted, "encoding": "pcm16"}})
        self._resampler = (
            audio_io.StreamResampler(self.out_rate, self.rate) if self.out_rate != self.rate else None
        )

    async def _read_loop(self) -> str:
        """Frames until the call ends; returns how it ended."""
        assert self.call is not None
        limit = self.config.audiosocket_max_frame_bytes
        while True:
            kind, payload = await read_frame(self.reader, limit)
            if kind in AUDIO_RATES:
                await self._on_audio(kind, payload)
            elif kind == KIND_DTMF:
                digit = payload.decode("ascii", "replace")
                if len(digit) != 1 or digit not in DTMF_DIGITS:
                    raise Malformed("bad_dtmf", f"DTMF payload {payload!r} is not one digit")
                self.call.dtmf(digit)
            elif kind == KIND_HANGUP:
                return "hangup"
            elif kind == KIND_ERROR:
                code = payload[0] if payload else 0
                log.warning("peer error frame", extra=kv(call_id=self.call.call_id, code=code))
                return f"peer_error_{code:#04x}"
            else:  # a second UUID
                raise Malformed("bad_kind", "a UUID frame after the call started")

    # --- the call ------------------------------------------------------------------------------------

    async def run(self) -> None:
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            kind, payload = await asyncio.wait_for(
                read_frame(self.reader, self.config.audiosocket_max_frame_bytes), UUID_TIMEOUT_S
            )
            if kind != KIND_UUID or len(payload) != 16:
                raise Malformed("no_uuid", "the first frame must be the 16-byte UUID (kind 0x01)")
        except (Malformed, TimeoutError) as exc:
            why = exc.why if isinstance(exc, Malformed) else "no_uuid"
            metrics.MALFORMED_FRAMES.labels(transport="audiosocket", why=why).inc()
            log.warning("connection refused", extra=kv(why=why, message=str(exc)))
            await self.hang_up()
            return
        except PeerHungUp:
            return
        call_id = str(uuid.UUID(bytes=payload))
        try:
            self.call = await self.manager.start(
                "audiosocket",
                call_id,
                input_format=AudioFormat(audio_io.Encoding.PCM16, 8000, 1),
                output={"sample_rate": 8000, "encoding": "pcm16"},
                session_id=await self.manager.resume_id("audiosocket", call_id),
                meta={"uuid": call_id, "peer": str(self.writer.get_extra_info("peername"))},
                remember=True,
            )
        except CallRefused as exc:
            if exc.reason == "not_found":  # the remembered session expired: a new one
                self.call = await self._start_fresh(call_id)
            if self.call is None:
                metrics.CALL_REFUSED.labels(transport="audiosocket", reason=exc.reason).inc()
                log.warning("call refused", extra=kv(call_id=call_id, reason=exc.reason, message=str(exc)))
                await self.hang_up()
                return
        with log_context(session_id=self.call.session_id):
            await self._serve(self.call)

    async def _start_fresh(self, call_id: str) -> Call | None:
        try:
            return await self.manager.start(
                "audiosocket",
                call_id,
                input_format=AudioFormat(audio_io.Encoding.PCM16, 8000, 1),
                output={"sample_rate": 8000, "encoding": "pcm16"},
                meta={"uuid": call_id},
                remember=True,
            )
        except CallRefused:
            return None

    async def _serve(self, call: Call) -> None:
        pacer = asyncio.create_task(self._pace())
        pump = asyncio.create_task(self._pump())
        reading = asyncio.create_task(self._read_loop())
        call.start_timer(self.hang_up)
        end = "hangup"
        try:
            while True:
                done, _ = await asyncio.wait({reading, pump, pacer}, return_when=asyncio.FIRST_COMPLETED)
                if reading in done:
                    try:
                        end = reading.result()
                        if end.startswith("peer_error"):
                            await self.hang_up()
                    except PeerHungUp:
                        end = "hangup"
                    except Malformed as exc:
                        end = "malformed"
                        metrics.MALFORMED_FRAMES.labels(transport="audiosocket", why=exc.why).inc()
                        log.warning(
                            "malformed frame", extra=kv(call_id=call.call_id, why=exc.why, message=str(exc))
                        )
                        await self.hang_up()
                    except (ConnectionError, OSError):
                        end = "hangup"
                    break
                if self._hung_up_by_us or pump in done or pacer in done:
                    if pacer in done and not pacer.cancelled() and pacer.exception() is not None:
                        log.warning("pacer failed", extra=kv(error=repr(pacer.exception())))
                    await self.hang_up()
                    end = call.end_reason or "server"
                    break
        finally:
            self._closing = True
            self._wake.set()
            for task in (reading, pacer):
                if not task.done():
                    task.cancel()
            await call.end(end)
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(pump, 5)
            for task in (reading, pacer, pump):
                if not task.done():
                    task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task


class AudioSocketServer:
    """The TCP listener; every connection is one call."""

    def __init__(self, manager: CallManager, config: GatewaySettings) -> None:
        self.manager, self.config = manager, config
        self.server: asyncio.Server | None = None
        self.connections: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]

    async def start(self) -> None:
        self.server = await asyncio.start_server(
            self._handle, self.config.audiosocket_host, self.config.audiosocket_port
        )
        log.info("audiosocket listening", extra=kv(host=self.config.audiosocket_host, port=self.port))

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.connections.add(task)
        started = time.monotonic()
        try:
            await AudioSocketCall(self.manager, self.config, reader, writer).run()
        except Exception:
            log.exception(
                "audiosocket connection failed", extra=kv(seconds=round(time.monotonic() - started, 1))
            )
            with contextlib.suppress(Exception):
                writer.write(HANGUP_FRAME)
        finally:
            self.connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 2)

    async def stop(self) -> None:
        if self.server is None:
            return
        self.server.close()
        for task in list(self.connections):
            task.cancel()
        for task in list(self.connections):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.wait_closed(), 5)
