"""Prometheus metrics of the gateway."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY = (0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30, 60, 120)

TTFA = Histogram(
    "glmv_gateway_time_to_first_audio_seconds", "Turn start to first audio chunk", buckets=_LATENCY
)
TURN_SECONDS = Histogram("glmv_gateway_turn_duration_seconds", "Whole turn duration", buckets=_LATENCY)
STAGE_SECONDS = Histogram("glmv_gateway_stage_seconds", "Per-stage latency", ["stage"], buckets=_LATENCY)
ACTIVE_TURNS = Gauge("glmv_gateway_active_turns", "Turns streaming now")
TURNS = Counter("glmv_gateway_turns_total", "Finished turns", ["end_reason"])
ERRORS = Counter("glmv_gateway_errors_total", "Errors by component and code", ["component", "code"])
INTERRUPTED_TURNS = Counter(
    "glmv_gateway_interrupted_turns_total",
    "Turns found never finished (their gateway died mid-turn; the session lock expired)",
)
HTTP_ERRORS = Counter("glmv_gateway_http_errors_total", "4xx/5xx answers", ["status"])
RTF = Histogram(
    "glmv_gateway_rtf",
    "Turn wall time per second of reply audio",
    buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 5, 10),
)
LM_TOKENS_PER_S = Histogram(
    "glmv_gateway_lm_tokens_per_second",
    "LM decode speed per turn",
    buckets=(5, 10, 20, 30, 50, 75, 100, 200, 500, 1000, 5000),
)
