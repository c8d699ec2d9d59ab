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
TRUNCATIONS = Counter(
    "glmv_gateway_truncated_turns_total", "Assistant turns stored cut to what the listener heard"
)
BARGE_INS = Counter("glmv_gateway_barge_ins_total", "Replies interrupted by the user", ["by"])
SPEECH_END_TO_FIRST_AUDIO = Histogram(
    "glmv_gateway_speech_end_to_first_audio_seconds",
    "End of the user's speech (detected or committed) to the first reply audio",
    buckets=_LATENCY,
)
ACTIVE_CONVERSATIONS = Gauge(
    "glmv_gateway_active_conversations", "Duplex conversations open now", ["transport"]
)
UTTERANCES = Counter("glmv_gateway_utterances_total", "User utterances committed", ["by"])

# --- component versions and LM replicas -------------------------------------------------------------
VERSION_UP = Gauge(
    "glmv_gateway_version_up",
    "1 while a component version takes new sessions (serving, compatible, not draining)",
    ["component", "version"],
)
VERSION_SHARE = Gauge(
    "glmv_gateway_version_traffic_share", "Share of new sessions a version gets", ["component", "version"]
)
VERSION_SESSIONS = Counter(
    "glmv_gateway_version_sessions_total", "Sessions assigned to a version", ["component", "version"]
)
VERSION_MOVES = Counter(
    "glmv_gateway_version_moves_total",
    "Sessions moved off a version that disappeared or failed",
    ["component", "from_version", "to_version"],
)
COMPONENT_CALLS = Counter(
    "glmv_gateway_component_calls_total", "Calls to a model service version", ["component", "version"]
)
COMPONENT_ERRORS = Counter(
    "glmv_gateway_component_errors_total",
    "Failed calls to a model service version",
    ["component", "version", "code"],
)
LM_REPLICA_UP = Gauge("glmv_gateway_lm_replica_up", "1 while an LM replica answers SERVING", ["replica"])
LM_REPLICA_CALLS = Counter(
    "glmv_gateway_lm_replica_calls_total", "Generate calls per LM replica", ["replica", "affinity"]
)

# --- OpenAI Realtime endpoint ---------------------------------------------------------------------
REALTIME_EVENTS = Counter(
    "glmv_gateway_realtime_client_events_total", "OpenAI Realtime client events received", ["type", "dialect"]
)
REALTIME_ERRORS = Counter(
    "glmv_gateway_realtime_errors_total", "Realtime error events sent, by error code", ["code"]
)
# telephony
ACTIVE_CALLS = Gauge("glmv_gateway_active_calls", "Phone calls connected now", ["transport"])
CALLS = Counter("glmv_gateway_calls_total", "Phone calls ended, by how they ended", ["transport", "end"])
CALL_SECONDS = Histogram(
    "glmv_gateway_call_duration_seconds",
    "Phone call duration",
    ["transport"],
    buckets=(1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200),
)
CALL_BARGE_INS = Counter(
    "glmv_gateway_call_barge_ins_total", "Reply audio flushed because the caller spoke", ["transport"]
)
CALL_SPEECH_END_TO_FIRST_AUDIO = Histogram(
    "glmv_gateway_call_speech_end_to_first_audio_seconds",
    "End of the caller's speech to the first reply audio frame sent to the phone side",
    ["transport"],
    buckets=_LATENCY,
)
CALL_REFUSED = Counter("glmv_gateway_calls_refused_total", "Calls refused at start", ["transport", "reason"])
CALL_DTMF = Counter("glmv_gateway_call_dtmf_total", "DTMF digits received", ["transport"])
MALFORMED_FRAMES = Counter(
    "glmv_gateway_telephony_malformed_frames_total", "Calls ended by a malformed frame", ["transport", "why"]
)
for _transport in ("twilio", "audiosocket"):  # exported from the start, before the first call
    ACTIVE_CALLS.labels(transport=_transport)
    CALLS.labels(transport=_transport, end="hangup")
    CALL_SECONDS.labels(transport=_transport)
    CALL_BARGE_INS.labels(transport=_transport)
    CALL_SPEECH_END_TO_FIRST_AUDIO.labels(transport=_transport)
    CALL_REFUSED.labels(transport=_transport, reason="call_limit")
    CALL_DTMF.labels(transport=_transport)
MALFORMED_FRAMES.labels(transport="audiosocket", why="bad_kind")
