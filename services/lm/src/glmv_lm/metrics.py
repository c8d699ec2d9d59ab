"""Prometheus metrics of the LM service (``glmv_lm_*``), registered once per process."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

TOKENS = Counter("glmv_lm_generated_tokens_total", "Tokens generated and streamed", ["kind"])
PROMPT_TOKENS = Counter("glmv_lm_prompt_tokens_total", "Prompt tokens prefilled")
REQUESTS = Counter("glmv_lm_requests_total", "Finished generations by end reason", ["end_reason"])
ERRORS = Counter("glmv_lm_errors_total", "Failed or refused generations", ["kind"])
TTFT = Histogram(
    "glmv_lm_time_to_first_token_seconds",
    "Submission to first streamed token (queue time included)",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1, 1.5, 2.5, 5, 10, 30),
)
QUEUE_SECONDS = Histogram(
    "glmv_lm_queue_seconds",
    "Time a request waited for a batch slot",
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
BATCH_SIZE = Histogram(
    "glmv_lm_decode_batch_size",
    "Requests sharing each decode step",
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128),
)
ACTIVE = Gauge("glmv_lm_active_requests", "Requests holding a batch slot")
QUEUE_DEPTH = Gauge("glmv_lm_queue_depth", "Requests waiting for a batch slot")
STEP_SECONDS = Histogram(
    "glmv_lm_step_seconds",
    "Duration of one engine forward pass",
    ["phase"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5, 5),
)
PREFIX_HITS = Counter("glmv_lm_prefix_cache_hits_total", "Prompts that reused a cached prefix")
PREFIX_TOKENS = Counter("glmv_lm_prefix_cache_reused_tokens_total", "Prompt tokens not prefilled again")
PREFIX_CACHED = Gauge("glmv_lm_prefix_cache_tokens", "Tokens whose keys/values the prefix cache holds")
