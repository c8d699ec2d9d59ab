"""Incremental tokenization of audio that arrives in chunks (no gRPC; unit-testable alone).

The published encoder is block-causal: a 50 Hz frame sees every earlier frame and its own block of
``quantize_causal_block_size`` (200) frames, never a later block. With causal convolutions the
tokens of a block therefore depend only on audio up to the end of that block plus the STFT's half
window (200 samples), so they are emitted as soon as that much audio has arrived. 30 s windows are
independent, so a window's tokens are all final once the window is full. The rest comes at
:meth:`StreamingTokenizer.finish`.

Where streaming can differ from whole-utterance tokenization: the log-mel floor (``max - 8`` of
the log-mel values) is global to a 30 s window. Tokens of an early block are computed with the
maximum of the audio received so far; if a louder sound arrives later in the same window, the
whole-utterance floor is higher and quiet frames of earlier blocks are floored differently, which
can change some early tokens. Tokens already emitted are never revised. Nothing else differs: full
windows, the last window (padded as the reference pads it) and tokens emitted at ``finish`` match
:meth:`SpeechTokenizer.tokenize_batch` exactly. Without a block size (or with causal layers, whose
mask ignores blocks) no early tokens are emitted except per full window.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from glmv_common.errors import AudioError, InvalidRequest

from .tokenizer import DEFAULT_MAX_SECONDS, SpeechTokenizer, WindowRequest

STFT_LOOKAHEAD = 200  # samples past a frame's centre that its STFT window reads (n_fft / 2)


@dataclass(frozen=True)
class WindowJob:
    request: WindowRequest  # the current window's audio so far
    start: int  # first token index (within the window) to emit
    end: int  # one past the last final token index


class StreamPlan:
    """The stream's state machine: which window prefixes to tokenize and which of their tokens are final."""

    def __init__(
        self,
        *,
        window_samples: int,
        samples_per_token: int,
        block_tokens: int | None,
        max_samples: int | None = None,
        lookahead: int = STFT_LOOKAHEAD,
    ) -> None:
        self.window_samples = window_samples
        self.samples_per_token = samples_per_token
        self.block_samples = None if block_tokens is None else block_tokens * samples_per_token
        self.block_tokens = block_tokens
        self.max_samples = max_samples
        self.lookahead = lookahead
        self._chunks: list[np.ndarray] = []
        self._buffered = 0  # samples of the current window
        self._window_index = 0
        self._emitted = 0  # tokens of the current window already handed out
        self.total_samples = 0
        self.finished = False

    def _window_audio(self) -> np.ndarray:
        if len(self._chunks) > 1:
            self._chunks = [np.concatenate(self._chunks)]
        return self._chunks[0] if self._chunks else np.zeros(0, dtype=np.float32)

    def _pad_to(self) -> int | None:
        # the reference pads the last window of a multi-window utterance to the full 30 s
        return self.window_samples if self._window_index > 0 else None

    def push(self, samples: np.ndarray) -> list[WindowJob]:
        if self.finished:
            raise InvalidRequest("audio pushed after the end of the stream")
        arr = np.asarray(samples, dtype=np.float32).reshape(-1)
        if not np.isfinite(arr).all():
            raise AudioError("audio contains NaN or infinite samples")
        self.total_samples += len(arr)
        if self.max_samples is not None and self.total_samples > self.max_samples:
            raise InvalidRequest(
                f"stream is longer than the maximum of {self.max_samples / 16000:g} s of audio"
            )
        jobs: list[WindowJob] = []
        while len(arr):
            take = min(len(arr), self.window_samples - self._buffered)
            self._chunks.append(arr[:take])
            self._buffered += take
            arr = arr[take:]
            if self._buffered == self.window_samples:  # a full window: every token is final
                total = self.window_samples // self.samples_per_token
                jobs.append(
                    WindowJob(WindowRequest(self._window_audio(), self._pad_to()), self._emitted, total)
                )
                self._chunks, self._buffered, self._emitted = [], 0, 0
                self._window_index += 1
        if self.block_samples and self._buffered:
            blocks = max(0, self._buffered - self.lookahead) // self.block_samples
            final = blocks * self.block_tokens  # type: ignore[operator]
            if final > self._emitted:
                jobs.append(
                    WindowJob(WindowRequest(self._window_audio(), self._pad_to()), self._emitted, final)
                )
                self._emitted = final
        return jobs

    def finish(self) -> list[WindowJob]:
        if self.finished:
            return []
        self.finished = True
        if not self._buffered:
            return []
        total = -(-self._buffered // self.samples_per_token)
        job = WindowJob(WindowRequest(self._window_audio(), self._pad_to()), self._emitted, total)
        self._chunks, self._buffered, self._emitted = [], 0, 0
        return [job] if total > job.start else []

    @staticmethod
    def accept(job: WindowJob, tokens: list[int]) -> list[int]:
        return tokens[job.start : job.end]


class StreamingTokenizer:
    """Synchronous streaming front-end over a :class:`SpeechTokenizer` (16 kHz mono float32 in)."""

    def __init__(
        self,
        tokenizer: SpeechTokenizer,
        max_seconds: float = DEFAULT_MAX_SECONDS,
        run: Callable[[WindowRequest], list[int]] | None = None,
    ) -> None:
        self.plan = make_plan(tokenizer, max_seconds)
        self._run = run or (lambda req: tokenizer.tokenize_batch([req])[0])
        self.emitted = 0

    def _do(self, jobs: list[WindowJob]) -> list[int]:
        out: list[int] = []
        for job in jobs:
            out.extend(StreamPlan.accept(job, self._run(job.request)))
        self.emitted += len(out)
        return out

    def feed(self, samples_16k: np.ndarray) -> list[int]:
        """Append audio; returns the tokens that became final (possibly none)."""
        return self._do(self.plan.push(samples_16k))

    def finish(self) -> list[int]:
        """End of stream: the remaining tokens."""
        return self._do(self.plan.finish())


def make_plan(tokenizer: SpeechTokenizer, max_seconds: float = DEFAULT_MAX_SECONDS) -> StreamPlan:
    return StreamPlan(
        window_samples=tokenizer.window_samples,
        samples_per_token=tokenizer.samples_per_token,
        block_tokens=tokenizer.block_tokens,
        max_samples=int(max_seconds * 16000),
    )
