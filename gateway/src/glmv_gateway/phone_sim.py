"""Phone-side simulators written from the protocols, for tests and benchmarks.

``TwilioCall``: what Twilio does on a bidirectional ``<Connect><Stream>``: ``connected`` and
``start`` (random ``MZ``/``CA``/``AC`` ids, custom parameters), ``media`` every 20 ms with 160 bytes
of 8 kHz µ-law (string ``sequenceNumber``, ``chunk`` and ``timestamp``), ``dtmf``, ``stop``; the
audio it receives is "played" at 8000 bytes/s and each ``mark`` is echoed when the audio sent
before it has played; ``clear`` drops the buffered audio and echoes every pending mark at once.

``AudioSocketCall``: what Asterisk's ``AudioSocket()`` does: connect, send the UUID frame, then
20 ms signed-linear frames (kind 0x10 at 8 kHz, or another rate kind), DTMF (0x03), and hang up
with 0x00 or by closing; it records every frame the server sends with its arrival time.

Both send caller audio in real time and keep what the benchmark needs: when the caller's speech
ended and when the first reply frame arrived after it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets
import struct
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from glmv_common import audio as audio_io

FRAME_S = 0.02
MULAW_FRAME = 160


def speech(path: Path, sample_rate: int, encoding: str = "pcm16") -> bytes:
    """A speech file as raw mono audio at ``sample_rate`` in ``encoding``."""
    samples, rate = audio_io.decode_file(path.read_bytes())
    mono = audio_io.first_channel(samples)
    return audio_io.encode_pcm(audio_io.resample(mono, rate, sample_rate), encoding)


def silence(seconds: float, sample_rate: int, encoding: str = "pcm16") -> bytes:
    return audio_io.encode_pcm(np.zeros(int(seconds * sample_rate), np.float32), encoding)


class _Clock:
    """Real-time sender schedule: frame n at t0 + n * 20 ms."""

    def __init__(self) -> None:
        self.due: float | None = None

    async def tick(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self.due is None or self.due < now - 0.1:
            self.due = now
        if self.due > now:
            await asyncio.sleep(self.due - now)
        self.due += FRAME_S


@dataclass
class Reply:
    """Reply audio received between two caller utterances."""

    first_frame_at: float | None = None
    frames: list[tuple[float, bytes]] = field(default_factory=list)


# --- Twilio --------------------------------------------------------------------------------------------


class TwilioCall:
    def __init__(
        self,
        url: str,
        *,
        parameters: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        playback: bool = True,
    ) -> None:
        self.url, self.parameters, self.headers = url, parameters or {}, headers or {}
        self.stream_sid = "MZ" + secrets.token_hex(16)
        self.call_sid = "CA" + secrets.token_hex(16)
        self.account_sid = "AC" + secrets.token_hex(16)
        self.playback = playback
        self.ws: Any = None
        self._seq = 0
        self._chunk = 0
        self._started = 0.0
        self._clock = _Clock()
        self._buffer: deque[tuple[str, bytes | str]] = deque()  # ("audio", bytes) | ("mark", name)
        self.received: list[tuple[float, bytes]] = []  # every media payload with its arrival time
        self.marks_sent: list[str] = []  # names the server sent
        self.played_marks: list[str] = []  # echoed because the audio before them played
        self.cleared_marks: list[str] = []  # echoed because of a clear
        self.clears: list[float] = []
        self.messages: list[dict[str, Any]] = []
        self.speech_ended_at: list[float] = []
        self.closed = asyncio.Event()
        self.close_code: int | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> TwilioCall:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _next_seq(self) -> str:
        self._seq += 1
        return str(self._seq)

    async def _send(self, message: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(message))

    async def connect(self) -> None:
        from websockets.asyncio.client import connect

        self.ws = await connect(self.url, additional_headers=self.headers, open_timeout=30)
        self._started = time.monotonic()
        await self._send({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        await self._send(
            {
                "event": "start",
                "sequenceNumber": self._next_seq(),
                "start": {
                    "accountSid": self.account_sid,
                    "streamSid": self.stream_sid,
                    "callSid": self.call_sid,
                    "tracks": ["inbound"],
                    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                    "customParameters": self.parameters,
                },
                "streamSid": self.stream_sid,
            }
        )
        self._tasks = [asyncio.create_task(self._read())]
        if self.playback:
            self._tasks.append(asyncio.create_task(self._play()))

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                message = json.loads(raw)
                self.messages.append(message)
                kind = message.get("event")
                if kind == "media":
                    data = base64.b64decode(message["media"]["payload"])
                    self.received.append((time.perf_counter(), data))
                    self._buffer.append(("audio", data))
                elif kind == "mark":
                    name = message["mark"]["name"]
                    self.marks_sent.append(name)
                    self._buffer.append(("mark", name))
                elif kind == "clear":
                    self.clears.append(time.perf_counter())
                    pending = [v for k, v in self._buffer if k == "mark"]
                    self._buffer.clear()
                    for name in pending:
                        assert isinstance(name, str)
                        self.cleared_marks.append(name)
                        await self._echo(name)
        except Exception:  # the connection closed
            pass
        finally:
            self.close_code = getattr(self.ws, "close_code", None)
            self.closed.set()

    async def _echo(self, name: str) -> None:
        with contextlib.suppress(Exception):
            await self._send(
                {
                    "event": "mark",
                    "sequenceNumber": self._next_seq(),
                    "streamSid": self.stream_sid,
                    "mark": {"name": name},
                }
            )

    async def _play(self) -> None:
        """Play buffered audio at 8000 bytes/s; echo each mark when the audio before it has played."""
        clock = _Clock()
        while not self.closed.is_set():
            await clock.tick()
            budget = MULAW_FRAME
            while self._buffer:
                kind, value = self._buffer[0]
                if kind == "mark":
                    self._buffer.popleft()
                    assert isinstance(value, str)
                    self.played_marks.append(value)
                    await self._echo(value)
                    continue
                if budget == 0:
                    break
                assert isinstance(value, bytes)
                take = min(budget, len(value))
                budget -= take
                if take == len(value):
                    self._buffer.popleft()
                else:
                    self._buffer[0] = ("audio", value[take:])

    @property
    def buffered_bytes(self) -> int:
        return sum(len(v) for k, v in self._buffer if k == "audio" and isinstance(v, bytes))

    async def send_audio(self, mulaw: bytes, *, speech: bool = False) -> None:
        """Caller audio in real time, 20 ms per message; ``speech``: note when it ended."""
        from websockets.exceptions import ConnectionClosed

        for i in range(0, len(mulaw), MULAW_FRAME):
            await self._clock.tick()
            if self.closed.is_set():
                return  # the server ended the call
            self._chunk += 1
            try:
                await self._send_media(mulaw[i : i + MULAW_FRAME])
            except ConnectionClosed:
                return
        if speech:
            self.speech_ended_at.append(time.perf_counter())

    async def _send_media(self, payload: bytes) -> None:
        await self._send(
            {
                "event": "media",
                "sequenceNumber": self._next_seq(),
                "media": {
                    "track": "inbound",
                    "chunk": str(self._chunk),
                    "timestamp": str(round((time.monotonic() - self._started) * 1000)),
                    "payload": base64.b64encode(payload).decode(),
                },
                "streamSid": self.stream_sid,
            }
        )

    async def send_silence_until(self, predicate: Any, timeout: float) -> bool:
        """Send line silence until ``predicate()`` holds; False on timeout."""
        frame = b"\xff" * MULAW_FRAME  # µ-law silence
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            if self.closed.is_set():
                return bool(predicate())
            await self.send_audio(frame)
        return bool(predicate())

    async def dtmf(self, digit: str) -> None:
        await self._send(
            {
                "event": "dtmf",
                "streamSid": self.stream_sid,
                "sequenceNumber": self._next_seq(),
                "dtmf": {"track": "inbound_track", "digit": digit},
            }
        )

    async def stop(self) -> None:
        await self._send(
            {
                "event": "stop",
                "sequenceNumber": self._next_seq(),
                "stop": {"accountSid": self.account_sid, "callSid": self.call_sid},
                "streamSid": self.stream_sid,
            }
        )

    def first_reply_after(self, t: float) -> float | None:
        return next((at for at, _ in self.received if at >= t), None)

    async def close(self) -> None:
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await self.ws.close()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


# --- Asterisk AudioSocket ------------------------------------------------------------------------------

AUDIO_KINDS = {8000: 0x10, 12000: 0x11, 16000: 0x12, 24000: 0x13, 32000: 0x14, 44100: 0x15, 48000: 0x16}


class AudioSocketCall:
    def __init__(self, host: str, port: int, *, call_uuid: uuid.UUID | None = None, rate: int = 8000) -> None:
        self.host, self.port = host, port
        self.uuid = call_uuid or uuid.uuid4()
        self.rate, self.kind = rate, AUDIO_KINDS[rate]
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.frames: list[tuple[float, int, bytes]] = []  # (arrival, kind, payload) from the server
        self.hung_up = asyncio.Event()  # the server sent 0x00
        self.closed = asyncio.Event()  # the server closed the socket
        self.speech_ended_at: list[float] = []
        self._clock = _Clock()
        self._reader_task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> AudioSocketCall:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self, send_uuid: bool = True) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self._reader_task = asyncio.create_task(self._read())
        if send_uuid:
            self.send_raw(struct.pack(">BH", 0x01, 16) + self.uuid.bytes)

    def send_raw(self, data: bytes) -> None:
        assert self.writer is not None
        self.writer.write(data)

    async def _read(self) -> None:
        assert self.reader is not None
        try:
            while True:
                header = await self.reader.readexactly(3)
                kind, length = struct.unpack(">BH", header)
                payload = await self.reader.readexactly(length) if length else b""
                self.frames.append((time.perf_counter(), kind, payload))
                if kind == 0x00:
                    self.hung_up.set()
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            self.closed.set()

    @property
    def audio_frames(self) -> list[tuple[float, int, bytes]]:
        return [f for f in self.frames if f[1] != 0x00]

    async def send_audio(self, pcm: bytes, *, speech: bool = False) -> None:
        size = int(self.rate * FRAME_S) * 2
        for i in range(0, len(pcm), size):
            await self._clock.tick()
            if self.closed.is_set():
                return
            chunk = pcm[i : i + size]
            self.send_raw(struct.pack(">BH", self.kind, len(chunk)) + chunk)
        if speech:
            self.speech_ended_at.append(time.perf_counter())

    async def send_silence_until(self, predicate: Any, timeout: float) -> bool:
        frame = bytes(int(self.rate * FRAME_S) * 2)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            if self.closed.is_set():
                return bool(predicate())
            await self.send_audio(frame)
        return bool(predicate())

    def dtmf(self, digit: str) -> None:
        self.send_raw(struct.pack(">BH", 0x03, 1) + digit.encode("ascii"))

    async def hang_up(self) -> None:
        """Asterisk's side ends the call: the hang-up frame, then the socket closes."""
        with contextlib.suppress(ConnectionError, OSError):
            self.send_raw(b"\x00\x00\x00")
            assert self.writer is not None
            await self.writer.drain()
        await self.close()

    def first_reply_after(self, t: float) -> float | None:
        return next((at for at, kind, _ in self.frames if kind != 0x00 and at >= t), None)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()
        if self._reader_task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._reader_task, 5)
