"""Gateway settings (environment variables with the ``GLMV_GATEWAY_`` prefix)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from glmv_gateway.jobs.webhook_policy import WebhookPolicy, parse_host_list

DEFAULT_SCHEDULE = (10, 25, 50, 100, 150, 200)


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GLMV_GATEWAY_", extra="ignore")

    host: str = Field("127.0.0.1", description="HTTP bind address (0.0.0.0 in containers).")
    port: int = Field(8080, ge=0, le=65535, description="HTTP port.")
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Sessions, locks and API keys.")
    redis_timeout_s: float = Field(
        5.0, gt=0, description="Connect and read timeout of Redis calls (beyond it: 503)."
    )
    tokenizer_addr: str = Field("127.0.0.1:50051", description="host:port of the tokenizer service.")
    lm_addr: str = Field("127.0.0.1:50052", description="host:port of the LM service.")
    decoder_addr: str = Field("127.0.0.1:50053", description="host:port of the decoder service.")
    lm_addresses: str = Field(
        "",
        description="Comma-separated host:port of several LM replicas; a session's turns go to the one "
        "holding its prefix cache (rendezvous hashing on the session id, next one while it is down). "
        "Empty: lm_addr alone.",
    )
    versions_file: str = Field(
        "",
        description="JSON registry of tokenizer/decoder versions (id, addresses, weight, draining), "
        "re-read when it changes. Empty: one version per component at tokenizer_addr/decoder_addr.",
    )
    versions_poll_s: float = Field(
        1.0, gt=0, description="How often the versions file is checked and every version probed."
    )
    api_keys: str = Field(
        "", description="Comma-separated API keys accepted besides those stored in Redis (glmv:apikeys)."
    )
    max_upload_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="Largest accepted request body.")
    max_settings_bytes: int = Field(
        64 * 1024, ge=1024, description="Largest session settings body (POST/PATCH /v1/sessions)."
    )
    readyz_details: bool = Field(
        False,
        description="Show the models' ids, versions and checkpoint fingerprints on /readyz to callers "
        "without an API key (with a key they are always shown).",
    )
    max_audio_seconds: float = Field(120.0, gt=0, description="Longest accepted user utterance.")
    session_ttl_s: int = Field(
        24 * 3600, ge=60, description="Idle sessions expire after this (refreshed on use)."
    )
    lock_ttl_s: int = Field(
        300, ge=5, description="A turn lock expires after this (a crashed gateway frees it)."
    )
    max_turns_per_key: int = Field(8, ge=1, description="Concurrent turns one API key may run.")
    chunk_schedule: Annotated[tuple[int, ...], NoDecode] = Field(
        DEFAULT_SCHEDULE, description="Audio tokens per decoder chunk; the last size repeats."
    )
    tokenize_timeout_s: float = Field(60.0, gt=0, description="Deadline of a Tokenize call.")
    listen_timeout_s: float = Field(
        4 * 3600.0, gt=0, description="Deadline of a duplex session's Listen stream (a long call's length)."
    )
    turn_timeout_s: float = Field(
        600.0, gt=0, description="Deadline of the LM and decoder streams of a turn."
    )
    # batch jobs (Celery)
    broker_url: str = Field(
        "redis://127.0.0.1:6379/1", description="Celery broker (Redis by default; amqp://... for RabbitMQ)."
    )
    jobs_dir: str = Field(".run/jobs", description="Shared directory for job inputs and results.")
    job_result_ttl_s: int = Field(
        24 * 3600, ge=60, description="Job metadata and result files expire after this."
    )
    job_max_retries: int = Field(5, ge=0, description="Retries of a job whose services are UNAVAILABLE.")
    job_retry_backoff_s: float = Field(2.0, gt=0, description="First retry delay; doubles each retry.")
    job_visibility_timeout_s: int = Field(
        600, ge=1, description="A job whose worker died is redelivered after this (Redis broker)."
    )
    webhook_secret: str = Field("", description="HMAC-SHA256 key signing webhook bodies (X-GLMV-Signature).")
    webhook_allowed_hosts: str = Field(
        "",
        description="Comma-separated webhook hosts (name, *.suffix or IP) allowed even if private; "
        "when set, no other host is allowed.",
    )
    webhook_allow_private: bool = Field(
        False, description="Allow webhook targets on loopback/private/link-local addresses (SSRF risk)."
    )
    webhook_retries: int = Field(5, ge=0, description="Webhook delivery retries (exponential backoff).")
    webhook_backoff_s: float = Field(0.5, gt=0, description="First webhook retry delay; doubles each retry.")
    drain_timeout_s: float = Field(
        30.0,
        gt=0,
        description="On SIGTERM: stop accepting connections, let running turns finish for up to this long.",
    )
    demo_page: bool = Field(
        False,
        description="Serve the browser talk page at / and /demo/ (on in the local stack, off in images).",
    )
    demo_api_key: str = Field(
        "",
        description="API key the talk page's short-lived client secrets are minted for (server-side; "
        "the key never reaches the browser). Needed when demo_page is on.",
    )
    demo_model: str = Field(
        "glm-4-voice", description="Model name the talk page asks the realtime endpoint for."
    )
    # telephony (Twilio Media Streams, Asterisk AudioSocket)
    telephony_api_key: str = Field(
        "",
        description="API key phone calls run under (their sessions, turn slots and call limit); "
        "default: the first of API_KEYS.",
    )
    telephony_profile: str = Field(
        "", description="JSON session-settings patch every call's session starts from (the call profile)."
    )
    telephony_greeting: str = Field(
        "",
        description="Text instruction the assistant answers first when a call starts (empty: caller first).",
    )
    telephony_max_call_s: float = Field(3600.0, gt=0, description="A call is hung up after this long.")
    telephony_max_calls_per_key: int = Field(
        20, ge=1, description="Concurrent calls per API key (beyond it a call is refused at once)."
    )
    twilio_auth_token: str = Field(
        "", description="Twilio account auth token: validates X-Twilio-Signature on webhooks and streams."
    )
    twilio_validate_signature: bool | None = Field(
        None, description="Check X-Twilio-Signature (default: on when TWILIO_AUTH_TOKEN is set)."
    )
    twilio_public_url: str = Field(
        "",
        description="Public base URL Twilio reaches the gateway at (https://host[:port]); used in the "
        "TwiML stream URL and to check signatures behind a proxy. Default: from the request.",
    )
    audiosocket_host: str = Field("127.0.0.1", description="AudioSocket TCP bind address.")
    audiosocket_port: int = Field(
        0, ge=0, le=65535, description="AudioSocket TCP port served by the gateway process (0: off)."
    )
    audiosocket_max_frame_bytes: int = Field(
        8192, ge=320, le=65535, description="Largest AudioSocket payload accepted (bigger ends the call)."
    )
    log_level: str = Field("INFO")
    log_format: Literal["json", "text"] = Field("json")

    @field_validator("chunk_schedule", mode="before")
    @classmethod
    def _parse_schedule(cls, value: object) -> object:
        if isinstance(value, str):
            value = tuple(int(v) for v in value.replace(" ", "").split(",") if v)
        return value

    @field_validator("chunk_schedule")
    @classmethod
    def _check_schedule(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or any(v < 1 for v in value):
            raise ValueError("chunk_schedule needs at least one positive size")
        return value

    def webhook_policy(self) -> WebhookPolicy:
        return WebhookPolicy(parse_host_list(self.webhook_allowed_hosts), self.webhook_allow_private)

    def lm_address_list(self) -> list[str]:
        return [a.strip() for a in self.lm_addresses.split(",") if a.strip()] or [self.lm_addr]

    def static_api_keys(self) -> set[str]:
        return {k.strip() for k in self.api_keys.split(",") if k.strip()}

    def call_api_key(self) -> str:
        """The API key phone calls run under ("" if none is configured)."""
        keys = [k.strip() for k in self.api_keys.split(",") if k.strip()]
        return self.telephony_api_key or (keys[0] if keys else "")

    def twilio_signature_required(self) -> bool:
        if self.twilio_validate_signature is None:
            return bool(self.twilio_auth_token)
        return self.twilio_validate_signature
