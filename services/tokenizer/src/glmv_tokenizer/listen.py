"""One ``Listen`` stream: continuous audio in, utterances (cut by the VAD or by COMMIT) tokenized
while they are spoken. No gRPC here beyond the message types; the servicer drives it.

Positions are 16 kHz sample indices from the stream's first sample (after resampling); events
report them in ms. With detection on:

* a window whose speech probability is ``>= threshold`` makes a candidate start; it becomes an
  utterance once speech (no window below the exit threshold ``threshold - 0.15``) has lasted
  :data:`MIN_SPEECH_MS`; shorter blips are ignored. The utterance's audio starts
  ``prefix_padding_ms`` before the detected start (never before the previous utterance's end nor
  the stream's start); ``SpeechStarted.audio_start_ms`` is that padded start and
  ``speech_start_ms`` the detected one.
* audio is fed to the streaming tokenizer as soon as the detector has scored it as not silent, so
  at the end of speech only the last encoder block is left to compute.
* once windows below the exit threshold have lasted ``silence_duration_ms`` (a window at or above
  ``threshold`` resets the count), the utterance ends where that silence began
  (``SpeechStopped.audio_end_ms``); the silence itself is not part of the utterance. The model's
  probability trails the audio by about one window, so the end is placed :data:`END_LAG` (one
  32 ms window) before the first window below the exit threshold.

With detection off, all audio since the last COMMIT (or CLEAR) forms the utterance.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from glmv_common.errors import InvalidRequest
from glmv_common.logs import get_logger
from glmvoice.v1 import tokenizer_pb2

from . import metrics
from .streaming import StreamPlan, WindowJob
from .tokenizer import WindowRequest
from .vad import SAMPLE_RATE, WINDOW, SileroModel, VadStream

log = get_logger(__name__)

MIN_SPEECH_MS = 96  # speech shorter than this (three 32 ms windows) never opens an utterance
END_LAG = WINDOW  # the model's probability trails the end of speech by about one window
EXIT_MARGIN = 0.15  # the exit threshold is this far below the start threshold
DEFAULT_THRESHOLD = 0.5
DEFAULT_PREFIX_MS = 300
DEFAULT_SILENCE_MS = 500
MAX_PREFIX_MS = 5_000
MIN_SILENCE_MS = 32
MAX_SILENCE_MS = 10_000
_PER_MS = SAMPLE_RATE // 1000

Event = tokenizer_pb2.ListenEvent
Submit = Callable[[np.ndarray | WindowRequest], Awaitable[list[int]]]


@dataclass(frozen=True)
class VadSettings:
    enabled: bool = False
    threshold: float = DEFAULT_THRESHOLD
    prefix_padding_ms: int = DEFAULT_PREFIX_MS
    silence_duration_ms: int = DEFAULT_SILENCE_MS

    @property
    def exit_threshold(self) -> float:
        return max(self.threshold - EXIT_MARGIN, 0.0)

    @classmethod
    def from_proto(cls, vad: tokenizer_pb2.VadConfig) -> VadSettings:
        """Validated settings; unset fields take the defaults."""
        threshold = vad.threshold if vad.HasField("threshold") else DEFAULT_THRESHOLD
        if not 0.0 < threshold < 1.0:
            raise InvalidRequest(f"vad.threshold must be between 0 and 1 (exclusive), got {threshold:g}")
        prefix = vad.prefix_padding_ms if vad.HasField("prefix_padding_ms") else DEFAULT_PREFIX_MS
        if prefix > MAX_PREFIX_MS:
            raise InvalidRequest(f"vad.prefix_padding_ms must be at most {MAX_PREFIX_MS}, got {prefix}")
        silence = vad.silence_duration_ms if vad.HasField("silence_duration_ms") else DEFAULT_SILENCE_MS
        if not MIN_SILENCE_MS <= silence <= MAX_SILENCE_MS:
            raise InvalidRequest(
                f"vad.silence_duration_ms must be between {MIN_SILENCE_MS} and {MAX_SILENCE_MS},"
                f" got {silence}"
            )
        return cls(bool(vad.enabled), float(threshold), int(prefix), int(silence))


def _ms(samples: int) -> int:
    return samples // _PER_MS


def _stopped(number: int, stop: int) -> Event:
    return Event(speech_stopped=tokenizer_pb2.SpeechStopped(utterance=number, audio_end_ms=_ms(stop)))


class _Utterance:
    def __init__(self, number: int, start: int, plan: StreamPlan) -> None:
        self.number = number
        self.start = start
        self.fed = start  # audio before this sample is in the plan
        self.plan = plan
        self.tokens: list[int] = []


class ListenSession:
    """State of one Listen stream; each method yields the events it causes."""

    def __init__(
        self,
        *,
        submit: Submit,
        new_plan: Callable[[], StreamPlan],
        vad_model: Callable[[], SileroModel],
        settings: VadSettings | None = None,
    ) -> None:
        self._submit = submit
        self._new_plan = new_plan
        self._vad_model = vad_model
        self.settings = VadSettings()
        self._vad: VadStream | None = None
        self.received = 0  # 16 kHz samples received so far
        self._recent = np.zeros(0, dtype=np.float32)  # audio [recent_start, received) not yet dropped
        self._recent_start = 0
        self._floor = 0  # no utterance may start before this (end of the previous one)
        self._candidate: int | None = None  # detected start of speech not yet long enough
        self._silence: int | None = None  # where the current run of silence began
        self._utt: _Utterance | None = None
        self._count = 0
        if settings is not None:
            self.configure(settings)

    # --- settings --------------------------------------------------------------------------------

    def configure(self, settings: VadSettings) -> None:
        was = self.settings.enabled
        self.settings = settings
        if settings.enabled and not was:
            if self._vad is None:
                self._vad = VadStream(self._vad_model())
                self._vad.position = self.received
            self._vad.reset()
            self._silence = None
        if not settings.enabled:
            self._candidate = None
            self._silence = None

    # --- audio -----------------------------------------------------------------------------------

    async def audio(self, samples: np.ndarray) -> AsyncIterator[Event]:
        samples = np.asarray(samples, dtype=np.float32)
        self._recent = np.concatenate([self._recent, samples]) if len(self._recent) else samples
        self.received += len(samples)
        if not self.settings.enabled:
            if self._vad is not None:
                self._vad.skip(samples)
            if len(samples) and self._utt is None:
                self._open(self.received - len(samples))
            await self._feed(self.received)
            self._trim()
            return
        assert self._vad is not None
        for start, prob in await self._vad.push(samples):
            async for event in self._window(start, prob):
                yield event
        if self._utt is not None:
            scored = self._vad.position
            # hold back the last window: it may yet turn out to lie past the end of speech
            await self._feed(scored - END_LAG if self._silence is None else self._speech_end())
        self._trim()

    async def _window(self, start: int, prob: float) -> AsyncIterator[Event]:
        s = self.settings
        end = start + WINDOW
        if self._utt is None:
            if self._candidate is None:
                if prob >= s.threshold:
                    self._candidate = start
            elif prob < s.exit_threshold:
                self._candidate = None
            if self._candidate is not None and end - self._candidate >= MIN_SPEECH_MS * _PER_MS:
                detected, self._candidate = self._candidate, None
                padded = max(detected - s.prefix_padding_ms * _PER_MS, self._floor, self._recent_start)
                utt = self._open(padded)
                log.info("speech started", extra={"utterance": utt.number, "audio_start_ms": _ms(padded)})
                yield Event(
                    speech_started=tokenizer_pb2.SpeechStarted(
                        utterance=utt.number, audio_start_ms=_ms(padded), speech_start_ms=_ms(detected)
                    )
                )
            return
        if prob >= s.threshold:
            self._silence = None
        elif prob < s.exit_threshold and self._silence is None:
            self._silence = start
        if self._silence is not None and end - self._silence >= s.silence_duration_ms * _PER_MS:
            stop = self._speech_end()
            self._silence = None
            utt = self._utt
            yield _stopped(utt.number, stop)
            yield await self._finish(stop, committed=False, end="vad")

    # --- controls --------------------------------------------------------------------------------

    async def commit(self) -> AsyncIterator[Event]:
        """End the utterance in progress now (an empty one if none)."""
        self._candidate = None
        self._silence = None
        if self._utt is None:
            self._open(self.received)
        yield await self._finish(self.received, committed=True, end="commit")

    def clear(self) -> Event:
        """Drop the utterance in progress (its audio and tokens)."""
        number = self._utt.number if self._utt is not None else 0
        if self._utt is not None:
            metrics.UTTERANCES.labels(end="cleared").inc()
            log.info("utterance cleared", extra={"utterance": number})
        self._utt = None
        self._candidate = None
        self._silence = None
        self._floor = self.received
        self._trim()
        return Event(cleared=tokenizer_pb2.UtteranceCleared(utterance=number))

    async def close(self, tail: np.ndarray) -> AsyncIterator[Event]:
        """The client half-closed: score the last audio and finish an utterance in progress."""
        async for event in self.audio(tail):
            yield event
        utt = self._utt
        if utt is None:
            return
        if self.settings.enabled:
            stop = self._speech_end() if self._silence is not None else self.received
            yield _stopped(utt.number, stop)
        else:
            stop = self.received
        yield await self._finish(stop, committed=False, end="close")

    # --- internals -------------------------------------------------------------------------------

    def _speech_end(self) -> int:
        assert self._silence is not None and self._utt is not None
        return max(self._silence - END_LAG, self._utt.fed)  # fed audio stays in the utterance

    def _open(self, start: int) -> _Utterance:
        self._count += 1
        self._utt = _Utterance(self._count, start, self._new_plan())
        return self._utt

    async def _feed(self, upto: int) -> None:
        utt = self._utt
        if utt is None or upto <= utt.fed:
            return
        a, b = utt.fed - self._recent_start, upto - self._recent_start
        await self._run(utt, utt.plan.push(self._recent[a:b]))
        utt.fed = upto

    async def _run(self, utt: _Utterance, jobs: list[WindowJob]) -> None:
        for job in jobs:
            utt.tokens.extend(StreamPlan.accept(job, await self._submit(job.request)))

    async def _finish(self, stop: int, *, committed: bool, end: str) -> Event:
        utt = self._utt
        assert utt is not None
        started = time.perf_counter()
        await self._feed(stop)
        await self._run(utt, utt.plan.finish())
        finish_ms = (time.perf_counter() - started) * 1e3
        self._utt = None
        self._floor = stop
        metrics.UTTERANCES.labels(end=end).inc()
        log.info(
            "utterance done",
            extra={
                "utterance": utt.number,
                "tokens": len(utt.tokens),
                "audio_start_ms": _ms(utt.start),
                "audio_end_ms": _ms(stop),
                "finish_ms": round(finish_ms, 2),
                "end": end,
            },
        )
        return Event(
            done=tokenizer_pb2.UtteranceDone(
                utterance=utt.number,
                tokens=utt.tokens,
                audio_start_ms=_ms(utt.start),
                audio_end_ms=_ms(stop),
                finish_ms=finish_ms,
                committed=committed,
            )
        )

    def _trim(self) -> None:
        """Drop audio no utterance can still use."""
        if self._utt is not None:
            keep = self._utt.fed
        elif self.settings.enabled:
            assert self._vad is not None
            origin = self._candidate if self._candidate is not None else self._vad.position
            keep = max(origin - self.settings.prefix_padding_ms * _PER_MS, self._floor)
        else:
            keep = self.received
        keep = min(max(keep, self._recent_start), self.received)
        if keep > self._recent_start:
            self._recent = self._recent[keep - self._recent_start :]
            self._recent_start = keep


__all__ = ["MIN_SPEECH_MS", "ListenSession", "VadSettings"]
