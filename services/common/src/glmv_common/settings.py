"""Typed settings read from environment variables (one settings class per process).

Each service subclasses :class:`ServiceSettings` with its own ``env_prefix`` (``GLMV_TOKENIZER_``,
``GLMV_LM_``, ``GLMV_DECODER_``), so ``GLMV_LM_PORT=50052`` sets the LM's port.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    """Settings every model service shares."""

    model_config = SettingsConfigDict(env_prefix="GLMV_", extra="ignore", protected_namespaces=())

    host: str = Field("127.0.0.1", description="Address the gRPC server binds (0.0.0.0 in containers).")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free port.")
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus /metrics HTTP port; 0 disables it.")
    max_concurrent_streams: int = Field(
        64, ge=1, description="Concurrent model RPCs beyond which calls get RESOURCE_EXHAUSTED."
    )
    drain_timeout_s: float = Field(30.0, ge=0, description="On SIGTERM, how long in-flight calls may finish.")
    log_level: str = Field("INFO", description="Python logging level.")
    log_format: Literal["json", "text"] = Field("json", description="Structured JSON lines or plain text.")
    model_dir: Path | None = Field(None, description="Checkpoint directory in the published layout.")
    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:1 ...")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weights/compute dtype.")
    model_version: str = Field(
        "",
        description="Deployment id reported in ModelInfo.model_version (the gateway's registry id, e.g. "
        "v2); empty: the first 12 hex digits of the checkpoint fingerprint.",
    )
    torch_threads: int = Field(
        0, ge=0, description="torch intra-op CPU threads; 0 keeps torch's default (one per core)."
    )


def model_version(setting: str, fingerprint: str) -> str:
    """The deployment id a service reports: its setting, or one derived from the checkpoint."""
    return setting or fingerprint[:12]
