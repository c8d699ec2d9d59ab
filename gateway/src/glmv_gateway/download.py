"""``glmv models download``: fetch the published checkpoints with the Hugging Face hub client.

Only the files each service reads are fetched (``checkpoints.LAYOUTS``); an interrupted download
resumes where it stopped (the hub client keeps partial files under ``<dir>/.cache/huggingface``);
a mirror or private hub is reached through ``endpoint`` (or the hub client's own ``HF_ENDPOINT``).
Each directory is checked after download, and the settings that point the stack at it are printed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from glmv_gateway.checkpoints import LAYOUTS, check_layout

log = logging.getLogger("glmv.models")


class DownloadSettings(BaseSettings):
    """Settings of ``glmv models download`` (environment variables with the ``GLMV_MODELS_`` prefix)."""

    model_config = SettingsConfigDict(env_prefix="GLMV_MODELS_", extra="ignore")

    endpoint: str | None = Field(
        None, description="Hub endpoint or mirror URL (default: HF_ENDPOINT, else the public hub)."
    )
    revision: str = Field("main", description="Branch, tag or commit of every repository.")
    tokenizer_repo: str = Field(LAYOUTS["tokenizer"].repo_id, description="Tokenizer repository id.")
    lm_repo: str = Field(LAYOUTS["lm"].repo_id, description="LM repository id.")
    decoder_repo: str = Field(LAYOUTS["decoder"].repo_id, description="Decoder repository id.")
    max_workers: int = Field(4, ge=1, le=32, description="Files fetched at once.")


class DownloadError(RuntimeError):
    """A repository could not be fetched, or what arrived is not a usable checkpoint."""


@dataclass(frozen=True)
class Downloaded:
    component: str
    path: Path
    commit: str


def _hub():  # type: ignore[no-untyped-def]  # the hub client is an optional dependency
    try:
        import huggingface_hub
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise DownloadError(
            "glmv models download needs huggingface_hub: pip install 'glmv-gateway[ops]'"
        ) from exc
    return huggingface_hub


def download_component(
    component: str,
    out: Path,
    settings: DownloadSettings,
    *,
    progress: bool = True,
) -> Downloaded:
    """Fetch one component's files into ``out/<component>`` and check the directory."""
    hub = _hub()
    layout = LAYOUTS[component]
    repo_id = getattr(settings, f"{component}_repo")
    target = out / component
    log.info("downloading %s from %s@%s into %s", component, repo_id, settings.revision, target)
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    (enable_progress_bars if progress else disable_progress_bars)()
    try:
        path = hub.snapshot_download(
            repo_id=repo_id,
            revision=settings.revision,
            local_dir=target,
            allow_patterns=list(layout.allow_patterns),
            endpoint=settings.endpoint,
            max_workers=settings.max_workers,
        )
    except Exception as exc:
        raise DownloadError(f"{component}: fetching {repo_id}@{settings.revision} failed: {exc}") from exc
    problems = check_layout(component, Path(path))
    if problems:
        raise DownloadError(
            f"{component}: {repo_id}@{settings.revision} is not a usable {component} checkpoint: "
            + "; ".join(problems)
        )
    commit = _commit_of(Path(path))
    return Downloaded(component=component, path=Path(path).resolve(), commit=commit)


def _commit_of(path: Path) -> str:
    """The commit the hub client recorded for the files it placed (metadata under .cache)."""
    meta = sorted((path / ".cache" / "huggingface" / "download").rglob("*.metadata"))
    for file in meta:
        first = file.read_text().splitlines()[:1]
        if first and first[0].strip():
            return first[0].strip()
    return "unknown"


def settings_lines(done: list[Downloaded], out: Path) -> list[str]:
    """The environment settings (and the compose one) that point the stack at the downloads."""
    lines = [f"{LAYOUTS[d.component].env_var}={d.path}" for d in done]
    if {d.component for d in done} == set(LAYOUTS):
        lines.append(f"GLMV_MODELS_DIR={out.resolve()}  # compose.yaml mounts <dir>/tokenizer, /lm, /decoder")
    return lines
