"""Prometheus metrics of the tokenizer service (``glmv_tokenizer_*``)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from prometheus_client import Counter, Gauge, Histogram

T = TypeVar("T")
R = TypeVar("R")

BATCH_SIZE = Histogram(
    "glmv_tokenizer_batch_size", "Requests per model forward", buckets=(1, 2, 4, 8, 16, 32, 64)
)
FORWARD_SECONDS = Histogram(
    "glmv_tokenizer_forward_seconds",
    "Model time per batched forward",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
QUEUE_DEPTH = Gauge("glmv_tokenizer_queue_depth", "Requests waiting for or inside a forward")
AUDIO_SECONDS = Counter("glmv_tokenizer_audio_seconds_total", "Audio tokenized (seconds)")
TOKENS = Counter("glmv_tokenizer_tokens_total", "Speech tokens produced")
RTF = Histogram(
    "glmv_tokenizer_rtf",
    "Model seconds per audio second, per forward",
    buckets=(0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2),
)


def measured(
    fn: Callable[[list[T]], Sequence[R]], seconds_of: Callable[[T], float]
) -> Callable[[list[T]], Sequence[R]]:
    """Wrap a batch function so each forward records its size, latency, audio and tokens."""

    def forward(items: list[T]) -> Sequence[R]:
        started = time.perf_counter()
        results = fn(items)
        elapsed = time.perf_counter() - started
        audio = sum(seconds_of(item) for item in items)
        BATCH_SIZE.observe(len(items))
        FORWARD_SECONDS.observe(elapsed)
        AUDIO_SECONDS.inc(audio)
        TOKENS.inc(sum(len(r) for r in results))  # type: ignore[arg-type]
        if audio > 0:
            RTF.observe(elapsed / audio)
        return results

    return forward


LISTEN_ACTIVE = Gauge("glmv_tokenizer_listen_streams", "Listen streams open now")
UTTERANCES = Counter(
    "glmv_tokenizer_listen_utterances_total",
    "Listen utterances by how they ended (vad, commit, close, cleared)",
    ["end"],
)
VAD_AUDIO_SECONDS = Counter("glmv_tokenizer_vad_audio_seconds_total", "Audio scored by the VAD (seconds)")
VAD_MODEL_SECONDS = Counter("glmv_tokenizer_vad_model_seconds_total", "VAD model time (seconds)")
